//! Activation checkpointing per decoder layer (transformers' `gradient_checkpointing=True`; Chen et al. 2016,
//! "Training Deep Nets with Sublinear Memory Cost").
//!
//! Forward: the layer runs without an autograd graph on its detached input h_l, and only its output h_{l+1} is
//! recorded, as the result of one custom op whose inputs are h_l and θ_l, the layer's adapter variables flattened
//! and concatenated. Backward: given g = ∂L/∂h_{l+1}, the op recomputes the layer with a graph from a fresh leaf
//! copy of h_l and back-propagates g through it, which yields ∂L/∂h_l and ∂L/∂θ_l = Σ ∂L/∂h_{l+1} · ∂h_{l+1}/∂θ_l.
//! Memory kept per layer: h_l and h_{l+1} (b·t·hidden f32 each) instead of every intermediate (the b·h·t²
//! attention tensors, the b·t·intermediate MLP activations); compute: one more layer forward per layer.
//!
//! Why θ_l is an input of the op: candle's `CustomOp*::bwd` returns gradients for the op's inputs only, and a
//! layer has up to 14 adapter variables while candle offers CustomOp1/2/3. Concatenating the variables into one
//! tracked tensor makes them the op's second input, so candle's own backward splits ∂L/∂θ_l back onto each
//! variable (the `cat`/`flatten` backward) and the trainer's `GradStore` holds every gradient as without
//! checkpointing — no side channel, nothing for the optimizer step to merge. It also records the op for layer 0,
//! whose input (the frozen embedding) tracks nothing; there the recomputation skips ∂L/∂h_0.
//!
//! Device-generic: the output is computed with ordinary candle ops outside the op and attached by
//! [`crate::ops::graft`] (the same mechanism the chunked attention uses), whose forward only copies that
//! precomputed storage (taken out of the op, so it is not kept twice). The backward seeds the
//! recomputed graph with g through a second small op ([`SeedGrad`]) whose backward returns g itself, so no
//! `(y ⊙ g).sum()` is formed. Dropout masks are pure functions of (seed, projection, element), so the
//! recomputation draws the forward's masks and the gradients equal those of the plain forward.

use super::llama::{Block, LayerEnv};
use crate::linear::ForwardCtx;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, Var};

/// One decoder layer with activation checkpointing: h (b, t, hidden) f32 → h' (b, t, hidden) f32, the same values
/// as [`Block::forward`], with the layer's intermediates recomputed in the backward pass instead of kept.
pub fn checkpointed_block(block: &Block, h: &Tensor, env: &LayerEnv, ctx: &ForwardCtx) -> Result<Tensor> {
    let vars = block.trainable_vars();
    let input_grad = h.track_op();
    let no_grad = ForwardCtx { no_grad: true, ..*ctx };
    if vars.is_empty() && !input_grad {
        // Nothing upstream or inside needs a gradient: a plain forward records no graph anyway.
        return block.forward(h, env, &no_grad, None);
    }
    // (b, t, hidden), computed without a graph: the adapters' variables are used detached, h is detached.
    let out = block.forward(&h.detach(), env, &no_grad, None)?;
    // θ: (Σ numel,) f32 — the adapter variables are f32 (Compute::PARAM_DTYPE) whatever the compute dtype.
    let params = if vars.is_empty() {
        Tensor::zeros(1, DType::F32, h.device())?
    } else {
        let flat = vars.iter().map(|v| v.as_tensor().flatten_all()).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)?
    };
    if out.dims() != h.dims() {
        candle_core::bail!("checkpoint: layer output {:?} differs from its input {:?}", out.dims(), h.dims());
    }
    let (block, env) = (block.clone(), env.clone());
    // The recomputation runs with the training forward's settings (dropout seed) and a graph.
    let ctx = ForwardCtx { no_grad: false, ..*ctx };
    crate::ops::graft::graft2(h, &params, out, "checkpointed-block", move |h, _params, _out, grad| {
        recompute_backward(&block, &env, &ctx, &vars, input_grad, h, grad)
    })
}

