//! Time-bounded fuzzing on stable Rust (proptest): the readers of everything a user or the Hub hands peftkit — the
//! recipe parser (with `--set` overrides), the dataset reader in every format, the safetensors header reader (base
//! weights and adapters), the GGUF reader and the chat-template renderer — get random and mutated inputs and must
//! return `Ok` or `Err`: never panic, never abort, never hang.
//!
//! Each input is derived from a valid one (a recipe, a dataset line, tiny-llama's files, a real chat template) by
//! random edits, plus inputs from scratch, so that the fuzzer reaches past the first syntax check. A watchdog
//! fails the test when one input takes longer than [`PER_INPUT`]. The number of inputs per reader is
//! `PEFTKIT_FUZZ_CASES` (default 500; CI's default keeps the file under a minute).

mod common;

use peftkit::data::{self, ChatTemplate, EncodeOptions, Format, Message};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest one input may take (a debug build on a loaded 2-core machine).
const PER_INPUT: Duration = Duration::from_secs(20);

fn cases() -> u32 {
    std::env::var("PEFTKIT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500)
}

/// Runs `check` on `cases()` inputs from `strategy`, failing on a panic (proptest reports the smallest input it can
/// shrink to) or on an input that runs past [`PER_INPUT`] (the watchdog exits the process with the reader's name).
fn fuzz<S: Strategy>(name: &'static str, strategy: S, check: impl Fn(S::Value)) {
    let started_ms = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (started_ms, done) = (started_ms.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                let since = started_ms.load(Ordering::SeqCst);
                let now = epoch.elapsed().as_millis() as u64;
                if since > 0 && now.saturating_sub(since) > PER_INPUT.as_millis() as u64 {
                    eprintln!("fuzz {name}: one input ran past {PER_INPUT:?}: a hang");
                    std::process::exit(101);
                }
            }
        })
    };
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(
        config,
        proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let result = runner.run(&strategy, |value| {
        started_ms.store(epoch.elapsed().as_millis().max(1) as u64, Ordering::SeqCst);
        check(value);
        started_ms.store(0, Ordering::SeqCst);
        Ok(())
    });
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
}

/// Edits of `base`: each (position, byte) pair overwrites, inserts or deletes at a fraction of the length.
fn mutated(base: Vec<u8>, alphabet: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    let n = base.len().max(1);
    proptest::collection::vec((0..n, 0..alphabet.len(), 0u8..4), 1..8).prop_map(move |edits| {
        let mut out = base.clone();
        for (at, c, how) in edits {
            let at = at.min(out.len());
            let byte = alphabet[c];
            match how {
                0 if at < out.len() => out[at] = byte,
                1 => out.insert(at, byte),
                2 if at < out.len() => {
                    out.remove(at);
                }
                _ => out.truncate(at),
            }
        }
        out
    })
}

/// Bytes YAML, JSON and Jinja give meaning to, digits, letters and a few non-ASCII / invalid UTF-8 bytes.
const SYNTAX: &[u8] = b" \n\t:-[]{},#'\"&*!|>%@?.0123456789eE+-aqz_\\\x00\xff\xc3\xa9";

fn recipe_text() -> String {
    let f = common::fixture("tiny-llama").display().to_string();
    format!(
        "base_model: {f}\nadapter:\n  type: lora\n  r: 4\n  lora_alpha: 8\n  target_modules: [q_proj, v_proj]\n  \
         layers_to_transform: [0]\ndata:\n  train: {f}/config.json\n  format: chat\n  sequence_len: 64\n\
         training:\n  max_steps: 3\n  learning_rate: 1.0e-3\n  lr_scheduler: cosine\noutput:\n  dir: out\n"
    )
}

#[test]
fn fuzz_recipe_parser_and_overrides() {
    let base = recipe_text().into_bytes();
    let text = prop_oneof![mutated(base, SYNTAX), proptest::collection::vec(any::<u8>(), 0..300)];
    let set = proptest::collection::vec("[a-z_.\\[\\]0-9]{0,24}(=[ -~]{0,16})?", 0..3);
    fuzz("recipe", (text, set), |(bytes, set)| {
        let text = String::from_utf8_lossy(&bytes);
        let _ = peftkit::recipe::Recipe::from_str(&text, "fuzz.yaml", &set);
    });
}

#[test]
fn fuzz_dataset_reader_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("tiny-llama");
    let tokenizer = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let template = ChatTemplate::from_model_files(
        Some(&model.join("tokenizer_config.json")),
        Some(&model.join("chat_template.jinja")),
    )
    .unwrap();
    let lines = concat!(
        r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
        "\n",
        r#"{"instruction": "add", "input": "1 2", "output": "3", "text": "t", "prompt": "p", "completion": "c"}"#,
        "\n",
        r#"{"input_ids": [1, 2, 3, 383], "labels": [-100, 2, 3, 383]}"#,
        "\n"
    );
    let strategy = (mutated(lines.as_bytes().to_vec(), SYNTAX), 0usize..4, 1usize..80);
    let path = dir.path().join("d.jsonl");
    fuzz("dataset", strategy, |(bytes, format, sequence_len)| {
        std::fs::write(&path, &bytes).unwrap();
        let format = [Format::Chat, Format::Alpaca, Format::Completion, Format::Tokens][format];
        let opts = EncodeOptions { sequence_len, train_on_inputs: false, vocab_size: Some(384) };
        let _ = data::load_dataset(&path, Some(format), &tokenizer, template.as_ref(), Some("</s>"), &opts);
        let _ = data::load_dataset(&path, None, &tokenizer, template.as_ref(), None, &opts);
    });
}

