//! Resolving a base model's files: a local folder, or a Hugging Face Hub repo fetched through the
//! shared Hugging Face cache.
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

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use hf_hub::progress::{DownloadEvent, Progress, ProgressEvent, ProgressHandler};
use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use indicatif::{ProgressBar, ProgressStyle};

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

/// Weight formats other than safetensors, listed (never downloaded) when a repo has no safetensors.
const OTHER_WEIGHT_SUFFIXES: &[&str] =
    &[".bin", ".pth", ".pt", ".ckpt", ".gguf", ".onnx", ".onnx_data", ".h5", ".msgpack", ".ot", ".tflite"];

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// How Hub ids are resolved: cache location, credentials, offline mode, endpoint, progress bars.
///
/// `Debug` never shows the token (`token: Some("***")`).
#[derive(Clone, Default)]
pub struct HubOptions {
    /// The Hub cache folder (`models--owner--name/…` lives inside). `None`: [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Access token for gated/private repos, sent only as an `Authorization: Bearer` header.
    /// `None`: hf-hub falls back to its own ambient lookup (`HF_TOKEN`, `HF_TOKEN_PATH`,
    /// `$HF_HOME/token`), as the Python client does.
    pub token: Option<String>,
    /// Never touch the network; resolve from the cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Hub base URL (`HF_ENDPOINT`), e.g. a mirror. `None`: `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Show a progress bar (on stderr, when it is a terminal) for each download.
    pub progress: bool,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .field("progress", &self.progress)
            .finish()
    }
}

impl HubOptions {
    /// Options from the environment, as `huggingface_hub` reads it:
    /// - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub` ([`default_cache_dir`]);
    /// - token: `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else the file `$HF_HOME/token`
    ///   (`HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`);
    /// - offline: `HF_HUB_OFFLINE` set to `1`, `true`, `yes` or `on` (any case);
    /// - endpoint: `HF_ENDPOINT`.
    ///
    /// `progress` is left `false`; the caller decides (e.g. when stderr is a terminal).
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// [`from_env`](Self::from_env) over any variable lookup (testable without touching the process env).
    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |key: &str| var(key).filter(|v| !v.trim().is_empty());
        let home = hf_home_from(&var);
        let cache_dir = cache_dir_from(&var, &home);
        let token = nonempty("HF_TOKEN")
            .map(|t| t.trim().to_string())
            .or_else(|| nonempty("HF_TOKEN_PATH").and_then(|p| read_token_file(Path::new(&p))))
            .or_else(|| read_token_file(&home.join("token")));
        let offline = nonempty("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let endpoint = nonempty("HF_ENDPOINT").map(|e| e.trim().trim_end_matches('/').to_string());
        HubOptions { cache_dir: Some(cache_dir), token, offline, endpoint, progress: false }
    }

    /// The cache folder these options use: `cache_dir`, else [`default_cache_dir`].
    pub fn resolved_cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(default_cache_dir)
    }
}

/// The standard Hub cache folder: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`
/// (`HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`).
pub fn default_cache_dir() -> PathBuf {
    let var = |key: &str| std::env::var(key).ok();
    let home = hf_home_from(&var);
    cache_dir_from(&var, &home)
}

fn hf_home_from(var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    let nonempty = |key: &str| var(key).filter(|v| !v.trim().is_empty());
    if let Some(home) = nonempty("HF_HOME") {
        return expand_tilde_with(&home, var);
    }
    if let Some(xdg) = nonempty("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("huggingface");
    }
    user_home(var).join(".cache").join("huggingface")
}

fn cache_dir_from(var: &impl Fn(&str) -> Option<String>, hf_home: &Path) -> PathBuf {
    let nonempty = |key: &str| var(key).filter(|v| !v.trim().is_empty());
    nonempty("HF_HUB_CACHE")
        .or_else(|| nonempty("HUGGINGFACE_HUB_CACHE"))
        .map(|p| expand_tilde_with(&p, var))
        .unwrap_or_else(|| hf_home.join("hub"))
}

