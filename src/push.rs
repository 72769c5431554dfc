//! Publishing a folder (a trained adapter or a merged model) to the Hugging Face Hub in one commit.
//!
//! [`push`] checks the folder, creates the repo if it is missing, uploads the large files through the Hub's
//! large-file path and then makes **one** commit holding every file. The Hub protocol, as `huggingface_hub`
//! speaks it:
//!
//! 1. `POST /api/repos/create` (409 when the repo exists) and, for a branch other than `main`,
//!    `POST /api/models/{repo}/branch/{branch}` — both through hf-hub.
//! 2. `POST /api/validate-yaml` with the model card: the Hub says whether its metadata is valid (it would refuse
//!    the commit otherwise). Then `POST /api/models/{repo}/preupload/{revision}` with each file's path, size and first 512 bytes: the Hub
//!    answers `lfs` (large or binary files) or `regular` for each, and whether to ignore it.
//! 3. `POST /{repo}.git/info/lfs/objects/batch` (Git LFS batch API) with the sha256 and size of every `lfs` file.
//!    The Hub picks a transfer: `basic` (one `PUT` to a presigned URL), `multipart` (the upload action's header
//!    holds `chunk_size` and one presigned URL per part; the parts' ETags are then `POST`ed to the action's URL),
//!    or `xet`. An object the Hub already stores comes back without an upload action and is not sent again.
//!    After an upload, the `verify` action (when given) confirms the object.
//! 4. `POST /api/models/{repo}/commit/{revision}`, an NDJSON body: a header line (summary, description), then
//!    `lfsFile` lines (path, sha256, size) for the large files and `file` lines (base64 content) for the rest.
//!
//! Checked against `huggingface_hub` 2.4 (`HfApi.upload_folder` with Xet disabled) pushing the same folder to a
//! recording server: the same calls in the same order, the same JSON keys, the same NDJSON lines, no token on the
//! storage PUT. Differences: it
//! offers only `basic`/`multipart` to the batch call, and sends its Bearer token to `verify` where peftkit sends
//! the action's own `Authorization` header (as Git LFS clients do).
//!
//! Why not hf-hub's `upload_folder` alone: hf-hub 1.0 sends large files only through Xet. When the Hub answers
//! the batch call with `basic` or `multipart` (a repo without Xet storage, or a Hub mirror), hf-hub puts every
//! file inline in the commit as base64 instead, which the Hub refuses for binary files and which would hold a
//! whole merged model in memory. So steps 2–4 are done here; when the Hub picks `xet`, the commit is handed to
//! hf-hub's `create_commit`, whose Xet upload is the Hub's own client code.
//!
//! The token is sent only as an `Authorization: Bearer` header, and only to the Hub endpoint (never to a
//! presigned storage URL); it is never printed, logged, or put into an error message. Requests that are safe
//! to repeat are tried at most [`MAX_ATTEMPTS`] times in all on 429/5xx or a failed connection; the commit
//! itself is never retried (on the Xet path hf-hub's own policy applies: the same bound, commit included);
//! 401 and 403 are never retried.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::hub::{self, error_chain, HubOptions, UpstreamError};

/// The model card every pushed folder must have.
pub const MODEL_CARD: &str = "README.md";
/// Top-level folders that are never pushed: training resume state and VCS/cache folders.
pub const SKIPPED_DIRS: &[&str] = &["checkpoints", ".git", ".cache"];
/// The Hub's default endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Tries per request that is safe to repeat (the first one included).
pub const MAX_ATTEMPTS: usize = 3;
/// Pause before the second try (doubled before each further one), unless the answer says `Retry-After`.
const RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Files per preupload / LFS batch request (as `huggingface_hub` chunks them).
const FILES_PER_REQUEST: usize = 256;
/// Bytes of each file sent to the preupload call.
const SAMPLE_LEN: usize = 512;
/// Longest server error text kept in a message.
const MAX_DETAIL: usize = 600;
const LFS_MEDIA_TYPE: &str = "application/vnd.git-lfs+json";
/// Time allowed for an API call (JSON in, JSON out), and for an upload on top of its size at 512 KiB/s.
const API_TIMEOUT: Duration = Duration::from_secs(120);

fn upload_timeout(bytes: u64) -> Duration {
    API_TIMEOUT + Duration::from_secs(bytes / (512 * 1024))
}

/// What to push where.
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// The folder: an adapter (`adapter_config.json` + weights) or a model (`config.json` + weights), with a card.
    pub folder: PathBuf,
    /// `owner/name`, or `name` alone for a repo under the token's own account.
    pub repo: String,
    /// Create the repo as private (only when it does not exist yet).
    pub private: bool,
    /// The branch to commit to (created from `main` when missing).
    pub revision: String,
    /// Commit message; `None`: a message naming the folder's contents.
    pub message: Option<String>,
    /// Token, endpoint and offline flag (its `Debug` hides the token).
    pub hub: HubOptions,
    /// Show a byte progress bar for the large-file uploads.
    pub progress: bool,
}

impl PushOptions {
    /// Options for `folder` → `repo` on `main`, reading the token and endpoint from the environment.
    pub fn new(folder: impl Into<PathBuf>, repo: impl Into<String>) -> Self {
        PushOptions {
            folder: folder.into(),
            repo: repo.into(),
            private: false,
            revision: hub::DEFAULT_REVISION.to_string(),
            message: None,
            hub: HubOptions::from_env(),
            progress: false,
        }
    }
}

/// One file of a push.
#[derive(Clone, Debug)]
pub struct PushedFile {
    /// Path in the repo (`/`-separated).
    pub path: String,
    pub size: u64,
    /// Hex sha256 of the content.
    pub sha256: String,
    /// Committed as a large-file pointer (`lfsFile`) rather than inline.
    pub lfs: bool,
    /// Its bytes were sent in this push (false for an LFS object the Hub already had).
    pub uploaded: bool,
}

