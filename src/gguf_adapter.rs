//! A PEFT LoRA adapter written as llama.cpp's LoRA adapter GGUF, as llama.cpp's `convert_lora_to_gguf.py` writes
//! it (and as `llama-cli --lora`, `llama-server --lora` and `llama-export-lora` read it).
//!
//! Format (gguf-py `constants.py`, llama.cpp `src/llama-adapter.cpp`):
//! - metadata, in the converter's order: `general.architecture` (the base's llama.cpp architecture: `llama` for
//!   Llama/Mistral/SmolLM, `qwen2`), `general.type = "adapter"`, `adapter.type = "lora"`, `general.name` (the
//!   converter's title-cased adapter folder name), `adapter.lora.alpha` (f32), then
//!   `adapter.alora.invocation_tokens` for an aLoRA adapter, and `general.quantization_version = 2`;
//! - tensors `<llama.cpp base tensor>.lora_a` (GGUF ne = [in, r], i.e. PEFT's `lora_A` (r × in) as is) and
//!   `.lora_b` (ne = [r, out], PEFT's `lora_B` (out × r)), in the order of the PEFT file's (sorted) keys;
//! - for the Llama architecture the rows of `lora_b` of Q and K are permuted as the converter permutes the base's
//!   Q and K (llama.cpp pairs rotary dimensions `2i, 2i+1` of a head; transformers pairs `i, i + d/2`), so that
//!   B·A applies to the permuted base weight; Qwen2 is not permuted.
//!
//! Scaling: llama.cpp computes `scale = alpha / r` per tensor, with one `alpha` per adapter and `r` read from the
//! tensor's shape; PEFT computes `s = alpha_m / r_m` (rsLoRA: `alpha_m / sqrt(r_m)`) with `alpha_m` from
//! `alpha_pattern`. The file's alpha is `lora_alpha` (rsLoRA: `lora_alpha · sqrt(r)`, so that the default rank gets
//! the same scale); a module whose PEFT scale differs from llama.cpp's (an `alpha_pattern` entry, or rsLoRA with a
//! `rank_pattern` entry) gets `lora_b · s_peft / s_llama`, which is exact: the adapter's output is s·B·A·x.
//!
//! What the format cannot hold is refused: IA3, DoRA (a magnitude vector), `modules_to_save` (whole trained
//! modules), LoRA biases, and targets llama.cpp has no tensor for.
//!
//! Output types (`--outtype`, as the converter's): f32, f16, bf16, q8_0. Q8_0 needs rows (ne0) that are a multiple
//! of 32; like the converter, a tensor whose rows are not (`lora_b`, whose rows are r long, unless r is a multiple
//! of 32) falls back to f16. The file is GGUF version 3, alignment 32, written to a temporary name and renamed.

use crate::adapter::peft_format::{self, LoadedAdapter};
use crate::adapter::{AdapterConfig, AdapterError, LayerAdapter};
use crate::gguf::{self, GgufError, GgufFile};
use crate::hub::{self, HubError, HubOptions};
use crate::model::{ConfigError, LayerProjection, ModelConfig};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Errors exporting an adapter to llama.cpp's GGUF.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{dir}: llama.cpp's LoRA adapter GGUF cannot represent this adapter: {reason}")]
    Unrepresentable { dir: PathBuf, reason: String },
    #[error(
        "{dir}: the base model `{base}` (base_model_name_or_path) cannot be read: {msg}; pass --base with a local \
         model folder, a .gguf file or a Hub id"
    )]
    BaseUnresolved { dir: PathBuf, base: String, msg: String },
    #[error("{dir}: adapter_config.json has no base_model_name_or_path; pass --base with the base model")]
    NoBase { dir: PathBuf },
    #[error("base model `{base}`: {msg}")]
    Base { base: String, msg: String },
    #[error("{path} exists (pass --overwrite to replace it)")]
    Exists { path: PathBuf },
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("tensor {tensor}: {source}")]
    Tensor { tensor: String, source: candle_core::Error },
}

