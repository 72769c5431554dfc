//! Why a base model could not be resolved ([`HubError`]), errors from the Hub client kept as token-free text
//! ([`UpstreamError`]), and the redaction that keeps tokens out of every message.

use std::fmt;
use std::path::PathBuf;

use hf_hub::HFError;

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
    /// `HF_ENDPOINT` is not an http(s) URL (the message names the variable and the value).
    #[error("{0}")]
    BadEndpoint(String),
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
    pub(super) message: String,
    pub(super) status: Option<u16>,
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

#[cfg(test)]
mod tests {
    use super::*;

    const REPO: &str = "peftkit-test/tiny-llama";

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
}
