//! GGUF base models: llama.cpp's single-file format, the way most small models are shared.
//!
//! A GGUF file is turned into exactly the model transformers would load from the original Hugging Face checkpoint,
//! so that adapters, the PEFT format and merging never see a difference:
//! - the configuration comes from the `{arch}.*` metadata (and is kept as an HF-style `config.json` value);
//! - every tensor is dequantized to the compute dtype and renamed to its transformers name;
//! - the rows of the Q and K projections are permuted back from llama.cpp's rotary layout (which pairs dimensions
//!   `2i, 2i+1` of each head) to transformers' (which pairs `i, i + d/2`); Qwen2 files are not permuted by llama.cpp;
//! - the tokenizer is rebuilt from `tokenizer.ggml.*` as a `tokenizers::Tokenizer` (byte-level BPE with the
//!   pre-tokenizer named by `tokenizer.ggml.pre`, or SentencePiece-style BPE with byte fallback);
//! - the chat template is `tokenizer.chat_template`.

use crate::model::{self, LayerProjection, Llama, ModelConfig, ModelError, TensorSource};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokenizers::Tokenizer;

/// Errors reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot open: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a readable GGUF file: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: metadata `{key}`: {msg}")]
    Metadata { path: PathBuf, key: String, msg: String },
    #[error("{path}: cannot build the tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Model { path: PathBuf, source: ModelError },
}

