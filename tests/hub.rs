//! `peftkit::hub::resolve_model` against a loopback stand-in for the Hugging Face Hub.
//!
//! The server (`common::loopback`: 127.0.0.1:0, one thread per connection, stopped when the test drops
//! it) answers the endpoints hf-hub 1.0 uses:
//! `HEAD`/`GET {endpoint}/{repo}/resolve/{revision}/{file}` (with `X-Repo-Commit`, `ETag`,
//! `Content-Length`), `GET /api/models/{repo}` (exists), `GET /api/models/{repo}/revision/{rev}`
//! (revision exists) and `GET /api/models/{repo}/tree/{rev}` (listing). It records every request so
//! the tests can check where the token went.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;

use common::loopback::{Loopback, Reply, Request};
use peftkit::hub::{resolve_model, HubError, HubOptions, ModelSource};
use sha2::{Digest, Sha256};

const TOKEN: &str = "hf_PeftkitTestToken0123456789abcdef";
const COMMIT: &str = "1111111111222222222233333333334444444444";
const TINY: &str = "peftkit-test/tiny-llama";
const SHARDED: &str = "peftkit-test/tiny-llama-sharded";
const PICKLE: &str = "peftkit-test/pickle-only";
const GATED: &str = "peftkit-test/gated";
/// HEAD of model.safetensors succeeds, its GET answers 403 (an expired CDN link, say).
const BROKEN_CDN: &str = "peftkit-test/broken-cdn";
const FIXTURE_FILES: &[&str] = common::TINY_LLAMA_FILES;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join(name)).expect("read fixture")
}

/// What the fake Hub holds: repo → files (name → bytes). `GATED` answers 401 to everything.
type Repos = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

