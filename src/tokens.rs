//! New special tokens: added to the tokenizer, given embedding (and head) rows, and saved beside the adapter.
//!
//! As transformers users do it: `tokenizer.add_special_tokens({"additional_special_tokens": [...]})`, then
//! `model.resize_token_embeddings(len(tokenizer))` (new rows = the mean of the old ones, see
//! [`crate::peft_model::vocab::resize_vocab`]), then PEFT trains the new rows (`trainable_token_indices`). The
//! tokenizer with its new tokens is saved beside the adapter (`tokenizer.json`, `tokenizer_config.json` with the
//! tokens in `added_tokens_decoder` and `additional_special_tokens`), so that PEFT users load it with
//! `AutoTokenizer.from_pretrained(adapter_dir)`, call `model.resize_token_embeddings(<vocab>)` and then
//! `PeftModel.from_pretrained`; peftkit's `generate`, `chat`, `eval` and `merge` use it when present.
//! Reference: transformers `PreTrainedTokenizerBase.add_special_tokens`, `PreTrainedModel.resize_token_embeddings`.

use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Errors adding tokens or saving the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{what}: `{token}` is listed twice")]
    Duplicate { what: String, token: String },
    #[error("{what}: an empty token")]
    Empty { what: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

/// Adds `tokens` to `tokenizer` as special tokens (not split, not normalized, skipped when decoding with
/// `skip_special_tokens`); returns the id of each, in order. A token the tokenizer already has keeps its id.
pub fn add_special_tokens(tokenizer: &mut Tokenizer, tokens: &[String], what: &str) -> Result<Vec<u32>, TokensError> {
    let mut seen = std::collections::HashSet::new();
    for t in tokens {
        if t.is_empty() {
            return Err(TokensError::Empty { what: what.into() });
        }
        if !seen.insert(t) {
            return Err(TokensError::Duplicate { what: what.into(), token: t.clone() });
        }
    }
    let added: Vec<AddedToken> = tokens.iter().map(|t| AddedToken::from(t.clone(), true)).collect();
    tokenizer
        .add_special_tokens(added)
        .map_err(|e| TokensError::File { path: PathBuf::from(TOKENIZER_FILE), msg: e.to_string() })?;
    tokens
        .iter()
        .map(|t| {
            tokenizer.token_to_id(t).ok_or_else(|| TokensError::File {
                path: PathBuf::from(TOKENIZER_FILE),
                msg: format!("`{t}` was not added to the tokenizer"),
            })
        })
        .collect()
}

/// The number of ids the tokenizer can produce (its model's vocabulary plus added tokens): transformers'
/// `len(tokenizer)`.
pub fn tokenizer_len(tokenizer: &Tokenizer) -> usize {
    tokenizer.get_vocab_size(true)
}

/// `len(tokenizer)` of a tokenizer saved in `dir` (an adapter folder trained with added tokens), if any.
pub fn saved_vocab_size(dir: &Path) -> Option<usize> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return None;
    }
    Tokenizer::from_file(&path).ok().map(|t| tokenizer_len(&t))
}

