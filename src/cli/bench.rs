//! `peftkit bench [--model M | --config config.json] …`: LoRA (or `--qlora`, `--ia3`; `--gradient-checkpointing`)
//! training speed (median step) and peak memory, or
//! with `--generate` the speed of generation (prompt processing and decoding with the KV cache).
//!
//! Training: the same measurement as `shared/bench/peft_cpu_bench.py` does for HF PEFT: random token batches with
//! labels = inputs, LoRA with lora_alpha = 2r and dropout 0, AdamW; one warm-up step, then the median of `--steps`.

use super::user;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use peftkit::adapter::{AdapterConfig, Ia3Config, LoraConfig, TargetModules};
use peftkit::linear::ForwardCtx;
use peftkit::model::{self, ModelConfig};
use peftkit::peft_model;
use peftkit::train::optim::AdamW;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A base model as `train` takes it: an HF model folder, a Hub id or a .gguf file.
    #[arg(long, conflicts_with = "config")]
    pub model: Option<String>,
    /// A bare config.json: the model is built with random weights of that shape.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// target_modules: all-linear, or a comma-separated list of module names (default: all-linear for LoRA,
    /// k_proj,v_proj,down_proj for IA3).
    #[arg(long)]
    pub targets: Option<String>,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Measure the f32 matrix-multiply throughput of this machine instead (2048³ and the model's shapes).
    #[arg(long)]
    pub gemm: bool,
    /// Measure generation instead: a prompt of --seq random tokens, then --new-tokens greedy tokens with the KV
    /// cache (no stop token); best of --steps runs.
    #[arg(long)]
    pub generate: bool,
    /// Tokens generated per run with --generate.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// QLoRA: hold the base's projections in NF4 (double quantization), quantized at load.
    #[arg(long)]
    pub qlora: bool,
    /// IA3 instead of LoRA (down_proj input-scaled, the other targets output-scaled; --rank is ignored).
    #[arg(long, conflicts_with = "qlora")]
    pub ia3: bool,
    /// Activation checkpointing (the recipe's `training.gradient_checkpointing`): each decoder layer is recomputed
    /// in the backward pass instead of keeping its activations.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Measure NF4 dequantization throughput instead (GB/s of bytes read plus bytes written); with `--device cuda`,
    /// peftkit's kernel into bf16 and f32 against the GPU's device-to-device copy bandwidth.
    #[arg(long)]
    pub dequant: bool,
    /// With --generate: the base's projections in a llama.cpp block format, as `generate --quant` takes it
    /// (`auto`: a GGUF base's own quantized tensors; `none`: dense f32).
    #[arg(long, conflicts_with = "qlora")]
    pub quant: Option<super::QuantArg>,
    /// (`--device cuda`) The fused NF4 dequantize + GEMM for M = 1…64 rows against dequantize-then-cuBLAS.
    #[arg(long)]
    pub gemv: bool,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
}

