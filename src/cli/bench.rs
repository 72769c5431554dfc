//! `peftkit bench [--model DIR | --config config.json] …`: LoRA training speed (median step) and peak memory.
//!
//! The same measurement as `shared/bench/peft_cpu_bench.py` does for HF PEFT: random token batches with
//! labels = inputs, LoRA with lora_alpha = 2r and dropout 0, AdamW; one warm-up step, then the median of `--steps`.

use super::user;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use peftkit::adapter::{self, AdapterConfig, LoraConfig, LoraInit, TargetModules};
use peftkit::linear::ForwardCtx;
use peftkit::model::{self, ModelConfig};
use peftkit::train::optim::AdamW;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// An HF model folder (config.json + safetensors).
    #[arg(long, conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// A bare config.json: the model is built with random weights of that shape.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// target_modules: all-linear, or a comma-separated list of module names.
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 || a.seq < 2 || a.rank == 0 || a.steps == 0 {
        return Err(user(anyhow::anyhow!("--batch, --rank, --steps must be positive and --seq at least 2")));
    }
    let device = Device::Cpu;
    let (mut m, source) = match (&a.model, &a.config) {
        (Some(dir), _) => {
            let files = peftkit::hub::resolve_model(&dir.display().to_string(), None, &super::hub_options()).map_err(user)?;
            (model::load_llama(&files.config, &files.weights, &device, DType::F32).map_err(user)?, dir.display().to_string())
        }
        (None, Some(cfg)) => {
            let c = ModelConfig::from_file(cfg).map_err(user)?;
            (model::random_llama(c, 0, &device, DType::F32)?, format!("{} (random weights)", cfg.display()))
        }
        (None, None) => return Err(user(anyhow::anyhow!("give --model DIR or --config config.json"))),
    };
    let targets = if a.targets == "all-linear" {
        TargetModules::AllLinear
    } else {
        TargetModules::List(a.targets.split(',').map(|s| s.trim().to_string()).collect())
    };
    let cfg = AdapterConfig::Lora(LoraConfig {
        r: a.rank,
        lora_alpha: 2.0 * a.rank as f64,
        lora_dropout: 0.0,
        target_modules: targets,
        use_rslora: false,
        init: LoraInit::Kaiming,
        layers_to_transform: None,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
    });
    adapter::attach(&mut m, &cfg, 0).map_err(user)?;
    let vars: Vec<_> = adapter::trainable(&m).into_iter().map(|(_, v)| v).collect();
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(vars.clone(), 0.9, 0.999, 1e-8, 0.0)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = m.config.vocab_size as u32;
    let (b, t) = (a.batch, a.seq);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let ctx = ForwardCtx::default();
    for step in 0..=a.steps {
        let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab)).collect();
        let labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let started = Instant::now();
        let x = Tensor::from_vec(ids, (b, t), &device)?;
        let hidden = m.forward_hidden(&x, &ctx, None)?;
        let denom = (b * (t - 1)) as f64;
        let loss = m.loss(&hidden, &labels, denom)?;
        let grads = loss.backward()?;
        let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).cloned().unwrap_or(v.zeros_like().unwrap_or_else(|_| v.as_tensor().clone()))).collect();
        opt.step(&g, 2e-4)?;
        let dt = started.elapsed().as_secs_f64();
        losses.push(loss.to_scalar::<f32>()?);
        if step > 0 {
            times.push(dt);
        }
        if !a.json {
            eprintln!("step {step}{}: {dt:.3} s, loss {:.4}", if step == 0 { " (warm-up)" } else { "" }, losses[step]);
        }
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let median = times[times.len() / 2];
    let tps = (b * t) as f64 / median;
    let rss = peftkit::util::peak_rss_mb().unwrap_or(f64::NAN);
    let threads = candle_core::utils::get_num_threads();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"system": "peftkit", "threads": threads, "batch": b, "seq": t, "rank": a.rank,
                "trainable_params": trainable, "step_s": median, "tokens_per_s": tps, "peak_rss_mb": rss,
                "loss_first": losses[0], "loss_last": losses[losses.len() - 1]})
        );
    } else {
        println!("model: {source}");
        println!("LoRA r={} on {}; {trainable} trainable parameters; batch {b} × {t}; {threads} threads", a.rank, a.targets);
        println!("median step {median:.3} s → {tps:.1} tokens/s; peak RSS {rss:.0} MiB");
    }
    Ok(())
}
