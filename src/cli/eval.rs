//! `peftkit eval --base M [--adapter DIR] [--load-in-4bit] --data FILE [--format F] [--json]`

use super::{load_model, user, ModelArgs};
use anyhow::Result;
use peftkit::data::{self, EncodeOptions, Format};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The dataset (JSONL or JSON array).
    #[arg(long)]
    pub data: PathBuf,
    /// chat, alpaca or completion (default: detected from the first record).
    #[arg(long)]
    pub format: Option<String>,
    /// Longer examples are truncated to this many tokens.
    #[arg(long, default_value_t = 2048)]
    pub sequence_len: usize,
    /// Also score prompt tokens (chat and alpaca data), as a recipe with `train_on_inputs: true` trains.
    #[arg(long)]
    pub train_on_inputs: bool,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Print one JSON line: {"loss": …, "perplexity": …, "tokens": …}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let format: Option<Format> = a.format.as_deref().map(str::parse).transpose().map_err(user)?;
    if a.sequence_len == 0 || a.batch_size == 0 {
        return Err(user(anyhow::anyhow!("--sequence-len and --batch-size must be positive")));
    }
    let base = load_model(&a.model)?;
    // The file is scored as in training: loss on supervised tokens only.
    let opts = EncodeOptions { sequence_len: a.sequence_len, train_on_inputs: a.train_on_inputs };
    let ds =
        data::load_dataset(&a.data, format, &base.tokenizer, base.template.as_ref(), base.eos_token.as_deref(), &opts)
            .map_err(user)?;
    let r = peftkit::train::evaluate(&base.model, &ds.examples, a.batch_size, base.pad_id)?;
    if a.json {
        println!("{}", serde_json::json!({"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}));
    } else {
        println!(
            "{}: {} examples ({} format), {} predicted tokens: loss {:.4}, perplexity {:.3}",
            a.data.display(),
            ds.stats.examples,
            ds.format,
            r.tokens,
            r.loss,
            r.perplexity
        );
        if ds.stats.truncated > 0 {
            println!("note: {} examples were truncated to {} tokens", ds.stats.truncated, a.sequence_len);
        }
    }
    Ok(())
}
