//! `peftkit generate --base M --prompt TEXT [--chat [--system TEXT]] [sampling flags]`: one completion, streamed.
//! `peftkit chat --base M [--system TEXT] [sampling flags]`: an interactive conversation over stdin lines.
//!
//! Both load the base model (safetensors folder, Hub id or GGUF), optionally apply a PEFT adapter unmerged, and
//! stream the text to stdout as it is generated (the stop token is never printed). Sampling is
//! [`peftkit::generate::Sampler`]'s (transformers' order: repetition penalty, temperature, top-k, top-p).

use super::{load_model as load, user, ModelArgs};
use anyhow::{anyhow, Context, Result};
use peftkit::base::BaseModel;
use peftkit::data::{ChatTemplate, Message};
use peftkit::generate::{
    context_limit, GenerateError, GenerationOutput, Generator, SamplingParams, StopReason, TokenStream,
};
use std::io::{BufRead, IsTerminal, Write};
use tokenizers::Tokenizer;

/// How tokens are chosen; unset flags take the command's defaults.
#[derive(clap::Args)]
pub struct SamplingArgs {
    /// Most tokens to generate [default: 256].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy [default: 0 for generate, 0.7 for chat].
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1]; 1 = off [default: 0.9].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Keep only the K most likely tokens; 0 = off [default: 50].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Penalize tokens already in the context (> 1 discourages repeats); 1 = off [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f64>,
    /// Seed of the sampler: the same seed gives the same text [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The sampling parameters, with `temperature` as the command's default temperature; bad values are the
    /// user's error, named by their flag.
    fn params(&self, default_temperature: f64) -> Result<SamplingParams> {
        let d = SamplingParams::default();
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(default_temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed: self.seed.unwrap_or(d.seed),
            max_new_tokens: self.max_new_tokens.unwrap_or(d.max_new_tokens),
        };
        let bad = |msg: String| Err(user(anyhow!(msg)));
        if !(p.temperature.is_finite() && p.temperature >= 0.0) {
            return bad(format!("--temperature must be a number ≥ 0 (0 = greedy), got {}", p.temperature));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return bad(format!("--top-p must be in (0, 1] (1 = off), got {}", p.top_p));
        }
        if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
            return bad(format!("--repetition-penalty must be a number > 0 (1 = off), got {}", p.repetition_penalty));
        }
        if p.max_new_tokens == 0 {
            return bad("--max-new-tokens must be at least 1".to_string());
        }
        p.validate().map_err(user)?;
        Ok(p)
    }
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt: raw text, or with --chat the user message.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as one user turn with the model's chat template (and its generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The system message (change it during the chat with /system TEXT).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    // Flags are checked before the (slow) model load.
    let params = a.sampling.params(0.0)?;
    let (base, _adapters) = load(&a.model, true)?;
    let (text, add_special_tokens) = if a.chat {
        let template = require_template(&base, "--chat")?;
        let mut messages = Vec::new();
        if let Some(system) = &a.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &a.prompt));
        // The template writes the BOS text itself when the model wants one.
        (template.render(&messages, true).map_err(user)?, false)
    } else {
        (a.prompt.clone(), true)
    };
    let ids = encode(&base.tokenizer, &text, add_special_tokens)?;
    let mut printer = Printer::default();
    let out = stream_reply(&mut Generator::new(&base.model), &base, &ids, &params, &mut printer)?;
    eprintln!(
        "{} tokens in {:.2} s ({:.1} tokens/s), prompt {} tokens in {:.2} s",
        out.tokens.len(),
        out.decode_secs,
        out.tokens_per_sec(),
        out.prompt_tokens,
        out.prefill_secs
    );
    note_context_full(&out, &base);
    Ok(())
}

/// The commands a chat line can start with.
const CHAT_HELP: &str = "commands:
  /reset          clear the conversation (the system message stays)
  /system TEXT    set the system message and clear the conversation (/system alone removes it)
  /adapter NAME   make the --adapter NAME active (the base stays loaded); the conversation is kept, and the
                  next reply is computed afresh with the new adapter
  /adapter none   the base alone (also /adapter base)
  /adapter        list the loaded adapters, the active one marked with *
  /exit, /quit    leave (Ctrl-D too)
  /help           this list
