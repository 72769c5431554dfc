//! The Hugging Face Hub: resolving a base model's files (a local folder, or a Hub repo fetched through the
//! shared Hugging Face cache), and publishing a folder ([`push`]).
//!
//! [`resolve_model`] turns a recipe's `base_model` (+ optional `revision`) into a [`ModelFiles`]: the
//! paths of `config.json`, the tokenizer files and the safetensors weights (one `model.safetensors` or
//! every shard named by `model.safetensors.index.json`). Only these files are fetched; `*.bin`,
//! `*.pth`, `*.gguf`, ONNX and other formats are never downloaded.
//!
//! Hub downloads go through `hf-hub` 1.0 (`HFClientSync` → `HFRepositorySync::download_file`) into the
//! standard cache, the layout Python's `huggingface_hub` writes, so either tool's cache serves the
//! other (reference: <https://huggingface.co/docs/huggingface_hub/guides/manage-cache>):
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
//! └── models--{owner}--{name}/
//!     ├── blobs/{etag}                       file contents, named by ETag (sha256 for LFS files)
//!     ├── refs/{revision}                    text file: the commit sha the branch/tag pointed to
//!     ├── snapshots/{commit}/{file}          symlink → ../../blobs/{etag} (a plain copy on Windows)
//!     └── .no_exist/{commit}/{file}          empty marker: the file does not exist at that commit
//! ```
//!
//! Offline mode (`HF_HUB_OFFLINE`, which hf-hub itself ignores) reads this layout directly and never
//! touches the network. Online, every file after `config.json` is fetched at the commit sha that
//! `config.json` resolved to, and freshly downloaded LFS blobs (the weights) are checked against
//! their sha256 ETag, since hf-hub 1.0 does not check the status of the GET it caches. An HF token is only handed to hf-hub, which sends it as an
//! `Authorization: Bearer …` header; it is never printed, logged, or put into an error message.
//!
//! The code is split the way `huggingface_hub` splits it:
//!
//! - this file: the file names, [`ModelSource`] / [`ModelFiles`], and the repo id and revision checks;
//! - `options`: [`HubOptions`] (cache folder, token, offline mode, endpoint), read from the environment;
//! - `error`: [`HubError`], [`UpstreamError`] and token redaction;
//! - `resolve`: [`resolve_model`] / [`resolve_repo_file`], local folders, and the logic shared by both fetchers;
//! - `cache`: the cache layout, and the offline fetcher that reads it directly;
//! - `download`: the online fetcher (hf-hub downloads, the sha256 check of fresh blobs, progress bars);
//! - [`push`]: uploading a folder in one commit (folder checks, the LFS transfer, the commit).

use std::path::{Component, Path, PathBuf};

mod cache;
mod download;
mod error;
pub mod options;
pub mod push;
mod resolve;

pub(crate) use error::{error_chain, redact};
pub use error::{HubError, UpstreamError};
pub use options::{default_cache_dir, HubOptions};
pub use resolve::{resolve_model, resolve_repo_file};

/// The model config, required in every model.
pub const CONFIG_FILE: &str = "config.json";
/// Single-file safetensors weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded safetensors weights (`weight_map`: tensor name → shard file).
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// The fast tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Tokenizer settings (special tokens, inline chat template in older repos).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Stand-alone chat template (newer repos).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// Generation defaults (eos ids, sampling settings).
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// Legacy special-tokens map.
pub const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";

/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// Longest owner or name part of a Hub repo id (huggingface_hub's `validate_repo_id`).
const MAX_REPO_PART_LEN: usize = 96;

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// Where the model files came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local folder, used as is.
    Local(PathBuf),
    /// A Hub repo, through the cache.
    Hub {
        /// `owner/name`.
        repo: String,
        /// The revision asked for (branch, tag or commit sha; `main` by default).
        revision: String,
        /// The commit sha the revision resolved to, when known.
        commit: Option<String>,
    },
}

/// The files of a base model, all existing local paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// Where they came from.
    pub source: ModelSource,
    /// The local folder, or the snapshot folder in the cache (`…/snapshots/<commit>`).
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// `tokenizer.json`, when the model has one.
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer_config.json`, when present.
    pub tokenizer_config: Option<PathBuf>,
    /// `chat_template.jinja`, when present.
    pub chat_template: Option<PathBuf>,
    /// `generation_config.json`, when present.
    pub generation_config: Option<PathBuf>,
    /// `special_tokens_map.json`, when present.
    pub special_tokens_map: Option<PathBuf>,
    /// `model.safetensors`, or every shard named in `model.safetensors.index.json` (sorted, deduped).
    pub weights: Vec<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Ids and paths
// ---------------------------------------------------------------------------------------------

/// Whether `s` is a Hub repo id `owner/name` (each part `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 96
/// characters, ending with a letter, digit or `_`, no `..` or `--`, name not ending in `.git`) and
/// NOT an existing local path.
pub fn is_hub_id(s: &str) -> bool {
    valid_repo_id(s) && !Path::new(s).exists()
}

/// Whether `s` has the shape of a Hub repo id `owner/name` (see [`is_hub_id`]), whether or not a path exists.
pub fn valid_repo_id(s: &str) -> bool {
    let Some((owner, name)) = s.split_once('/') else {
        return false;
    };
    let part_ok = |part: &str| {
        let bytes = part.as_bytes();
        match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) => {
                part.len() <= MAX_REPO_PART_LEN
                    && first.is_ascii_alphanumeric()
                    && (last.is_ascii_alphanumeric() || *last == b'_')
                    && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            }
            _ => false,
        }
    };
    part_ok(owner) && part_ok(name) && !s.contains("..") && !s.contains("--") && !name.ends_with(".git")
}

/// Starts like a filesystem path rather than a repo id.
fn looks_like_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s == "."
        || s == ".."
        || s.starts_with('\\')
        || s.starts_with(".\\")
        || s.starts_with("..\\")
        || (s.len() >= 2 && s.as_bytes()[1] == b':' && s.as_bytes()[0].is_ascii_alphabetic())
}

/// A relative path of plain components (no `..`, no root, no drive), safe to join under a folder.
fn is_safe_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && !name.chars().any(char::is_control)
        && Path::new(name).components().all(|c| matches!(c, Component::Normal(_)))
}

pub(crate) fn valid_revision(rev: &str) -> bool {
    rev.trim() == rev && is_safe_relative(rev)
}

fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_id_cases() {
        for id in [
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "meta-llama/Llama-3.2-1B",
            "a/b",
            "peftkit-test/tiny_llama.v2",
            "Qwen/Qwen2.5-0.5B",
        ] {
            assert!(is_hub_id(id), "{id}");
        }
        let long = format!("owner/{}", "a".repeat(97));
        let ok_long = format!("owner/{}", "a".repeat(96));
        for id in [
            "gpt2",
            "",
            "/",
            "a/",
            "/b",
            "a/b/c",
            "./a",
            "../a/b",
            "/abs/path",
            "~/model",
            "owner/na..me",
            "owner/na--me",
            "-owner/name",
            "owner/name-",
            "owner/.name",
            "owner/name.git",
            "own er/name",
            "owner/näme",
            long.as_str(),
        ] {
            assert!(!is_hub_id(id), "{id:?}");
        }
        assert!(is_hub_id(&ok_long));
        // An existing relative path is not a Hub id even if it is shaped like one.
        assert!(valid_repo_id("tests/fixtures"));
        assert!(!is_hub_id("tests/fixtures"));
    }
}
