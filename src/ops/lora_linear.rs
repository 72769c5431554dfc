//! A frozen projection with a LoRA update, fused: y = x·Wᵀ (+ b) + s·(drop(x)·Aᵀ)·Bᵀ.
//!
//! One autograd node per projection instead of a dozen. The backward recomputes drop(x) (a pure function of the
//! seed, see [`fn@super::dropout`]) and xa = drop(x)·Aᵀ (m×r, cheap) rather than keeping them:
//!   dxa = s·dY·B,  dB = s·dYᵀ·xa,  dA = dxaᵀ·drop(x),  dx = dY·W + mask ⊙ (dxa·A).
//! Mixed precision: x, W, b and y may be bf16 while A and B (and so dA, dB) are f32; the kernel computes in f32.
//! Reference: Hu et al., "LoRA" (2021), and PEFT's `lora.Linear.forward`.

use super::dropout::dropout_mask;
use super::gemm::sgemm;
use crate::host::{f32_view, storage_from_f32, tensor_from_f32, with_f32};
use crate::weight::FrozenWeight;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A LoRA-adapted projection's frozen part and settings.
#[derive(Clone)]
pub struct LoraLinearOp {
    /// (out, in), dense or NF4
    pub w: FrozenWeight,
    /// (out)
    pub bias: Option<Tensor>,
    pub scaling: f32,
    /// Dropout probability and seed; `None` when dropout is off (inference, or p = 0).
    pub dropout: Option<(f64, u64)>,
}