a line starting with // is sent as a message starting with /";

pub fn run_chat(a: ChatArgs) -> Result<()> {
    let params = a.sampling.params(SamplingParams::default().temperature)?;
    let (mut base, mut adapters) = load(&a.model, true)?;
    let template = require_template(&base, "`peftkit chat`")?.clone();
    let template = &template;
    let limit = context_limit(&base.model.config);
    // Room kept for the reply when old turns must be dropped to fit the context.
    let reply_room = params.max_new_tokens.min(limit / 2);
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chatting with {} (/help for commands, Ctrl-D to leave)", base.name);
    }
    let mut system = a.system.clone();
    // user and assistant turns, alternating, without the system message
    let mut history: Vec<Message> = Vec::new();
    // Rebuilt (its cache dropped) when the active adapter changes: the cached keys and values were the old one's.
    let mut generator = Some(Generator::new(&base.model));
    let mut printer = Printer::default();
    let mut stdin = std::io::stdin().lock();
    let mut raw = Vec::new();
    let mut turn = 0u64;
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        raw.clear();
        if stdin.read_until(b'\n', &mut raw).context("reading stdin")? == 0 {
            if interactive {
                eprintln!();
            }
            break; // EOF
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        let message = if let Some(literal) = line.strip_prefix("//") {
            format!("/{literal}")
        } else if let Some(command) = line.strip_prefix('/') {
            let (name, arg) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
            match name {
                "exit" | "quit" => break,
                "reset" => {
                    history.clear();
                    eprintln!("(conversation cleared)");
                }
                "system" => {
                    let arg = arg.trim();
                    system = (!arg.is_empty()).then(|| arg.to_string());
                    history.clear();
                    eprintln!(
                        "(system message {}; conversation cleared)",
                        if system.is_some() { "set" } else { "removed" }
                    );
                }
                "adapter" => {
                    let arg = arg.trim();
                    if arg.is_empty() {
                        eprintln!("{}", adapter_list(&adapters));
                    } else if adapters.is_empty() {
                        eprintln!("(no adapter is loaded: start the chat with --adapter NAME=DIR)");
                    } else {
                        let name = Some(arg).filter(|a| !matches!(*a, "none" | "base"));
                        if name == adapters.active() {
                            eprintln!("(already active)");
                            continue;
                        }
                        generator = None;
                        match adapters.activate(&mut base.model, name) {
                            Ok(()) => eprintln!("(adapter: {})", name.unwrap_or("none, the base alone")),
                            Err(e) => eprintln!("{e}"),
                        }
                    }
                }
                "help" => eprintln!("{CHAT_HELP}"),
                _ => eprintln!("unknown command /{name} (not sent to the model); /help lists the commands"),
            }
            continue;
        } else {
            line.to_string()
        };

        history.push(Message::new("user", message));
        let Some(ids) = fit_prompt(template, &base.tokenizer, system.as_deref(), &mut history, limit, reply_room)?
        else {
            continue;
        };
        let turn_params = SamplingParams { seed: params.seed.wrapping_add(turn), ..params.clone() };
        turn += 1;
        let generator = generator.get_or_insert_with(|| Generator::new(&base.model));
        let out = stream_reply(generator, &base, &ids, &turn_params, &mut printer)?;
        tracing::debug!(
            "{} tokens in {:.2} s ({:.1} tokens/s), prompt {} tokens ({} from the cache) in {:.2} s",
            out.tokens.len(),
            out.decode_secs,
            out.tokens_per_sec(),
            out.prompt_tokens,
            out.reused_tokens,
            out.prefill_secs
        );
        note_context_full(&out, &base);
        let reply =
            base.tokenizer.decode(out.content_tokens(), true).map_err(|e| anyhow!("decoding the reply: {e}"))?;
        history.push(Message::new("assistant", reply));
        if printer.closed {
            break; // nobody reads the replies any more
        }
    }
    Ok(())
}

