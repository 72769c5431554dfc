//! `peftkit push` (and `train` with `output.hub_model_id`) against a loopback stand-in for the Hugging Face Hub.
//!
//! The fake Hub answers the calls a push makes, as the Hub does for a repo without Xet storage:
//! `GET /api/whoami-v2`, `POST /api/repos/create` (409 when the repo exists), `POST /api/models/{repo}/branch/{b}`,
//! `POST /api/models/{repo}/preupload/{rev}` (`lfs` for safetensors/binary files), the Git LFS batch API
//! `POST /{repo}.git/info/lfs/objects/batch` (transfer `basic`, or `multipart` with per-part URLs above a chunk
//! size), presigned storage URLs on *another origin* (`http://localhost:PORT/s3/…`, as S3 is for the real Hub),
//! the LFS `verify` action, and `POST /api/models/{repo}/commit/{rev}` (NDJSON). It keeps the repos' files and
//! commits, and records every request, so the tests check that files arrive intact (sha256), that a push is one
//! commit, where the token went, and how failures (401/403/5xx) are reported and retried.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fakehub::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn bin(hub: &FakeHub, home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    c.env("HF_ENDPOINT", hub.endpoint())
        .env("HF_TOKEN", TOKEN)
        .env("HF_HOME", home)
        .env("NO_COLOR", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY");
    c
}

/// `peftkit push DIR ARGS…` against the fake Hub, with the test token.
fn push(hub: &FakeHub, home: &Path, dir: &Path, args: &[&str]) -> Output {
    bin(hub, home).arg("push").arg(dir).args(args).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

/// A fake Hub, a temporary home, and an adapter folder in it.
fn setup() -> (FakeHub, tempfile::TempDir, PathBuf) {
    let d = tmp();
    let dir = adapter_folder(d.path());
    (FakeHub::start(), d, dir)
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A PEFT LoRA adapter folder (from the fixture) with a model card and a metrics log.
fn adapter_folder(root: &Path) -> PathBuf {
    let src = common::fixture("tiny-llama/peft-lora");
    let dir = root.join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    assert!(dir.join("adapter_model.safetensors").is_file() && dir.join("adapter_config.json").is_file());
    std::fs::write(dir.join("README.md"), "---\nlibrary_name: peft\n---\n# A test adapter\n").unwrap();
    std::fs::write(dir.join("metrics.jsonl"), "{\"step\":1,\"loss\":2.5}\n").unwrap();
    dir
}

/// A safetensors file of `n` f32 values (random-looking bytes), `4n + header` bytes long.
fn write_safetensors(path: &Path, n: usize) {
    let data: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.618).sin()).collect();
    let t = candle_core::Tensor::from_vec(data, n, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("w".to_string(), t)]), path).unwrap();
}

/// Every file under `dir` by `/`-path, as the repo should hold them.
fn local_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn assert_same_files(remote: &BTreeMap<String, Vec<u8>>, local: &BTreeMap<String, Vec<u8>>) {
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(remote), names(local));
    for (name, bytes) in local {
        assert_eq!(sha256(&remote[name]), sha256(bytes), "{name} differs");
    }
}

