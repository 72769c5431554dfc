//! `AdaptedLinear`: the one place where a frozen base projection meets an adapter.
//!
//! y = x·Wᵀ (+ bias) + adapter(x). The base weight never receives a gradient: its product goes through
//! [`crate::ops::frozen_matmul`], whose backward yields dX only. LoRA adds s·(drop(x)·Aᵀ)·Bᵀ
//! (see [`crate::adapter::lora`]); IA3 scales the output or the input feature-wise (see [`crate::adapter::ia3`]).

use crate::adapter::lora::LoraLayer;
use crate::ops;
use candle_core::{DType, Result, Tensor};

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
        let FrozenWeight::Dense(w) = &self.weight;
        match &self.adapter {
            None => {
                let y = ops::frozen_matmul(x, w)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(&b.detach()),
                    None => Ok(y),
                }
            }
            Some(LayerAdapter::Lora(lora)) => {
                let dropout = match ctx.dropout_seed {
                    Some(seed) if lora.dropout > 0.0 => Some((lora.dropout, ops::seed_of(&[seed, self.id]))),
                    _ => None,
                };
                let (a, b) = if ctx.no_grad {
                    (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
                } else {
                    (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
                };
                if x.device().is_cpu() && x.dtype() == DType::F32 {
                    // One fused op: base product, bias and LoRA update.
                    let op = ops::LoraLinearOp { w: w.clone(), bias: self.bias.clone(), scaling: lora.scaling as f32, dropout };
                    return ops::lora_linear(x, &a, &b, op);
                }
                // Composed form for other devices.
                let mut y = ops::frozen_matmul(x, w)?;
                if let Some(bias) = &self.bias {
                    y = y.broadcast_add(&bias.detach())?;
                }
                let m = x.elem_count() / self.in_features;
                let x2 = x.reshape((m, self.in_features))?; // (m, in)
                let x2 = match dropout {
                    Some((p, seed)) => ops::dropout(&x2, p, seed)?,
                    None => x2,
                };
                // (m, in)·(in, r)·(r, out) → (m, out)
                let delta = (x2.matmul(&a.t()?)?.matmul(&b.t()?)? * lora.scaling)?;
                let shape = y.shape().clone();
                y + delta.reshape(shape)?
            }
        }
    }
}
