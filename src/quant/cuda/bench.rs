//! Measurements for `peftkit bench`: dequantization throughput against a device-to-device copy, and the fused
//! small-M product against dequantize-then-cuBLAS.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaStream;

use super::dequant::DequantBuffer;
use super::error::{Nf4CudaError, Result};
use super::Nf4Cuda;
use crate::quant::nf4::Nf4Tensor;

/// Mean microseconds per call of `f` over `reps` calls (after one warm-up call), timed with CUDA events on
/// `stream`.
fn time_us(stream: &Arc<CudaStream>, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let reps = reps.max(1);
    f()?;
    stream.synchronize()?;
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..reps {
        f()?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let ms = start.elapsed_ms(&end)?;
    Ok(f64::from(ms) * 1000.0 / reps as f64)
}

/// One dequantization measurement.
#[derive(Clone, Debug)]
pub struct DequantBench {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    pub double_quant: bool,
    /// Bytes moved per pass: codes + scales read ([`Nf4Tensor::bytes`]) plus the output written.
    pub bytes: usize,
    /// Mean time per pass.
    pub micros: f64,
    /// `bytes / time`, in 10⁹ bytes per second.
    pub gbps: f64,
}

/// Dequantization throughput of a random (rows × cols) NF4 weight into a reused `dtype` (bf16 or f32) buffer,
/// as (bytes read + bytes written) / time. Compare with [`copy_gbps`]`(device, bench.bytes / 2, reps)`, which moves
/// the same number of bytes.
pub fn dequant_gbps(
    device: &Device,
    rows: usize,
    cols: usize,
    dtype: DType,
    double_quant: bool,
    reps: usize,
) -> Result<DequantBench> {
    let t = Nf4Tensor::random(rows, cols, double_quant, 0).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let w = Nf4Cuda::upload(&t, device)?;
    let mut buf = DequantBuffer::new(device, dtype)?;
    let micros = time_us(&w.stream, reps, || w.dequantize_into(&mut buf).map(|_| ()))?;
    let bytes = w.bytes() + w.n() * dtype.size_in_bytes();
    Ok(DequantBench { rows, cols, dtype, double_quant, bytes, micros, gbps: bytes as f64 / micros / 1e3 })
}

/// Device-to-device copy bandwidth for a copy of `bytes` bytes, as (bytes read + bytes written) / time =
/// 2·bytes / time, in 10⁹ bytes per second: the ceiling the dequantization kernel is measured against.
pub fn copy_gbps(device: &Device, bytes: usize, reps: usize) -> Result<f64> {
    let Device::Cuda(cuda) = device else {
        return Err(Nf4CudaError::NotCuda(device.location()));
    };
    let stream = cuda.cuda_stream();
    let src = stream.alloc_zeros::<u8>(bytes.max(1))?;
    let mut dst = unsafe { stream.alloc::<u8>(bytes.max(1)) }?;
    let micros = time_us(&stream, reps, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * bytes as f64 / micros / 1e3)
}

/// One row of [`gemv_vs_cublas`].
#[derive(Clone, Debug)]
pub struct GemvTiming {
    pub m: usize,
    /// Fused dequantize + GEMM ([`Nf4Cuda::gemv`]), µs per product.
    pub fused_us: f64,
    /// Dequantize into a reused bf16 buffer, then candle's bf16 matmul (cuBLAS), µs per product.
    pub dequant_cublas_us: f64,
    /// `dequant_cublas_us / fused_us`.
    pub speedup: f64,
    /// max |fused − dequantize-then-matmul| over the output, relative to max |dequantize-then-matmul|.
    pub rel_diff: f32,
}

/// The fused small-M product against dequantize-then-cuBLAS for a random double-quantized (n × k) weight at each
/// M in `ms` (≤ 64; [`GEMV_BENCH_MS`](super::GEMV_BENCH_MS) is the usual list).
pub fn gemv_vs_cublas(device: &Device, n: usize, k: usize, ms: &[usize], reps: usize) -> Result<Vec<GemvTiming>> {
    let t = Nf4Tensor::random(n, k, true, 1).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let w = Nf4Cuda::upload(&t, device)?;
    let mut buf = DequantBuffer::new(device, DType::BF16)?;
    let mut rows = Vec::with_capacity(ms.len());
    for &m in ms {
        let x = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(DType::BF16)?;
        let fused_us = time_us(&w.stream, reps, || w.gemv(&x).map(|_| ()))?;
        let dequant_cublas_us = time_us(&w.stream, reps, || {
            let wd = w.dequantize_into(&mut buf)?; // (n, k)
            x.matmul(&wd.t()?)?; // (m, k)·(k, n) → (m, n)
            Ok(())
        })?;
        let fused = w.gemv(&x)?.to_dtype(DType::F32)?;
        let reference = x.matmul(&w.dequantize_into(&mut buf)?.t()?)?.to_dtype(DType::F32)?;
        let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?.max(f32::MIN_POSITIVE);
        let rel_diff = (fused - &reference)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        rows.push(GemvTiming { m, fused_us, dequant_cublas_us, speedup: dequant_cublas_us / fused_us, rel_diff });
    }
    Ok(rows)
}
