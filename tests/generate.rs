//! Generation on the tiny fixtures: the KV-cached decode loop gives exactly the tokens of a cache-less one
//! (greedy and sampled, with and without a LoRA adapter), a chat's cache reuse across turns changes nothing, the
//! stop conditions hold, and the `generate` / `chat` commands print what the library generates.

mod common;

use candle_core::{Device, Tensor};
use peftkit::adapter::peft_format;
use peftkit::base::{load_base, BaseModel};
use peftkit::data::Message;
use peftkit::generate::{
    generate, generate_without_cache, GenerateError, GenerationOutput, Generator, SamplingParams, StopReason,
};
use peftkit::hub::HubOptions;
use peftkit::linear::ForwardCtx;
use peftkit::model::{KvCache, Llama};
use peftkit::peft_model;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(name: &str) -> BaseModel {
    load_base(fixture(name).to_str().unwrap(), None, None, &HubOptions::default(), &Device::Cpu).unwrap()
}

fn encode(base: &BaseModel, text: &str, add_special_tokens: bool) -> Vec<u32> {
    base.tokenizer.encode(text, add_special_tokens).unwrap().get_ids().to_vec()
}

/// The user's turn rendered with the fixture's chat template.
fn chat_prompt(base: &BaseModel, messages: &[Message]) -> Vec<u32> {
    let text = base.template.as_ref().expect("fixture has a chat template").render(messages, true).unwrap();
    encode(base, &text, false)
}

/// Generates, collecting the tokens passed to the callback (which must be the output minus a stop token).
fn run(cached: bool, model: &Llama, prompt: &[u32], params: &SamplingParams, stop_ids: &[u32]) -> GenerationOutput {
    let mut seen = Vec::new();
    let on_token = |id| {
        seen.push(id);
        Ok::<_, Infallible>(true)
    };
    let out = if cached {
        generate(model, prompt, params, stop_ids, on_token).unwrap()
    } else {
        generate_without_cache(model, prompt, params, stop_ids, on_token).unwrap()
    };
    assert_eq!(seen, out.content_tokens());
    out
}

fn sampled(max_new_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.8, top_p: 0.9, seed: 7, max_new_tokens, ..SamplingParams::default() }
}

#[test]
fn cache_gives_the_tokens_of_full_recomputation() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let mut base = load(name);
        let prompt = encode(&base, "The quick brown fox jumps over the lazy dog.", true);
        for adapter in [false, true] {
            if adapter {
                peft_model::load_adapter(&mut base.model, &fixture(name).join("peft-lora")).unwrap();
            }
            for params in [SamplingParams::greedy(24), sampled(24)] {
                // No stop ids: every run goes the full 24 tokens.
                let a = run(true, &base.model, &prompt, &params, &[]);
                let b = run(false, &base.model, &prompt, &params, &[]);
                assert_eq!(a.tokens.len(), 24, "{name}");
                assert_eq!(a.stop, StopReason::MaxTokens);
                assert_eq!(a.tokens, b.tokens, "{name}, adapter {adapter}, {params:?}");
            }
        }
    }
}

#[test]
fn sampling_depends_on_the_seed_only() {
    let base = load("tiny-llama");
    let prompt = encode(&base, "Once upon a time", true);
    let a = run(true, &base.model, &prompt, &sampled(20), &[]);
    let b = run(true, &base.model, &prompt, &sampled(20), &[]);
    let c = run(true, &base.model, &prompt, &SamplingParams { seed: 8, ..sampled(20) }, &[]);
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens, "a random-weight model's near-uniform distribution gives another draw");
}

