//! Reading dataset files into typed records: JSONL (one object per line, blank lines skipped) or a
//! JSON array (a file whose first non-space character is `[`), format auto-detection from the
//! first record's keys, and field validation with `file:line` + key errors.
//!
//! Layouts (the usual ones of axolotl / TRL / HF datasets):
//! - chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}`
//! - alpaca: `{"instruction": "…", "input": "…" (optional), "output": "…"}`
//! - completion: `{"text": "…"}` or `{"prompt": "…", "completion": "…"}`
//! - tokens (pre-tokenized): `{"input_ids": [1, 2, …], "labels": [-100, 2, …]}`; labels optional (default: the
//!   ids), -100 = not predicted, the same length as `input_ids`. As transformers' `labels`: unshifted, the loss
//!   shifts them by one position.

use std::path::Path;

use serde_json::{Map, Value};

use super::error::{DataError, Location};
use super::template::Message;
use super::Format;

/// The roles a chat message may have.
pub(crate) const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One JSON object of the dataset and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct RawRecord {
    /// 1-based line where the record starts.
    pub line: usize,
    /// 0-based index for JSON-array datasets, `None` for JSONL.
    pub element: Option<usize>,
    /// The parsed JSON value (not yet checked to be an object).
    pub value: Value,
}

impl RawRecord {
    /// This record's location in `path`, for errors.
    pub fn location<'a>(&self, path: &'a Path) -> Location<'a> {
        Location { path, line: self.line, element: self.element }
    }
}

/// A validated record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    /// A conversation (roles checked, at least one message).
    Chat(Vec<Message>),
    /// An instruction; `input` is `None` when absent, null or empty.
    Alpaca { instruction: String, input: Option<String>, output: String },
    /// Raw text; with `prompt` set, the prompt precedes `text` and is not supervised.
    Completion { prompt: Option<String>, text: String },
    /// Token ids and their labels (same length; -100 or a non-negative id), not yet checked against the vocabulary.
    Tokens { input_ids: Vec<u32>, labels: Vec<i32> },
}

/// Splits the dataset text into raw records. `text` is the whole file (a leading BOM is ignored).
pub(crate) fn read_records(path: &Path, text: &str) -> Result<Vec<RawRecord>, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('[') {
        read_json_array(path, text)
    } else {
        read_jsonl(path, text)
    }
}

/// JSONL: each non-blank line is one JSON value.
fn read_jsonl(path: &Path, text: &str) -> Result<Vec<RawRecord>, DataError> {
    let mut records = Vec::new();
    for (index, line) in text.split('\n').enumerate() {
        let line_no = index + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|err| DataError::Json {
            path: path.to_path_buf(),
            line: line_no,
            element: None,
            message: describe_json_error(&err),
        })?;
        records.push(RawRecord { line: line_no, element: None, value });
    }
    Ok(records)
}

/// A JSON array: parsed whole (so syntax errors get serde_json's absolute line), then the element
/// start offsets are found by a small scanner to give each element its line.
fn read_json_array(path: &Path, text: &str) -> Result<Vec<RawRecord>, DataError> {
    let values: Vec<Value> = serde_json::from_str(text).map_err(|err| DataError::Json {
        path: path.to_path_buf(),
        line: err.line().max(1),
        element: None,
        message: describe_json_error(&err),
    })?;
    let starts = element_starts(text);
    // The scanner runs on text serde_json accepted, so the counts agree; should they not, fall back to line 1.
    let lines = lines_of_offsets(text, &starts);
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(index, value)| RawRecord { line: lines.get(index).copied().unwrap_or(1), element: Some(index), value })
        .collect())
}

/// serde_json's message without its "at line L column C" suffix (the line is reported separately),
/// with the column kept.
fn describe_json_error(err: &serde_json::Error) -> String {
    let full = err.to_string();
    let bare = match full.rfind(" at line ") {
        Some(pos) => &full[..pos],
        None => full.as_str(),
    };
    if err.column() > 0 {
        format!("{bare} (column {})", err.column())
    } else {
        bare.to_string()
    }
}

