//! [`HubOptions`]: where the Hub cache is, the token, offline mode and the endpoint, read from the environment
//! as `huggingface_hub` reads it (`HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`, `HF_TOKEN_PATH`, `HF_HUB_OFFLINE`,
//! `HF_ENDPOINT`).

use std::fmt;
use std::path::{Path, PathBuf};

/// How Hub ids are resolved: cache location, credentials, offline mode, endpoint, progress bars.
///
/// `Debug` never shows the token (`token: Some("***")`).
#[derive(Clone, Default)]
pub struct HubOptions {
    /// The Hub cache folder (`models--owner--name/…` lives inside). `None`: [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Access token for gated/private repos, sent only as an `Authorization: Bearer` header.
    /// `None`: hf-hub falls back to its own ambient lookup (`HF_TOKEN`, `HF_TOKEN_PATH`,
    /// `$HF_HOME/token`), as the Python client does.
    pub token: Option<String>,
    /// Never touch the network; resolve from the cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Hub base URL (`HF_ENDPOINT`), e.g. a mirror. `None`: `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Show a progress bar (on stderr, when it is a terminal) for each download.
    pub progress: bool,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .field("progress", &self.progress)
            .finish()
    }
}

impl HubOptions {
    /// Options from the environment, as `huggingface_hub` reads it:
    /// - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub` ([`default_cache_dir`]);
    /// - token: `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else the file `$HF_HOME/token`
    ///   (`HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`);
    /// - offline: `HF_HUB_OFFLINE` set to `1`, `true`, `yes` or `on` (any case);
    /// - endpoint: `HF_ENDPOINT`.
    ///
    /// `progress` is left `false`; the caller decides (e.g. when stderr is a terminal).
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// [`from_env`](Self::from_env) over any variable lookup (testable without touching the process env).
    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |key: &str| var(key).filter(|v| !v.trim().is_empty());
        let home = hf_home_from(&var);
        let cache_dir = cache_dir_from(&var, &home);
        let token = nonempty("HF_TOKEN")
            .map(|t| t.trim().to_string())
            .or_else(|| nonempty("HF_TOKEN_PATH").and_then(|p| read_token_file(Path::new(&p))))
            .or_else(|| read_token_file(&home.join("token")));
        let offline = nonempty("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let endpoint = nonempty("HF_ENDPOINT").map(|e| e.trim().trim_end_matches('/').to_string());
        HubOptions { cache_dir: Some(cache_dir), token, offline, endpoint, progress: false }
    }

    /// The cache folder these options use: `cache_dir`, else [`default_cache_dir`].
    pub fn resolved_cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(default_cache_dir)
    }
}

/// Why `endpoint` (the `HF_ENDPOINT` value) cannot be the Hub's address, or `None` when it is an http(s) URL with a
/// host. Checked before a client is built, so that the message names the variable rather than a URL parser's
/// "relative URL without a base".
pub fn endpoint_problem(endpoint: &str) -> Option<String> {
    let reason = match reqwest::Url::parse(endpoint.trim()) {
        Err(e) => e.to_string(),
        Ok(url) if !matches!(url.scheme(), "http" | "https") => format!("scheme `{}`, not http(s)", url.scheme()),
        Ok(url) if url.host_str().is_none_or(str::is_empty) => "no host".to_string(),
        Ok(_) => return None,
    };
    Some(format!(
        "HF_ENDPOINT={endpoint:?} is not an http(s) URL ({reason}): set it to a Hub address such as \
         https://huggingface.co, or unset it"
    ))
}

/// The standard Hub cache folder: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`
/// (`HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`).
pub fn default_cache_dir() -> PathBuf {
    let var = |key: &str| std::env::var(key).ok();
    let home = hf_home_from(&var);
    cache_dir_from(&var, &home)
}

fn hf_home_from(var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    let nonempty = |key: &str| var(key).filter(|v| !v.trim().is_empty());
    if let Some(home) = nonempty("HF_HOME") {
        return expand_tilde_with(&home, var);
    }
    if let Some(xdg) = nonempty("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("huggingface");
    }
    user_home(var).join(".cache").join("huggingface")
}