/// The backward of one checkpointed layer: recompute it with a graph from h_l and back-propagate `grad` through
/// it. Returns dh_l (`None` for layer 0, whose input is the frozen embedding) and dθ_l flattened in `vars`' order.
fn recompute_backward(
    block: &Block,
    env: &LayerEnv,
    ctx: &ForwardCtx,
    vars: &[Var],
    input_grad: bool,
    h: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    // A fresh leaf for h_l (a copy: candle's variables own their storage), or a constant for layer 0.
    let x = if input_grad { Var::from_tensor(&h.detach())?.into_inner() } else { h.detach() };
    // (b, t, hidden), recomputed with a graph from x and the adapter variables.
    let y = block.forward(&x, env, ctx, None)?;
    let grads = y.apply_op1(SeedGrad { grad: grad.detach() })?.backward()?;
    let dx = match input_grad {
        true => Some(grads.get(&x).cloned().map_or_else(|| x.zeros_like(), Ok)?),
        false => None,
    };
    if vars.is_empty() {
        return Ok((dx, None));
    }
    // (Σ numel,) in θ's order; a variable the graph did not reach gets zeros.
    let flat = vars
        .iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => g.flatten_all(),
            None => Tensor::zeros(v.elem_count(), v.dtype(), v.device()),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((dx, Some(Tensor::cat(&flat, 0)?)))
}

/// A scalar "loss" whose gradient with respect to its input y is `grad`: `seed(y).backward()` back-propagates a
/// given ∂L/∂y through y's graph.
struct SeedGrad {
    /// ∂L/∂y, y's shape.
    grad: Tensor,
}

fn scalar_zero<D: BackendDevice>(device: &D, dtype: DType) -> Result<(D::Storage, Shape)> {
    Ok((device.zeros_impl(&Shape::from(()), dtype)?, Shape::from(())))
}