fn user_home(var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    var("HOME")
        .or_else(|| var("USERPROFILE"))
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn expand_tilde_with(p: &str, var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    if p == "~" {
        return user_home(var);
    }
    match p.strip_prefix("~/") {
        Some(rest) => user_home(var).join(rest),
        None => PathBuf::from(p),
    }
}

fn read_token_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}

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
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a base model could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A path-like `base_model` (`/…`, `./…`, `../…`, `~…`) that does not exist.
    #[error("model folder {} does not exist", .0.display())]
    LocalNotFound(PathBuf),
    /// `base_model` names an existing file, not a folder.
    #[error(
        "{} is a file: base_model must be a model folder (config.json + safetensors weights) or a Hub repo id",
        .0.display()
    )]
    NotADirectory(PathBuf),
    /// Neither an existing local path nor a valid `owner/name` Hub id.
    #[error(
        "base_model \"{0}\" is neither an existing local folder nor a Hugging Face Hub repo id of the form owner/name"
    )]
    InvalidModelId(String),
    /// A revision that is empty or could escape the cache folder.
    #[error("invalid revision \"{revision}\" for {repo}: expected a branch, tag or commit sha")]
    InvalidRevision {
        /// The repo id.
        repo: String,
        /// The revision as given.
        revision: String,
    },
    /// A required file is missing from a local folder, a repo revision or a cached snapshot.
    #[error("{location} has no {file}")]
    MissingFile {
        /// The folder, or `owner/name@revision`.
        location: String,
        /// The missing file.
        file: String,
    },
    /// Neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{repo}: only safetensors weights are supported; this repo has {found}")]
    NoSafetensors {
        /// The repo id or folder.
        repo: String,
        /// What it has instead (other weight files), or that it has none.
        found: String,
    },
    /// `model.safetensors.index.json` that cannot be used.
    #[error("invalid safetensors index {}: {reason}", .path.display())]
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The repo does not exist (or is private and invisible to the credentials sent).
    #[error(
        "repository {repo} not found on the Hub; check the id, or it may be private: set HF_TOKEN \
         (or run `huggingface-cli login`) with a token that can read it"
    )]
    RepoNotFound {
        /// The repo id.
        repo: String,
    },
    /// The repo exists but the branch/tag/commit does not.
    #[error("revision \"{revision}\" not found in {repo}; use an existing branch, tag or commit sha")]
    RevisionNotFound {
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
    },
    /// 401/403: a gated or private repo, and no token or a token without access was sent.
    #[error("{}", gated_message(repo, *status, *token_sent))]
    Gated {
        /// The repo id.
        repo: String,
        /// The HTTP status (401 or 403).
        status: u16,
        /// Whether a token was sent (its value is never kept here).
        token_sent: bool,
    },
    /// Offline mode and the file is not in the cache.
    #[error(
        "{file} of {repo} (revision {revision}) is not in the local cache and offline mode is on \
         (HF_HUB_OFFLINE): unset HF_HUB_OFFLINE to download it, or pre-download the model while online \
         (e.g. `huggingface-cli download {repo} --revision {revision}`)"
    )]
    NotCached {
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The file that is missing.
        file: String,
    },
    /// The Hub could not be reached (connection, timeout, 5xx after retries).
    #[error(
        "network error fetching {file} from {repo}: check the connection and the endpoint, \
         or set HF_HUB_OFFLINE=1 to use the local cache"
    )]
    Network {
        /// The repo id.
        repo: String,
        /// The file being fetched.
        file: String,
        /// What went wrong (token-free text).
        source: UpstreamError,
    },
    /// Any other failure reported by the Hub client (unexpected status, malformed response, cache I/O).
    #[error("fetching {file} from {repo} failed")]
    Hub {
        /// The repo id.
        repo: String,
        /// The file being fetched.
        file: String,
        /// What went wrong (token-free text).
        source: UpstreamError,
    },
    /// A freshly downloaded file does not match the sha256 the Hub announced for it (its ETag); the
    /// bad copy was removed from the cache.
    #[error(
        "the downloaded {file} of {repo} does not match its sha256 checksum {expected} (got {actual}); \
         the bad copy was removed from the cache: run again to retry the download"
    )]
    Corrupted {
        /// The repo id.
        repo: String,
        /// The file.
        file: String,
        /// The sha256 the Hub announced (the blob's ETag).
        expected: String,
        /// The sha256 of what arrived.
        actual: String,
    },
    /// The endpoint URL or the HTTP client could not be set up.
    #[error("cannot set up the Hub client for endpoint {endpoint}")]
    Client {
        /// The endpoint (`HF_ENDPOINT`, or the default).
        endpoint: String,
        /// What went wrong (token-free text).
        source: UpstreamError,
    },
    /// A local file could not be read.
    #[error("cannot read {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn gated_message(repo: &str, status: u16, token_sent: bool) -> String {
    let why =
        if token_sent { "the token that was sent was refused or has no access to it" } else { "no token was sent" };
    format!(
        "access to {repo} was refused (HTTP {status}): it is gated or private and {why}. \
         Request access on its Hub page if it is gated, then provide a token with read access to it: \
         set HF_TOKEN or run `huggingface-cli login`"
    )
}

/// An error from the Hub client, kept as text with any token redacted, plus its HTTP status.
#[derive(Debug, Clone)]
pub struct UpstreamError {
    message: String,
    status: Option<u16>,
}

impl UpstreamError {
    /// The HTTP status, when the error came from a response.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The (redacted) message, including its causes.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn from_hf(err: &HFError, token: Option<&str>) -> Self {
        UpstreamError { message: redact(&error_chain(err), token), status: http_status(err) }
    }
}

/// An error and its causes on one line (`a: b: c`), without repeating a cause its parent's text already holds.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UpstreamError {}

/// Removes the token, and anything shaped like an HF token (`hf_…`), from a message.
pub(crate) fn redact(message: &str, token: Option<&str>) -> String {
    let mut out = message.to_string();
    if let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) {
        out = out.replace(token, "***");
    }
    match regex::Regex::new(r"hf_[A-Za-z0-9]{8,}") {
        Ok(re) => re.replace_all(&out, "hf_***").into_owned(),
        Err(_) => out,
    }
}

