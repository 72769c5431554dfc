//! Training-safe tensor primitives: custom candle ops whose backward passes we own.
//!
//! candle's fused ops (`softmax_last_dim`, `rms_norm`, `rope`, …) have no backward: a loss computed through them
//! back-propagates nothing and says nothing. And candle's matmul backward computes a gradient for a frozen weight
//! even when nobody asked for it. Every op here is a `CustomOp` with an explicit `bwd`, and each backward is checked
//! against central finite differences in the tests at the bottom of this file.
//!
//! | op | forward | backward |
//! |---|---|---|
//! | [`frozen_matmul`] | y = x·Wᵀ | dx = dy·W (no dW: the weight is frozen) |
//! | [`rms_norm`] | y = x·r·w, r = (mean(x²)+ε)^-½ | dx = r·u − x·r³·mean(u⊙x), u = dy⊙w |
//! | [`rope`] | HF "rotate_half" rotary embedding | rope with −sin |
//! | [`causal_softmax`] | softmax(s·x) with a causal mask | s·y⊙(g − Σ g⊙y) |
//! | [`attention`] | causal GQA softmax(s·QKᵀ)·V, fused | recomputes P; dV = Pᵀ·dO, dS = P⊙(dP − Σ dP⊙P) |
//! | [`swiglu`] | silu(a)·b | da = g·b·σ(a)(1 + a(1−σ(a))), db = g·silu(a) |
//! | [`linear_cross_entropy`] | mean −log softmax(h·Wᵀ)[label] | dh computed in the forward, chunk by chunk |
//!
//! The CPU kernels are plain loops parallelised with rayon over rows; matmuls go to the `gemm` crate (what candle
//! itself uses on CPU).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// The contiguous f32 slice of a CPU storage seen through `layout`.
fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &'static str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(v) => v.as_slice(),
        other => candle_core::bail!("{op}: expected f32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(cpu_f32(cpu, layout, "with_f32")?)),
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}

/// `dst (m×n) = [dst +] alpha · lhs (m×k) · rhs (k×n)`, strides given as (row stride, column stride); `dst` is
/// row-major with row stride n.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    alpha: f32,
) {
    let threads = candle_core::utils::get_num_threads();
    let parallel = threads > 1 && m * n * k > 64 * 64 * 64;
    gemm_strided(m, n, k, dst, (n, 1), accumulate, lhs, lhs_strides, rhs, rhs_strides, alpha, parallel)
}

