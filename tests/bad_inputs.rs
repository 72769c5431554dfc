//! The bad-input corpus: what a hostile or careless user gives each command, and what must come back. Every case
//! runs the real binary in its own folder and must
//! - exit with code 2 (not 1, not an abort's 134, not a signal),
//! - name its culprit (the file, line, key, flag, variable or tensor) in the message,
//! - print no Rust panic,
//! - finish within [`TIME_BOUND`] (a hang is killed and reported),
//! - leave nothing behind: the case folder holds exactly what the case wrote before the command ran.
//!
//! The cases are data (`cases()`); each builds its inputs in a fresh folder and returns the arguments.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a case may run (debug build, a loaded CI machine).
const TIME_BOUND: Duration = Duration::from_secs(60);

struct Case {
    name: &'static str,
    /// Writes the case's inputs into the folder and returns the command's arguments.
    setup: fn(&Path) -> Vec<String>,
    /// Extra environment (`HF_HUB_OFFLINE=1` and no token are the default; `("HF_HUB_OFFLINE", "")` removes it).
    env: &'static [(&'static str, &'static str)],
    /// Text the message must contain (the culprit; `{dir}` stands for the case folder).
    culprit: &'static [&'static str],
}

fn fixture(name: &str) -> String {
    common::fixture(name).display().to_string()
}

fn repo_file(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel).display().to_string()
}

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> String {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

/// A valid tiny recipe: tiny-llama, the support dataset, 2 steps, output in `dir/out`.
fn recipe_text(dir: &Path) -> String {
    format!(
        "base_model: {}\nadapter:\n  type: lora\n  r: 4\n  lora_alpha: 8\n  target_modules: all-linear\ndata:\n  \
         train: {}\n  format: chat\n  sequence_len: 128\ntraining:\n  max_steps: 2\n  micro_batch_size: 2\n  \
         learning_rate: 1.0e-3\noutput:\n  dir: {}\n",
        fixture("tiny-llama"),
        repo_file("datasets/sprigbox-support/train.jsonl"),
        dir.join("out").display()
    )
}

/// `train` on the valid recipe with `from` replaced by `to`.
fn train_with(dir: &Path, from: &str, to: &str) -> Vec<String> {
    let text = recipe_text(dir);
    assert!(text.contains(from), "{from:?} not in the recipe");
    let r = write(dir, "recipe.yaml", text.replacen(from, to, 1));
    s(&["train", &r])
}

/// `train` on the valid recipe with `data.train` pointing at a file holding `content`.
fn train_on_data(dir: &Path, content: &[u8]) -> Vec<String> {
    let data = write(dir, "data.jsonl", content);
    train_with(dir, &repo_file("datasets/sprigbox-support/train.jsonl"), &data)
}

/// A copy of tiny-llama in `dir/model` (config, weights, tokenizer), returning its path.
fn model_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in common::TINY_LLAMA_FILES {
        std::fs::copy(common::fixture("tiny-llama").join(f), m.join(f)).unwrap();
    }
    m
}

