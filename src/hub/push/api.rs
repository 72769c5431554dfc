//! The Hub's HTTP API for the calls hf-hub 1.0 does not make the way a non-Xet upload needs: the token only as
//! a Bearer header and only to the Hub endpoint, retries of safe requests on 429/5xx or a failed connection
//! (at most [`MAX_ATTEMPTS`] tries, honouring `Retry-After`), timeouts in proportion to the upload, and every
//! failure turned into a token-free [`PushError`].

use std::fmt;
use std::time::Duration;

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use serde_json::Value;

use super::{PushError, MAX_ATTEMPTS};
use crate::hub::{self, error_chain};

/// Pause before the second try (doubled before each further one), unless the answer says `Retry-After`.
const RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Longest server error text kept in a message.
const MAX_DETAIL: usize = 600;
/// Time allowed for an API call (JSON in, JSON out), and for an upload on top of its size at 512 KiB/s.
pub(super) const API_TIMEOUT: Duration = Duration::from_secs(120);

pub(super) fn upload_timeout(bytes: u64) -> Duration {
    API_TIMEOUT + Duration::from_secs(bytes / (512 * 1024))
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// Whether a request may be sent again after a 429/5xx answer or a failed connection.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Retry {
    Transient,
    Never,
}

/// The Hub's HTTP API, for the calls hf-hub 1.0 does not make the way a non-Xet upload needs.
pub(super) struct Api {
    pub(super) http: Client,
    pub(super) endpoint: String,
    pub(super) token: String,
    pub(super) repo: String,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api").field("endpoint", &self.endpoint).field("repo", &self.repo).finish_non_exhaustive()
    }
}

impl Api {
    pub(super) fn auth(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.token)).unwrap_or(HeaderValue::from_static(""));
        v.set_sensitive(true);
        v
    }

    /// Whether `url` is on the Hub endpoint (same scheme, host and port): only such requests carry the token.
    pub(super) fn is_hub_url(&self, url: &str) -> bool {
        match (reqwest::Url::parse(url), reqwest::Url::parse(&self.endpoint)) {
            (Ok(u), Ok(e)) => u.origin() == e.origin(),
            _ => false,
        }
    }

    pub(super) fn redact(&self, text: &str) -> String {
        hub::redact(text, Some(&self.token))
    }

    /// Sends the request `build` makes to `url`, retrying transient failures when `retry` allows, and turns every
    /// non-success answer into a [`PushError`]. A refusal (401/403) is the token's only from the Hub itself; from
    /// a storage URL it is an expired or refused upload link.
    pub(super) fn send(
        &self,
        action: &str,
        url: &str,
        retry: Retry,
        timeout: Duration,
        hint: &'static str,
        build: impl Fn() -> Result<RequestBuilder, PushError>,
    ) -> Result<Response, PushError> {
        let hub = self.is_hub_url(url);
        let max = if retry == Retry::Transient { MAX_ATTEMPTS } else { 1 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A storage URL is signed: it stays out of errors and logs.
            let result = build()?.timeout(timeout).send().map_err(|e| if hub { e } else { e.without_url() });
            let transient = match &result {
                Ok(r) => matches!(r.status().as_u16(), 408 | 429 | 500 | 502 | 503 | 504),
                Err(e) => e.is_connect() || e.is_timeout() || e.is_request() || e.is_body(),
            };
            if transient && attempt < max {
                let wait = match &result {
                    Ok(r) => retry_after(r).unwrap_or(RETRY_BACKOFF * (1 << (attempt - 1))),
                    Err(_) => RETRY_BACKOFF * (1 << (attempt - 1)),
                };
                tracing::warn!("{action}: {}; trying again in {:.1} s", self.describe(&result), wait.as_secs_f32());
                std::thread::sleep(wait);
                continue;
            }
            return match result {
                Ok(r) if r.status().is_success() => Ok(r),
                Ok(r) => {
                    let status = r.status().as_u16();
                    let detail = self.detail(r);
                    let (action, repo) = (action.to_string(), self.repo.clone());
                    Err(match status {
                        401 | 403 if hub => PushError::Refused { status, action, repo, detail },
                        _ if hub => PushError::Server { status, action, repo, detail, attempts: attempt, hint },
                        _ => PushError::Storage { status, action, detail, attempts: attempt, hint },
                    })
                }
                Err(e) => Err(PushError::Network {
                    target: if hub { format!("the Hub at {}", self.endpoint) } else { "the Hub's storage".into() },
                    action: action.to_string(),
                    detail: self.redact(&error_chain(&e)),
                    attempts: attempt,
                    hint,
                }),
            };
        }
    }

    fn describe(&self, result: &Result<Response, reqwest::Error>) -> String {
        match result {
            Ok(r) => format!("the answer was {}", r.status()),
            Err(e) => self.redact(&error_chain(e)),
        }
    }

    /// The server's explanation: `{"error": …}` from a JSON body, else the start of the text; token-free.
    fn detail(&self, r: Response) -> String {
        let status = r.status();
        let text = r.text().unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or(text);
        let msg = msg.trim();
        let msg =
            if msg.is_empty() { status.canonical_reason().unwrap_or("no message").to_string() } else { msg.into() };
        let mut msg = self.redact(&msg);
        if msg.len() > MAX_DETAIL {
            let cut = (0..=MAX_DETAIL).rev().find(|&i| msg.is_char_boundary(i)).unwrap_or(0);
            msg.truncate(cut);
            msg.push('…');
        }
        msg
    }

    pub(super) fn api_url(&self, what: &str) -> String {
        format!("{}/api/models/{}/{what}", self.endpoint, self.repo)
    }

    pub(super) fn post_json(&self, url: &str, body: &Value) -> RequestBuilder {
        self.http.post(url).header(AUTHORIZATION, self.auth()).json(body)
    }

    pub(super) fn json(&self, action: &str, r: Response) -> Result<Value, PushError> {
        r.json::<Value>().map_err(|e| PushError::Protocol {
            action: action.into(),
            repo: self.repo.clone(),
            detail: format!("the answer is not JSON ({})", self.redact(&e.to_string())),
        })
    }
}

fn retry_after(r: &Response) -> Option<Duration> {
    let secs: u64 = r.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(30)))
}
