//! IA3: a frozen projection rescaled feature-wise by a learned vector ("(IA)³", Liu et al. 2022, "Few-Shot
//! Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").
//!
//! For an ordinary target the vector l (out) scales the projection's output, bias included: y = (x·Wᵀ + b) ⊙ l.
//! For a *feedforward* target (Llama's `down_proj` by default) it scales the input instead: y = (x ⊙ l)·Wᵀ + b.
//! PEFT stores l as `ia3_l` of shape (out, 1) or (1, in) respectively, so that merging is W ⊙ ia3_l with
//! broadcasting: rows scaled for an output vector (and the bias with them), columns for an input vector.
//! Vectors start at 1 (`init_ia3_weights: true`), so a fresh adapter is the identity; `false` draws them from
//! N(0, 1) as PEFT does. Reference: PEFT `tuners/ia3/{config,layer,model}.py`.

use super::target::{ExcludeModules, TargetModules};
use candle_core::{Device, Result, Tensor, Var};

/// Which targets scale their input: PEFT's `feedforward_modules`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum FeedforwardModules {
    /// Module names or paths; a module is feedforward when its path ends with one of them (PEFT's rule).
    List(Vec<String>),
    /// A regex matched against the whole module path.
    Regex(String),
}

impl FeedforwardModules {
    /// Whether the module at `path` scales its input (an invalid regex matches nothing).
    pub fn matches(&self, path: &str) -> bool {
        match self {
            FeedforwardModules::List(names) => names.iter().any(|n| path.ends_with(n.as_str())),
            FeedforwardModules::Regex(r) => regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(path)),
        }
    }
}

/// The IA3 hyperparameters of an adapter (PEFT's `IA3Config`, the parts that change the math).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ia3Config {
    pub target_modules: TargetModules,
    pub feedforward_modules: FeedforwardModules,
    /// Start the vectors at 1 (identity); otherwise from N(0, 1).
    pub init_ia3_weights: bool,
    /// Modules never rescaled even when `target_modules` matches them (PEFT's `exclude_modules`).
    pub exclude_modules: Option<ExcludeModules>,
}

impl Default for Ia3Config {
    /// The Llama-family defaults: rescale keys, values and the MLP's down projection (its input).
    fn default() -> Self {
        Ia3Config {
            target_modules: TargetModules::List(vec!["k_proj".into(), "v_proj".into(), "down_proj".into()]),
            feedforward_modules: FeedforwardModules::List(vec!["down_proj".into()]),
            init_ia3_weights: true,
            exclude_modules: None,
        }
    }
}

/// The trainable part of one IA3-adapted projection.
#[derive(Debug, Clone)]
pub struct Ia3Layer {
    /// (1, in) when `feedforward`, else (out, 1): PEFT's `ia3_l`.
    pub l: Var,
    /// True when the vector scales the projection's input.
    pub feedforward: bool,
}

impl Ia3Layer {
    /// A fresh vector for a projection `in_features → out_features`.
    pub fn init(
        in_features: usize,
        out_features: usize,
        feedforward: bool,
        init_ones: bool,
        rng: &mut rand_chacha::ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let shape = if feedforward { (1, in_features) } else { (out_features, 1) };
        let n = shape.0 * shape.1;
        let v: Vec<f32> =
            if init_ones { vec![1.0; n] } else { (0..n).map(|_| super::lora::normal(rng) as f32).collect() };
        Ok(Self { l: Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?, feedforward })
    }

    /// Wraps a loaded vector (an f32 copy becomes the trainable variable).
    pub fn from_weights(l: Tensor, feedforward: bool) -> Result<Self> {
        Ok(Self { l: Var::from_tensor(&l.to_dtype(crate::compute::Compute::PARAM_DTYPE)?)?, feedforward })
    }

    /// The expected `ia3_l` shape for a projection `in_features → out_features`.
    pub fn shape_for(&self, in_features: usize, out_features: usize) -> [usize; 2] {
        if self.feedforward {
            [1, in_features]
        } else {
            [out_features, 1]
        }
    }

    /// The vector as a 1-D tensor, tracked by autograd unless `detached`.
    pub fn vector(&self, detached: bool) -> Result<Tensor> {
        let t = if detached { self.l.as_tensor().detach() } else { self.l.as_tensor().clone() };
        t.flatten_all()
    }

    /// The adapted projection: (x ⊙ l)·Wᵀ + b for a feedforward (input) vector, (x·Wᵀ + b) ⊙ l otherwise, where
    /// `base` computes x·Wᵀ + b through the frozen weight. The gradient reaches l through the frozen product's dX
    /// (input vector) or the product itself (output vector); l (f32) is cast to x's dtype.
    pub fn forward(&self, x: &Tensor, no_grad: bool, base: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let l = self.vector(no_grad)?.to_dtype(x.dtype())?;
        if self.feedforward {
            base(&x.broadcast_mul(&l)?)
        } else {
            base(x)?.broadcast_mul(&l)
        }
    }

    /// W ⊙ ia3_l for W (out, in) in f32: rows scaled for an output vector, columns for an input vector.
    pub fn merge_weight(&self, w: &Tensor) -> Result<Tensor> {
        let l = self.l.as_tensor().detach().to_device(w.device())?;
        w.broadcast_mul(&l)
    }

    /// The bias after merging: scaled by an output vector, unchanged by an input vector.
    pub fn merge_bias(&self, b: &Tensor) -> Result<Tensor> {
        if self.feedforward {
            return Ok(b.clone());
        }
        let l = self.l.as_tensor().detach().to_device(b.device())?.flatten_all()?;
        b * l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedforward_matching_follows_peft() {
        let list = FeedforwardModules::List(vec!["down_proj".into()]);
        assert!(list.matches("model.layers.0.mlp.down_proj"));
        assert!(!list.matches("model.layers.0.mlp.up_proj"));
        let re = FeedforwardModules::Regex(r".*\.mlp\.down_proj".into());
        assert!(re.matches("model.layers.3.mlp.down_proj"));
        assert!(!FeedforwardModules::Regex("down_proj".into()).matches("model.layers.3.mlp.down_proj"));
    }

    #[test]
    fn merge_scales_rows_or_columns() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev)?; // (out 2, in 3)
        let out = Ia3Layer::from_weights(Tensor::new(&[[2f32], [10.]], &dev)?, false)?;
        assert_eq!(out.merge_weight(&w)?.to_vec2::<f32>()?, [[2., 4., 6.], [40., 50., 60.]]);
        assert_eq!(out.merge_bias(&Tensor::new(&[1f32, 1.], &dev)?)?.to_vec1::<f32>()?, [2., 10.]);
        let inp = Ia3Layer::from_weights(Tensor::new(&[[1f32, 0., -1.]], &dev)?, true)?;
        assert_eq!(inp.merge_weight(&w)?.to_vec2::<f32>()?, [[1., 0., -3.], [4., 0., -6.]]);
        assert_eq!(inp.merge_bias(&Tensor::new(&[1f32, 1.], &dev)?)?.to_vec1::<f32>()?, [1., 1.]);
        Ok(())
    }
}
