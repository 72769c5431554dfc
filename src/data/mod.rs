//! Datasets → token ids + label masks → batches.
//!
//! A dataset file (JSONL, or a JSON array) holds records in one of four layouts ([`Format`]):
//! chat (`messages`, rendered with the model's [`ChatTemplate`]), alpaca (`instruction`/`input`/
//! `output`), completion (`text`) or pre-tokenized tokens (`input_ids`/`labels`). [`load_dataset`] validates every record (errors name
//! `file:line` and the field), encodes each into an [`Example`] whose labels follow transformers'
//! convention (unshifted, -100 where not supervised: only assistant turns / responses by default),
//! truncates to `sequence_len` and drops examples left without a supervised token.
//! [`make_batch`] and [`epoch_order`] feed the training loop; [`packing`] lays several examples into
//! one row ([`pack`], [`make_packed_batch`]) and groups rows by length ([`group_by_length`]).
//!
//! References: transformers `apply_chat_template` (rendering), TRL `assistant_only_loss`
//! (which tokens are supervised), Stanford Alpaca `train.py` (prompt format and masking).

mod batch;
mod encode;
mod error;
pub mod packing;
mod records;
mod template;
#[cfg(test)]
mod testutil;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

pub use batch::{epoch_order, make_batch, pad_token_id, Batch};
pub use encode::{alpaca_prompt, EncodeOptions, Example, IGNORE_INDEX};
pub use error::DataError;
pub use packing::{group_by_length, make_packed_batch, pack};
pub use template::{ChatTemplate, Message};

use encode::Encoder;
use records::{detect_format, line_of_offset, parse_record, read_records, Record};

/// The layout of a dataset's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"messages": [{"role", "content"}, …]}`, rendered with the chat template; assistant turns supervised.
    Chat,
    /// `{"instruction", "input"?, "output"}` in the Alpaca prompt; the output supervised.
    Alpaca,
    /// `{"text"}` (every token supervised) or `{"prompt", "completion"}` (the completion supervised).
    Completion,
    /// Pre-tokenized: `{"input_ids": [ids], "labels": [ids or -100]}`, labels optional (default: the ids).
    Tokens,
}

impl Format {
    /// The lowercase name: `chat`, `alpaca`, `completion`, `tokens`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Chat => "chat",
            Format::Alpaca => "alpaca",
            Format::Completion => "completion",
            Format::Tokens => "tokens",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = DataError;

    /// Parses `chat`, `alpaca`, `completion` or `tokens` (case-insensitive).
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.trim().to_ascii_lowercase().as_str() {
            "chat" => Ok(Format::Chat),
            "alpaca" => Ok(Format::Alpaca),
            "completion" => Ok(Format::Completion),
            "tokens" => Ok(Format::Tokens),
            _ => Err(DataError::UnknownFormat { name: name.to_string() }),
        }
    }
}

/// Counts describing a loaded dataset.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DatasetStats {
    /// Records read from the file.
    pub records: usize,
    /// Examples kept (`records - dropped`).
    pub examples: usize,
    /// Tokens in the kept examples (after truncation).
    pub tokens: usize,
    /// Supervised tokens (labels ≠ -100) in the kept examples.
    pub supervised_tokens: usize,
    /// Records longer than `sequence_len` (cut to it; includes ones then dropped).
    pub truncated: usize,
    /// Records dropped for having no supervised token (after truncation, or none to begin with,
    /// e.g. a conversation without an assistant turn).
    pub dropped: usize,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: String,
}

/// A dataset file turned into training examples.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file it was read from.
    pub path: PathBuf,
    /// The records' layout (given or detected).
    pub format: Format,
    /// The examples, in file order (dropped records left out).
    pub examples: Vec<Example>,
    /// Counts.
    pub stats: DatasetStats,
}