/// Edits the JSON header of `file` (a safetensors file) with `edit`, keeping the data.
fn edit_safetensors_header(file: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    assert!(h.len() <= n, "the edited header must not grow");
    h.resize(n, b' ');
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

/// Overwrites the f32 tensor `name` of the safetensors `file` with NaNs.
fn nan_tensor(file: &Path, name: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = &header[name]["data_offsets"];
    let (start, end) = (8 + n + offsets[0].as_u64().unwrap() as usize, 8 + n + offsets[1].as_u64().unwrap() as usize);
    for chunk in bytes[start..end].chunks_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(file, bytes).unwrap();
}

/// A model copy whose `config.json` has `key` set to the JSON `value`.
fn model_with_config(dir: &Path, key: &str, value: serde_json::Value) -> String {
    let m = model_copy(dir);
    let path = m.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
    m.display().to_string()
}

/// A copy of tiny-llama's PEFT LoRA adapter in `dir/adapter`, its config edited by `edit`.
fn adapter_copy(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let a = dir.join("adapter");
    std::fs::create_dir_all(&a).unwrap();
    let src = common::fixture("tiny-llama/peft-lora");
    std::fs::copy(src.join("adapter_model.safetensors"), a.join("adapter_model.safetensors")).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(a.join("adapter_config.json"), serde_json::to_string(&c).unwrap()).unwrap();
    a.display().to_string()
}

fn merge_args(adapter: &str, dir: &Path) -> Vec<String> {
    s(&[
        "merge",
        "--base",
        &fixture("tiny-llama"),
        "--adapter",
        adapter,
        "--out",
        &dir.join("merged").display().to_string(),
    ])
}

fn generate_args(adapter: &str) -> Vec<String> {
    s(&["generate", "--base", &fixture("tiny-llama"), "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "2"])
}

const CHAT_LINE: &str =
    r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

fn cases() -> Vec<Case> {
    let none: &'static [(&'static str, &'static str)] = &[];
    vec![
        // ---- train: the recipe file ----
        Case {
            name: "recipe-missing",
            setup: |d| s(&["train", &d.join("nope.yaml").display().to_string()]),
            env: none,
            culprit: &["nope.yaml", "cannot read"],
        },
        Case {
            name: "recipe-is-a-folder",
            setup: |d| {
                std::fs::create_dir_all(d.join("r.yaml")).unwrap();
                s(&["train", &d.join("r.yaml").display().to_string()])
            },
            env: none,
            culprit: &["r.yaml"],
        },
        Case {
            name: "recipe-random-bytes",
            setup: |d| {
                let b: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x80).collect();
                s(&["train", &write(d, "r.yaml", b)])
            },
            env: none,
            culprit: &["r.yaml:1:1", "not UTF-8"],
        },
        Case {
            name: "recipe-empty",
            setup: |d| s(&["train", &write(d, "r.yaml", "")]),
            env: none,
            culprit: &["r.yaml"],
        },
        Case {
            name: "recipe-unclosed-bracket",
            setup: |d| train_with(d, "target_modules: all-linear", "target_modules: [q_proj, v_proj"),
            env: none,
            culprit: &["recipe.yaml:", "invalid YAML"],
        },
        Case {
            name: "recipe-deep-nesting",
            setup: |d| s(&["train", &write(d, "r.yaml", format!("a: {}{}", "[".repeat(150_000), "]".repeat(150_000)))]),
            env: none,
            culprit: &["r.yaml:1:", "nested deeper than 64"],
        },
        Case {
            name: "recipe-unknown-top-key",
            setup: |d| train_with(d, "data:\n", "dataa: 1\ndata:\n"),
            env: none,
            culprit: &["recipe.yaml:7", "dataa", "unknown key"],
        },
        Case {
            name: "recipe-unknown-adapter-key",
            setup: |d| train_with(d, "  r: 4", "  rank: 4"),
            env: none,
            culprit: &["recipe.yaml:4", "adapter.rank"],
        },
        Case {
            name: "recipe-r-wrong-type",
            setup: |d| train_with(d, "  r: 4", "  r: eight"),
            env: none,
            culprit: &["recipe.yaml:4", "adapter.r"],
        },
        Case {
            name: "recipe-r-zero",
            setup: |d| train_with(d, "  r: 4", "  r: 0"),
            env: none,
            culprit: &["recipe.yaml:4", "adapter.r"],
        },
        Case {
            name: "recipe-r-negative",
            setup: |d| train_with(d, "  r: 4", "  r: -1"),
            env: none,
            culprit: &["recipe.yaml:4", "adapter.r"],
        },
        Case {
            name: "recipe-r-4e9",
            setup: |d| train_with(d, "  r: 4", "  r: 4000000000"),
            env: none,
            culprit: &["recipe.yaml:4", "adapter.r: rank 4000000000 is above min(in, out) = 32"],
        },
        Case {
            name: "recipe-r-1e5",
            setup: |d| train_with(d, "  r: 4", "  r: 100000"),
            env: none,
            culprit: &["recipe.yaml:4", "adapter.r: rank 100000"],
        },
        Case {
            name: "recipe-dropout-1.5",
            setup: |d| train_with(d, "  lora_alpha: 8", "  lora_alpha: 8\n  lora_dropout: 1.5"),
            env: none,
            culprit: &["recipe.yaml:6", "adapter.lora_dropout"],
        },
        Case {
            name: "recipe-lr-negative",
            setup: |d| train_with(d, "learning_rate: 1.0e-3", "learning_rate: -1"),
            env: none,
            culprit: &["recipe.yaml:", "training.learning_rate"],
        },
        Case {
            name: "recipe-lr-nan",
            setup: |d| train_with(d, "learning_rate: 1.0e-3", "learning_rate: .nan"),
            env: none,
            culprit: &["recipe.yaml:", "training.learning_rate"],
        },
        Case {
            name: "recipe-batch-zero",
            setup: |d| train_with(d, "micro_batch_size: 2", "micro_batch_size: 0"),
            env: none,
            culprit: &["recipe.yaml:", "training.micro_batch_size"],
        },
        Case {
            name: "recipe-batch-beyond-memory",
            setup: |d| {
                train_with(d, "sequence_len: 128", "sequence_len: 1000000000\n  packing: true")
                    .into_iter()
                    .chain(s(&["--set", "training.micro_batch_size=100000000"]))
                    .collect()
            },
            env: none,
            culprit: &["recipe.yaml", "needs at least", "is available", "training.micro_batch_size"],
        },
        Case {
            name: "recipe-seq-zero",
            setup: |d| train_with(d, "sequence_len: 128", "sequence_len: 0"),
            env: none,
            culprit: &["recipe.yaml:", "data.sequence_len"],
        },
        Case {
            name: "recipe-adapter-type",
            setup: |d| train_with(d, "type: lora", "type: lorax"),
            env: none,
            culprit: &["recipe.yaml:3", "adapter.type", "lorax"],
        },
        Case {
            name: "recipe-scheduler",
            setup: |d| train_with(d, "learning_rate: 1.0e-3", "learning_rate: 1.0e-3\n  lr_scheduler: bogus"),
            env: none,
            culprit: &["recipe.yaml:", "training.lr_scheduler", "bogus"],
        },
        Case {
            name: "recipe-duplicate-key",
            setup: |d| train_with(d, "  r: 4\n", "  r: 4\n  r: 8\n"),
            env: none,
            culprit: &["recipe.yaml:5", "duplicate"],
        },
        Case {
            name: "recipe-targets-match-nothing",
            setup: |d| train_with(d, "target_modules: all-linear", "target_modules: [c_attn]"),
            env: none,
            culprit: &["recipe.yaml:6", "adapter.target_modules", "matches no projection"],
        },
        Case {
            name: "recipe-layer-99",
            setup: |d| {
                train_with(d, "target_modules: all-linear", "target_modules: all-linear\n  layers_to_transform: [99]")
            },
            env: none,
            culprit: &["recipe.yaml:7", "layer 99 is out of range"],
        },
        Case {
            name: "recipe-exclude-all",
            setup: |d| {
                train_with(d, "target_modules: all-linear", "target_modules: [q_proj]\n  exclude_modules: [q_proj]")
            },
            env: none,
            culprit: &["recipe.yaml:", "adapter.exclude_modules"],
        },
        Case {
            name: "recipe-set-no-equals",
            setup: |d| train_with(d, "r: 4", "r: 4").into_iter().chain(s(&["--set", "adapter.r"])).collect(),
            env: none,
            culprit: &["--set adapter.r"],
        },
        Case {
            name: "recipe-set-unknown-key",
            setup: |d| train_with(d, "r: 4", "r: 4").into_iter().chain(s(&["--set", "adapter.rnak=4"])).collect(),
            env: none,
            culprit: &["--set adapter.rnak=4", "adapter.rnak"],
        },
        Case {
            name: "recipe-output-under-a-file",
            setup: |d| {
                write(d, "afile", "x");
                let out = d.join("out").display().to_string();
                train_with(d, &format!("dir: {out}"), &format!("dir: {}", d.join("afile/sub").display()))
            },
            env: none,
            culprit: &["output.dir", "afile is a file, not a folder"],
        },
        Case {
            name: "recipe-resume-nothing",
            setup: |d| train_with(d, "r: 4", "r: 4").into_iter().chain(s(&["--resume"])).collect(),
            env: none,
            culprit: &["--resume", "no checkpoint"],
        },
        Case {
            name: "recipe-init-from-missing",
            setup: |d| {
                train_with(d, "  r: 4\n  lora_alpha: 8\n", &format!("  init_from: {}\n", d.join("nowhere").display()))
            },
            env: none,
            culprit: &["nowhere"],
        },
        Case {
            name: "recipe-init-from-bad-rank",
            setup: |d| {
                let a = adapter_copy(d, |c| c["r"] = 16.into());
                train_with(d, "  r: 4\n  lora_alpha: 8\n  target_modules: all-linear\n", &format!("  init_from: {a}\n"))
            },
            env: none,
            culprit: &["adapter_model.safetensors", "rank 4", "r = 16"],
        },
        // ---- train: the data ----
        Case {
            name: "data-missing",
            setup: |d| {
                train_with(
                    d,
                    &repo_file("datasets/sprigbox-support/train.jsonl"),
                    &d.join("nope.jsonl").display().to_string(),
                )
            },
            env: none,
            culprit: &["data.train", "nope.jsonl"],
        },
        Case {
            name: "data-bad-json-line-3",
            setup: |d| train_on_data(d, format!("{CHAT_LINE}\n{CHAT_LINE}\n{{\"messages\": [\n").as_bytes()),
            env: none,
            culprit: &["data.jsonl:3"],
        },
        Case { name: "data-empty", setup: |d| train_on_data(d, b""), env: none, culprit: &["data.jsonl"] },
        Case {
            name: "data-wrong-format",
            setup: |d| train_on_data(d, b"{\"text\": \"plain text, not a chat\"}\n"),
            env: none,
            culprit: &["data.jsonl:1", "messages"],
        },
        Case {
            name: "data-not-utf8",
            setup: |d| train_on_data(d, b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}\n"),
            env: none,
            culprit: &["data.jsonl"],
        },
        Case {
            name: "data-bad-role",
            setup: |d| {
                train_on_data(
                    d,
                    br#"{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}"#,
                )
            },
            env: none,
            culprit: &["data.jsonl:1", "wizard"],
        },
        // ---- train: the base model ----
        Case {
            name: "model-folder-missing",
            setup: |d| train_with(d, &fixture("tiny-llama"), &d.join("nomodel").display().to_string()),
            env: none,
            culprit: &["nomodel"],
        },
        Case {
            name: "model-no-config",
            setup: |d| {
                let m = model_copy(d);
                std::fs::remove_file(m.join("config.json")).unwrap();
                train_with(d, &fixture("tiny-llama"), &m.display().to_string())
            },
            env: none,
            culprit: &["config.json"],
        },
        Case {
            name: "model-config-bad-json",
            setup: |d| {
                let m = model_copy(d);
                std::fs::write(m.join("config.json"), "{\"hidden_size\": 64,\n  oops}").unwrap();
                train_with(d, &fixture("tiny-llama"), &m.display().to_string())
            },
            env: none,
            culprit: &["config.json:2"],
        },
        Case {
            name: "model-vocab-1e12",
            setup: |d| {
                let m = model_with_config(d, "vocab_size", 1_000_000_000_000u64.into());
                train_with(d, &fixture("tiny-llama"), &m)
            },
            env: none,
            culprit: &["config.json", "vocab_size: 1000000000000 is beyond"],
        },
        Case {
            name: "model-unsupported-arch",
            setup: |d| {
                let m = model_with_config(d, "model_type", "gpt2".into());
                train_with(d, &fixture("tiny-llama"), &m)
            },
            env: none,
            culprit: &["config.json", "model_type", "gpt2"],
        },
        Case {
            name: "model-weights-truncated",
            setup: |d| {
                let m = model_copy(d);
                let w = m.join("model.safetensors");
                let b = std::fs::read(&w).unwrap();
                std::fs::write(&w, &b[..b.len() / 2]).unwrap();
                train_with(d, &fixture("tiny-llama"), &m.display().to_string())
            },
            env: none,
            culprit: &["model.safetensors"],
        },
        Case {
            name: "model-weight-i32",
            setup: |d| {
                let m = model_copy(d);
                edit_safetensors_header(&m.join("model.safetensors"), |h| {
                    h["model.layers.0.input_layernorm.weight"]["dtype"] = "I32".into()
                });
                train_with(d, &fixture("tiny-llama"), &m.display().to_string())
            },
            env: none,
            culprit: &["model.layers.0.input_layernorm.weight", "I32"],
        },
        Case {
            name: "model-tensor-missing",
            setup: |d| {
                let m = model_copy(d);
                edit_safetensors_header(&m.join("model.safetensors"), |h| {
                    let v = h.remove("model.layers.1.mlp.up_proj.weight").unwrap();
                    h.insert("model.layers.1.mlp.up_prxj.weight".into(), v);
                });
                train_with(d, &fixture("tiny-llama"), &m.display().to_string())
            },
            env: none,
            culprit: &["model.layers.1.mlp.up_proj.weight", "missing"],
        },
        Case {
            name: "model-shape-mismatch",
            setup: |d| {
                let m = model_with_config(d, "intermediate_size", 96.into());
                train_with(d, &fixture("tiny-llama"), &m)
            },
            env: none,
            culprit: &["mlp", "shape"],
        },
        Case {
            name: "model-nan-weights",
            setup: |d| {
                let m = model_copy(d);
                nan_tensor(&m.join("model.safetensors"), "model.norm.weight");
                train_with(d, &fixture("tiny-llama"), &m.display().to_string())
            },
            env: none,
            culprit: &["step 1: the loss is NaN", "No checkpoint was written before it"],
        },
        Case {
            name: "model-gguf-garbage",
            setup: |d| {
                let g = write(d, "m.gguf", b"GGUF\x03\x00\x00\x00garbage-not-a-gguf");
                train_with(d, &fixture("tiny-llama"), &g)
            },
            env: none,
            culprit: &["m.gguf"],
        },
        Case {
            name: "hub-endpoint-not-a-url",
            setup: |d| train_with(d, &fixture("tiny-llama"), "peftkit-test/not-cached"),
            env: &[("HF_HUB_OFFLINE", ""), ("HF_ENDPOINT", "notaurl")],
            culprit: &["HF_ENDPOINT=\"notaurl\" is not an http(s) URL"],
        },
        // ---- bench ----
        Case {
            name: "bench-seq-1e9",
            setup: |_| {
                s(&[
                    "bench",
                    "--config",
                    &fixture("smollm2-135m-config.json"),
                    "--seq",
                    "1000000000",
                    "--batch",
                    "1000000",
                ])
            },
            env: none,
            culprit: &["needs at least", "--batch 1000000 × --seq 1000000000"],
        },
        Case {
            name: "bench-rank-1e5",
            setup: |_| s(&["bench", "--config", &fixture("tiny-llama/config.json"), "--rank", "100000"]),
            env: none,
            culprit: &["--rank 100000", "min(in, out)"],
        },
        Case { name: "bench-nothing-to-run", setup: |_| s(&["bench"]), env: none, culprit: &["--model", "--config"] },
        Case {
            name: "bench-config-missing",
            setup: |d| s(&["bench", "--config", &d.join("c.json").display().to_string()]),
            env: none,
            culprit: &["c.json"],
        },
        Case {
            name: "bench-config-vocab-1e12",
            setup: |d| {
                let m = model_with_config(d, "vocab_size", 1_000_000_000_000u64.into());
                s(&["bench", "--config", &format!("{m}/config.json")])
            },
            env: none,
            culprit: &["config.json", "vocab_size"],
        },
        // ---- inspect ----
        Case {
            name: "inspect-missing",
            setup: |d| s(&["inspect", &d.join("nothing").display().to_string()]),
            env: none,
            culprit: &["nothing"],
        },
        Case {
            name: "inspect-model-corrupt-header",
            setup: |d| {
                let m = model_copy(d);
                std::fs::write(m.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
                s(&["inspect", &m.display().to_string()])
            },
            env: none,
            culprit: &["model.safetensors", "header"],
        },
        Case {
            name: "inspect-adapter-bad-config",
            setup: |d| {
                let a = adapter_copy(d, |_| {});
                std::fs::write(Path::new(&a).join("adapter_config.json"), "{\"r\": ").unwrap();
                s(&["inspect", &a])
            },
            env: none,
            culprit: &["adapter_config.json"],
        },
        Case {
            name: "inspect-gguf-garbage",
            setup: |d| s(&["inspect", &write(d, "x.gguf", b"not a gguf at all")]),
            env: none,
            culprit: &["x.gguf"],
        },
        // ---- merge ----
        Case {
            name: "merge-adapter-missing",
            setup: |d| merge_args(&d.join("noadapter").display().to_string(), d),
            env: none,
            culprit: &["noadapter"],
        },
        Case {
            name: "merge-adapter-rank-mismatch",
            setup: |d| {
                let a = adapter_copy(d, |c| c["r"] = 16.into());
                merge_args(&a, d)
            },
            env: none,
            culprit: &["adapter_model.safetensors", "rank 4", "r = 16"],
        },
        Case {
            name: "merge-adapter-targets-mismatch",
            setup: |d| {
                let a = adapter_copy(d, |c| c["target_modules"] = serde_json::json!(["q_proj"]));
                merge_args(&a, d)
            },
            env: none,
            culprit: &["adapter_model.safetensors", "target_modules"],
        },
        Case {
            name: "merge-adapter-bin-only",
            setup: |d| {
                let a = d.join("adapter");
                write(d, "adapter/adapter_model.bin", b"pickle");
                std::fs::copy(
                    common::fixture("tiny-llama/peft-lora/adapter_config.json"),
                    a.join("adapter_config.json"),
                )
                .unwrap();
                merge_args(&a.display().to_string(), d)
            },
            env: none,
            culprit: &["adapter_model.bin"],
        },
        Case {
            name: "merge-out-under-a-file",
            setup: |d| {
                write(d, "afile", "x");
                s(&[
                    "merge",
                    "--base",
                    &fixture("tiny-llama"),
                    "--adapter",
                    &fixture("tiny-llama/peft-lora"),
                    "--out",
                    &d.join("afile/m").display().to_string(),
                ])
            },
            env: none,
            culprit: &["afile"],
        },
        Case {
            name: "merge-bad-dtype",
            setup: |d| {
                merge_args(&fixture("tiny-llama/peft-lora"), d).into_iter().chain(s(&["--dtype", "f8"])).collect()
            },
            env: none,
            culprit: &["--dtype", "f8"],
        },
        Case {
            name: "merge-quant-without-gguf",
            setup: |d| {
                merge_args(&fixture("tiny-llama/peft-lora"), d).into_iter().chain(s(&["--quant", "q8_0"])).collect()
            },
            env: none,
            culprit: &["--quant"],
        },
        Case {
            name: "merge-adapter-layer-beyond-model",
            setup: |d| {
                let a = adapter_copy(d, |c| {
                    c["target_modules"] =
                        serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
                });
                edit_safetensors_header(&Path::new(&a).join("adapter_model.safetensors"), |h| {
                    for leaf in ["lora_A", "lora_B"] {
                        let from = format!("base_model.model.model.layers.1.self_attn.q_proj.{leaf}.weight");
                        let v = h.remove(&from).unwrap();
                        h.insert(from.replace("layers.1", "layers.7"), v);
                    }
                });
                merge_args(&a, d)
            },
            env: none,
            culprit: &["model.layers.7.self_attn.q_proj", "has no tensor"],
        },
        // ---- export ----
        Case {
            name: "export-ia3-to-gguf",
            setup: |d| {
                s(&[
                    "export",
                    "--adapter",
                    &fixture("tiny-llama/peft-ia3"),
                    "--to",
                    "gguf",
                    "--out",
                    &d.join("a.gguf").display().to_string(),
                ])
            },
            env: none,
            culprit: &["IA3"],
        },
        Case {
            name: "export-adapter-missing",
            setup: |d| {
                s(&[
                    "export",
                    "--adapter",
                    &d.join("none").display().to_string(),
                    "--to",
                    "gguf",
                    "--out",
                    &d.join("a.gguf").display().to_string(),
                ])
            },
            env: none,
            culprit: &["none"],
        },
        // ---- generate / chat / eval ----
        Case {
            name: "generate-base-missing",
            setup: |d| s(&["generate", "--base", &d.join("nobase").display().to_string(), "--prompt", "hi"]),
            env: none,
            culprit: &["nobase"],
        },
        Case {
            name: "generate-adapter-bad-config",
            setup: |d| {
                let a = adapter_copy(d, |_| {});
                std::fs::write(Path::new(&a).join("adapter_config.json"), "[1, 2]").unwrap();
                generate_args(&a)
            },
            env: none,
            culprit: &["adapter_config.json"],
        },
        Case {
            name: "generate-adapter-truncated",
            setup: |d| {
                let a = adapter_copy(d, |_| {});
                let w = Path::new(&a).join("adapter_model.safetensors");
                let b = std::fs::read(&w).unwrap();
                std::fs::write(&w, &b[..b.len() - 100]).unwrap();
                generate_args(&a)
            },
            env: none,
            culprit: &["adapter_model.safetensors"],
        },
        Case {
            name: "generate-adapter-rank-mismatch",
            setup: |d| {
                let a = adapter_copy(d, |c| c["r"] = 8.into());
                generate_args(&a)
            },
            env: none,
            culprit: &["rank 4", "r = 8"],
        },
        Case {
            name: "generate-negative-temperature",
            setup: |_| s(&["generate", "--base", &fixture("tiny-llama"), "--prompt", "hi", "--temperature", "-1"]),
            env: none,
            culprit: &["--temperature"],
        },
        Case {
            name: "chat-base-missing",
            setup: |d| s(&["chat", "--base", &d.join("nobase").display().to_string()]),
            env: none,
            culprit: &["nobase"],
        },
        Case {
            name: "eval-data-missing",
            setup: |d| {
                s(&["eval", "--base", &fixture("tiny-llama"), "--data", &d.join("nodata.jsonl").display().to_string()])
            },
            env: none,
            culprit: &["nodata.jsonl"],
        },
        Case {
            name: "eval-data-bad-line",
            setup: |d| {
                s(&[
                    "eval",
                    "--base",
                    &fixture("tiny-llama"),
                    "--data",
                    &write(d, "e.jsonl", format!("{CHAT_LINE}\nnot json\n")),
                    "--format",
                    "chat",
                ])
            },
            env: none,
            culprit: &["e.jsonl:2"],
        },
        // ---- push ----
        Case {
            name: "push-folder-missing",
            setup: |d| s(&["push", &d.join("nofolder").display().to_string(), "--repo", "me/x"]),
            env: &[("HF_TOKEN", "hf_test")],
            culprit: &["nofolder"],
        },
        Case {
            name: "push-bad-repo",
            setup: |_| s(&["push", &fixture("tiny-llama/peft-lora"), "--repo", "no spaces/allowed here"]),
            env: &[("HF_TOKEN", "hf_test")],
            culprit: &["--repo"],
        },
        Case {
            name: "push-offline",
            setup: |_| s(&["push", &fixture("tiny-llama/peft-lora"), "--repo", "me/x"]),
            env: &[("HF_TOKEN", "hf_test")],
            culprit: &["HF_HUB_OFFLINE"],
        },
        Case {
            name: "push-endpoint-not-a-url",
            setup: |_| s(&["push", &fixture("tiny-llama/peft-lora"), "--repo", "me/x"]),
            env: &[("HF_HUB_OFFLINE", ""), ("HF_TOKEN", "hf_test"), ("HF_ENDPOINT", "notaurl")],
            culprit: &["HF_ENDPOINT"],
        },
        Case {
            name: "push-no-token",
            setup: |_| s(&["push", &fixture("tiny-llama/peft-lora"), "--repo", "me/x"]),
            env: &[("HF_HUB_OFFLINE", ""), ("HF_HOME", "/nonexistent-peftkit-home")],
            culprit: &["token"],
        },
    ]
}

/// Every file and folder under `dir`, relative.
fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out
}

/// Runs one case; `Err` says what went wrong.
fn run_case(case: &Case, root: &Path) -> Result<Duration, String> {
    let dir = root.join(case.name);
    std::fs::create_dir_all(&dir).unwrap();
    let args = (case.setup)(&dir);
    let before = listing(&dir);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    cmd.args(&args).current_dir(&dir).env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN");
    cmd.env("HF_HUB_CACHE", dir.join("no-hub-cache")).env("RUST_BACKTRACE", "1");
    for (k, v) in case.env {
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    let started = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TIME_BOUND {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("hung: killed after {TIME_BOUND:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    if status.code() != Some(2) {
        problems.push(format!("exit {status} (want 2)"));
    }
    if stderr.contains("panicked") || stderr.contains("stack backtrace") {
        problems.push("a Rust panic".to_string());
    }
    let message = stderr.replace(&dir.display().to_string(), "{dir}");
    for part in case.culprit {
        if !stderr.contains(part) {
            problems.push(format!("message lacks {part:?}"));
        }
    }
    let after = listing(&dir);
    let left: Vec<_> = after.difference(&before).filter(|p| !p.starts_with("no-hub-cache")).collect();
    if !left.is_empty() {
        problems.push(format!("left behind: {left:?}"));
    }
    if problems.is_empty() {
        Ok(elapsed)
    } else {
        Err(format!("{}\n      args: {args:?}\n      stderr: {}", problems.join("; "), message.trim_end()))
    }
}

#[test]
fn every_bad_input_is_a_clean_exit_2_naming_its_culprit() {
    let cases = cases();
    assert!(cases.len() >= 60, "the corpus has {} cases", cases.len());
    let mut names = BTreeSet::new();
    for c in &cases {
        assert!(names.insert(c.name), "duplicate case name {}", c.name);
    }
    let root = tempfile::tempdir().unwrap();
    // Two at a time: the cases are short processes, mostly start-up.
    let results = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(case) = cases.get(i) else { break };
                let r = run_case(case, root.path());
                results.lock().unwrap().push((case.name, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(name, _)| *name);
    let failed: Vec<String> =
        results.iter().filter_map(|(n, r)| r.as_ref().err().map(|e| format!("  {n}: {e}"))).collect();
    let slowest = results.iter().filter_map(|(n, r)| r.as_ref().ok().map(|d| (d, n))).max();
    eprintln!(
        "{} cases, {} clean exit 2{}",
        results.len(),
        results.len() - failed.len(),
        slowest.map(|(d, n)| format!("; slowest {n} in {:.2} s", d.as_secs_f64())).unwrap_or_default()
    );
    assert!(failed.is_empty(), "{} of {} cases failed:\n{}", failed.len(), results.len(), failed.join("\n"));
}