/// Byte edits of a safetensors file, mostly in its 8-byte length and JSON header.
fn safetensors_edits(file: &Path) -> impl Strategy<Value = Vec<u8>> {
    let bytes = std::fs::read(file).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let head = bytes[..header_end].to_vec();
    let tail = bytes[header_end..].to_vec();
    prop_oneof![
        3 => mutated(head, SYNTAX).prop_map(move |mut h| {
            h.extend_from_slice(&tail);
            h
        }),
        1 => mutated(bytes, b"\x00\x01\x7f\x80\xff{}\"0"),
    ]
}

#[test]
fn fuzz_safetensors_headers_of_models_and_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    let adapter = dir.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let peft = common::fixture("tiny-llama/peft-lora");
    std::fs::copy(peft.join("adapter_config.json"), adapter.join("adapter_config.json")).unwrap();
    let strategy = (
        safetensors_edits(&common::fixture("tiny-llama/model.safetensors")),
        safetensors_edits(&peft.join("adapter_model.safetensors")),
    );
    fuzz("safetensors", strategy, |(model_bytes, adapter_bytes)| {
        std::fs::write(&model, &model_bytes).unwrap();
        if let Ok(source) = peftkit::model::WeightSource::open(std::slice::from_ref(&model)) {
            for (name, _, shape) in source.headers() {
                let _ = source.get(&name, &shape, candle_core::DType::F32, &candle_core::Device::Cpu);
            }
        }
        std::fs::write(adapter.join("adapter_model.safetensors"), &adapter_bytes).unwrap();
        let _ = peftkit::adapter::peft_format::read_adapter(&adapter, &candle_core::Device::Cpu);
    });
}

#[test]
fn fuzz_gguf_reader() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    common::write_tiny_gguf("tiny-llama", &good, false);
    let bytes = std::fs::read(&good).unwrap();
    // The metadata (keys, types, lengths, the tokenizer's arrays) fills the first part of the file.
    let meta_len = bytes.len().min(64 * 1024);
    let head = bytes[..meta_len].to_vec();
    let tail = bytes[meta_len..].to_vec();
    let strategy = prop_oneof![
        4 => mutated(head, b"\x00\x01\x02\x03\x04\x08\x09\x0a\x0c\x10\x7f\x80\xfe\xff").prop_map(move |mut h| {
            h.extend_from_slice(&tail);
            h
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(|mut v| {
            let mut out = b"GGUF\x03\x00\x00\x00".to_vec();
            out.append(&mut v);
            out
        }),
    ];
    let path = dir.path().join("fuzz.gguf");
    fuzz("gguf", strategy, |bytes| {
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(g) = peftkit::gguf::GgufFile::open(&path) {
            let _ = g.architecture();
            let _ = g.tensors();
            let _ = g.string("tokenizer.chat_template");
            let _ = g.config();
        }
    });
}

#[test]
fn fuzz_chat_template_renderer() {
    let real = std::fs::read_to_string(common::fixture("tiny-llama/chat_template.jinja")).unwrap();
    // Fragments that make loops, recursion and big strings reachable, beside byte edits of a real template.
    let pieces = prop::sample::select(vec![
        "{{ ",
        " }}",
        "{% ",
        " %}",
        "for m in messages",
        "for i in range(1000000)",
        "endfor",
        "if ",
        "endif",
        "else",
        "m['content']",
        "messages[0]",
        "loop.index",
        "raise_exception('x')",
        "'a' * 100000",
        "~",
        "|tojson",
        "|length",
        "macro f(x)",
        "endmacro",
        "f(f(1))",
        "set x = ",
        "namespace(a=1)",
        "bos_token",
        "eos_token",
        "strftime_now('%Y')",
        "add_generation_prompt",
        "{#",
        "#}",
        "-",
        "(",
        ")",
        "[",
        "]",
        ".",
        "|",
        "1",
        "none",
    ]);
    let from_pieces = proptest::collection::vec(pieces, 0..24).prop_map(|v| v.concat().into_bytes());
    let strategy = (
        prop_oneof![mutated(real.into_bytes(), SYNTAX), from_pieces],
        proptest::collection::vec(("(system|user|assistant|tool|x)", "[ -~]{0,12}"), 0..4),
    );
    fuzz("chat template", strategy, |(bytes, messages)| {
        let source = String::from_utf8_lossy(&bytes).into_owned();
        if let Ok(t) = ChatTemplate::new(source, "<s>".into(), "</s>".into()) {
            let messages: Vec<Message> = messages.into_iter().map(|(r, c)| Message::new(r, c)).collect();
            let _ = t.render(&messages, true);
            let _ = t.render(&messages, false);
        }
    });
}