/// The `/adapter` listing: every loaded adapter, the active one marked.
fn adapter_list(adapters: &peftkit::peft_model::multi::AdapterSet) -> String {
    if adapters.is_empty() {
        return "(no adapter is loaded: the base alone)".to_string();
    }
    let mut out = String::from("adapters:");
    for name in adapters.names() {
        let mark = if adapters.active() == Some(name) { "*" } else { " " };
        let dir = adapters.get(name).map(|(d, _)| d.display().to_string()).unwrap_or_default();
        out.push_str(&format!("\n {mark} {name}  {dir}"));
    }
    let mark = if adapters.active().is_none() { "*" } else { " " };
    out.push_str(&format!("\n {mark} none  (the base alone)"));
    out
}

/// Renders the conversation and tokenizes it, dropping the oldest exchanges while the prompt leaves less than
/// `reply_room` tokens of the context. `None` (with a note on stderr, the message removed from `history`) when
/// the template refuses the conversation or the last message alone does not fit.
fn fit_prompt(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    system: Option<&str>,
    history: &mut Vec<Message>,
    limit: usize,
    reply_room: usize,
) -> Result<Option<Vec<u32>>> {
    loop {
        let mut messages: Vec<Message> = system.map(|s| Message::new("system", s)).into_iter().collect();
        messages.extend(history.iter().cloned());
        let text = match template.render(&messages, true) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e} (message not sent)");
                history.pop();
                return Ok(None);
            }
        };
        let ids = encode(tokenizer, &text, false)?;
        if ids.len() + reply_room <= limit || (history.len() == 1 && ids.len() < limit) {
            return Ok(Some(ids));
        }
        if history.len() == 1 {
            eprintln!(
                "error: the message is {} tokens long, the model's context holds {limit} (message not sent)",
                ids.len()
            );
            history.pop();
            return Ok(None);
        }
        // Drop the oldest user/assistant exchange (never the new message).
        history.drain(..2.min(history.len() - 1));
        eprintln!("(oldest turn dropped to fit the model's context of {limit} tokens)");
    }
}

/// Loads the base model and applies `--adapter` (unmerged), warning when it was trained on another base.
/// Generates from `ids`, printing the text as it comes (never the stop token) and a final newline.
fn stream_reply(
    generator: &mut Generator,
    base: &BaseModel,
    ids: &[u32],
    params: &SamplingParams,
    printer: &mut Printer,
) -> Result<GenerationOutput> {
    let mut stream = TokenStream::new(&base.tokenizer);
    let out = generator
        .generate(ids, params, &base.stop_ids, |id| -> Result<bool> {
            match stream.push(id)? {
                Some(piece) => printer.write(&piece),
                None => Ok(true),
            }
        })
        .map_err(generation_error)?;
    if let Some(piece) = stream.finish()? {
        printer.write(&piece)?;
    }
    printer.write("\n")?;
    Ok(out)
}

fn require_template<'b>(base: &'b BaseModel, what: &str) -> Result<&'b ChatTemplate> {
    base.template.as_ref().ok_or_else(|| {
        user(anyhow!(
            "{} has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json or GGUF \
             metadata), which {what} needs; `peftkit generate --prompt TEXT` without --chat sends raw text",
            base.name
        ))
    })
}

fn encode(tokenizer: &Tokenizer, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
    let enc = tokenizer.encode(text, add_special_tokens).map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// Prompts the user can fix (too long, empty) are their error; the rest is internal.
fn generation_error(e: GenerateError) -> anyhow::Error {
    match e {
        GenerateError::EmptyPrompt
        | GenerateError::PromptTooLong { .. }
        | GenerateError::InvalidParams(_)
        | GenerateError::TokenOutOfRange { .. } => user(e),
        other => other.into(),
    }
}

fn note_context_full(out: &GenerationOutput, base: &BaseModel) {
    if out.stop == StopReason::ContextFull {
        eprintln!(
            "note: generation stopped: the model's context of {} tokens is full",
            context_limit(&base.model.config)
        );
    }
}

/// Streams text to stdout, flushing every piece. A closed pipe (`peftkit generate … | head`) is not an error: it
/// ends generation quietly.
#[derive(Default)]
struct Printer {
    closed: bool,
}

impl Printer {
    /// Writes `text`; `Ok(false)` once nobody reads stdout any more.
    fn write(&mut self, text: &str) -> Result<bool> {
        if self.closed {
            return Ok(false);
        }
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(false)
            }
            Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
        }
    }
}
