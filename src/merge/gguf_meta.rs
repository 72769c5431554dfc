//! The metadata of a merged GGUF file, as llama.cpp's `convert_hf_to_gguf.py` writes it for Llama and Qwen2.
//!
//! From a Hugging Face base, in the converter's order:
//! - `general.architecture` (`llama` for Llama, Mistral and SmolLM; `qwen2`), `general.type` = `model`,
//!   `general.name` (gguf-py's `Metadata.id_to_title` of the model's folder or repository name),
//!   `general.size_label` (gguf-py's `size_label` of the parameter count, e.g. `135K`, `6.7B`);
//! - `<arch>.block_count`, `.context_length`, `.embedding_length`, `.feed_forward_length`, `.attention.head_count`,
//!   `.attention.head_count_kv`, `.rope.freq_base`, `.attention.layer_norm_rms_epsilon`, `.attention.key_length` and
//!   `.value_length` (when config.json names `head_dim`), `general.file_type`; for `llama` also `.vocab_size`,
//!   `.rope.dimension_count` and linear rope scaling (`.rope.scaling.type`, `.rope.scaling.factor`; Llama 3.1's
//!   scaling is the tensor `rope_freqs.weight` instead, see [`llama3_rope_factors`]);
//!   `general.quantization_version` = 2;
//! - the tokenizer, from `tokenizer.json` (gguf-py's `_set_vocab_gpt2` and `SpecialVocab`): `tokenizer.ggml.model`
//!   = `gpt2`, `.pre` (the pre-tokenizer, named from its structure: llama.cpp names it by hashing the tokenization
//!   of a test text, which needs the tokenizer's Python code), `.tokens` (padded with `[PADi]` to the config's
//!   vocabulary), `.token_type` (1 normal, 3 control for special added tokens and `<|…|>` lookalikes, 4 user-defined
//!   for other added tokens, 5 unused for padding), `.merges` (`"left right"`), the special ids (`bos`, `eos`,
//!   `unknown`, `seperator` \[sic\], `padding`, `cls`, `mask`; from tokenizer_config.json's `*_token`, else
//!   config.json's `*_token_id`), `.add_bos_token` / `.add_eos_token`, and `tokenizer.chat_template`.
//!
//! From a GGUF base every key is kept as the file has it (tokenizer included) but `general.file_type` (the new
//! one), `general.quantization_version` (2) and `general.alignment` (dropped: the output uses the default, 32);
//! the keys are written `general.architecture` first, then `general.*`, `<arch>.*`, `tokenizer.*`, the rest, each
//! group sorted (candle's reader does not keep the file's order; llama.cpp reads keys by name).
//!
//! Reference: the GGUF specification (ggml's `docs/gguf.md`, "Standardized key-value pairs"); llama.cpp's
//! `convert_hf_to_gguf.py` (`TextModel.set_gguf_parameters`, `LlamaModel`, `Qwen2Model`) and gguf-py (`vocab.py`,
//! `metadata.py`, `utility.py`).

use super::options::{io_err, MergeError};
use crate::gguf::{GgufFile, LLAMA3_PATTERN, QWEN2_PATTERN};
use crate::model::{ModelConfig, RopeScaling};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub(super) type Kv = (String, Value);

/// llama.cpp's architecture for a transformers `model_type`.
pub(super) fn gguf_arch(model_type: &str) -> Option<&'static str> {
    match model_type {
        "llama" | "mistral" | "smollm" => Some("llama"),
        "qwen2" => Some("qwen2"),
        _ => None,
    }
}

/// gguf-py's `Metadata.id_to_title`: dashes to spaces, lowercase words title-cased (but versions and numbers).
pub(super) fn id_to_title(id: &str) -> String {
    let words: Vec<String> = id
        .trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            let is_lower = w.chars().any(|c| c.is_lowercase()) && !w.chars().any(|c| c.is_uppercase());
            let version_or_number = w.starts_with(|c: char| c.is_ascii_digit())
                || (w.starts_with('v') && w.len() > 1 && w[1..].split('.').all(|p| p.parse::<u64>().is_ok()));
            if is_lower && !version_or_number {
                python_title(w)
            } else {
                w.to_string()
            }
        })
        .collect();
    words.join(" ")
}

