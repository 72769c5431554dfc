//! `AdaptedLinear`: the one place where a frozen base projection meets an adapter.
//!
//! y = x·Wᵀ (+ bias) + adapter(x). The base weight never receives a gradient: its product goes through
//! [`crate::ops::frozen_matmul`], whose backward yields dX only. LoRA adds s·(drop(x)·Aᵀ)·Bᵀ
//! (see [`crate::adapter::lora`]); IA3 scales the output or the input feature-wise (see [`crate::adapter::ia3`]).

use crate::adapter::lora::LoraLayer;
use crate::ops;
use candle_core::{Result, Tensor};

/// The frozen base weight of a projection.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// A dense (out, in) matrix in the compute dtype.
    Dense(Tensor),
}

impl FrozenWeight {
    /// The weight as a dense (out, in) tensor.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(w.clone()),
        }
    }
}

/// The adapter attached to one projection, if any.
#[derive(Debug, Clone)]
pub enum LayerAdapter {
    Lora(LoraLayer),
}

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
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self { path, weight: FrozenWeight::Dense(weight), bias, adapter: None, in_features, out_features, id })
    }

    /// x (…, in) → (…, out)
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut y = match &self.weight {
            FrozenWeight::Dense(w) => ops::frozen_matmul(x, w)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.detach())?;
        }
        match &self.adapter {
            None => Ok(y),
            Some(LayerAdapter::Lora(lora)) => {
                let dims = x.dims();
                let m = x.elem_count() / self.in_features;
                let x2 = x.reshape((m, self.in_features))?; // (m, in)
                let x2 = match ctx.dropout_seed {
                    Some(seed) if lora.dropout > 0.0 => ops::dropout(&x2, lora.dropout, ops::seed_of(&[seed, self.id]))?,
                    _ => x2,
                };
                let mut out_dims = dims.to_vec();
                if let Some(last) = out_dims.last_mut() {
                    *last = self.out_features;
                }
                let delta = if ctx.no_grad { lora.delta_detached(&x2)? } else { lora.delta(&x2)? };
                y + delta.reshape(out_dims)?
            }
        }
    }
}
