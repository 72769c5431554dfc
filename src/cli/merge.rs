//! `peftkit merge --base M --adapter DIR --out DIR [--dtype bf16|f16|f32] [--max-shard-size 5GB]
//! [--from-quantized] [--overwrite] [--format safetensors|gguf] [--quant f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k]`:
//! the adapter folded into the base, written as a Hugging Face model folder, or as one GGUF file for llama.cpp
//! (see [`peftkit::merge`]).

use super::{command_line, hub_options, user};
use anyhow::Result;
use peftkit::merge::{
    merge, parse_size, GgufQuant, MergeError, MergeOptions, OutDtype, OutFormat, DEFAULT_MAX_SHARD_SIZE,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub base: super::BaseArgs,
    /// The PEFT adapter folder to merge.
    #[arg(long)]
    pub adapter: PathBuf,
    /// The model folder to write (with --format gguf, the .gguf file).
    #[arg(long)]
    pub out: PathBuf,
    /// safetensors (a Hugging Face model folder) or gguf (one file llama.cpp loads).
    #[arg(long, value_parser = OutFormat::parse, default_value = "safetensors")]
    pub format: OutFormat,
    /// GGUF types (--format gguf): f32, f16, bf16, q8_0 (as llama.cpp's converter writes them), q4_0, q4_k_m,
    /// q5_k_m, q6_k (as llama-quantize mixes them); norms and biases stay f32 [default: a GGUF base's own types,
    /// else --dtype's, else the config's 16-bit dtype, else f16].
    #[arg(long, value_parser = GgufQuant::parse)]
    pub quant: Option<GgufQuant>,
    /// Dtype of the merged weights: bf16, f16 or f32 [default: the base's dtype when it is bf16 or f16, else bf16].
    #[arg(long, value_parser = OutDtype::parse)]
    pub dtype: Option<OutDtype>,
    /// Largest weight file, in bytes of tensor data (5GB, 500MB, 2GiB…; GB = 10⁹ bytes, GiB = 2³⁰); larger models
    /// are split into shards with an index.
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_MAX_SHARD_SIZE, hide_default_value = true)]
    pub max_shard_size: u64,
    /// Merge into the NF4-dequantized weights a QLoRA adapter was trained against (required for a pre-quantized
    /// bitsandbytes base), rather than the base's original 16-bit weights.
    #[arg(long)]
    pub from_quantized: bool,
    /// Replace --out if it exists and is not empty (only once the new model is complete).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: Args) -> Result<()> {
    let interrupt = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupt.clone();
        let _ = ctrlc::set_handler(move || {
            use std::io::Write;
            if flag.swap(true, Ordering::SeqCst) {
                let _ = writeln!(
                    std::io::stderr(),
                    "\nsecond interrupt: exiting at once (the next merge into --out removes the .tmp folder left beside it)"
                );
                std::process::exit(130);
            }
            let _ = writeln!(
                std::io::stderr(),
                "\ninterrupted (Ctrl-C, SIGTERM or SIGHUP): stopping after this tensor and removing the partial output"
            );
        });
    }
    if args.quant.is_some() && args.format != OutFormat::Gguf {
        return Err(user(anyhow::anyhow!("--quant applies to --format gguf only (a model folder takes --dtype)")));
    }
    if let Some(problem) = args.out.parent().and_then(peftkit::util::output_dir_problem) {
        return Err(user(anyhow::anyhow!("--out {}: {problem}", args.out.display())));
    }
    // One merge per output: a second one stops here, naming the first's pid. Then what a killed merge left beside
    // --out goes (its temporary output; an old output it was replacing is put back).
    let lock = peftkit::outdir::OutputLock::sibling(&args.out, &command_line()).map_err(user)?;
    for line in peftkit::outdir::clean_replaced_output(&args.out).map_err(user)? {
        tracing::info!("{line}");
    }
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let opts = MergeOptions {
        base: args.base.base,
        revision: args.base.revision,
        gguf_file: args.base.gguf_file,
        adapter: args.adapter,
        out: args.out,
        dtype: args.dtype,
        format: args.format,
        quant: args.quant,
        max_shard_size: args.max_shard_size,
        from_quantized: args.from_quantized,
        overwrite: args.overwrite,
        hub: hub_options(),
        progress,
        interrupt: Some(interrupt),
    };
    let started = std::time::Instant::now();
    let report = match merge(&opts) {
        Ok(r) => r,
        Err(MergeError::Interrupted) => {
            eprintln!("interrupted: nothing was written to {}", opts.out.display());
            drop(lock);
            std::process::exit(130);
        }
        Err(e) if e.is_user_error() => return Err(user(e)),
        Err(e) => return Err(e.into()),
    };
    let rss = peftkit::util::peak_rss_mb().map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "unknown".into());
    if let Some(types) = &report.gguf_types {
        println!(
            "merged {} projections of {} ({}) into {}: {} (GGUF, {} tensors, {:.1} MB, {types}) in {:.1} s; peak RSS \
             {rss}",
            report.merged_modules,
            opts.adapter.display(),
            peftkit::card::method_title(&report.method),
            opts.base,
            report.out.display(),
            report.tensors,
            report.total_bytes as f64 / 1e6,
            started.elapsed().as_secs_f64(),
        );
        return Ok(());
    }
    println!(
        "merged {} projections of {} ({}) into {}: {} ({} tensors, {} file{}, {:.1} MB, {}) in {:.1} s; peak RSS {rss}",
        report.merged_modules,
        opts.adapter.display(),
        peftkit::card::method_title(&report.method),
        opts.base,
        report.out.display(),
        report.tensors,
        report.shards.len(),
        if report.shards.len() == 1 { "" } else { "s" },
        report.total_bytes as f64 / 1e6,
        report.dtype.hf_name(),
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}
