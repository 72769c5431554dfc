//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), exactly torch.optim.AdamW's update:
//! p ← p − lr·wd·p; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; p ← p − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε).
//! Plus clipping by global norm (torch.nn.utils.clip_grad_norm_: scale by max/(‖g‖+1e-6) when ‖g‖ > max).
//! State is kept in f32 and saved/restored with checkpoints.
//!
//! On CUDA an f32 parameter takes one fused kernel (`src/ops/cuda/adamw.cu`) that updates p, m and v in place from
//! the gradient, with the composed step's f32 roundings in its order (the same values, up to the sign of a zero);
//! elsewhere the step is composed from candle ops.

use candle_core::{DType, Result, Tensor, Var};

/// AdamW state for a fixed list of variables.
pub struct AdamW {
    pub vars: Vec<Var>,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Number of updates taken so far.
    pub t: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Per-variable factors on the step's learning rate (LoRA+'s parameter groups; all 1 by default). Weight
    /// decay uses the scaled rate too, as torch's per-group `lr` does.
    pub lr_scale: Vec<f64>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        // Two sets of buffers (not clones of one: the fused CUDA step writes m and v in place).
        let m = vars.iter().map(|v| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        let v = vars.iter().map(|v| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        let lr_scale = vec![1.0; vars.len()];
        Ok(Self { vars, m, v, t: 0, beta1, beta2, eps, weight_decay, lr_scale })
    }

    /// One update with gradients `grads` (same order as the variables).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let lr = lr * self.lr_scale.get(i).copied().unwrap_or(1.0);
            #[cfg(feature = "cuda")]
            let scalars = self.scalars(lr, c1, c2);
            let g = grads[i].to_dtype(crate::compute::Compute::PARAM_DTYPE)?;
            #[cfg(feature = "cuda")]
            if cuda::fused_step(var, &g, &mut self.m[i], &mut self.v[i], scalars)? {
                continue;
            }
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let p = var.as_tensor();
            let p = if self.weight_decay > 0.0 { (p * (1.0 - lr * self.weight_decay))? } else { p.clone() };
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            var.set(&(p - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

impl AdamW {
    /// The step's scalars as the composed step's candle scalar ops apply them to f32 data (each f64 rounded to f32).
    #[cfg(feature = "cuda")]
    fn scalars(&self, lr: f64, c1: f64, c2: f64) -> cuda::Scalars {
        let decay = if self.weight_decay > 0.0 { 1.0 - lr * self.weight_decay } else { 1.0 };
        cuda::Scalars {
            b1: self.beta1 as f32,
            one_minus_b1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            one_minus_b2: (1.0 - self.beta2) as f32,
            decay: decay as f32,
            inv_c1: (1.0 / c1) as f32,
            inv_c2: (1.0 / c2) as f32,
            eps: self.eps as f32,
            lr: lr as f32,
        }
    }
}

/// The fused in-place step on CUDA. candle 0.11.1 writes into a tensor's storage only through an in-place op, one
/// destination each, so the step nests three: m (`StepM`) → v (`StepV`) → p with g as its source (`StepP`), whose
/// `cuda_fwd` holds all four slices and launches the one kernel.
#[cfg(feature = "cuda")]
mod cuda {
    use crate::ops::cuda::{self as k, elementwise, launched, view};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{CudaSlice, PushKernelArg};
    use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Storage, Tensor, Var};
    use std::cell::Cell;

    /// The kernel's scalar arguments, as f32.
    #[derive(Clone, Copy)]
    pub(super) struct Scalars {
        pub b1: f32,
        pub one_minus_b1: f32,
        pub b2: f32,
        pub one_minus_b2: f32,
        pub decay: f32,
        pub inv_c1: f32,
        pub inv_c2: f32,
        pub eps: f32,
        pub lr: f32,
    }

    /// Whether two tensors hold the same storage (the same buffer behind candle's lock). One lock guard at a time:
    /// the addresses are compared after both are released (the tensors keep their storage alive).
    fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
        fn address(t: &Tensor) -> *const Storage {
            let (s, _) = t.storage_and_layout();
            &*s as *const Storage
        }
        std::ptr::eq(address(a), address(b))
    }

    /// A dense f32 CUDA tensor of `n` elements, starting at offset 0.
    fn dense_f32(t: &Tensor, n: usize) -> bool {
        t.device().is_cuda()
            && t.dtype() == DType::F32
            && t.elem_count() == n
            && t.layout().is_contiguous()
            && t.layout().start_offset() == 0
    }

    /// Runs the fused step when `var` is an f32 parameter on CUDA with state to match; false (nothing done) when the
    /// composed step must run instead.
    pub(super) fn fused_step(var: &Var, g: &Tensor, m: &mut Tensor, v: &mut Tensor, k: Scalars) -> Result<bool> {
        let p = var.as_tensor();
        let n = p.elem_count();
        if !dense_f32(p, n) || !g.device().same_device(p.device()) || g.dtype() != DType::F32 || g.elem_count() != n {
            return Ok(false);
        }
        // The state must be this parameter's own dense f32 buffers on its device: anything else (a view, another
        // device or dtype, a buffer shared with p or between m and v) is replaced by a fresh copy (`affine(1, 0)`
        // writes a new dense buffer; `copy` would keep a view's layout).
        let fresh = |s: &Tensor| s.to_device(p.device())?.to_dtype(DType::F32)?.affine(1.0, 0.0);
        for s in [&mut *m, &mut *v] {
            if !dense_f32(s, n) || !s.device().same_device(p.device()) || shares_storage(s, p) {
                *s = fresh(s)?;
            }
        }
        if shares_storage(m, v) {
            *v = fresh(v)?;
        }
        let g = g.contiguous()?;
        m.inplace_op1(&StepM { v, p, g: &g, k })?;
        Ok(true)
    }

    struct StepM<'a> {
        v: &'a Tensor,
        p: &'a Tensor,
        g: &'a Tensor,
        k: Scalars,
    }

    struct StepV<'a, 'b> {
        m: Cell<Option<&'b mut CudaSlice<f32>>>,
        p: &'a Tensor,
        g: &'a Tensor,
        k: Scalars,
    }

    struct StepP<'b> {
        m: Cell<Option<&'b mut CudaSlice<f32>>>,
        v: Cell<Option<&'b mut CudaSlice<f32>>>,
        k: Scalars,
    }

    fn not_cpu(name: &str) -> Result<()> {
        candle_core::bail!("{name}: the fused AdamW step runs on CUDA only")
    }

    fn whole(l: &Layout, name: &str) -> Result<()> {
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("{name}: the optimizer state must be a dense buffer");
        }
        Ok(())
    }

    impl InplaceOp1 for StepM<'_> {
        fn name(&self) -> &'static str {
            "adamw-step-m"
        }

        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
            not_cpu(self.name())
        }

        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
            whole(l, self.name())?;
            let m = s.as_cuda_slice_mut::<f32>()?;
            self.v.inplace_op1(&StepV { m: Cell::new(Some(m)), p: self.p, g: self.g, k: self.k })
        }
    }

    impl InplaceOp1 for StepV<'_, '_> {
        fn name(&self) -> &'static str {
            "adamw-step-v"
        }

        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
            not_cpu(self.name())
        }

        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
            whole(l, self.name())?;
            let v = s.as_cuda_slice_mut::<f32>()?;
            self.p.inplace_op2(self.g, &StepP { m: Cell::new(self.m.take()), v: Cell::new(Some(v)), k: self.k })
        }
    }

    impl InplaceOp2 for StepP<'_> {
        fn name(&self) -> &'static str {
            "adamw-step"
        }

        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
            not_cpu(self.name())
        }

        fn cuda_fwd(&self, ps: &mut CudaStorage, pl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<()> {
            whole(pl, self.name())?;
            let (Some(m), Some(v)) = (self.m.take(), self.v.take()) else {
                candle_core::bail!("adamw-step: the state buffers were already used")
            };
            let dev = gs.device().clone();
            let g = view::<f32>(gs, gl, "adamw-step")?;
            let n = g.len();
            let p = ps.as_cuda_slice_mut::<f32>()?;
            if p.len() < n || m.len() < n || v.len() < n {
                candle_core::bail!("adamw-step: buffers of {}, {}, {} for {n} gradients", p.len(), m.len(), v.len());
            }
            if n == 0 {
                return Ok(());
            }
            let f = k::func(&dev, &k::ADAMW, "adamw_step_f32")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (n64, k) = (n as u64, self.k);
            b.arg(p).arg(&g).arg(m).arg(v).arg(&n64);
            b.arg(&k.b1).arg(&k.one_minus_b1).arg(&k.b2).arg(&k.one_minus_b2).arg(&k.decay);
            b.arg(&k.inv_c1).arg(&k.inv_c2).arg(&k.eps).arg(&k.lr);
            // SAFETY: the arguments match adamw.cu's signature; p, g, m, v hold at least n f32 each.
            launched(unsafe { b.launch(elementwise(n)) })
        }
    }
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales `grads` in place so their global norm is at most `max_norm` (no-op when `max_norm` ≤ 0).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn two_adamw_steps_match_the_closed_form() {
        // One scalar parameter p0 = 1, gradients 0.5 then −0.25, lr 0.1, wd 0.01 (torch.optim.AdamW semantics).
        let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![var.clone()], 0.9, 0.999, 1e-8, 0.01).unwrap();
        let (lr, wd) = (0.1f64, 0.01f64);
        let mut p = 1.0f64;
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for (t, g) in [0.5f64, -0.25].iter().enumerate() {
            opt.step(&[Tensor::new(&[*g as f32], &Device::Cpu).unwrap()], lr).unwrap();
            let t = (t + 1) as i32;
            p *= 1.0 - lr * wd;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            p -= lr * (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
            let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
            assert!((got - p).abs() < 1e-6, "step {t}: {got} vs {p}");
        }
    }

    #[test]
    fn lr_scale_is_a_per_variable_learning_rate() {
        // Two scalars with the same gradient, the second at 4× the learning rate (LoRA+'s B group): first AdamW
        // step p₁ = p₀·(1 − lr·s·wd) − lr·s·g/(|g| + ε).
        let (a, b) = (Var::new(&[1.0f32], &Device::Cpu).unwrap(), Var::new(&[1.0f32], &Device::Cpu).unwrap());
        let mut opt = AdamW::new(vec![a.clone(), b.clone()], 0.9, 0.999, 1e-8, 0.01).unwrap();
        opt.lr_scale = vec![1.0, 4.0];
        let g = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        opt.step(&[g.clone(), g], 0.1).unwrap();
        for (var, s) in [(&a, 1.0f64), (&b, 4.0)] {
            let want = 1.0 * (1.0 - 0.1 * s * 0.01) - 0.1 * s * 0.5 / (0.5 + 1e-8);
            let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
            assert!((got - want).abs() < 1e-6, "scale {s}: {got} vs {want}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g =
            vec![Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap(), Tensor::new(&[4.0f32], &Device::Cpu).unwrap()];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
