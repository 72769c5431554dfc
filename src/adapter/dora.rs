//! DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").
//!
//! A LoRA update whose adapted weight W + s·B·A is split into a direction and a learned magnitude: each output
//! row n is renormalised to length mₙ, W' = diag(m / ‖W + s·B·A‖) · (W + s·B·A), where ‖·‖ is the row-wise L2 norm
//! over the input dimension. m (out) is trainable along with A and B; the norm is recomputed from the current A
//! and B at every forward but treated as a constant (no gradient flows through it, §4.3 of the paper, as PEFT does).
//!
//! With g = m / ‖W + s·B·A‖ (out), the forward follows PEFT's `DoraLinearLayer` / `DoraLinearVariant`:
//!   y = x·Wᵀ + b + (g − 1) ⊙ (x'·Wᵀ) + g ⊙ s·(x'·Aᵀ)·Bᵀ,
//! where x' = x when dropout is off (inference, or p = 0) — then y = g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b, one fused
//! product — and x' = drop(x) in training with p > 0: the base term is then recomputed on the dropped input, so the
//! frozen weight is multiplied twice. The bias is added once, unscaled. A fresh adapter starts at m = ‖W + s·B·A‖
//! (g = 1: the identity when B = 0). PEFT saves m as `base_model.model.<module>.lora_magnitude_vector` (1-D, out)
//! and sets `use_dora: true` in `adapter_config.json`.
//!
//! Merging gives W' above (the bias unchanged). The norm needs the dense weight: on the CPU it is computed row by
//! row from the weight's f32 view (the reused buffer that dequantizes an NF4 weight one projection at a time); on a
//! GPU from the weight dequantized into the device's scratch buffer, with candle ops.
//! Reference: PEFT `tuners/lora/dora.py`, `tuners/lora/variants.py`.

use super::lora::LoraLayer;
use crate::weight::FrozenWeight;
use candle_core::{DType, Device, Result, Tensor, Var};
use rayon::prelude::*;

/// The trainable part of one DoRA-adapted projection: a LoRA update and a magnitude per output row.
#[derive(Debug, Clone)]
pub struct DoraLayer {
    pub lora: LoraLayer,
    /// (out) m, f32: PEFT's `lora_magnitude_vector`.
    pub magnitude: Var,
    /// ‖W + s·B·A‖ fixed by [`DoraLayer::freeze_norm`] for inference (generation, evaluation), where A and B no
    /// longer change; `None` recomputes it at every forward (training).
    pub frozen_norm: Option<Tensor>,
}

impl DoraLayer {
    /// A fresh DoRA layer around `lora` on the frozen weight `w`: m = ‖W + s·B·A‖, so that g = 1.
    pub fn init(lora: LoraLayer, w: &FrozenWeight) -> Result<Self> {
        let norm = weight_norm(w, lora.a.as_tensor(), lora.b.as_tensor(), lora.scaling)?;
        let device = lora.a.device().clone();
        let magnitude = Var::from_tensor(&norm.to_device(&device)?)?;
        Ok(Self { lora, magnitude, frozen_norm: None })
    }

    /// Wraps loaded weights (an f32 copy of m becomes the trainable variable).
    pub fn from_weights(lora: LoraLayer, magnitude: Tensor) -> Result<Self> {
        let magnitude = Var::from_tensor(&magnitude.flatten_all()?.to_dtype(crate::compute::Compute::PARAM_DTYPE)?)?;
        Ok(Self { lora, magnitude, frozen_norm: None })
    }

    /// ‖W + s·B·A‖ (out) for the current A and B, f32, without a gradient.
    pub fn norm(&self, w: &FrozenWeight) -> Result<Tensor> {
        if let Some(n) = &self.frozen_norm {
            return Ok(n.clone());
        }
        weight_norm(w, self.lora.a.as_tensor(), self.lora.b.as_tensor(), self.lora.scaling)
    }

    /// Fixes the norm at its current value, for forwards that never train (A and B must not change afterwards).
    pub fn freeze_norm(&mut self, w: &FrozenWeight) -> Result<()> {
        self.frozen_norm = None;
        self.frozen_norm = Some(self.norm(w)?);
        Ok(())
    }