/// Reads, validates and encodes a dataset.
///
/// - `format`: `None` detects it from the first record's keys.
/// - `template`: required for chat records ([`DataError::NoTemplate`] otherwise).
/// - `eos_token`: appended to alpaca examples; falls back to the template's eos token. Also counts
///   as an end-of-turn marker for chat masking.
///
/// Errors: unreadable file, malformed JSON or fields (with `file:line` and key), an empty file, a
/// record the template rejects, or every record dropped.
pub fn load_dataset(
    path: &Path,
    format: Option<Format>,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    eos_token: Option<&str>,
    opts: &EncodeOptions,
) -> Result<Dataset, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let sha256 = crate::fsutil::sha256_hex(&bytes);
    let text = std::str::from_utf8(&bytes)
        .map_err(|err| DataError::Utf8 { path: path.to_path_buf(), line: line_of_offset(&bytes, err.valid_up_to()) })?;

    let raw = read_records(path, text)?;
    let first = raw.first().ok_or_else(|| DataError::Empty { path: path.to_path_buf() })?;
    let format = match format {
        Some(format) => format,
        None => detect_format(path, first)?,
    };
    let records: Vec<Record> = raw.iter().map(|record| parse_record(path, record, format)).collect::<Result<_, _>>()?;
    if format == Format::Tokens {
        let vocab = opts.vocab_size.unwrap_or_else(|| tokenizer.get_vocab_size(true));
        for (record, raw) in records.iter().zip(&raw) {
            check_vocab(record, vocab).map_err(|(key, message)| raw.location(path).field(key, message))?;
        }
    }

    if format == Format::Chat && template.is_none() {
        return Err(DataError::NoTemplate { path: path.to_path_buf() });
    }
    let eos_token = eos_token.filter(|t| !t.is_empty()).or(template.map(|t| t.eos_token()).filter(|t| !t.is_empty()));
    let eos_id = match (format, eos_token) {
        (Format::Alpaca, None) => {
            return Err(DataError::Token {
                path: path.to_path_buf(),
                key: "eos_token".to_string(),
                message: "alpaca records end with the eos token, and the model defines none".to_string(),
            })
        }
        (Format::Alpaca, Some(token)) => Some(tokenizer.token_to_id(token).ok_or_else(|| DataError::Token {
            path: path.to_path_buf(),
            key: "eos_token".to_string(),
            message: format!("{token:?} is not in the tokenizer's vocabulary"),
        })?),
        (_, Some(token)) => tokenizer.token_to_id(token),
        (_, None) => None,
    };

    let encoder = Encoder::new(tokenizer, template, eos_id, eos_token, opts.train_on_inputs);
    // Encoding is independent per record; results come back in file order.
    let encoded: Vec<Result<(Example, bool), DataError>> = records
        .par_iter()
        .zip(raw.par_iter())
        .map(|(record, raw)| {
            let mut example = encoder.encode(record).map_err(|message| raw.location(path).record(message))?;
            let truncated = example.truncate(opts.sequence_len);
            Ok((example, truncated))
        })
        .collect();

    let mut stats = DatasetStats { records: records.len(), sha256, ..DatasetStats::default() };
    let mut examples = Vec::with_capacity(records.len());
    for result in encoded {
        let (example, truncated) = result?;
        stats.truncated += usize::from(truncated);
        let supervised = example.supervised();
        if supervised == 0 {
            stats.dropped += 1;
            continue;
        }
        stats.tokens += example.len();
        stats.supervised_tokens += supervised;
        examples.push(example);
    }
    stats.examples = examples.len();
    if examples.is_empty() {
        return Err(DataError::NoExamples {
            path: path.to_path_buf(),
            records: stats.records,
            sequence_len: opts.sequence_len,
        });
    }
    Ok(Dataset { path: path.to_path_buf(), format, examples, stats })
}

/// Pre-tokenized ids and labels must lie below the vocabulary size `vocab`: the failing key and message otherwise.
fn check_vocab(record: &Record, vocab: usize) -> Result<(), (String, String)> {
    let Record::Tokens { input_ids, labels } = record else { return Ok(()) };
    let outside = |value: i64| format!("{value} is outside the vocabulary (token ids 0..{vocab})");
    if let Some((i, &id)) = input_ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err((format!("input_ids[{i}]"), outside(id.into())));
    }
    if let Some((i, &label)) = labels.iter().enumerate().find(|(_, &label)| label >= 0 && label as usize >= vocab) {
        return Err((format!("labels[{i}]"), outside(label.into())));
    }
    Ok(())
}

