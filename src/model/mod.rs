//! Llama-family models: configuration, weight loading and the forward pass.
//!
//! Weights come from safetensors files (one file or the shards of `model.safetensors.index.json`), read through a
//! memory map one tensor at a time and converted to the compute dtype (f32 on CPU).

pub mod checkpoint;
pub mod config;
pub mod llama;

pub use config::{ConfigError, LayerProjection, ModelConfig, RopeScaling, LAYER_PROJECTIONS};
pub use llama::{Block, KvCache, LayerEnv, Llama};

use crate::linear::{AdaptedLinear, FrozenWeight};
use crate::quant::nf4::{Absmax, Nf4Tensor, QuantError};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{file}: cannot open safetensors file: {source}")]
    Open { file: PathBuf, source: candle_core::Error },
    #[error("tensor `{name}` is missing from {files}")]
    MissingTensor { name: String, files: String },
    #[error("tensor `{name}` in {files} cannot be read: {source}")]
    Tensor { name: String, files: String, source: candle_core::Error },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?} from the model's configuration")]
    Shape { name: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("tensor `{name}` in {files} is stored as {dtype}, but the model needs floating-point weights there")]
    Dtype { name: String, files: String, dtype: String },
    #[error("tensor `{name}` in {files}: {msg}")]
    Quantized { name: String, files: String, msg: String },
    #[error("tensor `{name}`: {source}")]
    Quant { name: String, source: QuantError },
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

/// How the base model's projections are held in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BaseQuant {
    /// Dense, in the compute dtype (pre-quantized checkpoints still load as NF4).
    #[default]
    None,
    /// Quantized to NF4 at load time, one tensor at a time (QLoRA; transformers' `load_in_4bit`). Norms,
    /// embeddings and the output head stay in full precision, as bitsandbytes leaves them.
    Nf4 { double_quant: bool },
    /// For generation: projections and the output head in llama.cpp's block formats, multiplied by candle's
    /// quantized matmul — a GGUF base's own quantized tensors (`to: None`; its dense ones stay dense), or every
    /// projection quantized to `to` as it is read. A row length the format cannot split into blocks falls back to
    /// Q8_0 (32-element blocks), else stays dense, as llama-quantize does.
    Ggml { to: Option<candle_core::quantized::GgmlDType> },
}

/// Reads tensors by name from one or more safetensors files.
pub struct WeightSource {
    st: candle_core::safetensors::MmapedSafetensors,
    files: Vec<PathBuf>,
}

impl WeightSource {
    pub fn open(files: &[PathBuf]) -> Result<Self, ModelError> {
        for f in files {
            if !f.is_file() {
                return Err(ModelError::Open {
                    file: f.clone(),
                    source: candle_core::Error::Msg("no such file".into()),
                });
            }
        }
        // SAFETY: the files are memory-mapped read-only; modifying them while peftkit runs is undefined, as for
        // every memory-mapped safetensors reader.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
            .map_err(|source| ModelError::Open { file: files.first().cloned().unwrap_or_default(), source })?;
        Ok(Self { st, files: files.to_vec() })
    }

