//! `AdaptedLinear`: the one place where a frozen base projection meets an adapter.
//!
//! y = x·Wᵀ (+ bias) + adapter(x). The base weight ([`FrozenWeight`]) never receives a gradient: its product goes
//! through [`crate::ops::frozen_product`], whose backward yields dX only. Each adapter owns its forward: LoRA adds
//! s·(drop(x)·Aᵀ)·Bᵀ ([`crate::adapter::lora::LoraLayer::forward`]); IA3 scales the output or the input
//! feature-wise ([`crate::adapter::ia3::Ia3Layer::forward`]); DoRA rescales the LoRA-adapted product row-wise by
//! a learned magnitude over the row norm ([`crate::adapter::dora::DoraLayer::forward`]).

use crate::ops;
use candle_core::{Result, Tensor};

pub use crate::adapter::LayerAdapter;
pub use crate::weight::FrozenWeight;

/// Per-forward settings that reach every projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardCtx {
    /// `Some(seed)` in training: dropout is active, with masks drawn from this seed and the layer's id.
    pub dropout_seed: Option<u64>,
    /// Inference: adapter weights are used as constants, so no autograd graph is recorded.
    pub no_grad: bool,
}

/// A frozen projection with an optional adapter.
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj` (PEFT's naming).
    pub path: String,
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub adapter: Option<LayerAdapter>,
    pub in_features: usize,
    pub out_features: usize,
    /// A stable number for this projection, mixed into its dropout seed.
    pub id: u64,
}

impl AdaptedLinear {
    pub fn new(path: String, weight: Tensor, bias: Option<Tensor>, id: u64) -> Result<Self> {
        Self::with_weight(path, FrozenWeight::Dense(weight), bias, id)
    }

    pub fn with_weight(path: String, weight: FrozenWeight, bias: Option<Tensor>, id: u64) -> Result<Self> {
        let (out_features, in_features) = weight.dims()?;
        Ok(Self { path, weight, bias, adapter: None, in_features, out_features, id })
    }

    /// x·Wᵀ + b through the frozen weight and bias (gradient to x only).
    pub fn base_forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::frozen_product(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.detach().to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }

    /// x (…, in) → (…, out): the frozen projection, with the adapter's own forward when there is one.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        match &self.adapter {
            None => self.base_forward(x),
            Some(LayerAdapter::Ia3(ia3)) => ia3.forward(x, ctx.no_grad, |x| self.base_forward(x)),
            Some(LayerAdapter::Lora(lora)) => {
                let seed = ctx.dropout_seed.map(|seed| ops::seed_of(&[seed, self.id]));
                lora.forward(&self.weight, self.bias.as_ref(), x, seed, ctx.no_grad)
            }
            Some(LayerAdapter::Dora(dora)) => {
                let seed = ctx.dropout_seed.map(|seed| ops::seed_of(&[seed, self.id]));
                dora.forward(&self.weight, self.bias.as_ref(), x, seed, ctx.no_grad)
            }
        }
    }
}
