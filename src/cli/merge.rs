//! `peftkit merge --base M --adapter DIR --out DIR [--dtype bf16|f16|f32] [--max-shard-size 5GB]
//! [--from-quantized] [--overwrite] [--format safetensors|gguf] [--quant f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k]`:
//! the adapter folded into the base, written as a Hugging Face model folder, or as one GGUF file for llama.cpp
//! (see [`peftkit::merge`]).
//! `peftkit merge --adapter a=DIR --adapter b=DIR --weights 0.7,0.3 --combination linear|cat|svd [--svd-rank R]
//! --to adapter --out DIR`: PEFT's `add_weighted_adapter`, the combined adapter written as a PEFT folder (no base
//! needed); with `--to model` (the default) and a --base, that combination merged into the base as above.

use super::{command_line, hub_options, user};
use anyhow::Result;
use peftkit::adapter::combine::{self, Combination};
use peftkit::merge::{
    merge, parse_size, GgufQuant, MergeError, MergeOptions, OutDtype, OutFormat, DEFAULT_MAX_SHARD_SIZE,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Base model: a Hub id (owner/name), a local folder or a local .gguf file (not needed with --to adapter).
    #[arg(long, required_unless_present = "to")]
    pub base: Option<String>,
    /// Hub revision (branch, tag or commit) of the base model.
    #[arg(long)]
    pub revision: Option<String>,
    /// A GGUF file of the Hub repo given by --base, used instead of its safetensors weights.
    #[arg(long)]
    pub gguf_file: Option<String>,
    /// The PEFT adapter folder to merge, as `DIR` or `NAME=DIR`; repeat it to combine several adapters with
    /// --weights and --combination (PEFT's add_weighted_adapter).
    #[arg(long, required = true, value_name = "[NAME=]DIR")]
    pub adapter: Vec<String>,
    /// One weight per --adapter, comma-separated (negative subtracts), e.g. 0.7,0.3 [default: 1 each].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub weights: Vec<f64>,
    /// How several adapters combine, as PEFT's combination_type: linear (equal ranks; A and B summed, weighted
    /// by √|w·scaling|: an approximation), cat (ranks concatenated: exact, rank = the sum) or svd (the exact
    /// weighted sum of the updates truncated to --svd-rank) [default: svd, as PEFT].
    #[arg(long)]
    pub combination: Option<Combination>,
    /// The rank of an svd combination [default: the largest rank of the adapters].
    #[arg(long, requires = "combination")]
    pub svd_rank: Option<usize>,
    /// What to write: `model` (the combined adapter merged into --base) or `adapter` (the combined adapter as a
    /// PEFT folder; no base needed) [default: model].
    #[arg(long, value_parser = ["model", "adapter"])]
    pub to: Option<String>,
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
    // Interrupted: the lock and the temporary folders are gone (their guards dropped) before the exit code 130.
    if !run_locked(args)? {
        std::process::exit(130);
    }
    Ok(())
}

/// The merge, holding --out's lock; `false` when it was interrupted (nothing written).
fn run_locked(mut args: Args) -> Result<bool> {
    let to_adapter = args.to.as_deref() == Some("adapter");
    let several = args.adapter.len() > 1 || !args.weights.is_empty() || args.combination.is_some() || to_adapter;
    if !to_adapter && args.base.is_none() {
        return Err(user(anyhow::anyhow!("--base is needed to merge into a model (or write --to adapter)")));
    }
    if let Some(problem) = args.out.parent().and_then(peftkit::fsutil::output_dir_problem) {
        return Err(user(anyhow::anyhow!("--out {}: {problem}", args.out.display())));
    }
    // One merge per output: a second one stops here, naming the first's pid. Then what a killed merge left beside
    // --out goes (its temporary output and combined adapter; an old output it was replacing is put back).
    let _lock = peftkit::outdir::OutputLock::sibling(&args.out, &command_line()).map_err(user)?;
    for line in peftkit::outdir::clean_replaced_output(&args.out).map_err(user)? {
        tracing::info!("{line}");
    }
    // The combination first: a combined adapter is written (to --out, or to a folder beside it that is merged).
    if several {
        let dir = if to_adapter {
            args.out.clone()
        } else {
            let name = args.out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            args.out.with_file_name(format!(".{name}.combined-{}", std::process::id()))
        };
        if to_adapter {
            combine_adapters(&args, &dir, true)?;
            return Ok(true);
        }
        // Removed when done, whatever happens (but for a second Ctrl-C, which exits at once).
        let combined = TempFolder(dir);
        let label = combine_adapters(&args, &combined.0, false)?;
        args.adapter = vec![combined.0.display().to_string()];
        return merge_one(args, Some(label));
    }
    merge_one(args, None)
}