/// `dst = [dst +] alpha · lhs · rhs` with arbitrary (row, column) strides on all three operands.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    alpha: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() > (m - 1) * dst_strides.0 + (n - 1) * dst_strides.1, "gemm: dst too small");
    assert!(k == 0 || lhs.len() > (m - 1) * lhs_strides.0 + (k - 1) * lhs_strides.1, "gemm: lhs too small");
    assert!(k == 0 || rhs.len() > (k - 1) * rhs_strides.0 + (n - 1) * rhs_strides.1, "gemm: rhs too small");
    let par = if parallel {
        gemm::Parallelism::Rayon(candle_core::utils::get_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index the kernel reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides.1 as isize,
            dst_strides.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Frozen projection: y = x·Wᵀ, backward dx = dy·W only.

struct FrozenMatmul;

impl FrozenMatmul {
    /// (m, k, n) for x (…, k) and w (n, k).
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
        let (n, k) = l2.shape().dims2()?;
        let k1 = *l1.dims().last().unwrap_or(&0);
        if k1 != k {
            candle_core::bail!("frozen_matmul: x has {k1} features but the weight expects {k}");
        }
        Ok((l1.shape().elem_count() / k.max(1), k, n))
    }
    fn out_shape(l1: &Layout, n: usize) -> Shape {
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Shape::from(dims)
    }
    /// Layouts for the backend matmul: x as (1, m, k), Wᵀ as (1, k, n) (a transposed view, no copy).
    fn layouts(l1: &Layout, l2: &Layout, m: usize, k: usize, n: usize) -> Result<(Layout, Layout)> {
        if !l1.is_contiguous() || !l2.is_contiguous() {
            candle_core::bail!("frozen_matmul: inputs must be contiguous");
        }
        let lx = Layout::contiguous_with_offset((1, m, k), l1.start_offset());
        let lw = Layout::new(Shape::from((1, k, n)), vec![n * k, 1, k], l2.start_offset());
        Ok((lx, lw))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = Self::dims(l1, l2)?;
        let (lx, lw) = Self::layouts(l1, l2, m, k, n)?;
        let out = s1.matmul(s2, (1, m, n, k), &lx, &lw)?;
        Ok((out, Self::out_shape(l1, n)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, k, n) = Self::dims(l1, l2)?;
        let (lx, lw) = Self::layouts(l1, l2, m, k, n)?;
        let out = s1.matmul(s2, (1, m, n, k), &lx, &lw)?;
        Ok((out, Self::out_shape(l1, n)))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.dims2()?.0;
        let m = grad.elem_count() / n;
        // (m, n)·(n, k) → (m, k)
        let dx = grad.reshape((m, n))?.matmul(w)?.reshape(x.shape())?;
        Ok((Some(dx), None))
    }
}

/// y = x·Wᵀ for a frozen weight `w` (out, in): x (…, in) → y (…, out). The backward yields dx only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    // With no variable upstream there is nothing to differentiate: skip recording the op.
    if x.track_op() {
        x.apply_op2(w, FrozenMatmul)
    } else {
        x.apply_op2_no_bwd(w, &FrozenMatmul)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Frozen NF4 projection (QLoRA): y = x·dequant(W)ᵀ, backward dx = dy·dequant(W) only. The weight is dequantized
// into the thread's reused buffer for each product, never kept in full precision.

struct Nf4Matmul {
    w: std::sync::Arc<crate::quant::nf4::Nf4Tensor>,
    /// false: y = x·Wᵀ (x has `in` features); true: y = x·W (x has `out` features, the backward product).
    transposed: bool,
}

impl Nf4Matmul {
    fn frozen(&self) -> crate::linear::FrozenWeight {
        crate::linear::FrozenWeight::Nf4(self.w.clone())
    }
}

impl CustomOp1 for Nf4Matmul {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "nf4_matmul")?;
        let (out, inp) = self.frozen().dims()?;
        let (k, n) = if self.transposed { (out, inp) } else { (inp, out) };
        if l.dims().last() != Some(&k) {
            candle_core::bail!("nf4_matmul: x has shape {:?}, the weight is {out}×{inp}", l.dims());
        }
        let m = x.len() / k.max(1);
        let mut y = vec![0f32; m * n];
        self.frozen().with_f32(|w| {
            if self.transposed {
                // y (m×n) = x (m×out) · W (out×in)
                sgemm(m, n, k, &mut y, false, x, (k, 1), w, (n, 1), 1.0)
            } else {
                // y (m×n) = x (m×in) · Wᵀ (in×out)
                sgemm(m, n, k, &mut y, false, x, (k, 1), w, (1, k), 1.0)
            }
        })?;
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Nf4Matmul { w: self.w.clone(), transposed: !self.transposed };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// y = x·dequant(W)ᵀ for a frozen NF4 weight (out, in): x (…, in) → y (…, out), on CPU/f32. The backward yields
/// dx = dy·dequant(W) only.
pub fn nf4_matmul(x: &Tensor, w: &std::sync::Arc<crate::quant::nf4::Nf4Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = Nf4Matmul { w: w.clone(), transposed: false };
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A frozen projection with a LoRA update, fused: y = x·Wᵀ (+ b) + s·(drop(x)·Aᵀ)·Bᵀ.
// One autograd node per projection instead of a dozen; the backward recomputes drop(x) (a pure function of the
// seed) and xa = drop(x)·Aᵀ (m×r, cheap) rather than keeping them:
//   dxa = s·dY·B,  dB = s·dYᵀ·xa,  dA = dxaᵀ·drop(x),  dx = dY·W + mask ⊙ (dxa·A).

/// A LoRA-adapted projection's frozen part and settings.
pub struct LoraLinearOp {
    /// (out, in), dense or NF4
    pub w: crate::linear::FrozenWeight,
    /// (out)
    pub bias: Option<Tensor>,
    pub scaling: f32,
    /// Dropout probability and seed; `None` when dropout is off (inference, or p = 0).
    pub dropout: Option<(f64, u64)>,
}

impl LoraLinearOp {
    /// drop(x) as an owned buffer, or None when there is no dropout.
    fn dropped(&self, x: &[f32]) -> Option<(Vec<f32>, Vec<f32>)> {
        self.dropout.map(|(p, seed)| {
            let mask = dropout_mask(x.len(), p, seed);
            let xd = x.par_iter().zip(mask.par_iter()).map(|(a, m)| a * m).collect();
            (xd, mask)
        })
    }
}

impl candle_core::CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }
    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) =
            (cpu_f32(sx, lx, "lora_linear")?, cpu_f32(sa, la, "lora_linear")?, cpu_f32(sb, lb, "lora_linear")?);
        let (r, k) = la.shape().dims2()?;
        let (n, r2) = lb.shape().dims2()?;
        let (wn, wk) = self.w.dims()?;
        if r2 != r || wn != n || wk != k || lx.dims().last() != Some(&k) {
            candle_core::bail!("lora_linear: x {:?}, W {wn}×{wk}, A {r}×{k}, B {n}×{r2} do not fit", lx.dims());
        }
        let m = x.len() / k;
        let mut y = vec![0f32; m * n];
        self.w.with_f32(|w| {
            // y (m×n) = x (m×k) · Wᵀ (k×n)
            sgemm(m, n, k, &mut y, false, x, (k, 1), w, (1, k), 1.0)
        })?;
        if let Some(bias) = &self.bias {
            with_f32(bias, |bias| {
                y.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b))
            })?;
        }
        let dropped = self.dropped(x);
        let xd = dropped.as_ref().map(|(xd, _)| xd.as_slice()).unwrap_or(x);
        // xa (m×r) = drop(x) · Aᵀ;  y += s · xa · Bᵀ
        let mut xa = vec![0f32; m * r];
        sgemm(m, r, k, &mut xa, false, xd, (k, 1), a, (1, k), 1.0);
        sgemm(m, n, r, &mut y, true, &xa, (r, 1), b, (1, r), self.scaling);
        let mut dims = lx.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, k) = a.dims2()?;
        let n = b.dims2()?.0;
        let m = x.elem_count() / k;
        let grad = grad.contiguous()?;
        let s = self.scaling;
        let want_dx = x.track_op();
        let (dx, da, db) = with_f32(x, |x| {
            with_f32(a, |a| {
                with_f32(b, |b| {
                    with_f32(&grad, |dy| -> Result<_> {
                        let dropped = self.dropped(x);
                        let xd = dropped.as_ref().map(|(xd, _)| xd.as_slice()).unwrap_or(x);
                        let mut xa = vec![0f32; m * r];
                        sgemm(m, r, k, &mut xa, false, xd, (k, 1), a, (1, k), 1.0);
                        // dxa (m×r) = s · dY (m×n) · B (n×r)
                        let mut dxa = vec![0f32; m * r];
                        sgemm(m, r, n, &mut dxa, false, dy, (n, 1), b, (r, 1), s);
                        // dB (n×r) = s · dYᵀ (n×m) · xa (m×r)
                        let mut db = vec![0f32; n * r];
                        sgemm(n, r, m, &mut db, false, dy, (1, n), &xa, (r, 1), s);
                        // dA (r×k) = dxaᵀ (r×m) · drop(x) (m×k)
                        let mut da = vec![0f32; r * k];
                        sgemm(r, k, m, &mut da, false, &dxa, (1, r), xd, (k, 1), 1.0);
                        // dx (m×k) = dY · W + mask ⊙ (dxa · A); not needed when nothing upstream wants a gradient
                        // (the first layer's projections read the frozen embedding).
                        if !want_dx {
                            return Ok((Vec::new(), da, db));
                        }
                        let mut dx = vec![0f32; m * k];
                        self.w.with_f32(|w| sgemm(m, k, n, &mut dx, false, dy, (n, 1), w, (k, 1), 1.0))?;
                        match &dropped {
                            None => sgemm(m, k, r, &mut dx, true, &dxa, (r, 1), a, (k, 1), 1.0),
                            Some((_, mask)) => {
                                let mut t = vec![0f32; m * k];
                                sgemm(m, k, r, &mut t, false, &dxa, (r, 1), a, (k, 1), 1.0);
                                dx.par_iter_mut()
                                    .zip(t.par_iter().zip(mask.par_iter()))
                                    .for_each(|(d, (t, mk))| *d += t * mk);
                            }
                        }
                        Ok((dx, da, db))
                    })
                })
            })
        })?????;
        let dev = x.device();
        Ok((
            if want_dx { Some(Tensor::from_vec(dx, x.shape(), dev)?) } else { None },
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

/// y = x·Wᵀ (+ bias) + s·(drop(x)·Aᵀ)·Bᵀ as one op on CPU/f32. `a` (r, in) and `b` (out, r) get gradients when
/// they are variables; `w` and `bias` never do.
pub fn lora_linear(x: &Tensor, a: &Tensor, b: &Tensor, op: LoraLinearOp) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm with a frozen weight.

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, "rms_norm")?;
        let w = cpu_f32(s2, l2, "rms_norm")?;
        let d = w.len();
        if d == 0 || l1.dims().last() != Some(&d) {
            candle_core::bail!("rms_norm: weight of {d} does not match input {:?}", l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * r * wv;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // u = g⊙w; dx = r·u − x·r³·mean(u⊙x), one pass per row
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let g = g.contiguous()?;
            let d = w.elem_count();
            let dx = with_f32(x, |x| {
                with_f32(w, |w| {
                    with_f32(&g, |g| {
                        let mut dx = vec![0f32; x.len()];
                        dx.par_chunks_mut(d).zip(x.par_chunks(d).zip(g.par_chunks(d))).for_each(|(o, (xr, gr))| {
                            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                            let r = 1.0 / (ms + self.eps).sqrt();
                            let ux: f32 = xr.iter().zip(gr).zip(w).map(|((x, g), w)| g * w * x).sum::<f32>() / d as f32;
                            let c = r * r * r * ux;
                            for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                                *o = r * gv * wv - xv * c;
                            }
                        });
                        dx
                    })
                })
            })???;
            return Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None));
        }
        let u = g.broadcast_mul(w)?;
        let r = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + self.eps as f64)?.sqrt()?.recip()?;
        let s = (&u * x)?.mean_keepdim(candle_core::D::Minus1)?;
        let dx = (u.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * s)?)?)?;
        Ok((Some(dx), None))
    }
}

