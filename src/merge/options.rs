//! The merge's options ([`MergeOptions`], [`OutDtype`], `--max-shard-size` as [`parse_size`] reads it), what it
//! reports ([`MergeReport`]) and how it fails ([`MergeError`]).

use super::gguf_quant::GgufQuant;
use super::DEFAULT_MAX_SHARD_SIZE;
use crate::adapter::AdapterError;
use crate::gguf::GgufError;
use crate::hub::{HubError, HubOptions};
use crate::model::ModelError;
use crate::quant::nf4::QuantError;
use candle_core::DType;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The dtype of the merged model's floating-point tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    Bf16,
    F16,
    F32,
}

impl OutDtype {
    /// `bf16`, `f16` or `f32` (also `bfloat16`, `float16`, `float32`, `fp16`, `fp32`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            _ => Err(format!("`{s}` is not an output dtype (bf16, f16 or f32)")),
        }
    }

    /// transformers' name, as `config.json` writes it.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
            Self::F32 => "float32",
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::F32 => DType::F32,
        }
    }

    /// The dtype a config declares (`dtype`, or `torch_dtype` before transformers 5), when it is a 16-bit one.
    pub fn from_config(config: &Value) -> Option<Self> {
        let declared = config.get("dtype").or_else(|| config.get("torch_dtype"))?.as_str()?;
        match declared {
            "bfloat16" => Some(Self::Bf16),
            "float16" => Some(Self::F16),
            _ => None,
        }
    }
}

/// What `peftkit merge` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutFormat {
    /// A Hugging Face model folder (safetensors).
    #[default]
    Safetensors,
    /// One GGUF file for llama.cpp.
    Gguf,
}

impl OutFormat {
    /// `safetensors` (also `hf`) or `gguf`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "safetensors" | "hf" => Ok(Self::Safetensors),
            "gguf" => Ok(Self::Gguf),
            _ => Err(format!("`{s}` is not an output format (safetensors or gguf)")),
        }
    }
}