/// Python's `str.title()`: a letter after a non-letter is upper-cased, every other letter lower-cased.
fn python_title(w: &str) -> String {
    let mut prev_cased = false;
    w.chars()
        .map(|c| {
            let out: String = if prev_cased { c.to_lowercase().collect() } else { c.to_uppercase().collect() };
            prev_cased = c.is_alphabetic();
            out
        })
        .collect()
}

/// gguf-py's `model_weight_count_rounded_notation(n, min_digits=2)`: `135K`, `6.7B`, `1.2M`.
pub(super) fn size_label(n: u64) -> String {
    let n = n as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    // Python's round() is half-to-even, as is format's; digits of the rounded integer part, leading zeros stripped.
    let digits = format!("{}", scaled.round_ties_even() as u64).trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

fn u32v(x: usize) -> Value {
    Value::U32(x as u32)
}

/// The model keys for a Hugging Face base (see the module documentation).
pub(super) fn config_kvs(
    cfg: &ModelConfig,
    name: &str,
    file_type: u32,
    params: u64,
    config_path: &Path,
) -> Result<Vec<Kv>, MergeError> {
    let arch = gguf_arch(&cfg.model_type).ok_or_else(|| MergeError::Unsupported {
        path: config_path.into(),
        msg: format!("model_type `{}` has no llama.cpp architecture peftkit writes (llama, qwen2)", cfg.model_type),
    })?;
    let k = |s: &str| format!("{arch}.{s}");
    let mut kv: Vec<Kv> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(id_to_title(name))),
        ("general.size_label".into(), Value::String(size_label(params))),
        (k("block_count"), u32v(cfg.num_hidden_layers)),
        (k("context_length"), u32v(cfg.max_position_embeddings)),
        (k("embedding_length"), u32v(cfg.hidden_size)),
        (k("feed_forward_length"), u32v(cfg.intermediate_size)),
        (k("attention.head_count"), u32v(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u32v(cfg.num_key_value_heads)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
    ];
    if cfg.raw.get("head_dim").is_some_and(|h| h.is_u64()) {
        kv.push((k("attention.key_length"), u32v(cfg.head_dim)));
        kv.push((k("attention.value_length"), u32v(cfg.head_dim)));
    }
    kv.push(("general.file_type".into(), Value::U32(file_type)));
    if arch == "llama" {
        kv.push((k("vocab_size"), u32v(cfg.vocab_size)));
        kv.push((k("rope.dimension_count"), u32v(cfg.head_dim)));
    }
    match cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            kv.push((k("rope.scaling.type"), Value::String("linear".into())));
            kv.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        // Carried by the `rope_freqs.weight` tensor ([`llama3_rope_factors`]), as the converter does.
        RopeScaling::Llama3 { .. } => {}
    }
    kv.push(("general.quantization_version".into(), Value::U32(2)));
    Ok(kv)
}

/// `rope_freqs.weight` for Llama 3.1-style rope scaling: one divisor per rotary frequency, as
/// `LlamaModel.generate_extra_tensors` computes it (1 above the high-frequency wavelength, `factor` below the
/// low-frequency one, interpolated in between). Computed in f64 and rounded to f32 (the converter works in f32, so
/// the last bit may differ).
pub(super) fn llama3_rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } =
        cfg.rope_scaling
    else {
        return None;
    };
    let d = cfg.head_dim;
    let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
    let factors = (0..d / 2).map(|i| {
        let freq = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64);
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        if wavelen < high_wavelen {
            1.0
        } else if wavelen > low_wavelen {
            factor as f32
        } else {
            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
            (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
        }
    });
    Some(factors.collect())
}

/// The Hugging Face tokenizer files a GGUF tokenizer is built from.
pub(super) struct TokenizerFiles {
    pub(super) tokenizer: PathBuf,
    pub(super) tokenizer_config: Option<PathBuf>,
    pub(super) chat_template: Option<PathBuf>,
}

fn read_json(path: &Path) -> Result<Json, MergeError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text)
        .map_err(|e| MergeError::Unsupported { path: path.into(), msg: format!("not valid JSON: {e}") })
}