/// RMSNorm over the last dimension with a frozen weight `w` (d): y = x / sqrt(mean(x²) + eps) · w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNorm { eps: eps as f32 };
    let x = x.contiguous()?;
    if x.device().is_cpu() {
        x.apply_op2(w, op)
    } else {
        // Differentiable composition for other devices.
        let r = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(&w.detach())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Rotary position embedding (HF layout: the two halves of each head are rotated against each other).

struct Rope {
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "rope")?;
        // x: (b, t, h, d); cos, sin: (t, d/2)
        let (_b, t, h, d) = l.shape().dims4()?;
        let half = d / 2;
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        with_f32(&self.cos, |cos| {
            with_f32(&self.sin, |sin| {
                // One chunk per (batch, position): its h heads share the position's angles.
                out.par_chunks_mut(h * d).zip(x.par_chunks(h * d)).enumerate().for_each(|(row, (o, xs))| {
                    let p = row % t;
                    let (c, sn) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
                    for (or, xr) in o.chunks_mut(d).zip(xs.chunks(d)) {
                        for i in 0..half {
                            let (x1, x2) = (xr[i], xr[i + half]);
                            let s = sign * sn[i];
                            or[i] = x1 * c[i] - x2 * s;
                            or[i + half] = x2 * c[i] + x1 * s;
                        }
                    }
                })
            })
        })??;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inv = Rope { cos: self.cos.clone(), sin: self.sin.clone(), inverse: !self.inverse };
        Ok(Some(rope_apply(g, inv)?))
    }
}

