//! Fused causal grouped-query attention: O = softmax(s·QKᵀ + causal mask)·V per head, with K/V heads shared by
//! groups of query heads. Neither the scores, the probabilities nor repeated K/V copies are kept: the backward
//! recomputes P per head (t×s floats at a time) and follows the textbook formulas
//!   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = s·dS·K,  dK = s·dSᵀ·Q.
//! Activation memory per layer is the output alone (plus q, k, v, which the projections' backward keeps anyway).
//! Scores, probabilities and accumulations are f32 whatever the storage dtype. The reference it is tested against
//! is [`super::reference::attention`] (repeat K/V, matmuls, [`super::causal_softmax`]).
//!
//! On CUDA, [`attention`] takes [`attention_chunked`] instead: candle tensor ops (so cuBLAS does the products),
//! queries `chunk` rows at a time with query heads grouped by their K/V head (no repeated K/V), keys past a chunk's
//! last causal position skipped. The forward keeps O and the row log-sum-exp L = m + ln Σ exp(S − m) (f32); the
//! backward recomputes P = exp(S − L) per chunk and uses D = rowsum(dO ⊙ O) (= rowsum(dP ⊙ P)) — FlashAttention-2's
//! backward at chunk granularity. Peak extra memory is a few chunk-sized f32 score blocks, not (t × s) per head.
//! Reference: Vaswani et al. (2017); grouped-query attention, Ainslie et al. (2023); transformers' `sdpa_attention`;
//! Dao, FlashAttention-2 (2023), algorithm 2.

use super::gemm::gemm_strided;
use super::graft::Grads3;
use crate::host::{f32_view, storage_from_f32, tensor_from_f32, with_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};
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
    if q.device().is_cuda() {
        return attention_chunked(q, k, v, scale, None);
    }
    if !super::use_kernel(q, false) {
        return super::reference::attention(q, k, v, scale);
    }
    if super::attention_decode::applies(q, k, v) {
        return super::attention_decode::attention(q, k, v, scale);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(&k, &v, Attention { scale: scale as f32 })
}

// ---------------------------------------------------------------------------------------------------------------
// The chunked path (CUDA, and any device): tensor ops only, queries a chunk at a time, FlashAttention-2's
// backward at chunk granularity.
// ---------------------------------------------------------------------------------------------------------------

/// Bytes of one chunk's f32 scores (all batches and heads, `chunk` query rows × s keys) that
/// [`attention_chunked`] aims for; a chunk's transient memory is a few times this.
const CHUNK_SCORE_BYTES: usize = 64 << 20;

/// Query rows per chunk for `dm` within [`CHUNK_SCORE_BYTES`] (at least 1).
fn default_chunk(dm: &AttnDims) -> usize {
    (CHUNK_SCORE_BYTES / (dm.b * dm.nh * dm.s * 4).max(1)).max(1)
}

/// The shapes and helpers shared by the chunked forward and backward. Query heads are grouped by the K/V head
/// they read — q (b, t, nh, d) is viewed as (b, nkv, rep, t, d) — so that one batched product over (b, nkv)
/// serves all `rep` heads of a group and K/V are never repeated.
struct Chunked {
    dm: AttnDims,
    scale: f64,
    chunk: usize,
}

impl Chunked {
    fn rep(&self) -> usize {
        self.dm.nh / self.dm.nkv
    }

    /// (b, t, nh, d) → (b, nkv, rep, t, d), a view (h = g·rep + r).
    fn group(&self, x: &Tensor) -> Result<Tensor> {
        let AttnDims { b, t, nkv, d, .. } = self.dm;
        x.reshape((b, t, nkv, self.rep(), d))?.permute((0, 2, 3, 1, 4))
    }

    /// (b, nkv, rep, t, d) → (b, t, nh, d), contiguous, in `dtype`.
    fn ungroup(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let AttnDims { b, t, nh, d, .. } = self.dm;
        x.permute((0, 3, 1, 2, 4))?.to_dtype(dtype)?.contiguous()?.reshape((b, t, nh, d))
    }