/// What a push did.
#[derive(Clone, Debug)]
pub struct PushReport {
    /// `owner/name`.
    pub repo: String,
    /// The repo's page (the branch's page for a branch other than `main`).
    pub url: String,
    /// The commit's page and id, as the Hub returned them.
    pub commit_url: Option<String>,
    pub commit_oid: Option<String>,
    /// The repo did not exist and was created.
    pub created: bool,
    /// The branch did not exist and was created.
    pub created_branch: bool,
    /// The transfer the Hub chose for the large files (`basic`, `multipart`, `xet`), if any were sent.
    pub transfer: Option<String>,
    pub files: Vec<PushedFile>,
    /// Local paths left out (resume checkpoints, VCS folders, files the Hub said to ignore), with the reason.
    pub skipped: Vec<(String, &'static str)>,
}

/// Why a push failed. [`PushError::is_user_error`] tells input problems (exit code 2) from the rest.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{}: {reason}", .folder.display())]
    Folder { folder: PathBuf, reason: String },
    #[error("{}: {reason}; nothing was pushed", .path.display())]
    HalfWritten { path: PathBuf, reason: String },
    #[error(
        "{}: the Hub refuses the model card's metadata (the YAML between the `---` lines): {detail}. Fix it and push \
         again; nothing was pushed",
        .path.display()
    )]
    CardMetadata { path: PathBuf, detail: String },
    #[error(
        "pushing needs a Hugging Face token with write access: set HF_TOKEN, or log in with `hf auth login` \
         (it writes {}), or point HF_TOKEN_PATH at a token file",
        .token_file.display()
    )]
    NoToken { token_file: PathBuf },
    #[error("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it to publish")]
    Offline,
    #[error("--repo {0:?}: a Hub repo id looks like owner/name (letters, digits, '-', '_', '.')")]
    BadRepo(String),
    #[error("--revision {0:?} is not a valid branch name")]
    BadRevision(String),
    #[error("{}", refused_message(*.status, .action, .repo, .detail))]
    Refused { status: u16, action: String, repo: String, detail: String },
    #[error("the Hub answered {status} to {action} for {repo}{}: {detail}. {hint}", attempts_note(*.attempts))]
    Server { status: u16, action: String, repo: String, detail: String, attempts: usize, hint: &'static str },
    #[error("could not reach {target} for {action}{}: {detail}. {hint}", attempts_note(*.attempts))]
    Network { target: String, action: String, detail: String, attempts: usize, hint: &'static str },
    #[error(
        "the storage service answered {status} to {action}{}: {detail}. Its upload link may have expired; {hint}",
        attempts_note(*.attempts)
    )]
    Storage { status: u16, action: String, detail: String, attempts: usize, hint: &'static str },
    #[error("unexpected answer from the Hub to {action} for {repo}: {detail}")]
    Protocol { action: String, repo: String, detail: String },
    #[error("{} changed while it was being pushed; nothing was committed. Push again once it is final", .path.display())]
    Changed { path: PathBuf },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{action} for {repo} failed: {source}")]
    HfHub { action: String, repo: String, source: UpstreamError },
}

impl PushError {
    /// Bad input (folder, flags, token missing or refused) rather than a failure of the Hub or the network.
    pub fn is_user_error(&self) -> bool {
        match self {
            PushError::Folder { .. }
            | PushError::HalfWritten { .. }
            | PushError::CardMetadata { .. }
            | PushError::NoToken { .. }
            | PushError::Offline
            | PushError::BadRepo(_)
            | PushError::BadRevision(_)
            | PushError::Refused { .. }
            | PushError::Changed { .. } => true,
            PushError::HfHub { source, .. } => matches!(source.status(), Some(401 | 403)),
            _ => false,
        }
    }
}

fn refused_message(status: u16, action: &str, repo: &str, detail: &str) -> String {
    let why = match status {
        401 => "the token was refused (401 Unauthorized): it is invalid or expired. Check HF_TOKEN or the token file",
        _ => {
            "the token has no write access (403 Forbidden). Use a token with the `write` role (a fine-grained token \
             needs write access to this repo or its namespace)"
        }
    };
    let detail = if detail.is_empty() { String::new() } else { format!(" The Hub said: {detail}") };
    format!("{action} for {repo}: {why}.{detail}")
}

fn attempts_note(attempts: usize) -> String {
    if attempts > 1 {
        format!(" (after {attempts} attempts)")
    } else {
        String::new()
    }
}

const NOTHING_COMMITTED: &str = "Nothing was committed; run the same command again later";
const COMMIT_NOT_RETRIED: &str = "The commit was not retried (it may or may not have been made; check the repo \
     page). Files already uploaded are not sent again when you run the same command";

// ---------------------------------------------------------------------------------------------
// The folder
// ---------------------------------------------------------------------------------------------

/// A local file to push.
#[derive(Clone, Debug)]
struct LocalFile {
    /// Path in the repo (`/`-separated, relative to the folder).
    rel: String,
    path: PathBuf,
    size: u64,
    modified: Option<SystemTime>,
    sha256: String,
    sample: Vec<u8>,
}

