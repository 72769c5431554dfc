//! A loopback stand-in for the Hugging Face Hub's upload API (what `peftkit push` calls), shared by the tests that
//! push: tests/push.rs (the protocol, failures, retries) and tests/crash.rs (a folder left by a killed run is
//! pushable after the next command). See tests/push.rs for the calls it answers.

use super::loopback::{Loopback, Reply, Request};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub const TOKEN: &str = "hf_PushTestToken0123456789abcdefXYZ";
pub const USER: &str = "alice";
/// The credential the fake Hub puts in its verify actions (as the Hub puts a Basic one).
pub const VERIFY_AUTH: &str = "Basic dmVyaWZ5LW9ubHk=";

// ---------------------------------------------------------------------------------------------
// The fake Hub
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
pub struct RepoState {
    pub private: bool,
    /// branch → path → bytes
    pub branches: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pub commits: usize,
}

/// An injected failure: answer `status` to requests whose method and path match, `times` times (then behave).
#[derive(Clone)]
pub struct Fail {
    pub method: &'static str,
    pub path_contains: &'static str,
    pub status: u16,
    pub times: usize,
}

#[derive(Default)]
pub struct State {
    pub port: u16,
    pub repos: BTreeMap<String, RepoState>,
    /// LFS storage: sha256 → bytes.
    pub lfs: BTreeMap<String, Vec<u8>>,
    /// Multipart parts received: (oid, part number) → bytes.
    pub parts: BTreeMap<(String, usize), Vec<u8>>,
    /// Objects larger than this go multipart with parts of this size.
    pub multipart_chunk: Option<usize>,
    /// The transfer the batch call answers for non-multipart objects (`basic`, or `xet` to test the hand-off).
    pub transfer: Option<&'static str>,
    pub fails: Vec<Fail>,
}

pub struct FakeHub {
    pub server: Loopback,
    pub state: Arc<Mutex<State>>,
}

impl FakeHub {
    pub fn start() -> FakeHub {
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let server = Loopback::start(move |req| route(&mut s.lock().expect("state"), req));
        state.lock().unwrap().port = server.port();
        FakeHub { server, state }
    }

    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.server.requests()
    }

    pub fn fail(&self, method: &'static str, path_contains: &'static str, status: u16, times: usize) {
        self.state.lock().unwrap().fails.push(Fail { method, path_contains, status, times });
    }

    /// Like [`fail`](Self::fail), after clearing the failures set before.
    pub fn fail_only(&self, method: &'static str, path_contains: &'static str, status: u16, times: usize) {
        self.state.lock().unwrap().fails.clear();
        self.fail(method, path_contains, status, times);
    }

    pub fn files(&self, repo: &str, branch: &str) -> BTreeMap<String, Vec<u8>> {
        let st = self.state.lock().unwrap();
        st.repos.get(repo).and_then(|r| r.branches.get(branch)).cloned().unwrap_or_default()
    }

    pub fn commits(&self, repo: &str) -> usize {
        self.state.lock().unwrap().repos.get(repo).map(|r| r.commits).unwrap_or(0)
    }

    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.requests().iter().filter(|r| r.method == method && r.path().contains(path_contains)).count()
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

pub fn authorized(req: &Request) -> bool {
    req.header("authorization") == Some(&format!("Bearer {TOKEN}"))
}