/// The tokenizer saved beside an adapter, if any (`None` when the folder has no `tokenizer.json`).
pub fn load_saved(dir: &Path) -> Result<Option<Tokenizer>, TokensError> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    Tokenizer::from_file(&path).map(Some).map_err(|e| TokensError::File { path, msg: e.to_string() })
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`: the base's config (from `base_config`, a
/// `tokenizer_config.json`, when there is one) with the new tokens recorded in `added_tokens_decoder` and
/// `additional_special_tokens`. Each file is written to a temporary name and renamed into place.
pub fn save(
    tokenizer: &Tokenizer,
    new_tokens: &[(String, u32)],
    base_config: Option<&Path>,
    dir: &Path,
) -> Result<(), TokensError> {
    let ferr = |path: &Path, msg: String| TokensError::File { path: path.to_path_buf(), msg };
    let json = tokenizer.to_string(true).map_err(|e| ferr(&dir.join(TOKENIZER_FILE), e.to_string()))?;
    write(&dir.join(TOKENIZER_FILE), json.as_bytes())?;
    let mut cfg = match base_config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| ferr(p, e.to_string()))?;
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| ferr(p, e.to_string()))?
        }
        None => serde_json::json!({}),
    };
    let obj = cfg.as_object_mut().ok_or_else(|| ferr(dir, "tokenizer_config.json is not an object".into()))?;
    let decoder = obj.entry("added_tokens_decoder").or_insert_with(|| serde_json::json!({}));
    if let Some(d) = decoder.as_object_mut() {
        for (t, id) in new_tokens {
            d.insert(
                id.to_string(),
                serde_json::json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                    "single_word": false, "special": true}),
            );
        }
    }
    let extra = obj.entry("additional_special_tokens").or_insert_with(|| serde_json::json!([]));
    if let Some(list) = extra.as_array_mut() {
        for (t, _) in new_tokens {
            if !list.iter().any(|v| v.as_str() == Some(t)) {
                list.push(serde_json::json!(t));
            }
        }
    }
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| ferr(dir, e.to_string()))?;
    write(&dir.join(TOKENIZER_CONFIG_FILE), text.as_bytes())
}

/// `cfg` with the rows of `ids` (new tokens) trainable: in the embedding, and in the head unless the model ties
/// it to the embedding (then the embedding's rows serve both). A matrix that `modules_to_save` trains in full needs
/// nothing more; ids already listed are not repeated.
pub fn with_trainable_ids(
    mut cfg: crate::adapter::vocab::VocabConfig,
    ids: &[u32],
    tied: bool,
) -> crate::adapter::vocab::VocabConfig {
    use crate::adapter::vocab::VocabModule;
    let modules: &[VocabModule] = if tied { &[VocabModule::Embed] } else { &[VocabModule::Embed, VocabModule::Head] };
    for &m in modules {
        if cfg.modules_to_save.contains(&m) || ids.is_empty() {
            continue;
        }
        match cfg.trainable_tokens.iter_mut().find(|(t, _)| *t == m) {
            Some((_, list)) => {
                for &i in ids {
                    if !list.contains(&i) {
                        list.push(i);
                    }
                }
            }
            None => cfg.trainable_tokens.push((m, ids.to_vec())),
        }
    }
    cfg
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), TokensError> {
    crate::adapter::peft_format::write_atomic(path, bytes)
        .map_err(|e| TokensError::File { path: path.to_path_buf(), msg: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/tokenizer.json");
        Tokenizer::from_file(path).unwrap()
    }

    #[test]
    fn new_tokens_get_the_next_ids_and_encode_whole() {
        let mut t = tok();
        assert_eq!(tokenizer_len(&t), 384);
        let ids = add_special_tokens(&mut t, &["<|tool|>".into(), "<|im_end|>".into()], "x").unwrap();
        // A new token takes the next id; one the tokenizer has keeps its own.
        assert_eq!(ids, vec![384, 2]);
        assert_eq!(tokenizer_len(&t), 385);
        let enc = t.encode("a<|tool|>b", false).unwrap();
        assert!(enc.get_ids().contains(&384), "{:?}", enc.get_ids());
        let dup = add_special_tokens(&mut tok(), &["<a>".into(), "<a>".into()], "tokenizer.add_special_tokens");
        assert_eq!(dup.unwrap_err().to_string(), "tokenizer.add_special_tokens: `<a>` is listed twice");
    }

    #[test]
    fn saved_tokenizer_reloads_with_its_new_tokens() {
        let dir = std::env::temp_dir().join(format!("peftkit-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut t = tok();
        let ids = add_special_tokens(&mut t, &["<|tool|>".into()], "x").unwrap();
        let base_cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/tokenizer_config.json");
        save(&t, &[("<|tool|>".into(), ids[0])], Some(&base_cfg), &dir).unwrap();
        assert_eq!(saved_vocab_size(&dir), Some(385));
        let back = load_saved(&dir).unwrap().unwrap();
        assert_eq!(back.token_to_id("<|tool|>"), Some(384));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(TOKENIZER_CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(cfg["added_tokens_decoder"]["384"]["content"], "<|tool|>");
        assert_eq!(cfg["eos_token"], "<|im_end|>");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