    fn files_str(&self) -> String {
        self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    pub fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// Every tensor's name, dtype (safetensors' spelling, e.g. `BF16`) and shape, from the files' headers.
    pub fn headers(&self) -> Vec<(String, String, Vec<usize>)> {
        let mut out: Vec<_> = self
            .st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, format!("{:?}", view.dtype()), view.shape().to_vec()))
            .collect();
        out.sort();
        out
    }

    /// Loads `name` with the expected shape, converted to `dtype` on `device`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, ModelError> {
        if !self.contains(name) {
            return Err(ModelError::MissingTensor { name: name.to_string(), files: self.files_str() });
        }
        let t = self.st.load(name, &Device::Cpu).map_err(|e| ModelError::Tensor {
            name: name.to_string(),
            files: self.files_str(),
            source: e,
        })?;
        if t.dims() != shape {
            return Err(ModelError::Shape { name: name.into(), got: t.dims().to_vec(), expected: shape.to_vec() });
        }
        // An integer tensor would be converted to floats without a word and change every output.
        if !t.dtype().is_float() {
            let dtype = format!("{:?}", t.dtype()).to_uppercase();
            return Err(ModelError::Dtype { name: name.to_string(), files: self.files_str(), dtype });
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    pub fn get_opt(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>, ModelError> {
        if self.contains(name) {
            self.get(name, shape, dtype, device).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Where a model's tensors come from, by their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`):
/// safetensors files ([`WeightSource`]) or a GGUF file ([`crate::gguf`]).
pub trait TensorSource {
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// Loads `name`, checked against the expected shape, converted to `dtype` on `device`.
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, ModelError>;
    /// The files, for messages.
    fn describe(&self) -> String;
    /// A projection weight (`….weight`) that the source holds already quantized (bitsandbytes NF4), checked
    /// against `shape`; `None` when it is stored as an ordinary tensor.
    fn nf4_weight(&self, _name: &str, _shape: &[usize]) -> Result<Option<Nf4Tensor>, ModelError> {
        Ok(None)
    }
    /// A weight the source holds in one of llama.cpp's block formats (a GGUF file's quantized tensor), with rows
    /// in transformers' order, checked against `shape`; `None` when it is stored dense (f32/f16/bf16) or the
    /// source has no such formats.
    fn ggml_weight(
        &self,
        _name: &str,
        _shape: &[usize],
    ) -> Result<Option<candle_core::quantized::QTensor>, ModelError> {
        Ok(None)
    }
}

/// `name` read from `src` in f32 and quantized to `to` for [`BaseQuant::Ggml`] (Q8_0 when the rows do not split
/// into `to`'s blocks; `None` when not even Q8_0's do: the weight stays dense).
fn quantize_ggml(
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
    to: candle_core::quantized::GgmlDType,
) -> Result<Option<candle_core::quantized::QTensor>, ModelError> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let cols = shape.last().copied().unwrap_or(0);
    let to = if cols % to.block_size() == 0 {
        to
    } else if cols % GgmlDType::Q8_0.block_size() == 0 {
        tracing::debug!("{name}: rows of {cols} do not split into {to:?} blocks; Q8_0 instead");
        GgmlDType::Q8_0
    } else {
        return Ok(None);
    };
    let w = src.get(name, shape, DType::F32, &Device::Cpu)?;
    Ok(Some(QTensor::quantize(&w, to)?))
}

impl TensorSource for WeightSource {
    fn contains(&self, name: &str) -> bool {
        WeightSource::contains(self, name)
    }
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, ModelError> {
        WeightSource::get(self, name, shape, dtype, device)
    }
    fn describe(&self) -> String {
        self.files_str()
    }
    fn nf4_weight(&self, name: &str, shape: &[usize]) -> Result<Option<Nf4Tensor>, ModelError> {
        self.bnb_nf4(name, shape)
    }
}

impl WeightSource {
    /// Reads a weight saved by bitsandbytes' `Linear4bit` (what "-bnb-4bit" Hub checkpoints hold): the packed codes
    /// in `name`, and `name.absmax`, `name.quant_map`, `name.nested_absmax`, `name.nested_quant_map` and the
    /// quant-state JSON in `name.quant_state.bitsandbytes__nf4`.
    fn bnb_nf4(&self, name: &str, shape: &[usize]) -> Result<Option<Nf4Tensor>, ModelError> {
        let state_key = format!("{name}.quant_state.bitsandbytes__nf4");
        if !self.contains(&state_key) {
            if self.contains(&format!("{name}.quant_state.bitsandbytes__fp4")) {
                return Err(self.quant_err(name, "is stored in bitsandbytes' FP4 format; only NF4 is supported".into()));
            }
            return Ok(None);
        }
        let load = |key: &str| {
            self.st.load(key, &Device::Cpu).map_err(|e| ModelError::Tensor {
                name: key.to_string(),
                files: self.files_str(),
                source: e,
            })
        };
        let bytes = |key: &str| -> Result<Vec<u8>, ModelError> {
            let t = load(key)?;
            if t.dtype() != DType::U8 {
                return Err(self.quant_err(key, format!("expected u8 data, found {:?}", t.dtype())));
            }
            Ok(t.flatten_all()?.to_vec1::<u8>()?)
        };
        let floats = |key: &str| -> Result<Vec<f32>, ModelError> {
            Ok(load(key)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        let state: serde_json::Value = serde_json::from_slice(&bytes(&state_key)?)
            .map_err(|e| self.quant_err(&state_key, format!("quant state is not JSON: {e}")))?;
        let field =
            |k: &str| state.get(k).ok_or_else(|| self.quant_err(&state_key, format!("quant state has no `{k}`")));
        let quant_type = field("quant_type")?.as_str().unwrap_or_default();
        if quant_type != "nf4" {
            return Err(self.quant_err(&state_key, format!("quant_type `{quant_type}` is not supported (nf4)")));
        }
        let blocksize = field("blocksize")?.as_u64().unwrap_or(0) as usize;
        let stored_shape: Vec<usize> = field("shape")?
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).map(|v| v as usize).collect())
            .unwrap_or_default();
        if stored_shape != shape {
            return Err(ModelError::Shape { name: name.into(), got: stored_shape, expected: shape.to_vec() });
        }
        let absmax_key = format!("{name}.absmax");
        let absmax = if state.get("nested_blocksize").is_some() {
            Absmax::Double {
                q: bytes(&absmax_key)?,
                offset: field("nested_offset")?.as_f64().unwrap_or(0.0) as f32,
                absmax2: floats(&format!("{name}.nested_absmax"))?,
                code: floats(&format!("{name}.nested_quant_map"))?,
                blocksize2: field("nested_blocksize")?.as_u64().unwrap_or(0) as usize,
            }
        } else {
            Absmax::Plain(floats(&absmax_key)?)
        };
        let quant_map = floats(&format!("{name}.quant_map"))?;
        Nf4Tensor::from_bnb_parts(bytes(name)?, absmax, &quant_map, blocksize, shape)
            .map(Some)
            .map_err(|source| ModelError::Quant { name: name.into(), source })
    }

    fn quant_err(&self, name: &str, msg: String) -> ModelError {
        ModelError::Quantized { name: name.into(), files: self.files_str(), msg }
    }
}

/// Loads a Llama-family model from `config.json` and its safetensors weights.
pub fn load_llama(config_path: &Path, weights: &[PathBuf], device: &Device, dtype: DType) -> Result<Llama, ModelError> {
    load_llama_quant(config_path, weights, device, dtype, BaseQuant::None)
}

/// [`load_llama`], with the projections held as `quant` says.
pub fn load_llama_quant(
    config_path: &Path,
    weights: &[PathBuf],
    device: &Device,
    dtype: DType,
    quant: BaseQuant,
) -> Result<Llama, ModelError> {
    let cfg = ModelConfig::from_file(config_path)?;
    let src = WeightSource::open(weights)?;
    assemble_llama(cfg, &src, device, dtype, quant)
}

/// The seven projections of a layer, built by `build` one at a time in [`LAYER_PROJECTIONS`]' order (the order
/// [`Block::linears`] returns them in); the first error stops it.
fn build_projections(
    mut build: impl FnMut(&'static LayerProjection) -> Result<AdaptedLinear, ModelError>,
) -> Result<[AdaptedLinear; 7], ModelError> {
    let [q, k, v, o, gate, up, down] = &LAYER_PROJECTIONS;
    Ok([build(q)?, build(k)?, build(v)?, build(o)?, build(gate)?, build(up)?, build(down)?])
}

/// Builds the model of `cfg` from the tensors of `src`, named as transformers names them. Projections stored
/// pre-quantized load as NF4 whatever `quant` says; `BaseQuant::Nf4` quantizes the others as they are read.
pub fn assemble_llama(
    cfg: ModelConfig,
    src: &dyn TensorSource,
    device: &Device,
    dtype: DType,
    quant: BaseQuant,
) -> Result<Llama, ModelError> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let embed = src.get("model.embed_tokens.weight", &[v, h], dtype, device)?;
    let mut id = 0u64;
    let mut linear = |path: String, out: usize, inp: usize, bias: bool| -> Result<AdaptedLinear, ModelError> {
        let name = format!("{path}.weight");
        let ggml = match quant {
            BaseQuant::Ggml { to: None } => src.ggml_weight(&name, &[out, inp])?,
            BaseQuant::Ggml { to: Some(to) } => quantize_ggml(src, &name, &[out, inp], to)?,
            _ => None,
        };
        let weight = if let Some(q) = src.nf4_weight(&name, &[out, inp])? {
            FrozenWeight::Nf4(Arc::new(q))
        } else if let Some(q) = ggml {
            FrozenWeight::Ggml(Arc::new(q))
        } else if let BaseQuant::Nf4 { double_quant } = quant {
            // Read in f32 and quantized at once: the full-precision projection lives only for this call.
            let w = src.get(&name, &[out, inp], DType::F32, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let q = Nf4Tensor::quantize(&w, &[out, inp], double_quant)
                .map_err(|source| ModelError::Quant { name: name.clone(), source })?;
            FrozenWeight::Nf4(Arc::new(q))
        } else {
            FrozenWeight::Dense(src.get(&name, &[out, inp], dtype, device)?)
        };
        // NF4 is built on the CPU (quantized or read there, one projection at a time); on a GPU its codes and
        // scales are uploaded, never a dequantized copy.
        let weight = if weight.is_nf4() && !device.is_cpu() {
            weight.to_device(device).map_err(|e| ModelError::Quantized {
                name: name.clone(),
                files: src.describe(),
                msg: e.to_string(),
            })?
        } else {
            weight
        };
        let b = if bias { Some(src.get(&format!("{path}.bias"), &[out], dtype, device)?) } else { None };
        id += 1;
        Ok(AdaptedLinear::with_weight(path, weight, b, id)?)
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] = build_projections(|proj| {
            let (out, inp) = cfg.projection_shape(proj); // weight (out, in)
            linear(format!("{p}.{}", proj.name), out, inp, cfg.projection_bias(proj))
        })?;
        layers.push(Block {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            gate_proj,
            up_proj,
            down_proj,
            input_layernorm: src.get(&format!("{p}.input_layernorm.weight"), &[h], dtype, device)?,
            post_attention_layernorm: src.get(&format!("{p}.post_attention_layernorm.weight"), &[h], dtype, device)?,
        });
    }
    let norm = src.get("model.norm.weight", &[h], dtype, device)?;
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else if src.contains("lm_head.weight") {
        src.get("lm_head.weight", &[v, h], dtype, device)?
    } else {
        return Err(ModelError::MissingTensor {
            name: "lm_head.weight (tie_word_embeddings is false)".into(),
            files: src.describe(),
        });
    };
    let head_name = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    let head_q = match quant {
        BaseQuant::Ggml { to: None } => src.ggml_weight(head_name, &[v, h])?,
        BaseQuant::Ggml { to: Some(to) } => quantize_ggml(src, head_name, &[v, h], to)?,
        _ => None,
    };
    let mut model = Llama::new(cfg, embed, layers, norm, lm_head);
    model.lm_head_q = head_q.map(Arc::new);
    Ok(model)
}

/// A model of `config`'s shape with random weights (N(0, 0.02²) projections and embeddings, unit norms), for
/// benchmarks: speed and memory do not depend on the values. On the CPU the values are a pure function of `seed`;
/// on a GPU they are drawn there by candle's generator.
pub fn random_llama(config: ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<Llama, ModelError> {
    use rand::SeedableRng;
    let mut id = 0u64;
    let mut next = |shape: &[usize]| -> Result<Tensor, ModelError> {
        id += 1;
        if device.is_cuda() {
            // Drawn on the GPU (an 8B model's worth of host draws would take minutes). Not the CPU's values.
            return Ok(Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?);
        }
        let n: usize = shape.iter().product();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let v: Vec<f32> = (0..n).map(|_| (crate::adapter::lora::normal(&mut rng) * 0.02) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
    };
    let (h, v) = (config.hidden_size, config.vocab_size);
    let ones = |n: usize| Tensor::ones(n, dtype, device);
    let embed = next(&[v, h])?;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    let mut lid = 0u64;
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] = build_projections(|proj| {
            let (out, inp) = config.projection_shape(proj); // weight (out, in)
            lid += 1;
            Ok(AdaptedLinear::new(format!("{p}.{}", proj.name), next(&[out, inp])?, None, lid)?)
        })?;
        layers.push(Block {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            gate_proj,
            up_proj,
            down_proj,
            input_layernorm: ones(h)?,
            post_attention_layernorm: ones(h)?,
        });
    }
    let lm_head = if config.tie_word_embeddings { embed.clone() } else { next(&[v, h])? };
    Ok(Llama::new(config, embed, layers, ones(h)?, lm_head))
}
