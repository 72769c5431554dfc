//! RMSNorm over the last dimension with a frozen weight: y = x·r·w, r = (mean(x²) + ε)^-½.
//! Backward: dx = r·u − x·r³·mean(u⊙x), u = dy⊙w (w is frozen: no dw).
//!
//! candle's fused `rms_norm` has no backward (a loss through it back-propagates nothing, silently), hence this op.
//! Statistics are computed in f32 whatever the storage dtype. The CPU row loops are compiled per instruction-set
//! level ([`crate::host::isa_variants`]); on CUDA one block per row (`src/ops/cuda/rms_norm.cu`). The backward is an
//! op of its own (`RmsNormBwd`, CPU and CUDA kernels), so it runs wherever its inputs are. Reference: Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019);
//! transformers' `LlamaRMSNorm`.

use crate::host::{dot_lanes, f32_view, isa_variants, storage_from_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows handed to one rayon task.
const ROWS_PER_TASK: usize = 8;

isa_variants! {
    /// out = x·r·w for each row of `x` (rows of `w.len()`).
    pub fn forward_rows / forward_rows_at(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (o, xr) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let r = 1.0 / (dot_lanes(xr, xr) / d as f32 + eps).sqrt();
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * r * wv;
            }
        }
    }
}

isa_variants! {
    /// dx = r·u − x·r³·mean(u⊙x), u = g⊙w, for each row.
    pub fn backward_rows / backward_rows_at(x: &[f32], g: &[f32], w: &[f32], eps: f32, dx: &mut [f32]) {
        let d = w.len();
        let mut u = vec![0f32; d];
        for ((o, xr), gr) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(g.chunks_exact(d)) {
            let r = 1.0 / (dot_lanes(xr, xr) / d as f32 + eps).sqrt();
            for ((u, &gv), &wv) in u.iter_mut().zip(gr).zip(w) {
                *u = gv * wv;
            }
            let c = r * r * r * dot_lanes(&u, xr) / d as f32;
            for ((o, &xv), &uv) in o.iter_mut().zip(xr).zip(&u) {
                *o = r * uv - xv * c;
            }
        }
    }
}

struct RmsNorm {
    eps: f32,
}

