//! `peftkit export --adapter DIR --to gguf [--base M] [--outtype f32|f16|bf16|q8_0] --out FILE.gguf [--overwrite]`:
//! a PEFT LoRA adapter as llama.cpp's LoRA adapter GGUF, as `convert_lora_to_gguf.py` writes it
//! (see [`peftkit::gguf_adapter`]).

use super::{hub_options, user};
use anyhow::Result;
use peftkit::gguf_adapter::{export, ExportOptions, OutType};
use std::path::PathBuf;

/// The formats `export` writes.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// llama.cpp's LoRA adapter GGUF (for llama-cli / llama-server --lora).
    Gguf,
}

#[derive(clap::Args)]
pub struct Args {
    /// The PEFT LoRA adapter folder to export.
    #[arg(long)]
    pub adapter: PathBuf,
    /// The output format.
    #[arg(long, value_enum)]
    pub to: Format,
    /// The base model (a local model folder, a .gguf file or a Hub id), for its architecture and head counts
    /// [default: the adapter's base_model_name_or_path]. Only its configuration is read.
    #[arg(long)]
    pub base: Option<String>,
    /// Hub revision of the base model.
    #[arg(long)]
    pub revision: Option<String>,
    /// Tensor type of the LoRA weights: f32, f16, bf16 or q8_0 (rows not a multiple of 32 stay f16, as llama.cpp's
    /// converter does).
    #[arg(long, value_parser = OutType::parse, default_value = "f32")]
    pub outtype: OutType,
    /// The .gguf file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: Args) -> Result<()> {
    let Format::Gguf = args.to;
    let opts = ExportOptions {
        adapter: args.adapter,
        base: args.base,
        revision: args.revision,
        out: args.out,
        outtype: args.outtype,
        overwrite: args.overwrite,
        hub: hub_options(),
    };
    let report = match export(&opts) {
        Ok(r) => r,
        Err(e) if e.is_user_error() => return Err(user(e)),
        Err(e) => return Err(e.into()),
    };
    if !report.folded.is_empty() {
        tracing::info!(
            "{} module(s) have their own PEFT scale (alpha_pattern / rsLoRA rank_pattern): folded into lora_b",
            report.folded.len()
        );
    }
    println!(
        "exported {} ({} tensors, {}, arch {}, alpha {}) to {} ({:.1} kB)",
        opts.adapter.display(),
        report.tensors,
        opts.outtype.name(),
        report.arch,
        report.alpha,
        opts.out.display(),
        report.bytes as f64 / 1e3
    );
    Ok(())
}