fn etag(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn route(repos: &Repos, req: &Request) -> Reply {
    let path = req.target.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/models/{owner}/{name}[/revision/{rev} | /tree/{rev}]
    let (repo, rest, is_api) = if parts.len() >= 4 && parts[0] == "api" && parts[1] == "models" {
        (format!("{}/{}", parts[2], parts[3]), &parts[4..], true)
    } else if parts.len() >= 2 {
        (format!("{}/{}", parts[0], parts[1]), &parts[2..], false)
    } else {
        return Reply::error(404, "RepoNotFound", "not found");
    };
    if repo == GATED {
        return Reply::error(
            401,
            "GatedRepo",
            "Access to model peftkit-test/gated is restricted. You must have access to it and be authenticated to access it. Please log in.",
        );
    }
    let Some(files) = repos.get(&repo) else {
        return Reply::error(404, "RepoNotFound", "Repository not found");
    };
    let rev_ok = |rev: &str| rev == "main" || rev == COMMIT;
    if is_api {
        return match rest {
            [] => Reply::new(200).json(serde_json::json!({ "id": repo, "sha": COMMIT })),
            ["revision", rev] if rev_ok(rev) => {
                Reply::new(200).json(serde_json::json!({ "id": repo, "sha": COMMIT }))
            }
            ["tree", rev] if rev_ok(rev) => Reply::new(200).json(serde_json::Value::Array(
                files
                    .iter()
                    .map(|(name, bytes)| {
                        serde_json::json!({"type": "file", "oid": etag(bytes), "size": bytes.len(), "path": name})
                    })
                    .collect(),
            )),
            _ => Reply::error(404, "RevisionNotFound", "Invalid rev id"),
        };
    }
    match rest {
        ["resolve", rev, file @ ..] if rev_ok(rev) => {
            let file = file.join("/");
            if repo == BROKEN_CDN && req.method == "GET" && file == "model.safetensors" {
                return Reply::error(403, "Forbidden", "Request has expired");
            }
            match files.get(&file) {
                Some(bytes) => {
                    let mut r = Reply::new(200)
                        .header("X-Repo-Commit", COMMIT)
                        .header("ETag", format!("\"{}\"", etag(bytes)))
                        .header("Content-Type", "application/octet-stream");
                    r.body = bytes.clone();
                    r
                }
                None => Reply::error(404, "EntryNotFound", "Entry not found").header("X-Repo-Commit", COMMIT),
            }
        }
        ["resolve", ..] => Reply::error(404, "RevisionNotFound", "Invalid rev id"),
        _ => Reply::error(404, "RepoNotFound", "Repository not found"),
    }
}

/// The fake Hub: a loopback server answering from `repos`.
struct FakeHub;

impl FakeHub {
    fn start(repos: Repos) -> Loopback {
        Loopback::start(move |req| route(&repos, req))
    }
}

fn repos() -> Repos {
    let mut repos = Repos::new();
    let tiny: BTreeMap<String, Vec<u8>> = FIXTURE_FILES.iter().map(|f| (f.to_string(), fixture(f))).collect();
    repos.insert(TINY.to_string(), tiny.clone());
    repos.insert(BROKEN_CDN.to_string(), tiny.clone());

    let mut sharded = tiny.clone();
    sharded.remove("model.safetensors");
    let index = serde_json::json!({"weight_map": {
        "a": "model-00002-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"
    }});
    sharded.insert("model.safetensors.index.json".into(), index.to_string().into_bytes());
    sharded.insert("model-00001-of-00002.safetensors".into(), b"first shard".to_vec());
    sharded.insert("model-00002-of-00002.safetensors".into(), b"second shard".to_vec());
    repos.insert(SHARDED.to_string(), sharded);

    let mut pickle = BTreeMap::new();
    pickle.insert("config.json".to_string(), fixture("config.json"));
    pickle.insert("pytorch_model.bin".to_string(), b"pickled weights".to_vec());
    pickle.insert("model.gguf".to_string(), b"gguf weights".to_vec());
    repos.insert(PICKLE.to_string(), pickle);
    repos
}

fn online(hub: &Loopback, cache: &Path, token: Option<&str>) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        token: token.map(str::to_string),
        offline: false,
        endpoint: Some(hub.endpoint()),
        progress: true,
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).expect("meta");
            if meta.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn downloads_into_the_hf_cache_then_works_offline() {
    let hub = FakeHub::start(repos());
    let cache = tempfile::tempdir().expect("tmp");
    let files = resolve_model(TINY, None, &online(&hub, cache.path(), Some(TOKEN))).expect("online resolve");

    // Every file arrives, byte for byte.
    let repo_dir = cache.path().join("models--peftkit-test--tiny-llama");
    let snap = repo_dir.join("snapshots").join(COMMIT);
    assert_eq!(
        files.source,
        ModelSource::Hub { repo: TINY.into(), revision: "main".into(), commit: Some(COMMIT.into()) }
    );
    assert_eq!(files.dir, snap);
    let pairs = [
        (Some(files.config.clone()), "config.json"),
        (files.weights.first().cloned(), "model.safetensors"),
        (files.tokenizer.clone(), "tokenizer.json"),
        (files.tokenizer_config.clone(), "tokenizer_config.json"),
        (files.chat_template.clone(), "chat_template.jinja"),
        (files.generation_config.clone(), "generation_config.json"),
    ];
    for (path, name) in pairs {
        let path = path.unwrap_or_else(|| panic!("{name} not resolved"));
        assert_eq!(path, snap.join(name));
        assert_eq!(std::fs::read(&path).expect("read"), fixture(name), "{name} differs");
    }
    assert_eq!(files.weights.len(), 1);
    assert_eq!(files.special_tokens_map, None);

    // The cache has the huggingface_hub layout.
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).expect("ref").trim(), COMMIT);
    for name in FIXTURE_FILES {
        let blob = repo_dir.join("blobs").join(etag(&fixture(name)));
        assert!(blob.is_file(), "blob of {name}");
        #[cfg(unix)]
        {
            let link = std::fs::read_link(snap.join(name)).expect("snapshot entry is a symlink");
            assert_eq!(link, Path::new("../../blobs").join(etag(&fixture(name))));
        }
    }
    assert!(repo_dir.join(".no_exist").join(COMMIT).join("special_tokens_map.json").exists());

    // The token went out only as a Bearer header, on every request, and nowhere else.
    let reqs = hub.requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(r.header("authorization"), Some(format!("Bearer {TOKEN}").as_str()), "{r:?}");
        assert!(!r.target.contains(TOKEN), "token in the URL: {}", r.target);
        for (k, v) in &r.headers {
            assert!(k == "authorization" || !v.contains(TOKEN), "token in header {k}");
        }
    }
    // Only the needed files were asked for.
    for r in &reqs {
        assert!(!r.target.ends_with(".bin") && !r.target.contains("gguf"), "{}", r.target);
    }
    // …and it is in no file of the cache.
    for f in files_under(cache.path()) {
        if let Ok(bytes) = std::fs::read(&f) {
            assert!(!bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()), "token in {}", f.display());
        }
    }

    // Offline, from the cache alone: same answer, no request.
    let before = hub.requests().len();
    let offline = HubOptions { offline: true, endpoint: None, token: None, ..online(&hub, cache.path(), None) };
    let again = resolve_model(TINY, None, &offline).expect("offline resolve");
    assert_eq!(again, files);
    let by_sha = resolve_model(TINY, Some(COMMIT), &offline).expect("offline by sha");
    assert_eq!(by_sha.weights, files.weights);
    assert_eq!(hub.requests().len(), before);

    // Online again with a warm cache: one HEAD for config.json (revision main), nothing downloaded.
    let warm = resolve_model(TINY, None, &online(&hub, cache.path(), Some(TOKEN))).expect("warm resolve");
    assert_eq!(warm, files);
    let new: Vec<Request> = hub.requests().into_iter().skip(before).collect();
    assert!(new.iter().all(|r| r.method == "HEAD"), "{new:?}");
    assert_eq!(new.len(), 1, "{new:?}");
}

