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
//!
//! Files: this one holds the options, the report, the errors and [`push`] itself; `folder` lists and checks the
//! folder, `api` sends the Hub's HTTP calls (retries, timeouts, token-free errors), `commit` makes the
//! card check, the preupload call and the commit, and `lfs` the large-file batch call and uploads.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::blocking::Client;
use serde_json::Value;

use crate::hub::{self, error_chain, HubOptions, UpstreamError};

mod api;
mod commit;
mod folder;
mod lfs;

use api::Api;
use commit::{commit, commit_description, commit_message, preupload, validate_card};
use folder::{recheck, scan_folder, LocalFile};
use lfs::{lfs_batch, progress_bar, upload_object};

/// The model card every pushed folder must have.
pub const MODEL_CARD: &str = "README.md";
/// Top-level folders that are never pushed: training resume state and VCS/cache folders.
pub const SKIPPED_DIRS: &[&str] = &["checkpoints", ".git", ".cache"];
/// The Hub's default endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Tries per request that is safe to repeat (the first one included).
pub const MAX_ATTEMPTS: usize = 3;
/// Files per preupload / LFS batch request (as `huggingface_hub` chunks them).
const FILES_PER_REQUEST: usize = 256;

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
    #[error("{0}")]
    BadEndpoint(String),
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
            | PushError::BadEndpoint(_)
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
    if let Some(problem) = opts.hub.endpoint.as_deref().and_then(hub::options::endpoint_problem) {
        return Err(PushError::BadEndpoint(problem));
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

#[cfg(test)]
mod tests {
    use super::*;

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
