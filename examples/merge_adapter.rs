//! Merge a PEFT adapter into its base and write a Hugging Face model folder (what `peftkit merge` does).
//!
//!     cargo run --release --example merge_adapter -- [BASE] [ADAPTER] [OUT]
//!
//! Defaults: the tiny test model and its PEFT IA3 fixture, written to target/examples/merged in f32. The folder
//! loads with transformers' `AutoModelForCausalLM.from_pretrained(OUT)` and with `peftkit generate --base OUT`.

use anyhow::Result;
use peftkit::merge::{merge, MergeOptions, OutDtype};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let base = args.next().unwrap_or_else(|| "tests/fixtures/tiny-llama".into());
    let adapter = args.next().unwrap_or_else(|| "tests/fixtures/tiny-llama/peft-ia3".into());
    let out = args.next().unwrap_or_else(|| "target/examples/merged".into());

    let mut opts = MergeOptions::new(base, adapter, out);
    opts.dtype = Some(OutDtype::F32);
    opts.overwrite = true; // replace the folder of an earlier run (only once the new one is complete)
    let report = merge(&opts)?;
    println!(
        "merged {} projections ({}) into {}: {} tensors in {} file(s), {:.1} MB",
        report.merged_modules,
        report.method,
        report.out.display(),
        report.tensors,
        report.shards.len(),
        report.total_bytes as f64 / 1e6
    );
    Ok(())
}
