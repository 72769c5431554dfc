//! Records → training examples: token ids plus labels aligned with them, as in transformers
//! (`labels[i] = input_ids[i]` where supervised, `-100` elsewhere; the one-position shift happens in
//! the loss, not here).
//!
//! - chat: the whole conversation is rendered with the chat template and tokenized without added
//!   special tokens (the template places bos itself). Each assistant turn is located in the rendered
//!   text by rendering prefixes of the conversation (up to the turn with the generation prompt, and
//!   through the turn), narrowed to the turn's content plus its end-of-turn token (`<|im_end|>`,
//!   `<|eot_id|>`, `</s>` …), and mapped to tokens through the encoding's byte offsets. This is the
//!   span TRL's `assistant_only_loss` supervises, found without `{% generation %}` markers.
//! - alpaca: the Stanford Alpaca prompt, then the output, tokenized together with the tokenizer's
//!   default special tokens, then the eos id; the output and eos are supervised.
//! - completion: `tokenizer.encode(text, add_special_tokens=true)`, every token supervised.

use std::borrow::Cow;
use std::ops::Range;

use tokenizers::Tokenizer;

use super::records::Record;
use super::template::{ChatTemplate, Message};

/// The label of a position that does not contribute to the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// One training sequence.
///
/// Invariant: `input_ids.len() == labels.len()`; `labels[i]` is `input_ids[i] as i32` or [`IGNORE_INDEX`]
/// (pre-tokenized records may give any token id as a label).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Example {
    /// Token ids, length t.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` (not shifted), length t.
    pub labels: Vec<i32>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True when the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of supervised positions (labels other than [`IGNORE_INDEX`]).
    pub fn supervised(&self) -> usize {
        self.labels.iter().filter(|&&label| label != IGNORE_INDEX).count()
    }

    /// Keeps the first `sequence_len` tokens; true when something was cut.
    pub fn truncate(&mut self, sequence_len: usize) -> bool {
        let cut = self.input_ids.len() > sequence_len;
        self.input_ids.truncate(sequence_len);
        self.labels.truncate(sequence_len);
        cut
    }
}

/// How records become examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Maximum tokens per example: longer ones keep their head.
    pub sequence_len: usize,
    /// Supervise every token (prompts included), not only the responses. Pre-tokenized records keep their labels.
    pub train_on_inputs: bool,
    /// The model's vocabulary size, which pre-tokenized ids and labels must stay below; `None`: the
    /// tokenizer's (added tokens included).
    pub vocab_size: Option<usize>,
}

/// The Stanford Alpaca prompt for an instruction with an optional input.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input {
        Some(input) => format!(
            "Below is an instruction that describes a task, paired with an input that provides further \
             context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        None => format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    }
}

/// Token ids and their byte offsets `(start, end)` into the tokenized text; both length t.
type Tokenized = (Vec<u32>, Vec<(usize, usize)>);

/// Turns validated records into untruncated examples. Shared read-only across rayon workers.
pub(crate) struct Encoder<'a> {
    /// The caller's tokenizer, or a copy of it with truncation and padding turned off (as
    /// transformers' `tokenizer(text)` turns them off).
    tokenizer: Cow<'a, Tokenizer>,
    template: Option<&'a ChatTemplate>,
    /// Appended to alpaca examples; required for them.
    eos_id: Option<u32>,
    /// Texts that end an assistant turn: the tokenizer's special added tokens and the eos token.
    end_markers: Vec<String>,
    train_on_inputs: bool,
}