#[test]
fn truncated_cache_continues_like_a_fresh_forward() {
    let base = load("tiny-qwen2");
    let m = &base.model;
    let ctx = ForwardCtx { dropout_seed: None, no_grad: true };
    let ids = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let a: Vec<u32> = (10..20).collect();
    let b: Vec<u32> = vec![100, 101, 102, 103];
    let mut cache = KvCache::new(m.layers.len());
    m.forward_hidden(&ids(&a), &ctx, Some(&mut cache)).unwrap();
    assert_eq!(cache.len(), 10);
    cache.truncate(6).unwrap();
    assert_eq!(cache.len(), 6);
    let cont = m.forward_hidden(&ids(&b), &ctx, Some(&mut cache)).unwrap(); // (1, 4, hidden)
    assert_eq!(cache.len(), 10);
    let full: Vec<u32> = a[..6].iter().chain(&b).copied().collect();
    let fresh = m.forward_hidden(&ids(&full), &ctx, None).unwrap().narrow(1, 6, 4).unwrap();
    let diff = (cont - fresh).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "max |Δ| = {diff}");
    cache.truncate(0).unwrap();
    assert!(cache.is_empty());
}

#[test]
fn chat_turns_reuse_the_cache_exactly() {
    let base = load("tiny-llama");
    for params in [SamplingParams::greedy(12), sampled(12)] {
        let mut gen = Generator::new(&base.model);
        let mut history = vec![Message::new("system", "You are terse."), Message::new("user", "hello there")];
        let p1 = chat_prompt(&base, &history);
        let out1 = gen.generate(&p1, &params, &base.stop_ids, |_| Ok::<_, Infallible>(true)).unwrap();
        assert_eq!(out1.reused_tokens, 0);
        let reply = base.tokenizer.decode(out1.content_tokens(), true).unwrap();
        history.push(Message::new("assistant", reply));
        history.push(Message::new("user", "and now?"));
        let p2 = chat_prompt(&base, &history);
        let out2 = gen.generate(&p2, &params, &base.stop_ids, |_| Ok::<_, Infallible>(true)).unwrap();
        // At least the first turn's prompt came from the cache.
        assert!(out2.reused_tokens >= p1.len(), "{} < {}", out2.reused_tokens, p1.len());
        let fresh = run(false, &base.model, &p2, &params, &base.stop_ids);
        assert_eq!(out2.tokens, fresh.tokens, "{params:?}");
        assert_eq!(out2.stop, fresh.stop);

        // A changed system message diverges early: the cache is cut back, and the result is still exact.
        history[0] = Message::new("system", "Be verbose.");
        let p3 = chat_prompt(&base, &history);
        let out3 = gen.generate(&p3, &params, &base.stop_ids, |_| Ok::<_, Infallible>(true)).unwrap();
        assert!(out3.reused_tokens < p1.len());
        let fresh = run(false, &base.model, &p3, &params, &base.stop_ids);
        assert_eq!(out3.tokens, fresh.tokens);
        // The same prompt again: all but its last token reused.
        let again = gen.generate(&p3, &params, &base.stop_ids, |_| Ok::<_, Infallible>(true)).unwrap();
        assert_eq!(again.reused_tokens, p3.len() - 1);
        assert_eq!(again.tokens, out3.tokens);
    }
}

