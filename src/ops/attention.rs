//! Fused causal grouped-query attention: O = softmax(s·QKᵀ + causal mask)·V per head, with K/V heads shared by
//! groups of query heads. Neither the scores, the probabilities nor repeated K/V copies are kept: the backward
//! recomputes P per head (t×s floats at a time) and follows the textbook formulas
//!   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = s·dS·K,  dK = s·dSᵀ·Q.
//! Activation memory per layer is the output alone (plus q, k, v, which the projections' backward keeps anyway).
//! Scores, probabilities and accumulations are f32 whatever the storage dtype. The reference it is tested against
//! is [`super::reference::attention`] (repeat K/V, matmuls, [`super::causal_softmax`]).
//! Reference: Vaswani et al. (2017); grouped-query attention, Ainslie et al. (2023); transformers' `sdpa_attention`.

use super::gemm::gemm_strided;
use crate::host::{f32_view, storage_from_f32, tensor_from_f32, with_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Attention {
    scale: f32,
}

/// Shapes of an attention call: q (b, t, nh, d), k and v (b, s, nkv, d).
#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    t: usize,
    s: usize,
    nh: usize,
    nkv: usize,
    d: usize,
}

impl AttnDims {
    fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        let (&[b, t, nh, d], &[bk, s, nkv, dk]) = (q, k) else {
            candle_core::bail!("attention: q {q:?} and k {k:?} must be (batch, seq, heads, head_dim)")
        };
        if k != v || bk != b || dk != d || nkv == 0 || nh % nkv != 0 || s < t {
            candle_core::bail!("attention: incompatible q {q:?}, k {k:?}, v {v:?}");
        }
        Ok(Self { b, t, s, nh, nkv, d })
    }

    /// Scores → probabilities for head `h` of batch `bi`: writes P (t×s, row-major) into `p`.
    fn probs(&self, q: &[f32], k: &[f32], bi: usize, h: usize, scale: f32, p: &mut [f32]) {
        let Self { t, s, nh, nkv, d, .. } = *self;
        let g = h / (nh / nkv);
        let qb = &q[bi * t * nh * d + h * d..];
        let kb = &k[bi * s * nkv * d + g * d..];
        // S (t×s) = Q (t×d) · Kᵀ (d×s)
        gemm_strided(t, s, d, p, (s, 1), false, qb, (nh * d, 1), kb, (1, nkv * d), 1.0, false);
        super::softmax::causal_softmax_rows(p, s, 0, t, s - t, scale);
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = AttnDims::new(lq.dims(), lk.dims(), lv.dims())?;
        let (q, k, v) =
            (f32_view(sq, lq, "attention")?, f32_view(sk, lk, "attention")?, f32_view(sv, lv, "attention")?);
        let (q, k, v): (&[f32], &[f32], &[f32]) = (&q, &k, &v);
        let AttnDims { b, t, s, nh, nkv, d } = dm;
        // One (t×d) block per (batch, head), computed in parallel, then scattered into (b, t, nh, d).
        let blocks: Vec<Vec<f32>> = (0..b * nh)
            .into_par_iter()
            .map(|bh| {
                let (bi, h) = (bh / nh, bh % nh);
                let g = h / (nh / nkv);
                let mut p = vec![0f32; t * s];
                dm.probs(q, k, bi, h, self.scale, &mut p);
                let mut o = vec![0f32; t * d];
                // O (t×d) = P (t×s) · V (s×d)
                let vb = &v[bi * s * nkv * d + g * d..];
                gemm_strided(t, d, s, &mut o, (d, 1), false, &p, (s, 1), vb, (nkv * d, 1), 1.0, false);
                o
            })
            .collect();
        let mut out = vec![0f32; b * t * nh * d];
        for (bh, o) in blocks.iter().enumerate() {
            let (bi, h) = (bh / nh, bh % nh);
            for i in 0..t {
                let dst = ((bi * t + i) * nh + h) * d;
                out[dst..dst + d].copy_from_slice(&o[i * d..(i + 1) * d]);
            }
        }
        Ok((storage_from_f32(out, sq.dtype())?, lq.shape().clone()))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = AttnDims::new(q.dims(), k.dims(), v.dims())?;
        let AttnDims { b, t, s, nh, nkv, d } = dm;
        let rep = nh / nkv;
        let scale = self.scale;
        // Per (batch, kv head): dQ of its `rep` query heads, and dK, dV accumulated over them.
        let blocks: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(grad, |go| {
                        (0..b * nkv)
                            .into_par_iter()
                            .map(|bg| {
                                let (bi, g) = (bg / nkv, bg % nkv);
                                let mut dq = vec![0f32; rep * t * d];
                                let mut dk = vec![0f32; s * d];
                                let mut dv = vec![0f32; s * d];
                                let mut p = vec![0f32; t * s];
                                let mut dp = vec![0f32; t * s];
                                let kb = &k[bi * s * nkv * d + g * d..];
                                let vb = &v[bi * s * nkv * d + g * d..];
                                for r in 0..rep {
                                    let h = g * rep + r;
                                    dm.probs(q, k, bi, h, scale, &mut p);
                                    let qb = &q[bi * t * nh * d + h * d..];
                                    let gb = &go[bi * t * nh * d + h * d..];
                                    // dV (s×d) += Pᵀ (s×t) · dO (t×d)
                                    gemm_strided(
                                        s,
                                        d,
                                        t,
                                        &mut dv,
                                        (d, 1),
                                        true,
                                        &p,
                                        (1, s),
                                        gb,
                                        (nh * d, 1),
                                        1.0,
                                        false,
                                    );
                                    // dP (t×s) = dO (t×d) · Vᵀ (d×s)
                                    gemm_strided(
                                        t,
                                        s,
                                        d,
                                        &mut dp,
                                        (s, 1),
                                        false,
                                        gb,
                                        (nh * d, 1),
                                        vb,
                                        (1, nkv * d),
                                        1.0,
                                        false,
                                    );
                                    // dS = P ⊙ (dP − rowsum(dP ⊙ P)), in place in dp
                                    for (prow, dprow) in p.chunks(s).zip(dp.chunks_mut(s)) {
                                        let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                                        for (x, &pv) in dprow.iter_mut().zip(prow) {
                                            *x = pv * (*x - dot);
                                        }
                                    }
                                    // dQ (t×d) = s · dS (t×s) · K (s×d)
                                    let dqh = &mut dq[r * t * d..(r + 1) * t * d];
                                    gemm_strided(
                                        t,
                                        d,
                                        s,
                                        dqh,
                                        (d, 1),
                                        false,
                                        &dp,
                                        (s, 1),
                                        kb,
                                        (nkv * d, 1),
                                        scale,
                                        false,
                                    );
                                    // dK (s×d) += s · dSᵀ (s×t) · Q (t×d)
                                    gemm_strided(
                                        s,
                                        d,
                                        t,
                                        &mut dk,
                                        (d, 1),
                                        true,
                                        &dp,
                                        (1, s),
                                        qb,
                                        (nh * d, 1),
                                        scale,
                                        false,
                                    );
                                }
                                (dq, dk, dv)
                            })
                            .collect()
                    })
                })
            })
        })????;
        let mut dq = vec![0f32; b * t * nh * d];
        let mut dk = vec![0f32; b * s * nkv * d];
        let mut dv = vec![0f32; b * s * nkv * d];
        for (bg, (bq, bk, bv)) in blocks.iter().enumerate() {
            let (bi, g) = (bg / nkv, bg % nkv);
            for r in 0..rep {
                let h = g * rep + r;
                for i in 0..t {
                    let dst = ((bi * t + i) * nh + h) * d;
                    dq[dst..dst + d].copy_from_slice(&bq[(r * t + i) * d..(r * t + i + 1) * d]);
                }
            }
            for j in 0..s {
                let dst = ((bi * s + j) * nkv + g) * d;
                dk[dst..dst + d].copy_from_slice(&bk[j * d..(j + 1) * d]);
                dv[dst..dst + d].copy_from_slice(&bv[j * d..(j + 1) * d]);
            }
        }
        Ok((
            Some(tensor_from_f32(dq, q.shape(), q.dtype())?),
            Some(tensor_from_f32(dk, k.shape(), k.dtype())?),
            Some(tensor_from_f32(dv, v.shape(), v.dtype())?),
        ))
    }
}