fn http_status(err: &HFError) -> Option<u16> {
    match err {
        HFError::Http { context }
        | HFError::AuthRequired { context }
        | HFError::Forbidden { context }
        | HFError::Conflict { context }
        | HFError::RateLimited { context, .. } => Some(context.status.as_u16()),
        HFError::RepoNotFound { .. } | HFError::RevisionNotFound { .. } | HFError::EntryNotFound { .. } => Some(404),
        _ => None,
    }
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

/// `models--owner--name`, the repo's folder in the cache.
fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/// Resolves `base_model` to local files.
///
/// - An existing local folder is used as is (`revision` is ignored); it must hold `config.json` and
///   `model.safetensors` or `model.safetensors.index.json` + its shards.
/// - A path-like value (`/…`, `./…`, `../…`, `~…`) that does not exist → [`HubError::LocalNotFound`].
/// - A Hub id `owner/name` is fetched into (or, offline, read from) the Hub cache at `revision`
///   (branch, tag or commit sha; default `main`). Only the needed files are fetched.
pub fn resolve_model(base_model: &str, revision: Option<&str>, opts: &HubOptions) -> Result<ModelFiles, HubError> {
    let as_path = expand_tilde_with(base_model, &|key: &str| std::env::var(key).ok());
    if as_path.exists() {
        if !as_path.is_dir() {
            return Err(HubError::NotADirectory(as_path));
        }
        if revision.is_some() {
            tracing::warn!(dir = %as_path.display(), "revision is ignored for a local model folder");
        }
        return resolve_local(&as_path);
    }
    if looks_like_path(base_model) {
        return Err(HubError::LocalNotFound(as_path));
    }
    if !valid_repo_id(base_model) {
        return Err(HubError::InvalidModelId(base_model.to_string()));
    }
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    if !valid_revision(revision) {
        return Err(HubError::InvalidRevision { repo: base_model.to_string(), revision: revision.to_string() });
    }
    let cache_dir = opts.resolved_cache_dir();
    tracing::debug!(
        repo = base_model,
        revision,
        cache = %cache_dir.display(),
        offline = opts.offline,
        has_token = opts.token.is_some(),
        "resolving Hub model"
    );
    if opts.offline {
        let mut fetcher = CacheFetcher::new(base_model, revision, &cache_dir);
        resolve_hub(&mut fetcher, base_model, revision)
    } else {
        let mut fetcher = OnlineFetcher::new(base_model, revision, &cache_dir, opts)?;
        resolve_hub(&mut fetcher, base_model, revision)
    }
}

/// Resolves one file of a Hub repo (a `.gguf` named by `gguf_file`, say) through the cache, as
/// [`resolve_model`] does for a model's files: online it is downloaded when missing, offline it must be cached.
pub fn resolve_repo_file(
    repo: &str,
    revision: Option<&str>,
    file: &str,
    opts: &HubOptions,
) -> Result<(PathBuf, ModelSource), HubError> {
    if !valid_repo_id(repo) {
        return Err(HubError::InvalidModelId(repo.to_string()));
    }
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    if !valid_revision(revision) {
        return Err(HubError::InvalidRevision { repo: repo.to_string(), revision: revision.to_string() });
    }
    let cache_dir = opts.resolved_cache_dir();
    let fetched = if opts.offline {
        CacheFetcher::new(repo, revision, &cache_dir).fetch(file, revision)?
    } else {
        OnlineFetcher::new(repo, revision, &cache_dir, opts)?.fetch(file, revision)?
    };
    match fetched {
        Fetched::Found(path) => {
            let commit = commit_of_snapshot_file(&path, file);
            let source = ModelSource::Hub { repo: repo.to_string(), revision: revision.to_string(), commit };
            Ok((path, source))
        }
        Fetched::Absent => {
            Err(HubError::MissingFile { location: format!("{repo}@{revision}"), file: file.to_string() })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Local folders
// ---------------------------------------------------------------------------------------------

fn resolve_local(dir: &Path) -> Result<ModelFiles, HubError> {
    let location = dir.display().to_string();
    let file = |name: &str| {
        let p = dir.join(name);
        p.is_file().then_some(p)
    };
    let config = file(CONFIG_FILE)
        .ok_or_else(|| HubError::MissingFile { location: location.clone(), file: CONFIG_FILE.to_string() })?;
    let weights = if let Some(single) = file(WEIGHTS_FILE) {
        vec![single]
    } else if let Some(index) = file(WEIGHTS_INDEX_FILE) {
        let mut shards = Vec::new();
        for shard in read_index(&index)? {
            let p = file(&shard)
                .ok_or_else(|| HubError::MissingFile { location: location.clone(), file: shard.clone() })?;
            shards.push(p);
        }
        shards
    } else {
        return Err(HubError::NoSafetensors { repo: location, found: describe_other_weights(list_dir_files(dir)) });
    };
    Ok(ModelFiles {
        source: ModelSource::Local(dir.to_path_buf()),
        dir: dir.to_path_buf(),
        config,
        tokenizer: file(TOKENIZER_FILE),
        tokenizer_config: file(TOKENIZER_CONFIG_FILE),
        chat_template: file(CHAT_TEMPLATE_FILE),
        generation_config: file(GENERATION_CONFIG_FILE),
        special_tokens_map: file(SPECIAL_TOKENS_MAP_FILE),
        weights,
    })
}

fn list_dir_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_file())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// "pytorch_model.bin, model.gguf (not supported)" or "no weight files".
fn describe_other_weights(names: impl IntoIterator<Item = String>) -> String {
    let found: BTreeSet<String> = names
        .into_iter()
        .filter(|n| {
            let lower = n.to_ascii_lowercase();
            OTHER_WEIGHT_SUFFIXES.iter().any(|s| lower.ends_with(s)) || lower.ends_with(".safetensors")
        })
        .collect();
    if found.is_empty() {
        format!("neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}, and no other weight files")
    } else {
        let list: Vec<String> = found.into_iter().collect();
        format!(
            "no {WEIGHTS_FILE} / {WEIGHTS_INDEX_FILE}, only {} (convert them to safetensors first)",
            list.join(", ")
        )
    }
}

/// The shard files named by a `model.safetensors.index.json`, sorted and deduplicated.
fn read_index(path: &Path) -> Result<Vec<String>, HubError> {
    let invalid = |reason: String| HubError::InvalidIndex { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|source| HubError::Io { path: path.to_path_buf(), source })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid("no \"weight_map\" object".to_string()))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| invalid(format!("weight_map[\"{tensor}\"] is not a file name")))?;
        if !is_safe_relative(file) || !file.ends_with(".safetensors") {
            return Err(invalid(format!(
                "weight_map[\"{tensor}\"] = \"{file}\" is not a relative .safetensors file name"
            )));
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err(invalid("\"weight_map\" is empty".to_string()));
    }
    Ok(shards.into_iter().collect())
}

// ---------------------------------------------------------------------------------------------
// Hub repos: shared logic over an online or cache-only fetcher
// ---------------------------------------------------------------------------------------------

/// Outcome of asking for one file.
enum Fetched {
    /// Here it is.
    Found(PathBuf),
    /// The file does not exist at this revision.
    Absent,
}

trait Fetcher {
    /// Fetches `file` at `revision`; `Absent` only when the file is known not to exist.
    fn fetch(&mut self, file: &str, revision: &str) -> Result<Fetched, HubError>;
    /// The error for a `config.json` that is absent at `revision` (the repo or revision may be missing).
    fn missing_config(&mut self, revision: &str) -> HubError;
    /// Other weight files at the repo root, for the [`HubError::NoSafetensors`] message.
    fn other_weights(&mut self, revision: &str) -> String;
}

fn resolve_hub(fetcher: &mut dyn Fetcher, repo: &str, revision: &str) -> Result<ModelFiles, HubError> {
    let config = match fetcher.fetch(CONFIG_FILE, revision)? {
        Fetched::Found(p) => p,
        Fetched::Absent => return Err(fetcher.missing_config(revision)),
    };
    let commit = commit_of_snapshot_file(&config, CONFIG_FILE);
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    // Every later file comes from the same commit, even if the branch moves meanwhile.
    let pinned = commit.clone().unwrap_or_else(|| revision.to_string());
    let location = format!("{repo}@{revision}");

    let mut optional = |file: &str| -> Result<Option<PathBuf>, HubError> {
        match fetcher.fetch(file, &pinned) {
            Ok(Fetched::Found(p)) => Ok(Some(p)),
            Ok(Fetched::Absent) => Ok(None),
            Err(HubError::NotCached { .. }) => {
                tracing::debug!(repo, file, "optional file not in the cache; skipped (offline)");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    };
    let tokenizer = optional(TOKENIZER_FILE)?;
    let tokenizer_config = optional(TOKENIZER_CONFIG_FILE)?;
    let chat_template = optional(CHAT_TEMPLATE_FILE)?;
    let generation_config = optional(GENERATION_CONFIG_FILE)?;
    let special_tokens_map = optional(SPECIAL_TOKENS_MAP_FILE)?;

    let weights = match fetcher.fetch(WEIGHTS_FILE, &pinned) {
        Ok(Fetched::Found(p)) => vec![p],
        Ok(Fetched::Absent) => sharded_weights(fetcher, repo, &location, &pinned, None)?,
        // Offline, a sharded model has no model.safetensors in its snapshot (and usually no
        // `.no_exist` marker for it): try the index before reporting anything.
        Err(e @ HubError::NotCached { .. }) => sharded_weights(fetcher, repo, &location, &pinned, Some(e))?,
        Err(e) => return Err(e),
    };
    Ok(ModelFiles {
        source: ModelSource::Hub { repo: repo.to_string(), revision: revision.to_string(), commit },
        dir,
        config,
        tokenizer,
        tokenizer_config,
        chat_template,
        generation_config,
        special_tokens_map,
        weights,
    })
}

/// The shards named by `model.safetensors.index.json`; `single_not_cached` is the offline miss of
/// `model.safetensors`, reported if the index is not cached either.
fn sharded_weights(
    fetcher: &mut dyn Fetcher,
    repo: &str,
    location: &str,
    pinned: &str,
    single_not_cached: Option<HubError>,
) -> Result<Vec<PathBuf>, HubError> {
    let index = match (fetcher.fetch(WEIGHTS_INDEX_FILE, pinned), single_not_cached) {
        (Ok(Fetched::Found(index)), _) => index,
        (Ok(Fetched::Absent), Some(not_cached)) | (Err(HubError::NotCached { .. }), Some(not_cached)) => {
            return Err(not_cached)
        }
        (Ok(Fetched::Absent), None) => {
            return Err(HubError::NoSafetensors { repo: repo.to_string(), found: fetcher.other_weights(pinned) })
        }
        (Err(e), _) => return Err(e),
    };
    let mut shards = Vec::new();
    for shard in read_index(&index)? {
        match fetcher.fetch(&shard, pinned)? {
            Fetched::Found(p) => shards.push(p),
            Fetched::Absent => return Err(HubError::MissingFile { location: location.to_string(), file: shard }),
        }
    }
    Ok(shards)
}

/// The commit sha of `…/snapshots/<commit>/<file>`.
fn commit_of_snapshot_file(path: &Path, file: &str) -> Option<String> {
    let mut dir = path.to_path_buf();
    for _ in Path::new(file).components() {
        dir = dir.parent()?.to_path_buf();
    }
    let commit = dir.file_name()?.to_str()?;
    let snapshots = dir.parent()?.file_name()?.to_str()?;
    (snapshots == "snapshots" && is_commit_sha(commit)).then(|| commit.to_string())
}

// ---------------------------------------------------------------------------------------------
// Offline: read the cache layout directly
// ---------------------------------------------------------------------------------------------

struct CacheFetcher {
    repo: String,
    revision: String,
    repo_dir: PathBuf,
}

impl CacheFetcher {
    fn new(repo: &str, revision: &str, cache_dir: &Path) -> Self {
        CacheFetcher {
            repo: repo.to_string(),
            revision: revision.to_string(),
            repo_dir: cache_dir.join(repo_folder(repo)),
        }
    }

    /// `revision` itself when it is a sha, else the sha in `refs/<revision>`.
    fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit_sha(revision) {
            return Some(revision.to_ascii_lowercase());
        }
        let text = std::fs::read_to_string(self.repo_dir.join("refs").join(revision)).ok()?;
        let sha = text.trim();
        is_commit_sha(sha).then(|| sha.to_string())
    }

    fn not_cached(&self, file: &str) -> HubError {
        HubError::NotCached { repo: self.repo.clone(), revision: self.revision.clone(), file: file.to_string() }
    }
}

impl Fetcher for CacheFetcher {
    fn fetch(&mut self, file: &str, revision: &str) -> Result<Fetched, HubError> {
        let commit = self.commit_for(revision).ok_or_else(|| self.not_cached(file))?;
        // `is_file` follows the symlink into blobs/: a dangling link counts as not cached.
        let snapshot = self.repo_dir.join("snapshots").join(&commit).join(file);
        if snapshot.is_file() {
            return Ok(Fetched::Found(snapshot));
        }
        if self.repo_dir.join(".no_exist").join(&commit).join(file).exists() {
            return Ok(Fetched::Absent);
        }
        Err(self.not_cached(file))
    }

    fn missing_config(&mut self, revision: &str) -> HubError {
        HubError::MissingFile { location: format!("{}@{revision}", self.repo), file: CONFIG_FILE.to_string() }
    }

    fn other_weights(&mut self, revision: &str) -> String {
        let files = self
            .commit_for(revision)
            .map(|c| list_dir_files(&self.repo_dir.join("snapshots").join(c)))
            .unwrap_or_default();
        let text = describe_other_weights(files);
        format!("{text} in the local cache")
    }
}

// ---------------------------------------------------------------------------------------------
// Online: hf-hub 1.0
// ---------------------------------------------------------------------------------------------

struct OnlineFetcher {
    repo: String,
    handle: HFRepositorySync<RepoTypeModel>,
    repo_dir: PathBuf,
    token: Option<String>,
    progress: bool,
}

/// How an hf-hub error reads for one file.
enum Mapped {
    /// The file does not exist (404 on the file: the repo or revision may be missing too).
    EntryNotFound,
    Error(HubError),
}

impl OnlineFetcher {
    fn new(repo: &str, _revision: &str, cache_dir: &Path, opts: &HubOptions) -> Result<Self, HubError> {
        let token = opts.token.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(str::to_string);
        let mut builder = hf_hub::HFClient::builder().cache_dir(cache_dir);
        if let Some(t) = &token {
            builder = builder.token(t.as_str());
        }
        let endpoint = opts.endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty());
        if let Some(e) = endpoint {
            builder = builder.endpoint(e.trim_end_matches('/'));
        }
        let client: HFClientSync = builder.build_sync().map_err(|e| HubError::Client {
            endpoint: endpoint.unwrap_or("(default)").to_string(),
            source: UpstreamError::from_hf(&e, token.as_deref()),
        })?;
        let (owner, name) = hf_hub::split_id(repo);
        Ok(OnlineFetcher {
            repo: repo.to_string(),
            handle: client.model(owner, name),
            repo_dir: cache_dir.join(repo_folder(repo)),
            token,
            progress: opts.progress,
        })
    }

    /// hf-hub 1.0 writes the body of its GET into the blob without checking the status (it only
    /// checks the HEAD before it), so an error page from a CDN could become a cached "file" that is
    /// never fetched again. A blob named by a sha256 ETag (LFS files: the weights) that this call
    /// created is therefore hashed once; on a mismatch it and its snapshot entry are removed.
    fn verify_fresh_blob(
        &self,
        snapshot_file: &Path,
        file: &str,
        blobs_before: &BTreeSet<String>,
    ) -> Result<(), HubError> {
        let Ok(blob) = std::fs::canonicalize(snapshot_file) else {
            return Ok(());
        };
        let Some(expected) = blob.file_name().and_then(|n| n.to_str()).map(str::to_ascii_lowercase) else {
            return Ok(());
        };
        let is_sha256 = expected.len() == 64 && expected.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_sha256 || blobs_before.contains(&expected) {
            return Ok(());
        }
        let actual = sha256_file(&blob).map_err(|source| HubError::Io { path: blob.clone(), source })?;
        if actual == expected {
            return Ok(());
        }
        let _ = std::fs::remove_file(snapshot_file);
        let _ = std::fs::remove_file(&blob);
        Err(HubError::Corrupted { repo: self.repo.clone(), file: file.to_string(), expected, actual })
    }

    fn map(&self, err: HFError, file: &str, revision: &str) -> Mapped {
        let repo = self.repo.clone();
        let upstream = |e: &HFError| UpstreamError::from_hf(e, self.token.as_deref());
        let by_code = |code: Option<&str>, status: u16| match code {
            Some("RepoNotFound") => Mapped::Error(HubError::RepoNotFound { repo: repo.clone() }),
            Some("RevisionNotFound") => {
                Mapped::Error(HubError::RevisionNotFound { repo: repo.clone(), revision: revision.to_string() })
            }
            Some("EntryNotFound") => Mapped::EntryNotFound,
            _ => Mapped::Error(HubError::Gated { repo: repo.clone(), status, token_sent: self.token.is_some() }),
        };
        match &err {
            HFError::EntryNotFound { .. } => Mapped::EntryNotFound,
            HFError::RepoNotFound { .. } => Mapped::Error(HubError::RepoNotFound { repo }),
            HFError::RevisionNotFound { .. } => {
                Mapped::Error(HubError::RevisionNotFound { repo, revision: revision.to_string() })
            }
            HFError::AuthRequired { context } | HFError::Forbidden { context } => {
                by_code(context.error_code.as_deref(), context.status.as_u16())
            }
            HFError::Request { .. } => {
                Mapped::Error(HubError::Network { repo, file: file.to_string(), source: upstream(&err) })
            }
            HFError::Http { context } if context.status.is_server_error() => {
                Mapped::Error(HubError::Network { repo, file: file.to_string(), source: upstream(&err) })
            }
            HFError::Http { context } if context.status.as_u16() == 404 => Mapped::EntryNotFound,
            _ => Mapped::Error(HubError::Hub { repo, file: file.to_string(), source: upstream(&err) }),
        }
    }
}

impl Fetcher for OnlineFetcher {
    fn fetch(&mut self, file: &str, revision: &str) -> Result<Fetched, HubError> {
        if !is_safe_relative(file) {
            return Err(HubError::Hub {
                repo: self.repo.clone(),
                file: file.to_string(),
                source: UpstreamError {
                    message: "refusing a file name that is not a plain relative path".to_string(),
                    status: None,
                },
            });
        }
        // A commit's content never changes: a `.no_exist` marker under a sha is final.
        if is_commit_sha(revision) && self.repo_dir.join(".no_exist").join(revision).join(file).exists() {
            return Ok(Fetched::Absent);
        }
        let blobs_before = blob_names(&self.repo_dir.join("blobs"));
        let progress = self.progress.then(|| Progress::new(DownloadBar::new(file)));
        let result = self.handle.download_file().filename(file).revision(revision).maybe_progress(progress).send();
        match result {
            Ok(path) => {
                self.verify_fresh_blob(&path, file, &blobs_before)?;
                Ok(Fetched::Found(path))
            }
            Err(e) => match self.map(e, file, revision) {
                Mapped::EntryNotFound => Ok(Fetched::Absent),
                Mapped::Error(e) => Err(e),
            },
        }
    }

    fn missing_config(&mut self, revision: &str) -> HubError {
        // hf-hub reports every 404 on a file as "entry not found": ask the API what is missing.
        let missing =
            HubError::MissingFile { location: format!("{}@{revision}", self.repo), file: CONFIG_FILE.to_string() };
        match self.handle.exists().send() {
            Ok(false) => return HubError::RepoNotFound { repo: self.repo.clone() },
            Ok(true) => {}
            Err(e) => {
                return match self.map(e, CONFIG_FILE, revision) {
                    Mapped::EntryNotFound => HubError::RepoNotFound { repo: self.repo.clone() },
                    Mapped::Error(e) => e,
                }
            }
        }
        match self.handle.revision_exists().revision(revision).send() {
            Ok(false) => HubError::RevisionNotFound { repo: self.repo.clone(), revision: revision.to_string() },
            Ok(true) => missing,
            Err(e) => match self.map(e, CONFIG_FILE, revision) {
                Mapped::EntryNotFound => missing,
                Mapped::Error(e) => e,
            },
        }
    }

    fn other_weights(&mut self, revision: &str) -> String {
        match self.handle.list_tree().revision(revision).send() {
            Ok(entries) => describe_other_weights(entries.into_iter().filter_map(|e| match e {
                RepoTreeEntry::File { path, .. } => Some(path),
                RepoTreeEntry::Directory { .. } => None,
            })),
            Err(_) => format!("neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}"),
        }
    }
}

/// The names in a cache's `blobs/` folder (empty when it does not exist yet).
fn blob_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.file_name().to_str().map(str::to_ascii_lowercase)).collect())
        .unwrap_or_default()
}