#[test]
fn stop_token_callback_and_context_limit() {
    let base = load("tiny-llama");
    let m = &base.model;
    let prompt = encode(&base, "Stop here", true);
    let free = run(true, m, &prompt, &SamplingParams::greedy(10), &[]);
    // Stopping on the third greedy token: it ends the output and is not passed to the callback (`run` checks).
    let stop = free.tokens[2];
    let first = free.tokens.iter().position(|&t| t == stop).unwrap();
    let out = run(true, m, &prompt, &SamplingParams::greedy(10), &[stop]);
    assert_eq!(out.tokens, free.tokens[..=first]);
    assert_eq!(out.stop, StopReason::StopToken(stop));
    assert!(out.stopped_on_stop_token());
    assert_eq!(out.content_tokens(), &free.tokens[..first]);

    // The callback ends generation after the token it declines.
    let mut n = 0;
    let out = generate(m, &prompt, &SamplingParams::greedy(10), &[], |_| {
        n += 1;
        Ok::<_, Infallible>(n < 4)
    })
    .unwrap();
    assert_eq!((out.tokens.len(), out.stop), (4, StopReason::Callback));
    // …and its errors come back as such.
    let err = generate(m, &prompt, &SamplingParams::greedy(10), &[], |_| Err("disk full")).unwrap_err();
    assert!(matches!(err, GenerateError::Callback(_)) && err.to_string() == "disk full", "{err}");

    // The context (max_position_embeddings = 256) bounds prompt + generated.
    let max = m.config.max_position_embeddings;
    assert_eq!(max, 256);
    let long: Vec<u32> = (0..250).map(|i| 3 + (i * 7) % 300).collect();
    for cached in [true, false] {
        let out = run(cached, m, &long, &SamplingParams::greedy(20), &[]);
        assert_eq!((out.tokens.len(), out.stop), (6, StopReason::ContextFull));
    }
    let full: Vec<u32> = (0..256).map(|i| 3 + i % 300).collect();
    let err = generate(m, &full, &SamplingParams::greedy(5), &[], |_| Ok::<_, Infallible>(true)).unwrap_err();
    assert!(matches!(err, GenerateError::PromptTooLong { len: 256, max: 256 }), "{err}");
    assert!(matches!(
        generate(m, &[], &SamplingParams::greedy(5), &[], |_| Ok::<_, Infallible>(true)),
        Err(GenerateError::EmptyPrompt)
    ));
    assert!(matches!(
        generate(m, &[5, 384], &SamplingParams::greedy(5), &[], |_| Ok::<_, Infallible>(true)),
        Err(GenerateError::TokenOutOfRange { id: 384, pos: 1, vocab: 384 })
    ));
    // A Generator stays usable after an error.
    let mut gen = Generator::new(m);
    assert!(gen.generate(&full, &SamplingParams::greedy(5), &[], |_| Ok::<_, Infallible>(true)).is_err());
    let out = gen.generate(&prompt, &SamplingParams::greedy(10), &[], |_| Ok::<_, Infallible>(true)).unwrap();
    assert_eq!(out.tokens, free.tokens);
}

// ---------------------------------------------------------------------------------------------------------------
// The commands

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    // Never reach for a real Hub or a user's cache from tests.
    c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN");
    c
}