/// The name of a byte-level BPE pre-tokenizer in llama.cpp's table (`tokenizer.ggml.pre`), read from its structure.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let ty = |v: &Json| v.get("type").and_then(Json::as_str).unwrap_or_default().to_string();
    let byte_level = |v: &Json, regex: bool| ty(v) == "ByteLevel" && v["use_regex"].as_bool() == Some(regex);
    let split = |v: &Json, pattern: &str| ty(v) == "Split" && v["pattern"]["Regex"].as_str() == Some(pattern);
    let digits = |v: &Json| (ty(v) == "Digits" && v["individual_digits"].as_bool() == Some(true)) || split(v, r"\p{N}");
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    let steps = pre.get("pretokenizers").and_then(Json::as_array)?;
    match steps.as_slice() {
        [a, b] if split(a, LLAMA3_PATTERN) && byte_level(b, false) => Some("llama-bpe"),
        [a, b] if split(a, QWEN2_PATTERN) && byte_level(b, false) => Some("qwen2"),
        [a, b] if digits(a) && byte_level(b, true) => Some("smollm"),
        _ => None,
    }
}

/// gguf-py's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The tokenizer keys for a Hugging Face base (see the module documentation); `config` is its config.json.
pub(super) fn tokenizer_kvs(files: &TokenizerFiles, config: &Json, vocab_size: usize) -> Result<Vec<Kv>, MergeError> {
    let path = &files.tokenizer;
    let bad = |msg: String| MergeError::Unsupported { path: path.clone(), msg };
    let tok = read_json(path)?;
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
        return Err(bad(format!(
            "only byte-level BPE tokenizers (GPT-2 style) are written to GGUF; this one is {} {}(SentencePiece \
             vocabularies need llama.cpp's converter)",
            model["type"].as_str().unwrap_or("of unknown type"),
            if model["byte_fallback"].as_bool() == Some(true) { "with byte fallback " } else { "" }
        )));
    }
    let pre = pre_tokenizer_name(&tok["pre_tokenizer"]).ok_or_else(|| {
        bad(format!(
            "pre-tokenizer {} is not one peftkit can name for llama.cpp (gpt-2, llama-bpe, qwen2, smollm)",
            tok["pre_tokenizer"]
        ))
    })?;
    // id → (text, type)
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: u64, text: &str, ty: i32| -> Result<(), MergeError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            bad(format!("token `{text}` has id {id}, outside the model's vocabulary of {vocab_size}"))
        })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    let vocab = model["vocab"].as_object().ok_or_else(|| bad("model.vocab is not an object".into()))?;
    for (text, id) in vocab {
        put(id.as_u64().ok_or_else(|| bad(format!("vocab entry `{text}` has no integer id")))?, text, 1)?;
    }
    let mut added_ids: HashMap<String, u64> = HashMap::new();
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
        let special = a["special"].as_bool() == Some(true) || looks_special(text);
        put(id, text, if special { 3 } else { 4 })?;
        added_ids.insert(text.to_string(), id);
    }
    let (texts, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some((text, ty)) => (Value::String(text), Value::I32(ty)),
            None => (Value::String(format!("[PAD{i}]")), Value::I32(5)),
        })
        .unzip();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(p) if p.len() == 2 => {
                Ok(Value::String(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or(""))))
            }
            other => Err(bad(format!("merge {other} is neither `a b` nor [a, b]"))),
        })
        .collect::<Result<_, _>>()?;

    let mut kv: Vec<Kv> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
    ];
    if !merges.is_empty() {
        kv.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    }
    let tc = match &files.tokenizer_config {
        Some(p) => read_json(p)?,
        None => Json::Null,
    };
    // Special tokens: tokenizer_config.json's `<typ>_token` (a string or {"content": …}), else config.json's id.
    for (typ, key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("sep", "seperator_token_id"),
        ("pad", "padding_token_id"),
        ("cls", "cls_token_id"),
        ("mask", "mask_token_id"),
    ] {
        let entry = &tc[format!("{typ}_token")];
        let text = entry.as_str().or_else(|| entry["content"].as_str());
        let id = text
            .and_then(|t| added_ids.get(t).copied())
            .or_else(|| config[format!("{typ}_token_id")].as_u64())
            .filter(|&id| (id as usize) < vocab_size);
        if let Some(id) = id {
            kv.push((format!("tokenizer.ggml.{key}"), Value::U32(id as u32)));
        }
    }
    // add_bos_token / add_eos_token: tokenizer_config.json, else the post-processor's template.
    let single = tok["post_processor"]["single"].as_array().cloned().unwrap_or_default();
    let is_special = |v: Option<&Json>| v.is_some_and(|v| v.get("SpecialToken").is_some());
    let from_template = |typ: &str| match typ {
        "bos" if single.len() > 1 => Some(is_special(single.first())),
        "eos" if single.len() > 1 => Some(is_special(single.last())),
        _ => None,
    };
    for typ in ["bos", "eos"] {
        if let Some(add) = tc[format!("add_{typ}_token")].as_bool().or_else(|| from_template(typ)) {
            kv.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(add)));
        }
    }
    let template = match &files.chat_template {
        Some(p) => Some(std::fs::read_to_string(p).map_err(io_err(p))?),
        None => match &tc["chat_template"] {
            Json::String(s) => Some(s.clone()),
            // A list of named templates: the default one.
            Json::Array(list) => {
                list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(str::to_string)
            }
            _ => None,
        },
    };
    if let Some(t) = template {
        kv.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(kv)
}

