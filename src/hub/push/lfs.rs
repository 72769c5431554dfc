//! Large files through the Git LFS batch API (`POST /{repo}.git/info/lfs/objects/batch`): the Hub picks the
//! transfer, `basic` (one `PUT` to a presigned URL) or `multipart` (one `PUT` per part, then the parts' ETags
//! `POST`ed to the action's URL), or `xet` (handed to hf-hub by the caller). Objects the Hub already stores are
//! not sent again; the `verify` action confirms each upload. Presigned URLs and action headers stay out of
//! errors and logs.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};

use reqwest::blocking::Body;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};

use super::api::{upload_timeout, Api, Retry, API_TIMEOUT};
use super::folder::LocalFile;
use super::{PushError, NOTHING_COMMITTED};

const LFS_MEDIA_TYPE: &str = "application/vnd.git-lfs+json";

/// An LFS action: where to send, and the headers to send with it.
#[derive(Clone)]
pub(super) struct LfsAction {
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
pub(super) struct ObjectActions {
    pub(super) upload: Option<LfsAction>,
    pub(super) verify: Option<LfsAction>,
}

pub(super) struct Batch<'a> {
    pub(super) transfer: String,
    pub(super) actions: Vec<(&'a LocalFile, ObjectActions)>,
}

pub(super) fn lfs_batch<'a>(api: &Api, files: &[&'a LocalFile], revision: &str) -> Result<Batch<'a>, PushError> {
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
pub(super) fn upload_object(
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

pub(super) fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
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
