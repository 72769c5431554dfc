//! Resolving a base model to local files: [`resolve_model`] (a local folder as is, or a Hub repo through the
//! cache) and [`resolve_repo_file`] (one file of a Hub repo). The Hub logic is written once over a [`Fetcher`]:
//! the offline one reads the cache layout (`cache`), the online one downloads through hf-hub (`download`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::cache::{commit_of_snapshot_file, CacheFetcher};
use super::download::OnlineFetcher;
use super::options::expand_tilde_with;
use super::{
    is_safe_relative, looks_like_path, valid_repo_id, valid_revision, HubError, HubOptions, ModelFiles, ModelSource,
    CHAT_TEMPLATE_FILE, CONFIG_FILE, DEFAULT_REVISION, GENERATION_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE,
};

/// Weight formats other than safetensors, listed (never downloaded) when a repo has no safetensors.
const OTHER_WEIGHT_SUFFIXES: &[&str] =
    &[".bin", ".pth", ".pt", ".ckpt", ".gguf", ".onnx", ".onnx_data", ".h5", ".msgpack", ".ot", ".tflite"];

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

pub(super) fn list_dir_files(dir: &Path) -> Vec<String> {
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
pub(super) fn describe_other_weights(names: impl IntoIterator<Item = String>) -> String {
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
pub(super) enum Fetched {
    /// Here it is.
    Found(PathBuf),
    /// The file does not exist at this revision.
    Absent,
}

pub(super) trait Fetcher {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::cache::repo_folder;
    use sha2::{Digest, Sha256};
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
}
