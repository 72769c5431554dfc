//! Adapters: the trainable parts attached to a frozen model, and PEFT's on-disk format for them.
//!
//! The set is closed: [`AdapterConfig`] is an enum and `match` is the registry.
//!
//! This module sits below the model ([`crate::linear::AdaptedLinear`] holds a [`LayerAdapter`]); putting adapters
//! on a model, loading and saving a model's adapters and merging them in is [`crate::peft_model`]'s job.

pub mod combine;
pub mod dora;
pub mod ia3;
pub mod lora;
pub mod lowrank_svd;
pub mod peft_format;
pub mod pissa;
pub mod target;
pub mod vocab;

pub use dora::DoraLayer;
pub use ia3::{FeedforwardModules, Ia3Config, Ia3Layer};
pub use lora::{LoraConfig, LoraInit, LoraLayer};
pub use target::{ExcludeModules, LayersPattern, TargetModules};

use candle_core::{DType, Tensor};

/// Errors attaching, loading or saving adapters.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("target_modules: invalid regex: {0}")]
    Regex(#[from] regex::Error),
    #[error("exclude_modules: invalid regex: {0}")]
    ExcludeRegex(regex::Error),
    #[error("target_modules matched no projection of the model (its projections are named like `{example}`)")]
    NoTargets { example: String },
    #[error(
        "exclude_modules excludes every projection that target_modules matches ({excluded} of them): nothing would \
         be adapted"
    )]
    AllExcluded { excluded: usize },
    #[error(
        "layers_to_transform: layer {index} is out of range: the model has {layers} decoder layers (indices 0–{})",
        .layers.saturating_sub(1)
    )]
    LayerOutOfRange { index: usize, layers: usize },
    #[error("{path}: {msg}")]
    Format { path: std::path::PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Init(#[from] pissa::InitError),
    #[error("{module}: the `svd` combination failed: {source}")]
    LowRankSvd { module: String, source: lowrank_svd::LowRankSvdError },
    #[error(
        "adapter.init_lora_weights: {init} rewrites the base weights, and {module} is held in NF4: initialise from \
         a 16/32-bit base (type: lora)"
    )]
    InitOnQuantized { init: &'static str, module: String },
    #[error(
        "adapter.init_lora_weights: PiSSA/OLoRA with use_dora is not supported (PEFT's conversion back to the \
         original base leaves out the magnitude vectors)"
    )]
    InitWithDora,
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

/// The adapter kinds peftkit trains and loads.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum AdapterConfig {
    Lora(LoraConfig),
    Ia3(Ia3Config),
}

impl AdapterConfig {
    /// PEFT's `peft_type`.
    pub fn peft_type(&self) -> &'static str {
        match self {
            AdapterConfig::Lora(_) => "LORA",
            AdapterConfig::Ia3(_) => "IA3",
        }
    }
}

/// The matcher of an adapter's `target_modules`, `layers_to_transform` and `exclude_modules`, for a model of
/// `num_layers` decoder layers (a layer index beyond it is an error, not a silent miss).
pub fn target_matcher(config: &AdapterConfig, num_layers: usize) -> Result<target::TargetMatcher, AdapterError> {
    let (targets, layers, exclude) = match config {
        AdapterConfig::Lora(c) => (&c.target_modules, c.layers_to_transform.as_deref(), c.exclude_modules.as_ref()),
        AdapterConfig::Ia3(c) => (&c.target_modules, None, c.exclude_modules.as_ref()),
    };
    if let Some((_, index)) = layers.and_then(|l| target::layer_out_of_range(l, num_layers)) {
        return Err(AdapterError::LayerOutOfRange { index, layers: num_layers });
    }
    targets.matcher(layers)?.excluding(exclude).map_err(AdapterError::ExcludeRegex)
}

/// The adapter attached to one projection, if any.
#[derive(Debug, Clone)]
pub enum LayerAdapter {
    Lora(LoraLayer),
    Ia3(Ia3Layer),
    /// LoRA with a learned magnitude per output row (PEFT's `use_dora`).
    Dora(DoraLayer),
}

impl LayerAdapter {
    /// Checks that the adapter fits a projection `in_features → out_features`; the error says how it does not.
    pub fn check_fits(&self, out_features: usize, in_features: usize) -> std::result::Result<(), String> {
        match self {
            LayerAdapter::Dora(d) => {
                LayerAdapter::Lora(d.lora.clone()).check_fits(out_features, in_features)?;
                let m = d.magnitude.dims();
                if m != [out_features] {
                    return Err(format!(
                        "lora_magnitude_vector {m:?} does not fit a projection {in_features} → {out_features} \
                         (expected [{out_features}]: one magnitude per output row)"
                    ));
                }
                Ok(())
            }
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

    /// The base weight `w` (out, in) with this adapter folded in, in f32: LoRA gives W + s·B·A, DoRA
    /// diag(m / ‖W + s·B·A‖)·(W + s·B·A).
    /// Merged and unmerged forwards agree (`tests/merge.rs`).
    pub fn merge_weight(&self, w: &Tensor) -> candle_core::Result<Tensor> {
        let w = w.to_dtype(DType::F32)?;
        match self {
            LayerAdapter::Lora(l) => {
                let d = l.delta_weight()?.to_device(w.device())?;
                w + d
            }
            LayerAdapter::Ia3(l) => l.merge_weight(&w),
            LayerAdapter::Dora(d) => d.merge_weight(&w),
        }
    }

    /// The base bias after merging, in f32 (LoRA and DoRA leave it unchanged).
    pub fn merge_bias(&self, b: &Tensor) -> candle_core::Result<Tensor> {
        let b = b.to_dtype(DType::F32)?;
        match self {
            LayerAdapter::Lora(_) | LayerAdapter::Dora(_) => Ok(b),
            LayerAdapter::Ia3(l) => l.merge_bias(&b),
        }
    }
}
