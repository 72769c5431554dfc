//! Errors of the data pipeline: every one names the file, and where it can the 1-based line (and,
//! for JSON-array datasets, the element index) and the key at fault, so a user can fix the record.

use std::path::{Path, PathBuf};

/// Anything that can go wrong between a dataset file on disk and its training examples.
///
/// Record-level variants carry `path`, `line` (1-based) and `element` (the 0-based index in a JSON
/// array dataset; `None` for JSONL); field-level ones also carry the `key` (e.g. `messages[1].content`).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The file is not UTF-8; `line` is where the first invalid byte sits.
    #[error("{}:{line}: not valid UTF-8", path.display())]
    Utf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line of the first invalid byte.
        line: usize,
    },

    /// A line (JSONL) or the file (JSON array, config) is not valid JSON.
    #[error("{}: malformed JSON: {message}", at(path, *line, *element))]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// Index in a JSON-array dataset, when known.
        element: Option<usize>,
        /// serde_json's description (with the column).
        message: String,
    },

    /// A field of a record is missing, has the wrong type, or has a value outside the allowed set.
    #[error("{}: `{key}`: {message}", at(path, *line, *element))]
    Field {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line of the record (its first line for a JSON array element).
        line: usize,
        /// Index in a JSON-array dataset.
        element: Option<usize>,
        /// The field, as a path into the record: `messages[1].content`.
        key: String,
        /// What is wrong with it.
        message: String,
    },

    /// The first record has none of the keys that identify a format.
    #[error(
        "{}: cannot tell the dataset format from the record's keys [{}]; expected `messages` (chat), \
         `instruction` (alpaca), `text` or `prompt`+`completion` (completion), `input_ids` (tokens), or set \
         the format explicitly",
        at(path, *line, *element),
        keys.join(", ")
    )]
    UnknownLayout {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line of the record.
        line: usize,
        /// Index in a JSON-array dataset.
        element: Option<usize>,
        /// The keys the record has.
        keys: Vec<String>,
    },

    /// The dataset has no records at all.
    #[error("{}: the dataset has no records", path.display())]
    Empty {
        /// The dataset file.
        path: PathBuf,
    },

    /// Every record was dropped (no supervised token within `sequence_len`).
    #[error(
        "{}: all {records} records were dropped: none has a supervised token within sequence_len = {sequence_len}",
        path.display()
    )]
    NoExamples {
        /// The dataset file.
        path: PathBuf,
        /// How many records were read.
        records: usize,
        /// The sequence length in force.
        sequence_len: usize,
    },

    /// Chat records need a chat template, and the model has none.
    #[error(
        "{}: chat records need a chat template, but the model has none (no chat_template.jinja and no \
         `chat_template` in tokenizer_config.json); use a chat/instruct model or convert the data to \
         the alpaca or completion format",
        path.display()
    )]
    NoTemplate {
        /// The dataset file.
        path: PathBuf,
    },

    /// A token named by the configuration (e.g. `eos_token`) is missing or not in the vocabulary.
    #[error("{}: `{key}`: {message}", path.display())]
    Token {
        /// The dataset (or config) file the token is needed for.
        path: PathBuf,
        /// Which token: `eos_token`, `pad_token`.
        key: String,
        /// What is wrong.
        message: String,
    },

    /// A chat template failed to compile or to render.
    #[error("chat template ({}): {message}", template_at(origin, *line))]
    Template {
        /// Where the template came from: its file, or `<inline>`.
        origin: String,
        /// 1-based line inside the template, when minijinja knows it.
        line: Option<usize>,
        /// What went wrong; for `raise_exception(msg)` this holds `msg`.
        message: String,
    },

    /// A record could not be turned into an example (template rendering, tokenization, masking).
    #[error("{}: {message}", at(path, *line, *element))]
    Record {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line of the record.
        line: usize,
        /// Index in a JSON-array dataset.
        element: Option<usize>,
        /// What went wrong (includes the template's message for rendering errors).
        message: String,
    },

    /// A key of a model configuration file (tokenizer_config.json) has an unusable value.
    #[error("{}: `{key}`: {message}", path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong with it.
        message: String,
    },

    /// A format name that is not `chat`, `alpaca`, `completion` or `tokens`.
    #[error("unknown dataset format `{name}` (expected chat, alpaca, completion or tokens)")]
    UnknownFormat {
        /// The name given.
        name: String,
    },
}

/// `file:line` or `file:line (element N)`.
fn at(path: &Path, line: usize, element: Option<usize>) -> String {
    match element {
        Some(index) => format!("{}:{line} (element {index})", path.display()),
        None => format!("{}:{line}", path.display()),
    }
}

/// `origin, line N` or `origin`.
fn template_at(origin: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{origin}, line {line}"),
        None => origin.to_string(),
    }
}

/// Where a record sits in its file: used to build record-level errors.
#[derive(Debug, Clone)]
pub(crate) struct Location<'a> {
    /// The dataset file.
    pub path: &'a Path,
    /// 1-based line.
    pub line: usize,
    /// Index in a JSON-array dataset.
    pub element: Option<usize>,
}

impl Location<'_> {
    /// A [`DataError::Field`] at this location.
    pub fn field(&self, key: impl Into<String>, message: impl Into<String>) -> DataError {
        DataError::Field {
            path: self.path.to_path_buf(),
            line: self.line,
            element: self.element,
            key: key.into(),
            message: message.into(),
        }
    }

    /// A [`DataError::Record`] at this location.
    pub fn record(&self, message: impl Into<String>) -> DataError {
        DataError::Record {
            path: self.path.to_path_buf(),
            line: self.line,
            element: self.element,
            message: message.into(),
        }
    }
}
