//! `FrozenWeight`: the frozen base weight of a projection — a dense matrix in the compute dtype (f32 or bf16), or
//! an NF4 matrix as bitsandbytes stores it (QLoRA) — and its view as f32 for the CPU kernels.
//!
//! The CPU kernels multiply in f32 (see [`crate::host`]): an f32 weight is read in place; a bf16 weight is widened
//! and an NF4 weight dequantized, each into this thread's reused buffer, one projection at a time, so the f32 copy
//! of the whole model never exists. The widening is exact, so a bf16 weight's product differs from f32's only by
//! the rounding of the weight itself.

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
        }
    }

    /// Whether the weight is held in NF4.
    pub fn is_nf4(&self) -> bool {
        matches!(self, FrozenWeight::Nf4(_))
    }

    /// The weight as a dense (out, in) f32 tensor on the CPU (dequantized for NF4, widened for bf16).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.to_device(&Device::Cpu)?.to_dtype(DType::F32),
            FrozenWeight::Nf4(q) => Tensor::from_vec(q.dequantize(), q.shape(), &Device::Cpu),
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
        }
    }
}