impl ExportError {
    /// Whether the error comes from the user's input (exit code 2) rather than the machine.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, ExportError::Io { .. } | ExportError::Tensor { .. })
    }
}

/// The tensor type of the exported LoRA weights (`convert_lora_to_gguf.py --outtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl OutType {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "q8_0" => Ok(Self::Q8_0),
            _ => Err(format!(
                "`{s}` is not an output type llama.cpp's converter writes for LoRA adapters (f32, f16, bf16, q8_0)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }
}

/// What the export needs to know of the base model.
#[derive(Debug, Clone)]
pub struct BaseFacts {
    /// llama.cpp's architecture name (`general.architecture`).
    pub arch: String,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Whether `lm_head` is the embedding (then llama.cpp has no `output.weight` to adapt).
    pub tie_word_embeddings: bool,
}

impl BaseFacts {
    pub fn from_config(c: &ModelConfig) -> Self {
        // The converter registers LlamaForCausalLM, MistralForCausalLM (and SmolLM's Llama) as `llama`.
        let arch = if c.model_type == "qwen2" { "qwen2" } else { "llama" };
        Self {
            arch: arch.into(),
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            tie_word_embeddings: c.tie_word_embeddings,
        }
    }
}

/// Reads the base model's configuration, without its weights: a local `.gguf` file (its metadata), a local model
/// folder (`config.json`), or a Hub id (only `config.json` is fetched, or read from the cache offline).
pub fn base_config(base: &str, revision: Option<&str>, hub_opts: &HubOptions) -> Result<ModelConfig, String> {
    let path = Path::new(base);
    if crate::base::is_gguf_path(base) && path.is_file() {
        let g = GgufFile::open(path).map_err(|e: GgufError| e.to_string())?;
        return g.config().map_err(|e| e.to_string());
    }
    if path.is_dir() {
        let cfg = path.join("config.json");
        if !cfg.is_file() {
            return Err(format!("{} has no config.json", path.display()));
        }
        return ModelConfig::from_file(&cfg).map_err(|e: ConfigError| e.to_string());
    }
    if path.exists() {
        return Err(format!("{base} is neither a model folder nor a .gguf file"));
    }
    if !hub::valid_repo_id(base) {
        return Err(format!("no such file or folder: {base}"));
    }
    let (cfg, _) =
        hub::resolve_repo_file(base, revision, "config.json", hub_opts).map_err(|e: HubError| e.to_string())?;
    ModelConfig::from_file(&cfg).map_err(|e| e.to_string())
}

/// An adapter as llama.cpp's GGUF holds it: metadata and tensors, in the order they are written.
pub struct GgufAdapter {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<(String, QTensor)>,
    /// Modules whose `lora_b` carries a folded scale ratio (alpha_pattern, rsLoRA + rank_pattern).
    pub folded: Vec<String>,
}

fn unrepresentable(dir: &Path, reason: impl Into<String>) -> ExportError {
    ExportError::Unrepresentable { dir: dir.to_path_buf(), reason: reason.into() }
}

/// Refuses, from `adapter_config.json` itself, what llama.cpp's format cannot hold, before peftkit's own reader
/// (whose messages speak of peftkit, not of llama.cpp) sees it.
fn check_representable(dir: &Path) -> Result<serde_json::Value, ExportError> {
    let path = dir.join(peft_format::CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| AdapterError::Io { path: path.clone(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| AdapterError::Format { path: path.clone(), msg: format!("line {}: {e}", e.line()) })?;
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    match get("peft_type").and_then(|t| t.as_str()) {
        Some("LORA") => {}
        Some("IA3") => {
            return Err(unrepresentable(
                dir,
                "IA3 (llama.cpp adapters are LoRA only; `peftkit merge` folds an IA3 adapter into the base, which \
                 can then be converted)",
            ))
        }
        Some(other) => return Err(unrepresentable(dir, format!("peft_type `{other}` (only LORA is)"))),
        None => return Err(AdapterError::Format { path, msg: "peft_type is missing".into() }.into()),
    }
    if get("use_dora").and_then(|x| x.as_bool()) == Some(true) {
        return Err(unrepresentable(dir, "use_dora: DoRA's per-output magnitude vector has no llama.cpp tensor"));
    }
    if let Some(m) = get("modules_to_save").and_then(|x| x.as_array()).filter(|a| !a.is_empty()) {
        let names: Vec<String> =
            m.iter().map(|n| n.as_str().map(str::to_string).unwrap_or_else(|| n.to_string())).collect();
        return Err(unrepresentable(
            dir,
            format!(
                "modules_to_save [{}]: fully trained modules are not LoRA tensors (merge the adapter instead)",
                names.join(", ")
            ),
        ));
    }
    if get("trainable_token_indices").is_some_and(|x| !x.is_null()) {
        return Err(unrepresentable(
            dir,
            "trainable_token_indices: trained embedding rows are not LoRA tensors (merge the adapter instead)",
        ));
    }
    if get("lora_bias").and_then(|x| x.as_bool()) == Some(true)
        || get("bias").and_then(|x| x.as_str()).is_some_and(|b| b != "none")
    {
        return Err(unrepresentable(dir, "a LoRA bias (lora_bias / bias) has no llama.cpp tensor"));
    }
    if get("invocation_string").is_some() && get("alora_invocation_tokens").is_none() {
        return Err(unrepresentable(
            dir,
            "an aLoRA invocation_string without alora_invocation_tokens (tokenize it into the config first)",
        ));
    }
    Ok(v)
}

/// Python's `str.title()` for a lowercase word: a letter after a non-letter is upper-cased.
fn title_word(w: &str) -> String {
    let mut out = String::with_capacity(w.len());
    let mut prev_letter = false;
    for c in w.chars() {
        if c.is_alphabetic() && !prev_letter {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        prev_letter = c.is_alphabetic();
    }
    out
}

/// gguf-py's `Metadata.id_to_title`: `-` to spaces, lowercase words title-cased unless they look like a version
/// (`v1.2`) or start with a digit. The converter names an adapter by its folder this way.
pub fn id_to_title(id: &str) -> String {
    let version = regex::Regex::new(r"^(v\d+(?:\.\d+)*|\d.*)$").ok();
    id.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            let lower = w.chars().any(|c| c.is_lowercase()) && !w.chars().any(|c| c.is_uppercase());
            if lower && !version.as_ref().is_some_and(|re| re.is_match(w)) {
                title_word(w)
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One tensor in the output type (see the module header for the Q8_0 fallback).
fn to_qtensor(name: &str, t: &Tensor, out: OutType) -> Result<QTensor, ExportError> {
    let terr = |source| ExportError::Tensor { tensor: name.to_string(), source };
    let t = t.to_dtype(candle_core::DType::F32).map_err(terr)?.contiguous().map_err(terr)?;
    let row = t.dims().last().copied().unwrap_or(1);
    let out = if out == OutType::Q8_0 && row % 32 != 0 { OutType::F16 } else { out };
    let values: Vec<f32> = t.flatten_all().and_then(|f| f.to_vec1()).map_err(terr)?;
    let (bytes, dtype): (Vec<u8>, GgmlDType) = match out {
        OutType::F32 => (values.iter().flat_map(|x| x.to_le_bytes()).collect(), GgmlDType::F32),
        // half's conversions round to nearest even, as numpy's astype(float16) and gguf-py's bf16 do.
        OutType::F16 => (values.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(), GgmlDType::F16),
        OutType::Bf16 => {
            (values.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(), GgmlDType::BF16)
        }
        // candle's Q8_0 is ggml's reference quantizer (d = max|x|/127, round half away from zero), as gguf-py's.
        OutType::Q8_0 => return QTensor::quantize(&t, GgmlDType::Q8_0).map_err(terr),
    };
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype).map_err(terr)?;
    QTensor::new(storage, t.shape().clone()).map_err(terr)
}

/// Builds llama.cpp's LoRA adapter GGUF for the PEFT adapter in `dir` on a base described by `base`.
pub fn build(dir: &Path, base: &BaseFacts, out: OutType) -> Result<GgufAdapter, ExportError> {
    let raw = check_representable(dir)?;
    let (cfg, loaded) = peft_format::read_adapter(dir, &Device::Cpu)?;
    let AdapterConfig::Lora(lcfg) = &cfg.adapter else {
        return Err(unrepresentable(dir, "not a LoRA adapter"));
    };
    // llama.cpp's alpha: PEFT's for plain LoRA; for rsLoRA the one whose alpha/r equals alpha/sqrt(r) at the
    // default rank.
    let alpha = if lcfg.use_rslora { lcfg.lora_alpha * (lcfg.r as f64).sqrt() } else { lcfg.lora_alpha };
    let alpha_f32 = alpha as f32;
    let permute = base.arch == "llama";

    let mut tensors = Vec::with_capacity(2 * loaded.len());
    let mut folded = Vec::new();
    for LoadedAdapter { path, adapter } in loaded {
        let LayerAdapter::Lora(layer) = adapter else {
            return Err(unrepresentable(dir, format!("{path} is not a LoRA layer")));
        };
        let Some(gname) = gguf::gguf_name(&format!("{path}.weight")) else {
            return Err(unrepresentable(dir, format!("target `{path}`: llama.cpp has no tensor for it")));
        };
        if gname == "output.weight" && base.tie_word_embeddings {
            return Err(unrepresentable(
                dir,
                format!("target `{path}`: the base ties lm_head to the embedding, so llama.cpp has no output.weight"),
            ));
        }
        let a = layer.a.as_tensor().clone(); // (r, in)
        let mut b = layer.b.as_tensor().clone(); // (out, r)
        let r = a.dims()[0];
        let terr = |source| ExportError::Tensor { tensor: format!("{gname}.lora_b"), source };
        // llama.cpp: scale = alpha / r, or 1 when alpha is 0 (llama-graph.cpp, build_lora_mm).
        let s_llama = if alpha_f32 == 0.0 { 1.0 } else { alpha_f32 as f64 / r as f64 };
        let ratio = layer.scaling / s_llama;
        if (ratio - 1.0).abs() > 1e-6 {
            // Folding the ratio into B is exact: the adapter's output is s·B·A·x.
            b = b.affine(ratio, 0.0).map_err(terr)?;
            folded.push(path.clone());
        }
        if permute {
            let rotary = LayerProjection::of_module(&path).and_then(|p| p.rotary);
            if let Some(heads) = rotary.map(|r| r.count(base.num_attention_heads, base.num_key_value_heads)) {
                b = gguf::permute_rotary_rows(&b, heads).map_err(terr)?;
            }
        }
        let (na, nb) = (format!("{gname}.lora_a"), format!("{gname}.lora_b"));
        let qa = to_qtensor(&na, &a, out)?;
        let qb = to_qtensor(&nb, &b, out)?;
        tensors.push((na, qa));
        tensors.push((nb, qb));
    }

    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| "adapter".into());
    let mut metadata = vec![
        ("general.architecture".to_string(), Value::String(base.arch.clone())),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("general.name".to_string(), Value::String(id_to_title(&name))),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha_f32)),
    ];
    if let Some(tokens) = raw.get("alora_invocation_tokens").and_then(|t| t.as_array()).filter(|a| !a.is_empty()) {
        let ids = tokens
            .iter()
            .map(|t| t.as_u64().and_then(|x| u32::try_from(x).ok()).map(Value::U32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| AdapterError::Format {
                path: dir.join(peft_format::CONFIG_FILE),
                msg: "alora_invocation_tokens: expected token ids".into(),
            })?;
        metadata.push(("adapter.alora.invocation_tokens".to_string(), Value::Array(ids)));
    }
    metadata.push(("general.quantization_version".to_string(), Value::U32(2)));
    Ok(GgufAdapter { metadata, tensors, folded })
}

impl GgufAdapter {
    /// Writes the file to a temporary name beside `path` and renames it into place; an existing `path` is only
    /// replaced when `overwrite` is set.
    pub fn write(&self, path: &Path, overwrite: bool) -> Result<(), ExportError> {
        use std::io::{Seek, SeekFrom, Write};
        if path.exists() && !overwrite {
            return Err(ExportError::Exists { path: path.to_path_buf() });
        }
        let tmp = peft_format::tmp_name(path);
        let io = |source| ExportError::Io { path: tmp.clone(), source };
        let result = (|| {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
            let meta: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let tensors: Vec<(&str, &QTensor)> = self.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
            candle_core::quantized::gguf_file::write(&mut f, &meta, &tensors)
                .map_err(|source| ExportError::Tensor { tensor: "(writing)".into(), source })?;
            // candle writes version 2; version 3 (what llama.cpp writes) only adds big-endian files, so the
            // little-endian layout is the same.
            f.seek(SeekFrom::Start(4)).map_err(io)?;
            f.write_all(&3u32.to_le_bytes()).map_err(io)?;
            let f = f.into_inner().map_err(|e| io(e.into_error()))?;
            f.sync_all().map_err(io)?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path).map_err(|source| ExportError::Io { path: path.to_path_buf(), source })?;
        peft_format::sync_dir(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")));
        Ok(())
    }
}

/// What [`export`] needs.
pub struct ExportOptions {
    pub adapter: PathBuf,
    /// The base model; by default the adapter's `base_model_name_or_path`.
    pub base: Option<String>,
    pub revision: Option<String>,
    pub out: PathBuf,
    pub outtype: OutType,
    pub overwrite: bool,
    pub hub: HubOptions,
}

/// What was written.
#[derive(Debug)]
pub struct ExportReport {
    pub arch: String,
    pub tensors: usize,
    pub bytes: u64,
    pub alpha: f32,
    pub folded: Vec<String>,
}

/// Reads the base's configuration, builds the adapter GGUF and writes it.
pub fn export(opts: &ExportOptions) -> Result<ExportReport, ExportError> {
    let dir = &opts.adapter;
    if opts.out.exists() && !opts.overwrite {
        return Err(ExportError::Exists { path: opts.out.clone() });
    }
    check_representable(dir)?;
    let config = match &opts.base {
        Some(b) => base_config(b, opts.revision.as_deref(), &opts.hub)
            .map_err(|msg| ExportError::Base { base: b.clone(), msg })?,
        None => {
            let cfg = peft_format::read_config(dir)?;
            let b = cfg.base_model_name_or_path.ok_or_else(|| ExportError::NoBase { dir: dir.clone() })?;
            let rev = opts.revision.clone().or(cfg.revision);
            base_config(&b, rev.as_deref(), &opts.hub).map_err(|msg| ExportError::BaseUnresolved {
                dir: dir.clone(),
                base: b.clone(),
                msg,
            })?
        }
    };
    let facts = BaseFacts::from_config(&config);
    let g = build(dir, &facts, opts.outtype)?;
    g.write(&opts.out, opts.overwrite)?;
    let bytes = std::fs::metadata(&opts.out).map(|m| m.len()).unwrap_or(0);
    let alpha = match g.metadata.iter().find(|(k, _)| k == "adapter.lora.alpha") {
        Some((_, Value::F32(a))) => *a,
        _ => 0.0,
    };
    Ok(ExportReport { arch: facts.arch, tensors: g.tensors.len(), bytes, alpha, folded: g.folded })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_title_cased_as_gguf_py_does() {
        // Values of gguf-py's Metadata.id_to_title for the same strings.
        assert_eq!(id_to_title("peft-lora"), "Peft Lora");
        assert_eq!(id_to_title("my-adapter-v0.2"), "My Adapter v0.2");
        assert_eq!(id_to_title("Llama-3-8B-lora"), "Llama 3 8B Lora");
        assert_eq!(id_to_title("qwen2_5-sft"), "Qwen2_5 Sft");
    }

    #[test]
    fn output_types_are_the_converters() {
        assert_eq!(OutType::parse("Q8_0"), Ok(OutType::Q8_0));
        assert!(OutType::parse("q4_k").unwrap_err().contains("f32, f16, bf16, q8_0"));
    }
}
