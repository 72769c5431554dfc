//! `AdaptedLinear`: the one place where a frozen base projection meets an adapter.
//!
//! y = x·Wᵀ (+ bias) + adapter(x). The base weight never receives a gradient: its product goes through
//! [`crate::ops::frozen_matmul`], whose backward yields dX only. LoRA adds s·(drop(x)·Aᵀ)·Bᵀ
//! (see [`crate::adapter::lora`]); IA3 scales the output or the input feature-wise (see [`crate::adapter::ia3`]).

use crate::adapter::ia3::Ia3Layer;
use crate::adapter::lora::LoraLayer;
use crate::ops;
use crate::quant::nf4::Nf4Tensor;
use candle_core::{DType, Device, Result, Tensor};
use std::cell::RefCell;
use std::sync::Arc;

/// The frozen base weight of a projection.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// A dense (out, in) matrix in the compute dtype.
    Dense(Tensor),
    /// An (out, in) matrix in NF4, as bitsandbytes stores it (QLoRA). It is dequantized on the fly, one
    /// projection at a time, into a reused buffer: the full-precision weight is never kept.
    Nf4(Arc<Nf4Tensor>),
}

thread_local! {
    /// The dequantization buffer of this thread, grown to the largest NF4 weight it has seen.
    static DEQUANT_BUFFER: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl FrozenWeight {
    /// (out, in)
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(w) => w.dims2(),
            FrozenWeight::Nf4(q) => match q.shape() {
                [out, inp] => Ok((*out, *inp)),
                s => candle_core::bail!("NF4 weight of shape {s:?} is not a matrix"),
            },
        }
    }

    /// The weight as a dense (out, in) f32 tensor (dequantized for NF4).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(w.clone()),
            FrozenWeight::Nf4(q) => Tensor::from_vec(q.dequantize(), q.shape(), &Device::Cpu),
        }
    }

    /// Runs `f` on the weight as contiguous row-major f32 data (out × in): the tensor's own data for a dense
    /// weight, the thread's dequantization buffer for an NF4 one.
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        match self {
            FrozenWeight::Dense(w) => ops::with_f32(w, f),
            FrozenWeight::Nf4(q) => DEQUANT_BUFFER.with(|cell| {
                // Taken out of the cell, so that a nested call (none today) would get its own buffer.
                let mut buf = cell.take();
                buf.resize(q.n(), 0.0);
                let r = q.dequantize_into(&mut buf).map(|()| f(&buf));
                cell.replace(buf);
                r.map_err(|e| candle_core::Error::Msg(e.to_string()))
            }),
        }
    }

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Nf4(q) => q.bytes(),
        }
    }
}

/// The adapter attached to one projection, if any.
#[derive(Debug, Clone)]
pub enum LayerAdapter {
    Lora(LoraLayer),
    Ia3(Ia3Layer),
}

impl LayerAdapter {
    /// Checks that the adapter fits a projection `in_features → out_features`; the error says how it does not.
    pub fn check_fits(&self, out_features: usize, in_features: usize) -> std::result::Result<(), String> {
        match self {
            LayerAdapter::Lora(l) => {
                let (a, b) = (l.a.dims(), l.b.dims());
                if a[1] != in_features || b[0] != out_features {
                    return Err(format!(
                        "lora_A {a:?} / lora_B {b:?} do not fit a projection {in_features} → {out_features} \
                         (expected (r, {in_features}) and ({out_features}, r))"
                    ));
                }
                Ok(())
            }
            LayerAdapter::Ia3(l) => {
                let want = l.shape_for(in_features, out_features);
                if l.l.dims() != want {
                    return Err(format!(
                        "ia3_l {:?} does not fit a projection {in_features} → {out_features} (expected {want:?}: \
                         {} scaling)",
                        l.l.dims(),
                        if l.feedforward { "a feedforward module, input" } else { "output" }
                    ));
                }
                Ok(())
            }
        }
    }

    /// The base weight `w` (out, in) with this adapter folded in, in f32: LoRA gives W + s·B·A.
    /// Merged and unmerged forwards agree (`tests/merge.rs`).
    pub fn merge_weight(&self, w: &Tensor) -> Result<Tensor> {
        let w = w.to_dtype(DType::F32)?;
        match self {
            LayerAdapter::Lora(l) => {
                let d = l.delta_weight()?.to_device(w.device())?;
                w + d
            }
            LayerAdapter::Ia3(l) => l.merge_weight(&w),
        }
    }

    /// The base bias after merging, in f32 (LoRA leaves it unchanged).
    pub fn merge_bias(&self, b: &Tensor) -> Result<Tensor> {
        let b = b.to_dtype(DType::F32)?;
        match self {
            LayerAdapter::Lora(_) => Ok(b),
            LayerAdapter::Ia3(l) => l.merge_bias(&b),
        }
    }
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
        Self::with_weight(path, FrozenWeight::Dense(weight), bias, id)
    }

    pub fn with_weight(path: String, weight: FrozenWeight, bias: Option<Tensor>, id: u64) -> Result<Self> {
        let (out_features, in_features) = weight.dims()?;
        Ok(Self { path, weight, bias, adapter: None, in_features, out_features, id })
    }

    /// x·Wᵀ through the frozen weight (gradient to x only).
    fn base_product(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => ops::frozen_matmul(x, w),
            FrozenWeight::Nf4(q) => ops::nf4_matmul(x, q),
        }
    }

    /// x (…, in) → (…, out)
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        match &self.adapter {
            None => {
                let y = self.base_product(x)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(&b.detach()),
                    None => Ok(y),
                }
            }
            Some(LayerAdapter::Ia3(ia3)) => {
                let l = ia3.vector(ctx.no_grad)?.to_dtype(x.dtype())?;
                if ia3.feedforward {
                    // (x ⊙ l)·Wᵀ + b: the gradient reaches l through the frozen product's dX.
                    let y = self.base_product(&x.broadcast_mul(&l)?)?;
                    match &self.bias {
                        Some(b) => y.broadcast_add(&b.detach()),
                        None => Ok(y),
                    }
                } else {
                    // (x·Wᵀ + b) ⊙ l
                    let mut y = self.base_product(x)?;
                    if let Some(b) = &self.bias {
                        y = y.broadcast_add(&b.detach())?;
                    }
                    y.broadcast_mul(&l)
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
                    let op = ops::LoraLinearOp {
                        w: self.weight.clone(),
                        bias: self.bias.clone(),
                        scaling: lora.scaling as f32,
                        dropout,
                    };
                    return ops::lora_linear(x, &a, &b, op);
                }
                // Composed form for other devices.
                let mut y = self.base_product(x)?;
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