    /// Rows [i0, i0 + c) of a grouped (b, nkv, rep, t, d) tensor, in f32: (b, nkv, rep·c, d), contiguous.
    fn rows(&self, xg: &Tensor, i0: usize, c: usize) -> Result<Tensor> {
        let AttnDims { b, nkv, d, .. } = self.dm;
        xg.narrow(3, i0, c)?.to_dtype(DType::F32)?.contiguous()?.reshape((b, nkv, self.rep() * c, d))
    }

    /// Keys any of the query rows [i0, i0 + c) may see: the first i0 + c + (s − t) (causal, queries last).
    fn keys(&self, i0: usize, c: usize) -> usize {
        (i0 + c + self.dm.s - self.dm.t).min(self.dm.s)
    }

    /// Scaled, causally masked scores of rows [i0, i0 + c) over the first `sk` keys: (b, nkv, rep, c, sk), f32.
    /// qc (b, nkv, rep·c, d), kc (b, nkv, sk, d).
    fn scores(&self, qc: &Tensor, kc: &Tensor, i0: usize, c: usize, sk: usize) -> Result<Tensor> {
        let AttnDims { b, s, t, nkv, .. } = self.dm;
        // S (b, nkv, rep·c, sk) = Q_c (rep·c, d) · K_cᵀ (d, sk) per (batch, kv head)
        let sc = (qc.matmul(&kc.t()?)? * self.scale)?.reshape((b, nkv, self.rep(), c, sk))?;
        if c == 1 {
            return Ok(sc); // one row sees all its sk keys
        }
        // Query row i sees key j iff j ≤ i + (s − t): a (c, sk) bias of 0 / −∞, built on the device.
        let dev = qc.device();
        let off = (s - t) as u32;
        let rows = Tensor::arange(i0 as u32 + off, (i0 + c) as u32 + off, dev)?.reshape((c, 1))?;
        let cols = Tensor::arange(0u32, sk as u32, dev)?.reshape((1, sk))?;
        let zero = Tensor::zeros((c, sk), DType::F32, dev)?;
        let bias = cols.broadcast_le(&rows)?.where_cond(&zero, &Tensor::full(f32::NEG_INFINITY, (c, sk), dev)?)?;
        sc.broadcast_add(&bias)
    }

    /// K or V (b, s, nkv, d) → (b, nkv, s, d), f32, contiguous.
    fn heads_f32(x: &Tensor) -> Result<Tensor> {
        x.transpose(1, 2)?.to_dtype(DType::F32)?.contiguous()
    }

