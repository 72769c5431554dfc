//! The Hub cache layout that Python's `huggingface_hub` writes (`models--{owner}--{name}/` with `blobs/`,
//! `refs/`, `snapshots/` and `.no_exist/`; see the `hub` module docs), and the offline fetcher that reads it
//! directly and never touches the network (`HF_HUB_OFFLINE`).

use std::path::{Path, PathBuf};

use super::resolve::{describe_other_weights, list_dir_files, Fetched, Fetcher};
use super::{is_commit_sha, HubError, CONFIG_FILE};

/// `models--owner--name`, the repo's folder in the cache.
pub(super) fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// The commit sha of `…/snapshots/<commit>/<file>`.
pub(super) fn commit_of_snapshot_file(path: &Path, file: &str) -> Option<String> {
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

pub(super) struct CacheFetcher {
    repo: String,
    revision: String,
    repo_dir: PathBuf,
}

impl CacheFetcher {
    pub(super) fn new(repo: &str, revision: &str, cache_dir: &Path) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn commit_from_snapshot_paths() {
        let p = Path::new("/c/models--a--b/snapshots").join(SHA).join("config.json");
        assert_eq!(commit_of_snapshot_file(&p, "config.json"), Some(SHA.to_string()));
        assert_eq!(commit_of_snapshot_file(Path::new("/x/y/config.json"), "config.json"), None);
    }
}