/// Lists and checks the folder: a model card, no temporary or truncated files, complete safetensors and JSON.
/// Returns the files (sorted by path) and the paths left out.
fn scan_folder(folder: &Path) -> Result<(Vec<LocalFile>, Vec<(String, &'static str)>), PushError> {
    let bad = |reason: String| PushError::Folder { folder: folder.to_path_buf(), reason };
    let meta = std::fs::metadata(folder).map_err(|e| bad(format!("cannot read the folder ({e})")))?;
    if !meta.is_dir() {
        return Err(bad("not a folder; push takes an adapter or model folder".into()));
    }
    let own_name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if is_temporary_name(&own_name) {
        return Err(PushError::HalfWritten {
            path: folder.to_path_buf(),
            reason: "a temporary folder: a job (e.g. `peftkit merge`) is still writing it, or stopped before it \
                     finished"
                .into(),
        });
    }
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    walk(folder, folder, &mut found, &mut skipped)?;
    found.sort();
    if found.is_empty() {
        return Err(bad("the folder is empty".into()));
    }
    let card = folder.join(MODEL_CARD);
    match std::fs::metadata(&card) {
        Ok(m) if m.is_file() && m.len() > 0 => {}
        _ => {
            return Err(bad(format!(
                "no model card ({MODEL_CARD}); every pushed repo needs one. peftkit writes it with the adapter \
                 (`peftkit train`) or the merged model (`peftkit merge`); write one by hand for other folders"
            )))
        }
    }
    let names: Vec<&str> = found.iter().map(|(rel, _)| rel.as_str()).collect();
    let has = |n: &str| names.contains(&n);
    if has("adapter_config.json") && !names.iter().any(|n| n.starts_with("adapter_model.")) {
        return Err(bad("adapter_config.json without adapter_model.safetensors: the adapter is incomplete".into()));
    }
    if names.iter().any(|n| n.starts_with("adapter_model.")) && !has("adapter_config.json") {
        return Err(bad("adapter weights without adapter_config.json: the adapter is incomplete".into()));
    }
    let weights = |n: &&str| n.ends_with(".safetensors") || n.ends_with(".bin") || n.ends_with(".gguf");
    if has("config.json") && !has("adapter_config.json") && !names.iter().any(weights) {
        return Err(
            bad("config.json without weights (no .safetensors, .bin or .gguf): the model is incomplete".into()),
        );
    }
    for (rel, path) in &found {
        check_complete(rel, path, folder)?;
    }
    let mut files = Vec::with_capacity(found.len());
    for (rel, path) in found {
        let meta = std::fs::metadata(&path).map_err(|source| PushError::Io { path: path.clone(), source })?;
        let (sha256, sample) = hash_file(&path)?;
        files.push(LocalFile { rel, size: meta.len(), modified: meta.modified().ok(), sha256, sample, path });
    }
    Ok((files, skipped))
}

fn walk(
    root: &Path,
    dir: &Path,
    found: &mut Vec<(String, PathBuf)>,
    skipped: &mut Vec<(String, &'static str)>,
) -> Result<(), PushError> {
    let io = |source| PushError::Io { path: dir.to_path_buf(), source };
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io)?.collect::<Result<_, _>>().map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = path
            .strip_prefix(root)
            .map(|r| r.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"))
            .unwrap_or_else(|_| name.clone());
        let link = std::fs::symlink_metadata(&path).map(|m| m.file_type().is_symlink()).unwrap_or(false);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) if link => {
                return Err(PushError::Folder {
                    folder: root.to_path_buf(),
                    reason: format!("{rel} is a link to nothing (a dangling symlink); fix or delete it"),
                })
            }
            Err(source) => return Err(PushError::Io { path: path.clone(), source }),
        };
        if meta.is_dir() && link {
            // A linked folder may lead outside the folder (or back into it): not followed.
            skipped.push((format!("{rel}/"), "a link to a folder, not followed"));
        } else if meta.is_dir() {
            if is_temporary_name(&name) {
                return Err(PushError::HalfWritten {
                    path,
                    reason: "a temporary folder: a job is still writing it (or stopped before it finished)".into(),
                });
            }
            if dir == root && SKIPPED_DIRS.contains(&name.as_str()) {
                let why = if name == "checkpoints" { "training resume state" } else { "not model content" };
                skipped.push((format!("{rel}/"), why));
            } else {
                walk(root, &path, found, skipped)?;
            }
        } else if meta.is_file() {
            if is_temporary_name(&name) {
                return Err(PushError::HalfWritten {
                    path,
                    reason: "a temporary file: a job is still writing this folder (or stopped before it finished); \
                             wait for it to finish, or delete the file"
                        .into(),
                });
            }
            found.push((rel, path));
        }
    }
    Ok(())
}

/// Names peftkit and other tools give files while they are being written.
fn is_temporary_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.contains(".tmp-")
        || [".tmp", ".part", ".partial", ".incomplete", ".crdownload", ".lock"].iter().any(|s| lower.ends_with(s))
}

/// A file whose format says how long it is must be whole: safetensors (header + data), JSON, JSON Lines, and a
/// weights index whose shards are all present.
fn check_complete(rel: &str, path: &Path, folder: &Path) -> Result<(), PushError> {
    let half = |reason: String| PushError::HalfWritten { path: path.to_path_buf(), reason };
    let io = |source| PushError::Io { path: path.to_path_buf(), source };
    if rel.ends_with(".safetensors") {
        let actual = std::fs::metadata(path).map_err(io)?.len();
        let expected = safetensors_length(path).map_err(|e| half(format!("not a complete safetensors file ({e})")))?;
        if actual != expected {
            return Err(half(format!(
                "truncated or padded: its header describes {expected} bytes but the file has {actual}"
            )));
        }
    } else if rel.ends_with(".json") {
        let text = std::fs::read_to_string(path).map_err(io)?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| half(format!("not complete JSON (line {}, column {}: {e})", e.line(), e.column())))?;
        if rel.ends_with(".safetensors.index.json") {
            let shards =
                value.get("weight_map").and_then(Value::as_object).ok_or_else(|| half("no weight_map".into()))?;
            let dir = Path::new(rel).parent().map(|p| folder.join(p)).unwrap_or_else(|| folder.to_path_buf());
            for shard in shards.values().filter_map(Value::as_str) {
                if Path::new(shard).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                    return Err(half(format!("names the shard {shard:?}, which is not a plain file name")));
                }
                if !dir.join(shard).is_file() {
                    return Err(half(format!("names the shard {shard}, which is missing")));
                }
            }
        }
    } else if rel.ends_with(".jsonl") {
        use std::io::BufRead;
        let reader = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(io)?;
            if !line.trim().is_empty() {
                serde_json::from_str::<Value>(&line)
                    .map_err(|e| half(format!("line {}: not complete JSON ({e})", i + 1)))?;
            }
        }
    }
    Ok(())
}