/// GFLOP/s of (m×k)·(k×n), best of 3: candle's own f32 matmul (`candle`), or peftkit's frozen product
/// y = x·Wᵀ (the projection training runs, W (n, k)) with operands in `dtype`.
fn gemm_gflops(m: usize, k: usize, n: usize, transposed_rhs: bool, kind: GemmKind) -> Result<f64> {
    let x = Tensor::ones((m, k), DType::F32, &Device::Cpu)?;
    let run: Box<dyn Fn() -> candle_core::Result<Tensor>> = match kind {
        GemmKind::Candle => {
            let b = if transposed_rhs {
                Tensor::ones((n, k), DType::F32, &Device::Cpu)?.t()?
            } else {
                Tensor::ones((k, n), DType::F32, &Device::Cpu)?
            };
            Box::new(move || x.matmul(&b))
        }
        GemmKind::Frozen(dt) => {
            let (x, w) = (x.to_dtype(dt)?, Tensor::ones((n, k), dt, &Device::Cpu)?);
            Box::new(move || peftkit::ops::frozen_matmul(&x, &w))
        }
    };
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        let _c = run()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

#[derive(Clone, Copy)]
enum GemmKind {
    Candle,
    Frozen(DType),
}

/// The CPU and instruction sets, for reports.
fn machine_line() -> String {
    format!("CPU: {}; {} threads", peftkit::cpu::describe(), candle_core::utils::get_num_threads())
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 || a.seq < 2 || a.rank == 0 || a.steps == 0 {
        return Err(user(anyhow::anyhow!("--batch, --rank, --steps must be positive and --seq at least 2")));
    }
    if a.gemm {
        println!("{}", machine_line());
        for (m, k, n, t) in [
            (2048, 2048, 2048, false),
            (1024, 576, 1536, true),
            (1024, 1536, 576, true),
            (1024, 576, 576, false),
            (128, 576, 49152, true),
        ] {
            let f32_candle = gemm_gflops(m, k, n, t, GemmKind::Candle)?;
            let f32_frozen = gemm_gflops(m, k, n, true, GemmKind::Frozen(DType::F32))?;
            let bf16_frozen = gemm_gflops(m, k, n, true, GemmKind::Frozen(DType::BF16))?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"system": "peftkit", "mode": "gemm", "m": m, "k": k, "n": n,
                        "candle_f32_gflops": f32_candle, "frozen_f32_gflops": f32_frozen,
                        "frozen_bf16_gflops": bf16_frozen, "cpu": peftkit::cpu::features().model,
                        "cpu_flags": peftkit::cpu::features().flags(), "gemm_kernel": peftkit::cpu::gemm_kernel()})
                );
            } else {
                println!(
                    "gemm {m}×{k}·{k}×{n}{}: candle f32 {f32_candle:.1} GFLOP/s; peftkit frozen product f32 \
                     {f32_frozen:.1}, bf16 {bf16_frozen:.1} GFLOP/s",
                    if t { " (rhs transposed)" } else { "" },
                );
            }
        }
        return Ok(());
    }
    if a.dequant || a.gemv {
        let compute = a.compute.resolve(Default::default())?;
        if compute.device.is_cuda() {
            return if a.gemv {
                super::bench_cuda::gemv(&compute.device, a.json)
            } else {
                super::bench_cuda::dequant(&compute.device, a.json)
            };
        }
        if a.gemv {
            return Err(user(anyhow::anyhow!("--gemv measures a GPU kernel: add --device cuda")));
        }
    }
    if a.dequant {
        let threads = candle_core::utils::get_num_threads();
        for (rows, cols) in [(576, 1536), (4096, 4096), (14336, 4096)] {
            let gbps = peftkit::quant::nf4::dequant_gbps(rows, cols, 5).map_err(|e| anyhow::anyhow!(e))?;
            let n = rows * cols;
            // Bytes moved per element: half a byte of codes, a byte of absmax per 64, four bytes of f32 output.
            let gelems = gbps / (0.5 + 1.0 / 64.0 + 4.0);
            println!("NF4 dequantization {rows}×{cols} ({:.1} M elements, double quant, {threads} threads): {gbps:.2} GB/s ({gelems:.2} G elements/s)", n as f64 / 1e6);
        }
        return Ok(());
    }
    let compute = a.compute.resolve(Default::default())?;
    let device = compute.device.clone();
    let quant = match (a.qlora, a.quant.unwrap_or(super::QuantArg::Auto)) {
        (true, _) => model::BaseQuant::Nf4 { double_quant: true },
        // Generation keeps a GGUF base's quantized tensors, as `generate` and `chat` do.
        (false, super::QuantArg::Auto) if a.generate => model::BaseQuant::Ggml { to: None },
        (false, super::QuantArg::Auto | super::QuantArg::None) => model::BaseQuant::None,
        (false, super::QuantArg::To(t)) => model::BaseQuant::Ggml { to: Some(t) },
    };
    let (mut m, source) = match (&a.model, &a.config) {
        (Some(base), _) => {
            let b = peftkit::base::load_base_quant(base, None, None, quant, &super::hub_options(), &compute)
                .map_err(user)?;
            (b.model, base.clone())
        }
        (None, Some(cfg)) => {
            let c = ModelConfig::from_file(cfg).map_err(user)?;
            // The random weights are allocated here: check the whole run's memory before.
            let weight_bytes = if a.qlora { 0.55 } else { compute.dtype.size_in_bytes() as f64 };
            check_bench_memory(&a, &c, &compute, peftkit::memory::base_params(&c) * weight_bytes)?;
            let mut m = model::random_llama(c, 0, &device, compute.dtype)?;
            if a.qlora {
                // The projections in NF4 (double quantization), as QLoRA holds a real base. On the CPU the random
                // weights are quantized; on a GPU random codes and scales are drawn instead (speed does not depend
                // on the values, and quantizing an 8B model's floats on the host would take minutes).
                for (i, l) in m.linears_mut().enumerate() {
                    let (out, inp) = l.weight.dims()?;
                    let q = if device.is_cpu() {
                        let w: Vec<f32> = l.weight.dense()?.flatten_all()?.to_vec1()?;
                        peftkit::quant::nf4::Nf4Tensor::quantize(&w, &[out, inp], true)
                    } else {
                        peftkit::quant::nf4::Nf4Tensor::random(out, inp, true, i as u64)
                    }
                    .map_err(|e| anyhow::anyhow!(e))?;
                    l.weight = peftkit::weight::FrozenWeight::Nf4(std::sync::Arc::new(q)).to_device(&device)?;
                }
            }
            (m, format!("{} (random weights)", cfg.display()))
        }
        (None, None) => return Err(user(anyhow::anyhow!("give --model DIR or --config config.json"))),
    };
    if a.model.is_some() {
        check_bench_memory(&a, &m.config, &compute, 0.0)?;
    }
    if !a.ia3 {
        // A rank above a projection's min(in, out) adds nothing and, mistyped, exhausts memory.
        if let Some(l) = m.linears().find(|l| a.rank > l.in_features.min(l.out_features)) {
            return Err(user(anyhow::anyhow!(
                "--rank {}: above min(in, out) = {} of {} ({} → {})",
                a.rank,
                l.in_features.min(l.out_features),
                l.path,
                l.in_features,
                l.out_features
            )));
        }
    }
    if a.generate {
        return bench_generate(&m, &source, &a);
    }
    let targets = match a.targets.as_deref() {
        None if a.ia3 => Ia3Config::default().target_modules,
        None | Some("all-linear") => TargetModules::AllLinear,
        Some(list) => TargetModules::List(list.split(',').map(|s| s.trim().to_string()).collect()),
    };
    let targets_text = match &targets {
        TargetModules::List(l) => l.join(","),
        _ => "all-linear".to_string(),
    };
    let method = if a.ia3 {
        "ia3"
    } else if a.qlora {
        "qlora"
    } else {
        "lora"
    };
    let cfg = if a.ia3 {
        AdapterConfig::Ia3(Ia3Config { target_modules: targets, ..Default::default() })
    } else {
        AdapterConfig::Lora(LoraConfig {
            r: a.rank,
            lora_alpha: 2.0 * a.rank as f64,
            target_modules: targets,
            ..Default::default()
        })
    };
    peft_model::attach(&mut m, &cfg, 0).map_err(user)?;
    m.gradient_checkpointing = a.gradient_checkpointing;
    let vars: Vec<_> = peft_model::trainable(&m).into_iter().map(|(_, v)| v).collect();
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(vars.clone(), 0.9, 0.999, 1e-8, 0.0)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = m.config.vocab_size as u32;
    let (b, t) = (a.batch, a.seq);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let ctx = ForwardCtx::default();
    // On a GPU: peak device memory of the training steps (weights included), and MFU.
    peftkit::gpu::reset_peak(&device);
    for step in 0..=a.steps {
        let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab)).collect();
        let labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let started = Instant::now();
        let x = Tensor::from_vec(ids, (b, t), &device)?;
        let hidden = m.forward_hidden(&x, &ctx, None)?;
        let denom = (b * (t - 1)) as f64;
        let loss = m.loss(&hidden, &labels, denom)?;
        let t_fwd = started.elapsed().as_secs_f64();
        let rss_fwd = peftkit::util::rss_mb().unwrap_or(f64::NAN);
        let grads = loss.backward()?;
        let t_bwd = started.elapsed().as_secs_f64() - t_fwd;
        let g = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned().map_or_else(|| v.zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<Tensor>>>()?;
        opt.step(&g, 2e-4)?;
        // A GPU runs the step asynchronously: wait for it before reading the clock.
        device.synchronize()?;
        let dt = started.elapsed().as_secs_f64();
        losses.push(loss.to_scalar::<f32>()?);
        if step > 0 {
            times.push(dt);
        }
        if !a.json {
            eprintln!(
                "step {step}{}: {dt:.3} s (forward + loss {t_fwd:.3} s, backward {t_bwd:.3} s), loss {:.4}, RSS after forward {rss_fwd:.0} MiB",
                if step == 0 { " (warm-up)" } else { "" },
                losses[step]
            );
        }
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let median = times[times.len() / 2];
    let tps = (b * t) as f64 / median;
    let rss = peftkit::util::peak_rss_mb().unwrap_or(f64::NAN);
    let threads = candle_core::utils::get_num_threads();
    let gpu = peftkit::gpu::info(&device);
    let peak_gpu_mb = peftkit::gpu::peak_bytes(&device).map(|b| b as f64 / 1e6);
    let tflops = super::bench_cuda::train_flops_per_token(&m.config, t) * tps / 1e12;
    let mfu = gpu.as_ref().and_then(|g| peftkit::gpu::peak_bf16_tflops(&g.name)).map(|peak| tflops / peak);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"system": "peftkit", "method": method, "gpu": gpu.as_ref().map(|g| g.name.clone()),
                "peak_gpu_mb": peak_gpu_mb, "model_tflops": tflops, "mfu": mfu, "threads": threads, "batch": b, "seq": t, "rank": a.rank,
                "device": compute.describe(), "dtype": peftkit::compute::dtype_name(compute.dtype),
                "cpu": peftkit::cpu::features().model, "cpu_flags": peftkit::cpu::features().flags(),
                "isa": peftkit::cpu::isa().name(), "gemm_kernel": peftkit::cpu::gemm_kernel(),
                "trainable_params": trainable, "gradient_checkpointing": a.gradient_checkpointing, "step_s": median, "tokens_per_s": tps, "peak_rss_mb": rss,
                "loss_first": losses[0], "loss_last": losses[losses.len() - 1]})
        );
    } else {
        println!("model: {source}");
        println!("{}; compute {}", machine_line(), compute.describe());
        let base_mb = m.linears().map(|l| l.weight.bytes()).sum::<usize>() as f64 / 1e6;
        let what = match method {
            "ia3" => "IA3".to_string(),
            "qlora" => format!("QLoRA (NF4 base) r={}", a.rank),
            _ => format!("LoRA r={}", a.rank),
        };
        println!(
            "{what} on {targets_text}; {trainable} trainable parameters; base projections {base_mb:.0} MB; batch {b} × {t}; {threads} threads{}",
            if a.gradient_checkpointing { "; gradient checkpointing" } else { "" }
        );
        println!("median step {median:.3} s → {tps:.1} tokens/s; peak RSS {rss:.0} MiB");
        if gpu.is_some() {
            let peak = peak_gpu_mb.map_or("unknown (no memory pool)".into(), |mb| format!("{mb:.0} MB"));
            let mfu = mfu.map_or("unknown for this GPU".into(), |x| format!("{:.1}%", 100.0 * x));
            println!(
                "{}: peak GPU memory {peak}; {tflops:.1} model TFLOP/s, MFU {mfu}",
                super::bench_cuda::gpu_line(&device)
            );
        }
    }
    Ok(())
}

