//! `peftkit inspect PATH`: what an adapter folder, a model folder or a recipe holds.

use super::user;
use anyhow::Result;
use peftkit::adapter::{peft_format, AdapterConfig};
use peftkit::model::ModelConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// An adapter folder (adapter_config.json), a model folder (config.json) or a recipe (.yaml).
    pub path: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let p = &a.path;
    if p.is_dir() && p.join(peft_format::CONFIG_FILE).is_file() {
        let cfg = peft_format::read_config(p).map_err(user)?;
        let tensors = candle_core::safetensors::load(p.join(peft_format::WEIGHTS_FILE), &candle_core::Device::Cpu)
            .map_err(|e| user(anyhow::anyhow!("{}: {e}", p.join(peft_format::WEIGHTS_FILE).display())))?;
        let params: usize = tensors.values().map(|t| t.elem_count()).sum();
        println!("adapter: {}", p.display());
        println!("  type: {}", cfg.adapter.peft_type());
        println!("  base model: {}", cfg.base_model_name_or_path.as_deref().unwrap_or("(not recorded)"));
        match &cfg.adapter {
            AdapterConfig::Lora(l) => {
                println!(
                    "  r: {}, lora_alpha: {}, dropout: {}, rslora: {}",
                    l.r, l.lora_alpha, l.lora_dropout, l.use_rslora
                );
                if l.use_dora {
                    println!("  DoRA: yes (use_dora; a lora_magnitude_vector per module rescales each output row)");
                }
                println!("  target_modules: {:?}", l.target_modules);
            }
            AdapterConfig::Ia3(c) => {
                println!("  target_modules: {:?}", c.target_modules);
                println!("  feedforward_modules (input scaled): {:?}", c.feedforward_modules);
            }
        }
        println!("  tensors: {}, parameters: {params}", tensors.len());
    } else if p.is_file() && peftkit::base::is_gguf_path(&p.to_string_lossy()) {
        let g = peftkit::gguf::GgufFile::open(p).map_err(user)?;
        if g.string("general.type").map_err(user)?.as_deref() == Some("adapter") {
            return print_gguf_adapter(p, &g);
        }
        let c = g.config().map_err(user)?;
        println!("GGUF model: {}", p.display());
        if let Some(name) = g.string("general.name").map_err(user)? {
            println!("  name: {name}");
        }
        let tok = g.string("tokenizer.ggml.model").map_err(user)?.unwrap_or_default();
        let pre = g.string("tokenizer.ggml.pre").map_err(user)?.unwrap_or_default();
        println!(
            "  tokenizer: {tok} (pre-tokenizer {pre}); chat template: {}",
            if g.get("tokenizer.chat_template").is_some() { "yes" } else { "no" }
        );
        print_config(&c);
    } else if p.is_dir() && p.join("config.json").is_file() {
        let c = ModelConfig::from_file(&p.join("config.json")).map_err(user)?;
        // The weights' headers are read too, so that a damaged or missing file is reported here (exit 2), not at
        // the first run that loads it.
        let files = peftkit::hub::resolve_model(&p.to_string_lossy(), None, &super::hub_options()).map_err(user)?;
        let source = peftkit::model::WeightSource::open(&files.weights).map_err(user)?;
        println!("model: {}", p.display());
        print_config(&c);
        let headers = source.headers();
        let params: usize = headers.iter().map(|(_, _, shape)| shape.iter().product::<usize>()).sum();
        let mut dtypes = std::collections::BTreeMap::<&str, usize>::new();
        for (_, dtype, _) in &headers {
            *dtypes.entry(dtype.as_str()).or_default() += 1;
        }
        let dtypes: Vec<String> = dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
        println!(
            "  weights: {} file(s), {} tensors ({}), {params} parameters",
            files.weights.len(),
            headers.len(),
            dtypes.join(", ")
        );
    } else if p.is_file() {
        let r = peftkit::recipe::Recipe::load(p, &[]).map_err(user)?;
        println!("recipe {} is valid; resolved:\n{}", p.display(), r.to_yaml());
    } else {
        return Err(user(anyhow::anyhow!(
            "{}: not an adapter folder, a model folder, a .gguf file or a recipe file",
            p.display()
        )));
    }
    Ok(())
}

/// A llama.cpp adapter GGUF (`general.type = adapter`, as `peftkit export --to gguf` writes).
fn print_gguf_adapter(p: &std::path::Path, g: &peftkit::gguf::GgufFile) -> Result<()> {
    let kind = g.string("adapter.type").map_err(user)?.unwrap_or_else(|| "(unknown)".into());
    println!("GGUF adapter (llama.cpp, adapter.type {kind}): {}", p.display());
    if let Some(name) = g.string("general.name").map_err(user)? {
        println!("  name: {name}");
    }
    println!("  architecture: {}", g.architecture().map_err(user)?);
    if let Some(alpha) = g.float("adapter.lora.alpha").map_err(user)? {
        println!("  lora alpha: {alpha}");
    }
    let tensors = g.tensors();
    let mut ranks: Vec<usize> =
        tensors.iter().filter(|(n, d, _)| n.ends_with(".lora_a") && d.len() == 2).map(|(_, d, _)| d[0]).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let mut types: Vec<String> = tensors.iter().map(|(_, _, t)| format!("{t:?}")).collect();
    types.sort();
    types.dedup();
    let params: usize = tensors.iter().map(|(_, d, _)| d.iter().product::<usize>()).sum();
    println!(
        "  tensors: {} (lora_a/lora_b pairs: {}), rank {:?}, types {}, parameters: {params}",
        tensors.len(),
        tensors.iter().filter(|(n, _, _)| n.ends_with(".lora_a")).count(),
        ranks,
        types.join(", ")
    );
    Ok(())
}

fn print_config(c: &ModelConfig) {
    println!(
        "  {}: {} layers, hidden {}, intermediate {}, heads {} (kv {}), head_dim {}, vocab {}, tied embeddings: {}",
        c.model_type,
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        c.tie_word_embeddings
    );
    println!("  rope_theta {}, scaling {:?}, rms_norm_eps {}", c.rope_theta, c.rope_scaling, c.rms_norm_eps);
}
