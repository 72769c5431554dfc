//! `peftkit merge`: fold a PEFT adapter into its base model and write a plain Hugging Face model folder.
//!
//! For every base tensor `<module>.weight` of a module the adapter adapts, W' = merge_weight(W) is computed in f32
//! (LoRA: W + s·B·A; see [`crate::linear::LayerAdapter`]) and `<module>.bias` becomes merge_bias(b); then every
//! floating-point tensor is cast to the output dtype (bf16 and f16 round to nearest even). Nothing else changes: the
//! names and shapes are the base's, so transformers' `from_pretrained` and peftkit load the folder as the base
//! architecture, with no PEFT and no adapter involved.
//!
//! Which weights W are depends on the base and on `from_quantized` ([`MergeOptions`]):
//! - a 16-bit safetensors model: the stored weights; with `from_quantized`, each projection is first quantized to
//!   NF4 and dequantized exactly as QLoRA training held it, so the merged model is the one that was trained;
//! - a pre-quantized bitsandbytes checkpoint: only NF4 weights exist in it, so only `from_quantized` is possible;
//! - a GGUF file: its tensors dequantized to f32 under their transformers names (see [`crate::gguf`]).
//!
//! The output folder is laid out as transformers' `save_pretrained` lays it out:
//! - `model.safetensors`, or shards `model-0000i-of-0000N.safetensors` of at most `max_shard_size` bytes of tensor
//!   data each (a larger tensor gets a shard to itself) listed in `model.safetensors.index.json`
//!   (`{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}`); safetensors metadata `{"format": "pt"}`;
//!   bitsandbytes' auxiliary tensors (`….weight.absmax`, `….weight.quant_state.*`, …) are gone, their weights dense;
//! - `config.json`: the base's, without `quantization_config`, with `torch_dtype` and `dtype` set to the output's;
//! - the tokenizer files and `generation_config.json`, copied (rebuilt from the metadata for a GGUF base);
//! - `README.md`, the model card ([`crate::card::merged_card`]), and the adapter's `peftkit_recipe.yaml` if any.
//!
//! Memory: a shard's header needs only the names, shapes and dtypes, all known before any value is computed, so
//! each shard's header is written first and its tensors are then computed and streamed to disk one at a time. The
//! base is read with positioned reads, not a memory map: the pages of a map stay resident once touched and would
//! make the process as large as the model. Peak memory is a few copies of the largest tensor, whatever the model.
//!
//! Everything is written into a hidden sibling folder `.<out>.tmp-<pid>` that is renamed into place at the end; an
//! existing non-empty `out` is replaced (only with `overwrite`) once the new folder is complete.
//!
//! References: the safetensors format (github.com/huggingface/safetensors, "Format"); transformers' sharded
//! checkpoints (`model.safetensors.index.json`, `max_shard_size`); Hu et al. 2021, "LoRA", §4 (merging W + BA).

use crate::adapter::peft_format::{self, LoadedAdapter, PeftConfig};
use crate::adapter::AdapterError;
use crate::card::{self, MergedFacts, TrainingRecord, TRAINING_RECORD_FILE};
use crate::gguf::{self, GgufError, GgufFile, GgufTensors};
use crate::hub::{self, HubError, HubOptions, ModelSource};
use crate::model::{ConfigError, ModelConfig, ModelError, TensorSource, WeightSource};
use crate::quant::nf4::{Nf4Tensor, QuantError};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// transformers' default `max_shard_size` (5 GB).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;
/// The resolved recipe peftkit writes beside a trained adapter.
pub const RECIPE_FILE: &str = "peftkit_recipe.yaml";
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

// ---------------------------------------------------------------------------------------------
// Options, report, errors
// ---------------------------------------------------------------------------------------------

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
    /// The model folder to write.
    pub out: PathBuf,
    /// `None`: the base config's dtype when it is bfloat16 or float16, else bf16.
    pub dtype: Option<OutDtype>,
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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Io { path: path.to_path_buf(), source }
}

// ---------------------------------------------------------------------------------------------
// The merge, top to bottom
// ---------------------------------------------------------------------------------------------