fn cache_dir_from(var: &impl Fn(&str) -> Option<String>, hf_home: &Path) -> PathBuf {
    let nonempty = |key: &str| var(key).filter(|v| !v.trim().is_empty());
    nonempty("HF_HUB_CACHE")
        .or_else(|| nonempty("HUGGINGFACE_HUB_CACHE"))
        .map(|p| expand_tilde_with(&p, var))
        .unwrap_or_else(|| hf_home.join("hub"))
}

fn user_home(var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    var("HOME")
        .or_else(|| var("USERPROFILE"))
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

pub(super) fn expand_tilde_with(p: &str, var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    if p == "~" {
        return user_home(var);
    }
    match p.strip_prefix("~/") {
        Some(rest) => user_home(var).join(rest),
        None => PathBuf::from(p),
    }
}

fn read_token_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fs;

    #[test]
    fn debug_hides_token() {
        let opts = HubOptions { token: Some("hf_SuperSecretTokenValue123".into()), ..Default::default() };
        let dbg = format!("{opts:?}");
        assert!(!dbg.contains("SuperSecret"), "{dbg}");
        assert!(dbg.contains("token: Some(\"***\")"), "{dbg}");
        let none = format!("{:?}", HubOptions::default());
        assert!(none.contains("token: None"), "{none}");
    }

    #[test]
    fn options_from_env_lookup() {
        let tmp = tempfile::tempdir().expect("tmp");
        let home = tmp.path().join("hfhome");
        fs::create_dir_all(&home).expect("mkdir");
        fs::write(home.join("token"), "  file-token\n").expect("token");
        let home_s = home.to_str().expect("utf-8").to_string();

        let vars = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let from = |m: HashMap<String, String>| HubOptions::from_lookup(move |k| m.get(k).cloned());

        let o = from(vars(&[("HF_HOME", &home_s), ("HOME", "/nonexistent-home")]));
        assert_eq!(o.cache_dir, Some(home.join("hub")));
        assert_eq!(o.token.as_deref(), Some("file-token"));
        assert!(!o.offline && o.endpoint.is_none() && !o.progress);

        let o = from(vars(&[
            ("HF_HOME", &home_s),
            ("HF_HUB_CACHE", "/elsewhere/cache"),
            ("HF_TOKEN", "env-token"),
            ("HF_HUB_OFFLINE", "TRUE"),
            ("HF_ENDPOINT", "https://mirror.example/"),
        ]));
        assert_eq!(o.cache_dir, Some(PathBuf::from("/elsewhere/cache")));
        assert_eq!(o.token.as_deref(), Some("env-token"));
        assert!(o.offline);
        assert_eq!(o.endpoint.as_deref(), Some("https://mirror.example"));

        for (v, want) in [("1", true), ("yes", true), ("on", true), ("0", false), ("false", false), ("", false)] {
            let o = from(vars(&[("HF_HOME", &home_s), ("HF_HUB_OFFLINE", v)]));
            assert_eq!(o.offline, want, "HF_HUB_OFFLINE={v:?}");
        }

        let o = from(vars(&[("HOME", "/home/someone")]));
        assert_eq!(o.cache_dir, Some(PathBuf::from("/home/someone/.cache/huggingface/hub")));
        assert_eq!(o.token, None);
        let o = from(vars(&[("HOME", "/home/someone"), ("XDG_CACHE_HOME", "/xdg")]));
        assert_eq!(o.cache_dir, Some(PathBuf::from("/xdg/huggingface/hub")));
    }

    #[test]
    fn endpoint_must_be_an_http_url() {
        assert_eq!(endpoint_problem("https://mirror.example/"), None);
        assert_eq!(endpoint_problem("http://127.0.0.1:8080"), None);
        for bad in ["notaurl", "ftp://x.example", "file:///tmp/hub"] {
            let msg = endpoint_problem(bad).unwrap_or_default();
            assert!(msg.starts_with(&format!("HF_ENDPOINT=\"{bad}\" is not an http(s) URL (")), "{msg}");
        }
    }
}