/// Byte offsets where the elements of the top-level array in `text` start.
///
/// Invariant: `text` is a valid JSON array (already parsed), so strings are well formed and depth
/// never goes negative. Depth 1 is "inside the top-level array".
fn element_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // True right after the opening `[` or a depth-1 `,`: the next value token starts an element.
    let mut expecting = false;
    for (offset, byte) in text.bytes().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'[' | b'{' => {
                if depth == 1 && expecting {
                    starts.push(offset);
                    expecting = false;
                }
                depth += 1;
                if depth == 1 {
                    expecting = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' => {
                if depth == 1 {
                    expecting = true;
                }
            }
            _ => {
                if depth == 1 && expecting {
                    starts.push(offset);
                    expecting = false;
                }
                if byte == b'"' {
                    in_string = true;
                }
            }
        }
    }
    starts
}

/// 1-based line numbers of sorted byte offsets.
fn lines_of_offsets(text: &str, offsets: &[usize]) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut lines = Vec::with_capacity(offsets.len());
    let (mut line, mut pos) = (1usize, 0usize);
    for &offset in offsets {
        let end = offset.min(bytes.len());
        line += bytes[pos.min(end)..end].iter().filter(|&&b| b == b'\n').count();
        pos = end;
        lines.push(line);
    }
    lines
}

/// 1-based line of a byte offset (used for UTF-8 errors).
pub(crate) fn line_of_offset(bytes: &[u8], offset: usize) -> usize {
    1 + bytes[..offset.min(bytes.len())].iter().filter(|&&b| b == b'\n').count()
}

/// The format a record's keys announce: `messages` → chat, `instruction` → alpaca, `text` (or
/// `prompt` + `completion`) → completion.
pub(crate) fn detect_format(path: &Path, record: &RawRecord) -> Result<Format, DataError> {
    let object = as_object(&record.value, &record.location(path))?;
    if object.contains_key("messages") {
        Ok(Format::Chat)
    } else if object.contains_key("input_ids") {
        Ok(Format::Tokens)
    } else if object.contains_key("instruction") {
        Ok(Format::Alpaca)
    } else if object.contains_key("text") || (object.contains_key("prompt") && object.contains_key("completion")) {
        Ok(Format::Completion)
    } else {
        Err(DataError::UnknownLayout {
            path: path.to_path_buf(),
            line: record.line,
            element: record.element,
            keys: {
                let mut keys: Vec<String> = object.keys().cloned().collect();
                keys.sort();
                keys
            },
        })
    }
}

/// Validates a raw record against `format`.
pub(crate) fn parse_record(path: &Path, record: &RawRecord, format: Format) -> Result<Record, DataError> {
    let loc = record.location(path);
    let object = as_object(&record.value, &loc)?;
    match format {
        Format::Chat => parse_chat(object, &loc),
        Format::Alpaca => Ok(Record::Alpaca {
            instruction: required_str(object, "instruction", "instruction", &loc)?,
            input: optional_str(object, "input", &loc)?.filter(|input| !input.is_empty()),
            output: required_str(object, "output", "output", &loc)?,
        }),
        Format::Completion => {
            if object.contains_key("text") || !object.contains_key("prompt") {
                Ok(Record::Completion { prompt: None, text: required_str(object, "text", "text", &loc)? })
            } else {
                Ok(Record::Completion {
                    prompt: Some(required_str(object, "prompt", "prompt", &loc)?),
                    text: required_str(object, "completion", "completion", &loc)?,
                })
            }
        }
        Format::Tokens => parse_tokens(object, &loc),
    }
}