/// The length a safetensors file must have: 8 + header length + the end of the last tensor's data.
fn safetensors_length(path: &Path) -> Result<u64, String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| "shorter than its 8-byte header length".to_string())?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(format!("header length {n} is not plausible"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|_| "the JSON header is cut short".to_string())?;
    let header: Value = serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    let map = header.as_object().ok_or("the header is not a JSON object")?;
    let mut end = 0u64;
    for (name, info) in map.iter().filter(|(k, _)| *k != "__metadata__") {
        let offsets = info.get("data_offsets").and_then(Value::as_array).ok_or(format!("{name}: no data_offsets"))?;
        let stop = offsets.get(1).and_then(Value::as_u64).ok_or(format!("{name}: bad data_offsets"))?;
        end = end.max(stop);
    }
    (8 + n).checked_add(end).ok_or_else(|| "data offsets overflow".to_string())
}

fn hash_file(path: &Path) -> Result<(String, Vec<u8>), PushError> {
    let io = |source| PushError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut sample = Vec::with_capacity(SAMPLE_LEN);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        if sample.len() < SAMPLE_LEN {
            let take = (SAMPLE_LEN - sample.len()).min(n);
            sample.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
    }
    Ok((format!("{:x}", hasher.finalize()), sample))
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// Whether a request may be sent again after a 429/5xx answer or a failed connection.
#[derive(Clone, Copy, PartialEq)]
enum Retry {
    Transient,
    Never,
}

/// The Hub's HTTP API, for the calls hf-hub 1.0 does not make the way a non-Xet upload needs.
struct Api {
    http: Client,
    endpoint: String,
    token: String,
    repo: String,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api").field("endpoint", &self.endpoint).field("repo", &self.repo).finish_non_exhaustive()
    }
}

impl Api {
    fn auth(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.token)).unwrap_or(HeaderValue::from_static(""));
        v.set_sensitive(true);
        v
    }

    /// Whether `url` is on the Hub endpoint (same scheme, host and port): only such requests carry the token.
    fn is_hub_url(&self, url: &str) -> bool {
        match (reqwest::Url::parse(url), reqwest::Url::parse(&self.endpoint)) {
            (Ok(u), Ok(e)) => u.origin() == e.origin(),
            _ => false,
        }
    }

    fn redact(&self, text: &str) -> String {
        hub::redact(text, Some(&self.token))
    }

    /// Sends the request `build` makes to `url`, retrying transient failures when `retry` allows, and turns every
    /// non-success answer into a [`PushError`]. A refusal (401/403) is the token's only from the Hub itself; from
    /// a storage URL it is an expired or refused upload link.
    fn send(
        &self,
        action: &str,
        url: &str,
        retry: Retry,
        timeout: Duration,
        hint: &'static str,
        build: impl Fn() -> Result<RequestBuilder, PushError>,
    ) -> Result<Response, PushError> {
        let hub = self.is_hub_url(url);
        let max = if retry == Retry::Transient { MAX_ATTEMPTS } else { 1 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A storage URL is signed: it stays out of errors and logs.
            let result = build()?.timeout(timeout).send().map_err(|e| if hub { e } else { e.without_url() });
            let transient = match &result {
                Ok(r) => matches!(r.status().as_u16(), 408 | 429 | 500 | 502 | 503 | 504),
                Err(e) => e.is_connect() || e.is_timeout() || e.is_request() || e.is_body(),
            };
            if transient && attempt < max {
                let wait = match &result {
                    Ok(r) => retry_after(r).unwrap_or(RETRY_BACKOFF * (1 << (attempt - 1))),
                    Err(_) => RETRY_BACKOFF * (1 << (attempt - 1)),
                };
                tracing::warn!("{action}: {}; trying again in {:.1} s", self.describe(&result), wait.as_secs_f32());
                std::thread::sleep(wait);
                continue;
            }
            return match result {
                Ok(r) if r.status().is_success() => Ok(r),
                Ok(r) => {
                    let status = r.status().as_u16();
                    let detail = self.detail(r);
                    let (action, repo) = (action.to_string(), self.repo.clone());
                    Err(match status {
                        401 | 403 if hub => PushError::Refused { status, action, repo, detail },
                        _ if hub => PushError::Server { status, action, repo, detail, attempts: attempt, hint },
                        _ => PushError::Storage { status, action, detail, attempts: attempt, hint },
                    })
                }
                Err(e) => Err(PushError::Network {
                    target: if hub { format!("the Hub at {}", self.endpoint) } else { "the Hub's storage".into() },
                    action: action.to_string(),
                    detail: self.redact(&error_chain(&e)),
                    attempts: attempt,
                    hint,
                }),
            };
        }
    }

    fn describe(&self, result: &Result<Response, reqwest::Error>) -> String {
        match result {
            Ok(r) => format!("the answer was {}", r.status()),
            Err(e) => self.redact(&error_chain(e)),
        }
    }

    /// The server's explanation: `{"error": …}` from a JSON body, else the start of the text; token-free.
    fn detail(&self, r: Response) -> String {
        let status = r.status();
        let text = r.text().unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or(text);
        let msg = msg.trim();
        let msg =
            if msg.is_empty() { status.canonical_reason().unwrap_or("no message").to_string() } else { msg.into() };
        let mut msg = self.redact(&msg);
        if msg.len() > MAX_DETAIL {
            let cut = (0..=MAX_DETAIL).rev().find(|&i| msg.is_char_boundary(i)).unwrap_or(0);
            msg.truncate(cut);
            msg.push('…');
        }
        msg
    }

    fn api_url(&self, what: &str) -> String {
        format!("{}/api/models/{}/{what}", self.endpoint, self.repo)
    }

    fn post_json(&self, url: &str, body: &Value) -> RequestBuilder {
        self.http.post(url).header(AUTHORIZATION, self.auth()).json(body)
    }

    fn json(&self, action: &str, r: Response) -> Result<Value, PushError> {
        r.json::<Value>().map_err(|e| PushError::Protocol {
            action: action.into(),
            repo: self.repo.clone(),
            detail: format!("the answer is not JSON ({})", self.redact(&e.to_string())),
        })
    }
}

