//! `FrozenWeight`: the frozen base weight of a projection — a dense matrix in the compute dtype (f32 or bf16), or
//! an NF4 matrix as bitsandbytes stores it (QLoRA) — and its view as f32 for the CPU kernels.
//!
//! The CPU kernels multiply in f32 (see [`crate::host`]): an f32 weight is read in place; a bf16 weight is widened
//! and an NF4 weight dequantized, each into this thread's reused buffer, one projection at a time, so the f32 copy
//! of the whole model never exists. The widening is exact, so a bf16 weight's product differs from f32's only by
//! the rounding of the weight itself.
//!
//! On a GPU (feature `cuda`) a dense weight is an ordinary device tensor, and an NF4 weight is an
//! `quant::cuda::Nf4Cuda` (with the `cuda` feature) (codes and scales in device memory). Each product dequantizes it with
//! peftkit's kernel into one scratch buffer per device and dtype ([`FrozenWeight::gpu_dense`]), sized by the largest
//! projection and reused by all of them in stream order, then cuBLAS multiplies: the model's full-precision weights
//! never exist on the device either.

use crate::host;
use crate::quant::nf4::Nf4Tensor;
use candle_core::{DType, Device, Result, Tensor};
use std::cell::RefCell;
use std::sync::Arc;

/// The frozen base weight of a projection.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// A dense (out, in) matrix in the compute dtype.
    Dense(Tensor),
    /// An (out, in) matrix in NF4, as bitsandbytes stores it (QLoRA). It is dequantized on the fly, one
    /// projection at a time, into a reused buffer: the full-precision weight is never kept.
    Nf4(Arc<Nf4Tensor>),
    /// A matrix in one of llama.cpp's block formats (Q4_0, Q4_1, Q8_0, the k-quants…): a GGUF base's own tensor,
    /// or a projection quantized at load for generation. Without a gradient (generation, evaluation) the product is
    /// candle's quantized matmul on the CPU; with one it is read as f32 like any other weight.
    Ggml(Arc<candle_core::quantized::QTensor>),
    /// An NF4 matrix in GPU memory, dequantized per product into the device's scratch buffer.
    #[cfg(feature = "cuda")]
    Nf4Cuda(Arc<crate::quant::cuda::Nf4Cuda>),
}