fn rope_apply(x: &Tensor, op: Rope) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.device().is_cpu() {
        x.apply_op1(op)
    } else {
        let (sin, cos) = if op.inverse { (op.sin.neg()?, op.cos) } else { (op.sin, op.cos) };
        // rope_slow wants (b, h, t, d)
        candle_nn::rotary_emb::rope_slow(&x.transpose(1, 2)?.contiguous()?, &cos, &sin)?.transpose(1, 2)?.contiguous()
    }
}

/// Rotary embedding of x (b, t, h, d) with `cos`, `sin` of shape (t, d/2) (already offset to the positions of x).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, d) = x.dims4()?;
    if cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        candle_core::bail!("rope: cos/sin {:?} do not match x {:?}", cos.dims(), x.dims());
    }
    rope_apply(x, Rope { cos: cos.contiguous()?, sin: sin.contiguous()?, inverse: false })
}

// ---------------------------------------------------------------------------------------------------------------
// Causal softmax over attention scores.

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(st, l, "causal_softmax")?;
        let dims = l.dims();
        let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if s < t {
            candle_core::bail!("causal_softmax: {t} queries but only {s} keys");
        }
        let offset = s - t; // query i sits at absolute position offset + i
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(s).zip(x.par_chunks(s)).enumerate().for_each(|(row, (o, xr))| {
            let visible = offset + row % t + 1;
            let mx = xr[..visible].iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v * self.scale));
            let mut sum = 0f32;
            for (o, &v) in o[..visible].iter_mut().zip(&xr[..visible]) {
                *o = (v * self.scale - mx).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o[..visible].iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // dx = scale · y ⊙ (g − Σ g⊙y)
        let gy = (g * y)?;
        let s = gy.sum_keepdim(candle_core::D::Minus1)?;
        let dx = ((gy - y.broadcast_mul(&s)?)? * self.scale as f64)?;
        Ok(Some(dx))
    }
}

/// softmax(scale · x) over the last dim of attention scores (…, t, s), where query i may only see keys
/// 0..=i + (s − t) (the keys before it in the cache, and itself).
pub fn causal_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.device().is_cpu() {
        x.apply_op1(CausalSoftmax { scale: scale as f32 })
    } else {
        let dims = x.dims();
        let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..s).map(move |j| if j <= i + (s - t) { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (t, s), x.device())?.to_dtype(x.dtype())?;
        candle_nn::ops::softmax(&(x * scale)?.broadcast_add(&mask)?, candle_core::D::Minus1)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Fused causal grouped-query attention: O = softmax(s·QKᵀ + causal mask)·V per head, with K/V heads shared by
// groups of query heads. Neither the scores, the probabilities nor repeated K/V copies are kept: the backward
// recomputes P per head (t×s floats at a time) and follows the textbook formulas
//   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = s·dS·K,  dK = s·dSᵀ·Q.

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
        let offset = s - t;
        for (i, row) in p.chunks_mut(s).enumerate() {
            let visible = offset + i + 1;
            let mx = row[..visible].iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) * scale;
            let mut sum = 0f32;
            for v in row[..visible].iter_mut() {
                *v = (*v * scale - mx).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            row[..visible].iter_mut().for_each(|v| *v *= inv);
            row[visible..].iter_mut().for_each(|v| *v = 0.0);
        }
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
        let (q, k, v) = (cpu_f32(sq, lq, "attention")?, cpu_f32(sk, lk, "attention")?, cpu_f32(sv, lv, "attention")?);
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
        Ok((CpuStorage::F32(out), lq.shape().clone()))
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
        let grad = grad.contiguous()?;
        let scale = self.scale;
        // Per (batch, kv head): dQ of its `rep` query heads, and dK, dV accumulated over them.
        let blocks: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(&grad, |go| {
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
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Causal grouped-query attention. q: (b, t, nh, d); k, v: (b, s, nkv, d) with s ≥ t, the queries being the last
/// t of the s positions; nh a multiple of nkv. Returns (b, t, nh, d). Scores are scaled by `scale`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        q.apply_op3(&k, &v, Attention { scale: scale as f32 })
    } else {
        attention_composed(&q, &k, &v, scale)
    }
}

/// The same attention composed from candle ops (repeat K/V, matmuls, [`causal_softmax`]): the reference the fused
/// op is tested against, and the path on devices without a fused kernel.
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
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

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU: silu(a) · b.

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = cpu_f32(s1, l1, "swiglu")?;
        let b = cpu_f32(s2, l2, "swiglu")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(4096).zip(a.par_chunks(4096).zip(b.par_chunks(4096))).for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a / (1.0 + (-a).exp()) * b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if a.device().is_cpu() && a.dtype() == DType::F32 {
            let g = g.contiguous()?;
            let (da, db): (Vec<f32>, Vec<f32>) = with_f32(a, |a| {
                with_f32(b, |b| {
                    with_f32(&g, |g| {
                        a.par_iter()
                            .zip(b.par_iter().zip(g.par_iter()))
                            .map(|(&a, (&b, &g))| {
                                let sig = 1.0 / (1.0 + (-a).exp());
                                let silu = a * sig;
                                (g * b * sig * (1.0 + a * (1.0 - sig)), g * silu)
                            })
                            .unzip()
                    })
                })
            })???;
            let dev = a.device();
            return Ok((Some(Tensor::from_vec(da, a.shape(), dev)?), Some(Tensor::from_vec(db, b.shape(), dev)?)));
        }
        let sig = candle_nn::ops::sigmoid(a)?;
        let silu = (a * &sig)?;
        // d silu(a)/da = σ(a)·(1 + a·(1 − σ(a)))
        let dsilu = (&sig * ((a * (1.0 - &sig)?)? + 1.0)?)?;
        let da = ((g * b)? * dsilu)?;
        let db = (g * silu)?;
        Ok((Some(da), Some(db)))
    }
}