/// Causal grouped-query attention. q: (b, t, nh, d); k, v: (b, s, nkv, d) with s ≥ t, the queries being the last
/// t of the s positions; nh a multiple of nkv. Returns (b, t, nh, d) in q's dtype. Scores are scaled by `scale`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if !super::use_kernel(q, false) {
        return super::reference::attention(q, k, v, scale);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(&k, &v, Attention { scale: scale as f32 })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn fused_attention_matches_composed_and_gradients() {
        // GQA (4 query heads over 2 kv heads), a cache offset (s > t), batch 2.
        let (b, t, s, nh, nkv, d) = (2, 3, 5, 4, 2, 4);
        let k = rand(&[b, s, nkv, d], 21);
        let v = rand(&[b, s, nkv, d], 22);
        let q = rand(&[b, t, nh, d], 23);
        check_grad(&[b, t, nh, d], |q| attention(q, &k, &v, 0.5).unwrap(), 1e-2);
        check_grad(&[b, s, nkv, d], |k| attention(&q, k, &v, 0.5).unwrap(), 1e-2);
        check_grad(&[b, s, nkv, d], |v| attention(&q, &k, v, 0.5).unwrap(), 1e-2);
        compare_with_reference(
            &[q.clone(), k.clone(), v.clone()],
            |x| attention(&x[0], &x[1], &x[2], 0.5).unwrap(),
            |x| super::super::reference::attention(&x[0], &x[1], &x[2], 0.5).unwrap(),
            1e-5,
        );
        compare_bf16_with_f32(&[q, k, v], |x| attention(&x[0], &x[1], &x[2], 0.5).unwrap(), BF16_TOL);
    }
}
