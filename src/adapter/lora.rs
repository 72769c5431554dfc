//! LoRA: a frozen projection W plus a trainable low-rank update, y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ.
//!
//! A is (r × in), B is (out × r), s = lora_alpha / r, or lora_alpha / √r with rsLoRA (Kalajdzievski 2023).
//! Initialisation as in PEFT: `init_lora_weights: true` draws A from kaiming-uniform with a = √5
//! (U(−1/√in, 1/√in)) and sets B = 0, so a fresh adapter leaves the model unchanged; `gaussian` draws A from
//! N(0, 1/r²); `false` draws B like A too (PEFT's testing option). Reference: Hu et al. 2021, "LoRA: Low-Rank
//! Adaptation of Large Language Models"; PEFT `tuners/lora/layer.py`.

use super::target::{ExcludeModules, LayersPattern, TargetModules};
use candle_core::{Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

/// How fresh LoRA weights are drawn.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum LoraInit {
    /// A kaiming-uniform, B zero (PEFT's `true`).
    Kaiming,
    /// A ~ N(0, 1/r²), B zero (PEFT's `"gaussian"`).
    Gaussian,
    /// A and B both random (PEFT's `false`): the adapter changes the output from the start.
    Random,
    /// PiSSA (PEFT's `"pissa"`): A, B from the top-r SVD of W, the base becomes W − s·B·A ([`super::pissa`]).
    Pissa,
    /// PiSSA with a randomized SVD of this many subspace iterations (PEFT's `"pissa_niter_N"`).
    PissaNiter(usize),
    /// OLoRA (PEFT's `"olora"`): A, B from the thin QR of W, the base becomes W − s·B·A ([`super::pissa`]).
    Olora,
}

/// The LoRA hyperparameters of an adapter (PEFT's `LoraConfig`, the parts peftkit implements).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    pub init: LoraInit,
    pub layers_to_transform: Option<Vec<usize>>,
    /// Modules never adapted even when `target_modules` matches them (PEFT's `exclude_modules`).
    pub exclude_modules: Option<ExcludeModules>,
    /// The container `layers_to_transform` indexes (PEFT's `layers_pattern`); only `layers` is supported, kept so
    /// that the saved config says what the loaded one said.
    pub layers_pattern: Option<LayersPattern>,
    /// Per-module rank overrides (PEFT's `rank_pattern`): regex keys matched against the end of the module path,
    /// in order; the first match wins.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides (PEFT's `alpha_pattern`), matched like `rank_pattern`.
    pub alpha_pattern: Vec<(String, f64)>,
    /// DoRA (PEFT's `use_dora`): each adapted projection also learns a magnitude vector; see [`super::dora`].
    pub use_dora: bool,
}

impl Default for LoraConfig {
    /// PEFT's `LoraConfig()` for a Llama-family model: r 8, lora_alpha 8, no dropout, `q_proj` and `v_proj` (PEFT's
    /// default targets for `llama`/`qwen2`), Kaiming-uniform A and zero B, every layer, no patterns, no DoRA. (A
    /// recipe's defaults are [`crate::recipe::LoraSpec`]'s.)
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            init: LoraInit::Kaiming,
            layers_to_transform: None,
            exclude_modules: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            use_dora: false,
        }
    }
}

impl LoraConfig {
    /// The rank and alpha that apply to `path`, honouring `rank_pattern` / `alpha_pattern` as PEFT does:
    /// the first key for which `(.*\.)?(key)$` matches the path (an invalid regex matches nothing).
    pub fn rank_alpha(&self, path: &str) -> (usize, f64) {
        let find = |key: &str| regex::Regex::new(&format!("^(?:.*\\.)?(?:{key})$")).is_ok_and(|re| re.is_match(path));
        let r = self.rank_pattern.iter().find(|(k, _)| find(k)).map(|(_, v)| *v).unwrap_or(self.r);
        let a = self.alpha_pattern.iter().find(|(k, _)| find(k)).map(|(_, v)| *v).unwrap_or(self.lora_alpha);
        (r, a)
    }

    /// The output scale s for a module of rank `r` and alpha `alpha`.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// The trainable part of one LoRA-adapted projection.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
    /// A₀ and B₀ when the initialisation rewrote the base weight (PiSSA, OLoRA): the base then holds
    /// W − s·B₀·A₀, and saving converts the adapter back to one for W ([`super::pissa::convert`]).
    pub initial: Option<std::sync::Arc<super::pissa::InitialAdapter>>,
}