/// silu(a) ⊙ b, the gated MLP activation of Llama-family models.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    if a.device().is_cpu() {
        a.apply_op2(&b, SwiGlu)
    } else {
        a.silu()? * b
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Output head + cross-entropy, fused and chunked: the (tokens × vocab) logits are never held at once.

/// Rows of logits computed at a time by [`linear_cross_entropy`].
const CE_CHUNK_ROWS: usize = 128;

struct LinearCrossEntropy {
    head: Tensor,
    labels: Vec<i64>,
    denom: f32,
    /// dL/dh, computed during the forward pass (it needs the softmax the forward computes anyway).
    grad: Mutex<Option<Tensor>>,
    want_grad: bool,
}

impl LinearCrossEntropy {
    /// Returns (Σ loss over labelled rows, dL/dh (n·d) if wanted). Labels < 0 are ignored.
    fn run(&self, h: &[f32], n: usize, d: usize, w: &[f32], vocab: usize) -> Result<(f64, Option<Vec<f32>>)> {
        let rows: Vec<usize> = (0..n).filter(|&i| self.labels[i] >= 0).collect();
        for &i in &rows {
            if self.labels[i] as usize >= vocab {
                candle_core::bail!("label {} at row {i} is outside the vocabulary ({vocab})", self.labels[i]);
            }
        }
        let mut dh = if self.want_grad { Some(vec![0f32; n * d]) } else { None };
        let mut total = 0f64;
        let mut hc = vec![0f32; CE_CHUNK_ROWS * d];
        let mut logits = vec![0f32; CE_CHUNK_ROWS * vocab];
        let mut dhc = vec![0f32; CE_CHUNK_ROWS * d];
        for chunk in rows.chunks(CE_CHUNK_ROWS) {
            let c = chunk.len();
            for (j, &i) in chunk.iter().enumerate() {
                hc[j * d..(j + 1) * d].copy_from_slice(&h[i * d..(i + 1) * d]);
            }
            // logits (c, V) = h_c (c, d) · Wᵀ (d, V)
            sgemm(c, vocab, d, &mut logits, false, &hc, (d, 1), w, (1, d), 1.0);
            let inv_denom = 1.0 / self.denom;
            let losses: Vec<f64> = logits[..c * vocab]
                .par_chunks_mut(vocab)
                .zip(chunk.par_iter())
                .map(|(row, &i)| {
                    let label = self.labels[i] as usize;
                    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    let sum: f64 = row.iter().map(|&v| ((v - mx) as f64).exp()).sum();
                    let lse = mx as f64 + sum.ln();
                    let loss = lse - row[label] as f64;
                    if self.want_grad {
                        // dlogits = (softmax − onehot) / denom, written in place
                        for v in row.iter_mut() {
                            *v = ((*v as f64 - lse).exp() as f32) * inv_denom;
                        }
                        row[label] -= inv_denom;
                    }
                    loss
                })
                .collect();
            total += losses.iter().sum::<f64>();
            if let Some(dh) = dh.as_mut() {
                // dh_c (c, d) = dlogits (c, V) · W (V, d)
                sgemm(c, d, vocab, &mut dhc, false, &logits, (vocab, 1), w, (d, 1), 1.0);
                for (j, &i) in chunk.iter().enumerate() {
                    dh[i * d..(i + 1) * d].copy_from_slice(&dhc[j * d..(j + 1) * d]);
                }
            }
        }
        Ok((total, dh))
    }
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = cpu_f32(s, l, "linear_cross_entropy")?;
        let (n, d) = l.shape().dims2()?;
        let (vocab, dw) = self.head.dims2()?;
        if dw != d || self.labels.len() != n {
            candle_core::bail!("linear_cross_entropy: h {n}×{d}, head {vocab}×{dw}, {} labels", self.labels.len());
        }
        let (total, dh) = with_f32(&self.head, |w| self.run(h, n, d, w, vocab))??;
        if let Some(dh) = dh {
            let dh = Tensor::from_vec(dh, (n, d), &candle_core::Device::Cpu)?;
            *self.grad.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))? = Some(dh);
        }
        Ok((CpuStorage::F32(vec![(total / self.denom as f64) as f32]), Shape::from(())))
    }
    fn bwd(&self, _h: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dh = self.grad.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?.take();
        match dh {
            Some(dh) => Ok(Some(dh.broadcast_mul(g)?)),
            None => candle_core::bail!("linear_cross_entropy: backward called twice or without gradients"),
        }
    }
}