/// Generation speed: prefill of a `--seq`-token prompt, then `--new-tokens` greedy decoding steps.
fn bench_generate(m: &peftkit::model::Llama, source: &str, a: &Args) -> Result<()> {
    use peftkit::generate::{generate, SamplingParams};
    if a.new_tokens == 0 {
        return Err(user(anyhow::anyhow!("--new-tokens must be positive")));
    }
    let limit = peftkit::generate::context_limit(&m.config);
    if a.seq + a.new_tokens > limit {
        return Err(user(anyhow::anyhow!(
            "--seq + --new-tokens ({}) exceeds the model's context of {limit}",
            a.seq + a.new_tokens
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = m.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..a.seq).map(|_| rng.random_range(0..vocab)).collect();
    let params = SamplingParams::greedy(a.new_tokens);
    let (mut best_prefill, mut best_decode) = (0f64, 0f64);
    for run in 0..=a.steps {
        let out = generate(m, &prompt, &params, &[], |_| Ok::<_, std::convert::Infallible>(true))?;
        let prefill = a.seq as f64 / out.prefill_secs;
        let decode = out.tokens_per_sec();
        if !a.json {
            eprintln!(
                "run {run}{}: prompt {} tokens in {:.3} s ({prefill:.1} tokens/s), {} new tokens in {:.3} s ({decode:.1} tokens/s)",
                if run == 0 { " (warm-up)" } else { "" },
                a.seq,
                out.prefill_secs,
                out.tokens.len(),
                out.decode_secs
            );
        }
        if run > 0 {
            best_prefill = best_prefill.max(prefill);
            best_decode = best_decode.max(decode);
        }
    }
    let rss = peftkit::util::peak_rss_mb().unwrap_or(f64::NAN);
    let threads = candle_core::utils::get_num_threads();
    // What the products read: llama.cpp block formats (with their types) or dense weights.
    let mut formats: Vec<String> = m
        .linears()
        .map(|l| match &l.weight {
            peftkit::weight::FrozenWeight::Ggml(q) => format!("{:?}", q.dtype()),
            w if w.is_nf4() => "NF4".into(),
            _ => format!("dense {}", peftkit::compute::dtype_name(m.dtype)),
        })
        .chain(m.lm_head_q.as_ref().map(|q| format!("{:?} (head)", q.dtype())))
        .collect();
    formats.sort();
    formats.dedup();
    let weights = formats.join(", ");
    if a.json {
        println!(
            "{}",
            serde_json::json!({"system": "peftkit", "mode": "generate", "threads": threads, "prompt_tokens": a.seq,
                "weights": weights,
                "dtype": peftkit::compute::dtype_name(m.dtype), "cpu": peftkit::cpu::features().model,
                "cpu_flags": peftkit::cpu::features().flags(),
                "new_tokens": a.new_tokens, "prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode,
                "peak_rss_mb": rss})
        );
    } else {
        println!("model: {source}");
        println!("{}; dtype {}; weights {weights}", machine_line(), peftkit::compute::dtype_name(m.dtype));
        println!(
            "generation, greedy with KV cache, {threads} threads: prompt {} tokens → {best_prefill:.1} tokens/s; decoding {} tokens → {best_decode:.1} tokens/s; peak RSS {rss:.0} MiB",
            a.seq, a.new_tokens
        );
    }
    Ok(())
}

/// Refuses a benchmark whose memory estimate ([`peftkit::memory`]) exceeds what this machine has (CPU only):
/// `--seq 1000000000` would otherwise abort in an allocation.
fn check_bench_memory(a: &Args, c: &ModelConfig, compute: &peftkit::compute::Compute, weight_bytes: f64) -> Result<()> {
    let (batch, seq) = if a.generate { (1, a.seq.saturating_add(a.new_tokens)) } else { (a.batch, a.seq) };
    let shape = peftkit::memory::StepShape {
        batch,
        seq,
        activation_bytes: compute.dtype.size_in_bytes(),
        gradient_checkpointing: a.gradient_checkpointing,
    };
    let trainable = if a.ia3 { 0 } else { peftkit::memory::lora_params(c, a.rank.min(c.hidden_size)) as usize };
    let what = format!("--batch {batch} × --seq {seq}");
    peftkit::memory::check_training(c, trainable, shape, weight_bytes, &compute.device, &what)
        .map_err(|m| user(anyhow::anyhow!("{m}")))
}
