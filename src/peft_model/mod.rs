//! A frozen model with adapters attached, as PEFT's `PeftModel` wraps one: attach fresh adapters
//! ([`attach`]), list what trains ([`trainable`]), load and save PEFT folders ([`load_adapter`],
//! [`save_adapter`]), keep several and switch ([`multi`]), fold them into the weights ([`merge_and_unload`]).
//!
//! The adapters themselves — their configs, layer math, merge rule and on-disk names — are in [`crate::adapter`],
//! below the model; this module is above it, and is the only one that walks a [`Llama`]'s projections to put
//! adapters on them. Reference: PEFT `peft_model.py`, `tuners/tuners_utils.py` (`BaseTuner.inject_adapter`).

pub mod multi;
mod pretrained;
pub mod vocab;

pub use pretrained::{load_adapter, save_adapter, save_adapter_residual};

use crate::adapter::{
    pissa, target::ExcludeModules, target_matcher, AdapterConfig, AdapterError, DoraLayer, Ia3Layer, LayerAdapter,
    LoraInit, LoraLayer,
};
use crate::model::Llama;
use candle_core::{DType, Tensor, Var};

/// Attaches fresh adapters to every targeted projection of `model`; returns the number of adapted projections.
/// With PiSSA or OLoRA (`init_lora_weights`) each targeted base weight is replaced by its residual (see
/// [`pissa`]).
pub fn attach(model: &mut Llama, config: &AdapterConfig, seed: u64) -> Result<usize, AdapterError> {
    attach_with_initial(model, config, seed, None)
}

/// [`attach`], taking PiSSA/OLoRA's A₀ and B₀ from `initial` (keyed by their PEFT tensor names, as a checkpoint
/// stores them, [`initial_tensors`]) instead of factorising the base weights: a resumed run gets the residual
/// base of the run it continues, bit for bit.
pub fn attach_with_initial(
    model: &mut Llama,
    config: &AdapterConfig,
    seed: u64,
    initial: Option<&std::collections::HashMap<String, Tensor>>,
) -> Result<usize, AdapterError> {
    let mut rng = crate::adapter::lora::init_rng(seed);
    let mut count = 0;
    let matcher = target_matcher(config, model.config.num_hidden_layers)?;
    let coverage = matcher.coverage(model.linears().map(|l| l.path.as_str()));
    if coverage.adapted == 0 && coverage.excluded > 0 {
        return Err(AdapterError::AllExcluded { excluded: coverage.excluded });
    }
    let exclude = match config {
        AdapterConfig::Lora(c) => c.exclude_modules.as_ref(),
        AdapterConfig::Ia3(c) => c.exclude_modules.as_ref(),
    };
    if let Some(e) = exclude.filter(|e| !e.is_empty() && coverage.excluded == 0) {
        // As PEFT warns: an exclusion that removes nothing is likely a misspelt name.
        let shown = match e {
            ExcludeModules::List(l) => format!("{l:?}"),
            ExcludeModules::Regex(r) => format!("\"{r}\""),
        };
        tracing::warn!("exclude_modules {shown} excluded no targeted projection: check its names");
    }
    match config {
        AdapterConfig::Lora(cfg) => {
            if cfg.use_dora && pissa::rewrites_base(cfg.init) {
                return Err(AdapterError::InitWithDora);
            }
            let device = model.device.clone();
            for lin in model.linears_mut() {
                if !matcher.matches(&lin.path) {
                    continue;
                }
                let (r, alpha) = cfg.rank_alpha(&lin.path);
                let mut layer = LoraLayer::init(
                    lin.in_features,
                    lin.out_features,
                    r,
                    cfg.scaling(r, alpha),
                    cfg.lora_dropout,
                    cfg.init,
                    &mut rng,
                    &device,
                )?;
                if pissa::rewrites_base(cfg.init) {
                    layer = rewrite_base(&lin.path, &mut lin.weight, &layer, cfg.init, initial, &mut rng)?;
                }
                lin.adapter = Some(if cfg.use_dora {
                    // m starts at ‖W + s·B·A‖: the fresh adapter is the identity.
                    LayerAdapter::Dora(DoraLayer::init(layer, &lin.weight)?)
                } else {
                    LayerAdapter::Lora(layer)
                });
                count += 1;
            }
        }
        AdapterConfig::Ia3(cfg) => {
            let device = model.device.clone();
            for lin in model.linears_mut() {
                if !matcher.matches(&lin.path) {
                    continue;
                }
                let feedforward = cfg.feedforward_modules.matches(&lin.path);
                let layer = Ia3Layer::init(
                    lin.in_features,
                    lin.out_features,
                    feedforward,
                    cfg.init_ia3_weights,
                    &mut rng,
                    &device,
                )?;
                lin.adapter = Some(LayerAdapter::Ia3(layer));
                count += 1;
            }
        }
    }
    if count == 0 {
        let example = model.linears().next().map(|l| l.path.clone()).unwrap_or_default();
        return Err(AdapterError::NoTargets { example });
    }
    Ok(count)
}