/// The metadata of a GGUF base, for its merged file (see the module documentation).
pub(super) fn copied_kvs(file: &GgufFile, file_type: u32) -> Vec<Kv> {
    let arch = file.architecture().unwrap_or_default();
    let rank = |k: &str| {
        if k == "general.architecture" {
            0
        } else if k.starts_with("general.") {
            1
        } else if k.starts_with(&format!("{arch}.")) {
            2
        } else if k.starts_with("tokenizer.") {
            3
        } else {
            4
        }
    };
    let mut keys: Vec<&String> = file.metadata().keys().filter(|k| k.as_str() != "general.alignment").collect();
    keys.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    let mut kv: Vec<Kv> = Vec::with_capacity(keys.len() + 2);
    for k in keys {
        let v = match k.as_str() {
            "general.file_type" => Value::U32(file_type),
            "general.quantization_version" => Value::U32(2),
            _ => file.metadata()[k].clone(),
        };
        kv.push((k.clone(), v));
    }
    for (k, v) in [("general.file_type", file_type), ("general.quantization_version", 2)] {
        if !kv.iter().any(|(key, _)| key == k) {
            kv.push((k.into(), Value::U32(v)));
        }
    }
    kv
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_size_labels_follow_gguf_py() {
        assert_eq!(id_to_title("tiny-llama"), "Tiny Llama");
        assert_eq!(id_to_title("SmolLM2-135M-Instruct"), "SmolLM2 135M Instruct");
        assert_eq!(id_to_title("qwen2.5-7b-instruct"), "Qwen2.5 7b Instruct");
        assert_eq!(id_to_title("llama-v3.1"), "Llama v3.1");
        assert_eq!(size_label(135_488), "135K");
        assert_eq!(size_label(135_744), "136K");
        assert_eq!(size_label(6_738_415_616), "6.7B");
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(1_235_814_400), "1.2B");
    }

    #[test]
    fn pre_tokenizers_are_named_from_their_structure() {
        let bl = |r: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": r});
        let split = |p: &str| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated"});
        assert_eq!(pre_tokenizer_name(&bl(true)), Some("gpt-2"));
        let seq = |a: Json, b: Json| json!({"type": "Sequence", "pretokenizers": [a, b]});
        assert_eq!(pre_tokenizer_name(&seq(split(LLAMA3_PATTERN), bl(false))), Some("llama-bpe"));
        assert_eq!(pre_tokenizer_name(&seq(split(QWEN2_PATTERN), bl(false))), Some("qwen2"));
        let digits = json!({"type": "Digits", "individual_digits": true});
        assert_eq!(pre_tokenizer_name(&seq(digits, bl(true))), Some("smollm"));
        assert_eq!(pre_tokenizer_name(&json!({"type": "Metaspace"})), None);
    }
}