/// `input_ids` (non-empty, ids ≥ 0) and `labels` (optional; -100 or ids ≥ 0; as long as `input_ids`).
fn parse_tokens(object: &Map<String, Value>, loc: &Location) -> Result<Record, DataError> {
    let integers = |name: &str| -> Result<Option<Vec<i64>>, DataError> {
        let items = match object.get(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(loc.field(name, format!("expected an array of integers, found {}", kind(other)))),
        };
        let values = items.iter().enumerate().map(|(i, item)| {
            item.as_i64()
                .ok_or_else(|| loc.field(format!("{name}[{i}]"), format!("expected an integer, found {}", kind(item))))
        });
        values.collect::<Result<Vec<_>, _>>().map(Some)
    };
    let ids = integers("input_ids")?.ok_or_else(|| loc.field("input_ids", "missing"))?;
    if ids.is_empty() {
        return Err(loc.field("input_ids", "is empty"));
    }
    let input_ids = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            u32::try_from(id).map_err(|_| loc.field(format!("input_ids[{i}]"), format!("{id} is not a token id")))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let labels = match integers("labels")? {
        None => input_ids.iter().map(|&id| id as i32).collect(),
        Some(labels) => {
            if labels.len() != input_ids.len() {
                return Err(loc.field(
                    "labels",
                    format!("has {} entries, input_ids {}: they must be equally long", labels.len(), input_ids.len()),
                ));
            }
            labels
                .iter()
                .enumerate()
                .map(|(i, &label)| match i32::try_from(label) {
                    Ok(label) if label >= 0 || label == super::encode::IGNORE_INDEX => Ok(label),
                    _ => Err(loc.field(
                        format!("labels[{i}]"),
                        format!("{label} is neither a token id nor -100 (not predicted)"),
                    )),
                })
                .collect::<Result<Vec<i32>, _>>()?
        }
    };
    Ok(Record::Tokens { input_ids, labels })
}

fn parse_chat(object: &Map<String, Value>, loc: &Location) -> Result<Record, DataError> {
    let messages = match object.get("messages") {
        None => return Err(loc.field("messages", "missing")),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(loc.field("messages", format!("expected an array of messages, found {}", kind(other))))
        }
    };
    if messages.is_empty() {
        return Err(loc.field("messages", "is empty"));
    }
    let mut parsed = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let key = format!("messages[{index}]");
        let Value::Object(message) = message else {
            return Err(loc.field(key, format!("expected an object, found {}", kind(message))));
        };
        let role = required_str(message, "role", &format!("{key}.role"), loc)?;
        if !ROLES.contains(&role.as_str()) {
            return Err(loc.field(
                format!("{key}.role"),
                format!("unknown role {role:?} (expected one of {})", ROLES.join(", ")),
            ));
        }
        let content = required_str(message, "content", &format!("{key}.content"), loc)?;
        parsed.push(Message { role, content });
    }
    Ok(Record::Chat(parsed))
}

fn as_object<'v>(value: &'v Value, loc: &Location) -> Result<&'v Map<String, Value>, DataError> {
    match value {
        Value::Object(object) => Ok(object),
        other => Err(loc.field("(record)", format!("expected a JSON object, found {}", kind(other)))),
    }
}

/// `object[name]` as a string; `key` is the full field path used in the error.
fn required_str(object: &Map<String, Value>, name: &str, key: &str, loc: &Location) -> Result<String, DataError> {
    match object.get(name) {
        None => Err(loc.field(key, "missing")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(loc.field(key, format!("expected a string, found {}", kind(other)))),
    }
}

/// `object[name]` as a string when present and not null.
fn optional_str(object: &Map<String, Value>, name: &str, loc: &Location) -> Result<Option<String>, DataError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(loc.field(name, format!("expected a string, found {}", kind(other)))),
    }
}