impl CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "seed-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        scalar_zero(s.device(), s.dtype())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, _l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        scalar_zero(s.device(), s.dtype())
    }

    fn bwd(&self, y: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        if self.grad.dims() != y.dims() {
            candle_core::bail!("checkpoint: gradient {:?} for an output of {:?}", self.grad.dims(), y.dims());
        }
        Ok(Some(self.grad.to_dtype(y.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use crate::adapter::{AdapterConfig, Ia3Config, LoraConfig, LoraInit, TargetModules};
    use crate::linear::ForwardCtx;
    use crate::model::{load_llama_quant, BaseQuant, Llama};
    use crate::peft_model;
    use candle_core::{DType, Device, Tensor};
    use std::path::Path;

    fn tiny(name: &str, dtype: DType, quant: BaseQuant) -> Llama {
        tiny_on(name, dtype, quant, &Device::Cpu)
    }

    fn tiny_on(name: &str, dtype: DType, quant: BaseQuant, device: &Device) -> Llama {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        load_llama_quant(&dir.join("config.json"), &[dir.join("model.safetensors")], device, dtype, quant).unwrap()
    }

    fn lora(dropout: f64, layers: Option<Vec<usize>>) -> AdapterConfig {
        AdapterConfig::Lora(LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: dropout,
            target_modules: TargetModules::AllLinear,
            use_rslora: false,
            // A and B both random: every gradient is non-zero from the first step.
            init: LoraInit::Random,
            layers_to_transform: layers,
            exclude_modules: None,
            layers_pattern: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            use_dora: false,
        })
    }

    /// Loss and the gradient of every adapter variable (in `peft_model::trainable` order) for one training forward
    /// with dropout active, with or without checkpointing.
    /// Also the number of activation-sized nodes ((b, t, …) or (b·t, …)) of the loss's autograd graph.
    fn loss_and_grads(model: &Llama, checkpointing: bool) -> (f32, Vec<Tensor>, usize) {
        let mut m = model.clone();
        m.gradient_checkpointing = checkpointing;
        let (b, t) = (2, 11);
        let ids: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 5) % 300 + 3) as u32).collect();
        let labels: Vec<i32> =
            ids.iter().enumerate().map(|(i, &id)| if i % t < 3 { -100 } else { id as i32 }).collect();
        let ids = Tensor::from_vec(ids, (b, t), &m.device).unwrap();
        let ctx = ForwardCtx { dropout_seed: Some(1234), no_grad: false };
        let hidden = m.forward_hidden(&ids, &ctx, None).unwrap();
        let denom = Llama::count_targets(&labels, b, t) as f64;
        let loss = m.loss(&hidden, &labels, denom).unwrap();
        let activation = |d: &[usize]| d.first() == Some(&(b * t)) || d.starts_with(&[b, t]);
        let nodes = loss.sorted_nodes().iter().filter(|n| activation(n.dims())).count();
        let store = loss.backward().unwrap();
        let grads = peft_model::trainable(&m)
            .iter()
            .map(|(name, v)| store.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")).clone())
            .collect();
        (loss.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap(), grads, nodes)
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Checkpointed vs plain: |Δloss| / |loss| and, per variable, max|Δg| / max|g| at most `tol`; every gradient
    /// non-zero; the checkpointed graph holds far fewer activations (one per layer instead of the layer's
    /// intermediates).
    /// (On the machine this was written on the two agree bit for bit, in f32 and in bf16: the recomputation runs
    /// the same deterministic kernels on the same values.)
    fn check(model: &Llama, tol: f32) {
        let (loss, grads, nodes) = loss_and_grads(model, false);
        let (loss_c, grads_c, nodes_c) = loss_and_grads(model, true);
        assert!(nodes_c * 4 < nodes, "graph of {nodes_c} activations with checkpointing, {nodes} without");
        assert!(loss.is_finite() && loss > 0.0);
        assert!((loss - loss_c).abs() <= tol * loss.abs(), "loss {loss} vs checkpointed {loss_c}");
        assert_eq!(grads.len(), grads_c.len());
        assert!(!grads.is_empty());
        let names: Vec<String> = peft_model::trainable(model).into_iter().map(|(n, _)| n).collect();
        for ((g, gc), name) in grads.iter().zip(&grads_c).zip(&names) {
            let scale = max_abs(g);
            assert!(scale > 0.0, "{name}: zero gradient");
            let diff = max_abs(&(g - gc).unwrap());
            assert!(diff <= tol * scale, "{name}: gradients differ by {diff} (scale {scale})");
        }
    }

    #[test]
    fn checkpointing_gives_the_same_lora_gradients_with_dropout() {
        let mut m = tiny("tiny-llama", DType::F32, BaseQuant::None);
        peft_model::attach(&mut m, &lora(0.1, None), 3).unwrap();
        check(&m, 1e-6);
    }

    #[test]
    fn checkpointing_gives_the_same_dora_gradients_with_dropout() {
        // DoRA on Qwen2 (biases): A, B and the magnitudes all reach the checkpointed layer's parameter vector.
        let mut m = tiny("tiny-qwen2", DType::F32, BaseQuant::None);
        let AdapterConfig::Lora(l) = lora(0.1, None) else { unreachable!() };
        peft_model::attach(&mut m, &AdapterConfig::Lora(LoraConfig { use_dora: true, ..l }), 3).unwrap();
        assert_eq!(peft_model::trainable(&m).len(), 3 * 14);
        check(&m, 1e-6);
    }

    #[test]
    fn checkpointing_gives_the_same_ia3_gradients() {
        // Qwen2: q/k/v biases; random IA3 vectors (not the identity) on every projection, down_proj input-scaled.
        let mut m = tiny("tiny-qwen2", DType::F32, BaseQuant::None);
        let cfg = Ia3Config { target_modules: TargetModules::AllLinear, init_ia3_weights: false, ..Default::default() };
        peft_model::attach(&mut m, &AdapterConfig::Ia3(cfg), 5).unwrap();
        check(&m, 1e-6);
    }

    #[test]
    fn checkpointing_with_adapters_on_some_layers_only() {
        // Layer 0 without adapters (its input needs no gradient), then layer 1 with them; and the reverse, where
        // layer 1 has no variables but must pass the gradient on to layer 0.
        for layers in [vec![1], vec![0]] {
            let mut m = tiny("tiny-llama", DType::F32, BaseQuant::None);
            peft_model::attach(&mut m, &lora(0.1, Some(layers)), 3).unwrap();
            check(&m, 1e-6);
        }
    }

    #[test]
    fn checkpointing_with_an_nf4_base_and_in_bf16() {
        let mut m = tiny("tiny-llama", DType::F32, BaseQuant::Nf4 { double_quant: true });
        peft_model::attach(&mut m, &lora(0.1, None), 3).unwrap();
        check(&m, 1e-6);
        // Mixed precision: bf16 activations, f32 residual stream and adapters.
        let mut m = tiny("tiny-llama", DType::BF16, BaseQuant::None);
        peft_model::attach(&mut m, &lora(0.1, None), 3).unwrap();
        check(&m, 1e-3);
    }

    #[test]
    fn checkpointing_on_the_gpu() {
        // The op's cuda_fwd and the recomputation on CUDA storage (skipped without a GPU; see compute::test_gpu).
        let Some(gpu) = crate::compute::test_gpu("checkpointing_on_the_gpu") else { return };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let mut m = tiny_on("tiny-llama", dtype, BaseQuant::None, &gpu);
            peft_model::attach(&mut m, &lora(0.1, None), 3).unwrap();
            check(&m, tol);
        }
    }

    #[test]
    fn inference_forwards_ignore_checkpointing() {
        let mut m = tiny("tiny-llama", DType::F32, BaseQuant::None);
        peft_model::attach(&mut m, &lora(0.0, None), 3).unwrap();
        let ids = Tensor::new(&[[5u32, 9, 13, 200]], &Device::Cpu).unwrap();
        let plain = m.forward(&ids).unwrap();
        m.gradient_checkpointing = true;
        let with = m.forward(&ids).unwrap();
        assert_eq!(max_abs(&(plain - with).unwrap()), 0.0);
    }
}