impl<'a> Encoder<'a> {
    /// An encoder; `eos_token` (text) is counted among the end-of-turn markers.
    pub fn new(
        tokenizer: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        eos_id: Option<u32>,
        eos_token: Option<&str>,
        train_on_inputs: bool,
    ) -> Self {
        let tokenizer = if tokenizer.get_truncation().is_some() || tokenizer.get_padding().is_some() {
            let mut owned = tokenizer.clone();
            owned.with_padding(None);
            // Turning truncation off cannot fail (only invalid parameters are rejected).
            let _ = owned.with_truncation(None);
            Cow::Owned(owned)
        } else {
            Cow::Borrowed(tokenizer)
        };
        let mut end_markers: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|token| token.special && !token.content.is_empty())
            .map(|token| token.content)
            .collect();
        end_markers.extend(
            [eos_token, template.map(|t| t.eos_token())]
                .into_iter()
                .flatten()
                .filter(|t| !t.is_empty())
                .map(String::from),
        );
        end_markers.sort();
        end_markers.dedup();
        Self { tokenizer, template, eos_id, end_markers, train_on_inputs }
    }

    /// Encodes one record (no truncation). Errors are messages; the caller adds file:line.
    pub fn encode(&self, record: &Record) -> Result<Example, String> {
        match record {
            Record::Chat(messages) => self.encode_chat(messages),
            Record::Alpaca { instruction, input, output } => {
                self.encode_alpaca(&alpaca_prompt(instruction, input.as_deref()), output)
            }
            Record::Completion { prompt: None, text } => {
                let (ids, _) = self.tokenize(text, true)?;
                Ok(Example { labels: all_labels(&ids), input_ids: ids })
            }
            Record::Completion { prompt: Some(prompt), text } => {
                let full = format!("{prompt}{text}");
                let (ids, offsets) = self.tokenize(&full, true)?;
                let labels = self.labels(&ids, &offsets, prompt.len()..full.len());
                Ok(Example { input_ids: ids, labels })
            }
            // Pre-tokenized: taken as they are (checked when parsed).
            Record::Tokens { input_ids, labels } => {
                Ok(Example { input_ids: input_ids.clone(), labels: labels.clone() })
            }
        }
    }

    fn encode_chat(&self, messages: &[Message]) -> Result<Example, String> {
        let template = self.template.ok_or("chat records need a chat template")?;
        let text = template.render(messages, false).map_err(|err| err.to_string())?;
        let (ids, offsets) = self.tokenize(&text, false)?;
        let labels = if self.train_on_inputs {
            all_labels(&ids)
        } else {
            let spans = assistant_spans(template, messages, &text, &self.end_markers)?;
            mask(&ids, &offsets, &spans)
        };
        Ok(Example { input_ids: ids, labels })
    }

    /// `prompt + output` tokenized together (so the boundary merges as at inference), then eos.
    fn encode_alpaca(&self, prompt: &str, output: &str) -> Result<Example, String> {
        let eos = self.eos_id.ok_or("alpaca records need an eos token")?;
        let full = format!("{prompt}{output}");
        let (mut ids, offsets) = self.tokenize(&full, true)?;
        let mut labels = self.labels(&ids, &offsets, prompt.len()..full.len());
        if ids.last() == Some(&eos) {
            // The tokenizer's post-processor already appends eos: supervise that one.
            if let Some(last) = labels.last_mut() {
                *last = label(eos);
            }
        } else {
            ids.push(eos);
            labels.push(label(eos));
        }
        Ok(Example { input_ids: ids, labels })
    }

    /// Labels: everything with `train_on_inputs`, else the tokens overlapping the `response` bytes.
    fn labels(&self, ids: &[u32], offsets: &[(usize, usize)], response: Range<usize>) -> Vec<i32> {
        if self.train_on_inputs {
            all_labels(ids)
        } else {
            mask(ids, offsets, std::slice::from_ref(&response))
        }
    }

    /// Token ids and their byte offsets into `text`.
    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Tokenized, String> {
        let encoding = self.tokenizer.encode(text, add_special_tokens).map_err(|err| format!("tokenizer: {err}"))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }
}

/// A token id as a label. Vocabularies are far below 2³¹; an id that is not would be masked rather
/// than wrapped to a negative label.
fn label(id: u32) -> i32 {
    i32::try_from(id).unwrap_or(IGNORE_INDEX)
}

fn all_labels(ids: &[u32]) -> Vec<i32> {
    ids.iter().map(|&id| label(id)).collect()
}