#[test]
fn sharded_repo_fetches_the_index_and_its_shards() {
    let hub = FakeHub::start(repos());
    let cache = tempfile::tempdir().expect("tmp");
    let files = resolve_model(SHARDED, Some("main"), &online(&hub, cache.path(), Some(TOKEN))).expect("resolve");
    let snap = cache.path().join("models--peftkit-test--tiny-llama-sharded/snapshots").join(COMMIT);
    assert_eq!(
        files.weights,
        vec![snap.join("model-00001-of-00002.safetensors"), snap.join("model-00002-of-00002.safetensors")]
    );
    assert_eq!(std::fs::read(&files.weights[0]).expect("read"), b"first shard");
    assert_eq!(std::fs::read(&files.weights[1]).expect("read"), b"second shard");
    // Offline works too (no model.safetensors marker needed: hf-hub wrote one on the 404 anyway).
    let offline = HubOptions { offline: true, ..online(&hub, cache.path(), None) };
    assert_eq!(resolve_model(SHARDED, None, &offline).expect("offline").weights, files.weights);
}

#[test]
fn repo_without_safetensors_is_refused_without_downloading_other_formats() {
    let hub = FakeHub::start(repos());
    let cache = tempfile::tempdir().expect("tmp");
    let err = resolve_model(PICKLE, None, &online(&hub, cache.path(), Some(TOKEN))).expect_err("no safetensors");
    match &err {
        HubError::NoSafetensors { repo, found } => {
            assert_eq!(repo, PICKLE);
            assert!(found.contains("pytorch_model.bin") && found.contains("model.gguf"), "{found}");
        }
        other => panic!("expected NoSafetensors, got {other:?}"),
    }
    assert!(err.to_string().contains("only safetensors weights are supported"), "{err}");
    for r in hub.requests() {
        assert!(!r.target.contains("pytorch_model.bin") && !r.target.contains("model.gguf"), "{}", r.target);
    }
}