/// Merges `opts.adapter` into `opts.base` and writes the model to `opts.out` (see the module documentation).
pub fn merge(opts: &MergeOptions) -> Result<MergeReport, MergeError> {
    // 1. Cheap checks first: the output folder, then the adapter (before any download).
    check_out_folder(&opts.out, opts.overwrite)?;
    let (peft, adapters) = peft_format::read_adapter(&opts.adapter, &Device::Cpu)?;
    let trained = TrainingInfo::read(&opts.adapter);

    // 2. The base: its config, its tensors (names, shapes) and how to read them.
    let base = Base::open(opts)?;
    check_not_an_input(&opts.out, &[base.path.clone(), opts.adapter.clone()])?;
    warn_if_trained_on_another_base(&peft, &base, &opts.adapter);

    // 3. Which weights the adapter goes into.
    let peft_method = peft.adapter.peft_type().to_ascii_lowercase();
    let prequantized = base.tensors.iter().any(|t| t.nf4);
    let method = match &trained.method {
        Some(m) => m.clone(),
        // A LoRA adapter meant for NF4 weights is QLoRA, whatever the folder says.
        None if peft_method == "lora" && (prequantized || opts.from_quantized) => "qlora".to_string(),
        None => peft_method.clone(),
    };
    if prequantized && !opts.from_quantized {
        return Err(MergeError::PreQuantized { base: base.name.clone() });
    }
    let requantize = opts.from_quantized && !prequantized;
    if opts.from_quantized && trained.method.as_deref() == Some("lora") {
        tracing::warn!(
            "{} was trained as LoRA on unquantized weights; --from-quantized merges it into NF4-rounded weights anyway",
            opts.adapter.display()
        );
    }
    if method == "qlora" && !opts.from_quantized {
        tracing::info!(
            "{} is a QLoRA adapter: merging it into the base's original weights, not the NF4-rounded ones it was \
             trained against (pass --from-quantized for those)",
            opts.adapter.display()
        );
    }
    let weights = describe_weights(&base, opts.from_quantized, prequantized, trained.double_quant);

    // 4. The plan: every output tensor, how to get it, which adapter to fold in; then the shards.
    let dtype = opts.dtype.or_else(|| OutDtype::from_config(&base.config)).unwrap_or(OutDtype::Bf16);
    let plan = plan_tensors(&base, &adapters, dtype, requantize.then_some(trained.double_quant), opts)?;
    let sizes: Vec<u64> = plan.iter().map(Planned::bytes).collect();
    let shards = assign_shards(&sizes, opts.max_shard_size);
    let shard_names: Vec<String> = if shards.len() == 1 {
        vec![hub::WEIGHTS_FILE.to_string()]
    } else {
        (1..=shards.len()).map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len())).collect()
    };
    let total_bytes: u64 = sizes.iter().sum();
    let merged_modules = plan.iter().filter(|p| matches!(p.merge, Some((_, Part::Weight)))).count();
    tracing::info!(
        "merging {} ({} adapter, {merged_modules} projections) into {}: {} tensors, {:.1} MB in {}, {} shard(s)",
        opts.adapter.display(),
        card::method_title(&method),
        base.name,
        plan.len(),
        total_bytes as f64 / 1e6,
        dtype.hf_name(),
        shards.len()
    );

    // 5. Everything into a temporary folder beside `out`.
    let tmp = TempDir::create(&opts.out)?;
    let gguf_tensors;
    let src: &dyn TensorSource = match &base.reader {
        Reader::Safetensors(st) => st,
        Reader::Gguf { file, config, .. } => {
            gguf_tensors = GgufTensors::new(file, config)?;
            &gguf_tensors
        }
    };
    let progress = Progress::new(opts.progress, plan.len());
    for (range, name) in shards.iter().zip(&shard_names) {
        write_shard(&tmp.path.join(name), &plan[range.clone()], src, &adapters, &progress, opts)?;
        let bytes: u64 = sizes[range.clone()].iter().sum();
        progress.log(format!("wrote {name}: {} tensors, {:.1} MB", range.len(), bytes as f64 / 1e6));
    }
    progress.finish();
    if shards.len() > 1 {
        let mut weight_map = BTreeMap::new();
        for (range, name) in shards.iter().zip(&shard_names) {
            for p in &plan[range.clone()] {
                weight_map.insert(p.name.clone(), name.clone());
            }
        }
        let index = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
        write_json(&tmp.path.join(hub::WEIGHTS_INDEX_FILE), &index)?;
    }
    write_json(&tmp.path.join(hub::CONFIG_FILE), &merged_config(&base.config, dtype))?;
    let has_tokenizer = match &base.reader {
        Reader::Safetensors(_) => {
            for f in &base.copied_files {
                let to = tmp.path.join(f.file_name().unwrap_or_default());
                std::fs::copy(f, &to).map_err(io_err(f))?;
            }
            base.copied_files.iter().any(|f| f.ends_with(hub::TOKENIZER_FILE))
        }
        Reader::Gguf { file, .. } => {
            write_gguf_tokenizer(file, &tmp.path)?;
            true
        }
    };
    if !has_tokenizer {
        tracing::warn!("{} has no tokenizer files: the merged folder has none either", base.name);
    }
    if let Some(yaml) = &trained.recipe_yaml {
        write_file(&tmp.path.join(RECIPE_FILE), yaml.as_bytes())?;
    }
    let facts = MergedFacts {
        base_model: base.name.clone(),
        base_is_hub: matches!(base.source, ModelSource::Hub { .. }),
        revision: match &base.source {
            ModelSource::Hub { revision, commit, .. } => Some(commit.clone().unwrap_or_else(|| revision.clone())),
            ModelSource::Local(_) => None,
        },
        license: base.license.clone(),
        method: method.clone(),
        peft_type: peft.adapter.peft_type().to_string(),
        adapter_dir: opts.adapter.display().to_string(),
        merged_modules,
        weights: weights.clone(),
        dtype: dtype.hf_name().to_string(),
        out_dir: opts.out.display().to_string(),
        shards: shards.len(),
        total_bytes,
        has_tokenizer,
    };
    let card_text = card::merged_card(&facts, trained.record.as_ref(), trained.recipe_yaml.as_deref());
    write_file(&tmp.path.join("README.md"), card_text.as_bytes())?;

    // 6. Into place.
    tmp.persist(&opts.out)?;
    Ok(MergeReport {
        out: opts.out.clone(),
        dtype,
        shards: shard_names,
        tensors: plan.len(),
        merged_modules,
        total_bytes,
        method,
        weights,
    })
}

