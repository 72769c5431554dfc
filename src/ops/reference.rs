//! The reference versions of every op, composed from candle's differentiable primitives (matmul, broadcast
//! arithmetic, `log_softmax`, …): the test oracle each kernel is compared with, forward and backward, and the path
//! of any device or dtype that has no kernel of its own (see [`super::use_kernel`]).
//!
//! They are written for clarity, not speed or memory: attention materialises the (t × s) scores per head, the
//! cross-entropy the full logits. Frozen operands (weights, norms, masks) are `detach`ed so that no gradient is
//! accumulated for them. Statistics are taken in f32: a bf16 input is widened first and the result narrowed back,
//! as the kernels do.

use super::dropout::mask_like;
use super::lora_linear::LoraLinearOp;
use crate::weight::FrozenWeight;
use candle_core::{DType, Result, Tensor, D};

/// `x` widened to f32 (a no-op for f32), with the dtype to return to.
fn widen(x: &Tensor) -> Result<(Tensor, DType)> {
    Ok((x.to_dtype(DType::F32)?, x.dtype()))
}

/// y = x·Wᵀ, W frozen (dequantized for NF4), in x's dtype.
pub fn frozen_product(x: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    let w = match w {
        FrozenWeight::Dense(w) => w.detach(),
        _ => w.dense()?.to_device(x.device())?,
    }
    .to_dtype(x.dtype())?;
    let (out, inp) = w.dims2()?;
    let m = x.elem_count() / inp.max(1);
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    // (m, in)·(in, out) → (m, out)
    x.contiguous()?.reshape((m, inp))?.matmul(&w.t()?)?.reshape(dims)
}

/// y = x·Wᵀ (+ b) + s·(drop(x)·Aᵀ)·Bᵀ with A, B cast to x's dtype (their gradients flow back in their own dtype).
pub fn lora_linear(x: &Tensor, a: &Tensor, b: &Tensor, op: &LoraLinearOp) -> Result<Tensor> {
    let mut y = frozen_product(x, &op.w)?;
    if let Some(bias) = &op.bias {
        y = y.broadcast_add(&bias.detach().to_dtype(x.dtype())?)?;
    }
    let k = a.dims2()?.1;
    let m = x.elem_count() / k;
    let x2 = x.reshape((m, k))?; // (m, in)
    let x2 = match op.dropout {
        Some((p, seed)) => dropout(&x2, p, seed)?,
        None => x2,
    };
    let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
    // (m, in)·(in, r)·(r, out) → (m, out)
    let delta = (x2.matmul(&a.t()?)?.matmul(&b.t()?)? * op.scaling as f64)?;
    let shape = y.shape().clone();
    y + delta.reshape(shape)?
}

/// RMSNorm: x / sqrt(mean(x²) + eps) · w, statistics in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, dt) = widen(x)?;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(&w.detach().to_dtype(DType::F32)?)?.to_dtype(dt)
}

/// Rotary embedding through candle's differentiable `rope_slow` (which wants (b, h, t, d)).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (x, dt) = widen(x)?;
    let (cos, sin) = (cos.detach().to_dtype(DType::F32)?, sin.detach().to_dtype(DType::F32)?);
    let xt = x.transpose(1, 2)?.contiguous()?;
    candle_nn::rotary_emb::rope_slow(&xt, &cos, &sin)?.transpose(1, 2)?.contiguous()?.to_dtype(dt)
}

/// Rotary embedding with one row of angles per (batch, position): x (b, t, h, d), cos/sin (b·t, d/2); composed
/// ("rotate_half": y = x·cos + rotate_half(x)·sin), in f32.
pub fn rope_per_row(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (x, dt) = widen(x)?;
    let (b, t, _h, d) = x.dims4()?;
    // (b·t, d/2) → (b, t, 1, d): both halves share the angles
    let table = |c: &Tensor| -> Result<Tensor> {
        let c = c.detach().to_dtype(DType::F32)?.reshape((b, t, 1, d / 2))?;
        Tensor::cat(&[&c, &c], 3)
    };
    let (cos, sin) = (table(cos)?, table(sin)?);
    let (x1, x2) = (x.narrow(3, 0, d / 2)?, x.narrow(3, d / 2, d / 2)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?.to_dtype(dt)
}

/// softmax(scale·x + causal mask) over the last dim, in f32.
pub fn causal_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    let (x, dt) = widen(x)?;
    let dims = x.dims();
    let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if s < t {
        candle_core::bail!("causal_softmax: {t} queries but only {s} keys");
    }
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j <= i + (s - t) { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (t, s), x.device())?;
    candle_nn::ops::softmax(&(x * scale)?.broadcast_add(&mask)?, D::Minus1)?.to_dtype(dt)
}

/// Causal GQA attention: repeat K/V per query group, S = Q·Kᵀ, P = causal softmax, O = P·V.
/// q (b, t, nh, d); k, v (b, s, nkv, d) → (b, t, nh, d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _t, nh, d) = q.dims4()?;
    let (_, s, nkv, _) = k.dims4()?;
    let rep = nh / nkv;
    // (b, s, nkv, d) → (b, nh, s, d)
    let expand = |x: &Tensor| -> Result<Tensor> {
        let x = x.transpose(1, 2)?; // (b, nkv, s, d)
        x.unsqueeze(2)?.broadcast_as((b, nkv, rep, s, d))?.reshape((b, nh, s, d))
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let q = q.transpose(1, 2)?.contiguous()?; // (b, nh, t, d)
    let scores = q.matmul(&k.t()?)?; // (b, nh, t, s)
    let probs = causal_softmax(&scores, scale)?;
    probs.matmul(&v)?.transpose(1, 2) // (b, t, nh, d)
}

/// silu(a)·b.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.silu()? * b
}

/// Cross-entropy through the full logits (f32), summed over labelled rows and divided by `denom`.
pub fn linear_cross_entropy(h: &Tensor, head: &Tensor, labels: &[i64], denom: f64) -> Result<Tensor> {
    let logits = h.matmul(&head.detach().to_dtype(h.dtype())?.t()?)?.to_dtype(DType::F32)?;
    let idx: Vec<u32> = labels.iter().enumerate().filter(|(_, &l)| l >= 0).map(|(i, _)| i as u32).collect();
    if idx.is_empty() {
        return logits.sum_all()? * 0.0;
    }
    let tgt: Vec<u32> = idx.iter().map(|&i| labels[i as usize] as u32).collect();
    let idx = Tensor::new(idx, h.device())?;
    let sel = logits.index_select(&idx, 0)?;
    let lsm = candle_nn::ops::log_softmax(&sel, D::Minus1)?;
    let tgt = Tensor::new(tgt, h.device())?.unsqueeze(1)?;
    lsm.gather(&tgt, 1)?.sum_all()?.neg()? / denom
}

/// x ⊙ mask, the mask drawn as [`fn@super::dropout`] draws it.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    x * mask_like(x, p, seed)?.detach()
}