    /// The adapted projection (see the module documentation) for the frozen `w` (out, in) and `bias`, x (…, in) →
    /// (…, out) in x's dtype. Dropout is active when `dropout_seed` is given (training) and p > 0; `no_grad` uses
    /// m, A and B as constants. The scale g is applied in f32, so m's gradient is accumulated in f32.
    pub fn forward(
        &self,
        w: &FrozenWeight,
        bias: Option<&Tensor>,
        x: &Tensor,
        dropout_seed: Option<u64>,
        no_grad: bool,
    ) -> Result<Tensor> {
        let l = &self.lora;
        let (a, b, m) = if no_grad {
            (l.a.as_tensor().detach(), l.b.as_tensor().detach(), self.magnitude.as_tensor().detach())
        } else {
            (l.a.as_tensor().clone(), l.b.as_tensor().clone(), self.magnitude.as_tensor().clone())
        };
        // g = m / ‖W + s·B·A‖ (out), f32; the norm is a constant.
        let norm = self.norm(w)?.detach().to_device(m.device())?;
        let g = m.div(&norm)?;
        let dtype = x.dtype();
        let y = match dropout_seed {
            Some(seed) if l.dropout > 0.0 => {
                // y = x·Wᵀ + b + (g − 1) ⊙ (x'·Wᵀ) + g ⊙ s·(x'·Aᵀ)·Bᵀ with x' = drop(x).
                let base = crate::ops::frozen_product(x, w)?; // (…, out)
                let xd = crate::ops::dropout(x, l.dropout, seed)?; // (…, in)
                let pd = crate::ops::frozen_product(&xd, w)?; // (…, out)
                let k = a.dims2()?.1;
                let rows = xd.elem_count() / k.max(1);
                let (af, bf) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
                // (m, in)·(in, r) → (m, r); ·(r, out) → (m, out)
                let lo = (xd.reshape((rows, k))?.matmul(&af.t()?)?.matmul(&bf.t()?)? * l.scaling)?;
                let lo = lo.reshape(pd.shape())?;
                let gm1 = (&g - 1.0)?;
                let y = (base.to_dtype(DType::F32)? + pd.to_dtype(DType::F32)?.broadcast_mul(&gm1)?)?;
                (y + lo.to_dtype(DType::F32)?.broadcast_mul(&g)?)?
            }
            _ => {
                // y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b: the LoRA product without its bias, rescaled.
                let op =
                    crate::ops::LoraLinearOp { w: w.clone(), bias: None, scaling: l.scaling as f32, dropout: None };
                let z = crate::ops::lora_linear(x, &a, &b, op)?; // (…, out)
                z.to_dtype(DType::F32)?.broadcast_mul(&g)?
            }
        };
        let y = match bias {
            Some(bias) => y.broadcast_add(&bias.detach().to_dtype(DType::F32)?)?,
            None => y,
        };
        y.to_dtype(dtype)
    }

    /// W' = diag(m / ‖W + s·B·A‖) · (W + s·B·A) for W (out, in), in f32 on W's device.
    pub fn merge_weight(&self, w: &Tensor) -> Result<Tensor> {
        let w = w.to_dtype(DType::F32)?;
        let v = (&w + self.lora.delta_weight()?.detach().to_device(w.device())?)?; // (out, in)
        let norm = v.sqr()?.sum_keepdim(1)?.sqrt()?; // (out, 1)
        let m = self.magnitude.as_tensor().detach().to_device(w.device())?.reshape(norm.shape())?;
        v.broadcast_mul(&m.div(&norm)?)
    }
}

/// ‖W + s·B·A‖ row by row: (out) f32 on W's device, with no autograd graph. `a` (r, in), `b` (out, r).
/// On the CPU the weight is read through its f32 view (an NF4 or bf16 weight dequantized into the thread's reused
/// buffer) and each row gets W + s·B·A in a row-sized buffer, so no other weight-sized tensor is made; elsewhere the
/// weight is densified on its device (NF4: into the scratch buffer) and the norm composed from candle ops.
pub fn weight_norm(w: &FrozenWeight, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    let (out, inp) = w.dims()?;
    let (r, ka) = a.dims2()?;
    let (nb, rb) = b.dims2()?;
    if ka != inp || nb != out || rb != r {
        candle_core::bail!("dora: A {r}×{ka} and B {nb}×{rb} do not fit a weight {out}×{inp}");
    }
    let device = w.device();
    if !device.is_cpu() {
        // Used at once: an NF4 weight's dense view is the device's scratch buffer.
        return composed_norm(&w.gpu_dense(DType::F32)?, a, b, scaling);
    }
    let a: Vec<f32> = a.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let s = scaling as f32;
    let norms = w.with_f32(|w| row_norms(w, inp, &a, &b, r, s))?;
    Tensor::from_vec(norms, out, &Device::Cpu)
}