// ---------------------------------------------------------------------------------------------
// The adapter folder
// ---------------------------------------------------------------------------------------------

/// What an adapter folder says about how the adapter was trained (peftkit writes both files beside it).
struct TrainingInfo {
    record: Option<TrainingRecord>,
    recipe_yaml: Option<String>,
    /// The recipe's `adapter.type`, else the record's method: `lora`, `qlora`, `ia3`.
    method: Option<String>,
    /// A QLoRA recipe's `adapter.bnb_4bit_use_double_quant` (default true, as in bitsandbytes' QLoRA setup).
    double_quant: bool,
}

impl TrainingInfo {
    /// Reads what is there; a file that cannot be read is reported and ignored (it only feeds the card).
    fn read(dir: &Path) -> Self {
        let record_path = dir.join(TRAINING_RECORD_FILE);
        let record = std::fs::read_to_string(&record_path).ok().and_then(|t| {
            serde_json::from_str::<TrainingRecord>(&t)
                .map_err(|e| tracing::warn!("{}: ignored: {e}", record_path.display()))
                .ok()
        });
        let recipe_path = dir.join(RECIPE_FILE);
        let recipe_yaml = std::fs::read_to_string(&recipe_path).ok();
        let recipe: Option<serde_yaml::Value> = recipe_yaml.as_deref().and_then(|t| {
            serde_yaml::from_str(t).map_err(|e| tracing::warn!("{}: ignored: {e}", recipe_path.display())).ok()
        });
        let adapter = recipe.as_ref().and_then(|r| r.get("adapter"));
        let method = adapter
            .and_then(|a| a.get("type"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .or_else(|| record.as_ref().map(|r| r.method.clone()));
        let double_quant =
            adapter.and_then(|a| a.get("bnb_4bit_use_double_quant")).and_then(|v| v.as_bool()).unwrap_or(true);
        Self { record, recipe_yaml, method, double_quant }
    }
}

/// Warns when the adapter config names another base (the same model named two ways is the same model).
fn warn_if_trained_on_another_base(peft: &PeftConfig, base: &Base, adapter: &Path) {
    let Some(trained_on) = &peft.base_model_name_or_path else { return };
    let same = |a: &str, b: &str| {
        a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
    };
    if !same(trained_on, &base.name) {
        tracing::warn!("{} was trained on `{trained_on}`, not `{}`", adapter.display(), base.name);
    }
}

// ---------------------------------------------------------------------------------------------
// The base
// ---------------------------------------------------------------------------------------------

/// One tensor of the base as the merged model will hold it.
struct BaseTensor {
    name: String,
    /// The dense shape (a bitsandbytes weight's is in its quant state, not its packed storage).
    shape: Vec<usize>,
    /// The dtype as read: the stored one, F32 for a GGUF or NF4 tensor (dequantized).
    dtype: DType,
    /// Stored by bitsandbytes in NF4 (a pre-quantized checkpoint).
    nf4: bool,
}

/// Where the base's tensors come from.
enum Reader {
    Safetensors(SafetensorsFiles),
    Gguf {
        file: GgufFile,
        config: ModelConfig,
        /// llama.cpp's name of the file's quantization (`general.file_type`), e.g. `Q4_1`.
        quant: Option<&'static str>,
    },
}

/// The base model as merge reads it.
struct Base {
    /// The Hub id, or the local path as given.
    name: String,
    source: ModelSource,
    /// The model folder or the GGUF file (an input the output must not replace).
    path: PathBuf,
    /// `config.json` (for a GGUF file, the one built from its metadata).
    config: Value,
    /// The license the base declares (its model card's front matter or `license` in config.json; `general.license`
    /// in a GGUF file).
    license: Option<String>,
    /// Every tensor the merged model holds, in the base's order.
    tensors: Vec<BaseTensor>,
    reader: Reader,
    /// Tokenizer files and `generation_config.json`, copied as they are (safetensors bases).
    copied_files: Vec<PathBuf>,
}

impl Base {
    fn open(opts: &MergeOptions) -> Result<Self, MergeError> {
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
        if config.rope_freq_factors.is_some() {
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
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        // (module, out, in, has a bias)
        for (m, o, n, bias) in [
            ("self_attn.q_proj", q, h, cfg.qkv_bias),
            ("self_attn.k_proj", kv, h, cfg.qkv_bias),
            ("self_attn.v_proj", kv, h, cfg.qkv_bias),
            ("self_attn.o_proj", h, q, cfg.o_bias),
            ("mlp.gate_proj", i, h, cfg.mlp_bias),
            ("mlp.up_proj", i, h, cfg.mlp_bias),
            ("mlp.down_proj", h, i, cfg.mlp_bias),
        ] {
            out.push((format!("{p}.{m}.weight"), vec![o, n]));
            if bias {
                out.push((format!("{p}.{m}.bias"), vec![o]));
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
fn describe_weights(base: &Base, from_quantized: bool, prequantized: bool, double_quant: bool) -> String {
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

// ---------------------------------------------------------------------------------------------
// Reading safetensors files without a memory map
// ---------------------------------------------------------------------------------------------

/// A tensor's place in a safetensors file.
struct StEntry {
    file: usize,
    /// `None` for dtypes candle cannot hold (F8 variants, bool, …).
    dtype: Option<DType>,
    dtype_name: String,
    shape: Vec<usize>,
    /// Byte range within the file.
    range: Range<u64>,
}

struct StFile {
    path: PathBuf,
    handle: Mutex<std::fs::File>,
}

/// Safetensors files read tensor by tensor with positioned reads: each header is parsed once (with the safetensors
/// crate), a tensor's bytes are read when it is needed. bitsandbytes' NF4 weights are read through
/// [`WeightSource`], the model loader's reader, which knows their parts.
struct SafetensorsFiles {
    files: Vec<StFile>,
    /// Tensor names in file order (files in the order given, tensors by offset).
    order: Vec<String>,
    entries: HashMap<String, StEntry>,
    nf4: Option<WeightSource>,
}

impl SafetensorsFiles {
    fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::new();
        let mut order = Vec::new();
        let mut entries = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let bad = |msg: String| ModelError::Open { file: path.clone(), source: candle_core::Error::Msg(msg) };
            let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
            let file_len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
            let mut n = [0u8; 8];
            f.read_exact(&mut n).map_err(|e| bad(format!("cannot read the header size: {e}")))?;
            let n = u64::from_le_bytes(n);
            // The safetensors crate's own limit on a header.
            if n > 100_000_000 || 8 + n > file_len {
                return Err(bad(format!("header of {n} bytes does not fit the file ({file_len} bytes)")));
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
            let meta: safetensors::tensor::Metadata =
                serde_json::from_slice(&header).map_err(|e| bad(format!("invalid header: {e}")))?;
            let infos = meta.tensors();
            for name in meta.offset_keys() {
                let Some(info) = infos.get(&name) else { continue };
                let (s, e) = info.data_offsets;
                let range = 8 + n + s as u64..8 + n + e as u64;
                if range.end > file_len {
                    return Err(bad(format!("tensor `{name}` ends past the end of the file (truncated?)")));
                }
                let entry = StEntry {
                    file: index,
                    dtype: candle_dtype(info.dtype),
                    dtype_name: format!("{:?}", info.dtype),
                    shape: info.shape.clone(),
                    range,
                };
                order.push(name.clone());
                // As for sharded checkpoints: a name in two files is read from the last.
                entries.insert(name, entry);
            }
            files.push(StFile { path: path.clone(), handle: Mutex::new(f) });
        }
        let mut seen = HashSet::new();
        order.retain(|n| seen.insert(n.clone()));
        Ok(Self { files, order, entries, nf4: None })
    }

    fn names(&self) -> Vec<String> {
        self.order.clone()
    }

    fn entries(&self) -> impl Iterator<Item = (String, &StEntry)> {
        self.order.iter().filter_map(|n| self.entries.get(n).map(|e| (n.clone(), e)))
    }

    /// The raw bytes of a tensor.
    fn bytes(&self, name: &str, e: &StEntry) -> Result<Vec<u8>, ModelError> {
        let f = &self.files[e.file];
        let err = |source: std::io::Error| ModelError::Tensor {
            name: name.to_string(),
            files: f.path.display().to_string(),
            source: candle_core::Error::Msg(source.to_string()),
        };
        let mut buf = vec![0u8; (e.range.end - e.range.start) as usize];
        let mut handle = f.handle.lock().unwrap_or_else(|p| p.into_inner());
        handle.seek(SeekFrom::Start(e.range.start)).map_err(err)?;
        handle.read_exact(&mut buf).map_err(err)?;
        Ok(buf)
    }

    /// The dense shape of a bitsandbytes 4-bit weight, from its quant state (JSON stored as u8 bytes).
    fn bnb_shape(&self, state_key: &str) -> Result<Vec<usize>, ModelError> {
        let e = &self.entries[state_key];
        let bad = |msg: String| ModelError::Quantized {
            name: state_key.to_string(),
            files: self.files[e.file].path.display().to_string(),
            msg,
        };
        let state: Value =
            serde_json::from_slice(&self.bytes(state_key, e)?).map_err(|err| bad(format!("not JSON: {err}")))?;
        state
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("the quant state has no `shape`".into()))
    }
}

impl TensorSource for SafetensorsFiles {
    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, ModelError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), files: self.describe() })?;
        if e.shape != shape {
            return Err(ModelError::Shape { name: name.to_string(), got: e.shape.clone(), expected: shape.to_vec() });
        }
        let stored = e.dtype.ok_or_else(|| ModelError::Tensor {
            name: name.to_string(),
            files: self.files[e.file].path.display().to_string(),
            source: candle_core::Error::Msg(format!("dtype {} is not supported", e.dtype_name)),
        })?;
        let t = Tensor::from_raw_buffer(&self.bytes(name, e)?, stored, shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn describe(&self) -> String {
        self.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    fn nf4_weight(&self, name: &str, shape: &[usize]) -> Result<Option<Nf4Tensor>, ModelError> {
        match &self.nf4 {
            Some(ws) => TensorSource::nf4_weight(ws, name, shape),
            None => Ok(None),
        }
    }
}

/// The candle dtype of a safetensors dtype, for those candle holds.
fn candle_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I16 => DType::I16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::BF16 => DType::BF16,
        S::F16 => DType::F16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        _ => return None,
    })
}

/// The safetensors dtype written for a candle dtype.
fn st_dtype(d: DType) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as S;
    Some(match d {
        DType::U8 => S::U8,
        DType::U32 => S::U32,
        DType::I16 => S::I16,
        DType::I32 => S::I32,
        DType::I64 => S::I64,
        DType::BF16 => S::BF16,
        DType::F16 => S::F16,
        DType::F32 => S::F32,
        DType::F64 => S::F64,
        _ => return None,
    })
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::BF16 | DType::F16 | DType::F32 | DType::F64)
}