/// d (the weight's length, the row length) after checking it against x's last dimension.
fn row_len(lx: &Layout, lw: &Layout) -> Result<usize> {
    let d = lw.shape().elem_count();
    if d == 0 || lx.dims().last() != Some(&d) {
        candle_core::bail!("rms_norm: weight of {d} does not match input {:?}", lx.dims());
    }
    Ok(d)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = row_len(l1, l2)?;
        let x = f32_view(s1, l1, "rms_norm")?;
        let w = f32_view(s2, l2, "rms_norm")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, xr)| forward_rows(xr, &w, self.eps, o));
        Ok((storage_from_f32(out, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = row_len(l1, l2)?;
        Ok((cuda::launch(self.eps, d, (s1, l1), (s2, l2), None)?, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(x.dtype())?.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &RmsNormBwd { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// The backward pass as an op of (x, w, dy) → dx (w frozen: no dw), in x's dtype.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = row_len(l1, l2)?;
        if l3.shape() != l1.shape() {
            candle_core::bail!("rms_norm backward: gradient {:?} for input {:?}", l3.dims(), l1.dims());
        }
        let x = f32_view(s1, l1, "rms_norm backward")?;
        let w = f32_view(s2, l2, "rms_norm backward")?;
        let g = f32_view(s3, l3, "rms_norm backward")?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK).zip(g.par_chunks(d * ROWS_PER_TASK)))
            .for_each(|(o, (xr, gr))| backward_rows(xr, gr, &w, self.eps, o));
        Ok((storage_from_f32(dx, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = row_len(l1, l2)?;
        if l3.shape() != l1.shape() || s3.dtype() != s1.dtype() {
            candle_core::bail!(
                "rms_norm backward: gradient {:?} {:?} for input {:?}",
                l3.dims(),
                s3.dtype(),
                l1.dims()
            );
        }
        Ok((cuda::launch(self.eps, d, (s1, l1), (s2, l2), Some((s3, l3)))?, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{self as k, alloc, launched, suffix, view};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaStorage, DType, Layout, Result};
    use half::bf16;

    /// Forward (`dy` None: y) or backward (dx) of rows of `d`: one block per row, ≤ 256 threads (a multiple of 32).
    pub(super) fn launch(
        eps: f32,
        d: usize,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        dy: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        match (x.0.dtype(), w.0.dtype()) {
            (DType::F32, DType::F32) => typed::<f32, f32>(eps, d, x, w, dy),
            (DType::F32, DType::BF16) => typed::<f32, bf16>(eps, d, x, w, dy),
            (DType::BF16, DType::F32) => typed::<bf16, f32>(eps, d, x, w, dy),
            (DType::BF16, DType::BF16) => typed::<bf16, bf16>(eps, d, x, w, dy),
            (a, b) => candle_core::bail!("rms_norm: the CUDA kernels take f32 or bf16, not {a:?} and {b:?}"),
        }
    }

    fn typed<X, W>(
        eps: f32,
        d: usize,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        dy: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage>
    where
        X: CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr,
        W: CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr,
    {
        let dev = xs.device();
        let x = view::<X>(xs, xl, "rms_norm")?;
        let w = view::<W>(ws, wl, "rms_norm")?;
        let n = x.len();
        let rows = u32::try_from(n / d).map_err(|_| candle_core::Error::Msg(format!("rms_norm: {n} elements")))?;
        let d32 = u32::try_from(d).map_err(|_| candle_core::Error::Msg(format!("rms_norm: rows of {d}")))?;
        let mut out = alloc::<X>(dev, n)?;
        if rows == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        let threads = d32.div_ceil(32).clamp(1, k::THREADS / 32) * 32;
        let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let which = if dy.is_some() { "bwd" } else { "fwd" };
        let name = format!("rms_norm_{which}_{}_{}", suffix(xs.dtype(), "rms_norm")?, suffix(ws.dtype(), "rms_norm")?);
        let f = k::func(dev, &k::RMS_NORM, &name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&w);
        let g = match dy {
            Some((gs, gl)) => Some(view::<X>(gs, gl, "rms_norm backward")?),
            None => None,
        };
        if let Some(g) = &g {
            b.arg(g);
        }
        b.arg(&mut out).arg(&d32).arg(&eps);
        // SAFETY: the arguments match the kernel's signature (rms_norm.cu); x, dy and out hold rows·d elements.
        launched(unsafe { b.launch(cfg) })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// RMSNorm over the last dimension with a frozen weight `w` (d): y = x / sqrt(mean(x²) + eps) · w, in x's dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !super::use_kernel(x, true) || w.device().location() != x.device().location() {
        return super::reference::rms_norm(x, w, eps);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn rms_norm_gradient() {
        let w = (rand(&[6], 5) + 1.5).unwrap();
        check_grad(&[3, 6], |x| rms_norm(x, &w, 1e-5).unwrap(), 1e-2);
        // Forward against the closed form.
        let x = rand(&[2, 6], 6);
        let r = (x.sqr().unwrap().mean_keepdim(1).unwrap() + 1e-5).unwrap().sqrt().unwrap();
        let want = x.broadcast_div(&r).unwrap().broadcast_mul(&w).unwrap();
        assert!(max_abs_diff(&want, &rms_norm(&x, &w, 1e-5).unwrap()) < 1e-5);
    }

    #[test]
    fn kernel_matches_reference_and_bf16_matches_f32() {
        let w = (rand(&[40], 5) + 1.5).unwrap();
        let x = rand(&[3, 7, 40], 6);
        compare_with_reference(
            std::slice::from_ref(&x),
            |t| rms_norm(&t[0], &w, 1e-5).unwrap(),
            |t| super::super::reference::rms_norm(&t[0], &w, 1e-5).unwrap(),
            1e-5,
        );
        compare_bf16_with_f32(&[x], |t| rms_norm(&t[0], &w.to_dtype(t[0].dtype()).unwrap(), 1e-5).unwrap(), BF16_TOL);
    }

    #[test]
    fn every_instruction_set_level_gives_the_same_rows() {
        let (d, rows) = (67, 5);
        let x: Vec<f32> = rand(&[rows, d], 7).flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f32> = rand(&[rows, d], 8).flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<f32> = rand(&[d], 9).flatten_all().unwrap().to_vec1().unwrap();
        let run = |isa| {
            let (mut y, mut dx) = (vec![0f32; rows * d], vec![0f32; rows * d]);
            forward_rows_at(isa, &x, &w, 1e-5, &mut y);
            backward_rows_at(isa, &x, &g, &w, 1e-5, &mut dx);
            (y, dx)
        };
        let want = run(crate::cpu::Isa::Scalar);
        for isa in crate::host::available_isas() {
            let got = run(isa);
            for (a, b) in got.0.iter().chain(&got.1).zip(want.0.iter().chain(&want.1)) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{isa:?}: {a} vs {b}");
            }
        }
    }
}