/// Parses a shard size as transformers' `max_shard_size` does: a number of bytes, or a number with a unit, `KB`,
/// `MB`, `GB`, `TB` (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024). Units are read in any case
/// and always mean bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let unit_bytes: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use a number of bytes, or KB, MB, GB, KiB, MiB, GiB)")),
    };
    let n: f64 = number.parse().map_err(|_| format!("`{s}` is not a size (e.g. 5GB, 500MB, 2GiB or 1000000)"))?;
    let bytes = (n * unit_bytes).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{s}`: a shard size must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// What to merge and where to write it.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The base model: a Hub id, a local folder, or a local `.gguf` file.
    pub base: String,
    /// Hub revision (branch, tag or commit) of a Hub base.
    pub revision: Option<String>,
    /// A `.gguf` file of the Hub repo `base`, used instead of its safetensors weights.
    pub gguf_file: Option<String>,
    /// The PEFT adapter folder.
    pub adapter: PathBuf,
    /// The model folder to write (the file, for [`OutFormat::Gguf`]).
    pub out: PathBuf,
    /// `None`: the base config's dtype when it is bfloat16 or float16, else bf16.
    pub dtype: Option<OutDtype>,
    /// A model folder, or one GGUF file.
    pub format: OutFormat,
    /// The GGUF types (with [`OutFormat::Gguf`]); `None`: a GGUF base's own types, else `dtype`'s, else f16.
    pub quant: Option<GgufQuant>,
    /// Most bytes of tensor data per shard.
    pub max_shard_size: u64,
    /// Merge into the NF4-dequantized weights a QLoRA adapter was trained against, not the 16-bit originals.
    pub from_quantized: bool,
    /// Replace `out` if it exists and is not empty.
    pub overwrite: bool,
    pub hub: HubOptions,
    /// A progress bar over tensors on stderr; otherwise progress is logged once per shard.
    pub progress: bool,
    /// Set (from a Ctrl-C handler, say) to stop between two tensors; the temporary folder is then removed.
    pub interrupt: Option<Arc<AtomicBool>>,
}

impl MergeOptions {
    /// Defaults for everything but the three paths.
    pub fn new(base: impl Into<String>, adapter: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            base: base.into(),
            revision: None,
            gguf_file: None,
            adapter: adapter.into(),
            out: out.into(),
            dtype: None,
            format: OutFormat::Safetensors,
            quant: None,
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            from_quantized: false,
            overwrite: false,
            hub: HubOptions::from_env(),
            progress: false,
            interrupt: None,
        }
    }
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub out: PathBuf,
    pub dtype: OutDtype,
    /// The weight files, in order.
    pub shards: Vec<String>,
    pub tensors: usize,
    /// Projections the adapter changed.
    pub merged_modules: usize,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_bytes: u64,
    /// `lora`, `qlora`, `ia3`.
    pub method: String,
    /// Which weights the adapter was merged into, as the card says it.
    pub weights: String,
    /// For a GGUF file: its types (`q4_k_m`, or the base's).
    pub gguf_types: Option<String>,
}

/// Why a merge failed. [`MergeError::is_user_error`] tells bad input from the rest.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The adapter names a module the base lacks, or one of another shape.
    #[error("{file}: `{tensor}`: {msg}")]
    Mismatch { file: PathBuf, tensor: String, msg: String },
    #[error(
        "{base} is a pre-quantized (bitsandbytes 4-bit) checkpoint: it holds no 16-bit weights. Either pass the \
         original 16-bit model as --base to merge into its weights, or add --from-quantized to merge into the \
         dequantized NF4 weights of this checkpoint (what a QLoRA adapter trained on it saw)"
    )]
    PreQuantized { base: String },
    /// A base peftkit cannot write out faithfully.
    #[error("{path}: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    /// The output folder cannot be used.
    #[error("--out {out}: {msg}")]
    Out { out: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("tensor `{name}`: {source}")]
    Tensor { name: String, source: candle_core::Error },
    #[error("tensor `{name}`: {source}")]
    Quant { name: String, source: QuantError },
    #[error("interrupted; nothing was written")]
    Interrupted,
}

impl MergeError {
    /// Whether the input is at fault (exit code 2), rather than the machine or peftkit.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            MergeError::Adapter(_)
                | MergeError::Hub(_)
                | MergeError::Gguf(_)
                | MergeError::Model(_)
                | MergeError::Mismatch { .. }
                | MergeError::PreQuantized { .. }
                | MergeError::Unsupported { .. }
                | MergeError::Out { .. }
        )
    }
}

impl From<crate::outdir::OutDirError> for MergeError {
    fn from(e: crate::outdir::OutDirError) -> Self {
        use crate::outdir::OutDirError;
        match e {
            OutDirError::Io { path, source } => MergeError::Io { path, source },
            OutDirError::Locked { ref target, .. } => MergeError::Out { out: target.clone(), msg: e.to_string() },
        }
    }
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Io { path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_parse_like_transformers_max_shard_size() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("100KB"), Ok(100_000));
        assert_eq!(parse_size("5GiB"), Ok(5 << 30));
        assert_eq!(parse_size("2mib"), Ok(2 << 20));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("12345"), Ok(12345));
        assert_eq!(parse_size(" 7 MB "), Ok(7_000_000));
        for bad in ["", "GB", "5XB", "-1GB", "0", "0.1", "1e3", "5 G B"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn dtypes_parse_and_default_from_config() {
        assert_eq!(OutDtype::parse("bf16"), Ok(OutDtype::Bf16));
        assert_eq!(OutDtype::parse("float16"), Ok(OutDtype::F16));
        assert_eq!(OutDtype::parse("F32"), Ok(OutDtype::F32));
        assert!(OutDtype::parse("int8").is_err());
        assert_eq!(OutDtype::from_config(&json!({"torch_dtype": "float16"})), Some(OutDtype::F16));
        assert_eq!(
            OutDtype::from_config(&json!({"dtype": "bfloat16", "torch_dtype": "float32"})),
            Some(OutDtype::Bf16)
        );
        assert_eq!(OutDtype::from_config(&json!({"dtype": "float32"})), None);
    }
}
