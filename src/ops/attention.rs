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
//!
//! **Packed sequences** ([`attention_segments`]): with per-row [`Segments`] (flash-attn varlen's `cu_seqlens`), the
//! attention is block-diagonal causal — query i sees key j iff both lie in one segment and j ≤ i — and positions
//! after a row's last segment (padding) get O = 0 and pass no gradient. The CPU op computes each segment's
//! (len × len) block alone and never touches the masked blocks; the chunked path narrows each query chunk's keys
//! to those from the chunk's earliest segment start and masks the rest with −∞ (a padding row sees only itself,
//! so that no softmax row is empty, and is then zeroed).
//! Reference: Vaswani et al. (2017); grouped-query attention, Ainslie et al. (2023); transformers' `sdpa_attention`;
//! Dao, FlashAttention-2 (2023), algorithm 2; flash-attn's `flash_attn_varlen_func`.

use super::gemm::gemm_strided;
use super::graft::Grads3;
use super::segments::Segments;
use crate::host::{f32_view, storage_from_f32, tensor_from_f32, with_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

struct Attention {
    scale: f32,
    /// Block-diagonal attention over these per-row segments (s = t); `None`: plain causal attention.
    segments: Option<Arc<Segments>>,
}

/// One causal block of a row: queries [q0, q1) against keys [k0, k1), query q1 − 1 aligned with key k1 − 1.
#[derive(Clone, Copy)]
struct Block {
    q0: usize,
    q1: usize,
    k0: usize,
    k1: usize,
}

impl Block {
    fn queries(&self) -> usize {
        self.q1 - self.q0
    }
    fn keys(&self) -> usize {
        self.k1 - self.k0
    }
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

    /// The causal blocks of row `bi`: the whole row (t queries over s keys), or one block per segment.
    fn blocks(&self, segments: Option<&Segments>, bi: usize) -> Vec<Block> {
        match segments {
            None => vec![Block { q0: 0, q1: self.t, k0: 0, k1: self.s }],
            Some(seg) => seg.of_row(bi).map(|(a, c)| Block { q0: a, q1: c, k0: a, k1: c }).collect(),
        }
    }

    /// Row offset of position `i` of batch `bi`, head `h`, in a (b, n, heads, d) tensor with n positions.
    fn at(&self, bi: usize, n: usize, i: usize, heads: usize, h: usize) -> usize {
        ((bi * n + i) * heads + h) * self.d
    }

    /// Scores → probabilities of block `blk` for head `h` of batch `bi`: writes P (nq × nk, row-major) into `p`.
    fn probs(&self, q: &[f32], k: &[f32], (bi, h): (usize, usize), blk: Block, scale: f32, p: &mut [f32]) {
        let Self { t, s, nh, nkv, d, .. } = *self;
        let g = h / (nh / nkv);
        let (nq, nk) = (blk.queries(), blk.keys());
        let qb = &q[self.at(bi, t, blk.q0, nh, h)..];
        let kb = &k[self.at(bi, s, blk.k0, nkv, g)..];
        // S (nq×nk) = Q (nq×d) · Kᵀ (d×nk)
        gemm_strided(nq, nk, d, p, (nk, 1), false, qb, (nh * d, 1), kb, (1, nkv * d), 1.0, false);
        super::softmax::causal_softmax_rows(p, nk, 0, nq, nk - nq, scale);
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
        let segments = self.segments.as_deref();
        // One (t×d) block per (batch, head), computed in parallel, then scattered into (b, t, nh, d). Rows outside
        // every causal block (padding after a packed row's last segment) stay 0.
        let blocks: Vec<Vec<f32>> = (0..b * nh)
            .into_par_iter()
            .map(|bh| {
                let (bi, h) = (bh / nh, bh % nh);
                let g = h / (nh / nkv);
                let mut o = vec![0f32; t * d];
                let mut p = Vec::new();
                for blk in dm.blocks(segments, bi) {
                    p.resize(blk.queries() * blk.keys(), 0.0);
                    dm.probs(q, k, (bi, h), blk, self.scale, &mut p);
                    // O[q0..q1] (nq×d) = P (nq×nk) · V[k0..k1] (nk×d)
                    let vb = &v[dm.at(bi, s, blk.k0, nkv, g)..];
                    let (nq, nk) = (blk.queries(), blk.keys());
                    let ob = &mut o[blk.q0 * d..blk.q1 * d];
                    gemm_strided(nq, d, nk, ob, (d, 1), false, &p, (nk, 1), vb, (nkv * d, 1), 1.0, false);
                }
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
        let segments = self.segments.as_deref();
        // Per (batch, kv head): dQ of its `rep` query heads, and dK, dV accumulated over them, block by block.
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
                                let (mut p, mut dp) = (Vec::new(), Vec::new());
                                for r in 0..rep {
                                    let h = g * rep + r;
                                    for blk in dm.blocks(segments, bi) {
                                        let (nq, nk) = (blk.queries(), blk.keys());
                                        p.resize(nq * nk, 0.0);
                                        dp.resize(nq * nk, 0.0);
                                        dm.probs(q, k, (bi, h), blk, scale, &mut p);
                                        let bufs = BlockGrads {
                                            dq: &mut dq[(r * t + blk.q0) * d..(r * t + blk.q1) * d],
                                            dk: &mut dk[blk.k0 * d..blk.k1 * d],
                                            dv: &mut dv[blk.k0 * d..blk.k1 * d],
                                        };
                                        let inputs = BlockInputs {
                                            q: &q[dm.at(bi, t, blk.q0, nh, h)..],
                                            k: &k[dm.at(bi, s, blk.k0, nkv, g)..],
                                            v: &v[dm.at(bi, s, blk.k0, nkv, g)..],
                                            go: &go[dm.at(bi, t, blk.q0, nh, h)..],
                                        };
                                        block_backward(&dm, blk, scale, &inputs, &p, &mut dp, bufs);
                                    }
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

/// One block's inputs, each sliced to start at the block's first row for the head in question (row strides:
/// nh·d for q and dO, nkv·d for k and v).
struct BlockInputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    go: &'a [f32],
}

/// One block's gradient slices: dQ rows [q0, q1) of one head (row stride d, overwritten), dK and dV rows
/// [k0, k1) of its K/V head (row stride d, accumulated over the heads of the group).
struct BlockGrads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// The backward of one causal block given its probabilities P (nq × nk); `dp` is scratch of the same size.
fn block_backward(dm: &AttnDims, blk: Block, scale: f32, x: &BlockInputs, p: &[f32], dp: &mut [f32], out: BlockGrads) {
    let (nq, nk, d) = (blk.queries(), blk.keys(), dm.d);
    let (qs, ks) = (dm.nh * d, dm.nkv * d);
    // dV (nk×d) += Pᵀ (nk×nq) · dO (nq×d)
    gemm_strided(nk, d, nq, out.dv, (d, 1), true, p, (1, nk), x.go, (qs, 1), 1.0, false);
    // dP (nq×nk) = dO (nq×d) · Vᵀ (d×nk)
    gemm_strided(nq, nk, d, dp, (nk, 1), false, x.go, (qs, 1), x.v, (1, ks), 1.0, false);
    // dS = P ⊙ (dP − rowsum(dP ⊙ P)), in place in dp
    for (prow, dprow) in p.chunks(nk).zip(dp.chunks_mut(nk)) {
        let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
        for (g, &pv) in dprow.iter_mut().zip(prow) {
            *g = pv * (*g - dot);
        }
    }
    // dQ (nq×d) = s · dS (nq×nk) · K (nk×d)
    gemm_strided(nq, d, nk, out.dq, (d, 1), false, dp, (nk, 1), x.k, (ks, 1), scale, false);
    // dK (nk×d) += s · dSᵀ (nk×nq) · Q (nq×d)
    gemm_strided(nk, d, nq, out.dk, (d, 1), true, dp, (1, nk), x.q, (qs, 1), scale, false);
}

/// Causal grouped-query attention. q: (b, t, nh, d); k, v: (b, s, nkv, d) with s ≥ t, the queries being the last
/// t of the s positions; nh a multiple of nkv. Returns (b, t, nh, d) in q's dtype. Scores are scaled by `scale`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if q.device().is_cuda() {
        return attention_chunked(q, k, v, scale, None, None);
    }
    if !super::use_kernel(q, false) {
        return super::reference::attention(q, k, v, scale);
    }
    if super::attention_decode::applies(q, k, v) {
        return super::attention_decode::attention(q, k, v, scale);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(&k, &v, Attention { scale: scale as f32, segments: None })
}

/// [`attention`] over packed rows: block-diagonal causal within each row's `segments` (no cache: s = t), O = 0
/// on the padding after a row's last segment. Same shapes and dtypes as [`attention`].
pub fn attention_segments(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, segments: &Arc<Segments>) -> Result<Tensor> {
    let dm = AttnDims::new(q.dims(), k.dims(), v.dims())?;
    if dm.s != dm.t || segments.rows() != dm.b || segments.seq() != dm.t {
        candle_core::bail!(
            "attention: segments for {} rows of {} positions do not fit q {:?}, k {:?} (packed rows need s = t)",
            segments.rows(),
            segments.seq(),
            q.dims(),
            k.dims()
        );
    }
    if q.device().is_cuda() || !super::use_kernel(q, false) {
        return attention_chunked(q, k, v, scale, None, Some(segments));
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(&k, &v, Attention { scale: scale as f32, segments: Some(segments.clone()) })
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
    /// Block-diagonal masking for packed rows.
    segments: Option<SegmentMask>,
}

/// [`Segments`] as the chunked path uses them: each position's first visible key (host and device copies; a
/// padding position's is itself) and the 0/1 mask of positions inside a segment.
struct SegmentMask {
    /// (b·t), row-major.
    first_key: Vec<u32>,
    /// (b, t) u32, on the inputs' device.
    first_key_dev: Tensor,
    /// (b, t) f32, on the inputs' device.
    valid: Tensor,
}

impl SegmentMask {
    fn new(segments: &Segments, device: &candle_core::Device) -> Result<Self> {
        let (first_key_dev, valid) = segments.masks_on(device)?;
        Ok(Self { first_key: segments.first_key(), first_key_dev, valid })
    }

    /// 0 / −∞ bias (b, 1, 1, c, sk) of query rows [i0, i0 + c) over keys [k0, k0 + sk): row i sees key j iff
    /// first_key(i) ≤ j ≤ i.
    fn bias(&self, i0: usize, c: usize, k0: usize, sk: usize) -> Result<Tensor> {
        let (b, dev) = (self.valid.dim(0)?, self.valid.device());
        let rows = Tensor::arange(i0 as u32, (i0 + c) as u32, dev)?.reshape((1, c, 1))?;
        let cols = Tensor::arange(k0 as u32, (k0 + sk) as u32, dev)?.reshape((1, 1, sk))?;
        let first = self.first_key_dev.narrow(1, i0, c)?.reshape((b, c, 1))?;
        // (b, c, sk) of 0/1: key not after the query, and not before its segment's start
        let visible = cols.broadcast_ge(&first)?.broadcast_mul(&cols.broadcast_le(&rows)?)?;
        let zero = Tensor::zeros((b, c, sk), DType::F32, dev)?;
        let bias = visible.where_cond(&zero, &Tensor::full(f32::NEG_INFINITY, (b, c, sk), dev)?)?;
        bias.reshape((b, 1, 1, c, sk))
    }

    /// Rows [i0, i0 + c) of the valid mask, shaped to scale a (b, nkv, rep, c, d) tensor: (b, 1, 1, c, 1).
    fn valid_rows(&self, i0: usize, c: usize) -> Result<Tensor> {
        let b = self.valid.dim(0)?;
        self.valid.narrow(1, i0, c)?.reshape((b, 1, 1, c, 1))
    }
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

    /// The keys [k0, k0 + sk) any of the query rows [i0, i0 + c) may see. Causal (queries last): the first
    /// i0 + c + (s − t). Packed: from the earliest first key of row i0 over the batch (first keys do not
    /// decrease along a row) to i0 + c; the fully masked keys before it are skipped.
    fn keys(&self, i0: usize, c: usize) -> (usize, usize) {
        let AttnDims { b, s, t, .. } = self.dm;
        match &self.segments {
            None => (0, (i0 + c + s - t).min(s)),
            Some(m) => {
                let k0 = (0..b).map(|bi| m.first_key[bi * t + i0] as usize).min().unwrap_or(0).min(i0);
                (k0, i0 + c - k0)
            }
        }
    }

    /// Scaled, masked scores of rows [i0, i0 + c) over the keys [k0, k0 + sk): (b, nkv, rep, c, sk), f32.
    /// qc (b, nkv, rep·c, d), kc (b, nkv, sk, d).
    fn scores(&self, qc: &Tensor, kc: &Tensor, i0: usize, c: usize, (k0, sk): (usize, usize)) -> Result<Tensor> {
        let AttnDims { b, s, t, nkv, .. } = self.dm;
        // S (b, nkv, rep·c, sk) = Q_c (rep·c, d) · K_cᵀ (d, sk) per (batch, kv head)
        let sc = (qc.matmul(&kc.t()?)? * self.scale)?.reshape((b, nkv, self.rep(), c, sk))?;
        if let Some(m) = &self.segments {
            return sc.broadcast_add(&m.bias(i0, c, k0, sk)?);
        }
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
            let (k0, sk) = self.keys(i0, c);
            let (kc, vc) = (k.narrow(2, k0, sk)?, v.narrow(2, k0, sk)?); // (b, nkv, sk, d)
            let (m, e) = {
                let sc = self.scores(&self.rows(&qg, i0, c)?, &kc, i0, c, (k0, sk))?; // (b, nkv, rep, c, sk)
                let m = sc.max_keepdim(D::Minus1)?; // (b, nkv, rep, c, 1): finite, every row sees a key
                let e = sc.broadcast_sub(&m)?.exp()?;
                (m, e)
            };
            let l = e.sum_keepdim(D::Minus1)?; // (b, nkv, rep, c, 1)
                                               // O_c (b, nkv, rep·c, d) = exp(S − m) (rep·c, sk) · V_c (sk, d), then divided by the row sums
            let oc = e.reshape((b, nkv, rep * c, sk))?.matmul(&vc)?.reshape((b, nkv, rep, c, d))?;
            let oc = oc.broadcast_div(&l)?;
            // Padding rows of packed batches: O = 0
            os.push(match &self.segments {
                Some(mask) => oc.broadcast_mul(&mask.valid_rows(i0, c)?)?,
                None => oc,
            });
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
            let (k0, sk) = self.keys(i0, c);
            let (kc, vc) = (kf.narrow(2, k0, sk)?, vf.narrow(2, k0, sk)?); // (b, nkv, sk, d)
            let (qc, gc) = (self.rows(&qg, i0, c)?, self.rows(&gg, i0, c)?); // (b, nkv, rep·c, d)
                                                                             // Padding rows of packed batches have a constant output (0): no gradient flows through them.
            let gc =
                match &self.segments {
                    Some(mask) => gc
                        .reshape((b, nkv, rep, c, d))?
                        .broadcast_mul(&mask.valid_rows(i0, c)?)?
                        .reshape((b, nkv, rep * c, d))?,
                    None => gc,
                };
            let dc = (self.rows(&og, i0, c)? * &gc)?.sum_keepdim(D::Minus1)?; // D (b, nkv, rep·c, 1)
            let lc = lse.narrow(3, i0, c)?.unsqueeze(D::Minus1)?; // (b, nkv, rep, c, 1)
            let p =
                self.scores(&qc, &kc, i0, c, (k0, sk))?.broadcast_sub(&lc)?.exp()?.reshape((b, nkv, rep * c, sk))?;
            // dV_c (b, nkv, sk, d) = Pᵀ (sk, rep·c) · dO_c (rep·c, d)
            let dvc = p.t()?.matmul(&gc)?;
            // dS (b, nkv, rep·c, sk) = P ⊙ (dO_c·V_cᵀ − D)
            let ds = (p * gc.matmul(&vc.t()?)?.broadcast_sub(&dc)?)?;
            // dQ_c (b, nkv, rep·c, d) = s · dS · K_c;  dK_c (b, nkv, sk, d) = s · dSᵀ · Q_c
            dqs.push((ds.matmul(&kc)? * self.scale)?.reshape((b, nkv, rep, c, d))?);
            let dkc = (ds.t()?.matmul(&qc)? * self.scale)?;
            dk = (dk + dkc.pad_with_zeros(2, k0, s - k0 - sk)?)?;
            dv = (dv + dvc.pad_with_zeros(2, k0, s - k0 - sk)?)?;
        }
        let dq = self.ungroup(&Tensor::cat(&dqs, 3)?, q.dtype())?;
        // (b, nkv, s, d) → (b, s, nkv, d)
        let dk = dk.transpose(1, 2)?.to_dtype(k.dtype())?.contiguous()?;
        let dv = dv.transpose(1, 2)?.to_dtype(v.dtype())?.contiguous()?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// [`attention`] (or, with `segments`, [`attention_segments`]) by query chunks of `chunk` rows (default: a chunk's
/// f32 scores within 64 MiB), in candle tensor ops on any device: the path CUDA takes, callable on the CPU so that
/// tests run exactly the GPU's code.
/// Keeps only O and the per-row log-sum-exp (f32) for the backward pass, which recomputes P chunk by chunk;
/// scores and statistics are f32, O and the gradients have the inputs' dtypes.
pub(crate) fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    chunk: Option<usize>,
    segments: Option<&Arc<Segments>>,
) -> Result<Tensor> {
    let dm = AttnDims::new(q.dims(), k.dims(), v.dims())?;
    if dm.t == 0 {
        return q.zeros_like();
    }
    let chunk = chunk.unwrap_or_else(|| default_chunk(&dm)).clamp(1, dm.t);
    let segments = segments.map(|s| SegmentMask::new(s, q.device())).transpose()?;
    let op = Chunked { dm, scale, chunk, segments };
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
            let chunked = |x: &[Tensor]| attention_chunked(&x[0], &x[1], &x[2], 0.35, Some(chunk), None).unwrap();
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
                |x| attention_chunked(&x[0], &x[1], &x[2], 0.5, chunk, None).unwrap(),
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
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| attention_chunked(q, k, v, 0.5, Some(3), None).unwrap();
        check_grad(&[b, t, nh, d], |q| f(q, &k, &v), 1e-2);
        check_grad(&[b, s, nkv, d], |k| f(&q, k, &v), 1e-2);
        check_grad(&[b, s, nkv, d], |v| f(&q, &k, v), 1e-2);
        compare_bf16_with_f32(&[q, k, v], |x| f(&x[0], &x[1], &x[2]), BF16_TOL);
    }

    #[test]
    fn chunked_attention_without_gradients_records_nothing() {
        // Plain inputs: the result is the precomputed O (no graph, so nothing kept for a backward pass).
        let (q, k, v) = (rand(&[1, 4, 2, 4], 51), rand(&[1, 4, 1, 4], 52), rand(&[1, 4, 1, 4], 53));
        let o = attention_chunked(&q, &k, &v, 0.5, Some(3), None).unwrap();
        assert!(!o.track_op());
        assert!(max_abs_diff(&o, &attention(&q, &k, &v, 0.5).unwrap()) < 1e-6);
    }

    /// Two rows: [3 | 2 | pad] and [5 | pad pad] — segments of a packed batch of length 6.
    fn packed_segments() -> Arc<Segments> {
        Arc::new(Segments::new(vec![vec![0, 3, 5], vec![0, 5]], 6).unwrap())
    }

    #[test]
    fn segment_attention_gradients_against_finite_differences() {
        let (b, t, nh, nkv, d) = (2, 6, 4, 2, 4);
        let seg = packed_segments();
        let q = rand(&[b, t, nh, d], 61);
        let k = rand(&[b, t, nkv, d], 62);
        let v = rand(&[b, t, nkv, d], 63);
        let fused = |q: &Tensor, k: &Tensor, v: &Tensor| attention_segments(q, k, v, 0.5, &seg).unwrap();
        check_grad(&[b, t, nh, d], |q| fused(q, &k, &v), 1e-2);
        check_grad(&[b, t, nkv, d], |k| fused(&q, k, &v), 1e-2);
        check_grad(&[b, t, nkv, d], |v| fused(&q, &k, v), 1e-2);
        let chunked =
            |q: &Tensor, k: &Tensor, v: &Tensor| attention_chunked(q, k, v, 0.5, Some(4), Some(&seg)).unwrap();
        check_grad(&[b, t, nh, d], |q| chunked(q, &k, &v), 1e-2);
        check_grad(&[b, t, nkv, d], |k| chunked(&q, k, &v), 1e-2);
        check_grad(&[b, t, nkv, d], |v| chunked(&q, &k, v), 1e-2);
    }

    #[test]
    fn segment_attention_equals_each_example_alone() {
        // Closed form: a packed row's segments give what each example gives alone (plain causal attention on its
        // own positions), and padding rows give 0 — forward and backward, the CPU op and the chunked path.
        let (b, t, nh, nkv, d) = (2, 6, 4, 2, 8);
        let seg = packed_segments();
        let q = rand(&[b, t, nh, d], 71);
        let k = rand(&[b, t, nkv, d], 72);
        let v = rand(&[b, t, nkv, d], 73);
        let alone = |x: &[Tensor]| -> Tensor {
            let mut rows = Vec::new();
            for bi in 0..b {
                let mut parts = Vec::new();
                for (a, c) in seg.of_row(bi) {
                    let part = |x: &Tensor| x.narrow(0, bi, 1).unwrap().narrow(1, a, c - a).unwrap();
                    parts.push(super::super::reference::attention(&part(&x[0]), &part(&x[1]), &part(&x[2]), 0.4));
                }
                let end = seg.of_row(bi).last().map_or(0, |(_, c)| c);
                let mut parts: Vec<Tensor> = parts.into_iter().map(|p| p.unwrap()).collect();
                parts.push(Tensor::zeros((1, t - end, nh, d), DType::F32, x[0].device()).unwrap());
                rows.push(Tensor::cat(&parts, 1).unwrap());
            }
            Tensor::cat(&rows, 0).unwrap()
        };
        let inputs = [q.clone(), k.clone(), v.clone()];
        compare_with_reference(&inputs, |x| attention_segments(&x[0], &x[1], &x[2], 0.4, &seg).unwrap(), alone, 1e-5);
        for chunk in [1, 4, t] {
            compare_with_reference(
                &inputs,
                |x| attention_chunked(&x[0], &x[1], &x[2], 0.4, Some(chunk), Some(&seg)).unwrap(),
                alone,
                1e-5,
            );
        }
        compare_bf16_with_f32(&[q, k, v], |x| attention_segments(&x[0], &x[1], &x[2], 0.4, &seg).unwrap(), BF16_TOL);
        // One segment per row (an unpacked batch): the plain causal attention on the real positions.
        let lens = Arc::new(Segments::from_lengths(&[6, 6], 6).unwrap());
        compare_with_reference(
            &inputs,
            |x| attention_segments(&x[0], &x[1], &x[2], 0.4, &lens).unwrap(),
            |x| attention(&x[0], &x[1], &x[2], 0.4).unwrap(),
            1e-6,
        );
        // Segments that do not fit the batch: an error, not a panic.
        let wrong = Arc::new(Segments::from_lengths(&[6], 6).unwrap());
        assert!(attention_segments(&inputs[0], &inputs[1], &inputs[2], 0.4, &wrong).is_err());
    }
}
