//! The generation path: `y = x · Wᵀ` for small M (≤ 64) with a fused dequantize + tensor-core GEMM that reads each
//! packed weight byte once for all M rows, and the plan that picks the kernel and the split of K.

use candle_core::{DType, Storage, Tensor};
use cudarc::driver::PushKernelArg;
use half::bf16;

use super::error::{Nf4CudaError, Result};
use super::{cfg, Nf4Cuda, GEMV_MAX_M, THREADS};

/// How [`Nf4Cuda::gemv`] runs a product (chosen from M, N, K and the number of SMs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GemmPlan {
    /// Tensor-core kernel with `mt` m16 tiles; K is cut into `splits` ranges of `tiles_per_split` 128-wide tiles
    /// (`splits > 1`: f32 partials, then a fixed-order reduction).
    TensorCore { mt: usize, tiles_per_split: usize, splits: usize },
    /// K % 32 != 0: the generic kernel (one warp per output column).
    Generic,
}

/// k-tiles (of 128) per shared-memory stage of the tensor-core kernel for `mt` m16 tiles (KC / 128 in nf4.cu).
pub(super) fn gemm_chunk_tiles(mt: usize) -> usize {
    if mt <= 2 {
        4
    } else {
        2
    }
}

/// Picks the kernel and the split of K: enough blocks (about 4 per SM) to keep every SM's memory pipe busy even
/// when N alone gives few, each split a whole number of shared-memory stages.
pub(super) fn gemm_plan(m: usize, n: usize, k: usize, sms: usize) -> GemmPlan {
    if !k.is_multiple_of(32) {
        return GemmPlan::Generic;
    }
    let mt = m.div_ceil(16).clamp(1, 4);
    let ct = gemm_chunk_tiles(mt);
    let k_tiles = k.div_ceil(128);
    let blocks_n = n.div_ceil(64);
    let target = (4 * sms.max(1)).max(1);
    let want = target.div_ceil(blocks_n).clamp(1, k_tiles);
    let tiles_per_split = k_tiles.div_ceil(want).next_multiple_of(ct);
    let splits = k_tiles.div_ceil(tiles_per_split);
    GemmPlan::TensorCore { mt, tiles_per_split, splits }
}

impl Nf4Cuda {
    /// `y = x · Wᵀ` with the dequantized weight, for x of shape (…, K) in bf16 whose leading dimensions hold M ≤ 64
    /// rows; y is bf16 of shape (…, N), accumulated in f32. W is the 2-D view (N = [`rows`](Self::rows),
    /// K = [`cols`](Self::cols)). Each packed weight byte is read once for all M rows.
    pub fn gemv(&self, x: &Tensor) -> Result<Tensor> {
        let (n, k) = (self.rows(), self.cols());
        let dims = x.dims().to_vec();
        let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        if dims.last() != Some(&k) || m == 0 || m > GEMV_MAX_M {
            return Err(Nf4CudaError::XShape { weight: self.shape.clone(), n, k, x: dims });
        }
        if x.dtype() != DType::BF16 {
            return Err(Nf4CudaError::XDType { weight: self.shape.clone(), got: x.dtype() });
        }
        if !x.device().same_device(&self.device) {
            return Err(Nf4CudaError::WrongDevice {
                shape: self.shape.clone(),
                what: "x",
                got: x.device().location(),
                expected: self.device.location(),
            });
        }
        for (what, value) in [("N (weight rows)", n), ("K (weight columns)", k), ("M·N", m * n)] {
            if value > (u32::MAX - 256) as usize {
                return Err(Nf4CudaError::TooLarge { shape: self.shape.clone(), what, value });
            }
        }
        // The kernels read x as a dense (M, K) array with 16-byte loads from its start.
        let x = if x.is_contiguous() && x.layout().start_offset().is_multiple_of(8) {
            x.clone()
        } else {
            x.force_contiguous()?
        };
        let (x_storage, x_layout) = x.storage_and_layout();
        let Storage::Cuda(x_cuda) = &*x_storage else {
            return Err(Nf4CudaError::NotCuda(x.device().location()));
        };
        let x_off = x_layout.start_offset();
        let x_view = x_cuda.as_cuda_slice::<bf16>()?.slice(x_off..x_off + m * k);

        let mut y = unsafe { self.stream.alloc::<bf16>(m * n) }?;
        let (m32, n32, k32) = (m as u32, n as u32, k as u32);
        match gemm_plan(m, n, k, self.sms as usize) {
            GemmPlan::Generic => {
                let blocks = n.div_ceil((THREADS / 32) as usize).min(8 * self.sms as usize).max(1) as u32;
                let mut b = self.stream.launch_builder(&self.kernels.gemm_generic);
                b.arg(&x_view).arg(&self.packed);
                self.push_scales(&mut b);
                b.arg(&self.code).arg(&mut y).arg(&m32).arg(&n32).arg(&k32).arg(&self.log2_bs);
                unsafe { b.launch(cfg((blocks, 1), THREADS)) }?;
            }
            GemmPlan::TensorCore { mt, tiles_per_split, splits } => {
                let grid = (n.div_ceil(64) as u32, splits as u32);
                let tps = tiles_per_split as u32;
                let f = &self.kernels.gemm[mt - 1];
                if splits == 1 {
                    let null_ws: u64 = 0;
                    let mut b = self.stream.launch_builder(f);
                    b.arg(&x_view).arg(&self.packed);
                    self.push_scales(&mut b);
                    b.arg(&self.code).arg(&mut y).arg(&null_ws);
                    b.arg(&m32).arg(&n32).arg(&k32).arg(&self.log2_bs).arg(&tps);
                    unsafe { b.launch(cfg(grid, THREADS)) }?;
                } else {
                    let mut ws = unsafe { self.stream.alloc::<f32>(splits * m * n) }?;
                    let mut b = self.stream.launch_builder(f);
                    b.arg(&x_view).arg(&self.packed);
                    self.push_scales(&mut b);
                    b.arg(&self.code).arg(&mut y).arg(&mut ws);
                    b.arg(&m32).arg(&n32).arg(&k32).arg(&self.log2_bs).arg(&tps);
                    unsafe { b.launch(cfg(grid, THREADS)) }?;
                    let mn = (m * n) as u32;
                    let s32 = splits as u32;
                    let blocks = (m * n).div_ceil(THREADS as usize).min(32 * self.sms as usize).max(1) as u32;
                    let mut b = self.stream.launch_builder(&self.kernels.splitk_reduce);
                    b.arg(&ws).arg(&mut y).arg(&mn).arg(&s32);
                    unsafe { b.launch(cfg((blocks, 1), THREADS)) }?;
                }
            }
        }
        drop(x_storage);
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok(self.wrap(y, &out_dims))
    }
}
