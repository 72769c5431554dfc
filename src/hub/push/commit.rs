//! The commit side of a push: the model card check (`POST /api/validate-yaml`), the preupload call that says
//! which files go through LFS, the commit message, and the commit itself: one NDJSON body with `lfsFile` lines
//! for the large files and inline base64 `file` lines for the rest, never retried.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};

use super::api::{upload_timeout, Api, Retry, API_TIMEOUT};
use super::folder::LocalFile;
use super::{PushError, PushOptions, COMMIT_NOT_RETRIED, FILES_PER_REQUEST, NOTHING_COMMITTED};

/// The default commit message says what the folder holds.
pub(super) fn commit_message(opts: &PushOptions, files: &[LocalFile]) -> String {
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

pub(super) fn commit_description() -> String {
    format!("Pushed with peftkit {}.", env!("CARGO_PKG_VERSION"))
}

/// Asks the Hub whether the card's front matter is valid (`POST /api/validate-yaml`): 400 means it is not, and the
/// commit would be refused after the upload. An endpoint without this call (404: some mirrors) is not an error.
pub(super) fn validate_card(api: &Api, card: &Path) -> Result<(), PushError> {
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
pub(super) fn preupload(
    api: &Api,
    files: &[LocalFile],
    revision: &str,
) -> Result<HashMap<String, (bool, bool)>, PushError> {
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

/// The commit: NDJSON header, `lfsFile` lines for large files, inline base64 `file` lines for the rest.
pub(super) fn commit(
    api: &Api,
    files: &[(&LocalFile, bool)],
    revision: &str,
    message: &str,
) -> Result<Value, PushError> {
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
            if crate::fsutil::sha256_hex(&bytes) != f.sha256 {
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
    fn branch_names_are_encoded() {
        assert_eq!(encode_path("main"), "main");
        assert_eq!(encode_path("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_path("v1.0 x"), "v1.0%20x");
    }
}