/// Cross-entropy of `softmax(h · headᵀ)` against `labels`, summed over rows whose label is ≥ 0 and divided by
/// `denom` (the number of labelled tokens of the whole optimizer step, so accumulated micro-batches average
/// correctly). h: (n, d), head: (V, d), labels: n targets (already shifted: row i predicts labels[i]).
/// Returns a scalar. Rows with a negative label cost nothing: their logits are never computed.
pub fn linear_cross_entropy(h: &Tensor, head: &Tensor, labels: &[i64], denom: f64) -> Result<Tensor> {
    let h = h.contiguous()?;
    if !h.device().is_cpu() || h.dtype() != DType::F32 {
        // Reference path for other devices / dtypes: full logits, differentiable by candle.
        let logits = h.matmul(&head.detach().t()?)?.to_dtype(DType::F32)?;
        let idx: Vec<u32> = labels.iter().enumerate().filter(|(_, &l)| l >= 0).map(|(i, _)| i as u32).collect();
        if idx.is_empty() {
            return logits.sum_all()? * 0.0;
        }
        let tgt: Vec<u32> = idx.iter().map(|&i| labels[i as usize] as u32).collect();
        let idx = Tensor::new(idx, h.device())?;
        let sel = logits.index_select(&idx, 0)?;
        let lsm = candle_nn::ops::log_softmax(&sel, candle_core::D::Minus1)?;
        let tgt = Tensor::new(tgt, h.device())?.unsqueeze(1)?;
        return lsm.gather(&tgt, 1)?.sum_all()?.neg()? / denom;
    }
    let op = LinearCrossEntropy {
        head: head.contiguous()?,
        labels: labels.to_vec(),
        denom: denom as f32,
        grad: Mutex::new(None),
        want_grad: h.track_op(),
    };
    h.apply_op1(op)
}

// ---------------------------------------------------------------------------------------------------------------
// Dropout with a counter-based generator: the mask is a pure function of (seed, element index), so a resumed run
// draws exactly the masks an uninterrupted one would, with no generator state to save.

/// A 64-bit mix (splitmix64's finaliser).
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct MaskMul {
    mask: Tensor,
}

impl CustomOp1 for MaskMul {
    fn name(&self) -> &'static str {
        "dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "dropout")?;
        let out = with_f32(&self.mask, |m| x.par_iter().zip(m.par_iter()).map(|(a, b)| a * b).collect::<Vec<f32>>())?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((g * &self.mask)?))
    }
}

/// Inverted dropout: each element kept with probability 1 − p and scaled by 1/(1 − p). The mask depends only on
/// `seed` and the element's index.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mask = Tensor::from_vec(dropout_mask(x.elem_count(), p, seed), x.shape(), &candle_core::Device::Cpu)?
        .to_device(x.device())?
        .to_dtype(x.dtype())?;
    let x = x.contiguous()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.apply_op1(MaskMul { mask })
    } else {
        x * mask.detach()
    }
}

/// The inverted-dropout multipliers (0 or 1/(1 − p)) of `n` elements for `seed`.
pub(crate) fn dropout_mask(n: usize, p: f64, seed: u64) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p) as f32;
    let threshold = (p * (u64::MAX as f64)) as u64;
    let key = mix64(seed);
    (0..n as u64)
        .into_par_iter()
        .map(|i| if mix64(key ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) < threshold { 0.0 } else { keep })
        .collect()
}

/// Mixes several integers into one seed (for per-step, per-layer dropout streams).
pub fn seed_of(parts: &[u64]) -> u64 {
    parts.iter().fold(0x5eed_u64, |acc, &p| mix64(acc ^ mix64(p)))
}