impl LoraLayer {
    /// Fresh weights for a projection `in_features → out_features`, drawn from `rng`.
    pub fn init(
        in_features: usize,
        out_features: usize,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: LoraInit,
        rng: &mut rand_chacha::ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let uniform = |rng: &mut rand_chacha::ChaCha8Rng, n: usize, bound: f64| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect()
        };
        // PiSSA and OLoRA start from the base weight instead: `attach` computes them (see `super::pissa`).
        let a: Vec<f32> = match init {
            LoraInit::Kaiming | LoraInit::Random => uniform(rng, r * in_features, bound),
            LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora => vec![0.0; r * in_features],
            LoraInit::Gaussian => {
                let std = 1.0 / r as f64;
                (0..r * in_features).map(|_| (normal(rng) * std) as f32).collect()
            }
        };
        let b: Vec<f32> = match init {
            LoraInit::Random => uniform(rng, out_features * r, 1.0 / (r as f64).sqrt()),
            _ => vec![0.0; out_features * r],
        };
        Ok(Self {
            a: Var::from_tensor(&Tensor::from_vec(a, (r, in_features), device)?)?,
            b: Var::from_tensor(&Tensor::from_vec(b, (out_features, r), device)?)?,
            scaling,
            dropout,
            initial: None,
        })
    }

    /// Wraps loaded weights (f32 copies become the trainable variables).
    pub fn from_weights(a: Tensor, b: Tensor, scaling: f64, dropout: f64) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(crate::compute::Compute::PARAM_DTYPE)?)?,
            b: Var::from_tensor(&b.to_dtype(crate::compute::Compute::PARAM_DTYPE)?)?,
            scaling,
            dropout,
            initial: None,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// The adapted projection y = x·Wᵀ (+ b) + s·(drop(x)·Aᵀ)·Bᵀ for the frozen `w` (out, in) and `bias`, as one
    /// fused op ([`crate::ops::lora_linear`]). Dropout is active when `dropout_seed` is given (training) and this
    /// layer's p > 0; `no_grad` uses A and B as constants (inference).
    pub fn forward(
        &self,
        w: &crate::weight::FrozenWeight,
        bias: Option<&Tensor>,
        x: &Tensor,
        dropout_seed: Option<u64>,
        no_grad: bool,
    ) -> Result<Tensor> {
        let dropout = match dropout_seed {
            Some(seed) if self.dropout > 0.0 => Some((self.dropout, seed)),
            _ => None,
        };
        let (a, b) = if no_grad {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        } else {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        };
        let op = crate::ops::LoraLinearOp { w: w.clone(), bias: bias.cloned(), scaling: self.scaling as f32, dropout };
        crate::ops::lora_linear(x, &a, &b, op)
    }

    /// s·(x·Aᵀ)·Bᵀ for x (m, in) → (m, out). `x` already has dropout applied.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        self.delta_with(x, self.a.as_tensor(), self.b.as_tensor())
    }

    /// The same product with A and B as constants (inference: no autograd graph).
    pub fn delta_detached(&self, x: &Tensor) -> Result<Tensor> {
        self.delta_with(&x.detach(), &self.a.as_tensor().detach(), &self.b.as_tensor().detach())
    }

    fn delta_with(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let a = a.to_dtype(x.dtype())?;
        let b = b.to_dtype(x.dtype())?;
        // (m, in)·(in, r) → (m, r); (m, r)·(r, out) → (m, out)
        let h = x.matmul(&a.t()?)?;
        h.matmul(&b.t()?)? * self.scaling
    }

    /// The dense update s·B·A (out, in), for merging into W.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling
    }
}

/// One standard-normal draw (Box–Muller).
pub(crate) fn normal(rng: &mut rand_chacha::ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A seeded generator for adapter initialisation.
pub fn init_rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_peft_regex_rules_in_order() {
        let cfg = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: TargetModules::AllLinear,
            rank_pattern: vec![(r"layers\.[0-1]\.self_attn\.q_proj".into(), 4), ("q_proj".into(), 2)],
            alpha_pattern: vec![("q_proj|v_proj".into(), 3.0)],
            ..Default::default()
        };
        assert_eq!(cfg.rank_alpha("model.layers.1.self_attn.q_proj"), (4, 3.0));
        assert_eq!(cfg.rank_alpha("model.layers.5.self_attn.q_proj"), (2, 3.0));
        assert_eq!(cfg.rank_alpha("model.layers.5.self_attn.v_proj"), (8, 3.0));
        assert_eq!(cfg.rank_alpha("model.layers.5.self_attn.xq_proj"), (8, 16.0));
        assert_eq!(cfg.scaling(4, 8.0), 2.0);
    }
}
