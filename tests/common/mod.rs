//! Helpers shared by the integration tests (each test file includes this module with `mod common;`).
#![allow(dead_code)]

pub mod fakehub;
pub mod loopback;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// The files of the tiny-llama fixture a Hub repo of it holds.
pub const TINY_LLAMA_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// SmolLM2-135M-Instruct as Q4_1 GGUF (the real model of the end-to-end tests): `PEFTKIT_SMOLLM2_GGUF`, else where
/// `scripts/fetch-smollm2.sh` puts it. When it is absent the test says SKIPPED (on the real stderr) and gets `None`;
/// with `PEFTKIT_REQUIRE_SMOLLM2=1` (what `.ci/run` sets) it fails instead, so that a failed fetch cannot turn the
/// real-model tests into silent passes.
pub fn smollm2_gguf(test: &str) -> Option<PathBuf> {
    let path = match std::env::var_os("PEFTKIT_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/peftkit-models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if path.is_file() {
        return Some(path);
    }
    let why = format!("{} not found (run scripts/fetch-smollm2.sh, or set PEFTKIT_SMOLLM2_GGUF)", path.display());
    if std::env::var("PEFTKIT_REQUIRE_SMOLLM2").is_ok_and(|v| v == "1") {
        panic!("{test}: PEFTKIT_REQUIRE_SMOLLM2=1 but {why}");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    None
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An HF hub cache (as huggingface_hub writes it: blobs, snapshot symlinks, refs/main) under `root`, holding
/// tiny-llama as `peftkit-test/tiny-llama`, with a model card whose front matter declares `license: apache-2.0`.
pub fn hf_cache(root: &Path) -> PathBuf {
    let repo = root.join("models--peftkit-test--tiny-llama");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in TINY_LLAMA_FILES.iter().copied().chain(["README.md"]) {
        let blob = repo.join("blobs").join(format!("blob-{f}"));
        if f == "README.md" {
            std::fs::write(&blob, "---\nlicense: apache-2.0\ntags: [test]\n---\n# tiny-llama\n").unwrap();
        } else {
            std::fs::copy(fixture("tiny-llama").join(f), &blob).unwrap();
        }
        std::os::unix::fs::symlink(format!("../../blobs/blob-{f}"), snap.join(f)).unwrap();
    }
    root.to_path_buf()
}

/// Writes the safetensors fixture `name` as a GGUF file the way llama.cpp's converter does :
/// llama.cpp's tensor names, Q/K rows permuted for the Llama architecture, f32 tensors, the tokenizer from
/// tokenizer.json. `tied`: leave `output.weight` out (a tied head).
pub fn write_tiny_gguf(name: &str, out: &Path, tied: bool) {
    write_tiny_gguf_as(name, out, tied, GgmlDType::F32)
}

/// [`write_tiny_gguf`] with the matrices in `dtype` (llama.cpp's block formats; 1-D tensors stay f32, as
/// llama-quantize leaves them).
pub fn write_tiny_gguf_as(name: &str, out: &Path, tied: bool, dtype: GgmlDType) {
    let dir = fixture(name);
    let config = json(&dir.join("config.json"));
    let arch = if config["model_type"] == "qwen2" { "qwen2" } else { "llama" };
    let tok = json(&dir.join("tokenizer.json"));
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for a in tok["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        if id < tokens.len() {
            types[id] = if a["special"].as_bool().unwrap() { 3 } else { 4 };
        } else {
            tokens.push(a["content"].as_str().unwrap().to_string());
            types.push(3);
        }
    }
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            pair => Value::String(format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap())),
        })
        .collect();
    let u = |k: &str| Value::U32(config[k].as_u64().unwrap() as u32);
    let k = |s: &str| format!("{arch}.{s}");
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.license".into(), Value::String("mit".into())),
        ("general.file_type".into(), Value::U32(0)),
        (k("block_count"), u("num_hidden_layers")),
        (k("context_length"), u("max_position_embeddings")),
        (k("embedding_length"), u("hidden_size")),
        (k("feed_forward_length"), u("intermediate_size")),
        (k("attention.head_count"), u("num_attention_heads")),
        (k("attention.head_count_kv"), u("num_key_value_heads")),
        (k("rope.freq_base"), Value::F32(config["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(config["rms_norm_eps"].as_f64().unwrap() as f32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), u("bos_token_id")),
        ("tokenizer.ggml.eos_token_id".into(), u("eos_token_id")),
        ("tokenizer.ggml.padding_token_id".into(), u("pad_token_id")),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap()),
        ),
    ];
    let (nh, nkv) = (
        config["num_attention_heads"].as_u64().unwrap() as usize,
        config["num_key_value_heads"].as_u64().unwrap() as usize,
    );
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (hf, t) in &st {
        let g = match hf.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" if tied => continue,
            "lm_head.weight" => "output.weight".to_string(),
            other => {
                let rest = other.strip_prefix("model.layers.").unwrap();
                let (layer, rest) = rest.split_once('.').unwrap();
                let (module, kind) = rest.rsplit_once('.').unwrap();
                let m = match module {
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    m => panic!("unexpected module {m}"),
                };
                format!("blk.{layer}.{m}.{kind}")
            }
        };
        let mut t = t.to_dtype(DType::F32).unwrap();
        if arch == "llama" && hf.contains("q_proj") {
            t = peftkit::gguf::permute_rotary_rows(&t, nh).unwrap();
        } else if arch == "llama" && hf.contains("k_proj") {
            t = peftkit::gguf::permute_rotary_rows(&t, nkv).unwrap();
        }
        let ty = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        tensors.push((g, QTensor::quantize(&t, ty).unwrap()));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(out).unwrap(), &meta_refs, &tensor_refs).unwrap();
}