#[test]
fn unknown_repo_is_repo_not_found() {
    let hub = FakeHub::start(repos());
    let cache = tempfile::tempdir().expect("tmp");
    let err =
        resolve_model("peftkit-test/does-not-exist", None, &online(&hub, cache.path(), Some(TOKEN))).expect_err("404");
    match &err {
        HubError::RepoNotFound { repo } => assert_eq!(repo, "peftkit-test/does-not-exist"),
        other => panic!("expected RepoNotFound, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("not found on the Hub") && msg.contains("HF_TOKEN"), "{msg}");
}

#[test]
fn unknown_revision_is_revision_not_found() {
    let hub = FakeHub::start(repos());
    let cache = tempfile::tempdir().expect("tmp");
    match resolve_model(TINY, Some("no-such-branch"), &online(&hub, cache.path(), Some(TOKEN))) {
        Err(HubError::RevisionNotFound { repo, revision }) => {
            assert_eq!(repo, TINY);
            assert_eq!(revision, "no-such-branch");
        }
        other => panic!("expected RevisionNotFound, got {other:?}"),
    }
}

#[test]
fn unauthorized_is_gated_and_never_shows_the_token() {
    let hub = FakeHub::start(repos());
    let cache = tempfile::tempdir().expect("tmp");
    let err = resolve_model(GATED, None, &online(&hub, cache.path(), Some(TOKEN))).expect_err("401");
    match &err {
        HubError::Gated { repo, status, token_sent } => {
            assert_eq!(repo, GATED);
            assert_eq!(*status, 401);
            assert!(*token_sent);
        }
        other => panic!("expected Gated, got {other:?}"),
    }
    let display = err.to_string();
    let debug = format!("{err:?}");
    assert!(display.contains("HF_TOKEN") && display.contains("huggingface-cli login"), "{display}");
    assert!(!display.contains(TOKEN) && !debug.contains(TOKEN), "token leaked: {display} / {debug}");
    let mut chain = std::error::Error::source(&err);
    while let Some(cause) = chain {
        assert!(!cause.to_string().contains(TOKEN));
        chain = cause.source();
    }
}

#[test]
fn unreachable_endpoint_is_a_network_error() {
    // Bind then free a port: connections to it are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let cache = tempfile::tempdir().expect("tmp");
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        token: Some(TOKEN.into()),
        offline: false,
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        progress: false,
    };
    let err = resolve_model(TINY, None, &opts).expect_err("refused");
    match &err {
        HubError::Network { repo, file, source } => {
            assert_eq!(repo, TINY);
            assert_eq!(file, "config.json");
            assert!(!source.to_string().contains(TOKEN));
        }
        other => panic!("expected Network, got {other:?}"),
    }
    assert!(!format!("{err:?}").contains(TOKEN));
}

#[test]
fn an_error_page_in_place_of_weights_is_caught_and_removed() {
    let hub = FakeHub::start(repos());
    let cache = tempfile::tempdir().expect("tmp");
    let err = resolve_model(BROKEN_CDN, None, &online(&hub, cache.path(), Some(TOKEN))).expect_err("corrupt");
    let want = etag(&fixture("model.safetensors"));
    match &err {
        HubError::Corrupted { repo, file, expected, actual } => {
            assert_eq!((repo.as_str(), file.as_str()), (BROKEN_CDN, "model.safetensors"));
            assert_eq!(expected, &want);
            assert_ne!(actual, &want);
        }
        other => panic!("expected Corrupted, got {other:?}"),
    }
    let repo_dir = cache.path().join("models--peftkit-test--broken-cdn");
    assert!(!repo_dir.join("blobs").join(&want).exists(), "bad blob kept");
    let pointer = repo_dir.join("snapshots").join(COMMIT).join("model.safetensors");
    assert!(std::fs::symlink_metadata(pointer).is_err(), "bad snapshot entry kept");
    // The config and tokenizer files (fine) stay cached.
    assert!(repo_dir.join("snapshots").join(COMMIT).join("config.json").is_file());
}