fn retry_after(r: &Response) -> Option<Duration> {
    let secs: u64 = r.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(30)))
}

// ---------------------------------------------------------------------------------------------
// The push
// ---------------------------------------------------------------------------------------------

/// The checks a push makes before it reads the folder or touches the network: repo id, branch name, offline
/// mode, a token. Returns the token. `peftkit train` runs it before training when the recipe pushes at the end.
pub fn preflight(opts: &PushOptions) -> Result<String, PushError> {
    let repo_arg = opts.repo.trim();
    let bare_name = !repo_arg.contains('/');
    if !hub::valid_repo_id(&if bare_name { format!("user/{repo_arg}") } else { repo_arg.to_string() }) {
        return Err(PushError::BadRepo(opts.repo.clone()));
    }
    if !hub::valid_revision(&opts.revision) {
        return Err(PushError::BadRevision(opts.revision.clone()));
    }
    if opts.hub.offline {
        return Err(PushError::Offline);
    }
    let token = opts.hub.token.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(str::to_string);
    token.ok_or_else(|| PushError::NoToken { token_file: hf_hub::hf_home().join("token") })
}

/// Pushes `opts.folder` to `opts.repo` in one commit; see the module docs for the protocol.
pub fn push(opts: &PushOptions) -> Result<PushReport, PushError> {
    let token = preflight(opts)?;
    let repo_arg = opts.repo.trim();
    let bare_name = !repo_arg.contains('/');
    let (files, mut skipped) = scan_folder(&opts.folder)?;
    let endpoint = opts.hub.endpoint.clone().unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let endpoint = endpoint.trim().trim_end_matches('/').to_string();

    // hf-hub: whoami (for a bare name), repo and branch creation, and the Xet path.
    let hf = hf_hub::HFClient::builder()
        .endpoint(endpoint.as_str())
        .token(token.as_str())
        .user_agent(format!("peftkit/{}", env!("CARGO_PKG_VERSION")))
        // hf-hub counts retries after the first try.
        .retry_max_attempts(MAX_ATTEMPTS - 1)
        .cache_enabled(false)
        .build_sync()
        .map_err(|e| PushError::HfHub {
            action: "starting the Hub client".into(),
            repo: repo_arg.into(),
            source: UpstreamError::from_hf(&e, Some(&token)),
        })?;
    let hf_err = |action: &str, repo: &str, e: &hf_hub::HFError| {
        let source = UpstreamError::from_hf(e, Some(&token));
        match source.status() {
            Some(status @ (401 | 403)) => PushError::Refused {
                status,
                action: action.into(),
                repo: repo.into(),
                detail: source.message().to_string(),
            },
            _ => PushError::HfHub { action: action.into(), repo: repo.into(), source },
        }
    };
    let repo = if bare_name {
        let user = hf.whoami().send().map_err(|e| hf_err("asking the Hub whose token this is", repo_arg, &e))?;
        format!("{}/{repo_arg}", user.username)
    } else {
        repo_arg.to_string()
    };

    let created =
        match hf.create_repository().repo_id(&repo).repo_type(hf_hub::RepoTypeModel).private(opts.private).send() {
            Ok(_) => true,
            Err(hf_hub::HFError::Conflict { .. }) => false,
            // A fine-grained token may write to a repo without being allowed to create repos in its namespace.
            Err(e @ hf_hub::HFError::Forbidden { .. }) => {
                match hf.model(hf_hub::split_id(&repo).0, hf_hub::split_id(&repo).1).exists().send() {
                    Ok(true) => false,
                    _ => return Err(hf_err("creating the repo", &repo, &e)),
                }
            }
            Err(e) => return Err(hf_err("creating the repo", &repo, &e)),
        };
    if created {
        tracing::info!("created the {} repo {repo}", if opts.private { "private" } else { "public" });
    } else if opts.private {
        tracing::info!(
            "{repo} already exists; --private only applies when a repo is created, so its visibility is unchanged"
        );
    }
    let (owner, name) = hf_hub::split_id(&repo);
    let handle = hf.model(owner, name);
    let revision = opts.revision.clone();
    // Pull-request refs (`refs/pr/N`) exist already; branches are created from main when missing.
    let created_branch = if revision != hub::DEFAULT_REVISION && !revision.starts_with("refs/") {
        match handle.create_branch().branch(&revision).send() {
            Ok(()) => true,
            Err(hf_hub::HFError::Conflict { .. }) => false,
            Err(e) => return Err(hf_err(&format!("creating the branch {revision}"), &repo, &e)),
        }
    } else {
        false
    };

    let http = Client::builder()
        .user_agent(format!("peftkit/{}", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        // No overall default: every request sets its own (uploads get time in proportion to their size).
        .timeout(None::<Duration>)
        .build()
        .map_err(|e| PushError::Network {
            target: format!("the Hub at {endpoint}"),
            action: "starting the HTTP client".into(),
            detail: error_chain(&e),
            attempts: 1,
            hint: "",
        })?;
    let api = Api { http, endpoint: endpoint.clone(), token: token.clone(), repo: repo.clone() };

    // 0. The card's metadata, as the Hub will judge it (huggingface_hub asks the same before an upload).
    validate_card(&api, &opts.folder.join(MODEL_CARD))?;

    // 1. Which files are large (LFS) and which the Hub ignores.
    let modes = preupload(&api, &files, &revision)?;
    let mut to_push = Vec::new();
    for f in &files {
        match modes.get(&f.rel) {
            Some((_, true)) => skipped.push((f.rel.clone(), "ignored by the repo's .gitignore")),
            Some((lfs, false)) => to_push.push((f, *lfs && f.size > 0)),
            None => {
                return Err(PushError::Protocol {
                    action: "the preupload request".into(),
                    repo: repo.clone(),
                    detail: format!("no upload mode for {}", f.rel),
                })
            }
        }
    }

    // 2. The large files, through the LFS batch API.
    // One upload per content: files with the same bytes share one LFS object.
    let mut lfs: Vec<&LocalFile> = Vec::new();
    for (f, is_lfs) in &to_push {
        if *is_lfs && !lfs.iter().any(|o| o.sha256 == f.sha256) {
            lfs.push(f);
        }
    }
    let mut uploaded = std::collections::HashSet::new();
    let mut transfer = None;
    let mut xet = false;
    for chunk in lfs.chunks(FILES_PER_REQUEST) {
        let batch = lfs_batch(&api, chunk, &revision)?;
        if batch.transfer == "xet" {
            xet = true;
            break;
        }
        transfer = Some(batch.transfer.clone());
        let total: u64 = batch.actions.iter().filter(|(_, a)| a.upload.is_some()).map(|(f, _)| f.size).sum();
        let bar = progress_bar(opts.progress, total);
        for (file, actions) in &batch.actions {
            if upload_object(&api, file, actions, &bar)? {
                uploaded.insert(file.sha256.clone());
            }
        }
        bar.finish_and_clear();
    }

    // 3. One commit with every file.
    recheck(&files)?;
    let message = commit_message(opts, &files);
    let (commit_url, commit_oid) = if xet {
        tracing::info!("the Hub chose Xet storage for the large files; handing the upload to hf-hub");
        transfer = Some("xet".into());
        let ops = to_push.iter().map(|(f, _)| hf_hub::repository::CommitOperation::add_file(&f.rel, &f.path)).collect();
        let info = handle
            .create_commit()
            .operations(ops)
            .commit_message(message)
            .commit_description(commit_description())
            .revision(revision.clone())
            .send()
            .map_err(|e| hf_err("the Xet upload and commit", &repo, &e))?;
        (info.commit_url, info.commit_oid)
    } else {
        let info = commit(&api, &to_push, &revision, &message)?;
        let field = |k: &str| info.get(k).and_then(Value::as_str).map(str::to_string);
        (field("commitUrl"), field("commitOid"))
    };
    let files = to_push
        .iter()
        .map(|(f, lfs)| PushedFile {
            path: f.rel.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
            lfs: *lfs,
            // Xet deduplicates below the file level: what it sent is its own business.
            uploaded: xet || !*lfs || uploaded.contains(&f.sha256),
        })
        .collect();
    Ok(PushReport {
        url: repo_url(&endpoint, &repo, &revision),
        repo,
        commit_url,
        commit_oid,
        created,
        created_branch,
        transfer,
        files,
        skipped,
    })
}

fn repo_url(endpoint: &str, repo: &str, revision: &str) -> String {
    if revision == hub::DEFAULT_REVISION {
        format!("{endpoint}/{repo}")
    } else {
        format!("{endpoint}/{repo}/tree/{revision}")
    }
}

/// The default commit message says what the folder holds.
fn commit_message(opts: &PushOptions, files: &[LocalFile]) -> String {
    if let Some(m) = opts.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
        return m.to_string();
    }
    let has = |n: &str| files.iter().any(|f| f.rel == n);
    if has("adapter_config.json") {
        "Upload adapter trained with peftkit".into()
    } else if has("config.json") {
        "Upload model merged with peftkit".into()
    } else {
        "Upload folder with peftkit".into()
    }
}

fn commit_description() -> String {
    format!("Pushed with peftkit {}.", env!("CARGO_PKG_VERSION"))
}

/// Files must be as they were when hashed: same size and modification time.
fn recheck(files: &[LocalFile]) -> Result<(), PushError> {
    for f in files {
        let meta = std::fs::metadata(&f.path).map_err(|_| PushError::Changed { path: f.path.clone() })?;
        if meta.len() != f.size || meta.modified().ok() != f.modified {
            return Err(PushError::Changed { path: f.path.clone() });
        }
    }
    Ok(())
}

/// Asks the Hub whether the card's front matter is valid (`POST /api/validate-yaml`): 400 means it is not, and the
/// commit would be refused after the upload. An endpoint without this call (404: some mirrors) is not an error.
fn validate_card(api: &Api, card: &Path) -> Result<(), PushError> {
    let content = std::fs::read(card).map_err(|source| PushError::Io { path: card.to_path_buf(), source })?;
    let body = json!({"content": String::from_utf8_lossy(&content), "repoType": "model"});
    let url = format!("{}/api/validate-yaml", api.endpoint);
    match api.send("validating the model card", &url, Retry::Transient, API_TIMEOUT, NOTHING_COMMITTED, || {
        Ok(api.post_json(&url, &body))
    }) {
        Ok(_) => Ok(()),
        Err(PushError::Server { status: 400, detail, .. }) => {
            Err(PushError::CardMetadata { path: card.to_path_buf(), detail })
        }
        Err(PushError::Server { status: 404, .. }) => {
            tracing::warn!("{} has no card validation (404); the card is not checked before the upload", api.endpoint);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// `path → (lfs, should_ignore)` for every file, from the preupload endpoint.
fn preupload(api: &Api, files: &[LocalFile], revision: &str) -> Result<HashMap<String, (bool, bool)>, PushError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let url = api.api_url(&format!("preupload/{}", encode_path(revision)));
    let mut modes = HashMap::new();
    for chunk in files.chunks(FILES_PER_REQUEST) {
        let body = json!({
            "files": chunk.iter().map(|f| json!({"path": f.rel, "size": f.size, "sample": b64.encode(&f.sample)})).collect::<Vec<_>>(),
        });
        let action = "the preupload request";
        let r = api
            .send(action, &url, Retry::Transient, API_TIMEOUT, NOTHING_COMMITTED, || Ok(api.post_json(&url, &body)))?;
        let answer = api.json(action, r)?;
        let listed = answer.get("files").and_then(Value::as_array).ok_or_else(|| PushError::Protocol {
            action: action.into(),
            repo: api.repo.clone(),
            detail: "no `files` list".into(),
        })?;
        for f in listed {
            let (Some(path), Some(mode)) =
                (f.get("path").and_then(Value::as_str), f.get("uploadMode").and_then(Value::as_str))
            else {
                continue;
            };
            let ignore = f.get("shouldIgnore").and_then(Value::as_bool).unwrap_or(false);
            modes.insert(path.to_string(), (mode == "lfs", ignore));
        }
    }
    Ok(modes)
}

/// An LFS action: where to send, and the headers to send with it.
#[derive(Clone)]
struct LfsAction {
    href: String,
    header: BTreeMap<String, String>,
}

/// Presigned URLs and action headers (which may hold credentials) are not shown.
impl fmt::Debug for LfsAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LfsAction")
            .field("header_keys", &self.header.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Default)]
struct ObjectActions {
    upload: Option<LfsAction>,
    verify: Option<LfsAction>,
}

struct Batch<'a> {
    transfer: String,
    actions: Vec<(&'a LocalFile, ObjectActions)>,
}

fn lfs_batch<'a>(api: &Api, files: &[&'a LocalFile], revision: &str) -> Result<Batch<'a>, PushError> {
    let url = format!("{}/{}.git/info/lfs/objects/batch", api.endpoint, api.repo);
    let body = json!({
        "operation": "upload",
        "transfers": ["basic", "multipart", "xet"],
        "objects": files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
        "hash_algo": "sha256",
        "ref": {"name": revision},
    });
    let action = "the large-file (LFS) batch request";
    let r = api.send(action, &url, Retry::Transient, API_TIMEOUT, NOTHING_COMMITTED, || {
        Ok(api
            .http
            .post(&url)
            .header(AUTHORIZATION, api.auth())
            .header(ACCEPT, LFS_MEDIA_TYPE)
            .header(CONTENT_TYPE, LFS_MEDIA_TYPE)
            .body(body.to_string()))
    })?;
    let answer = api.json(action, r)?;
    let protocol = |detail: String| PushError::Protocol { action: action.into(), repo: api.repo.clone(), detail };
    let transfer = answer.get("transfer").and_then(Value::as_str).unwrap_or("basic").to_string();
    if transfer == "xet" {
        return Ok(Batch { transfer, actions: Vec::new() });
    }
    if transfer != "basic" && transfer != "multipart" {
        return Err(protocol(format!("transfer {transfer:?}, which peftkit cannot send")));
    }
    let objects =
        answer.get("objects").and_then(Value::as_array).ok_or_else(|| protocol("no `objects` list".into()))?;
    let mut actions = Vec::new();
    for file in files {
        let obj = objects
            .iter()
            .find(|o| o.get("oid").and_then(Value::as_str) == Some(file.sha256.as_str()))
            .ok_or_else(|| protocol(format!("no entry for {}", file.rel)))?;
        if let Some(err) = obj.get("error") {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            let msg = err.get("message").and_then(Value::as_str).unwrap_or("no message");
            return Err(protocol(format!("{} was refused (code {code}): {}", file.rel, api.redact(msg))));
        }
        let parse = |name: &str| -> Option<LfsAction> {
            let a = obj.get("actions")?.get(name)?;
            let href = a.get("href")?.as_str()?.to_string();
            let header = a
                .get("header")
                .and_then(Value::as_object)
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            Some(LfsAction { href, header })
        };
        actions.push((*file, ObjectActions { upload: parse("upload"), verify: parse("verify") }));
    }
    Ok(Batch { transfer, actions })
}