    /// O (b, t, nh, d) in q's dtype and the row log-sum-exp L (b, nkv, rep, t), f32, of detached inputs.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let AttnDims { b, t, nkv, d, .. } = self.dm;
        let rep = self.rep();
        let (k, v) = (Self::heads_f32(k)?, Self::heads_f32(v)?); // (b, nkv, s, d)
        let qg = self.group(q)?;
        let (mut os, mut ls) = (Vec::new(), Vec::new());
        for i0 in (0..t).step_by(self.chunk) {
            let c = self.chunk.min(t - i0);
            let sk = self.keys(i0, c);
            let (kc, vc) = (k.narrow(2, 0, sk)?, v.narrow(2, 0, sk)?); // (b, nkv, sk, d)
            let (m, e) = {
                let sc = self.scores(&self.rows(&qg, i0, c)?, &kc, i0, c, sk)?; // (b, nkv, rep, c, sk)
                let m = sc.max_keepdim(D::Minus1)?; // (b, nkv, rep, c, 1): finite, key 0 is always seen
                let e = sc.broadcast_sub(&m)?.exp()?;
                (m, e)
            };
            let l = e.sum_keepdim(D::Minus1)?; // (b, nkv, rep, c, 1)
                                               // O_c (b, nkv, rep·c, d) = exp(S − m) (rep·c, sk) · V_c (sk, d), then divided by the row sums
            let oc = e.reshape((b, nkv, rep * c, sk))?.matmul(&vc)?.reshape((b, nkv, rep, c, d))?;
            os.push(oc.broadcast_div(&l)?);
            ls.push((m + l.log()?)?.squeeze(D::Minus1)?); // (b, nkv, rep, c)
        }
        Ok((self.ungroup(&Tensor::cat(&os, 3)?, q.dtype())?, Tensor::cat(&ls, 3)?))
    }

    /// (dq, dk, dv) in the inputs' dtypes from O, L and dO, recomputing P a chunk at a time:
    /// P = exp(S − L), dV += Pᵀ·dO, dP = dO·Vᵀ, D = rowsum(dO ⊙ O), dS = P ⊙ (dP − D), dQ = s·dS·K, dK += s·dSᵀ·Q.
    fn backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, go: &Tensor, lse: &Tensor) -> Result<Grads3> {
        let AttnDims { b, t, s, nkv, d, .. } = self.dm;
        let rep = self.rep();
        let (kf, vf) = (Self::heads_f32(k)?, Self::heads_f32(v)?); // (b, nkv, s, d)
        let (qg, og, gg) = (self.group(q)?, self.group(o)?, self.group(go)?);
        let mut dk = Tensor::zeros((b, nkv, s, d), DType::F32, q.device())?;
        let mut dv = dk.clone();
        let mut dqs = Vec::new();
        for i0 in (0..t).step_by(self.chunk) {
            let c = self.chunk.min(t - i0);
            let sk = self.keys(i0, c);
            let (kc, vc) = (kf.narrow(2, 0, sk)?, vf.narrow(2, 0, sk)?); // (b, nkv, sk, d)
            let (qc, gc) = (self.rows(&qg, i0, c)?, self.rows(&gg, i0, c)?); // (b, nkv, rep·c, d)
            let dc = (self.rows(&og, i0, c)? * &gc)?.sum_keepdim(D::Minus1)?; // D (b, nkv, rep·c, 1)
            let lc = lse.narrow(3, i0, c)?.unsqueeze(D::Minus1)?; // (b, nkv, rep, c, 1)
            let p = self.scores(&qc, &kc, i0, c, sk)?.broadcast_sub(&lc)?.exp()?.reshape((b, nkv, rep * c, sk))?;
            // dV_c (b, nkv, sk, d) = Pᵀ (sk, rep·c) · dO_c (rep·c, d)
            let dvc = p.t()?.matmul(&gc)?;
            // dS (b, nkv, rep·c, sk) = P ⊙ (dO_c·V_cᵀ − D)
            let ds = (p * gc.matmul(&vc.t()?)?.broadcast_sub(&dc)?)?;
            // dQ_c (b, nkv, rep·c, d) = s · dS · K_c;  dK_c (b, nkv, sk, d) = s · dSᵀ · Q_c
            dqs.push((ds.matmul(&kc)? * self.scale)?.reshape((b, nkv, rep, c, d))?);
            let dkc = (ds.t()?.matmul(&qc)? * self.scale)?;
            dk = (dk + dkc.pad_with_zeros(2, 0, s - sk)?)?;
            dv = (dv + dvc.pad_with_zeros(2, 0, s - sk)?)?;
        }
        let dq = self.ungroup(&Tensor::cat(&dqs, 3)?, q.dtype())?;
        // (b, nkv, s, d) → (b, s, nkv, d)
        let dk = dk.transpose(1, 2)?.to_dtype(k.dtype())?.contiguous()?;
        let dv = dv.transpose(1, 2)?.to_dtype(v.dtype())?.contiguous()?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// [`attention`] by query chunks of `chunk` rows (default: a chunk's f32 scores within 64 MiB), in candle tensor
/// ops on any device: the path CUDA takes, callable on the CPU so that tests run exactly the GPU's code.
/// Keeps only O and the per-row log-sum-exp (f32) for the backward pass, which recomputes P chunk by chunk;
/// scores and statistics are f32, O and the gradients have the inputs' dtypes.
pub(crate) fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let dm = AttnDims::new(q.dims(), k.dims(), v.dims())?;
    if dm.t == 0 {
        return q.zeros_like();
    }
    let chunk = chunk.unwrap_or_else(|| default_chunk(&dm)).clamp(1, dm.t);
    let op = Chunked { dm, scale, chunk };
    let (o, lse) = op.forward(&q.detach(), &k.detach(), &v.detach())?;
    super::graft::graft3(q, k, v, o, "attention-chunked", move |q, k, v, o, go| {
        op.backward(&q.detach(), &k.detach(), &v.detach(), &o.detach(), &go.detach(), &lse)
    })
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

    #[test]
    fn chunked_attention_matches_kernel_and_reference() {
        // GQA (4 query heads over 2 kv heads), cached keys (s > t), batch 2; chunks 1, 3 (not dividing t) and t.
        let (b, t, s, nh, nkv, d) = (2, 5, 7, 4, 2, 8);
        let q = rand(&[b, t, nh, d], 31);
        let k = rand(&[b, s, nkv, d], 32);
        let v = rand(&[b, s, nkv, d], 33);
        for chunk in [1, 3, t] {
            let chunked = |x: &[Tensor]| attention_chunked(&x[0], &x[1], &x[2], 0.35, Some(chunk)).unwrap();
            compare_with_reference(
                &[q.clone(), k.clone(), v.clone()],
                chunked,
                |x| attention(&x[0], &x[1], &x[2], 0.35).unwrap(),
                1e-5,
            );
            compare_with_reference(
                &[q.clone(), k.clone(), v.clone()],
                chunked,
                |x| super::super::reference::attention(&x[0], &x[1], &x[2], 0.35).unwrap(),
                1e-5,
            );
        }
        // No cache (s = t), one kv head per query head, and the default chunk size.
        let (q, k, v) = (rand(&[1, 6, 2, 4], 34), rand(&[1, 6, 2, 4], 35), rand(&[1, 6, 2, 4], 36));
        for chunk in [Some(4), None] {
            compare_with_reference(
                &[q.clone(), k.clone(), v.clone()],
                |x| attention_chunked(&x[0], &x[1], &x[2], 0.5, chunk).unwrap(),
                |x| super::super::reference::attention(&x[0], &x[1], &x[2], 0.5).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn chunked_attention_gradients_and_bf16() {
        let (b, t, s, nh, nkv, d) = (2, 5, 7, 4, 2, 4);
        let q = rand(&[b, t, nh, d], 41);
        let k = rand(&[b, s, nkv, d], 42);
        let v = rand(&[b, s, nkv, d], 43);
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| attention_chunked(q, k, v, 0.5, Some(3)).unwrap();
        check_grad(&[b, t, nh, d], |q| f(q, &k, &v), 1e-2);
        check_grad(&[b, s, nkv, d], |k| f(&q, k, &v), 1e-2);
        check_grad(&[b, s, nkv, d], |v| f(&q, &k, v), 1e-2);
        compare_bf16_with_f32(&[q, k, v], |x| f(&x[0], &x[1], &x[2]), BF16_TOL);
    }

    #[test]
    fn chunked_attention_without_gradients_records_nothing() {
        // Plain inputs: the result is the precomputed O (no graph, so nothing kept for a backward pass).
        let (q, k, v) = (rand(&[1, 4, 2, 4], 51), rand(&[1, 4, 1, 4], 52), rand(&[1, 4, 1, 4], 53));
        let o = attention_chunked(&q, &k, &v, 0.5, Some(3)).unwrap();
        assert!(!o.track_op());
        assert!(max_abs_diff(&o, &attention(&q, &k, &v, 0.5).unwrap()) < 1e-6);
    }
}
