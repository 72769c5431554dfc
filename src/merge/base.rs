//! The base model as merge reads it, from each source: a safetensors model folder (local or from the Hub, 16-bit or
//! a pre-quantized bitsandbytes checkpoint) or a GGUF file (its tensors dequantized under their transformers names).

use super::options::{MergeError, MergeOptions, OutFormat};
use super::st_reader::SafetensorsFiles;
use crate::gguf::GgufFile;
use crate::hub::{self, HubError, ModelSource};
use crate::model::{ConfigError, ModelConfig, ModelError, WeightSource, LAYER_PROJECTIONS};
use candle_core::DType;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

/// Files of a model folder that describe its tokenizer, copied as they are.
const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];
/// How bitsandbytes names the quant state of a 4-bit weight `W`: `W.quant_state.bitsandbytes__nf4` (or `__fp4`).
const BNB_STATE: &str = ".quant_state.bitsandbytes__";
/// bitsandbytes' other parts of a 4-bit weight `W`: `W.absmax`, `W.quant_map`, ….
const BNB_PARTS: [&str; 4] = [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"];

/// One tensor of the base as the merged model will hold it.
pub(super) struct BaseTensor {
    pub(super) name: String,
    /// The dense shape (a bitsandbytes weight's is in its quant state, not its packed storage).
    pub(super) shape: Vec<usize>,
    /// The dtype as read: the stored one, F32 for a GGUF or NF4 tensor (dequantized).
    pub(super) dtype: DType,
    /// Stored by bitsandbytes in NF4 (a pre-quantized checkpoint).
    pub(super) nf4: bool,
}

/// Where the base's tensors come from. (One per merge, so the size difference of its variants costs nothing.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Reader {
    Safetensors(SafetensorsFiles),
    Gguf {
        file: GgufFile,
        config: ModelConfig,
        /// llama.cpp's name of the file's quantization (`general.file_type`), e.g. `Q4_1`.
        quant: Option<&'static str>,
    },
}

/// The base model as merge reads it.
pub(super) struct Base {
    /// The Hub id, or the local path as given.
    pub(super) name: String,
    pub(super) source: ModelSource,
    /// The model folder or the GGUF file (an input the output must not replace).
    pub(super) path: PathBuf,
    /// `config.json` (for a GGUF file, the one built from its metadata).
    pub(super) config: Value,
    /// The license the base declares (its model card's front matter or `license` in config.json; `general.license`
    /// in a GGUF file).
    pub(super) license: Option<String>,
    /// Every tensor the merged model holds, in the base's order.
    pub(super) tensors: Vec<BaseTensor>,
    pub(super) reader: Reader,
    /// Tokenizer files and `generation_config.json`, copied as they are (safetensors bases).
    pub(super) copied_files: Vec<PathBuf>,
}

impl Base {
    pub(super) fn open(opts: &MergeOptions) -> Result<Self, MergeError> {
        if opts.gguf_file.is_some() || crate::base::is_gguf_path(&opts.base) {
            Self::open_gguf(opts)
        } else {
            Self::open_safetensors(opts)
        }
    }