/// Sends one LFS object (single PUT, or parts + completion) and verifies it. Returns whether bytes were sent
/// (false when the Hub already had the object).
fn upload_object(
    api: &Api,
    file: &LocalFile,
    actions: &ObjectActions,
    bar: &indicatif::ProgressBar,
) -> Result<bool, PushError> {
    let Some(upload) = &actions.upload else {
        tracing::info!("{}: already stored on the Hub, not sent again", file.rel);
        return Ok(false);
    };
    let hint = NOTHING_COMMITTED;
    if let Some(chunk) = upload.header.get("chunk_size") {
        let chunk: u64 = chunk.trim().parse().ok().filter(|&c| c > 0).ok_or_else(|| PushError::Protocol {
            action: "the multipart upload".into(),
            repo: api.repo.clone(),
            detail: format!("chunk_size {chunk:?} is not a positive number"),
        })?;
        let mut parts: Vec<(u64, &String)> =
            upload.header.iter().filter_map(|(k, v)| k.parse::<u64>().ok().map(|n| (n, v))).collect();
        parts.sort();
        let expected = file.size.div_ceil(chunk);
        if parts.len() as u64 != expected {
            return Err(PushError::Protocol {
                action: "the multipart upload".into(),
                repo: api.repo.clone(),
                detail: format!(
                    "{} parts offered for {}, which needs {expected} of {chunk} bytes",
                    parts.len(),
                    file.rel
                ),
            });
        }
        let mut etags = Vec::new();
        for (i, (_, url)) in parts.iter().enumerate() {
            let offset = i as u64 * chunk;
            let len = chunk.min(file.size - offset);
            let action = format!("uploading part {} of {} of {}", i + 1, parts.len(), file.rel);
            let start = bar.position();
            let r = api.send(&action, url, Retry::Transient, upload_timeout(len), hint, || {
                bar.set_position(start);
                let reader = open_at(file, offset)?.take(len);
                Ok(api.http.put(url.as_str()).body(Body::sized(Progress(reader, bar.clone()), len)))
            })?;
            let etag = r.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
            let etag = etag.ok_or_else(|| PushError::Protocol {
                action: action.clone(),
                repo: api.repo.clone(),
                detail: "the storage answer has no ETag".into(),
            })?;
            etags.push(json!({"partNumber": i + 1, "etag": etag}));
        }
        let body = json!({"oid": file.sha256, "parts": etags});
        let action = format!("completing the multipart upload of {}", file.rel);
        api.send(&action, &upload.href, Retry::Transient, API_TIMEOUT, hint, || {
            let mut req =
                api.http.post(&upload.href).header(ACCEPT, LFS_MEDIA_TYPE).header(CONTENT_TYPE, LFS_MEDIA_TYPE);
            if api.is_hub_url(&upload.href) {
                req = req.header(AUTHORIZATION, api.auth());
            }
            Ok(req.body(body.to_string()))
        })?;
    } else {
        let action = format!("uploading {}", file.rel);
        let start = bar.position();
        api.send(&action, &upload.href, Retry::Transient, upload_timeout(file.size), hint, || {
            bar.set_position(start);
            let reader = open_at(file, 0)?;
            let req = api.http.put(&upload.href).headers(action_headers(&upload.header));
            Ok(req.body(Body::sized(Progress(reader, bar.clone()), file.size)))
        })?;
    }
    if let Some(verify) = &actions.verify {
        let body = json!({"oid": file.sha256, "size": file.size});
        let action = format!("verifying the upload of {}", file.rel);
        api.send(&action, &verify.href, Retry::Transient, API_TIMEOUT, hint, || {
            let own = action_headers(&verify.header);
            // The action's own Authorization (the Hub sends one) is used as given; else the token, to the Hub only.
            let has_auth = own.contains_key(AUTHORIZATION);
            let mut req = api.http.post(&verify.href).headers(own);
            if !has_auth && api.is_hub_url(&verify.href) {
                req = req.header(AUTHORIZATION, api.auth());
            }
            Ok(req.header(ACCEPT, LFS_MEDIA_TYPE).header(CONTENT_TYPE, LFS_MEDIA_TYPE).body(body.to_string()))
        })?;
    }
    tracing::info!("{}: uploaded ({} bytes)", file.rel, file.size);
    Ok(true)
}

