//! Hugging Face chat templates rendered with minijinja, as `transformers`' `apply_chat_template`
//! renders them (reference: transformers `utils/chat_template_utils.py`: an
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with `raise_exception`,
//! `strftime_now`, and the tokenizer's special tokens plus `messages`, `tools=None`,
//! `documents=None` and `add_generation_prompt` in the context).
//!
//! Python string methods (`.strip()`, `.startswith()`, `.split()`, `dict.items()` …) come from
//! minijinja-contrib's `pycompat` callback. The `{% generation %}` / `{% endgeneration %}` markers
//! that some templates use for assistant masks (a transformers-only extension) are removed before
//! compiling: spans are found by prefix rendering instead (see `encode.rs`).

use std::fmt;
use std::fmt::Write as _;
use std::path::Path;

use minijinja::value::Value;
use minijinja::{context, AutoEscape, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::error::DataError;

/// The name the template is registered under inside its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One chat message: `{"role": "user", "content": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the special tokens it is rendered with.
///
/// Invariant: `env` holds exactly one template, [`TEMPLATE_NAME`], compiled from `source`.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("source_len", &self.source.len())
            .finish()
    }
}

/// Instructions a template may execute per render ([`ChatTemplate::render`]): ~10 000 times what a real template
/// needs for a 100-message conversation.
const TEMPLATE_FUEL: u64 = 50_000_000;

impl ChatTemplate {
    /// Compiles `source` (Jinja, as found in `chat_template.jinja`) with the given special tokens.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, DataError> {
        Self::with_origin(source, bos_token, eos_token, "<inline>".to_string())
    }

    /// The model's chat template, or `None` when it has none.
    ///
    /// `chat_template.jinja` wins when it exists; otherwise `chat_template` from
    /// `tokenizer_config.json`, either a string or a list of `{"name", "template"}` (the one named
    /// `default` is taken). `bos_token` / `eos_token` come from `tokenizer_config.json` (strings or
    /// `{"content": …}` objects; empty when absent). Paths that do not exist are treated as absent.
    pub fn from_model_files(
        tokenizer_config_json: Option<&Path>,
        chat_template_jinja: Option<&Path>,
    ) -> Result<Option<ChatTemplate>, DataError> {
        let config = match tokenizer_config_json.filter(|path| path.is_file()) {
            Some(path) => Some((path, read_json(path)?)),
            None => None,
        };
        let (bos_token, eos_token) = match &config {
            Some((path, value)) => (
                special_token(path, value, "bos_token")?.unwrap_or_default(),
                special_token(path, value, "eos_token")?.unwrap_or_default(),
            ),
            None => (String::new(), String::new()),
        };

        let (source, origin) = if let Some(path) = chat_template_jinja.filter(|path| path.is_file()) {
            let source =
                std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
            (source, path.display().to_string())
        } else if let Some((path, value)) = &config {
            match config_template(path, value)? {
                Some(source) => (source, format!("{} (chat_template)", path.display())),
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        if source.trim().is_empty() {
            return Ok(None);
        }
        Self::with_origin(source, bos_token, eos_token, origin).map(Some)
    }

    /// [`ChatTemplate::new`] with a description of where the source came from, for errors.
    fn with_origin(source: String, bos_token: String, eos_token: String, origin: String) -> Result<Self, DataError> {
        let mut env = Environment::new();
        // Jinja settings of transformers' environment; a single trailing newline of the source is
        // dropped as Jinja does (minijinja's default too).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // A template comes with the model, i.e. from the Hub: bound its work so that a hostile or broken one
        // (`{% for i in range(10**9) %}`, nested loops) fails with an error instead of hanging the run. A real
        // chat template spends a few hundred instructions per message.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(&source))
            .map_err(|err| template_error(&origin, &err))?;
        Ok(Self { env, source, origin, bos_token, eos_token })
    }

    /// Renders `messages` (with `add_generation_prompt`) to the text the model sees.
    ///
    /// The context holds `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and
    /// `tools` / `documents` set to none, as transformers passes them.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, DataError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|err| template_error(&self.origin, &err))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                tools => Value::from(()),
                documents => Value::from(()),
            })
            .map_err(|err| template_error(&self.origin, &err))
    }

    /// The template's Jinja source, as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (a file, `… (chat_template)` for tokenizer_config.json, or `<inline>`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The `bos_token` the template is rendered with (may be empty).
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The `eos_token` the template is rendered with (may be empty).
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// `raise_exception(msg)`: fails the render with `msg` (templates use it to reject conversations).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local time formatted with strftime directives.
fn strftime_now(format: String) -> Result<String, Error> {
    let mut out = String::new();
    // `write!` (not `to_string`) so that an invalid directive is an error instead of a panic.
    write!(out, "{}", chrono::Local::now().format(&format))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: invalid format {format:?}")))?;
    Ok(out)
}

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` block markers, which minijinja
/// does not know (their content stays).
fn strip_generation_tags(source: &str) -> String {
    // A plain scan rather than a regex: `{%`, optional `-`, spaces, the keyword, spaces, optional `-`, `%}`.
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` comes after the opening `{%` (in `{%}` the `%` is shared and closes nothing).
        match tag[2..].find("%}").map(|i| i + 2) {
            Some(end) => {
                let inner = tag[2..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
                if inner != "generation" && inner != "endgeneration" {
                    out.push_str(&tag[..end + 2]);
                }
                rest = &tag[end + 2..];
            }
            None => {
                out.push_str(tag);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// A minijinja error as a [`DataError::Template`]; `raise_exception`'s message is kept verbatim.
fn template_error(origin: &str, err: &Error) -> DataError {
    let mut message = match (err.kind(), err.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        (kind, Some(detail)) => format!("{kind}: {detail}"),
        (kind, None) => kind.to_string(),
    };
    // Errors raised inside macros or calls are wrapped: append the causes.
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    DataError::Template { origin: origin.to_string(), line: err.line(), message }
}

/// Reads and parses a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|err| DataError::Json {
        path: path.to_path_buf(),
        line: err.line().max(1),
        element: None,
        message: err.to_string(),
    })
}