    fn open_safetensors(opts: &MergeOptions) -> Result<Self, MergeError> {
        let files = hub::resolve_model(&opts.base, opts.revision.as_deref(), &opts.hub)?;
        let text = std::fs::read_to_string(&files.config)
            .map_err(|source| ModelError::Config(ConfigError::Io { path: files.config.clone(), source }))?;
        let config: Value = serde_json::from_str(&text).map_err(|e| {
            ModelError::Config(ConfigError::Parse { path: files.config.clone(), line: e.line(), msg: e.to_string() })
        })?;
        let mut st = SafetensorsFiles::open(&files.weights)?;

        // bitsandbytes 4-bit weights: `W` (packed codes) with `W.quant_state.bitsandbytes__nf4` and its other parts.
        let mut quantized: HashMap<String, Vec<usize>> = HashMap::new();
        for name in st.names() {
            let Some((weight, kind)) = name.split_once(BNB_STATE) else { continue };
            if kind != "nf4" {
                return Err(MergeError::Unsupported {
                    path: files.dir.clone(),
                    msg: format!("`{weight}` is stored in bitsandbytes' `{kind}` format; only nf4 is supported"),
                });
            }
            quantized.insert(weight.to_string(), st.bnb_shape(&name)?);
        }
        let is_part = |name: &str| {
            quantized.keys().any(|w| {
                name.strip_prefix(w.as_str())
                    .is_some_and(|rest| BNB_PARTS.contains(&rest) || rest.starts_with(".quant_state."))
            })
        };
        let mut tensors = Vec::new();
        for (name, entry) in st.entries() {
            if let Some(shape) = quantized.get(&name) {
                tensors.push(BaseTensor { name, shape: shape.clone(), dtype: DType::F32, nf4: true });
            } else if !is_part(&name) {
                let dtype = entry.dtype.ok_or_else(|| MergeError::Unsupported {
                    path: st.files[entry.file].path.clone(),
                    msg: format!("tensor `{name}` has a dtype peftkit cannot convert ({})", entry.dtype_name),
                })?;
                tensors.push(BaseTensor { name, shape: entry.shape.clone(), dtype, nf4: false });
            }
        }
        if !quantized.is_empty() {
            st.nf4 = Some(WeightSource::open(&files.weights)?);
        }

        // Tokenizer files: those resolve_model found, then the others (a Hub repo's are fetched when present).
        let mut copied_files: Vec<PathBuf> = [
            files.tokenizer.clone(),
            files.tokenizer_config.clone(),
            files.special_tokens_map.clone(),
            files.chat_template.clone(),
            files.generation_config.clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        for name in TOKENIZER_FILES {
            if copied_files.iter().any(|f| f.ends_with(name)) {
                continue;
            }
            let local = files.dir.join(name);
            let found = match &files.source {
                _ if local.is_file() => Some(local),
                ModelSource::Local(_) => None,
                ModelSource::Hub { repo, revision, commit } => {
                    let at = commit.as_deref().unwrap_or(revision);
                    match hub::resolve_repo_file(repo, Some(at), name, &opts.hub) {
                        Ok((p, _)) => Some(p),
                        Err(HubError::MissingFile { .. } | HubError::NotCached { .. }) => None,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            copied_files.extend(found);
        }
        let name = match &files.source {
            ModelSource::Hub { repo, .. } => repo.clone(),
            ModelSource::Local(p) => p.display().to_string(),
        };
        let license = crate::base::card_license_of(&files, &opts.hub)
            .or_else(|| config.get("license").and_then(|l| l.as_str()).map(str::to_string));
        Ok(Self {
            name,
            source: files.source.clone(),
            path: files.dir.clone(),
            config,
            license,
            tensors,
            reader: Reader::Safetensors(st),
            copied_files,
        })
    }

    fn open_gguf(opts: &MergeOptions) -> Result<Self, MergeError> {
        let (path, source) = match &opts.gguf_file {
            Some(file) => hub::resolve_repo_file(&opts.base, opts.revision.as_deref(), file, &opts.hub)?,
            None => {
                let p = PathBuf::from(&opts.base);
                if !p.is_file() {
                    return Err(HubError::LocalNotFound(p).into());
                }
                if opts.revision.is_some() {
                    tracing::warn!("--revision is ignored for a local GGUF file");
                }
                (p.clone(), ModelSource::Local(p))
            }
        };
        let file = GgufFile::open(&path)?;
        let config = file.config()?;
        // A GGUF output keeps the factors as the tensor they are (see gguf_out).
        if config.rope_freq_factors.is_some() && opts.format != OutFormat::Gguf {
            // transformers' config describes Llama 3.1's scaling by its parameters, which the file does not keep.
            return Err(MergeError::Unsupported {
                path,
                msg: "rope_freqs.weight (Llama 3.1-style rotary scaling stored as factors) has no config.json \
                      equivalent; merge onto the model's Hugging Face repository instead"
                    .into(),
            });
        }
        let tensors = llama_tensors(&config)
            .into_iter()
            .map(|(name, shape)| BaseTensor { name, shape, dtype: DType::F32, nf4: false })
            .collect();
        let license = file.string("general.license")?;
        let quant = file.uint("general.file_type").ok().flatten().and_then(llama_file_type);
        let name = match &source {
            ModelSource::Hub { repo, .. } => repo.clone(),
            ModelSource::Local(p) => p.display().to_string(),
        };
        Ok(Self {
            name,
            source,
            path: path.clone(),
            config: config.raw.clone(),
            license,
            tensors,
            reader: Reader::Gguf { file, config, quant },
            copied_files: Vec::new(),
        })
    }
}

/// The tensors of a Llama-family model of `cfg`, in transformers' names and model order (what
/// [`crate::model::assemble_llama`] reads).
fn llama_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for proj in &LAYER_PROJECTIONS {
            let (m, (o, n)) = (proj.name, cfg.projection_shape(proj));
            out.push((format!("{p}.{m}.weight"), vec![o, n])); // (out, in)
            if cfg.projection_bias(proj) {
                out.push((format!("{p}.{m}.bias"), vec![o])); // (out,)
            }
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// llama.cpp's name of a GGUF `general.file_type` (its `llama_ftype`): the type most tensors are quantized to.
fn llama_file_type(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// The sentence the card and the log use for the weights the adapter went into.
pub(super) fn describe_weights(base: &Base, from_quantized: bool, prequantized: bool, double_quant: bool) -> String {
    let nf4 = format!(
        "quantized to NF4 ({} double quantization) and dequantized again, exactly as QLoRA training holds them",
        if double_quant { "with" } else { "without" }
    );
    match &base.reader {
        Reader::Gguf { file, quant, .. } => {
            let name = file.path().file_name().unwrap_or_default().to_string_lossy().to_string();
            let q = quant.map(|q| format!(" (llama.cpp file type {q})")).unwrap_or_default();
            let mut s = format!("the weights dequantized to f32 from the GGUF file `{name}`{q}");
            if from_quantized {
                s.push_str(&format!("; the projections then {nf4}"));
            }
            s
        }
        Reader::Safetensors(_) if prequantized => "the NF4 weights of the pre-quantized (bitsandbytes 4-bit) \
             checkpoint, dequantized to f32 (the checkpoint holds no 16-bit weights)"
            .to_string(),
        Reader::Safetensors(_) if from_quantized => format!("the base's projections {nf4}"),
        Reader::Safetensors(_) => "the base's original (unquantized) weights".to_string(),
    }
}