/// The action's own headers (never an Authorization the server did not ask for; never `chunk_size` or part URLs).
fn action_headers(header: &BTreeMap<String, String>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in header {
        if k == "chunk_size" || k.parse::<u64>().is_ok() {
            continue;
        }
        if let (Ok(name), Ok(mut value)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            value.set_sensitive(true);
            map.insert(name, value);
        }
    }
    map
}

fn open_at(file: &LocalFile, offset: u64) -> Result<std::fs::File, PushError> {
    let io = |source| PushError::Io { path: file.path.clone(), source };
    let mut f = std::fs::File::open(&file.path).map_err(io)?;
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    Ok(f)
}

/// A reader that advances a progress bar.
struct Progress<R>(R, indicatif::ProgressBar);

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.inc(n as u64);
        Ok(n)
    }
}

fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show || total == 0 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "uploading {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// The commit: NDJSON header, `lfsFile` lines for large files, inline base64 `file` lines for the rest.
fn commit(api: &Api, files: &[(&LocalFile, bool)], revision: &str, message: &str) -> Result<Value, PushError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut body = Vec::new();
    let mut line = |v: Value| {
        body.extend_from_slice(v.to_string().as_bytes());
        body.push(b'\n');
    };
    line(json!({"key": "header", "value": {"summary": message, "description": commit_description()}}));
    for (f, lfs) in files {
        if *lfs {
            line(
                json!({"key": "lfsFile", "value": {"path": f.rel, "algo": "sha256", "oid": f.sha256, "size": f.size}}),
            );
        } else {
            let bytes = std::fs::read(&f.path).map_err(|source| PushError::Io { path: f.path.clone(), source })?;
            if format!("{:x}", Sha256::digest(&bytes)) != f.sha256 {
                return Err(PushError::Changed { path: f.path.clone() });
            }
            line(json!({"key": "file", "value": {"path": f.rel, "encoding": "base64", "content": b64.encode(&bytes)}}));
        }
    }
    let url = api.api_url(&format!("commit/{}", encode_path(revision)));
    let action = "the commit";
    let timeout = upload_timeout(body.len() as u64);
    let r = api.send(action, &url, Retry::Never, timeout, COMMIT_NOT_RETRIED, || {
        Ok(api
            .http
            .post(&url)
            .header(AUTHORIZATION, api.auth())
            .header(CONTENT_TYPE, "application/x-ndjson")
            .body(body.clone()))
    })?;
    api.json(action, r)
}

