//! The GPU half of `peftkit bench --device cuda`: NF4 dequantization against the device's copy bandwidth
//! (`--dequant`), the fused small-M NF4 product against dequantize + cuBLAS (`--gemv`), and the figures a training
//! measurement adds on a GPU (peak device memory, model FLOP utilisation).
//!
//! MFU counts the FLOPs the model needs per token, not those spent re-computing: with the base frozen, a projection
//! costs 2·params forward and 2·params backward (dX only, no dW); the output head likewise 4·vocab·hidden; causal
//! attention 2·heads·head_dim·(t+1) per layer forward (QKᵀ and PV over (t+1)/2 keys on average) and twice that
//! backward. LoRA's own products (rank r ≪ hidden) are left out. The peak is the GPU's dense bf16 tensor-core rate
//! ([`peftkit::gpu::peak_bf16_tflops`]).

use anyhow::Result;
use candle_core::Device;
use peftkit::model::ModelConfig;

/// Model FLOPs per trained token for sequences of `seq` tokens (see the module header).
pub fn train_flops_per_token(c: &ModelConfig, seq: usize) -> f64 {
    let (h, i, v, l) =
        (c.hidden_size as f64, c.intermediate_size as f64, c.vocab_size as f64, c.num_hidden_layers as f64);
    let q = (c.num_attention_heads * c.head_dim) as f64;
    let kv = (c.num_key_value_heads * c.head_dim) as f64;
    let projections = l * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i);
    let attention_fwd = l * 2.0 * q * (seq as f64 + 1.0);
    4.0 * projections + 4.0 * v * h + 3.0 * attention_fwd
}

/// "GPU: NVIDIA H200 (sm_90, 141 GB)".
pub fn gpu_line(device: &Device) -> String {
    match peftkit::gpu::info(device) {
        Some(g) => {
            format!("GPU: {} (sm_{}{}, {:.0} GB)", g.name, g.capability.0, g.capability.1, g.total_bytes as f64 / 1e9)
        }
        None => "GPU: unknown".into(),
    }
}

#[cfg(feature = "cuda")]
pub fn dequant(device: &Device, json: bool) -> Result<()> {
    use candle_core::DType;
    use peftkit::quant::cuda::{copy_gbps, dequant_gbps};
    let gpu = peftkit::gpu::info(device).map(|g| g.name).unwrap_or_default();
    if !json {
        println!("{}", gpu_line(device));
    }
    // Llama-3.1-8B's projection shapes, and one large enough to leave caches behind.
    for (rows, cols) in [(4096, 4096), (14336, 4096), (4096, 14336), (32768, 8192)] {
        for dtype in [DType::BF16, DType::F32] {
            let d = dequant_gbps(device, rows, cols, dtype, true, 50)?;
            let copy = copy_gbps(device, d.bytes / 2, 50)?;
            let pct = 100.0 * d.gbps / copy;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"system": "peftkit", "mode": "dequant", "device": "cuda", "gpu": gpu,
                        "rows": rows, "cols": cols, "dtype": peftkit::compute::dtype_name(dtype), "double_quant": true,
                        "micros": d.micros, "gbps": d.gbps, "copy_gbps": copy, "percent_of_copy": pct})
                );
            } else {
                println!(
                    "NF4 → {} {rows}×{cols} (double quant): {:.1} µs, {:.0} GB/s = {pct:.0}% of a device copy of the same bytes ({copy:.0} GB/s)",
                    peftkit::compute::dtype_name(dtype),
                    d.micros,
                    d.gbps
                );
            }
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
pub fn gemv(device: &Device, json: bool) -> Result<()> {
    use peftkit::quant::cuda::{gemv_vs_cublas, GEMV_BENCH_MS};
    let gpu = peftkit::gpu::info(device).map(|g| g.name).unwrap_or_default();
    if !json {
        println!("{}", gpu_line(device));
    }
    for (n, k) in [(4096, 4096), (14336, 4096), (4096, 14336)] {
        for t in gemv_vs_cublas(device, n, k, &GEMV_BENCH_MS, 100)? {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"system": "peftkit", "mode": "gemv", "device": "cuda", "gpu": gpu, "n": n,
                        "k": k, "m": t.m, "fused_us": t.fused_us, "dequant_cublas_us": t.dequant_cublas_us,
                        "speedup": t.speedup, "rel_diff": t.rel_diff})
                );
            } else {
                println!(
                    "NF4 {n}×{k}, M = {:>2}: fused {:.1} µs, dequantize + cuBLAS {:.1} µs → {:.2}× (max rel diff {:.1e})",
                    t.m, t.fused_us, t.dequant_cublas_us, t.speedup, t.rel_diff
                );
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn dequant(_: &Device, _: bool) -> Result<()> {
    anyhow::bail!("--dequant on a GPU needs a build with `--features cuda`")
}

#[cfg(not(feature = "cuda"))]
pub fn gemv(_: &Device, _: bool) -> Result<()> {
    anyhow::bail!("--gemv needs a build with `--features cuda`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_per_token_of_smollm2() {
        let c = ModelConfig::from_file(std::path::Path::new("tests/fixtures/smollm2-135m-config.json")).unwrap();
        // SmolLM2-135M: 30 layers, hidden 576, 9 heads × 64, 3 KV heads, intermediate 1536, vocab 49152.
        let proj = 30.0 * (576.0 * 576.0 * 2.0 + 2.0 * 576.0 * 192.0 + 3.0 * 576.0 * 1536.0);
        let want = 4.0 * proj + 4.0 * 49152.0 * 576.0 + 3.0 * 30.0 * 2.0 * 576.0 * 257.0;
        assert!((train_flops_per_token(&c, 256) - want).abs() < 1.0);
    }
}
