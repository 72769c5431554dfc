//! Causal softmax over attention scores: y = softmax(s·x + mask) over the last dim, where query i of t may see
//! keys 0..=i + (s_len − t). Backward: dx = s·y ⊙ (g − Σ g⊙y).
//!
//! candle's `softmax_last_dim` has no backward, hence this op. It serves the composed attention (the reference the
//! fused [`fn@super::attention`] is tested against, and the path of devices without an attention kernel). The row
//! statistics (max, sum) are f32 whatever the storage dtype.

use crate::host::{exp_f32, f32_view, isa_variants, max_lanes, storage_from_f32, sum_lanes};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

isa_variants! {
    /// In place over the rows of `p` (each `s` wide): row j, query (row0 + j) mod t, sees its first
    /// offset + (row0 + j) mod t + 1 entries, which become softmax(scale·v); the rest become 0. Vectorized exp
    /// ([`crate::host::exp_f32`]), max and sum.
    pub fn causal_softmax_rows / causal_softmax_rows_at(
        p: &mut [f32],
        s: usize,
        row0: usize,
        t: usize,
        offset: usize,
        scale: f32,
    ) {
        for (j, row) in p.chunks_exact_mut(s).enumerate() {
            let visible = (offset + (row0 + j) % t + 1).min(s);
            let (vis, masked) = row.split_at_mut(visible);
            vis.iter_mut().for_each(|v| *v *= scale);
            let mx = max_lanes(vis);
            vis.iter_mut().for_each(|v| *v = exp_f32(*v - mx));
            let inv = 1.0 / sum_lanes(vis);
            vis.iter_mut().for_each(|v| *v *= inv);
            masked.iter_mut().for_each(|v| *v = 0.0);
        }
    }
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(st, l, "causal_softmax")?;
        let dims = l.dims();
        let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if s < t {
            candle_core::bail!("causal_softmax: {t} queries but only {s} keys");
        }
        let offset = s - t; // query i sits at absolute position offset + i
        let mut out = x.into_owned();
        // Blocks of whole rows per task; the row index decides the query position.
        let rows_per_task = 64;
        out.par_chunks_mut(s * rows_per_task)
            .enumerate()
            .for_each(|(c, block)| causal_softmax_rows(block, s, c * rows_per_task, t, offset, self.scale));
        Ok((storage_from_f32(out, st.dtype())?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // dx = scale · y ⊙ (g − Σ g⊙y), in f32
        let (y, g) = (y.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?);
        let gy = (g * &y)?;
        let s = gy.sum_keepdim(candle_core::D::Minus1)?;
        let dx = ((gy - y.broadcast_mul(&s)?)? * self.scale as f64)?;
        Ok(Some(dx.to_dtype(x.dtype())?))
    }
}

/// softmax(scale · x) over the last dim of attention scores (…, t, s), where query i may only see keys
/// 0..=i + (s − t) (the keys before it in the cache, and itself).
pub fn causal_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    if !super::use_kernel(x, false) {
        return super::reference::causal_softmax(x, scale);
    }
    x.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn causal_softmax_gradient_and_mask() {
        check_grad(&[2, 4, 4], |x| causal_softmax(x, 0.7).unwrap(), 1e-2);
        check_grad(&[1, 3, 5], |x| causal_softmax(x, 1.0).unwrap(), 1e-2);
        let y = causal_softmax(&rand(&[3, 5], 9), 1.0).unwrap();
        let y: Vec<Vec<f32>> = y.to_vec2().unwrap();
        // 3 queries over 5 keys: query 0 sees keys 0..=2.
        assert_eq!(y[0][3], 0.0);
        assert_eq!(y[0][4], 0.0);
        assert!(y[2][4] > 0.0);
        for row in y {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn every_instruction_set_level_gives_the_same_rows() {
        let (t, s) = (5, 37);
        let x: Vec<f32> = (rand(&[t, s], 11) * 6.0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let run = |isa| {
            let mut p = x.clone();
            causal_softmax_rows_at(isa, &mut p, s, 0, t, s - t, 0.9);
            p
        };
        let want = run(crate::cpu::Isa::Scalar);
        for isa in crate::host::available_isas() {
            for (a, b) in run(isa).iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{isa:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn kernel_matches_reference_and_bf16_matches_f32() {
        let x = (rand(&[2, 4, 6], 10) * 3.0).unwrap();
        compare_with_reference(
            std::slice::from_ref(&x),
            |t| causal_softmax(&t[0], 0.7).unwrap(),
            |t| super::super::reference::causal_softmax(&t[0], 0.7).unwrap(),
            1e-5,
        );
        compare_bf16_with_f32(&[x], |t| causal_softmax(&t[0], 0.7).unwrap(), BF16_TOL);
    }
}
