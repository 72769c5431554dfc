//! The online fetcher: downloads through hf-hub 1.0 (`HFRepositorySync::download_file`) into the shared cache,
//! turns hf-hub's errors into [`HubError`]s, checks freshly downloaded LFS blobs against their sha256 ETag, and
//! shows a progress bar per file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hf_hub::progress::{DownloadEvent, Progress, ProgressEvent, ProgressHandler};
use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use indicatif::{ProgressBar, ProgressStyle};

use super::cache::repo_folder;
use super::resolve::{describe_other_weights, Fetched, Fetcher};
use super::{
    is_commit_sha, is_safe_relative, HubError, HubOptions, UpstreamError, CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE,
};

// ---------------------------------------------------------------------------------------------
// Online: hf-hub 1.0
// ---------------------------------------------------------------------------------------------

pub(super) struct OnlineFetcher {
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
    pub(super) fn new(repo: &str, _revision: &str, cache_dir: &Path, opts: &HubOptions) -> Result<Self, HubError> {
        let token = opts.token.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(str::to_string);
        let mut builder = hf_hub::HFClient::builder().cache_dir(cache_dir);
        if let Some(t) = &token {
            builder = builder.token(t.as_str());
        }
        let endpoint = opts.endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty());
        if let Some(problem) = endpoint.and_then(super::options::endpoint_problem) {
            return Err(HubError::BadEndpoint(problem));
        }
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
        let actual = crate::fsutil::sha256_file(&blob).map_err(|source| HubError::Io { path: blob.clone(), source })?;
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