/// Percent-encodes a branch name for a URL path segment (`/` included, as the Hub expects).
fn encode_path(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names() {
        for n in [".adapter_model.safetensors.tmp-1234", "x.tmp", "model.part", "a.incomplete", "b.lock"] {
            assert!(is_temporary_name(n), "{n}");
        }
        for n in ["adapter_model.safetensors", "README.md", "tmp.json", "metrics.jsonl"] {
            assert!(!is_temporary_name(n), "{n}");
        }
    }

    #[test]
    fn safetensors_length_reads_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let t = candle_core::Tensor::zeros((3, 5), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("w".to_string(), t)]), &p).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(safetensors_length(&p).unwrap(), len);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        assert_eq!(safetensors_length(&p).unwrap(), len);
        std::fs::write(&p, &bytes[..6]).unwrap();
        assert!(safetensors_length(&p).is_err());
    }

    #[test]
    fn branch_names_are_encoded() {
        assert_eq!(encode_path("main"), "main");
        assert_eq!(encode_path("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_path("v1.0 x"), "v1.0%20x");
    }

    #[test]
    fn urls() {
        assert_eq!(repo_url("https://huggingface.co", "a/b", "main"), "https://huggingface.co/a/b");
        assert_eq!(repo_url("https://huggingface.co", "a/b", "dev"), "https://huggingface.co/a/b/tree/dev");
    }

    #[test]
    fn refusals_name_the_fix_and_never_the_token() {
        let e =
            PushError::Refused { status: 401, action: "the commit".into(), repo: "a/b".into(), detail: "bad".into() };
        let msg = e.to_string();
        assert!(msg.contains("401") && msg.contains("HF_TOKEN") && msg.contains("a/b"), "{msg}");
        let e =
            PushError::Refused { status: 403, action: "the commit".into(), repo: "a/b".into(), detail: String::new() };
        assert!(e.to_string().contains("write"), "{e}");
        assert!(e.is_user_error());
    }
}