#[cfg(test)]
mod tests {
    //! Each backward against central finite differences of a random scalar projection of the output.
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Checks d(Σ f(x)⊙p)/dx from backward against central differences, in f64 arithmetic on f32 data.
    fn check_grad(shape: &[usize], f: impl Fn(&Tensor) -> Tensor, tol: f32) {
        let x0 = rand(shape, 1);
        let x = Var::from_tensor(&x0).unwrap();
        let y = f(x.as_tensor());
        let p = rand(y.dims(), 2);
        let loss = (&y * &p).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).expect("no gradient reached the input").flatten_all().unwrap();
        let g: Vec<f32> = g.to_vec1().unwrap();
        let base: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        let eval = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap();
            let y = f(&t).to_dtype(DType::F64).unwrap();
            (y * p.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        for i in (0..base.len()).step_by((base.len() / 40).max(1)) {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let fd = ((eval(&plus) - eval(&minus)) / (2.0 * eps as f64)) as f32;
            assert!(
                (fd - g[i]).abs() <= tol * (1.0 + fd.abs()),
                "element {i}: finite difference {fd}, backward {}",
                g[i]
            );
        }
    }

    #[test]
    fn frozen_matmul_matches_and_has_input_gradient_only() {
        let w = rand(&[5, 7], 3);
        check_grad(&[2, 3, 7], |x| frozen_matmul(x, &w).unwrap(), 1e-2);
        let x = rand(&[4, 7], 4);
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let got = frozen_matmul(&x, &w).unwrap();
        let diff = (want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5);
        // The frozen weight receives no gradient.
        let xv = Var::from_tensor(&x).unwrap();
        let grads = frozen_matmul(xv.as_tensor(), &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none());
    }

