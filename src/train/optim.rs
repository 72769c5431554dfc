//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), exactly torch.optim.AdamW's update:
//! p ← p − lr·wd·p; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; p ← p − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε).
//! Plus clipping by global norm (torch.nn.utils.clip_grad_norm_: scale by max/(‖g‖+1e-6) when ‖g‖ > max).
//! State is kept in f32 and saved/restored with checkpoints.

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
}

impl AdamW {
    pub fn new(vars: Vec<Var>, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        let m = vars.iter().map(|v| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self { vars, m, v, t: 0, beta1, beta2, eps, weight_decay })
    }

    /// One update with gradients `grads` (same order as the variables).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let g = grads[i].to_dtype(crate::compute::Compute::PARAM_DTYPE)?;
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
    fn clipping_scales_to_max_norm() {
        let mut g =
            vec![Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap(), Tensor::new(&[4.0f32], &Device::Cpu).unwrap()];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