/// Lower-case hex sha256 of a file, streamed.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// An indicatif bar for one file download, fed by hf-hub's progress events.
struct DownloadBar {
    file: String,
    state: Mutex<BarState>,
}

#[derive(Default)]
struct BarState {
    bar: Option<ProgressBar>,
    moved: bool,
}

impl DownloadBar {
    fn new(file: &str) -> Self {
        DownloadBar { file: file.to_string(), state: Mutex::new(BarState::default()) }
    }
}

impl ProgressHandler for DownloadBar {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Download(event) = event else {
            return;
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        match event {
            DownloadEvent::Start { total_bytes, .. } => {
                let bar = ProgressBar::new(*total_bytes);
                let style = ProgressStyle::with_template(
                    "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.set_message(self.file.clone());
                state.bar = Some(bar);
            }
            DownloadEvent::Progress { files } => {
                for f in files.iter().filter(|f| f.filename == self.file) {
                    if f.status == hf_hub::progress::FileStatus::InProgress {
                        state.moved = true;
                    }
                    if let Some(bar) = &state.bar {
                        bar.set_position(f.bytes_completed);
                    }
                }
            }
            DownloadEvent::AggregateProgress { bytes_completed, total_bytes, .. } => {
                state.moved = true;
                if let Some(bar) = &state.bar {
                    bar.set_length(*total_bytes);
                    bar.set_position(*bytes_completed);
                }
            }
            DownloadEvent::Complete => {
                let moved = state.moved;
                if let Some(bar) = state.bar.take() {
                    if moved {
                        bar.finish();
                    } else {
                        bar.finish_and_clear();
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::fs;

    const REPO: &str = "peftkit-test/tiny-llama";
    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
    const SHA2: &str = "fedcba9876543210fedcba9876543210fedcba98";
    const FIXTURE_FILES: &[&str] =
        &[CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE];

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
    }

    fn fixtures() -> Vec<(String, Vec<u8>)> {
        FIXTURE_FILES.iter().map(|f| (f.to_string(), fs::read(fixture_dir().join(f)).expect("read fixture"))).collect()
    }

    /// Writes files into the cache like huggingface_hub: blobs by a content name, the snapshot
    /// pointing at them (symlinks, or plain copies like on Windows), refs/<name> → commit.
    fn write_cached(
        cache: &Path,
        repo: &str,
        commit: &str,
        refs: &[&str],
        files: &[(String, Vec<u8>)],
        symlinks: bool,
    ) -> PathBuf {
        let repo_dir = cache.join(repo_folder(repo));
        let blobs = repo_dir.join("blobs");
        let snap = repo_dir.join("snapshots").join(commit);
        fs::create_dir_all(&blobs).expect("mkdir blobs");
        fs::create_dir_all(&snap).expect("mkdir snapshot");
        for (name, bytes) in files {
            let etag = format!("{:x}", Sha256::digest(bytes));
            fs::write(blobs.join(&etag), bytes).expect("write blob");
            let pointer = snap.join(name);
            if let Some(parent) = pointer.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            if symlinks {
                #[cfg(unix)]
                std::os::unix::fs::symlink(Path::new("../../blobs").join(&etag), &pointer).expect("symlink");
                #[cfg(not(unix))]
                fs::write(&pointer, bytes).expect("copy");
            } else {
                fs::write(&pointer, bytes).expect("copy");
            }
        }
        for r in refs {
            let ref_path = repo_dir.join("refs").join(r);
            fs::create_dir_all(ref_path.parent().expect("parent")).expect("mkdir refs");
            fs::write(ref_path, commit).expect("write ref");
        }
        snap
    }

    fn offline(cache: &Path) -> HubOptions {
        HubOptions { cache_dir: Some(cache.to_path_buf()), offline: true, ..Default::default() }
    }

    fn assert_same_bytes(path: &Path, name: &str) {
        let want = fs::read(fixture_dir().join(name)).expect("fixture");
        let got = fs::read(path).expect("resolved file");
        assert_eq!(got, want, "{name} differs");
    }

    fn check_full(files: &ModelFiles, snap: &Path, revision: &str) {
        assert_eq!(
            files.source,
            ModelSource::Hub { repo: REPO.into(), revision: revision.into(), commit: Some(SHA.into()) }
        );
        assert_eq!(files.dir, snap);
        assert_eq!(files.config, snap.join(CONFIG_FILE));
        assert_same_bytes(&files.config, CONFIG_FILE);
        assert_same_bytes(files.tokenizer.as_deref().expect("tokenizer"), TOKENIZER_FILE);
        assert_same_bytes(files.tokenizer_config.as_deref().expect("tokenizer_config"), TOKENIZER_CONFIG_FILE);
        assert_same_bytes(files.chat_template.as_deref().expect("chat template"), CHAT_TEMPLATE_FILE);
        assert_same_bytes(files.generation_config.as_deref().expect("generation config"), GENERATION_CONFIG_FILE);
        assert_eq!(files.special_tokens_map, None);
        assert_eq!(files.weights, vec![snap.join(WEIGHTS_FILE)]);
        assert_same_bytes(&files.weights[0], WEIGHTS_FILE);
    }

    #[test]
    fn offline_resolves_symlinked_cache() {
        let tmp = tempfile::tempdir().expect("tmp");
        let snap = write_cached(tmp.path(), REPO, SHA, &["main"], &fixtures(), true);
        let files = resolve_model(REPO, None, &offline(tmp.path())).expect("resolve");
        check_full(&files, &snap, "main");
    }

    #[test]
    fn offline_resolves_plain_file_cache() {
        let tmp = tempfile::tempdir().expect("tmp");
        let snap = write_cached(tmp.path(), REPO, SHA, &["main"], &fixtures(), false);
        let files = resolve_model(REPO, None, &offline(tmp.path())).expect("resolve");
        check_full(&files, &snap, "main");
    }

    #[test]
    fn offline_sharded_model() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut files: Vec<(String, Vec<u8>)> = fixtures().into_iter().filter(|(n, _)| n != WEIGHTS_FILE).collect();
        let index = serde_json::json!({
            "metadata": {"total_size": 12},
            "weight_map": {
                "a.weight": "model-00001-of-00002.safetensors",
                "b.weight": "model-00002-of-00002.safetensors",
                "c.weight": "model-00001-of-00002.safetensors",
            }
        });
        files.push((WEIGHTS_INDEX_FILE.into(), index.to_string().into_bytes()));
        files.push(("model-00001-of-00002.safetensors".into(), b"shard one".to_vec()));
        files.push(("model-00002-of-00002.safetensors".into(), b"shard two".to_vec()));
        let snap = write_cached(tmp.path(), REPO, SHA, &["main"], &files, true);
        let got = resolve_model(REPO, None, &offline(tmp.path())).expect("resolve");
        assert_eq!(
            got.weights,
            vec![snap.join("model-00001-of-00002.safetensors"), snap.join("model-00002-of-00002.safetensors")]
        );
        assert_eq!(fs::read(&got.weights[1]).expect("read"), b"shard two");
    }

    #[test]
    fn offline_sharded_model_with_a_shard_not_cached() {
        let tmp = tempfile::tempdir().expect("tmp");
        let index = serde_json::json!({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}});
        let files = vec![
            (CONFIG_FILE.to_string(), b"{}".to_vec()),
            (WEIGHTS_INDEX_FILE.to_string(), index.to_string().into_bytes()),
            ("model-00001-of-00002.safetensors".to_string(), b"x".to_vec()),
        ];
        write_cached(tmp.path(), REPO, SHA, &["main"], &files, true);
        match resolve_model(REPO, None, &offline(tmp.path())) {
            Err(HubError::NotCached { file, .. }) => {
                assert_eq!(file, "model-00002-of-00002.safetensors")
            }
            other => panic!("expected NotCached, got {other:?}"),
        }
    }

    #[test]
    fn index_with_escaping_shard_name_is_rejected() {
        let tmp = tempfile::tempdir().expect("tmp");
        let index = serde_json::json!({"weight_map": {"a": "../../../etc/passwd.safetensors"}});
        let files = vec![
            (CONFIG_FILE.to_string(), b"{}".to_vec()),
            (WEIGHTS_INDEX_FILE.to_string(), index.to_string().into_bytes()),
        ];
        write_cached(tmp.path(), REPO, SHA, &["main"], &files, true);
        let err = resolve_model(REPO, None, &offline(tmp.path())).expect_err("must fail");
        assert!(matches!(err, HubError::InvalidIndex { .. }), "{err:?}");
    }

    #[test]
    fn revision_as_commit_sha_and_as_ref_names() {
        let tmp = tempfile::tempdir().expect("tmp");
        // main → SHA2 (an older snapshot with only a config), v1.0 and a branch → SHA (the full model).
        write_cached(tmp.path(), REPO, SHA2, &["main"], &[(CONFIG_FILE.into(), b"{}".to_vec())], true);
        let snap = write_cached(tmp.path(), REPO, SHA, &["v1.0", "refs/pr/1"], &fixtures(), true);
        let opts = offline(tmp.path());

        let by_sha = resolve_model(REPO, Some(SHA), &opts).expect("by sha");
        check_full(&by_sha, &snap, SHA);
        let by_tag = resolve_model(REPO, Some("v1.0"), &opts).expect("by tag");
        check_full(&by_tag, &snap, "v1.0");
        let by_pr = resolve_model(REPO, Some("refs/pr/1"), &opts).expect("by pr ref");
        check_full(&by_pr, &snap, "refs/pr/1");

        // main points at the snapshot without weights: offline that is "not cached".
        match resolve_model(REPO, None, &opts) {
            Err(HubError::NotCached { revision, file, .. }) => {
                assert_eq!(revision, "main");
                assert_eq!(file, WEIGHTS_FILE);
            }
            other => panic!("expected NotCached, got {other:?}"),
        }
    }

    #[test]
    fn no_exist_markers_make_weights_known_absent() {
        let tmp = tempfile::tempdir().expect("tmp");
        let files =
            vec![(CONFIG_FILE.to_string(), b"{}".to_vec()), ("pytorch_model.bin".to_string(), b"pickle".to_vec())];
        write_cached(tmp.path(), REPO, SHA, &["main"], &files, true);
        let no_exist = tmp.path().join(repo_folder(REPO)).join(".no_exist").join(SHA);
        fs::create_dir_all(&no_exist).expect("mkdir");
        fs::write(no_exist.join(WEIGHTS_FILE), b"").expect("marker");
        fs::write(no_exist.join(WEIGHTS_INDEX_FILE), b"").expect("marker");
        let err = resolve_model(REPO, None, &offline(tmp.path())).expect_err("no safetensors");
        match &err {
            HubError::NoSafetensors { repo, found } => {
                assert_eq!(repo, REPO);
                assert!(found.contains("pytorch_model.bin"), "{found}");
            }
            other => panic!("expected NoSafetensors, got {other:?}"),
        }
        assert!(err.to_string().contains("only safetensors weights are supported"));
    }

    #[test]
    fn not_cached_offline() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = resolve_model(REPO, None, &offline(tmp.path())).expect_err("empty cache");
        match &err {
            HubError::NotCached { repo, revision, file } => {
                assert_eq!((repo.as_str(), revision.as_str(), file.as_str()), (REPO, "main", CONFIG_FILE));
            }
            other => panic!("expected NotCached, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("HF_HUB_OFFLINE") && msg.contains("pre-download"), "{msg}");

        // A sha whose snapshot is absent, and a dangling snapshot symlink, are not cached either.
        assert!(matches!(resolve_model(REPO, Some(SHA), &offline(tmp.path())), Err(HubError::NotCached { .. })));
        let snap = write_cached(tmp.path(), REPO, SHA, &["main"], &fixtures(), true);
        let blob = fs::canonicalize(snap.join(CONFIG_FILE)).expect("blob");
        fs::remove_file(blob).expect("rm blob");
        match resolve_model(REPO, None, &offline(tmp.path())) {
            Err(HubError::NotCached { file, .. }) => assert_eq!(file, CONFIG_FILE),
            other => panic!("expected NotCached, got {other:?}"),
        }
    }

    #[test]
    fn local_folder() {
        let dir = fixture_dir();
        let files = resolve_model(dir.to_str().expect("utf-8"), None, &HubOptions::default()).expect("local");
        assert_eq!(files.source, ModelSource::Local(dir.clone()));
        assert_eq!(files.dir, dir);
        assert_eq!(files.config, dir.join(CONFIG_FILE));
        assert_eq!(files.tokenizer, Some(dir.join(TOKENIZER_FILE)));
        assert_eq!(files.tokenizer_config, Some(dir.join(TOKENIZER_CONFIG_FILE)));
        assert_eq!(files.chat_template, Some(dir.join(CHAT_TEMPLATE_FILE)));
        assert_eq!(files.generation_config, Some(dir.join(GENERATION_CONFIG_FILE)));
        assert_eq!(files.special_tokens_map, None);
        assert_eq!(files.weights, vec![dir.join(WEIGHTS_FILE)]);
    }

    #[test]
    fn local_folder_sharded_and_missing_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("model");
        fs::create_dir_all(&dir).expect("mkdir");
        let as_str = dir.to_str().expect("utf-8").to_string();
        let opts = HubOptions::default();

        match resolve_model(&as_str, None, &opts) {
            Err(HubError::MissingFile { location, file }) => {
                assert_eq!(location, as_str);
                assert_eq!(file, CONFIG_FILE);
            }
            other => panic!("expected MissingFile, got {other:?}"),
        }
        fs::write(dir.join(CONFIG_FILE), b"{}").expect("config");
        fs::write(dir.join("pytorch_model.bin"), b"pickle").expect("bin");
        match resolve_model(&as_str, None, &opts) {
            Err(HubError::NoSafetensors { found, .. }) => {
                assert!(found.contains("pytorch_model.bin"), "{found}")
            }
            other => panic!("expected NoSafetensors, got {other:?}"),
        }
        let index =
            serde_json::json!({"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}});
        fs::write(dir.join(WEIGHTS_INDEX_FILE), index.to_string()).expect("index");
        fs::write(dir.join("a.safetensors"), b"a").expect("a");
        match resolve_model(&as_str, None, &opts) {
            Err(HubError::MissingFile { location, file }) => {
                assert_eq!(location, as_str);
                assert_eq!(file, "b.safetensors");
            }
            other => panic!("expected MissingFile, got {other:?}"),
        }
        fs::write(dir.join("b.safetensors"), b"b").expect("b");
        let files = resolve_model(&as_str, Some("ignored"), &opts).expect("sharded local");
        assert_eq!(files.weights, vec![dir.join("a.safetensors"), dir.join("b.safetensors")]);
        assert_eq!(files.tokenizer, None);

        fs::write(dir.join(WEIGHTS_INDEX_FILE), "{\"weight_map\": {}}").expect("index");
        assert!(matches!(resolve_model(&as_str, None, &opts), Err(HubError::InvalidIndex { .. })));
        fs::write(dir.join(WEIGHTS_INDEX_FILE), "not json").expect("index");
        assert!(matches!(resolve_model(&as_str, None, &opts), Err(HubError::InvalidIndex { .. })));
    }

    #[test]
    fn local_missing_path_and_bad_ids() {
        let opts = HubOptions::default();
        for p in
            ["/definitely/not/here/peftkit", "./no-such-model-dir", "../no-such-model-dir", "~/no-such-peftkit-model"]
        {
            match resolve_model(p, None, &opts) {
                Err(HubError::LocalNotFound(path)) => assert!(!path.exists(), "{p}"),
                other => panic!("{p}: expected LocalNotFound, got {other:?}"),
            }
        }
        let file = fixture_dir().join(CONFIG_FILE);
        assert!(matches!(resolve_model(file.to_str().expect("utf-8"), None, &opts), Err(HubError::NotADirectory(_))));
        for id in ["gpt2", "a/b/c", "", "owner/na..me", "-x/y"] {
            assert!(matches!(resolve_model(id, None, &opts), Err(HubError::InvalidModelId(_))), "{id}");
        }
        let tmp = tempfile::tempdir().expect("tmp");
        for rev in ["", "../../etc", "/abs", " main"] {
            assert!(
                matches!(resolve_model(REPO, Some(rev), &offline(tmp.path())), Err(HubError::InvalidRevision { .. })),
                "{rev:?}"
            );
        }
    }

    #[test]
    fn debug_hides_token() {
        let opts = HubOptions { token: Some("hf_SuperSecretTokenValue123".into()), ..Default::default() };
        let dbg = format!("{opts:?}");
        assert!(!dbg.contains("SuperSecret"), "{dbg}");
        assert!(dbg.contains("token: Some(\"***\")"), "{dbg}");
        let none = format!("{:?}", HubOptions::default());
        assert!(none.contains("token: None"), "{none}");
    }

    #[test]
    fn redact_removes_tokens() {
        let out = redact("bad header Bearer my-token-123 and hf_abcdefghijkl", Some("my-token-123"));
        assert!(!out.contains("my-token-123") && !out.contains("abcdefghijkl"), "{out}");
    }

    #[test]
    fn gated_message_never_has_token_and_explains() {
        let msg = HubError::Gated { repo: REPO.into(), status: 401, token_sent: false }.to_string();
        assert!(msg.contains("HF_TOKEN") && msg.contains("huggingface-cli login") && msg.contains(REPO), "{msg}");
    }

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

    #[test]
    fn options_from_env_lookup() {
        let tmp = tempfile::tempdir().expect("tmp");
        let home = tmp.path().join("hfhome");
        fs::create_dir_all(&home).expect("mkdir");
        fs::write(home.join("token"), "  file-token\n").expect("token");
        let home_s = home.to_str().expect("utf-8").to_string();

        let vars = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let from = |m: HashMap<String, String>| HubOptions::from_lookup(move |k| m.get(k).cloned());

        let o = from(vars(&[("HF_HOME", &home_s), ("HOME", "/nonexistent-home")]));
        assert_eq!(o.cache_dir, Some(home.join("hub")));
        assert_eq!(o.token.as_deref(), Some("file-token"));
        assert!(!o.offline && o.endpoint.is_none() && !o.progress);

        let o = from(vars(&[
            ("HF_HOME", &home_s),
            ("HF_HUB_CACHE", "/elsewhere/cache"),
            ("HF_TOKEN", "env-token"),
            ("HF_HUB_OFFLINE", "TRUE"),
            ("HF_ENDPOINT", "https://mirror.example/"),
        ]));
        assert_eq!(o.cache_dir, Some(PathBuf::from("/elsewhere/cache")));
        assert_eq!(o.token.as_deref(), Some("env-token"));
        assert!(o.offline);
        assert_eq!(o.endpoint.as_deref(), Some("https://mirror.example"));

        for (v, want) in [("1", true), ("yes", true), ("on", true), ("0", false), ("false", false), ("", false)] {
            let o = from(vars(&[("HF_HOME", &home_s), ("HF_HUB_OFFLINE", v)]));
            assert_eq!(o.offline, want, "HF_HUB_OFFLINE={v:?}");
        }

        let o = from(vars(&[("HOME", "/home/someone")]));
        assert_eq!(o.cache_dir, Some(PathBuf::from("/home/someone/.cache/huggingface/hub")));
        assert_eq!(o.token, None);
        let o = from(vars(&[("HOME", "/home/someone"), ("XDG_CACHE_HOME", "/xdg")]));
        assert_eq!(o.cache_dir, Some(PathBuf::from("/xdg/huggingface/hub")));
    }

    #[test]
    fn commit_from_snapshot_paths() {
        let p = Path::new("/c/models--a--b/snapshots").join(SHA).join("config.json");
        assert_eq!(commit_of_snapshot_file(&p, "config.json"), Some(SHA.to_string()));
        assert_eq!(commit_of_snapshot_file(Path::new("/x/y/config.json"), "config.json"), None);
    }
}