/// Removes a folder when dropped.
struct TempFolder(PathBuf);

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the weighted combination of `args.adapter` to `dir` (the --out of `--to adapter`, which is then checked
/// as merge checks its output folder). Returns the combination in words, e.g. `0.7·a + 0.3·b (svd, r=4)`.
fn combine_adapters(args: &Args, dir: &std::path::Path, to_adapter: bool) -> Result<String> {
    let bad = |msg: String| Err(user(anyhow::anyhow!(msg)));
    if to_adapter
        && (args.format != OutFormat::Safetensors
            || args.quant.is_some()
            || args.dtype.is_some()
            || args.from_quantized)
    {
        return bad(
            "--format, --quant, --dtype and --from-quantized apply to --to model (an adapter is written as a PEFT \
             folder of f32 tensors)"
                .into(),
        );
    }
    let specs = args.adapter.iter().map(|s| peftkit::peft_model::multi::parse_spec(s)).collect::<Result<Vec<_>, _>>();
    let specs = specs.map_err(|e| user(anyhow::anyhow!("--adapter: {e}")))?;
    peftkit::peft_model::multi::check_names(&specs).map_err(|e| user(anyhow::anyhow!("--adapter: {e}")))?;
    let weights = if args.weights.is_empty() { vec![1.0; specs.len()] } else { args.weights.clone() };
    if weights.len() != specs.len() {
        return bad(format!("--weights: {} weights for {} --adapter folders", weights.len(), specs.len()));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return bad(format!("--weights: {w} is not a finite number"));
    }
    if to_adapter {
        let non_empty = std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false);
        if dir.exists() && (!dir.is_dir() || (non_empty && !args.overwrite)) {
            return bad(format!("--out {}: exists and is not empty (--overwrite replaces it)", dir.display()));
        }
        if let Some((name, _)) = specs.iter().find(|(_, d)| same_path(d, dir)) {
            return bad(format!("--out {} is the folder of --adapter {name}", dir.display()));
        }
    }
    let dirs: Vec<PathBuf> = specs.iter().map(|(_, d)| d.clone()).collect();
    let how = args.combination.unwrap_or(Combination::Svd);
    let c = combine::combine(&dirs, &weights, how, args.svd_rank).map_err(user)?;
    if args.svd_rank.is_some() && c.combination != Combination::Svd {
        return bad("--svd-rank applies to --combination svd".into());
    }
    if to_adapter {
        // Written beside --out, then swapped in whole: an interrupted run leaves no half adapter, and an old --out
        // (with --overwrite) is only deleted once the new one is in place.
        let tmp = peftkit::outdir::ReplacementFolder::create(dir)?;
        combine::save(&c, tmp.path())?;
        tmp.persist(dir)?;
    } else {
        combine::save(&c, dir)?;
    }
    let names = specs.iter().zip(&weights).map(|((n, _), w)| format!("{w}·{n}")).collect::<Vec<_>>().join(" + ");
    let what = format!("{:?}", c.combination).to_lowercase();
    if to_adapter {
        println!("combined {names} ({what}, r={}, {} projections) into {}", c.rank, c.modules, dir.display());
    } else {
        eprintln!("combined {names} ({what}, r={}, {} projections); merging it", c.rank, c.modules);
    }
    Ok(format!("{names} ({what}, r={})", c.rank))
}

fn same_path(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// The existing merge of one adapter folder; `label` names a combined adapter in the summary line.
fn merge_one(args: Args, label: Option<String>) -> Result<bool> {
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
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let Some(base) = args.base else {
        return Err(user(anyhow::anyhow!("--base is needed to merge into a model (or write --to adapter)")));
    };
    // Several adapters were combined into one folder by now.
    let Some(one) = args.adapter.first() else {
        return Err(user(anyhow::anyhow!("--adapter: no adapter to merge")));
    };
    let adapter = peftkit::peft_model::multi::parse_spec(one).map_err(|e| user(anyhow::anyhow!("--adapter: {e}")))?.1;
    let opts = MergeOptions {
        base,
        revision: args.revision,
        gguf_file: args.gguf_file,
        adapter,
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
    let adapter_label = label.unwrap_or_else(|| opts.adapter.display().to_string());
    let started = std::time::Instant::now();
    let report = match merge(&opts) {
        Ok(r) => r,
        Err(MergeError::Interrupted) => {
            eprintln!("interrupted: nothing was written to {}", opts.out.display());
            return Ok(false);
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
            adapter_label,
            peftkit::card::method_title(&report.method),
            opts.base,
            report.out.display(),
            report.tensors,
            report.total_bytes as f64 / 1e6,
            started.elapsed().as_secs_f64(),
        );
        return Ok(true);
    }
    println!(
        "merged {} projections of {} ({}) into {}: {} ({} tensors, {} file{}, {:.1} MB, {}) in {:.1} s; peak RSS {rss}",
        report.merged_modules,
        adapter_label,
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
    Ok(true)
}