// ---------------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------------

/// How an output tensor's values are obtained from the base.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fetch {
    /// As stored (dequantized, for a GGUF base).
    Stored,
    /// A bitsandbytes NF4 weight of a pre-quantized checkpoint, dequantized.
    StoredNf4,
    /// A projection quantized to NF4 and dequantized again, as QLoRA training held it.
    Nf4RoundTrip { double_quant: bool },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    Weight,
    Bias,
}

/// One tensor of the output and how to compute it.
struct Planned {
    name: String,
    shape: Vec<usize>,
    /// The dtype written: the output dtype for floating-point tensors, the stored one otherwise.
    dtype: DType,
    fetch: Fetch,
    /// The adapter to fold in (an index into the adapter list), into the weight or the bias.
    merge: Option<(usize, Part)>,
}

impl Planned {
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// Whether `name` is a projection weight that QLoRA holds in NF4.
fn is_projection(name: &str) -> bool {
    name.starts_with("model.layers.")
        && crate::model::LAYER_PROJECTIONS
            .iter()
            .any(|p| name.strip_suffix(".weight").is_some_and(|m| m.ends_with(&format!(".{p}"))))
}

/// Every output tensor, with the adapter of its module; checks that every adapter module is in the base with a
/// shape it fits. `requantize`: round-trip the projections through NF4 with this double-quantization setting.
fn plan_tensors(
    base: &Base,
    adapters: &[LoadedAdapter],
    dtype: OutDtype,
    requantize: Option<bool>,
    opts: &MergeOptions,
) -> Result<Vec<Planned>, MergeError> {
    let file = opts.adapter.join(peft_format::WEIGHTS_FILE);
    let peft_name = |path: &str| format!("base_model.model.{path}");
    let by_path: HashMap<&str, usize> = adapters.iter().enumerate().map(|(i, a)| (a.path.as_str(), i)).collect();
    let mut used = vec![false; adapters.len()];
    let mut plan = Vec::with_capacity(base.tensors.len());
    for t in &base.tensors {
        let fetch = match requantize {
            _ if t.nf4 => Fetch::StoredNf4,
            Some(double_quant) if is_projection(&t.name) => Fetch::Nf4RoundTrip { double_quant },
            _ => Fetch::Stored,
        };
        let module_of = |suffix: &str| t.name.strip_suffix(suffix).and_then(|m| by_path.get(m).copied());
        let merge = match (module_of(".weight"), module_of(".bias")) {
            (Some(i), _) => Some((i, Part::Weight)),
            (None, Some(i)) => Some((i, Part::Bias)),
            (None, None) => None,
        };
        if let Some((i, part)) = merge {
            let tensor = peft_name(&adapters[i].path);
            let mismatch = |msg: String| MergeError::Mismatch { file: file.clone(), tensor: tensor.clone(), msg };
            if !is_float(t.dtype) {
                return Err(mismatch(format!("the base's `{}` is not a floating-point tensor", t.name)));
            }
            if part == Part::Weight {
                let [out_f, in_f] = t.shape[..] else {
                    return Err(mismatch(format!("the base's `{}` has shape {:?}, not a matrix", t.name, t.shape)));
                };
                adapters[i]
                    .adapter
                    .check_fits(out_f, in_f)
                    .map_err(|msg| mismatch(format!("{msg}; the base's `{}` is {:?}", t.name, t.shape)))?;
                used[i] = true;
            }
        }
        let out_dtype = if is_float(t.dtype) { dtype.dtype() } else { t.dtype };
        plan.push(Planned { name: t.name.clone(), shape: t.shape.clone(), dtype: out_dtype, fetch, merge });
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(MergeError::Mismatch {
            file,
            tensor: peft_name(&adapters[i].path),
            msg: format!(
                "the base {} has no tensor `{}.weight` (is the adapter for another model?)",
                base.name, adapters[i].path
            ),
        });
    }
    Ok(plan)
}

/// Splits tensors of `sizes` bytes, in order, into shards of at most `max` bytes; a tensor larger than `max` gets a
/// shard to itself (transformers' rule). Returns index ranges; at least one (empty when there are no tensors).
fn assign_shards(sizes: &[u64], max: u64) -> Vec<Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && bytes + s > max {
            shards.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += s;
    }
    shards.push(start..sizes.len());
    shards
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// Computes one output tensor: read (dequantize, or round-trip through NF4), fold the adapter in, cast.
fn compute(p: &Planned, src: &dyn TensorSource, adapters: &[LoadedAdapter]) -> Result<Tensor, MergeError> {
    let cpu = Device::Cpu;
    let terr = |source: candle_core::Error| MergeError::Tensor { name: p.name.clone(), source };
    let qerr = |source: QuantError| MergeError::Quant { name: p.name.clone(), source };
    // A merged tensor is read in f32 (merge_weight works in f32); any other straight into the output dtype.
    let read_dtype = if p.merge.is_some() || p.fetch != Fetch::Stored { DType::F32 } else { p.dtype };
    let t = match p.fetch {
        Fetch::Stored => src.get(&p.name, &p.shape, read_dtype, &cpu)?,
        Fetch::StoredNf4 => {
            let q = src.nf4_weight(&p.name, &p.shape)?.ok_or_else(|| ModelError::Quantized {
                name: p.name.clone(),
                files: src.describe(),
                msg: "expected a bitsandbytes NF4 weight".into(),
            })?;
            Tensor::from_vec(q.dequantize(), p.shape.as_slice(), &cpu).map_err(terr)?
        }
        Fetch::Nf4RoundTrip { double_quant } => {
            let w = src.get(&p.name, &p.shape, DType::F32, &cpu)?;
            let w = w.flatten_all().and_then(|w| w.to_vec1::<f32>()).map_err(terr)?;
            let q = Nf4Tensor::quantize(&w, &p.shape, double_quant).map_err(qerr)?;
            Tensor::from_vec(q.dequantize(), p.shape.as_slice(), &cpu).map_err(terr)?
        }
    };
    let t = match p.merge {
        Some((i, Part::Weight)) => adapters[i].adapter.merge_weight(&t),
        Some((i, Part::Bias)) => adapters[i].adapter.merge_bias(&t),
        None => Ok(t),
    }
    .map_err(terr)?;
    // candle's f32 → bf16/f16 conversion rounds to nearest even (half's from_f32).
    t.to_dtype(p.dtype).map_err(terr)
}

/// Writes one safetensors shard: the header (names, dtypes, shapes, offsets, `{"format": "pt"}`) first, then each
/// tensor as it is computed. Tensors go in the order given, stably sorted by element size, largest first, so that
/// every tensor's data is aligned to its element size (the header is padded to a multiple of 8 bytes).
fn write_shard(
    path: &Path,
    tensors: &[Planned],
    src: &dyn TensorSource,
    adapters: &[LoadedAdapter],
    progress: &Progress,
    opts: &MergeOptions,
) -> Result<(), MergeError> {
    let mut items: Vec<&Planned> = tensors.iter().collect();
    items.sort_by_key(|p| std::cmp::Reverse(p.dtype.size_in_bytes()));
    let mut infos = Vec::with_capacity(items.len());
    let mut offset = 0usize;
    for p in &items {
        let dtype = st_dtype(p.dtype).ok_or_else(|| MergeError::Unsupported {
            path: path.to_path_buf(),
            msg: format!("tensor `{}`: dtype {:?} cannot be written", p.name, p.dtype),
        })?;
        let n = p.bytes() as usize;
        infos.push((
            p.name.clone(),
            safetensors::tensor::TensorInfo { dtype, shape: p.shape.clone(), data_offsets: (offset, offset + n) },
        ));
        offset += n;
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let header = safetensors::tensor::Metadata::new(Some(meta), infos)
        .map_err(|e| MergeError::Io { path: path.into(), source: std::io::Error::other(e.to_string()) })?;
    let mut header = serde_json::to_vec(&header)
        .map_err(|e| MergeError::Io { path: path.into(), source: std::io::Error::other(e.to_string()) })?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io_err(path))?;
    w.write_all(&header).map_err(io_err(path))?;
    for p in items {
        if opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            return Err(MergeError::Interrupted);
        }
        let t = compute(p, src, adapters)?;
        let written = write_tensor(&t, &mut w).map_err(|e| match e {
            WriteError::Io(source) => MergeError::Io { path: path.into(), source },
            WriteError::Candle(source) => MergeError::Tensor { name: p.name.clone(), source },
        })?;
        if written != p.bytes() {
            return Err(MergeError::Tensor {
                name: p.name.clone(),
                source: candle_core::Error::Msg(format!("{written} bytes computed, {} planned", p.bytes())),
            });
        }
        progress.tick(&p.name);
    }
    let file = w.into_inner().map_err(|e| MergeError::Io { path: path.into(), source: e.into_error() })?;
    file.sync_all().map_err(io_err(path))
}