pub fn route(st: &mut State, req: &Request) -> Reply {
    let path = req.path().to_string();
    if let Some(f) =
        st.fails.iter_mut().find(|f| f.times > 0 && f.method == req.method && path.contains(f.path_contains))
    {
        f.times -= 1;
        let msg = match f.status {
            401 => "Invalid credentials in Authorization header",
            403 => "You don't have the rights to create a model under this namespace",
            _ => "Internal Error - We're working hard to fix this as soon as possible!",
        };
        return Reply::error(f.status, "Injected", msg);
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let storage = format!("http://localhost:{}/s3", st.port);
    let hub = format!("http://127.0.0.1:{}", st.port);

    // Presigned storage: no token expected (and none should be sent).
    if parts.first() == Some(&"s3") {
        return match (req.method.as_str(), &parts[1..]) {
            ("PUT", ["upload", oid]) => {
                if sha256(&req.body) != *oid {
                    return Reply::error(400, "BadDigest", "content does not match the oid");
                }
                st.lfs.insert(oid.to_string(), req.body.clone());
                Reply::new(200)
            }
            ("PUT", ["part", oid, n]) => {
                let n: usize = n.parse().unwrap_or(0);
                st.parts.insert((oid.to_string(), n), req.body.clone());
                Reply::new(200).header("ETag", format!("\"etag-{n}-{}\"", &sha256(&req.body)[..8]))
            }
            ("POST", ["complete", oid]) => {
                let body = req.json();
                let mut bytes = Vec::new();
                for (i, p) in body["parts"].as_array().cloned().unwrap_or_default().iter().enumerate() {
                    let n = p["partNumber"].as_u64().unwrap_or(0) as usize;
                    let Some(part) = st.parts.get(&(oid.to_string(), n)) else {
                        return Reply::error(400, "MissingPart", "a part was not uploaded");
                    };
                    let want = format!("\"etag-{n}-{}\"", &sha256(part)[..8]);
                    if n != i + 1 || p["etag"].as_str() != Some(want.as_str()) {
                        return Reply::error(400, "BadPart", "parts out of order or wrong ETag");
                    }
                    bytes.extend_from_slice(part);
                }
                if sha256(&bytes) != *oid || body["oid"].as_str() != Some(*oid) {
                    return Reply::error(400, "BadDigest", "assembled content does not match the oid");
                }
                st.lfs.insert(oid.to_string(), bytes);
                Reply::new(200).json(serde_json::json!({}))
            }
            _ => Reply::error(404, "NotFound", "no such storage action"),
        };
    }

    let verify_call = path.ends_with("/info/lfs/objects/verify");
    if verify_call && req.headers.iter().filter(|(k, _)| k == "authorization").count() != 1 {
        return Reply::error(400, "BadRequest", "exactly one Authorization header expected");
    }
    if !(authorized(req) || verify_call && req.header("authorization") == Some(VERIFY_AUTH)) {
        return Reply::error(401, "Unauthorized", "Invalid credentials in Authorization header");
    }
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["api", "models", owner, name]) => match st.repos.get(&format!("{owner}/{name}")) {
            Some(_) => {
                Reply::new(200).json(serde_json::json!({"id": format!("{owner}/{name}"), "sha": "0".repeat(40)}))
            }
            None => Reply::error(404, "RepoNotFound", "Repository not found"),
        },
        ("POST", ["api", "validate-yaml"]) => {
            let content = req.json()["content"].as_str().unwrap_or("").to_string();
            let front = content.strip_prefix("---\n").and_then(|rest| rest.split_once("\n---").map(|(y, _)| y));
            match front.map(serde_yaml::from_str::<serde_yaml::Value>) {
                Some(Err(e)) => Reply::error(400, "BadRequest", &format!("Invalid YAML in README.md: {e}")),
                Some(Ok(v)) if v.get("license").and_then(|l| l.as_str()) == Some("not-a-license") => {
                    Reply::error(400, "BadRequest", "\"license\" must be one of [apache-2.0, mit, …]")
                }
                _ => Reply::new(200).json(serde_json::json!({"errors": [], "warnings": []})),
            }
        }
        ("GET", ["api", "whoami-v2"]) => Reply::new(200).json(serde_json::json!({"name": USER, "type": "user"})),
        ("POST", ["api", "repos", "create"]) => {
            let body = req.json();
            let name = body["name"].as_str().unwrap_or("");
            let owner = body["organization"].as_str().unwrap_or(USER);
            let repo = format!("{owner}/{name}");
            if st.repos.contains_key(&repo) {
                return Reply::error(409, "Conflict", "You already created this model repo").json(
                    serde_json::json!({"error": "You already created this model repo", "url": format!("{hub}/{repo}")}),
                );
            }
            let mut r = RepoState { private: body["private"].as_bool().unwrap_or(false), ..Default::default() };
            r.branches.insert("main".into(), BTreeMap::new());
            st.repos.insert(repo.clone(), r);
            Reply::new(200).json(serde_json::json!({"url": format!("{hub}/{repo}"), "name": repo}))
        }
        ("POST", ["api", "models", owner, name, "branch", branch]) => {
            let Some(r) = st.repos.get_mut(&format!("{owner}/{name}")) else {
                return Reply::error(404, "RepoNotFound", "Repository not found");
            };
            if r.branches.contains_key(*branch) {
                return Reply::error(409, "Conflict", "Reference already exists");
            }
            let main = r.branches.get("main").cloned().unwrap_or_default();
            r.branches.insert(branch.to_string(), main);
            Reply::new(200).json(serde_json::json!({}))
        }
        ("POST", ["api", "models", owner, name, "preupload", rev]) => {
            let Some(r) = st.repos.get(&format!("{owner}/{name}")) else {
                return Reply::error(404, "RepoNotFound", "Repository not found");
            };
            if !r.branches.contains_key(*rev) {
                return Reply::error(404, "RevisionNotFound", "Invalid rev id");
            }
            let b64 = base64::engine::general_purpose::STANDARD;
            let files: Vec<serde_json::Value> = req.json()["files"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|f| {
                    let path = f["path"].as_str().unwrap_or("");
                    let sample = b64.decode(f["sample"].as_str().unwrap_or("")).unwrap_or_default();
                    let size = f["size"].as_u64().unwrap_or(0);
                    let lfs = path.ends_with(".safetensors") || size > 10 << 20 || sample.contains(&0);
                    serde_json::json!({"path": path, "uploadMode": if lfs {"lfs"} else {"regular"}, "shouldIgnore": false})
                })
                .collect();
            Reply::new(200).json(serde_json::json!({"files": files, "commitOid": "0".repeat(40)}))
        }
        ("POST", [owner, repo_git, "info", "lfs", "objects", "batch"]) if repo_git.ends_with(".git") => {
            let repo = format!("{owner}/{}", repo_git.trim_end_matches(".git"));
            if !st.repos.contains_key(&repo) {
                return Reply::error(404, "RepoNotFound", "Repository not found");
            }
            if req.header("accept") != Some("application/vnd.git-lfs+json") {
                return Reply::error(406, "NotAcceptable", "LFS media type expected");
            }
            let body = req.json();
            if st.transfer == Some("xet") {
                return Reply::new(200).json(serde_json::json!({"transfer": "xet", "objects": []}));
            }
            let mut multipart = false;
            let objects: Vec<serde_json::Value> = body["objects"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|o| {
                    let oid = o["oid"].as_str().unwrap_or("").to_string();
                    let size = o["size"].as_u64().unwrap_or(0) as usize;
                    if st.lfs.contains_key(&oid) {
                        return serde_json::json!({"oid": oid, "size": size});
                    }
                    // As the Hub does, the verify action carries its own Authorization header.
                    let verify = serde_json::json!({"href": format!("{hub}/{repo}.git/info/lfs/objects/verify"),
                        "header": {"Authorization": VERIFY_AUTH}});
                    match st.multipart_chunk {
                        Some(chunk) if size > chunk => {
                            multipart = true;
                            let mut header = serde_json::Map::new();
                            header.insert("chunk_size".into(), chunk.to_string().into());
                            for n in 1..=size.div_ceil(chunk) {
                                header.insert(format!("{n:05}"), format!("{storage}/part/{oid}/{n}").into());
                            }
                            serde_json::json!({"oid": oid, "size": size, "authenticated": true, "actions": {
                                "upload": {"href": format!("{storage}/complete/{oid}"), "header": header},
                                "verify": verify}})
                        }
                        _ => serde_json::json!({"oid": oid, "size": size, "authenticated": true, "actions": {
                            "upload": {"href": format!("{storage}/upload/{oid}")},
                            "verify": verify}}),
                    }
                })
                .collect();
            let transfer = if multipart { "multipart" } else { "basic" };
            Reply::new(200)
                .json(serde_json::json!({"transfer": transfer, "objects": objects}))
                .header("Content-Type", "application/vnd.git-lfs+json")
        }
        ("POST", [_, _, "info", "lfs", "objects", "verify"]) => {
            let body = req.json();
            let oid = body["oid"].as_str().unwrap_or("");
            match st.lfs.get(oid) {
                Some(b) if b.len() as u64 == body["size"].as_u64().unwrap_or(u64::MAX) => Reply::new(200),
                _ => Reply::error(404, "ObjectNotFound", "object not found"),
            }
        }
        ("POST", ["api", "models", owner, name, "commit", rev]) => {
            let repo = format!("{owner}/{name}");
            if req.header("content-type") != Some("application/x-ndjson") {
                return Reply::error(400, "BadRequest", "NDJSON expected");
            }
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut staged = BTreeMap::new();
            for (i, line) in req.body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
                let v: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
                let value = &v["value"];
                match (i, v["key"].as_str()) {
                    (0, Some("header")) if value["summary"].is_string() => {}
                    (0, _) => return Reply::error(400, "BadRequest", "the first line must be the header"),
                    (_, Some("file")) => {
                        let Ok(bytes) = b64.decode(value["content"].as_str().unwrap_or("")) else {
                            return Reply::error(400, "BadRequest", "bad base64");
                        };
                        staged.insert(value["path"].as_str().unwrap_or("").to_string(), bytes);
                    }
                    (_, Some("lfsFile")) => {
                        let oid = value["oid"].as_str().unwrap_or("");
                        match st.lfs.get(oid) {
                            Some(b) if b.len() as u64 == value["size"].as_u64().unwrap_or(0) => {
                                staged.insert(value["path"].as_str().unwrap_or("").to_string(), b.clone());
                            }
                            _ => {
                                return Reply::error(
                                    422,
                                    "LfsMissing",
                                    "an LFS object of the commit was never uploaded",
                                )
                            }
                        }
                    }
                    _ => return Reply::error(400, "BadRequest", "unknown line"),
                }
            }
            let Some(r) = st.repos.get_mut(&repo) else {
                return Reply::error(404, "RepoNotFound", "Repository not found");
            };
            let Some(files) = r.branches.get_mut(*rev) else {
                return Reply::error(404, "RevisionNotFound", "Invalid rev id");
            };
            files.extend(staged);
            r.commits += 1;
            let oid = format!("{:040x}", r.commits);
            Reply::new(200).json(serde_json::json!({"commitUrl": format!("{hub}/{repo}/commit/{oid}"), "commitOid": oid, "success": true}))
        }
        ("GET", ["api", "models", owner, name, "xet-write-token", _]) => {
            let _ = (owner, name);
            Reply::error(503, "Unavailable", "no Xet storage on this test server")
        }
        _ => Reply::error(404, "NotFound", "no such endpoint"),
    }
}