fn with_stdin(mut c: Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// The text of a greedy generation, as the commands print it (stop token dropped, a newline after).
fn greedy_text(base: &BaseModel, prompt: &[u32], max_new_tokens: usize) -> String {
    let out = run(false, &base.model, prompt, &SamplingParams::greedy(max_new_tokens), &base.stop_ids);
    base.tokenizer.decode(out.content_tokens(), true).unwrap() + "\n"
}

#[test]
fn generate_command_prints_the_library_text() {
    let dir = fixture("tiny-llama");
    let o = bin()
        .args(["generate", "--base", dir.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "5"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let base = load("tiny-llama");
    assert_eq!(text(&o.stdout), greedy_text(&base, &encode(&base, "hi", true), 5));
    let err = text(&o.stderr);
    assert!(err.contains("tokens in") && err.contains("tokens/s), prompt"), "{err}");

    // --chat: one user turn (with a system message) through the template.
    let o = bin()
        .args(["generate", "--base", dir.to_str().unwrap(), "--prompt", "hi", "--chat", "--system", "be brief"])
        .args(["--max-new-tokens", "6"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let prompt = chat_prompt(&base, &[Message::new("system", "be brief"), Message::new("user", "hi")]);
    assert_eq!(text(&o.stdout), greedy_text(&base, &prompt, 6));

    // With the LoRA adapter, the output is the adapted model's.
    let adapter = dir.join("peft-lora");
    let o = bin()
        .args(["generate", "--base", dir.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()])
        .args(["--prompt", "hi", "--max-new-tokens", "5"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let mut adapted = load("tiny-llama");
    peft_model::load_adapter(&mut adapted.model, &adapter).unwrap();
    assert_eq!(text(&o.stdout), greedy_text(&adapted, &encode(&adapted, "hi", true), 5));
}

#[test]
fn generate_command_rejects_bad_flags() {
    let dir = fixture("tiny-llama");
    for (flag, value, needle) in [
        ("--temperature", "-1", "--temperature"),
        ("--temperature", "nan", "--temperature"),
        ("--top-p", "0", "--top-p"),
        ("--top-p", "1.5", "--top-p"),
        ("--repetition-penalty", "0", "--repetition-penalty"),
        ("--max-new-tokens", "0", "--max-new-tokens"),
    ] {
        let o =
            bin().args(["generate", "--base", dir.to_str().unwrap(), "--prompt", "hi", flag, value]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains(needle), "{}", text(&o.stderr));
    }
    // --system only makes sense with --chat (clap's usage error, also exit 2).
    let o =
        bin().args(["generate", "--base", dir.to_str().unwrap(), "--prompt", "hi", "--system", "x"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn chat_command_follows_the_conversation() {
    let dir = fixture("tiny-llama");
    let script = "hello\n/reset\n/system be brief\n/bogus\n\nhi\n/exit\nnever read\n";
    let mut c = bin();
    c.args(["chat", "--base", dir.to_str().unwrap(), "--temperature", "0", "--max-new-tokens", "6"]);
    let o = with_stdin(c, script);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    // Two replies: "hello" alone, then "hi" after the reset under the new system message.
    let base = load("tiny-llama");
    let r1 = greedy_text(&base, &chat_prompt(&base, &[Message::new("user", "hello")]), 6);
    let r2 =
        greedy_text(&base, &chat_prompt(&base, &[Message::new("system", "be brief"), Message::new("user", "hi")]), 6);
    assert_eq!(text(&o.stdout), r1 + &r2);
    assert!(err.contains("conversation cleared") && err.contains("unknown command /bogus"), "{err}");
    assert!(!err.contains("> "), "no prompt when stdin is not a terminal: {err}");

    // Sampling by default, several turns, EOF ends it cleanly.
    let mut c = bin();
    c.args(["chat", "--base", dir.to_str().unwrap(), "--max-new-tokens", "8", "--system", "hey"]);
    let o = with_stdin(c, "one\ntwo\nthree\n");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

#[test]
fn chat_needs_a_template() {
    // tiny-llama without its chat_template.jinja (its tokenizer_config.json has no chat_template).
    let d = std::env::temp_dir().join(format!("peftkit-gen-notemplate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), d.join(f)).unwrap();
    }
    let o = with_stdin(
        {
            let mut c = bin();
            c.args(["chat", "--base", d.to_str().unwrap()]);
            c
        },
        "hello\n",
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("no chat template"), "{}", text(&o.stderr));
    let o = bin().args(["generate", "--base", d.to_str().unwrap(), "--prompt", "hi", "--chat"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    // Raw text needs no template.
    let o = bin()
        .args(["generate", "--base", d.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "3"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------------------------
// A real chat model against transformers (skipped when the GGUF file is absent)

#[test]
fn smollm2_greedy_answer_matches_transformers() {
    let Some(path) = common::smollm2_gguf("smollm2_greedy_answer_matches_transformers") else { return };
    let refs = fixture("smollm2");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refs.join("reference.json")).unwrap()).unwrap();
    let expected = candle_core::safetensors::load(refs.join("expected.safetensors"), &Device::Cpu).unwrap();
    let want: Vec<u32> =
        expected["generated_ids"].flatten_all().unwrap().to_dtype(candle_core::DType::U32).unwrap().to_vec1().unwrap();
    let question = "What is the capital of France?";
    let answer = reference["greedy_answer"].as_str().unwrap().trim_end_matches("<|im_end|>");

    let base = load_base(path.to_str().unwrap(), None, None, &HubOptions::default(), &Device::Cpu).unwrap();
    let prompt = chat_prompt(&base, &[Message::new("user", question)]);
    let out = run(true, &base.model, &prompt, &SamplingParams::greedy(32), &base.stop_ids);
    // transformers' greedy continuation, ending on <|im_end|>.
    assert_eq!(out.tokens, want);
    assert!(out.stopped_on_stop_token());
    assert_eq!(base.tokenizer.decode(out.content_tokens(), true).unwrap(), answer);

    // The CLI on the dequantized weights (`--quant none`), as transformers reads the file. By default `generate`
    // multiplies with the file's Q4_1 blocks and 8-bit activations, as llama.cpp does: on this question both
    // llama.cpp and peftkit then answer "L'Étoile, la Marseillaise, la femme…" (the 135M model's top two first
    // tokens are that close), so the default is checked for running, not for transformers' text.
    let cli = |quant: &str| {
        let o = bin()
            .args(["generate", "--base", path.to_str().unwrap(), "--chat", "--prompt", question])
            .args(["--max-new-tokens", "32", "--quant", quant])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        text(&o.stdout)
    };
    assert_eq!(cli("none"), format!("{answer}\n"));
    assert!(!cli("auto").trim().is_empty());
}

/// `--adapter NAME=DIR` repeated: each adapter, made active, generates what it generates loaded alone.
#[test]
fn several_adapters_generate_as_each_alone() {
    let dir = fixture("tiny-llama");
    let (a, b) = (dir.join("peft-lora"), fixture("tiny-llama-weighted-peft/b"));
    let gen = |extra: &[String]| {
        let o = bin()
            .args(["generate", "--base", dir.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "8"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{extra:?}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (a_s, b_s) = (a.display().to_string(), b.display().to_string());
    let alone_a = gen(&s(&["--adapter", &a_s]));
    let alone_b = gen(&s(&["--adapter", &b_s]));
    let base = gen(&[]);
    assert!(alone_a != alone_b && alone_a != base, "the adapters must change the text for this test to mean much");
    let both = s(&["--adapter", &format!("a={a_s}"), "--adapter", &format!("b={b_s}")]);
    assert_eq!(gen(&both), alone_a, "the first is active by default");
    assert_eq!(gen(&[both.clone(), s(&["--active", "b"])].concat()), alone_b);
    assert_eq!(gen(&[both, s(&["--active", "none"])].concat()), base);
}

/// `/adapter NAME` switches in a chat without reloading; the conversation is kept, the next reply recomputed.
#[test]
fn chat_switches_adapters() {
    let dir = fixture("tiny-llama");
    let (a, b) = (dir.join("peft-lora"), fixture("tiny-llama-weighted-peft/b"));
    let mut c = bin();
    c.args(["chat", "--base", dir.to_str().unwrap(), "--temperature", "0", "--max-new-tokens", "6"])
        .arg("--adapter")
        .arg(format!("a={}", a.display()))
        .arg("--adapter")
        .arg(format!("b={}", b.display()));
    let o = with_stdin(c, "hello\n/adapter\n/adapter b\nagain\n/adapter zz\n/adapter none\n/reset\nhi\n");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let mut with_a = load("tiny-llama");
    peft_model::load_adapter(&mut with_a.model, &a).unwrap();
    let mut with_b = load("tiny-llama");
    peft_model::load_adapter(&mut with_b.model, &b).unwrap();
    let base = load("tiny-llama");
    let r1 = greedy_text(&with_a, &chat_prompt(&with_a, &[Message::new("user", "hello")]), 6);
    let kept = [
        Message::new("user", "hello"),
        Message::new("assistant", r1.strip_suffix('\n').unwrap()),
        Message::new("user", "again"),
    ];
    let r2 = greedy_text(&with_b, &chat_prompt(&with_b, &kept), 6);
    let r3 = greedy_text(&base, &chat_prompt(&base, &[Message::new("user", "hi")]), 6);
    assert_eq!(text(&o.stdout), r1 + &r2 + &r3);
    assert!(err.contains("* a") && err.contains("  b") && err.contains("none"), "the listing: {err}");
    assert!(err.contains("(adapter: b)") && err.contains("no adapter is named `zz` (loaded: a, b)"), "{err}");
}

#[test]
fn several_adapters_refuse_bad_names_and_mixes() {
    let dir = fixture("tiny-llama");
    let a = format!("{}", dir.join("peft-lora").display());
    let tokens = fixture("tiny-llama-tokens-peftkit").display().to_string();
    for (args, needle) in [
        (vec![format!("x={a}"), format!("x={a}")], "`x` is given twice"),
        (vec![a.clone(), a.clone()], "`default` is given twice"),
        (vec![format!("a:b={a}")], "`a:b` is not valid"),
        (vec![format!("x={a}"), format!("t={tokens}")], "carries its own tokenizer"),
    ] {
        let mut c = bin();
        c.args(["generate", "--base", dir.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "2"]);
        for s in &args {
            c.arg("--adapter").arg(s);
        }
        let o = c.output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains(needle), "{args:?}: {}", text(&o.stderr));
    }
    // An adapter for another model: its tensor named; a missing folder named.
    let bad = std::env::temp_dir().join(format!("peftkit-gen-badshape-{}", std::process::id()));
    std::fs::create_dir_all(&bad).unwrap();
    let b = fixture("tiny-llama-weighted-peft/b");
    std::fs::copy(b.join("adapter_config.json"), bad.join("adapter_config.json")).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj";
    let t = |r, c| Tensor::zeros((r, c), candle_core::DType::F32, &Device::Cpu).unwrap();
    let tensors = vec![(format!("{key}.lora_A.weight"), t(4, 32)), (format!("{key}.lora_B.weight"), t(64, 4))];
    peft_format::save_safetensors(&bad.join("adapter_model.safetensors"), &tensors).unwrap();
    for (second, needle) in [
        (format!("y={}", bad.display()), format!("{key}: lora_A [4, 32]")),
        ("y=/nonexistent/adapter".to_string(), "/nonexistent/adapter/adapter_config.json".to_string()),
    ] {
        let o = bin()
            .args(["generate", "--base", dir.to_str().unwrap(), "--prompt", "hi", "--adapter", &format!("x={a}")])
            .args(["--adapter", &second])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
        assert!(text(&o.stderr).contains(&needle), "{needle}: {}", text(&o.stderr));
    }
    let o = bin()
        .args(["generate", "--base", dir.to_str().unwrap(), "--prompt", "hi", "--adapter", &format!("x={a}")])
        .args(["--active", "y"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--active y: no --adapter is named so (given: x)"), "{}", text(&o.stderr));
}

/// `eval` with several adapters: one row each, the scores each gets alone.
#[test]
fn eval_compares_several_adapters() {
    let dir = fixture("tiny-llama");
    let (a, b) = (dir.join("peft-lora"), fixture("tiny-llama-weighted-peft/b"));
    let d = std::env::temp_dir().join(format!("peftkit-gen-eval-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let data = d.join("eval.jsonl");
    std::fs::write(&data, "{\"text\": \"hello there, how are you\"}\n{\"text\": \"the quick brown fox\"}\n").unwrap();
    let eval_with = |adapters: &[String], json: bool, extra: &[&str]| {
        let mut c = bin();
        c.args(["eval", "--base", dir.to_str().unwrap(), "--data"]).arg(&data);
        if json {
            c.arg("--json");
        }
        for s in adapters {
            c.arg("--adapter").arg(s);
        }
        let o = c.args(extra).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        text(&o.stdout)
    };
    let eval = |adapters: &[String], json: bool| eval_with(adapters, json, &[]);
    let loss = |line: &str| serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"].as_f64().unwrap();
    let alone_a = loss(eval(&[a.display().to_string()], true).trim());
    let alone_b = loss(eval(&[b.display().to_string()], true).trim());
    let both = [format!("a={}", a.display()), format!("b={}", b.display())];
    let out = eval(&both, true);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!((lines[0]["adapter"].as_str(), lines[1]["adapter"].as_str()), (Some("a"), Some("b")));
    assert!((lines[0]["loss"].as_f64().unwrap() - alone_a).abs() < 1e-9, "{out}");
    assert!((lines[1]["loss"].as_f64().unwrap() - alone_b).abs() < 1e-9, "{out}");
    let table = eval(&both, false);
    assert!(table.contains("adapter") && table.contains("perplexity"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("a ")) && table.lines().any(|l| l.starts_with("b ")), "{table}");
    // --active scores that one only (it was ignored before), `none` the base alone.
    let only_b = eval_with(&both, true, &["--active", "b"]);
    assert_eq!(only_b.lines().count(), 1, "{only_b}");
    assert!((loss(only_b.trim()) - alone_b).abs() < 1e-9, "{only_b}");
    let base = loss(eval(&[], true).trim());
    let none = eval_with(&both, true, &["--active", "none"]);
    assert!((loss(none.trim()) - base).abs() < 1e-9, "{none}");
}