impl LoraLinearOp {
    /// drop(x) as an owned buffer with its mask, or None when there is no dropout.
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
            (f32_view(sx, lx, "lora_linear")?, f32_view(sa, la, "lora_linear")?, f32_view(sb, lb, "lora_linear")?);
        let (r, k) = la.shape().dims2()?;
        let (n, r2) = lb.shape().dims2()?;
        let (wn, wk) = self.w.dims()?;
        if r2 != r || wn != n || wk != k || lx.dims().last() != Some(&k) {
            candle_core::bail!("lora_linear: x {:?}, W {wn}×{wk}, A {r}×{k}, B {n}×{r2} do not fit", lx.dims());
        }
        let m = x.len() / k;
        let mut y = vec![0f32; m * n];
        // y (m×n) = x (m×k) · Wᵀ (k×n)
        self.w.with_f32(|w| sgemm(m, n, k, &mut y, false, &x, (k, 1), w, (1, k), 1.0))?;
        if let Some(bias) = &self.bias {
            with_f32(bias, |bias| {
                y.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b))
            })?;
        }
        let dropped = self.dropped(&x);
        let xd: &[f32] = dropped.as_ref().map(|(xd, _)| xd.as_slice()).unwrap_or(&x);
        // xa (m×r) = drop(x) · Aᵀ;  y += s · xa · Bᵀ
        let mut xa = vec![0f32; m * r];
        sgemm(m, r, k, &mut xa, false, xd, (k, 1), &a, (1, k), 1.0);
        sgemm(m, n, r, &mut y, true, &xa, (r, 1), &b, (1, r), self.scaling);
        let mut dims = lx.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((storage_from_f32(y, sx.dtype())?, Shape::from(dims)))
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
        let s = self.scaling;
        let want_dx = x.track_op();
        let (dx, da, db) = with_f32(x, |x| {
            with_f32(a, |a| {
                with_f32(b, |b| {
                    with_f32(grad, |dy| -> Result<_> {
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
        Ok((
            if want_dx { Some(tensor_from_f32(dx, x.shape(), x.dtype())?) } else { None },
            Some(tensor_from_f32(da, (r, k), a.dtype())?),
            Some(tensor_from_f32(db, (n, r), b.dtype())?),
        ))
    }
}

/// y = x·Wᵀ (+ bias) + s·(drop(x)·Aᵀ)·Bᵀ as one op. `a` (r, in) and `b` (out, r) get gradients when they are
/// variables; `w` and `bias` never do. y has x's dtype.
pub fn lora_linear(x: &Tensor, a: &Tensor, b: &Tensor, op: LoraLinearOp) -> Result<Tensor> {
    if x.device().is_cuda() {
        return composed(x, a, b, &op);
    }
    if !super::use_kernel(x, false) {
        return super::reference::lora_linear(x, a, b, &op);
    }
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The GPU path, composed from ops that each own their backward: the frozen product ([`super::frozen_product`]:
/// cuBLAS, dx only, NF4 dequantized by peftkit's kernel), the bias, and the low-rank update through candle's
/// matmuls with A and B cast to x's dtype (their gradients come back in f32 through the casts; the (m, r) product
/// is the only extra activation kept). Device-generic: the tests run it on the CPU against the fused kernel.
pub(crate) fn composed(x: &Tensor, a: &Tensor, b: &Tensor, op: &LoraLinearOp) -> Result<Tensor> {
    let mut y = super::frozen_product(x, &op.w)?;
    if let Some(bias) = &op.bias {
        y = y.broadcast_add(&bias.detach().to_dtype(x.dtype())?)?;
    }
    let k = a.dims2()?.1;
    let m = x.elem_count() / k.max(1);
    let x2 = x.reshape((m, k))?; // (m, in)
    let x2 = match op.dropout {
        Some((p, seed)) => super::dropout(&x2, p, seed)?,
        None => x2,
    };
    let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
    // (m, in)·(in, r) → (m, r); ·(r, out) → (m, out)
    let delta = (x2.matmul(&a.t()?)?.matmul(&b.t()?)? * op.scaling as f64)?;
    let shape = y.shape().clone();
    y + delta.reshape(shape)?
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{dropout, reference};
    use super::*;
    use candle_core::DType;

    fn setup() -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let (m, k, n, r) = (5, 7, 6, 3);
        (rand(&[n, k], 31), rand(&[n], 32), rand(&[r, k], 33), rand(&[n, r], 34), rand(&[m, k], 35))
    }

    #[test]
    fn lora_linear_matches_composed_and_gradients() {
        let (w, bias, a, b, x) = setup();
        let (m, k) = x.dims2().unwrap();
        let (n, r) = b.dims2().unwrap();
        let op = |dropout| LoraLinearOp {
            w: FrozenWeight::Dense(w.clone()),
            bias: Some(bias.clone()),
            scaling: 1.5,
            dropout,
        };
        // Against the composed formula (no dropout, then with dropout via the mask op).
        let want = (x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap()
            + (x.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 1.5).unwrap())
        .unwrap();
        assert!(max_abs_diff(&want, &lora_linear(&x, &a, &b, op(None)).unwrap()) < 1e-5);
        let xd = dropout(&x, 0.3, 9).unwrap();
        let want = (x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap()
            + (xd.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 1.5).unwrap())
        .unwrap();
        assert!(max_abs_diff(&want, &lora_linear(&x, &a, &b, op(Some((0.3, 9)))).unwrap()) < 1e-5);
        for d in [None, Some((0.3, 9))] {
            check_grad(&[m, k], |x| lora_linear(x, &a, &b, op(d)).unwrap(), 1e-2);
            check_grad(&[r, k], |a| lora_linear(&x, a, &b, op(d)).unwrap(), 1e-2);
            check_grad(&[n, r], |b| lora_linear(&x, &a, b, op(d)).unwrap(), 1e-2);
        }
    }

    #[test]
    fn kernel_matches_reference_forward_and_backward() {
        let (w, bias, a, b, x) = setup();
        for d in [None, Some((0.3, 9))] {
            let op =
                LoraLinearOp { w: FrozenWeight::Dense(w.clone()), bias: Some(bias.clone()), scaling: 1.5, dropout: d };
            compare_with_reference(
                &[x.clone(), a.clone(), b.clone()],
                |t| lora_linear(&t[0], &t[1], &t[2], op.clone()).unwrap(),
                |t| reference::lora_linear(&t[0], &t[1], &t[2], &op).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn gpu_composition_matches_the_kernel_forward_and_backward() {
        let (w, bias, a, b, x) = setup();
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
            for d in [None, Some((0.3, 11u64))] {
                let op = LoraLinearOp {
                    w: FrozenWeight::Dense(w.to_dtype(dt).unwrap()),
                    bias: Some(bias.to_dtype(dt).unwrap()),
                    scaling: 1.5,
                    dropout: d,
                };
                // x in the compute dtype, A and B f32 (their gradients too), as in mixed-precision training.
                compare_with_reference(
                    &[x.to_dtype(dt).unwrap(), a.clone(), b.clone()],
                    |t| lora_linear(&t[0], &t[1], &t[2], op.clone()).unwrap(),
                    |t| composed(&t[0], &t[1], &t[2], &op).unwrap(),
                    tol,
                );
            }
        }
    }

    #[test]
    fn mixed_precision_bf16_activations_with_f32_adapter() {
        // x, W, bias in bf16; A, B stay f32 (as training holds them): y and dx are bf16, dA and dB f32, all within
        // bf16 rounding of the all-f32 run.
        let (w, bias, a, b, x) =
            (rand(&[48, 64], 1), rand(&[48], 2), rand(&[8, 64], 3), rand(&[48, 8], 4), rand(&[6, 64], 5));
        let run = |dt: DType| {
            let op = LoraLinearOp {
                w: FrozenWeight::Dense(w.to_dtype(dt).unwrap()),
                bias: Some(bias.to_dtype(dt).unwrap()),
                scaling: 2.0,
                dropout: Some((0.1, 3)),
            };
            forward_backward(&[x.to_dtype(dt).unwrap(), a.clone(), b.clone()], &|t| {
                lora_linear(&t[0], &t[1], &t[2], op.clone()).unwrap()
            })
        };
        let (y32, g32) = run(DType::F32);
        let (y16, g16) = run(DType::BF16);
        assert_eq!(y16.dtype(), DType::BF16);
        assert_eq!((g16[0].dtype(), g16[1].dtype(), g16[2].dtype()), (DType::BF16, DType::F32, DType::F32));
        assert!(rel_l2(&y16, &y32) < BF16_TOL);
        for i in 0..3 {
            let e = rel_l2(&g16[i], &g32[i]);
            assert!(e < BF16_TOL, "gradient {i}: {e}");
        }
    }

    /// The GPU path (frozen product on cuBLAS + the low-rank update through candle's matmuls) against the CPU
    /// kernel: y, dx, dA, dB, with dropout, dense and NF4 bases, f32 and bf16 activations (A, B f32).
    #[test]
    fn gpu_lora_linear_matches_the_cpu() {
        let Some(gpu) = crate::compute::test_gpu("gpu_lora_linear_matches_the_cpu") else { return };
        let (w, bias, a, b, x) = setup();
        let (out, inp) = w.dims2().unwrap();
        let (q, _) = nf4_weight(out, inp, 50);
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, BF16_TOL)] {
            for base in [FrozenWeight::Dense(w.to_dtype(dt).unwrap()), FrozenWeight::Nf4(q.clone())] {
                let on_gpu = base.to_device(&gpu).unwrap();
                let bias_g = bias.to_dtype(dt).unwrap().to_device(&gpu).unwrap();
                let op = |t: &Tensor| LoraLinearOp {
                    w: if t.device().is_cpu() { base.clone() } else { on_gpu.clone() },
                    bias: Some(if t.device().is_cpu() { bias.to_dtype(dt).unwrap() } else { bias_g.clone() }),
                    scaling: 1.5,
                    dropout: Some((0.2, 17)),
                };
                compare_gpu_with_cpu(
                    &gpu,
                    &[x.to_dtype(dt).unwrap(), a.clone(), b.clone()],
                    |t| lora_linear(&t[0], &t[1], &t[2], op(&t[0])).unwrap(),
                    tol,
                );
            }
        }
    }
}