/// The token appears in no URL, no body and no header other than `Authorization`, and `Authorization` is only
/// ever sent to the Hub endpoint (never to presigned storage URLs), and never in the output.
fn assert_token_only_in_authorization(hub: &FakeHub, output: &Output) {
    for r in hub.requests() {
        assert!(!r.target.contains(TOKEN), "token in a URL: {}", r.target);
        assert!(!String::from_utf8_lossy(&r.body).contains(TOKEN), "token in the body of {} {}", r.method, r.target);
        for (k, v) in &r.headers {
            if k != "authorization" {
                assert!(!v.contains(TOKEN), "token in header {k} of {}", r.target);
            }
        }
        if r.path().starts_with("/s3/") {
            assert!(r.header("authorization").is_none(), "Authorization sent to storage: {} {}", r.method, r.target);
            assert_eq!(r.header("host").map(|h| h.starts_with("localhost")), Some(true));
        }
    }
    let (out, err) = text(output);
    assert!(!out.contains(TOKEN) && !err.contains(TOKEN), "token printed");
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn push_creates_the_repo_and_commits_every_file_once() {
    let (hub, d, dir) = setup();
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/tiny-lora", "--private"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains(&format!("{}/alice/tiny-lora", hub.endpoint())), "{out}");
    assert!(out.contains("(new repo)"), "{out}");

    assert_same_files(&hub.files("alice/tiny-lora", "main"), &local_files(&dir));
    assert_eq!(hub.commits("alice/tiny-lora"), 1);
    assert!(hub.state.lock().unwrap().repos["alice/tiny-lora"].private);
    assert_eq!(hub.count("POST", "/commit/main"), 1);
    // The safetensors went through LFS (one PUT to storage, verified), the rest inline in the commit.
    assert_eq!(hub.count("PUT", "/s3/upload/"), 1);
    assert_eq!(hub.count("POST", "/objects/verify"), 1);
    let commit = hub.requests().into_iter().find(|r| r.path().ends_with("/commit/main")).unwrap();
    let body = String::from_utf8_lossy(&commit.body).to_string();
    assert!(body.contains("\"lfsFile\"") && body.contains("adapter_model.safetensors"), "{body}");
    assert!(body.contains("Upload adapter trained with peftkit"), "{body}");
    assert_token_only_in_authorization(&hub, &o);

    // Pushing again: the LFS object is already stored, so nothing large is sent; one more commit.
    let o = bin(&hub, d.path())
        .args(["push"])
        .arg(&dir)
        .args(["--repo", "alice/tiny-lora", "--message", "again"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(hub.count("PUT", "/s3/upload/"), 1);
    assert_eq!(hub.commits("alice/tiny-lora"), 2);
    assert!(!text(&o).0.contains("(new repo)"));
}

#[test]
fn large_files_go_multipart_and_arrive_intact() {
    let hub = FakeHub::start();
    hub.state.lock().unwrap().multipart_chunk = Some(100_000);
    let d = tmp();
    let dir = adapter_folder(d.path());
    // A merged-model-like folder: config, index, two shards, one above the chunk size (3 parts).
    let model = d.path().join("merged");
    std::fs::create_dir_all(&model).unwrap();
    write_safetensors(&model.join("model-00001-of-00002.safetensors"), 60_000);
    write_safetensors(&model.join("model-00002-of-00002.safetensors"), 1_000);
    std::fs::write(
        model.join("model.safetensors.index.json"),
        r#"{"metadata":{},"weight_map":{"w":"model-00001-of-00002.safetensors","v":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::copy(common::fixture("tiny-llama/config.json"), model.join("config.json")).unwrap();
    std::fs::write(model.join("README.md"), "---\nlibrary_name: transformers\n---\n# merged\n").unwrap();
    let _ = dir;
    let o = push(&hub, d.path(), &model, &["--repo", "tiny-merged"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    // A bare name goes under the token's account.
    assert!(out.contains("alice/tiny-merged"), "{out}");
    assert_same_files(&hub.files("alice/tiny-merged", "main"), &local_files(&model));
    assert_eq!(hub.count("PUT", "/s3/part/"), 3);
    assert_eq!(hub.count("POST", "/s3/complete/"), 1);
    assert_eq!(hub.count("PUT", "/s3/upload/"), 1); // the small shard
    assert_eq!(hub.commits("alice/tiny-merged"), 1);
    assert!(
        out.contains("Upload model merged with peftkit")
            || hub
                .requests()
                .iter()
                .any(|r| String::from_utf8_lossy(&r.body).contains("Upload model merged with peftkit"))
    );
    assert_token_only_in_authorization(&hub, &o);
}

#[test]
fn a_branch_is_created_and_committed_to() {
    let (hub, d, dir) = setup();
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/b", "--revision", "dev"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("/alice/b/tree/dev"), "{out}");
    assert_eq!(hub.count("POST", "/branch/dev"), 1);
    assert_eq!(hub.count("POST", "/commit/dev"), 1);
    assert!(hub.files("alice/b", "main").is_empty());
    assert_same_files(&hub.files("alice/b", "dev"), &local_files(&dir));
}

#[test]
fn checkpoints_are_not_pushed() {
    let (hub, d, dir) = setup();
    std::fs::create_dir_all(dir.join("checkpoints/step-000002")).unwrap();
    std::fs::write(dir.join("checkpoints/step-000002/state.json"), "{}").unwrap();
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/c"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("not pushed: checkpoints/"), "{out}");
    assert!(hub.files("alice/c", "main").keys().all(|k| !k.starts_with("checkpoints")));
}

#[test]
fn folders_that_are_not_ready_are_refused_before_any_request() {
    let (hub, d, dir) = setup();
    let push = |dir: &Path| push(&hub, d.path(), dir, &["--repo", "alice/x"]);

    std::fs::remove_file(dir.join("README.md")).unwrap();
    let o = push(&dir);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("no model card (README.md)"), "{}", text(&o).1);
    std::fs::write(dir.join("README.md"), "# card\n").unwrap();

    // A half-written file: a temporary name, as peftkit's writers use before the rename.
    let tmp_file = dir.join(".adapter_model.safetensors.tmp-4242");
    std::fs::write(&tmp_file, b"partial").unwrap();
    let o = push(&dir);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o).1;
    assert!(err.contains(".adapter_model.safetensors.tmp-4242") && err.contains("temporary file"), "{err}");
    std::fs::remove_file(&tmp_file).unwrap();

    // A truncated safetensors file.
    let weights = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 10]).unwrap();
    let o = push(&dir);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o).1;
    assert!(err.contains("adapter_model.safetensors") && err.contains("truncated"), "{err}");
    std::fs::write(&weights, &bytes).unwrap();

    // A JSON file cut short.
    std::fs::write(dir.join("adapter_config.json"), "{\"peft_type\": \"LORA\", \"r\":").unwrap();
    let o = push(&dir);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("adapter_config.json: not complete JSON"), "{}", text(&o).1);

    assert!(
        hub.requests().is_empty(),
        "requests were made: {:?}",
        hub.requests().iter().map(|r| &r.target).collect::<Vec<_>>()
    );
}