/// PiSSA/OLoRA for one projection: A₀, B₀ (from `initial` when it holds them, else factorised from the weight)
/// become the adapter's starting values, and the weight its residual W − s·B₀·A₀ in its own dtype and device.
fn rewrite_base(
    path: &str,
    weight: &mut crate::weight::FrozenWeight,
    fresh: &LoraLayer,
    init: LoraInit,
    initial: Option<&std::collections::HashMap<String, Tensor>>,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<LoraLayer, AdapterError> {
    use crate::weight::FrozenWeight;
    if weight.is_nf4() {
        let name = if init == LoraInit::Olora { "olora" } else { "pissa" };
        return Err(AdapterError::InitOnQuantized { init: name, module: path.to_string() });
    }
    let (r, scaling) = (fresh.rank(), fresh.scaling);
    let dtype = match &*weight {
        FrozenWeight::Dense(w) => w.dtype(),
        _ => DType::F32,
    };
    let device = weight.device();
    let w = weight.dense()?; // (out, in) f32 on the CPU
    let key = |m: &str| format!("base_model.model.{}.{m}.weight", path);
    let stored = initial.and_then(|t| Some((t.get(&key("lora_A"))?.clone(), t.get(&key("lora_B"))?.clone())));
    let (start, res) = match stored {
        Some((a, b)) => {
            let start = pissa::InitialAdapter { a: a.to_dtype(DType::F32)?, b: b.to_dtype(DType::F32)? };
            let fits = start.a.dims() == fresh.a.dims() && start.b.dims() == fresh.b.dims();
            if !fits {
                return Err(AdapterError::Format {
                    path: path.to_string().into(),
                    msg: format!(
                        "the checkpoint's initial A {:?} / B {:?} do not fit rank {r}",
                        start.a.dims(),
                        start.b.dims()
                    ),
                });
            }
            let res = pissa::residual_of(&w, &start, scaling)?;
            (start, res)
        }
        None => pissa::init_projection(&w, r, scaling, init, path, rng)?,
    };
    *weight = FrozenWeight::Dense(res.to_dtype(dtype)?.to_device(&device)?);
    let dev = fresh.a.device();
    let mut layer = LoraLayer::from_weights(start.a.to_device(dev)?, start.b.to_device(dev)?, scaling, fresh.dropout)?;
    layer.initial = Some(std::sync::Arc::new(start));
    Ok(layer)
}

/// A₀ and B₀ of every adapter whose initialisation rewrote its base (PiSSA, OLoRA), with the PEFT names of A and B
/// (empty when there are none). A checkpoint stores them beside the adapter, so that a resumed run rebuilds the
/// same residual base ([`attach_with_initial`]).
pub fn initial_tensors(model: &Llama) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for lin in model.linears() {
        if let Some(LayerAdapter::Lora(LoraLayer { initial: Some(i), .. })) = &lin.adapter {
            out.push((format!("base_model.model.{}.lora_A.weight", lin.path), i.a.clone()));
            out.push((format!("base_model.model.{}.lora_B.weight", lin.path), i.b.clone()));
        }
    }
    out
}

/// The trainable variables of the attached adapters, with their PEFT tensor names, in a stable order.
pub fn trainable(model: &Llama) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for lin in model.linears() {
        match &lin.adapter {
            Some(LayerAdapter::Lora(l)) => {
                out.push((format!("base_model.model.{}.lora_A.weight", lin.path), l.a.clone()));
                out.push((format!("base_model.model.{}.lora_B.weight", lin.path), l.b.clone()));
            }
            Some(LayerAdapter::Ia3(l)) => out.push((format!("base_model.model.{}.ia3_l", lin.path), l.l.clone())),
            Some(LayerAdapter::Dora(d)) => {
                out.push((format!("base_model.model.{}.lora_A.weight", lin.path), d.lora.a.clone()));
                out.push((format!("base_model.model.{}.lora_B.weight", lin.path), d.lora.b.clone()));
                out.push((format!("base_model.model.{}.lora_magnitude_vector", lin.path), d.magnitude.clone()));
            }
            None => {}
        }
    }
    // Then the embedding / head copies or rows (`modules_to_save`, `trainable_token_indices`).
    out.extend(model.vocab.trainable());
    out
}

/// Prepares the attached adapters for forwards that never train (generation, evaluation): DoRA's weight norms
/// ‖W + s·B·A‖ are computed once and kept, instead of at every forward (for one generated token that would cost
/// r times the projection itself). The adapter must not be trained afterwards.
pub fn freeze_for_inference(model: &mut Llama) -> candle_core::Result<()> {
    for lin in model.linears_mut() {
        if let Some(LayerAdapter::Dora(d)) = &mut lin.adapter {
            d.freeze_norm(&lin.weight)?;
        }
    }
    Ok(())
}

/// Removes every adapter from `model`.
pub fn detach_all(model: &mut Llama) {
    for lin in model.linears_mut() {
        lin.adapter = None;
    }
    model.vocab = Default::default();
}

/// Folds every attached adapter into its projection's weight (and bias) and removes it, like PEFT's
/// `merge_and_unload()`: the model then computes the same function without adapter overhead. An NF4 weight
/// becomes dense (its dequantized values plus the update).
pub fn merge_and_unload(model: &mut Llama) -> candle_core::Result<()> {
    use crate::weight::FrozenWeight;
    for lin in model.linears_mut() {
        let Some(adapter) = lin.adapter.take() else { continue };
        let w = lin.weight.dense()?;
        let dtype = w.dtype();
        let merged = adapter.merge_weight(&w)?.to_dtype(dtype)?;
        lin.weight = FrozenWeight::Dense(merged);
        if let Some(b) = &lin.bias {
            lin.bias = Some(adapter.merge_bias(b)?.to_dtype(b.dtype())?);
        }
    }
    // A trained embedding / head copy replaces the base matrix; trained rows are written into it.
    vocab::merge(model)
}
