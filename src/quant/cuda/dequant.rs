//! Dequantization on the device: a whole weight into a new bf16 or f32 tensor, into a [`DequantBuffer`] reused
//! across weights (the training path: dequantize, then cuBLAS), or into raw device storage.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, PushKernelArg};
use half::bf16;

use super::error::{Nf4CudaError, Result};
use super::{cfg, Nf4Cuda, THREADS};

/// Launch grid of the dequantization kernel: one 32-element chunk per thread, at most 32 blocks per SM (then the
/// kernel's grid-stride loop takes over).
fn dequant_grid(n: usize, sms: u32, max_blocks: Option<u32>) -> u32 {
    let chunks = (n / 32).max(1);
    let blocks = chunks.div_ceil(THREADS as usize).min(32 * sms.max(1) as usize).max(1) as u32;
    max_blocks.map_or(blocks, |m| blocks.min(m.max(1)))
}

impl Nf4Cuda {
    /// Dequantizes the whole weight into a new bf16 tensor of the weight's shape.
    pub fn dequantize_bf16(&self) -> Result<Tensor> {
        let mut out = unsafe { self.stream.alloc::<bf16>(self.n) }?;
        self.launch_dequant(&self.kernels.dequant_bf16, &mut out, None)?;
        Ok(self.wrap(out, &self.shape))
    }

    /// Dequantizes the whole weight into a new f32 tensor of the weight's shape (bit-identical to
    /// [`Nf4Tensor::dequantize`](crate::quant::nf4::Nf4Tensor::dequantize)).
    pub fn dequantize_f32(&self) -> Result<Tensor> {
        let mut out = unsafe { self.stream.alloc::<f32>(self.n) }?;
        self.launch_dequant(&self.kernels.dequant_f32, &mut out, None)?;
        Ok(self.wrap(out, &self.shape))
    }

    /// Dequantizes into `buf` (grown when too small, reused otherwise) and returns the weight-shaped view of it.
    ///
    /// The view shares the buffer's memory: it holds this weight until the next `dequantize_into` on the same
    /// buffer, which overwrites it (stream order makes that safe for work already queued that reads the view, e.g.
    /// a matmul). Keep one buffer per device and dtype, sized by the largest weight.
    pub fn dequantize_into(&self, buf: &mut DequantBuffer) -> Result<Tensor> {
        if !buf.device.same_device(&self.device) {
            return Err(Nf4CudaError::WrongDevice {
                shape: self.shape.clone(),
                what: "the dequantization buffer",
                got: buf.device.location(),
                expected: self.device.location(),
            });
        }
        let storage = match &buf.storage {
            Some(t) if t.elem_count() >= self.n => t.clone(),
            _ => {
                // Grow: the old allocation is freed once no view of it is left.
                let t = match buf.dtype {
                    DType::BF16 => self.wrap(unsafe { self.stream.alloc::<bf16>(self.n) }?, &[self.n]),
                    DType::F32 => self.wrap(unsafe { self.stream.alloc::<f32>(self.n) }?, &[self.n]),
                    other => return Err(Nf4CudaError::BufferDType(other)),
                };
                buf.storage = Some(t.clone());
                t
            }
        };
        storage.inplace_op1(&DequantInto { w: self })?;
        Ok(storage.narrow(0, 0, self.n)?.reshape(self.shape.as_slice())?)
    }

    /// Dequantizes into the first [`n`](Self::n) elements of `out` (bf16 or f32: `T` = `half::bf16` | `f32`), for
    /// callers that hold raw device storage, e.g. inside a candle `CustomOp`'s `cuda_fwd`. `out` must be a whole
    /// allocation (its start is 16-byte aligned) on this weight's device.
    pub fn dequantize_into_slice<T: DequantOut>(&self, out: &mut CudaSlice<T>) -> Result<()> {
        if out.len() < self.n {
            return Err(Nf4CudaError::OutLen { shape: self.shape.clone(), got: out.len(), expected: self.n });
        }
        let f = if T::BF16 { &self.kernels.dequant_bf16 } else { &self.kernels.dequant_f32 };
        self.launch_dequant(f, out, None)
    }

    /// Launches a dequantization kernel writing `self.n` elements at the start of `out` (16-byte aligned: an
    /// allocation's start). `max_blocks` caps the grid (tests use it to exercise the grid-stride loop).
    pub(super) fn launch_dequant<T>(
        &self,
        f: &CudaFunction,
        out: &mut CudaSlice<T>,
        max_blocks: Option<u32>,
    ) -> Result<()> {
        let n64 = self.n as u64;
        let mut out = out.slice_mut(0..self.n);
        let mut b = self.stream.launch_builder(f);
        b.arg(&self.packed);
        self.push_scales(&mut b);
        b.arg(&self.code).arg(&mut out).arg(&n64).arg(&self.log2_bs);
        unsafe { b.launch(cfg((dequant_grid(self.n, self.sms, max_blocks), 1), THREADS)) }?;
        Ok(())
    }
}

/// An output element type of the dequantization kernels: `half::bf16` or `f32`.
pub trait DequantOut: cudarc::driver::DeviceRepr + private::Sealed {
    #[doc(hidden)]
    const BF16: bool;
}

impl DequantOut for bf16 {
    const BF16: bool = true;
}

impl DequantOut for f32 {
    const BF16: bool = false;
}

mod private {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// A device buffer that [`Nf4Cuda::dequantize_into`] reuses across weights: one per device and dtype, grown to
/// the largest weight it has held.
#[derive(Debug)]
pub struct DequantBuffer {
    device: Device,
    dtype: DType,
    storage: Option<Tensor>,
}

impl DequantBuffer {
    /// An empty buffer for `device` that will hold `dtype` (bf16 or f32) values.
    pub fn new(device: &Device, dtype: DType) -> Result<Self> {
        if !device.is_cuda() {
            return Err(Nf4CudaError::NotCuda(device.location()));
        }
        if !matches!(dtype, DType::BF16 | DType::F32) {
            return Err(Nf4CudaError::BufferDType(dtype));
        }
        Ok(Self { device: device.clone(), dtype, storage: None })
    }

    /// Elements the buffer holds now.
    pub fn capacity(&self) -> usize {
        self.storage.as_ref().map_or(0, |t| t.elem_count())
    }

    /// The dtype of the values it holds.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device it lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// The in-place op that writes a weight into a [`DequantBuffer`]'s storage (under candle's storage lock).
struct DequantInto<'a> {
    w: &'a Nf4Cuda,
}

impl InplaceOp1 for DequantInto<'_> {
    fn name(&self) -> &'static str {
        "nf4-dequantize-into"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("nf4-dequantize-into: the buffer is on the CPU, the weight on a CUDA device")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        if layout.start_offset() != 0 || !layout.is_contiguous() || layout.shape().elem_count() < self.w.n {
            candle_core::bail!("nf4-dequantize-into: the buffer is not a dense array of ≥ {} elements", self.w.n)
        }
        let r = match storage.dtype() {
            DType::BF16 => self.w.dequantize_into_slice(storage.as_cuda_slice_mut::<bf16>()?),
            DType::F32 => self.w.dequantize_into_slice(storage.as_cuda_slice_mut::<f32>()?),
            other => candle_core::bail!("nf4-dequantize-into: buffer dtype {other:?}, expected bf16 or f32"),
        };
        r.map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