enum WriteError {
    Io(std::io::Error),
    Candle(candle_core::Error),
}

/// Writes a tensor's elements, row-major, little-endian; returns the bytes written.
fn write_tensor(t: &Tensor, w: &mut impl Write) -> Result<u64, WriteError> {
    let t = t.flatten_all().map_err(WriteError::Candle)?;
    macro_rules! le {
        ($ty:ty) => {
            write_le(&t.to_vec1::<$ty>().map_err(WriteError::Candle)?, w, <$ty>::to_le_bytes).map_err(WriteError::Io)
        };
    }
    match t.dtype() {
        DType::F32 => le!(f32),
        DType::BF16 => le!(half::bf16),
        DType::F16 => le!(half::f16),
        DType::F64 => le!(f64),
        DType::U8 => le!(u8),
        DType::U32 => le!(u32),
        DType::I16 => le!(i16),
        DType::I32 => le!(i32),
        DType::I64 => le!(i64),
        other => Err(WriteError::Candle(candle_core::Error::Msg(format!("cannot write dtype {other:?}")))),
    }
}

fn write_le<T: Copy, const N: usize>(v: &[T], w: &mut impl Write, le: fn(T) -> [u8; N]) -> std::io::Result<u64> {
    const CHUNK: usize = 1 << 16;
    let mut buf = Vec::with_capacity(CHUNK * N);
    for chunk in v.chunks(CHUNK) {
        buf.clear();
        for &x in chunk {
            buf.extend_from_slice(&le(x));
        }
        w.write_all(&buf)?;
    }
    Ok((v.len() * N) as u64)
}