#[test]
fn no_token_and_bad_repo_ids_are_user_errors() {
    let (hub, d, dir) = setup();
    let o = bin(&hub, d.path())
        .env_remove("HF_TOKEN")
        .args(["push"])
        .arg(&dir)
        .args(["--repo", "alice/x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o).1;
    assert!(err.contains("HF_TOKEN") && err.contains("token"), "{err}");
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/bad name"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("--repo"), "{}", text(&o).1);
    let o = bin(&hub, d.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["push"])
        .arg(&dir)
        .args(["--repo", "alice/x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("HF_HUB_OFFLINE"), "{}", text(&o).1);
    assert!(hub.requests().is_empty());
}

#[test]
fn a_refused_token_is_reported_once_without_retries_or_leaks() {
    let (hub, d, dir) = setup();
    // A wrong token: the Hub answers 401 to the first call (repo creation); nothing is retried.
    let o = bin(&hub, d.path())
        .env("HF_TOKEN", "hf_WrongTokenWrongToken123456")
        .args(["push"])
        .arg(&dir)
        .args(["--repo", "alice/x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o).1;
    assert!(err.contains("401") || err.contains("Authentication"), "{err}");
    assert!(!err.contains("hf_WrongTokenWrongToken123456"), "{err}");
    assert_eq!(hub.requests().len(), 1, "{:?}", hub.requests().iter().map(|r| &r.target).collect::<Vec<_>>());

    // 403 on the preupload call (a read-only token): clear, not retried, nothing committed.
    hub.fail("POST", "/preupload/", 403, usize::MAX);
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/y"]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o).1;
    assert!(err.contains("403 Forbidden") && err.contains("write"), "{err}");
    assert_eq!(hub.count("POST", "/preupload/"), 1);
    assert_eq!(hub.commits("alice/y"), 0);

    // 401 on the commit itself.
    hub.fail_only("POST", "/commit/", 401, usize::MAX);
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/z"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("401 Unauthorized"), "{}", text(&o).1);
    assert_eq!(hub.count("POST", "/commit/"), 1);
    assert_token_only_in_authorization(&hub, &o);
}

#[test]
fn server_errors_are_retried_a_few_times_then_reported() {
    let (hub, d, dir) = setup();
    // A 503 that lasts: the preupload call is tried MAX_ATTEMPTS (3) times, then a clear error; exit 1.
    hub.fail("POST", "/preupload/", 503, usize::MAX);
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/s"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o).1;
    assert!(err.contains("503") && err.contains("after 3 attempts") && err.contains("Nothing was committed"), "{err}");
    assert_eq!(hub.count("POST", "/preupload/"), 3);
    assert_eq!(hub.commits("alice/s"), 0);

    // The same bound holds for the calls hf-hub makes (repo creation).
    hub.fail_only("POST", "/api/repos/create", 503, usize::MAX);
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/r"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("503"), "{}", text(&o).1);
    assert_eq!(hub.count("POST", "/api/repos/create"), 4, "one create for alice/s, then 3 tries for alice/r");

    // A 500 on the commit is not retried (it may have been made).
    hub.fail_only("POST", "/commit/", 500, usize::MAX);
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/s"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("was not retried"), "{}", text(&o).1);
    assert_eq!(hub.count("POST", "/commit/"), 1);

    // One passing 502 on the storage PUT is retried and the push succeeds.
    hub.fail_only("PUT", "/s3/upload/", 502, 1);
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/t"]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_same_files(&hub.files("alice/t", "main"), &local_files(&dir));
}

#[test]
fn train_pushes_when_the_recipe_names_a_hub_repo() {
    let hub = FakeHub::start();
    let d = tmp();
    let data = d.path().join("train.jsonl");
    let lines: String = (0..8)
        .map(|i| {
            serde_json::json!({"messages": [{"role": "user", "content": format!("What is code E{i}?")},
                {"role": "assistant", "content": format!("Code E{i} means tank {i} is empty.")}]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = d.path().join("adapter");
    let recipe = d.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "base_model: {}\nadapter: {{type: lora, r: 2}}\ndata: {{train: {}, format: chat, sequence_len: 32}}\n\
             training: {{max_steps: 2, micro_batch_size: 4, save_every: 1}}\n\
             output: {{dir: {}, hub_model_id: alice/trained, private: true, hub_revision: exp}}\n",
            common::fixture("tiny-llama").display(),
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    // Without a token, training does not even start.
    let o = bin(&hub, d.path()).env_remove("HF_TOKEN").arg("train").arg(&recipe).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("output.hub_model_id"), "{}", text(&o).1);
    assert!(!out.join("metrics.jsonl").exists());

    let o = bin(&hub, d.path()).arg("train").arg(&recipe).output().unwrap();
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{stdout}\n{err}");
    assert!(stdout.contains("/alice/trained/tree/exp"), "{stdout}");
    let remote = hub.files("alice/trained", "exp");
    let mut local = local_files(&out);
    local.retain(|k, _| !k.starts_with("checkpoints/"));
    assert_same_files(&remote, &local);
    for f in ["adapter_config.json", "adapter_model.safetensors", "README.md"] {
        assert!(remote.contains_key(f), "{f} not pushed");
    }
    assert!(hub.state.lock().unwrap().repos["alice/trained"].private);
    assert_token_only_in_authorization(&hub, &o);
}

#[test]
fn when_the_hub_picks_xet_the_upload_is_handed_to_hf_hub() {
    let hub = FakeHub::start();
    hub.state.lock().unwrap().transfer = Some("xet");
    let d = tmp();
    let dir = adapter_folder(d.path());
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/xet"]);
    // This server has no Xet storage, so hf-hub's Xet upload fails; the error is clear and nothing is committed.
    assert_ne!(o.status.code(), Some(0));
    let err = text(&o).1;
    assert!(err.contains("Xet upload"), "{err}");
    assert_eq!(hub.commits("alice/xet"), 0);
    // hf-hub made its own preupload and batch calls (the hand-off happened), then asked for a Xet token.
    assert!(
        hub.count("POST", "/preupload/") >= 2,
        "{:?}",
        hub.requests().iter().map(|r| &r.target).collect::<Vec<_>>()
    );
    assert_token_only_in_authorization(&hub, &o);
}

#[test]
fn a_token_that_cannot_create_repos_still_pushes_to_an_existing_one() {
    let (hub, d, dir) = setup();
    let o = push(&hub, d.path(), &dir, &["--repo", "team/shared"]);
    assert!(o.status.success(), "{}", text(&o).1);
    // A fine-grained token with write access to team/shared only: creating repos is forbidden.
    hub.fail("POST", "/api/repos/create", 403, usize::MAX);
    let o = push(&hub, d.path(), &dir, &["--repo", "team/shared"]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(hub.commits("team/shared"), 2);
    // …but a repo that does not exist is still a clear refusal.
    let o = push(&hub, d.path(), &dir, &["--repo", "team/new"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("403 Forbidden"), "{}", text(&o).1);
}

#[test]
fn identical_files_are_uploaded_once_and_links_are_handled() {
    let (hub, d, dir) = setup();
    std::fs::copy(dir.join("adapter_model.safetensors"), dir.join("copy.safetensors")).unwrap();
    #[cfg(unix)]
    {
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), "not part of the adapter").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("linked")).unwrap();
    }
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/dups"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(hub.count("PUT", "/s3/upload/"), 1, "one object for two identical files");
    let remote = hub.files("alice/dups", "main");
    assert_eq!(sha256(&remote["copy.safetensors"]), sha256(&remote["adapter_model.safetensors"]));
    #[cfg(unix)]
    {
        assert!(out.contains("linked/ (a link to a folder, not followed)"), "{out}");
        assert!(!remote.keys().any(|k| k.contains("secret")));
        std::fs::remove_file(dir.join("linked")).unwrap();
        std::os::unix::fs::symlink(d.path().join("nowhere"), dir.join("dangling")).unwrap();
        let o = push(&hub, d.path(), &dir, &["--repo", "alice/dups"]);
        assert_eq!(o.status.code(), Some(2));
        assert!(text(&o).1.contains("dangling symlink"), "{}", text(&o).1);
    }
}

#[test]
fn an_expired_storage_link_is_not_blamed_on_the_token() {
    let (hub, d, dir) = setup();
    hub.fail("PUT", "/s3/upload/", 403, usize::MAX);
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/exp"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o).1;
    assert!(err.contains("storage service answered 403") && err.contains("expired"), "{err}");
    assert!(!err.contains("write access") && !err.contains("/s3/"), "{err}");
    assert_eq!(hub.count("PUT", "/s3/upload/"), 1);
    assert_eq!(hub.commits("alice/exp"), 0);
}

#[test]
fn card_metadata_the_hub_refuses_stops_the_push_before_any_upload() {
    let (hub, d, dir) = setup();
    std::fs::write(dir.join("README.md"), "---\nlicense: not-a-license\n---\n# card\n").unwrap();
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/card"]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o).1;
    assert!(err.contains("README.md") && err.contains("must be one of") && err.contains("nothing was pushed"), "{err}");
    assert_eq!(hub.count("POST", "/api/validate-yaml"), 1);
    assert_eq!(hub.count("POST", "/preupload/") + hub.count("PUT", "/s3/") + hub.count("POST", "/commit/"), 0);
    // YAML that does not parse is refused the same way.
    std::fs::write(dir.join("README.md"), "---\nlicense: [apache-2.0\n---\n# card\n").unwrap();
    let o = push(&hub, d.path(), &dir, &["--repo", "alice/card"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("Invalid YAML"), "{}", text(&o).1);
}