/// ‖W + s·B·A‖ row by row from a dense f32 `w` (out, in) with candle ops, on w's device (the GPU path; device-generic,
/// so the tests run it on the CPU against [`row_norms`]).
fn composed_norm(w: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    // (out, r)·(r, in) → (out, in)
    let d = (b.detach().to_dtype(DType::F32)?.matmul(&a.detach().to_dtype(DType::F32)?)? * scaling)?;
    (w + d.to_device(w.device())?)?.sqr()?.sum(1)?.sqrt()
}

/// ‖wₙ + s·Σᵣ bₙᵣ·aᵣ‖₂ for every row n of `w` (rows of `inp`), summed in f64; rows in parallel, a row-sized buffer
/// per worker.
fn row_norms(w: &[f32], inp: usize, a: &[f32], b: &[f32], r: usize, s: f32) -> Vec<f32> {
    let out = w.len() / inp.max(1);
    (0..out)
        .into_par_iter()
        .map_init(
            || vec![0f32; inp],
            |row, n| {
                row.copy_from_slice(&w[n * inp..(n + 1) * inp]);
                for j in 0..r {
                    let c = s * b[n * r + j];
                    if c != 0.0 {
                        row.iter_mut().zip(&a[j * inp..(j + 1) * inp]).for_each(|(v, aj)| *v += c * aj);
                    }
                }
                row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt() as f32
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{check_grad, forward_backward, nf4_weight, rand, rel_l2, BF16_TOL};

    fn layer(a: &Tensor, b: &Tensor, m: &Tensor, dropout: f64) -> DoraLayer {
        let lora = LoraLayer::from_weights(a.clone(), b.clone(), 1.5, dropout).unwrap();
        DoraLayer::from_weights(lora, m.clone()).unwrap()
    }

    fn setup() -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor) {
        let (m, k, n, r) = (5, 7, 6, 3);
        let w = rand(&[n, k], 41);
        let m_vec = (rand(&[n], 46).affine(0.3, 2.0)).unwrap();
        (w, rand(&[n], 42), rand(&[r, k], 43), rand(&[n, r], 44), rand(&[m, k], 45), m_vec)
    }

    /// The formula written out with candle ops (the norm from the dense W + s·B·A).
    fn by_formula(w: &Tensor, bias: &Tensor, x: &Tensor, a: &Tensor, b: &Tensor, m: &Tensor, xd: &Tensor) -> Tensor {
        let v = (w + (b.matmul(a).unwrap() * 1.5).unwrap()).unwrap();
        let norm = v.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        let g = m.div(&norm).unwrap();
        let base = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(bias).unwrap();
        let pd = xd.matmul(&w.t().unwrap()).unwrap();
        let lo = (xd.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 1.5).unwrap();
        (base + pd.broadcast_mul(&(&g - 1.0).unwrap()).unwrap() + lo.broadcast_mul(&g).unwrap()).unwrap()
    }

    #[test]
    fn dora_forward_matches_the_formula_with_and_without_dropout() {
        let (w, bias, a, b, x, m) = setup();
        let fw = FrozenWeight::Dense(w.clone());
        for d in [0.0, 0.3] {
            let l = layer(&a, &b, &m, d);
            let y = l.forward(&fw, Some(&bias), &x, Some(7), false).unwrap();
            let xd = if d > 0.0 { crate::ops::dropout(&x, d, 7).unwrap() } else { x.clone() };
            let want = by_formula(&w, &bias, &x, &a, &b, &m, &xd);
            assert!(rel_l2(&y, &want) < 1e-6, "dropout {d}: {}", rel_l2(&y, &want));
        }
    }

    #[test]
    fn dora_gradients_of_m_a_b_and_x_match_finite_differences() {
        let (w, bias, a, b, x, m) = setup();
        let (n, k) = w.dims2().unwrap();
        let r = a.dims2().unwrap().0;
        let rows = x.dims2().unwrap().0;
        let fw = FrozenWeight::Dense(w.clone());
        // The norm is a constant (no gradient through it, as PEFT detaches it): finite differences must hold it
        // fixed too, so each check freezes the norm at the values of the point being differentiated.
        let norm = weight_norm(&fw, &a, &b, 1.5).unwrap();
        for d in [0.0, 0.3] {
            let with = |a: &Tensor, b: &Tensor, m: &Tensor, x: &Tensor| {
                let mut l = DoraLayer {
                    lora: LoraLayer {
                        a: Var::from_tensor(a).unwrap(),
                        b: Var::from_tensor(b).unwrap(),
                        scaling: 1.5,
                        dropout: d,
                        initial: None,
                    },
                    magnitude: Var::from_tensor(m).unwrap(),
                    frozen_norm: None,
                };
                l.frozen_norm = Some(norm.clone());
                l.forward(&fw, Some(&bias), x, Some(7), false).unwrap()
            };
            check_grad(&[n], |m| with(&a, &b, m, &x), 1e-2);
            check_grad(&[r, k], |a| with(a, &b, &m, &x), 1e-2);
            check_grad(&[n, r], |b| with(&a, b, &m, &x), 1e-2);
            check_grad(&[rows, k], |x| with(&a, &b, &m, x), 1e-2);
        }
    }

    #[test]
    fn dora_gradients_treat_the_norm_as_a_constant() {
        // Recomputing the norm at each forward gives the gradients of the fixed-norm function checked above: the
        // norm carries no gradient (as PEFT detaches it).
        let (w, bias, a, b, x, m) = setup();
        let fw = FrozenWeight::Dense(w.clone());
        let norm = weight_norm(&fw, &a, &b, 1.5).unwrap();
        let grads = |frozen: Option<Tensor>| {
            forward_backward(&[a.clone(), b.clone(), m.clone()], &|t| {
                let l = DoraLayer {
                    lora: LoraLayer {
                        a: Var::from_tensor(&t[0]).unwrap(),
                        b: Var::from_tensor(&t[1]).unwrap(),
                        scaling: 1.5,
                        dropout: 0.0,
                        initial: None,
                    },
                    magnitude: Var::from_tensor(&t[2]).unwrap(),
                    frozen_norm: frozen.clone(),
                };
                l.forward(&fw, Some(&bias), &x, None, false).unwrap()
            })
            .1
        };
        for (g, h) in grads(None).iter().zip(&grads(Some(norm))) {
            assert_eq!(rel_l2(g, h), 0.0);
        }
    }

    #[test]
    fn fresh_dora_is_the_identity_and_merge_equals_unmerged() {
        let (w, bias, a, _, x, _) = setup();
        let (n, r) = (w.dims2().unwrap().0, a.dims2().unwrap().0);
        let fw = FrozenWeight::Dense(w.clone());
        // B = 0: m = ‖W‖, the output is the base projection's.
        let zero_b = Tensor::zeros((n, r), DType::F32, &Device::Cpu).unwrap();
        let lora = LoraLayer::from_weights(a.clone(), zero_b, 1.5, 0.0).unwrap();
        let l = DoraLayer::init(lora, &fw).unwrap();
        let base = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        let y = l.forward(&fw, Some(&bias), &x, None, true).unwrap();
        assert!(rel_l2(&y, &base) < 1e-6);
        // Random B and m: merged weight (bias unchanged) reproduces the unmerged forward.
        let (_, _, a, b, _, m) = setup();
        let l = layer(&a, &b, &m, 0.0);
        let merged = l.merge_weight(&w).unwrap();
        let y_merged = x.matmul(&merged.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        let y = l.forward(&fw, Some(&bias), &x, None, true).unwrap();
        assert!(rel_l2(&y_merged, &y) < 1e-6);
        // The merged rows have length m.
        let lens = merged.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        assert!(rel_l2(&lens, &m) < 1e-6);
    }

    #[test]
    fn dora_norm_on_nf4_and_bf16_weights() {
        let (q, dense) = nf4_weight(48, 64, 3);
        let (a, b) = (rand(&[4, 64], 5), rand(&[48, 4], 6));
        let want = weight_norm(&FrozenWeight::Dense(dense.clone()), &a, &b, 2.0).unwrap();
        let got = weight_norm(&FrozenWeight::Nf4(q), &a, &b, 2.0).unwrap();
        assert!(rel_l2(&got, &want) < 1e-6);
        let bf = weight_norm(&FrozenWeight::Dense(dense.to_dtype(DType::BF16).unwrap()), &a, &b, 2.0).unwrap();
        assert!(rel_l2(&bf, &want) < 1e-2);
        // The GPU path's composition, run on the CPU.
        assert!(rel_l2(&composed_norm(&dense, &a, &b, 2.0).unwrap(), &want) < 1e-6);
    }

    /// The GPU path (norm from the dequantized scratch weight, LoRA-linear composed, scale in f32) against the CPU:
    /// y, dx, dA, dB, dm, with and without dropout, dense and NF4 bases, f32 and bf16 activations.
    #[test]
    fn gpu_dora_matches_the_cpu() {
        let Some(gpu) = crate::compute::test_gpu("gpu_dora_matches_the_cpu") else { return };
        let (w, bias, a, b, x, m) = setup();
        let (out, inp) = w.dims2().unwrap();
        let (q, _) = nf4_weight(out, inp, 50);
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, BF16_TOL)] {
            for base in [FrozenWeight::Dense(w.to_dtype(dt).unwrap()), FrozenWeight::Nf4(q.clone())] {
                let on_gpu = base.to_device(&gpu).unwrap();
                let bias_g = bias.to_dtype(dt).unwrap().to_device(&gpu).unwrap();
                for d in [0.0, 0.2] {
                    crate::ops::testutil::compare_gpu_with_cpu(
                        &gpu,
                        &[x.to_dtype(dt).unwrap(), a.clone(), b.clone(), m.clone()],
                        |t| {
                            let cpu = t[0].device().is_cpu();
                            let l = DoraLayer {
                                lora: LoraLayer {
                                    a: Var::from_tensor(&t[1]).unwrap(),
                                    b: Var::from_tensor(&t[2]).unwrap(),
                                    scaling: 1.5,
                                    dropout: d,
                                    initial: None,
                                },
                                magnitude: Var::from_tensor(&t[3]).unwrap(),
                                frozen_norm: None,
                            };
                            let (w, bias) =
                                if cpu { (&base, bias.to_dtype(dt).unwrap()) } else { (&on_gpu, bias_g.clone()) };
                            l.forward(w, Some(&bias), &t[0], Some(17), false).unwrap()
                        },
                        tol,
                    );
                }
            }
        }
    }

    #[test]
    fn dora_bf16_activations_stay_within_bf16_tolerance_of_f32() {
        // x, W, bias bf16; m, A, B f32 (as training holds them): y and dx bf16, dm, dA, dB f32.
        let (w, bias, a, b, x) =
            (rand(&[48, 64], 1), rand(&[48], 2), rand(&[8, 64], 3), rand(&[48, 8], 4), rand(&[6, 64], 5));
        let m = rand(&[48], 6).affine(0.5, 4.0).unwrap();
        for d in [0.0, 0.1] {
            let run = |dt: DType| {
                let fw = FrozenWeight::Dense(w.to_dtype(dt).unwrap());
                let bias = bias.to_dtype(dt).unwrap();
                forward_backward(&[x.to_dtype(dt).unwrap(), a.clone(), b.clone(), m.clone()], &|t| {
                    let l = DoraLayer {
                        lora: LoraLayer {
                            a: Var::from_tensor(&t[1]).unwrap(),
                            b: Var::from_tensor(&t[2]).unwrap(),
                            scaling: 2.0,
                            dropout: d,
                            initial: None,
                        },
                        magnitude: Var::from_tensor(&t[3]).unwrap(),
                        frozen_norm: None,
                    };
                    l.forward(&fw, Some(&bias), &t[0], Some(3), false).unwrap()
                })
            };
            let (y32, g32) = run(DType::F32);
            let (y16, g16) = run(DType::BF16);
            assert_eq!(y16.dtype(), DType::BF16);
            assert_eq!(
                [g16[0].dtype(), g16[1].dtype(), g16[2].dtype(), g16[3].dtype()],
                [DType::BF16, DType::F32, DType::F32, DType::F32]
            );
            assert!(rel_l2(&y16, &y32) < BF16_TOL, "dropout {d}: y {}", rel_l2(&y16, &y32));
            for i in 0..4 {
                let e = rel_l2(&g16[i], &g32[i]);
                assert!(e < BF16_TOL, "dropout {d}: gradient {i}: {e}");
            }
        }
    }
}