/// A special token of tokenizer_config.json: a string, a `{"content": …}` object, or absent/null.
pub(crate) fn special_token(path: &Path, config: &serde_json::Value, key: &str) -> Result<Option<String>, DataError> {
    use serde_json::Value as J;
    match config.get(key) {
        None | Some(J::Null) => Ok(None),
        Some(J::String(token)) => Ok(Some(token.clone())),
        Some(J::Object(object)) => match object.get("content") {
            Some(J::String(token)) => Ok(Some(token.clone())),
            _ => Err(DataError::Config {
                path: path.to_path_buf(),
                key: key.to_string(),
                message: "expected a string or an object with a string `content`".to_string(),
            }),
        },
        Some(_) => Err(DataError::Config {
            path: path.to_path_buf(),
            key: key.to_string(),
            message: "expected a string or an object with a string `content`".to_string(),
        }),
    }
}

/// `chat_template` of tokenizer_config.json: a string, or a list of `{name, template}` (take `default`).
fn config_template(path: &Path, config: &serde_json::Value) -> Result<Option<String>, DataError> {
    use serde_json::Value as J;
    let bad =
        |message: String| DataError::Config { path: path.to_path_buf(), key: "chat_template".to_string(), message };
    match config.get("chat_template") {
        None | Some(J::Null) => Ok(None),
        Some(J::String(source)) => Ok(Some(source.clone())),
        Some(J::Array(entries)) => {
            let mut names = Vec::new();
            for (index, entry) in entries.iter().enumerate() {
                let name = entry.get("name").and_then(J::as_str);
                let template = entry.get("template").and_then(J::as_str);
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(Some(template.to_string())),
                    (Some(name), Some(_)) => names.push(name.to_string()),
                    _ => {
                        return Err(bad(format!("entry {index}: expected {{\"name\": string, \"template\": string}}")))
                    }
                }
            }
            Err(bad(format!("no template named `default` (found: {})", names.join(", "))))
        }
        Some(_) => Err(bad("expected a string or a list of {name, template}".to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{MISTRAL, SMOLLM2};

    fn m(role: &str, content: &str) -> Message {
        Message::new(role, content)
    }

    #[test]
    fn an_unclosed_tag_sharing_its_percent_sign_is_a_template_error_not_a_panic() {
        // Found by tests/fuzz.rs: `{%}` made the generation-tag scan slice backwards.
        for src in ["{%}", "a{%}b", "{%-}"] {
            assert!(ChatTemplate::new(src.into(), String::new(), String::new()).is_err(), "{src}");
        }
    }

    #[test]
    fn a_runaway_template_runs_out_of_fuel_instead_of_hanging() {
        let src = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let started = std::time::Instant::now();
        let err = t.render(&[m("user", "hi")], true).unwrap_err().to_string();
        assert!(err.contains("fuel"), "{err}");
        assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
    }

    #[test]
    fn fixture_chatml_renders_byte_exact() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let template = ChatTemplate::from_model_files(
            Some(&dir.join("tokenizer_config.json")),
            Some(&dir.join("chat_template.jinja")),
        )
        .unwrap()
        .unwrap();
        assert_eq!(template.bos_token(), "<|im_start|>");
        assert_eq!(template.eos_token(), "<|im_end|>");
        let messages = [m("system", "Be brief."), m("user", "Hi there"), m("assistant", "Hello!")];
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n"
        );
        assert_eq!(
            template.render(&messages[..2], true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_adds_default_system() {
        let template = ChatTemplate::new(SMOLLM2.into(), String::new(), "<|im_end|>".into()).unwrap();
        assert_eq!(
            template.render(&[m("user", "Hi")], true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn mistral_raise_exception_is_a_data_error() {
        let template = ChatTemplate::new(MISTRAL.into(), "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(template.render(&[m("user", "a"), m("assistant", "b")], false).unwrap(), "<s>[INST] a [/INST]b</s>");
        let err = template.render(&[m("user", "a"), m("user", "b")], false).unwrap_err();
        match &err {
            DataError::Template { message, origin, .. } => {
                assert_eq!(message, "Conversation roles must alternate user/assistant/user/assistant/...");
                assert_eq!(origin, "<inline>");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("Conversation roles must alternate"), "{err}");
    }

    #[test]
    fn pycompat_methods_and_strftime_work() {
        let source = "{{ messages[0]['content'].strip().upper() }}|{{ 'abc'.startswith('ab') }}|\
                      {{ strftime_now('%Y') | length }}|{{ tools is none }}";
        let template = ChatTemplate::new(source.into(), String::new(), String::new()).unwrap();
        assert_eq!(template.render(&[m("user", "  hi ")], false).unwrap(), "HI|True|4|True");
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}".into(), String::new(), String::new()).unwrap();
        assert!(bad.render(&[], false).is_err());
    }

    #[test]
    fn generation_tags_are_ignored() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation %}{{ m.content }}{% endgeneration -%}{% else %}[{{ m.content }}]{% endif %}{% endfor %}";
        let template = ChatTemplate::new(source.into(), String::new(), String::new()).unwrap();
        assert_eq!(template.render(&[m("user", "q"), m("assistant", "a")], false).unwrap(), "[q]a");
    }

    #[test]
    fn syntax_error_names_origin_and_line() {
        let err = ChatTemplate::new("line one\n{% if %}".into(), String::new(), String::new()).unwrap_err();
        assert!(matches!(err, DataError::Template { line: Some(2), .. }), "{err:?}");
    }

    #[test]
    fn tokenizer_config_template_forms() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &config,
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]}"#,
        )
        .unwrap();
        let missing = dir.path().join("chat_template.jinja");
        let template = ChatTemplate::from_model_files(Some(&config), Some(&missing)).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "D<s>");
        assert_eq!(template.eos_token(), "</s>");

        std::fs::write(&config, r#"{"chat_template": [{"name": "tool_use", "template": "T"}]}"#).unwrap();
        let err = ChatTemplate::from_model_files(Some(&config), None).unwrap_err();
        assert!(matches!(&err, DataError::Config { key, .. } if key == "chat_template"), "{err:?}");

        std::fs::write(&config, r#"{"eos_token": "</s>"}"#).unwrap();
        assert!(ChatTemplate::from_model_files(Some(&config), None).unwrap().is_none());
        assert!(ChatTemplate::from_model_files(None, None).unwrap().is_none());

        std::fs::write(&missing, "J{{ eos_token }}\n").unwrap();
        let template = ChatTemplate::from_model_files(Some(&config), Some(&missing)).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "J</s>");
    }
}