/// `labels[i] = ids[i]` when token i's byte range `offsets[i]` overlaps one of `spans`, else -100.
///
/// A zero-width token (e.g. one added by the post-processor, offsets (0, 0)) counts as inside a span
/// when its position is. Shapes: `ids` and `offsets` both length t; spans are byte ranges.
pub(crate) fn mask(ids: &[u32], offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<i32> {
    ids.iter()
        .zip(offsets)
        .map(|(&id, &(start, end))| {
            let inside = spans.iter().any(|span| {
                if start == end {
                    span.start <= start && start < span.end
                } else {
                    start < span.end && end > span.start
                }
            });
            if inside {
                label(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect()
}

/// Byte ranges in `full` (the rendering of all of `messages`) to supervise: for each assistant
/// message, its content plus the end-of-turn marker that follows it.
///
/// Turn i is `full[len(P)..len(Q)]` where P renders `messages[..i]` with the generation prompt and
/// Q renders `messages[..=i]` without it, when P is a prefix of Q and Q of `full`. Templates that
/// render history differently from the last turn (e.g. moving the system prompt to the last user
/// message) break that; then the text Q adds after its common prefix with P is searched for in
/// `full` after the previous turn.
pub(crate) fn assistant_spans(
    template: &ChatTemplate,
    messages: &[Message],
    full: &str,
    end_markers: &[String],
) -> Result<Vec<Range<usize>>, String> {
    let mut spans = Vec::new();
    // Byte offset in `full` where the previous assistant turn ended; turns are found in order.
    let mut cursor = 0usize;
    for (index, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        // An empty conversation is not rendered: templates index `messages[0]` unguarded.
        let before = if index == 0 {
            String::new()
        } else {
            template.render(&messages[..index], true).map_err(|err| err.to_string())?
        };
        let through = template.render(&messages[..=index], false).map_err(|err| err.to_string())?;
        let turn = if through.starts_with(&before) && full.starts_with(&through) && before.len() >= cursor {
            before.len()..through.len()
        } else {
            let added = &through[common_prefix_len(&before, &through)..];
            if added.trim().is_empty() {
                return Err(format!("the chat template renders nothing for messages[{index}] (assistant)"));
            }
            let start =
                full.get(cursor..).and_then(|rest| rest.find(added)).map(|position| cursor + position).ok_or_else(
                    || {
                        format!(
                            "cannot locate messages[{index}] (assistant) in the rendered conversation: the chat \
                         template renders that turn differently when it is not the last one"
                        )
                    },
                )?;
            start..start + added.len()
        };
        cursor = turn.end;
        spans.push(narrow_turn(full, turn, &message.content, end_markers));
    }
    Ok(spans)
}

/// Narrows a rendered assistant turn `full[turn]` to the content and the first end marker after it.
///
/// The content is located as rendered (or trimmed, for templates that `| trim` it); text a template
/// adds before the content (role headers, empty think blocks) and after the marker (newlines) is
/// left out. When the content cannot be located (empty, or transformed by the template), the whole
/// turn without trailing whitespace is kept.
fn narrow_turn(full: &str, turn: Range<usize>, content: &str, end_markers: &[String]) -> Range<usize> {
    let segment = &full[turn.clone()];
    match locate_content(segment, content) {
        Some(found) => {
            let after = &segment[found.end..];
            let end = earliest_marker(after, end_markers)
                .map(|(position, len)| found.end + position + len)
                .unwrap_or_else(|| found.end.max(segment.trim_end().len()));
            turn.start + found.start..turn.start + end
        }
        None => turn.start..turn.start + segment.trim_end().len(),
    }
}

/// Where `content` sits in a rendered turn: at its start (after whitespace) when it is there, else
/// its last occurrence (role headers come first, so the last match is the content), verbatim or trimmed.
fn locate_content(segment: &str, content: &str) -> Option<Range<usize>> {
    let trimmed = content.trim();
    if trimmed.is_empty() {
        return None;
    }
    if segment.starts_with(content) {
        return Some(0..content.len());
    }
    let lead = segment.len() - segment.trim_start().len();
    if segment[lead..].starts_with(trimmed) {
        return Some(lead..lead + trimmed.len());
    }
    for needle in [content, trimmed] {
        if let Some(position) = segment.rfind(needle) {
            return Some(position..position + needle.len());
        }
    }
    None
}

/// The earliest occurrence of any marker in `text`: (position, marker length); longest wins ties.
fn earliest_marker(text: &str, markers: &[String]) -> Option<(usize, usize)> {
    markers
        .iter()
        .filter_map(|marker| text.find(marker.as_str()).map(|position| (position, marker.len())))
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
}

/// Length in bytes of the longest common prefix of `a` and `b`, at a char boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((position, _), _)| position)
        .unwrap_or_else(|| a.len().min(b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{
        fixture_template, fixture_tokenizer, tokenizer_with_specials, LLAMA3, LLAMA31, MISTRAL, MISTRAL_V03, QWEN25,
        SMOLLM2,
    };
    use tokenizers::Tokenizer;

    fn m(role: &str, content: &str) -> Message {
        Message::new(role, content)
    }

    /// The supervised ids decoded (special tokens kept), one string per contiguous run.
    fn supervised_runs(tokenizer: &Tokenizer, example: &Example) -> Vec<String> {
        let mut runs = Vec::new();
        let mut current: Vec<u32> = Vec::new();
        for (&id, &label) in example.input_ids.iter().zip(&example.labels) {
            if label == IGNORE_INDEX {
                if !current.is_empty() {
                    runs.push(tokenizer.decode(&current, false).unwrap());
                    current.clear();
                }
            } else {
                assert_eq!(label, id as i32);
                current.push(id);
            }
        }
        if !current.is_empty() {
            runs.push(tokenizer.decode(&current, false).unwrap());
        }
        runs
    }

    fn conversation() -> Vec<Message> {
        vec![
            m("system", "You are terse."),
            m("user", "What is 2+2?"),
            m("assistant", "It is 4."),
            m("user", "And 3+3?"),
            m("assistant", "Six, of course."),
        ]
    }

    #[test]
    fn chatml_labels_cover_assistant_content_and_im_end() {
        let tokenizer = fixture_tokenizer();
        let template = fixture_template();
        let encoder = Encoder::new(&tokenizer, Some(&template), None, None, false);
        let example = encoder.encode(&Record::Chat(conversation())).unwrap();
        assert_eq!(supervised_runs(&tokenizer, &example), vec!["It is 4.<|im_end|>", "Six, of course.<|im_end|>"]);
        // The ids are exactly the rendered text tokenized without added special tokens.
        let text = template.render(&conversation(), false).unwrap();
        assert_eq!(example.input_ids, tokenizer.encode(text.as_str(), false).unwrap().get_ids());

        let all =
            Encoder::new(&tokenizer, Some(&template), None, None, true).encode(&Record::Chat(conversation())).unwrap();
        assert_eq!(all.supervised(), all.len());
    }

    #[test]
    fn smollm2_and_qwen25_default_system_is_masked() {
        let tokenizer = fixture_tokenizer();
        for source in [SMOLLM2, QWEN25] {
            let template = ChatTemplate::new(source.into(), String::new(), "<|im_end|>".into()).unwrap();
            let encoder = Encoder::new(&tokenizer, Some(&template), None, None, false);
            let messages = vec![m("user", "Hi"), m("assistant", "Hello!"), m("user", "Bye"), m("assistant", " Bye. ")];
            let example = encoder.encode(&Record::Chat(messages.clone())).unwrap();
            assert_eq!(supervised_runs(&tokenizer, &example), vec!["Hello!<|im_end|>", " Bye. <|im_end|>"]);
            // Also with the system message given, and with an assistant turn first.
            let mut with_system = vec![m("system", "S")];
            with_system.extend(messages);
            let example = encoder.encode(&Record::Chat(with_system)).unwrap();
            assert_eq!(supervised_runs(&tokenizer, &example), vec!["Hello!<|im_end|>", " Bye. <|im_end|>"]);
            let example = encoder.encode(&Record::Chat(vec![m("assistant", "First."), m("user", "ok")])).unwrap();
            assert_eq!(supervised_runs(&tokenizer, &example), vec!["First.<|im_end|>"]);
        }
    }

    #[test]
    fn llama3_masks_content_plus_eot() {
        let tokenizer =
            tokenizer_with_specials(&["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]);
        let template = ChatTemplate::new(LLAMA3.into(), "<|begin_of_text|>".into(), "<|eot_id|>".into()).unwrap();
        let messages = vec![
            m("system", "Sys."),
            m("user", "Hi"),
            m("assistant", "  Hello there.\n"),
            m("user", "x"),
            m("assistant", "Bye."),
        ];
        let text = template.render(&messages, false).unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello there.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nBye.<|eot_id|>"
        );
        let encoder = Encoder::new(&tokenizer, Some(&template), None, None, false);
        let example = encoder.encode(&Record::Chat(messages)).unwrap();
        assert_eq!(supervised_runs(&tokenizer, &example), vec!["Hello there.<|eot_id|>", "Bye.<|eot_id|>"]);
        // bos is a single token at the start, placed by the template.
        assert_eq!(example.input_ids[0], tokenizer.token_to_id("<|begin_of_text|>").unwrap());

        // Assistant first: the prefix rendering differs (no bos without messages), the fallback finds it.
        let example = encoder.encode(&Record::Chat(vec![m("assistant", "a"), m("user", "u")])).unwrap();
        assert_eq!(supervised_runs(&tokenizer, &example), vec!["a<|eot_id|>"]);
    }

    #[test]
    fn llama31_system_header_with_date_is_masked() {
        let tokenizer =
            tokenizer_with_specials(&["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]);
        let template = ChatTemplate::new(LLAMA31.into(), "<|begin_of_text|>".into(), "<|eot_id|>".into()).unwrap();
        let messages = vec![
            m("system", " Sys. "),
            m("user", "Hi"),
            m("assistant", "Hello."),
            m("user", "x"),
            m("assistant", "Bye."),
        ];
        let text = template.render(&messages, false).unwrap();
        assert!(text.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: "), "{text}");
        assert!(text.ends_with("\n\nSys.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBye.<|eot_id|>"), "{text}");
        let encoder = Encoder::new(&tokenizer, Some(&template), None, None, false);
        for messages in [messages.clone(), messages[1..].to_vec()] {
            let example = encoder.encode(&Record::Chat(messages)).unwrap();
            assert_eq!(supervised_runs(&tokenizer, &example), vec!["Hello.<|eot_id|>", "Bye.<|eot_id|>"]);
        }
    }

    #[test]
    fn mistral_masks_content_plus_eos_and_reports_raise_exception() {
        let tokenizer = tokenizer_with_specials(&["<s>", "</s>", "[INST]", "[/INST]"]);
        let template = ChatTemplate::new(MISTRAL.into(), "<s>".into(), "</s>".into()).unwrap();
        let encoder = Encoder::new(&tokenizer, Some(&template), None, Some("</s>"), false);
        let messages = vec![m("user", "Hi"), m("assistant", "Hello."), m("user", "More"), m("assistant", "Sure.")];
        let example = encoder.encode(&Record::Chat(messages)).unwrap();
        assert_eq!(supervised_runs(&tokenizer, &example), vec!["Hello.</s>", "Sure.</s>"]);

        let err = encoder.encode(&Record::Chat(vec![m("user", "a"), m("user", "b")])).unwrap_err();
        assert!(err.contains("Conversation roles must alternate user/assistant/user/assistant/..."), "{err}");
        let err = encoder.encode(&Record::Chat(vec![m("system", "s"), m("user", "b")])).unwrap_err();
        assert!(err.contains("Conversation roles must alternate"), "{err}");
    }

    #[test]
    fn mistral_v03_system_in_last_user_uses_fallback() {
        let tokenizer = tokenizer_with_specials(&["<s>", "</s>", "[INST]", "[/INST]"]);
        let template = ChatTemplate::new(MISTRAL_V03.into(), "<s>".into(), "</s>".into()).unwrap();
        let encoder = Encoder::new(&tokenizer, Some(&template), None, Some("</s>"), false);
        let messages = vec![
            m("system", "Sys"),
            m("user", "Hi"),
            m("assistant", "Hello."),
            m("user", "More"),
            m("assistant", " Sure. "),
        ];
        let text = template.render(&messages, false).unwrap();
        assert_eq!(text, "<s>[INST] Hi[/INST] Hello.</s>[INST] More[/INST] Sure.</s>");
        let example = encoder.encode(&Record::Chat(messages)).unwrap();
        let runs = supervised_runs(&tokenizer, &example);
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!(runs[0].trim_start() == "Hello.</s>" && runs[1].trim_start() == "Sure.</s>", "{runs:?}");
    }

    #[test]
    fn alpaca_masks_prompt() {
        let tokenizer = fixture_tokenizer();
        let eos = tokenizer.token_to_id("<|im_end|>").unwrap();
        let record = Record::Alpaca { instruction: "Add.".into(), input: Some("2 and 2".into()), output: "4".into() };
        let example = Encoder::new(&tokenizer, None, Some(eos), None, false).encode(&record).unwrap();
        let prompt = alpaca_prompt("Add.", Some("2 and 2"));
        assert!(prompt.ends_with("### Input:\n2 and 2\n\n### Response:\n"));
        let expected: Vec<u32> = tokenizer.encode(format!("{prompt}4").as_str(), true).unwrap().get_ids().to_vec();
        assert_eq!(&example.input_ids[..expected.len()], &expected[..]);
        assert_eq!(example.input_ids.len(), expected.len() + 1);
        assert_eq!(*example.input_ids.last().unwrap(), eos);
        assert_eq!(supervised_runs(&tokenizer, &example), vec!["4<|im_end|>"]);
        let all = Encoder::new(&tokenizer, None, Some(eos), None, true).encode(&record).unwrap();
        assert_eq!(all.supervised(), all.len());
        assert_eq!(all.input_ids, example.input_ids);
        assert!(alpaca_prompt("I", None).contains(
            "Write a response that appropriately completes the request.\n\n### Instruction:\nI\n\n### Response:\n"
        ));
    }

    #[test]
    fn completion_ids_equal_tokenizer_encode() {
        let tokenizer = fixture_tokenizer();
        let text = "The quick brown fox<|im_end|> jumps.";
        let example = Encoder::new(&tokenizer, None, None, None, false)
            .encode(&Record::Completion { prompt: None, text: text.into() })
            .unwrap();
        assert_eq!(example.input_ids, tokenizer.encode(text, true).unwrap().get_ids());
        assert_eq!(example.supervised(), example.len());

        let record = Record::Completion { prompt: Some("Q: hi\nA:".into()), text: " hello".into() };
        let example = Encoder::new(&tokenizer, None, None, None, false).encode(&record).unwrap();
        assert_eq!(supervised_runs(&tokenizer, &example), vec![" hello"]);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn mask_overlap_rules() {
        let ids = [10, 11, 12, 13];
        let offsets = [(0, 0), (0, 3), (3, 5), (5, 9)];
        assert_eq!(mask(&ids, &offsets, &[4..6]), vec![-100, -100, 12, 13]);
        assert_eq!(mask(&ids, &offsets, &[0..1]), vec![10, 11, -100, -100]);
        assert_eq!(mask(&ids, &offsets, &[]), vec![-100; 4]);
    }

    #[test]
    fn truncation_keeps_head() {
        let mut example = Example { input_ids: vec![1, 2, 3], labels: vec![-100, 2, 3] };
        assert!(!example.truncate(3));
        assert!(example.truncate(2));
        assert_eq!(example, Example { input_ids: vec![1, 2], labels: vec![-100, 2] });
    }
}