/// "a string", "a number", … for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("d.jsonl")
    }

    #[test]
    fn jsonl_skips_blank_lines_and_keeps_line_numbers() {
        let text = "{\"text\": \"a\"}\n\n  \r\n{\"text\": \"b\"}\r\n";
        let records = read_records(p(), text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].line, 1);
        assert_eq!(records[1].line, 4);
    }

    #[test]
    fn malformed_jsonl_line_names_file_and_line() {
        let text = "{\"text\": \"a\"}\n{\"text\": \"b\"\n";
        let err = read_records(p(), text).unwrap_err();
        assert!(matches!(err, DataError::Json { line: 2, element: None, .. }), "{err:?}");
        assert!(err.to_string().starts_with("d.jsonl:2: malformed JSON"), "{err}");
    }

    #[test]
    fn json_array_elements_get_their_lines() {
        let text = "\n  [\n  {\"text\": \"a, [b] {c}\\\" x\"},\n\n  {\"text\":\n \"b\"}, {\"text\": \"c\"}\n]\n";
        let records = read_records(p(), text).unwrap();
        let where_: Vec<_> = records.iter().map(|r| (r.line, r.element)).collect();
        assert_eq!(where_, vec![(3, Some(0)), (5, Some(1)), (6, Some(2))]);
    }

    #[test]
    fn json_array_field_error_names_element_and_line() {
        let text = "[\n{\"text\": \"a\"},\n{\"text\": 3}\n]";
        let records = read_records(p(), text).unwrap();
        let err = parse_record(p(), &records[1], Format::Completion).unwrap_err();
        assert!(matches!(&err, DataError::Field { line: 3, element: Some(1), key, .. } if key == "text"), "{err:?}");
        assert_eq!(err.to_string(), "d.jsonl:3 (element 1): `text`: expected a string, found a number");
    }

    #[test]
    fn malformed_json_array_reports_line() {
        let err = read_records(p(), "[\n{\"text\": \"a\"},\n{\"text\" \"b\"}\n]").unwrap_err();
        assert!(matches!(err, DataError::Json { line: 3, .. }), "{err:?}");
    }

    #[test]
    fn detects_formats_from_keys() {
        let detect = |s: &str| {
            let records = read_records(p(), s).unwrap();
            detect_format(p(), &records[0])
        };
        assert_eq!(detect(r#"{"messages": []}"#).unwrap(), Format::Chat);
        assert_eq!(detect(r#"{"instruction": "x", "output": "y"}"#).unwrap(), Format::Alpaca);
        assert_eq!(detect(r#"{"text": "x"}"#).unwrap(), Format::Completion);
        assert_eq!(detect(r#"{"prompt": "x", "completion": "y"}"#).unwrap(), Format::Completion);
        let err = detect("\n{\"question\": \"x\", \"answer\": \"y\"}").unwrap_err();
        assert!(matches!(&err, DataError::UnknownLayout { line: 2, keys, .. } if keys == &["answer", "question"]));
        assert!(err.to_string().contains("d.jsonl:2"), "{err}");
        assert!(err.to_string().contains("[answer, question]"), "{err}");
    }

    #[test]
    fn chat_field_errors_name_the_field() {
        let check = |s: &str, key: &str, needle: &str| {
            let records = read_records(p(), s).unwrap();
            let err = parse_record(p(), &records[0], Format::Chat).unwrap_err();
            match &err {
                DataError::Field { key: k, line: 1, .. } => assert_eq!(k, key, "{err}"),
                other => panic!("unexpected {other:?}"),
            }
            assert!(err.to_string().contains(needle), "{err}");
        };
        check(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}"#,
            "messages[1].content",
            "expected a string, found a number",
        );
        check(r#"{"messages": [{"role": "bot", "content": "hi"}]}"#, "messages[0].role", "unknown role \"bot\"");
        check(r#"{"messages": [{"content": "hi"}]}"#, "messages[0].role", "missing");
        check(r#"{"messages": "hi"}"#, "messages", "expected an array");
        check(r#"{"messages": []}"#, "messages", "empty");
        check(r#"{"messages": [3]}"#, "messages[0]", "expected an object");
    }

    #[test]
    fn alpaca_input_is_optional() {
        let records = read_records(p(), r#"{"instruction": "i", "input": "", "output": "o"}"#).unwrap();
        let record = parse_record(p(), &records[0], Format::Alpaca).unwrap();
        assert_eq!(record, Record::Alpaca { instruction: "i".into(), input: None, output: "o".into() });
        let records = read_records(p(), r#"{"instruction": "i", "output": 1}"#).unwrap();
        let err = parse_record(p(), &records[0], Format::Alpaca).unwrap_err();
        assert!(matches!(&err, DataError::Field { key, .. } if key == "output"));
    }

    #[test]
    fn utf8_line() {
        assert_eq!(line_of_offset(b"a\nb\nc", 4), 3);
        assert_eq!(line_of_offset(b"a", 0), 1);
    }
}