thread_local! {
    /// This thread's f32 buffer for NF4 dequantization and bf16 widening, grown to the largest weight it has seen.
    static F32_BUFFER: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl FrozenWeight {
    /// (out, in)
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(w) => w.dims2(),
            FrozenWeight::Nf4(q) => match q.shape() {
                [out, inp] => Ok((*out, *inp)),
                s => candle_core::bail!("NF4 weight of shape {s:?} is not a matrix"),
            },
            FrozenWeight::Ggml(q) => q.shape().dims2(),
            #[cfg(feature = "cuda")]
            FrozenWeight::Nf4Cuda(q) => match q.shape() {
                [out, inp] => Ok((*out, *inp)),
                s => candle_core::bail!("NF4 weight of shape {s:?} is not a matrix"),
            },
        }
    }

    /// The weight moved to `device`: a dense tensor is copied; an NF4 weight is uploaded as an
    /// `quant::cuda::Nf4Cuda` (with the `cuda` feature) (codes and scales only) for a GPU, or brought back to the CPU codec.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(match self {
            FrozenWeight::Dense(w) => FrozenWeight::Dense(w.to_device(device)?),
            FrozenWeight::Nf4(q) if device.is_cpu() => FrozenWeight::Nf4(q.clone()),
            FrozenWeight::Ggml(q) if device.is_cpu() => FrozenWeight::Ggml(q.clone()),
            // Elsewhere a block-quantized weight is used dense (its exact dequantized values).
            FrozenWeight::Ggml(q) => FrozenWeight::Dense(q.dequantize(device)?),
            #[cfg(feature = "cuda")]
            FrozenWeight::Nf4(q) if device.is_cuda() => FrozenWeight::Nf4Cuda(Arc::new(
                crate::quant::cuda::Nf4Cuda::upload(q, device).map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            )),
            #[cfg(feature = "cuda")]
            FrozenWeight::Nf4Cuda(q) if q.device().same_device(device) => FrozenWeight::Nf4Cuda(q.clone()),
            other => {
                // NF4 between two GPUs, or onto a device without NF4 kernels: through the dequantized weight would
                // lose the format, so say so.
                candle_core::bail!(
                    "an NF4 weight of shape {:?} cannot move to {:?} (NF4 runs on the CPU and on CUDA devices)",
                    other.dims()?,
                    device.location()
                )
            }
        })
    }

    /// The device the weight lives on.
    pub fn device(&self) -> Device {
        match self {
            FrozenWeight::Dense(w) => w.device().clone(),
            FrozenWeight::Nf4(_) => Device::Cpu,
            FrozenWeight::Ggml(q) => q.device(),
            #[cfg(feature = "cuda")]
            FrozenWeight::Nf4Cuda(q) => q.device().clone(),
        }
    }

    /// Whether the weight is held in NF4.
    pub fn is_nf4(&self) -> bool {
        match self {
            FrozenWeight::Dense(_) | FrozenWeight::Ggml(_) => false,
            FrozenWeight::Nf4(_) => true,
            #[cfg(feature = "cuda")]
            FrozenWeight::Nf4Cuda(_) => true,
        }
    }

    /// The weight as a dense (out, in) f32 tensor on the CPU (dequantized for NF4, widened for bf16).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.to_device(&Device::Cpu)?.to_dtype(DType::F32),
            FrozenWeight::Nf4(q) => Tensor::from_vec(q.dequantize(), q.shape(), &Device::Cpu),
            FrozenWeight::Ggml(q) => q.dequantize(&Device::Cpu),
            #[cfg(feature = "cuda")]
            FrozenWeight::Nf4Cuda(q) => cuda_err(q.dequantize_f32())?.to_device(&Device::Cpu),
        }
    }

    /// The weight as a dense (out, in) tensor of `dtype` on its own device, for a product on the GPU: a dense
    /// weight itself (converted when its dtype differs), an NF4 weight dequantized into the device's scratch buffer.
    /// The scratch view is valid until the next NF4 product on that device and dtype overwrites it, which stream
    /// order makes safe for work already queued: use it at once, do not keep it.
    pub fn gpu_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.to_dtype(dtype),
            FrozenWeight::Nf4(_) => candle_core::bail!("gpu_dense: this NF4 weight is held on the CPU"),
            FrozenWeight::Ggml(q) => q.dequantize(&q.device())?.to_dtype(dtype),
            #[cfg(feature = "cuda")]
            FrozenWeight::Nf4Cuda(q) => scratch::dequantize(q, dtype),
        }
    }

    /// Runs `f` on the weight as contiguous row-major f32 data (out × in): an f32 tensor's own data, or this
    /// thread's buffer holding the widened bf16 or dequantized NF4 weight.
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        match self {
            FrozenWeight::Dense(w) if w.dtype() == DType::F32 => host::with_f32(w, f),
            _ => self.with_filled(f),
        }
    }

    /// Fills this thread's buffer with the weight as f32 and runs `f` on it.
    fn with_filled<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        F32_BUFFER.with(|cell| {
            // Taken out of the cell, so that a nested call gets its own buffer.
            let mut buf = cell.take();
            let filled = self.fill(&mut buf);
            let r = filled.map(|()| f(&buf));
            cell.replace(buf);
            r
        })
    }

    /// Writes the weight as f32 into `buf` (resized to fit).
    fn fill(&self, buf: &mut Vec<f32>) -> Result<()> {
        match self {
            FrozenWeight::Nf4(q) => {
                buf.resize(q.n(), 0.0);
                q.dequantize_into(buf).map_err(|e| candle_core::Error::Msg(e.to_string()))
            }
            FrozenWeight::Ggml(q) => {
                *buf = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            FrozenWeight::Nf4Cuda(q) => {
                let w = cuda_err(q.dequantize_f32())?.flatten_all()?.to_vec1::<f32>()?;
                *buf = w;
                Ok(())
            }
            FrozenWeight::Dense(w) => {
                buf.resize(w.elem_count(), 0.0);
                let w = w.contiguous()?;
                match host::with_bf16(&w, |src| host::bf16_to_f32(src, buf)) {
                    Some(()) => Ok(()),
                    None => host::with_f32(&w, |src| buf.copy_from_slice(src)),
                }
            }
        }
    }

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Nf4(q) => q.bytes(),
            FrozenWeight::Ggml(q) => q.storage_size_in_bytes(),
            #[cfg(feature = "cuda")]
            FrozenWeight::Nf4Cuda(q) => q.bytes(),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_err<T>(r: std::result::Result<T, crate::quant::cuda::Nf4CudaError>) -> Result<T> {
    r.map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// One dequantization buffer per (device, dtype), shared by every NF4 weight on it.
#[cfg(feature = "cuda")]
mod scratch {
    use crate::quant::cuda::{DequantBuffer, Nf4Cuda};
    use candle_core::{DType, Result, Tensor};
    use std::sync::Mutex;

    static BUFFERS: Mutex<Vec<(DType, DequantBuffer)>> = Mutex::new(Vec::new());

    /// Dequantizes `q` into the scratch buffer of its device for `dtype` (bf16 or f32) and returns the
    /// weight-shaped view of it.
    pub(super) fn dequantize(q: &Nf4Cuda, dtype: DType) -> Result<Tensor> {
        let mut buffers = BUFFERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let i = match buffers.iter().position(|(dt, b)| *dt == dtype && b.device().same_device(q.device())) {
            Some(i) => i,
            None => {
                buffers.push((dtype, super::cuda_err(DequantBuffer::new(q.device(), dtype))?));
                buffers.len() - 1
            }
        };
        super::cuda_err(q.dequantize_into(&mut buffers[i].1))
    }
}
