//! The output folder but for the weights: `config.json`, the tokenizer files rebuilt from a GGUF base, plain file
//! writes; the checks on `--out`, and the hidden temporary folder renamed into place at the end.

use super::options::{io_err, MergeError, OutDtype};
use crate::gguf::{self, GgufFile};
use crate::hub;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The base's config for the merged model: no `quantization_config` (the weights are dense now), and `torch_dtype`
/// and `dtype` (transformers 5's name) both set to the output dtype. Every other key is kept, in its place.
pub(super) fn merged_config(base: &Value, dtype: OutDtype) -> Value {
    let mut c = base.clone();
    if let Some(obj) = c.as_object_mut() {
        obj.shift_remove("quantization_config");
        obj.insert("torch_dtype".into(), json!(dtype.hf_name()));
        obj.insert("dtype".into(), json!(dtype.hf_name()));
    }
    c
}

/// The tokenizer files of a GGUF base, rebuilt from its metadata: `tokenizer.json` (the tokenizer peftkit rebuilds,
/// see [`gguf::build_tokenizer`]), `tokenizer_config.json` (special tokens and the chat template, also written as
/// `chat_template.jinja`) and `generation_config.json` (BOS, EOS and end-of-turn ids, padding id).
pub(super) fn write_gguf_tokenizer(file: &GgufFile, dir: &Path) -> Result<(), MergeError> {
    let tokenizer = gguf::build_tokenizer(file)?;
    let tok_path = dir.join(hub::TOKENIZER_FILE);
    let json_text = tokenizer
        .to_string(false)
        .map_err(|e| MergeError::Io { path: tok_path.clone(), source: std::io::Error::other(e.to_string()) })?;
    write_file(&tok_path, json_text.as_bytes())?;

    let id = |key: &str| -> Result<Option<u32>, MergeError> { Ok(file.uint(key)?.map(|v| v as u32)) };
    let (bos, eos, pad, unk) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
        id("tokenizer.ggml.unknown_token_id")?,
    );
    let template = file.string("tokenizer.chat_template")?.filter(|t| !t.trim().is_empty());
    let mut cfg = serde_json::Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    for (key, id) in [("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)] {
        if let Some(t) = id.and_then(|i| tokenizer.id_to_token(i)) {
            cfg.insert(key.into(), json!(t));
        }
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(t) = &template {
        cfg.insert("chat_template".into(), json!(t));
        write_file(&dir.join(hub::CHAT_TEMPLATE_FILE), t.as_bytes())?;
    }
    write_json(&dir.join(hub::TOKENIZER_CONFIG_FILE), &Value::Object(cfg))?;

    // Generation stops at EOS and at the end-of-turn / end-of-message tokens llama.cpp records.
    let mut stops: Vec<u32> = Vec::new();
    for i in [eos, id("tokenizer.ggml.eot_token_id")?, id("tokenizer.ggml.eom_token_id")?].into_iter().flatten() {
        if !stops.contains(&i) {
            stops.push(i);
        }
    }
    let mut gen = serde_json::Map::new();
    if let Some(b) = bos {
        gen.insert("bos_token_id".into(), json!(b));
    }
    match stops.as_slice() {
        [] => {}
        [one] => {
            gen.insert("eos_token_id".into(), json!(one));
        }
        many => {
            gen.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(p) = pad {
        gen.insert("pad_token_id".into(), json!(p));
    }
    write_json(&dir.join(hub::GENERATION_CONFIG_FILE), &Value::Object(gen))
}

pub(super) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), MergeError> {
    std::fs::write(path, bytes).map_err(io_err(path))
}

pub(super) fn write_json(path: &Path, v: &Value) -> Result<(), MergeError> {
    let mut text = serde_json::to_string_pretty(v)
        .map_err(|e| MergeError::Io { path: path.into(), source: std::io::Error::other(e.to_string()) })?;
    text.push('\n');
    write_file(path, text.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// The output folder
// ---------------------------------------------------------------------------------------------

/// `out` must name a folder that is absent, empty, or (with `overwrite`) replaceable.
pub(super) fn check_out_folder(out: &Path, overwrite: bool) -> Result<(), MergeError> {
    let bad = |msg: &str| Err(MergeError::Out { out: out.to_path_buf(), msg: msg.to_string() });
    if out.file_name().is_none() {
        return bad("must name a folder (not `.`, `..` or a root)");
    }
    if out.exists() {
        if !out.is_dir() {
            return bad("exists and is not a folder");
        }
        let empty = std::fs::read_dir(out).map_err(io_err(out))?.next().is_none();
        if !empty && !overwrite {
            return bad(
                "exists and is not empty: pass --overwrite to replace it (it is replaced only once the merged model \
                 is complete)",
            );
        }
    }
    Ok(())
}

/// Refuses an output folder that is, or contains, one of the inputs: replacing it would delete what is being read.
pub(super) fn check_not_an_input(out: &Path, inputs: &[PathBuf]) -> Result<(), MergeError> {
    let abs_out = match std::fs::canonicalize(out) {
        Ok(p) => p,
        Err(_) => {
            match (out.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }), out.file_name()) {
                (Some(parent), Some(name)) => match std::fs::canonicalize(parent) {
                    Ok(p) => p.join(name),
                    Err(_) => return Ok(()), // the parent does not exist: nothing in it can be an input
                },
                _ => return Ok(()),
            }
        }
    };
    for input in inputs {
        if std::fs::canonicalize(input).is_ok_and(|i| i.starts_with(&abs_out)) {
            return Err(MergeError::Out {
                out: out.to_path_buf(),
                msg: format!("is or contains the input {}; choose another folder", input.display()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_config_drops_quantization_and_sets_dtype_in_place() {
        let base = json!({"a": 1, "quantization_config": {"load_in_4bit": true}, "torch_dtype": "float32", "z": 2});
        let c = merged_config(&base, OutDtype::Bf16);
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["a", "torch_dtype", "z", "dtype"]);
        assert_eq!(c["torch_dtype"], "bfloat16");
        assert_eq!(c["dtype"], "bfloat16");
    }
}