/// The base's config for the merged model: no `quantization_config` (the weights are dense now), and `torch_dtype`
/// and `dtype` (transformers 5's name) both set to the output dtype. Every other key is kept, in its place.
fn merged_config(base: &Value, dtype: OutDtype) -> Value {
    let mut c = base.clone();
    if let Some(obj) = c.as_object_mut() {
        obj.shift_remove("quantization_config");
        obj.insert("torch_dtype".into(), json!(dtype.hf_name()));
        obj.insert("dtype".into(), json!(dtype.hf_name()));
    }
    c
}

/// The tokenizer files of a GGUF base, rebuilt from its metadata: `tokenizer.json` (the tokenizer peftkit rebuilds,
/// see [`gguf::build_tokenizer`]), `tokenizer_config.json` (special tokens and the chat template, also written as
/// `chat_template.jinja`) and `generation_config.json` (BOS, EOS and end-of-turn ids, padding id).
fn write_gguf_tokenizer(file: &GgufFile, dir: &Path) -> Result<(), MergeError> {
    let tokenizer = gguf::build_tokenizer(file)?;
    let tok_path = dir.join(hub::TOKENIZER_FILE);
    let json_text = tokenizer
        .to_string(false)
        .map_err(|e| MergeError::Io { path: tok_path.clone(), source: std::io::Error::other(e.to_string()) })?;
    write_file(&tok_path, json_text.as_bytes())?;

    let id = |key: &str| -> Result<Option<u32>, MergeError> { Ok(file.uint(key)?.map(|v| v as u32)) };
    let (bos, eos, pad, unk) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
        id("tokenizer.ggml.unknown_token_id")?,
    );
    let template = file.string("tokenizer.chat_template")?.filter(|t| !t.trim().is_empty());
    let mut cfg = serde_json::Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    for (key, id) in [("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)] {
        if let Some(t) = id.and_then(|i| tokenizer.id_to_token(i)) {
            cfg.insert(key.into(), json!(t));
        }
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(t) = &template {
        cfg.insert("chat_template".into(), json!(t));
        write_file(&dir.join(hub::CHAT_TEMPLATE_FILE), t.as_bytes())?;
    }
    write_json(&dir.join(hub::TOKENIZER_CONFIG_FILE), &Value::Object(cfg))?;

    // Generation stops at EOS and at the end-of-turn / end-of-message tokens llama.cpp records.
    let mut stops: Vec<u32> = Vec::new();
    for i in [eos, id("tokenizer.ggml.eot_token_id")?, id("tokenizer.ggml.eom_token_id")?].into_iter().flatten() {
        if !stops.contains(&i) {
            stops.push(i);
        }
    }
    let mut gen = serde_json::Map::new();
    if let Some(b) = bos {
        gen.insert("bos_token_id".into(), json!(b));
    }
    match stops.as_slice() {
        [] => {}
        [one] => {
            gen.insert("eos_token_id".into(), json!(one));
        }
        many => {
            gen.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(p) = pad {
        gen.insert("pad_token_id".into(), json!(p));
    }
    write_json(&dir.join(hub::GENERATION_CONFIG_FILE), &Value::Object(gen))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), MergeError> {
    std::fs::write(path, bytes).map_err(io_err(path))
}

fn write_json(path: &Path, v: &Value) -> Result<(), MergeError> {
    let mut text = serde_json::to_string_pretty(v)
        .map_err(|e| MergeError::Io { path: path.into(), source: std::io::Error::other(e.to_string()) })?;
    text.push('\n');
    write_file(path, text.as_bytes())
}

/// A progress bar over tensors, or (without a terminal) one log line per shard.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(show: bool, tensors: usize) -> Self {
        let bar = show.then(|| {
            let bar = indicatif::ProgressBar::new(tensors as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tensors [{elapsed_precise}<{eta}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self { bar }
    }

    fn tick(&self, name: &str) {
        if let Some(b) = &self.bar {
            b.set_message(name.to_string());
            b.inc(1);
        }
    }

    fn log(&self, line: String) {
        match &self.bar {
            Some(b) => b.println(line),
            None => tracing::info!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The output folder
// ---------------------------------------------------------------------------------------------

/// `out` must name a folder that is absent, empty, or (with `overwrite`) replaceable.
fn check_out_folder(out: &Path, overwrite: bool) -> Result<(), MergeError> {
    let bad = |msg: &str| Err(MergeError::Out { out: out.to_path_buf(), msg: msg.to_string() });
    if out.file_name().is_none() {
        return bad("must name a folder (not `.`, `..` or a root)");
    }
    if out.exists() {
        if !out.is_dir() {
            return bad("exists and is not a folder");
        }
        let empty = std::fs::read_dir(out).map_err(io_err(out))?.next().is_none();
        if !empty && !overwrite {
            return bad(
                "exists and is not empty: pass --overwrite to replace it (it is replaced only once the merged model \
                 is complete)",
            );
        }
    }
    Ok(())
}

/// Refuses an output folder that is, or contains, one of the inputs: replacing it would delete what is being read.
fn check_not_an_input(out: &Path, inputs: &[PathBuf]) -> Result<(), MergeError> {
    let abs_out = match std::fs::canonicalize(out) {
        Ok(p) => p,
        Err(_) => {
            match (out.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }), out.file_name()) {
                (Some(parent), Some(name)) => match std::fs::canonicalize(parent) {
                    Ok(p) => p.join(name),
                    Err(_) => return Ok(()), // the parent does not exist: nothing in it can be an input
                },
                _ => return Ok(()),
            }
        }
    };
    for input in inputs {
        if std::fs::canonicalize(input).is_ok_and(|i| i.starts_with(&abs_out)) {
            return Err(MergeError::Out {
                out: out.to_path_buf(),
                msg: format!("is or contains the input {}; choose another folder", input.display()),
            });
        }
    }
    Ok(())
}

/// The hidden sibling folder the output is written into; removed when dropped unless moved into place.
struct TempDir {
    path: PathBuf,
    persisted: bool,
}

impl TempDir {
    fn create(out: &Path) -> Result<Self, MergeError> {
        let path = peft_format::tmp_name(out);
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        // A leftover of an earlier run with the same process id.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(io_err(&path))?;
        Ok(Self { path, persisted: false })
    }

    /// Renames the folder to `out`. An existing `out` (empty, or non-empty when the caller allowed overwriting) is
    /// moved aside first and deleted once the new folder is in place.
    fn persist(mut self, out: &Path) -> Result<(), MergeError> {
        let mut old = None;
        if out.is_dir() {
            let aside = out.with_file_name(format!(
                ".{}.old-{}",
                out.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&aside);
            std::fs::rename(out, &aside).map_err(io_err(out))?;
            old = Some(aside);
        }
        if let Err(e) = std::fs::rename(&self.path, out) {
            if let Some(aside) = &old {
                let _ = std::fs::rename(aside, out);
            }
            return Err(MergeError::Io { path: out.to_path_buf(), source: e });
        }
        self.persisted = true;
        peft_format::sync_dir(out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")));
        if let Some(aside) = old {
            if let Err(e) = std::fs::remove_dir_all(&aside) {
                tracing::warn!("could not remove the replaced folder {}: {e}", aside.display());
            }
        }
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn shards_follow_transformers_rule() {
        // Greedy in order; a tensor larger than the limit is alone.
        assert_eq!(assign_shards(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(assign_shards(&[3, 20, 3, 3], 8), vec![0..1, 1..2, 2..4]);
        assert_eq!(assign_shards(&[20], 8), vec![0..1]);
        assert_eq!(assign_shards(&[1, 1, 1], 100), vec![0..3]);
        assert_eq!(assign_shards(&[], 100), vec![0..0]);
    }

    #[test]
    fn projections_are_the_seven_llama_linears() {
        assert!(is_projection("model.layers.0.self_attn.q_proj.weight"));
        assert!(is_projection("model.layers.11.mlp.down_proj.weight"));
        assert!(!is_projection("model.layers.0.self_attn.q_proj.bias"));
        assert!(!is_projection("model.layers.0.input_layernorm.weight"));
        assert!(!is_projection("lm_head.weight"));
        assert!(!is_projection("model.embed_tokens.weight"));
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

    #[test]
    fn merged_config_drops_quantization_and_sets_dtype_in_place() {
        let base = json!({"a": 1, "quantization_config": {"load_in_4bit": true}, "torch_dtype": "float32", "z": 2});
        let c = merged_config(&base, OutDtype::Bf16);
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["a", "torch_dtype", "z", "dtype"]);
        assert_eq!(c["torch_dtype"], "bfloat16");
        assert_eq!(c["dtype"], "bfloat16");
    }
}
