//! RMSNorm over the last dimension with a frozen weight: y = x·r·w, r = (mean(x²) + ε)^-½.
//! Backward: dx = r·u − x·r³·mean(u⊙x), u = dy⊙w (w is frozen: no dw).
//!
//! candle's fused `rms_norm` has no backward (a loss through it back-propagates nothing, silently), hence this op.
//! Statistics are computed in f32 whatever the storage dtype. The row loops are compiled per instruction-set level
//! ([`crate::host::isa_variants`]). Reference: Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019);
//! transformers' `LlamaRMSNorm`.

use crate::host::{dot_lanes, f32_view, isa_variants, storage_from_f32, tensor_from_f32, with_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
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

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(s1, l1, "rms_norm")?;
        let w = f32_view(s2, l2, "rms_norm")?;
        let d = w.len();
        if d == 0 || l1.dims().last() != Some(&d) {
            candle_core::bail!("rms_norm: weight of {d} does not match input {:?}", l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, xr)| forward_rows(xr, &w, self.eps, o));
        Ok((storage_from_f32(out, s1.dtype())?, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let dx = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(g, |g| {
                    let mut dx = vec![0f32; x.len()];
                    dx.par_chunks_mut(d * ROWS_PER_TASK)
                        .zip(x.par_chunks(d * ROWS_PER_TASK).zip(g.par_chunks(d * ROWS_PER_TASK)))
                        .for_each(|(o, (xr, gr))| backward_rows(xr, gr, w, self.eps, o));
                    dx
                })
            })
        })???;
        Ok((Some(tensor_from_f32(dx, x.shape(), x.dtype())?), None))
    }
}

/// RMSNorm over the last dimension with a frozen weight `w` (d): y = x / sqrt(mean(x²) + eps) · w, in x's dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !super::use_kernel(x, false) {
        return super::reference::rms_norm(x, w, eps);
    }
    x.contiguous()?.apply_op2(w, RmsNorm { eps: eps as f32 })
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
            &[x.clone()],
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