    /// A random (out, in) weight quantized to NF4 (double quantization), and its dequantized dense copy.
    fn nf4_weight(out: usize, inp: usize, seed: u64) -> (std::sync::Arc<crate::quant::nf4::Nf4Tensor>, Tensor) {
        let w = rand(&[out, inp], seed);
        let data: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let q = crate::quant::nf4::Nf4Tensor::quantize(&data, &[out, inp], true).unwrap();
        let dense = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
        (std::sync::Arc::new(q), dense)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn nf4_matmul_is_the_dense_product_of_the_dequantized_weight() {
        // 7 × 100 = 700 elements: a partial last block.
        let (q, dense) = nf4_weight(7, 100, 31);
        let x = rand(&[2, 3, 100], 32);
        let d = max_abs_diff(&nf4_matmul(&x, &q).unwrap(), &frozen_matmul(&x, &dense).unwrap());
        assert!(d < 1e-5, "{d}");
        check_grad(&[2, 3, 100], |x| nf4_matmul(x, &q).unwrap(), 1e-2);
        // dx equals the dense op's; the NF4 weight is not a tensor, so nothing else can get a gradient.
        let xv = Var::from_tensor(&x).unwrap();
        let p = rand(&[2, 3, 7], 33);
        let g_nf4 = (nf4_matmul(xv.as_tensor(), &q).unwrap() * &p).unwrap().sum_all().unwrap().backward().unwrap();
        let g_dense =
            (frozen_matmul(xv.as_tensor(), &dense).unwrap() * &p).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_abs_diff(g_nf4.get(xv.as_tensor()).unwrap(), g_dense.get(xv.as_tensor()).unwrap());
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn qlora_gradients_equal_lora_gradients_on_the_dequantized_base() {
        use crate::linear::FrozenWeight;
        let (out, inp, r) = (24, 40, 4);
        let (q, dense) = nf4_weight(out, inp, 41);
        let x0 = rand(&[3, 5, inp], 42);
        let a0 = rand(&[r, inp], 43);
        let b0 = rand(&[out, r], 44);
        let p = rand(&[3, 5, out], 45);
        let bias = Some(rand(&[out], 46));
        let run = |w: FrozenWeight, dropout: Option<(f64, u64)>| {
            let (x, a, b) =
                (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&a0).unwrap(), Var::from_tensor(&b0).unwrap());
            let op = LoraLinearOp { w, bias: bias.clone(), scaling: 0.5, dropout };
            let y = lora_linear(x.as_tensor(), a.as_tensor(), b.as_tensor(), op).unwrap();
            let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            (y, get(&x), get(&a), get(&b))
        };
        for dropout in [None, Some((0.1, 7))] {
            let qlora = run(FrozenWeight::Nf4(q.clone()), dropout);
            let lora = run(FrozenWeight::Dense(dense.clone()), dropout);
            for (name, a, b) in [
                ("y", &qlora.0, &lora.0),
                ("dx", &qlora.1, &lora.1),
                ("dA", &qlora.2, &lora.2),
                ("dB", &qlora.3, &lora.3),
            ] {
                let d = max_abs_diff(a, b);
                assert!(d <= 1e-5, "{name} (dropout {dropout:?}): {d}");
            }
        }
    }

    #[test]
    fn rms_norm_gradient() {
        let w = (rand(&[6], 5) + 1.5).unwrap();
        check_grad(&[3, 6], |x| rms_norm(x, &w, 1e-5).unwrap(), 1e-2);
        // Forward against the closed form.
        let x = rand(&[2, 6], 6);
        let r = (x.sqr().unwrap().mean_keepdim(1).unwrap() + 1e-5).unwrap().sqrt().unwrap();
        let want = x.broadcast_div(&r).unwrap().broadcast_mul(&w).unwrap();
        let got = rms_norm(&x, &w, 1e-5).unwrap();
        assert!((want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn rope_gradient_and_reference() {
        let (t, d) = (5, 8);
        let cos = rand(&[t, d / 2], 7).cos().unwrap();
        let sin = rand(&[t, d / 2], 7).sin().unwrap();
        check_grad(&[2, t, 3, d], |x| rope(x, &cos, &sin).unwrap(), 1e-2);
        let x = rand(&[2, t, 3, d], 8);
        // candle's reference works on (b, h, t, d)
        let xt = x.transpose(1, 2).unwrap().contiguous().unwrap();
        let want = candle_nn::rotary_emb::rope_slow(&xt, &cos, &sin).unwrap().transpose(1, 2).unwrap();
        let got = rope(&x, &cos, &sin).unwrap();
        assert!((want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

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
    fn fused_attention_matches_composed_and_gradients() {
        // GQA (4 query heads over 2 kv heads), a cache offset (s > t), batch 2.
        let (b, t, s, nh, nkv, d) = (2, 3, 5, 4, 2, 4);
        let k = rand(&[b, s, nkv, d], 21);
        let v = rand(&[b, s, nkv, d], 22);
        let q = rand(&[b, t, nh, d], 23);
        let fused = attention(&q, &k, &v, 0.5).unwrap();
        let composed = attention_composed(&q, &k, &v, 0.5).unwrap();
        let diff = (fused - composed).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        check_grad(&[b, t, nh, d], |q| attention(q, &k, &v, 0.5).unwrap(), 1e-2);
        check_grad(&[b, s, nkv, d], |k| attention(&q, k, &v, 0.5).unwrap(), 1e-2);
        check_grad(&[b, s, nkv, d], |v| attention(&q, &k, v, 0.5).unwrap(), 1e-2);
    }

    #[test]
    fn lora_linear_matches_composed_and_gradients() {
        let (m, k, n, r) = (5, 7, 6, 3);
        let w = rand(&[n, k], 31);
        let bias = rand(&[n], 32);
        let a = rand(&[r, k], 33);
        let b = rand(&[n, r], 34);
        let x = rand(&[m, k], 35);
        let op = |dropout| LoraLinearOp {
            w: crate::linear::FrozenWeight::Dense(w.clone()),
            bias: Some(bias.clone()),
            scaling: 1.5,
            dropout,
        };
        // Against the composed formula (no dropout, then with dropout via the mask op).
        let want = (x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap()
            + (x.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 1.5).unwrap())
        .unwrap();
        let got = lora_linear(&x, &a, &b, op(None)).unwrap();
        assert!((want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        let xd = dropout(&x, 0.3, 9).unwrap();
        let want = (x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap()
            + (xd.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 1.5).unwrap())
        .unwrap();
        let got = lora_linear(&x, &a, &b, op(Some((0.3, 9)))).unwrap();
        assert!((want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        for d in [None, Some((0.3, 9))] {
            check_grad(&[m, k], |x| lora_linear(x, &a, &b, op(d)).unwrap(), 1e-2);
            check_grad(&[r, k], |a| lora_linear(&x, a, &b, op(d)).unwrap(), 1e-2);
            check_grad(&[n, r], |b| lora_linear(&x, &a, b, op(d)).unwrap(), 1e-2);
        }
    }

    #[test]
    fn swiglu_gradient() {
        let b = rand(&[3, 8], 10);
        check_grad(&[3, 8], |a| swiglu(a, &b).unwrap(), 1e-2);
        let a = rand(&[3, 8], 11);
        check_grad(&[3, 8], |b| swiglu(&a, b).unwrap(), 1e-2);
    }

    #[test]
    fn dropout_gradient_rate_and_determinism() {
        check_grad(&[4, 16], |x| dropout(x, 0.3, 7).unwrap(), 1e-2);
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        let y: Vec<f32> = dropout(&x, 0.25, 3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.25).abs() < 0.02, "dropped {zeros}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let y2: Vec<f32> = dropout(&x, 0.25, 3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, y2);
    }

    #[test]
    fn linear_cross_entropy_gradient_and_value() {
        let head = rand(&[11, 6], 12);
        let labels = vec![3i64, -100, 0, 10, 7];
        check_grad(&[5, 6], |h| linear_cross_entropy(h, &head, &labels, 4.0).unwrap(), 1e-2);
        // Value against log_softmax of the full logits.
        let h = rand(&[5, 6], 13);
        let got = linear_cross_entropy(&h, &head, &labels, 4.0).unwrap().to_scalar::<f32>().unwrap();
        let lsm = candle_nn::ops::log_softmax(&h.matmul(&head.t().unwrap()).unwrap(), 1).unwrap();
        let lsm: Vec<Vec<f32>> = lsm.to_vec2().unwrap();
        let want: f32 =
            -labels.iter().enumerate().filter(|(_, &l)| l >= 0).map(|(i, &l)| lsm[i][l as usize]).sum::<f32>() / 4.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