/// Everything a GGUF file provides.
pub struct GgufModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// `tokenizer.ggml.padding_token_id`, when present.
    pub pad_token_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` / `eom_token_id` (end of turn / of message), when present.
    pub eot_token_id: Option<u32>,
    pub eom_token_id: Option<u32>,
    /// `general.name`, when present.
    pub name: Option<String>,
}

/// The parsed header of a GGUF file: metadata and tensor directory (no tensor data).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let mut f = std::fs::File::open(path).map_err(|source| GgufError::Open { path: path.into(), source })?;
        let content = Content::read(&mut f).map_err(|e| GgufError::Format { path: path.into(), msg: e.to_string() })?;
        Ok(Self { path: path.into(), content })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta_err(&self, key: &str, msg: impl Into<String>) -> GgufError {
        GgufError::Metadata { path: self.path.clone(), key: key.into(), msg: msg.into() }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.meta_err(key, format!("expected a string, found {:?}", v.value_type()))),
        }
    }

    /// Any integer value as u64.
    pub fn uint(&self, key: &str) -> Result<Option<u64>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I64(x) => *x as i128,
            Value::Array(_) => {
                return Err(self.meta_err(key, "per-layer values are not supported (the model must be uniform)"))
            }
            other => return Err(self.meta_err(key, format!("expected an integer, found {:?}", other.value_type()))),
        };
        u64::try_from(n).map(Some).map_err(|_| self.meta_err(key, format!("{n} is negative")))
    }

    pub fn required_uint(&self, key: &str) -> Result<u64, GgufError> {
        self.uint(key)?.ok_or_else(|| self.meta_err(key, "missing"))
    }

    /// A float value, written as the shortest decimal that reads back to the stored f32 (so `9.99999974e-6`
    /// stored for `1e-5` gives `1e-5`, as the original config said).
    pub fn float(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(*x as f64))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => self.uint(key).map(|v| v.map(|v| v as f64)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.meta_err(key, format!("expected a bool, found {:?}", v.value_type()))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&Vec<Value>>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.meta_err(key, format!("expected an array, found {:?}", v.value_type()))),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, GgufError> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(self.meta_err(key, format!("expected strings, found {:?}", other.value_type()))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn numbers(&self, key: &str) -> Result<Option<Vec<f64>>, GgufError> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x as f64),
                Value::F64(x) => Ok(*x),
                Value::I32(x) => Ok(*x as f64),
                Value::U32(x) => Ok(*x as f64),
                Value::I8(x) => Ok(*x as f64),
                Value::U8(x) => Ok(*x as f64),
                Value::I64(x) => Ok(*x as f64),
                Value::U64(x) => Ok(*x as f64),
                other => Err(self.meta_err(key, format!("expected numbers, found {:?}", other.value_type()))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String, GgufError> {
        self.string("general.architecture")?.ok_or_else(|| self.meta_err("general.architecture", "missing"))
    }

    /// The tensor directory: name, shape (candle's order, outermost first) and type, in the file's order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, candle_core::quantized::GgmlDType)> {
        let mut t: Vec<_> = self.content.tensor_infos.iter().collect();
        t.sort_by_key(|(_, info)| info.offset);
        t.into_iter().map(|(n, info)| (n.clone(), info.shape.dims().to_vec(), info.ggml_dtype)).collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The stored type of the tensor `name` (llama.cpp's name), if the file has it.
    pub fn tensor_type(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|t| t.ggml_dtype)
    }

    /// Every metadata key and value (in no particular order).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Reads and dequantizes one tensor to f32 on the CPU, in candle's (row-major, outermost first) shape.
    fn read_f32(&self, name: &str) -> Result<Tensor, ModelError> {
        let tensor_err = |msg: String| ModelError::Tensor {
            name: name.to_string(),
            files: self.path.display().to_string(),
            source: candle_core::Error::Msg(msg),
        };
        let mut f = std::fs::File::open(&self.path).map_err(|e| tensor_err(e.to_string()))?;
        let q = self.content.tensor(&mut f, name, &Device::Cpu).map_err(|e| tensor_err(e.to_string()))?;
        q.dequantize(&Device::Cpu).map_err(|e| tensor_err(e.to_string()))
    }

    /// The Hugging Face `config.json` equivalent of the metadata.
    pub fn config(&self) -> Result<ModelConfig, GgufError> {
        let arch = self.architecture()?;
        let model_type = match arch.as_str() {
            "llama" => "llama",
            "qwen2" => "qwen2",
            other => {
                return Err(self.meta_err(
                    "general.architecture",
                    format!(
                    "`{other}` is not supported (supported: llama, which covers Llama 2/3, Mistral and SmolLM; qwen2)"
                ),
                ))
            }
        };
        let k = |name: &str| format!("{arch}.{name}");
        let hidden = self.required_uint(&k("embedding_length"))?;
        let heads = self.required_uint(&k("attention.head_count"))?;
        let kv_heads = self.uint(&k("attention.head_count_kv"))?.unwrap_or(heads);
        if heads == 0 {
            return Err(self.meta_err(&k("attention.head_count"), "must be positive"));
        }
        let head_dim = self.uint(&k("attention.key_length"))?.unwrap_or(hidden / heads);
        let tokens = self.array("tokenizer.ggml.tokens")?.map(|t| t.len() as u64);
        let vocab = match (self.uint(&k("vocab_size"))?, tokens) {
            (Some(v), _) => v,
            (None, Some(t)) => t,
            (None, None) => {
                self.content.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()[0] as u64).unwrap_or(0)
            }
        };
        let mut cfg = json!({
            "architectures": [if model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": model_type,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.required_uint(&k("feed_forward_length"))?,
            "num_hidden_layers": self.required_uint(&k("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.float(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            "rope_theta": self.float(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            "max_position_embeddings": self.uint(&k("context_length"))?.unwrap_or(4096),
            "tie_word_embeddings": !self.has_tensor("output.weight"),
        });
        let obj = cfg.as_object_mut().expect("a JSON object");
        if model_type == "llama" {
            obj.insert("attention_bias".into(), json!(self.has_tensor("blk.0.attn_q.bias")));
            obj.insert("mlp_bias".into(), json!(self.has_tensor("blk.0.ffn_down.bias")));
        } else {
            obj.insert("use_sliding_window".into(), json!(false));
        }
        for (key, hf) in
            [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("padding_token_id", "pad_token_id")]
        {
            if let Some(id) = self.uint(&format!("tokenizer.ggml.{key}"))? {
                obj.insert(hf.into(), json!(id));
            }
        }
        match self.string(&k("rope.scaling.type"))?.as_deref() {
            None | Some("none") => {}
            Some("linear") => {
                let factor = self.float(&k("rope.scaling.factor"))?.unwrap_or(1.0);
                if factor != 1.0 {
                    obj.insert("rope_scaling".into(), json!({"rope_type": "linear", "factor": factor}));
                }
            }
            Some(other) => {
                return Err(self.meta_err(&k("rope.scaling.type"), format!("`{other}` is not supported (none, linear)")))
            }
        }
        let text = serde_json::to_string(&cfg).expect("JSON");
        let mut config = ModelConfig::from_json_str(&text, &self.path)
            .map_err(|e| GgufError::Model { path: self.path.clone(), source: e.into() })?;
        if self.has_tensor("rope_freqs.weight") {
            // Llama 3.1-style scaling, stored as one divisor per frequency.
            let factors = self
                .read_f32("rope_freqs.weight")
                .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                .map_err(|source| GgufError::Model { path: self.path.clone(), source })?;
            if factors.len() != config.head_dim / 2 {
                return Err(self.meta_err(
                    "rope_freqs.weight",
                    format!("{} factors for head_dim {}", factors.len(), config.head_dim),
                ));
            }
            config.rope_freq_factors = Some(factors.into_iter().map(f64::from).collect());
        }
        Ok(config)
    }
}

/// The GGUF name of a transformers tensor name (a projection's from [`crate::model::LAYER_PROJECTIONS`]). Whose rows
/// are in llama.cpp's rotary order, and with how many heads, is [`LayerProjection::rotary`].
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => LayerProjection::named(module)?.gguf,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Undoes llama.cpp's permutation of Q/K rows: within each head, llama.cpp stores row `2j + p` what transformers
/// stores at row `p·d/2 + j` (p ∈ {0, 1}, j < d/2). Works for a weight (out, in) and a bias (out).
pub fn unpermute_rotary_rows(t: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = out / n_heads / 2;
    t.reshape((n_heads, half, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// The inverse of [`unpermute_rotary_rows`] (how llama.cpp's converter writes Q/K), for tests and export.
pub fn permute_rotary_rows(t: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = out / n_heads / 2;
    t.reshape((n_heads, 2, half, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// Reads a GGUF file's tensors under their transformers names, dequantized, with Q/K rows in transformers' order
/// (what [`load`] builds the model from, and what `peftkit merge` writes out).
pub struct GgufTensors<'a> {
    file: &'a GgufFile,
    config: &'a ModelConfig,
    /// One open handle, reused for every tensor.
    reader: Mutex<std::fs::File>,
}

impl<'a> GgufTensors<'a> {
    /// The tensors of `file`, whose configuration (from [`GgufFile::config`]) is `config`.
    pub fn new(file: &'a GgufFile, config: &'a ModelConfig) -> Result<Self, GgufError> {
        let reader =
            std::fs::File::open(&file.path).map_err(|source| GgufError::Open { path: file.path.clone(), source })?;
        Ok(Self { file, config, reader: Mutex::new(reader) })
    }
}

impl GgufTensors<'_> {
    /// The stored type of the transformers tensor `name`, if the file has it.
    pub fn stored_type(&self, name: &str) -> Option<GgmlDType> {
        gguf_name(name).and_then(|g| self.file.tensor_type(&g))
    }

    /// The transformers tensor `name` exactly as stored: llama.cpp's layout (Q/K rows permuted for Llama) and type.
    pub fn raw(&self, name: &str) -> Result<QTensor, ModelError> {
        let files = self.file.path.display().to_string();
        let g = gguf_name(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), files: files.clone() })?;
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        self.file.content.tensor(&mut *reader, &g, &Device::Cpu).map_err(|source| ModelError::Tensor {
            name: g.clone(),
            files,
            source,
        })
    }
}

impl TensorSource for GgufTensors<'_> {
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.has_tensor(&g))
    }

    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, ModelError> {
        let files = self.file.path.display().to_string();
        let missing = || ModelError::MissingTensor { name: name.to_string(), files: files.clone() };
        let g = gguf_name(name).ok_or_else(missing)?;
        if !self.file.has_tensor(&g) {
            return Err(ModelError::MissingTensor { name: format!("{g} (for {name})"), files });
        }
        let tensor_err =
            |e: candle_core::Error| ModelError::Tensor { name: g.clone(), files: files.clone(), source: e };
        let q = {
            let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
            self.file.content.tensor(&mut *reader, &g, &Device::Cpu).map_err(tensor_err)?
        };
        let mut t = q.dequantize(&Device::Cpu).map_err(tensor_err)?;
        if t.dims() != shape {
            return Err(ModelError::Shape {
                name: format!("{g} (for {name})"),
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        // llama.cpp permutes Q and K (weights and biases) of Llama-architecture models only.
        if self.config.model_type == "llama" {
            if let Some(heads) = LayerProjection::of_tensor(name).and_then(|p| self.config.rotary_heads(p)) {
                t = unpermute_rotary_rows(&t, heads).map_err(tensor_err)?;
            }
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn describe(&self) -> String {
        self.file.path.display().to_string()
    }

    fn ggml_weight(&self, name: &str, shape: &[usize]) -> Result<Option<QTensor>, ModelError> {
        let files = self.file.path.display().to_string();
        let Some(g) = gguf_name(name).filter(|g| self.file.has_tensor(g)) else { return Ok(None) };
        let tensor_err =
            |e: candle_core::Error| ModelError::Tensor { name: g.clone(), files: files.clone(), source: e };
        let q = {
            let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
            self.file.content.tensor(&mut *reader, &g, &Device::Cpu).map_err(tensor_err)?
        };
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(None);
        }
        if q.shape().dims() != shape {
            return Err(ModelError::Shape {
                name: format!("{g} (for {name})"),
                got: q.shape().dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        // candle 0.11.1 has SIMD dot products for Q4_0, Q8_0 and the k-quants, but multiplies Q4_1, Q5_0 and Q5_1
        // with scalar code (10× slower, measured on SmolLM2's Q4_1 file). Q4_1 has peftkit's own kernel
        // (quant::block_matmul); Q5_0 and Q5_1 are re-encoded as Q8_0 (same 32-element blocks, 8-bit codes; its rounding
        // is a few % of a 5-bit step), twice the bytes, SIMD speed.
        let q = if matches!(q.dtype(), GgmlDType::Q5_0 | GgmlDType::Q5_1) {
            QTensor::quantize(&q.dequantize(&Device::Cpu).map_err(tensor_err)?, GgmlDType::Q8_0).map_err(tensor_err)?
        } else {
            q
        };
        // llama.cpp permutes Q and K of Llama-architecture models: move whole rows (each row is whole blocks).
        let heads = match self.config.model_type.as_str() {
            "llama" => LayerProjection::of_tensor(name).and_then(|p| self.config.rotary_heads(p)),
            _ => None,
        };
        let Some(heads) = heads else { return Ok(Some(q)) };
        let data = q.data().map_err(tensor_err)?;
        let rows = shape[0];
        let row_bytes = data.len() / rows.max(1);
        let half = rows / heads / 2;
        let mut out = vec![0u8; data.len()];
        // New row (h, j, i) is old row (h, i, j): the inverse of the converter's interleaving (see
        // unpermute_rotary_rows, which does the same on a dense tensor).
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let (new, old) = (h * 2 * half + j * half + i, h * 2 * half + i * 2 + j);
                    out[new * row_bytes..(new + 1) * row_bytes]
                        .copy_from_slice(&data[old * row_bytes..(old + 1) * row_bytes]);
                }
            }
        }
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(q.dtype(), &out, shape.to_vec(), &Device::Cpu)
            .map_err(tensor_err)?;
        Ok(Some(q))
    }
}

/// Loads a GGUF file as a model, a tokenizer and a chat template.
pub fn load(path: &Path, device: &Device, dtype: DType, quant: model::BaseQuant) -> Result<GgufModel, GgufError> {
    let file = GgufFile::open(path)?;
    let config = file.config()?;
    let tokenizer = build_tokenizer(&file)?;
    let vocab = tokenizer.get_vocab_size(true);
    if vocab > config.vocab_size {
        return Err(file.meta_err(
            "tokenizer.ggml.tokens",
            format!("{vocab} tokens, more than the model's vocabulary of {}", config.vocab_size),
        ));
    }
    let token = |key: &str| -> Result<Option<String>, GgufError> {
        Ok(file.uint(key)?.and_then(|id| tokenizer.id_to_token(id as u32)))
    };
    let bos_token = token("tokenizer.ggml.bos_token_id")?;
    let eos_token = token("tokenizer.ggml.eos_token_id")?;
    let pad_token_id = file.uint("tokenizer.ggml.padding_token_id")?.map(|v| v as u32);
    let chat_template = file.string("tokenizer.chat_template")?.filter(|t| !t.trim().is_empty());
    let name = file.string("general.name")?;
    let eot_token_id = file.uint("tokenizer.ggml.eot_token_id")?.map(|v| v as u32);
    let eom_token_id = file.uint("tokenizer.ggml.eom_token_id")?.map(|v| v as u32);
    let model = {
        let src = GgufTensors::new(&file, &config)?;
        model::assemble_llama(config.clone(), &src, device, dtype, quant)
            .map_err(|source| GgufError::Model { path: path.into(), source })?
    };
    Ok(GgufModel {
        model,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        pad_token_id,
        eot_token_id,
        eom_token_id,
        name,
    })
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// Llama 3's pattern (numbers in groups of up to three).
pub(crate) const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pattern (single digits).
pub(crate) const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level BPE vocabulary splits text before merging, by `tokenizer.ggml.pre` (llama.cpp's names).
fn byte_level_pre_tokenizer(pre: &str) -> Option<(serde_json::Value, bool)> {
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let seq = |items: Vec<serde_json::Value>| json!({"type": "Sequence", "pretokenizers": items});
    // (pre-tokenizer, ignore_merges)
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "phi-2" | "olmo" | "roberta-bpe" | "jina-v1-en" | "jina-v2-code" => {
            (byte_level(true), false)
        }
        // Digits one by one, then GPT-2's pattern.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            (seq(vec![split(r"\p{N}"), byte_level(true)]), false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => (seq(vec![split(LLAMA3_PATTERN), byte_level(false)]), true),
        "smaug-bpe" | "dbrx" => (seq(vec![split(LLAMA3_PATTERN), byte_level(false)]), false),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => (seq(vec![split(QWEN2_PATTERN), byte_level(false)]), false),
        _ => return None,
    })
}

/// Rebuilds the tokenizer described by `tokenizer.ggml.*`.
pub fn build_tokenizer(file: &GgufFile) -> Result<Tokenizer, GgufError> {
    let tok_err = |msg: String| GgufError::Tokenizer { path: file.path.clone(), msg };
    let model = file.string("tokenizer.ggml.model")?.ok_or_else(|| file.meta_err("tokenizer.ggml.model", "missing"))?;
    let tokens =
        file.strings("tokenizer.ggml.tokens")?.ok_or_else(|| file.meta_err("tokenizer.ggml.tokens", "missing"))?;
    let types: Vec<i64> = match file.numbers("tokenizer.ggml.token_type")? {
        Some(t) if t.len() == tokens.len() => t.into_iter().map(|x| x as i64).collect(),
        Some(t) => {
            return Err(
                file.meta_err("tokenizer.ggml.token_type", format!("{} entries for {} tokens", t.len(), tokens.len()))
            )
        }
        None => vec![1; tokens.len()],
    };
    let id_of = |key: &str| -> Result<Option<u32>, GgufError> {
        let id = file.uint(key)?;
        match id {
            Some(id) if id as usize >= tokens.len() => {
                Err(file.meta_err(key, format!("{id} is not a token id (vocabulary of {})", tokens.len())))
            }
            _ => Ok(id.map(|v| v as u32)),
        }
    };
    let bos = id_of("tokenizer.ggml.bos_token_id")?;
    let eos = id_of("tokenizer.ggml.eos_token_id")?;
    let unk = id_of("tokenizer.ggml.unknown_token_id")?;

    // Control (3) and user-defined (4) tokens are matched whole in the text before the model runs, as transformers
    // does for added tokens; control tokens are special (skipped when decoding with skip_special_tokens).
    const CONTROL: i64 = 3;
    const USER_DEFINED: i64 = 4;
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": t == CONTROL})
        })
        .collect();

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        // A duplicated token text keeps its first id, as llama.cpp's text → id map does.
        vocab.entry(t.clone()).or_insert(json!(i));
    }

    let (model_json, normalizer, pre_tokenizer, decoder, default_add_bos) = match model.as_str() {
        "gpt2" => {
            let pre = file.string("tokenizer.ggml.pre")?.unwrap_or_else(|| "default".into());
            let (pre_tokenizer, ignore_merges) = byte_level_pre_tokenizer(&pre).ok_or_else(|| {
                file.meta_err(
                    "tokenizer.ggml.pre",
                    format!(
                        "pre-tokenizer `{pre}` is not supported (supported: default, gpt-2, smollm, starcoder, llama-bpe, \
                         llama3, qwen2, smaug-bpe, dbrx, command-r, …); use the model's Hugging Face repository instead"
                    ),
                )
            })?;
            let merges = file
                .strings("tokenizer.ggml.merges")?
                .ok_or_else(|| file.meta_err("tokenizer.ggml.merges", "missing"))?;
            let merges: Vec<serde_json::Value> = merges
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    m.split_once(' ').map(|(a, b)| json!([a, b])).ok_or_else(|| {
                        file.meta_err("tokenizer.ggml.merges", format!("entry {i} `{m}` is not `left right`"))
                    })
                })
                .collect::<Result<_, _>>()?;
            let model_json = json!({
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                "vocab": vocab, "merges": merges,
            });
            let decoder =
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            (model_json, serde_json::Value::Null, pre_tokenizer, decoder, false)
        }
        "llama" => {
            // SentencePiece BPE: merges are implied by the scores (a higher-scored piece merges first).
            let scores = file
                .numbers("tokenizer.ggml.scores")?
                .unwrap_or_else(|| (0..tokens.len()).map(|i| -(i as f64)).collect());
            if scores.len() != tokens.len() {
                return Err(file.meta_err(
                    "tokenizer.ggml.scores",
                    format!("{} scores for {} tokens", scores.len(), tokens.len()),
                ));
            }
            let merges = spm_merges(&tokens, &types, &scores);
            let unk_token = unk.map(|id| tokens[id as usize].clone());
            let model_json = json!({
                "type": "BPE", "dropout": null, "unk_token": unk_token, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            });
            let add_space_prefix = file.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let pre_tokenizer = json!({"type": "Metaspace", "replacement": "▁",
                "prepend_scheme": if add_space_prefix { "first" } else { "never" }, "split": false});
            let mut steps = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                steps.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let decoder = json!({"type": "Sequence", "decoders": steps});
            (model_json, serde_json::Value::Null, pre_tokenizer, decoder, true)
        }
        other => {
            return Err(file
                .meta_err("tokenizer.ggml.model", format!("tokenizer model `{other}` is not supported (gpt2, llama)")))
        }
    };

    // BOS/EOS added to every encoding when the file asks for it (llama.cpp's add_bos_token / add_eos_token).
    let add_bos = file.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos) && bos.is_some();
    let add_eos = file.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false) && eos.is_some();
    let post_processor = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = serde_json::Map::new();
        let mut special = |id: u32| {
            let t = tokens[id as usize].clone();
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
            json!({"SpecialToken": {"id": tokens[id as usize], "type_id": 0}})
        };
        let (b, e) = (add_bos.then(|| special(bos.unwrap_or(0))), add_eos.then(|| special(eos.unwrap_or(0))));
        let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
        single.extend(b.clone());
        single.push(seq("A"));
        single.extend(e.clone());
        pair.extend(b.clone());
        pair.push(seq("A"));
        pair.extend(e.clone());
        pair.extend(b);
        pair.push(seq("B"));
        pair.extend(e);
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    } else {
        serde_json::Value::Null
    };

    let tokenizer_json = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": decoder, "model": model_json,
    });
    let text = serde_json::to_string(&tokenizer_json).map_err(|e| tok_err(e.to_string()))?;
    text.parse::<Tokenizer>().map_err(|e| tok_err(e.to_string()))
}

/// Merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces of the vocabulary, ordered
/// by the score of the merged piece (best first), then by the ids of its parts.
fn spm_merges(tokens: &[String], types: &[i64], scores: &[f64]) -> Vec<serde_json::Value> {
    const NORMAL: i64 = 1;
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != NORMAL && types[id] != 4 {
            continue;
        }
        let bounds: Vec<usize> = piece.char_indices().map(|(i, _)| i).skip(1).collect();
        for b in bounds {
            let (l, r) = piece.split_at(b);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((scores[id], id, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    merges.into_iter().map(|(_, _, l, r)| json!([tokens[l], tokens[r]])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_row_permutation_round_trips_and_matches_llama_cpp() {
        // Two heads of dimension 4: llama.cpp stores, per head, rows (0, 2, 1, 3) of transformers' order.
        let hf = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap().reshape((8, 1)).unwrap();
        let gguf = permute_rotary_rows(&hf, 2).unwrap();
        assert_eq!(gguf.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = unpermute_rotary_rows(&gguf, 2).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), (0..8).map(|x| x as f32).collect::<Vec<_>>());
        // A bias (1-D) too.
        let b = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap();
        assert_eq!(
            unpermute_rotary_rows(&permute_rotary_rows(&b, 2).unwrap(), 2).unwrap().to_vec1::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn tensor_names_map_to_llama_cpp_names() {
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.3.self_attn.k_proj.bias").as_deref(), Some("blk.3.attn_k.bias"));
        assert_eq!(gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(), Some("blk.12.ffn_down.weight"));
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.layers.0.unknown.weight"), None);
    }

    #[test]
    fn spm_merges_follow_scores() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "bc", "abc"].iter().map(|s| s.to_string()).collect();
        let types = vec![2, 1, 1, 1, 1, 1, 1];
        // "bc" scores higher than "ab": it merges first.
        let scores = vec![0.0, -1.0, -2.0, -3.0, -5.0, -4.0, -6.0];
        let m = spm_merges(&tokens, &types, &scores);
        assert_eq!(m, vec![json!(["b", "c"]), json!(["a", "b"]), json!(["a", "bc"]), json!(["ab", "c"])]);
    }

    #[test]
    fn sentencepiece_vocabulary_with_byte_fallback() {
        use candle_core::quantized::gguf_file;
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        for p in [
            "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "llo", "▁hello", "▁w", "or", "▁wor", "ld",
            "▁world",
        ] {
            tokens.push(p.into());
            types.push(1);
        }
        let scores: Vec<Value> = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
        let meta = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect())),
            ("tokenizer.ggml.token_type", Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
            ("tokenizer.ggml.scores", Value::Array(scores)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ];
        let path = std::env::temp_dir().join(format!("peftkit-spm-{}.gguf", std::process::id()));
        let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &refs, &[]).unwrap();
        let tok = build_tokenizer(&GgufFile::open(&path).unwrap()).unwrap();
        let _ = std::fs::remove_file(&path);
        let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
        let enc = tok.encode("hello world é", true).unwrap();
        // BOS added (add_bos_token defaults to true for SentencePiece vocabularies), a space prefix, whole words
        // merged by score, the unknown character as its UTF-8 bytes.
        assert_eq!(
            enc.get_ids(),
            &[1, id("▁hello"), id("▁world"), id("▁"), id("<0xC3>"), id("<0xA9>")],
            "{:?}",
            enc.get_tokens()
        );
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hello world é");
        // Control tokens in the text are matched whole.
        assert_eq!(tok.encode("</s>", false).unwrap().get_ids(), &[2]);
    }
}