/// Lowercase hex of `bytes`.
#[cfg(test)]
mod tests {
    use super::*;
    use testutil::{fixture_template, fixture_tokenizer};

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn opts(sequence_len: usize) -> EncodeOptions {
        EncodeOptions { sequence_len, train_on_inputs: false, vocab_size: None }
    }

    const CHAT: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]}
{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
"#;

    #[test]
    fn format_names_round_trip() {
        for format in [Format::Chat, Format::Alpaca, Format::Completion, Format::Tokens] {
            assert_eq!(format.to_string().parse::<Format>().unwrap(), format);
        }
        assert_eq!(" Chat ".parse::<Format>().unwrap(), Format::Chat);
        assert!(matches!("sharegpt".parse::<Format>(), Err(DataError::UnknownFormat { .. })));
    }

    #[test]
    fn loads_chat_with_auto_detection_and_stats() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "chat.jsonl", CHAT);
        let (tokenizer, template) = (fixture_tokenizer(), fixture_template());
        let dataset = load_dataset(&path, None, &tokenizer, Some(&template), None, &opts(512)).unwrap();
        assert_eq!(dataset.format, Format::Chat);
        assert_eq!(dataset.examples.len(), 2);
        let stats = &dataset.stats;
        assert_eq!((stats.records, stats.examples, stats.truncated, stats.dropped), (2, 2, 0, 0));
        assert_eq!(stats.tokens, dataset.examples.iter().map(Example::len).sum::<usize>());
        assert_eq!(stats.supervised_tokens, dataset.examples.iter().map(Example::supervised).sum::<usize>());
        assert_eq!(stats.sha256, crate::fsutil::sha256_hex(CHAT.as_bytes()));
        assert_eq!(stats.sha256.len(), 64);
        let supervised: Vec<u32> = dataset.examples[1]
            .input_ids
            .iter()
            .zip(&dataset.examples[1].labels)
            .filter(|(_, &label)| label != IGNORE_INDEX)
            .map(|(&id, _)| id)
            .collect();
        assert_eq!(tokenizer.decode(&supervised, false).unwrap(), "4<|im_end|>");
    }

    #[test]
    fn truncation_and_drop_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (tokenizer, template) = (fixture_tokenizer(), fixture_template());
        let long_user = "word ".repeat(40);
        let text = format!(
            "{}\n{}\n{}\n",
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]}"#,
            serde_json::json!({"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "ok"}]}),
            r#"{"messages": [{"role": "user", "content": "Only a question"}]}"#,
        );
        let path = write(&dir, "chat.jsonl", &text);
        // Record 1 fits partly into 12 tokens (it keeps some supervised tokens), record 2's
        // assistant turn falls past the cut, record 3 has no assistant turn at all.
        let first_len = fixture_template()
            .render(&[Message::new("user", "Hi"), Message::new("assistant", "Hello there, friend.")], false)
            .map(|text| tokenizer.encode(text.as_str(), false).unwrap().len())
            .unwrap();
        let sequence_len = first_len - 2;
        let dataset = load_dataset(&path, None, &tokenizer, Some(&template), None, &opts(sequence_len)).unwrap();
        let stats = &dataset.stats;
        assert_eq!((stats.records, stats.examples, stats.truncated, stats.dropped), (3, 1, 2, 2), "{stats:?}");
        assert_eq!(dataset.examples[0].len(), sequence_len);
        assert_eq!(stats.tokens, sequence_len);

        let err = load_dataset(&path, None, &tokenizer, Some(&template), None, &opts(3)).unwrap_err();
        assert!(matches!(err, DataError::NoExamples { records: 3, .. }), "{err:?}");
    }

    #[test]
    fn alpaca_and_completion_files() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = fixture_tokenizer();
        let alpaca = write(&dir, "a.jsonl", r#"{"instruction": "Say hi", "input": "", "output": "hi"}"#);
        let dataset = load_dataset(&alpaca, None, &tokenizer, None, Some("<|im_end|>"), &opts(512)).unwrap();
        assert_eq!(dataset.format, Format::Alpaca);
        let example = &dataset.examples[0];
        assert_eq!(example.labels[example.len() - 1], tokenizer.token_to_id("<|im_end|>").unwrap() as i32);
        assert_eq!(example.supervised(), tokenizer.encode("hi", false).unwrap().len() + 1);
        // Without any eos token: a clear error.
        let err = load_dataset(&alpaca, None, &tokenizer, None, None, &opts(512)).unwrap_err();
        assert!(matches!(&err, DataError::Token { key, .. } if key == "eos_token"), "{err:?}");

        let completion = write(&dir, "c.json", "[\n {\"text\": \"hello world\"},\n {\"text\": \"bye\"}\n]\n");
        let dataset = load_dataset(&completion, None, &tokenizer, None, None, &opts(512)).unwrap();
        assert_eq!(dataset.format, Format::Completion);
        assert_eq!(dataset.examples[0].input_ids, tokenizer.encode("hello world", true).unwrap().get_ids());
        assert_eq!(dataset.stats.supervised_tokens, dataset.stats.tokens);
    }

    #[test]
    fn file_level_errors() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = fixture_tokenizer();
        let template = fixture_template();

        let empty = write(&dir, "empty.jsonl", "\n  \n");
        assert!(matches!(load_dataset(&empty, None, &tokenizer, None, None, &opts(8)), Err(DataError::Empty { .. })));
        let empty_array = write(&dir, "empty.json", " [ ] ");
        assert!(matches!(
            load_dataset(&empty_array, None, &tokenizer, None, None, &opts(8)),
            Err(DataError::Empty { .. })
        ));

        let chat = write(&dir, "chat.jsonl", CHAT);
        let err = load_dataset(&chat, None, &tokenizer, None, None, &opts(8)).unwrap_err();
        assert!(matches!(err, DataError::NoTemplate { .. }), "{err:?}");

        let bad = write(&dir, "bad.jsonl", &format!("{CHAT}{{\"messages\": [}}\n"));
        let err = load_dataset(&bad, None, &tokenizer, Some(&template), None, &opts(8)).unwrap_err();
        assert!(err.to_string().starts_with(&format!("{}:3: malformed JSON", bad.display())), "{err}");

        let wrong = write(
            &dir,
            "wrong.jsonl",
            &format!(
                "{CHAT}\n{}\n",
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]}"#
            ),
        );
        let err = load_dataset(&wrong, None, &tokenizer, Some(&template), None, &opts(8)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}:4: `messages[1].content`: expected a string, found an array", wrong.display())
        );

        // An explicit format that does not fit the records names the missing field.
        let err =
            load_dataset(&chat, Some(Format::Alpaca), &tokenizer, None, Some("<|im_end|>"), &opts(8)).unwrap_err();
        assert!(matches!(&err, DataError::Field { key, line: 1, .. } if key == "instruction"), "{err:?}");

        let latin1 = dir.path().join("latin1.jsonl");
        std::fs::write(&latin1, b"{\"text\": \"a\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
        assert!(matches!(
            load_dataset(&latin1, None, &tokenizer, None, None, &opts(8)),
            Err(DataError::Utf8 { line: 2, .. })
        ));

        let missing = dir.path().join("missing.jsonl");
        assert!(matches!(load_dataset(&missing, None, &tokenizer, None, None, &opts(8)), Err(DataError::Io { .. })));
    }

    #[test]
    fn template_errors_name_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = testutil::tokenizer_with_specials(&["<s>", "</s>", "[INST]", "[/INST]"]);
        let template = ChatTemplate::new(testutil::MISTRAL.into(), "<s>".into(), "</s>".into()).unwrap();
        let path = write(
            &dir,
            "m.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}\n",
        );
        let err = load_dataset(&path, None, &tokenizer, Some(&template), None, &opts(64)).unwrap_err();
        assert!(matches!(err, DataError::Record { line: 2, .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.starts_with(&format!("{}:2: chat template (<inline>", path.display())), "{message}");
        assert!(message.ends_with("Conversation roles must alternate user/assistant/user/assistant/..."), "{message}");
    }
}
