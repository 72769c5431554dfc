//! The recipe's types as serde sees them: [`Recipe`] and its sections ([`AdapterSpec`] with
//! [`LoraSpec`] / [`QloraSpec`] / [`Ia3Spec`], [`DataSpec`], [`TrainingSpec`], [`OutputSpec`]),
//! their defaults and derived values (scaling, learning rate), the YAML forms
//! of [`TargetModules`], and the raw document shapes (`RecipeDoc`, `QloraDoc`) that loading
//! deserializes before dispatching on `adapter.type`.

use crate::compute::{DeviceRequest, DtypeRequest};
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_yaml::Value;

use super::{ComputeDtype, DataFormat, InitLoraWeights, LrScheduler, TargetModules};
pub use crate::adapter::target::{ExcludeModules, LayersPattern};
pub use crate::adapter::vocab::TokenIndices;

/// A fully resolved, validated training recipe.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    /// Hub id (`owner/name`), a local model folder, or a `.gguf` file.
    pub base_model: String,
    /// Hub revision (branch, tag or commit); Hub ids only.
    pub revision: Option<String>,
    /// Name of a GGUF file inside a Hub repository that holds GGUF files.
    pub gguf_file: Option<String>,
    /// The Hub repository (`owner/name`) that a local `base_model` (folder or GGUF file) is a copy of: written as
    /// `base_model_name_or_path` in `adapter_config.json` and named by the card, so that PEFT users load the
    /// adapter onto the Hub model instead of a path of the training machine.
    pub base_model_id: Option<String>,
    /// Which adapter to train, and its settings.
    pub adapter: AdapterSpec,
    /// Changes to the base model's tokenizer (new special tokens).
    #[serde(skip_serializing_if = "TokenizerSpec::is_empty")]
    pub tokenizer: TokenizerSpec,
    /// The data files and how to read them.
    pub data: DataSpec,
    /// Optimization settings.
    pub training: TrainingSpec,
    /// Where the adapter goes.
    pub output: OutputSpec,
}

/// The adapter to train, tagged by `type` in the YAML.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AdapterSpec {
    /// LoRA on full-precision base weights.
    Lora(LoraSpec),
    /// LoRA on NF4-quantized base weights.
    Qlora(QloraSpec),
    /// IA3: learned rescaling vectors.
    Ia3(Ia3Spec),
}

impl AdapterSpec {
    /// The `type` name: `lora`, `qlora` or `ia3`.
    pub fn type_name(&self) -> &'static str {
        match self {
            AdapterSpec::Lora(_) => "lora",
            AdapterSpec::Qlora(_) => "qlora",
            AdapterSpec::Ia3(_) => "ia3",
        }
    }

    /// The LoRA settings of a `lora` or `qlora` adapter.
    pub fn lora(&self) -> Option<&LoraSpec> {
        match self {
            AdapterSpec::Lora(spec) => Some(spec),
            AdapterSpec::Qlora(spec) => Some(&spec.lora),
            AdapterSpec::Ia3(_) => None,
        }
    }

    /// Which modules the adapter attaches to.
    pub fn target_modules(&self) -> &TargetModules {
        match self {
            AdapterSpec::Lora(spec) => &spec.target_modules,
            AdapterSpec::Qlora(spec) => &spec.lora.target_modules,
            AdapterSpec::Ia3(spec) => &spec.target_modules,
        }
    }

    /// `modules_to_save` and `trainable_token_indices` (IA3 has no trainable tokens in PEFT).
    pub fn vocab_settings(&self) -> (&[String], Option<&TokenIndices>) {
        match self {
            AdapterSpec::Lora(spec) => (&spec.modules_to_save, spec.trainable_token_indices.as_ref()),
            AdapterSpec::Qlora(spec) => (&spec.lora.modules_to_save, spec.lora.trainable_token_indices.as_ref()),
            AdapterSpec::Ia3(spec) => (&spec.modules_to_save, None),
        }
    }

    /// Learning rate used when the recipe sets none: 2e-4 for LoRA/QLoRA, 1e-2 for IA3.
    pub fn default_learning_rate(&self) -> f64 {
        match self {
            AdapterSpec::Lora(_) | AdapterSpec::Qlora(_) => 2e-4,
            AdapterSpec::Ia3(_) => 1e-2,
        }
    }
}

/// LoRA settings (the names follow HF PEFT's `LoraConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank of the update (default 8).
    pub r: usize,
    /// Scaling numerator (default 16): the update is scaled by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Dropout on the adapter input, in [0, 1) (default 0).
    pub lora_dropout: f64,
    /// Modules to adapt (default `all-linear`).
    pub target_modules: TargetModules,
    /// Scale by `lora_alpha / sqrt(r)` instead (rank-stabilized LoRA).
    pub use_rslora: bool,
    /// How the A/B matrices start (PEFT's `init_lora_weights`): `true` (default: Kaiming-uniform A, zero B),
    /// `gaussian` (A ~ N(0, 1/r²), zero B), `false` (both random: not a no-op; for tests), or one that starts from
    /// the base weights and rewrites them:
    /// - `pissa`: A and B from the top-r singular values and vectors of each targeted weight W (full SVD in f64 on
    ///   the CPU, once at the start: the slow choice for large models), A = √(S/s)·Vᵀ, B = U·√(S/s) (PiSSA, Meng et
    ///   al. 2024);
    /// - `pissa_niter_N`: the same from a randomized SVD with N subspace iterations (N ≥ 0; PEFT suggests 4–16),
    ///   much faster on large weights; its random start is drawn from `training.seed`;
    /// - `olora`: A = R[..r], B = Q[:, ..r] from the thin QR of W (OLoRA, Büyükakyüz 2024).
    ///
    /// These train on the residual base W − s·B·A (the model starts unchanged), and the saved adapter is converted,
    /// as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=…)` converts it, into a plain LoRA
    /// adapter of rank 2r (lora_alpha doubled, `init_lora_weights: true`) for the original base model: it loads in
    /// PEFT onto the unmodified base, and `peftkit merge` folds it into it. Checkpoints keep the unconverted adapter
    /// and the starting A₀, B₀ (`initial_adapter.safetensors`) for `--resume`. r must not exceed the smaller
    /// dimension of any targeted weight. Not supported with `type: qlora` (PEFT refuses PiSSA on 4-bit weights:
    /// initialise on a 16/32-bit base) nor with `use_dora` (PEFT's conversion drops the magnitude vectors).
    pub init_lora_weights: InitLoraWeights,
    /// Bias training; only `none` is supported.
    pub bias: String,
    /// Only adapt these decoder layers (indices); all layers when absent. Each index must be below the model's
    /// number of layers (checked once the model is loaded).
    pub layers_to_transform: Option<Vec<usize>>,
    /// The module list that `layers_to_transform` counts in (PEFT's `layers_pattern`): `layers`, as a string or a
    /// one-element list — the only one peftkit's models have (`model.layers`); any other name is refused. Only with
    /// `layers_to_transform`. Default none (the first numbered path segment, the same thing here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers_pattern: Option<LayersPattern>,
    /// Modules never adapted, even when `target_modules` matches them (PEFT ≥ 0.14's `exclude_modules`): a list of
    /// module names or paths (a path matches when it equals an entry or ends with `.` + entry, as in
    /// `target_modules`), or a string, a regex that must match the whole module path (e.g.
    /// `'.*\.layers\.0\..*'`). Saved in `adapter_config.json`. Excluding every targeted module is an error.
    /// Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<ExcludeModules>,
    /// PEFT ≥ 0.17's `target_parameters` (LoRA on bare `nn.Parameter` weights such as mixture-of-experts experts):
    /// not supported — peftkit has no MoE base — so a non-empty list is refused rather than ignored; see
    /// [`crate::adapter::target`] for what it would take. Default empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub target_parameters: Vec<String>,
    /// DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT's `use_dora`), default false: each adapted projection
    /// also learns a magnitude per output row, m, and computes with diag(m / ‖W + s·B·A‖)·(W + s·B·A), the row
    /// norm recomputed at every step without a gradient. m starts at the norm, so a fresh adapter is still the
    /// identity. Saved as PEFT saves it (`use_dora: true`, `lora_magnitude_vector` tensors); works with `lora` and
    /// `qlora` (the norm of the dequantized NF4 weight), not with `ia3`. Costs about one more weight-sized product
    /// per projection and step with `lora_dropout` > 0.
    pub use_dora: bool,
    /// Modules trained in full beside the adapter and saved whole (PEFT's `modules_to_save`): `embed_tokens`
    /// and/or `lm_head`. Each is a (vocab × hidden) copy trained with AdamW: large (SmolLM2-135M: 28 M
    /// parameters each). Default none.
    pub modules_to_save: Vec<String>,
    /// Train only these rows of the embedding (PEFT ≥ 0.15's `trainable_token_indices`): a list of token ids
    /// (rows of `embed_tokens`; with tied embeddings the head uses the same rows), or a map from module
    /// (`embed_tokens`, `lm_head`) to ids. Ids must be below the model's vocabulary size. Default none.
    pub trainable_token_indices: Option<TokenIndices>,
    /// Continue training an existing LoRA adapter: a PEFT adapter folder (peftkit's or PEFT's) holding
    /// `adapter_config.json` and `adapter_model.safetensors`. Its config supplies every adapter setting (`r`,
    /// `lora_alpha`, `lora_dropout`, `target_modules`, `use_rslora`, `layers_to_transform`, `use_dora`, and PEFT's
    /// `rank_pattern` / `alpha_pattern`) and its tensors the starting values; the saved adapter keeps that config.
    /// Leave the other adapter keys out: one that the recipe sets to a value other than the folder's is an error
    /// naming both. A relative path is taken from the current directory, like `data.train`. Adapters with
    /// `modules_to_save` / `trainable_token_indices` tensors are not supported as a start yet. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::AllLinear,
            use_rslora: false,
            init_lora_weights: InitLoraWeights::Default,
            bias: "none".to_string(),
            layers_to_transform: None,
            layers_pattern: None,
            exclude_modules: None,
            target_parameters: Vec::new(),
            use_dora: false,
            modules_to_save: Vec::new(),
            trainable_token_indices: None,
            init_from: None,
        }
    }
}

impl LoraSpec {
    /// The factor applied to `B·A·x`: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        let r = self.r as f64;
        if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }
    }
}

/// QLoRA settings: LoRA plus how the base weights are quantized (PEFT/bitsandbytes names).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QloraSpec {
    /// The LoRA part (written flat, next to the `bnb_4bit_*` keys).
    #[serde(flatten)]
    pub lora: LoraSpec,
    /// Quantization data type; only `nf4` is supported.
    pub bnb_4bit_quant_type: String,
    /// Also quantize the per-block scales (default true).
    pub bnb_4bit_use_double_quant: bool,
    /// Dtype of the dequantized matmul (default bfloat16).
    pub bnb_4bit_compute_dtype: ComputeDtype,
}

impl Default for QloraSpec {
    fn default() -> Self {
        QloraSpec {
            lora: LoraSpec::default(),
            bnb_4bit_quant_type: "nf4".to_string(),
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: ComputeDtype::default(),
        }
    }
}

/// The YAML shape of a `qlora` adapter: every key flat (serde cannot combine `flatten` with
/// `deny_unknown_fields`, so this mirrors [`LoraSpec`] and converts into [`QloraSpec`]).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct QloraDoc {
    r: usize,
    lora_alpha: f64,
    lora_dropout: f64,
    target_modules: TargetModules,
    use_rslora: bool,
    init_lora_weights: InitLoraWeights,
    bias: String,
    layers_to_transform: Option<Vec<usize>>,
    layers_pattern: Option<LayersPattern>,
    exclude_modules: Option<ExcludeModules>,
    target_parameters: Vec<String>,
    use_dora: bool,
    modules_to_save: Vec<String>,
    trainable_token_indices: Option<TokenIndices>,
    init_from: Option<PathBuf>,
    bnb_4bit_quant_type: String,
    bnb_4bit_use_double_quant: bool,
    bnb_4bit_compute_dtype: ComputeDtype,
}

impl Default for QloraDoc {
    fn default() -> Self {
        QloraSpec::default().into()
    }
}

impl From<QloraSpec> for QloraDoc {
    fn from(spec: QloraSpec) -> Self {
        let lora = spec.lora;
        QloraDoc {
            r: lora.r,
            lora_alpha: lora.lora_alpha,
            lora_dropout: lora.lora_dropout,
            target_modules: lora.target_modules,
            use_rslora: lora.use_rslora,
            init_lora_weights: lora.init_lora_weights,
            bias: lora.bias,
            layers_to_transform: lora.layers_to_transform,
            layers_pattern: lora.layers_pattern,
            exclude_modules: lora.exclude_modules,
            target_parameters: lora.target_parameters,
            use_dora: lora.use_dora,
            modules_to_save: lora.modules_to_save,
            trainable_token_indices: lora.trainable_token_indices,
            init_from: lora.init_from,
            bnb_4bit_quant_type: spec.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant: spec.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype: spec.bnb_4bit_compute_dtype,
        }
    }
}

impl From<QloraDoc> for QloraSpec {
    fn from(doc: QloraDoc) -> Self {
        QloraSpec {
            lora: LoraSpec {
                r: doc.r,
                lora_alpha: doc.lora_alpha,
                lora_dropout: doc.lora_dropout,
                target_modules: doc.target_modules,
                use_rslora: doc.use_rslora,
                init_lora_weights: doc.init_lora_weights,
                bias: doc.bias,
                layers_to_transform: doc.layers_to_transform,
                layers_pattern: doc.layers_pattern,
                exclude_modules: doc.exclude_modules,
                target_parameters: doc.target_parameters,
                use_dora: doc.use_dora,
                modules_to_save: doc.modules_to_save,
                trainable_token_indices: doc.trainable_token_indices,
                init_from: doc.init_from,
            },
            bnb_4bit_quant_type: doc.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant: doc.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype: doc.bnb_4bit_compute_dtype,
        }
    }
}

/// IA3 settings (the names follow HF PEFT's `IA3Config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ia3Spec {
    /// Modules to rescale (default `[k_proj, v_proj, down_proj]`).
    pub target_modules: TargetModules,
    /// Targets whose *input* is rescaled rather than their output (default `[down_proj]`);
    /// each must also be a target.
    pub feedforward_modules: Vec<String>,
    /// Start the vectors at 1 (identity); default true.
    pub init_ia3_weights: bool,
    /// Modules never rescaled, even when `target_modules` matches them (PEFT ≥ 0.14's `exclude_modules`): a list of
    /// module names or paths, or a regex matching the whole path, as for LoRA. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<ExcludeModules>,
    /// Modules trained in full and saved whole (PEFT's `modules_to_save`): `embed_tokens` and/or `lm_head`.
    pub modules_to_save: Vec<String>,
}

impl Default for Ia3Spec {
    fn default() -> Self {
        Ia3Spec {
            target_modules: TargetModules::List(vec![
                "k_proj".to_string(),
                "v_proj".to_string(),
                "down_proj".to_string(),
            ]),
            feedforward_modules: vec!["down_proj".to_string()],
            init_ia3_weights: true,
            exclude_modules: None,
            modules_to_save: Vec::new(),
        }
    }
}

impl Serialize for TokenIndices {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            TokenIndices::List(ids) => ids.serialize(serializer),
            TokenIndices::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for TokenIndices {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdsVisitor;

        impl<'de> Visitor<'de> for IdsVisitor {
            type Value = TokenIndices;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of token ids, or a map from module (embed_tokens, lm_head) to token ids")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TokenIndices, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<u32>()? {
                    ids.push(id);
                }
                Ok(TokenIndices::List(ids))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<TokenIndices, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Vec<u32>>()? {
                    entries.push((k, v));
                }
                Ok(TokenIndices::Map(entries))
            }
        }

        deserializer.deserialize_any(IdsVisitor)
    }
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModules::AllLinear => serializer.serialize_str("all-linear"),
            TargetModules::List(names) => names.serialize(serializer),
            TargetModules::Regex(pattern) => serializer.serialize_str(pattern),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TargetVisitor;

        impl<'de> Visitor<'de> for TargetVisitor {
            type Value = TargetModules;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("all-linear, a regex, or a list of module names")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<TargetModules, E> {
                Ok(if text == "all-linear" { TargetModules::AllLinear } else { TargetModules::Regex(text.to_string()) })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TargetModules, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(TargetModules::List(names))
            }
        }

        deserializer.deserialize_any(TargetVisitor)
    }
}

/// A name list or a regex, the YAML forms of `exclude_modules` (as `target_modules`, without `all-linear`).
impl Serialize for ExcludeModules {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ExcludeModules::List(names) => names.serialize(serializer),
            ExcludeModules::Regex(pattern) => serializer.serialize_str(pattern),
        }
    }
}

impl<'de> Deserialize<'de> for ExcludeModules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match TargetModules::deserialize(deserializer)? {
            TargetModules::List(names) => Ok(ExcludeModules::List(names)),
            TargetModules::Regex(pattern) => Ok(ExcludeModules::Regex(pattern)),
            // A regex `all-linear` matches no module path; say so instead of excluding nothing.
            TargetModules::AllLinear => Err(de::Error::custom(
                "all-linear is not an exclusion: list module names, or give a regex matching whole module paths",
            )),
        }
    }
}

/// `layers_pattern`: a string or a list of strings.
impl Serialize for LayersPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            LayersPattern::One(name) => serializer.serialize_str(name),
            LayersPattern::List(names) => names.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for LayersPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PatternVisitor;

        impl<'de> Visitor<'de> for PatternVisitor {
            type Value = LayersPattern;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a layer container name (layers), or a list of them")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<LayersPattern, E> {
                Ok(LayersPattern::One(text.to_string()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LayersPattern, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(LayersPattern::List(names))
            }
        }

        deserializer.deserialize_any(PatternVisitor)
    }
}

/// Changes to the tokenizer, in their own section: they change the model (its vocabulary, hence the embedding and
/// head shapes) and the files saved beside the adapter, not only how the data is read.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerSpec {
    /// Special tokens to add (transformers' `add_special_tokens({"additional_special_tokens": …})`), e.g.
    /// `["<|tool|>"]`. Each new token gets the next id; the embedding (and an untied head) grow by mean rows as
    /// transformers' `resize_token_embeddings` does, and the new rows train as `trainable_token_indices` (unless
    /// `modules_to_save` trains the whole matrix). The tokenizer is saved beside the adapter. Default none.
    pub add_special_tokens: Vec<String>,
}

impl TokenizerSpec {
    pub fn is_empty(&self) -> bool {
        self.add_special_tokens.is_empty()
    }
}

/// The data files and how they become training sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training records (JSONL), relative to the current directory unless absolute. Required.
    pub train: PathBuf,
    /// Validation records, same format.
    #[serde(default)]
    pub validation: Option<PathBuf>,
    /// Record layout (default `auto`).
    #[serde(default)]
    pub format: DataFormat,
    /// Maximum tokens per sequence (default 512).
    #[serde(default = "default_sequence_len")]
    pub sequence_len: usize,
    /// Also compute the loss on prompt tokens (default false: only on responses).
    #[serde(default)]
    pub train_on_inputs: bool,
    /// Shuffle the training records each epoch (default true).
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Sample packing (default false): lay several examples into each row of up to `sequence_len` tokens
    /// (best-fit decreasing, deterministic given `training.seed`), so rows carry only the padding left at their
    /// end. Each example attends only to itself, its positions restart at 0 and no target crosses from one
    /// example into the next, so the loss equals the unpacked one; `training.micro_batch_size` then counts
    /// packed rows.
    #[serde(default)]
    pub packing: bool,
    /// Batch rows of similar length together (default false), as transformers' `group_by_length`: each epoch's
    /// shuffled order is cut into mega-batches of 50 optimizer steps, each sorted by length, longest first.
    #[serde(default)]
    pub group_by_length: bool,
}

fn default_sequence_len() -> usize {
    512
}

fn default_true() -> bool {
    true
}

/// Optimization settings (AdamW plus a warmup-then-schedule learning rate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSpec {
    /// Passes over the data; 1 when neither this nor `max_steps` is given. The run's step count is
    /// [`crate::train::TrainConfig::total_steps`].
    pub epochs: Option<usize>,
    /// Optimizer steps; wins over `epochs` when both are given.
    pub max_steps: Option<usize>,
    /// Sequences per forward pass (default 4).
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step (default 1).
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate; when absent, the adapter's default (see [`TrainingSpec::learning_rate`]).
    /// Loading a recipe fills it in.
    pub learning_rate: Option<f64>,
    /// Schedule after warmup (default cosine).
    pub lr_scheduler: LrScheduler,
    /// Linear warmup steps (default 0).
    pub warmup_steps: usize,
    /// Warmup as a fraction of the total steps, in [0, 1); exclusive with `warmup_steps > 0`.
    pub warmup_ratio: Option<f64>,
    /// AdamW decoupled weight decay (default 0).
    pub weight_decay: f64,
    /// AdamW β1 (default 0.9).
    pub adam_beta1: f64,
    /// AdamW β2 (default 0.999).
    pub adam_beta2: f64,
    /// AdamW ε (default 1e-8).
    pub adam_epsilon: f64,
    /// Gradient clipping by global norm (default 1.0; 0 disables).
    pub max_grad_norm: f64,
    /// Seed for initialization, dropout and shuffling (default 42).
    pub seed: u64,
    /// Evaluate on the validation set every this many steps (and at the end).
    pub eval_every: Option<usize>,
    /// Save a checkpoint every this many steps (the final adapter is written at the end in any case).
    pub save_every: Option<usize>,
    /// Log every this many steps (default 1).
    pub logging_every: usize,
    /// Where to compute: `auto` (default: the first CUDA GPU in a `cuda` build that finds one, else the CPU), `cpu`,
    /// `cuda`, `cuda:N`. `--device` overrides it.
    pub device: DeviceRequest,
    /// Dtype of the frozen weights and activations: `auto` (default: f32 on the CPU, bf16 on CUDA), `f32`, `bf16`
    /// (mixed precision; adapters and optimizer stay f32). `--dtype` overrides it.
    pub dtype: DtypeRequest,
    /// Activation checkpointing (transformers' `gradient_checkpointing`): keep only each decoder layer's input
    /// and recompute the layer in the backward pass. Same gradients, less memory, about one more forward pass of
    /// compute per step (default false).
    pub gradient_checkpointing: bool,
    /// LoRA+ (Hayou et al. 2024; PEFT's `create_loraplus_optimizer`): the B matrices (`lora_B`) train at
    /// `learning_rate × loraplus_lr_ratio`; A, DoRA magnitudes and everything else at `learning_rate`. Warmup and
    /// the schedule scale every group alike. The paper suggests 16 (for LoRA with r ≈ 8). A positive number; LoRA
    /// adapters only. Default none (one learning rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
    /// With `loraplus_lr_ratio`: the learning rate of trained embedding rows and copies (`modules_to_save:
    /// [embed_tokens]`, `trainable_token_indices`), as LoRA+'s `loraplus_lr_embedding` (LoRA+'s default 1e-6
    /// applies when this is absent). A positive number; only with `loraplus_lr_ratio`. (PEFT 0.x's own
    /// `create_loraplus_optimizer` looks the parameter up with `attrgetter(name)`, which returns the parameter, not
    /// its module, so its embedding group stays empty and such rows train at `learning_rate` there; an `lm_head`
    /// copy trains at `learning_rate` in both.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_embedding: Option<f64>,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        TrainingSpec {
            epochs: None,
            max_steps: None,
            micro_batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: None,
            lr_scheduler: LrScheduler::default(),
            warmup_steps: 0,
            warmup_ratio: None,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: None,
            save_every: None,
            logging_every: 1,
            device: DeviceRequest::Auto,
            dtype: DtypeRequest::Auto,
            gradient_checkpointing: false,
            loraplus_lr_ratio: None,
            loraplus_lr_embedding: None,
        }
    }
}

impl TrainingSpec {
    /// The peak learning rate: the recipe's, else the adapter's default (2e-4 LoRA/QLoRA, 1e-2 IA3).
    pub fn learning_rate(&self, adapter: &AdapterSpec) -> f64 {
        self.learning_rate.unwrap_or_else(|| adapter.default_learning_rate())
    }
}

/// Where the trained adapter is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Output folder (created if needed), relative to the current directory unless absolute. Required.
    pub dir: PathBuf,
    /// Hub repository (`owner/name`) to push the adapter to.
    #[serde(default)]
    pub hub_model_id: Option<String>,
    /// Create the Hub repository as private (a repository that exists keeps its visibility).
    #[serde(default)]
    pub private: bool,
    /// The branch to push to (default `main`; created when missing).
    #[serde(default)]
    pub hub_revision: Option<String>,
}

/// The YAML shape of a recipe before the adapter's `type` is dispatched on.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecipeDoc {
    pub(super) base_model: String,
    #[serde(default)]
    pub(super) revision: Option<String>,
    #[serde(default)]
    pub(super) gguf_file: Option<String>,
    #[serde(default)]
    pub(super) base_model_id: Option<String>,
    pub(super) adapter: Value,
    #[serde(default)]
    pub(super) tokenizer: TokenizerSpec,
    pub(super) data: DataSpec,
    #[serde(default)]
    pub(super) training: TrainingSpec,
    pub(super) output: OutputSpec,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::testutil::{assert_msg, err, fixture, full_block, minimal, ok};

    #[test]
    fn recipe_full_block_style() {
        let f = fixture();
        let r = ok(&full_block(&f), &[]);
        assert_eq!(r.base_model, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(r.revision.as_deref(), Some("main"));
        assert_eq!(r.gguf_file, None);
        let AdapterSpec::Lora(lora) = &r.adapter else { panic!("expected lora, got {:?}", r.adapter) };
        assert_eq!(lora.r, 16);
        assert_eq!(lora.lora_alpha, 32.0);
        assert_eq!(lora.lora_dropout, 0.05);
        assert_eq!(lora.target_modules, TargetModules::AllLinear);
        assert!(!lora.use_rslora);
        assert_eq!(lora.init_lora_weights, InitLoraWeights::Default);
        assert_eq!(lora.bias, "none");
        assert_eq!(lora.scaling(), 2.0);
        assert_eq!(r.data.train, PathBuf::from(&f.train));
        assert_eq!(r.data.validation, Some(PathBuf::from(&f.valid)));
        assert_eq!(r.data.format, DataFormat::Chat);
        assert!(r.data.shuffle);
        assert!(!r.data.train_on_inputs);
        let t = &r.training;
        assert_eq!(t.epochs, Some(2));
        assert_eq!(t.max_steps, None);
        assert_eq!(t.learning_rate, Some(2e-4));
        assert_eq!(t.lr_scheduler, LrScheduler::Cosine);
        assert_eq!(t.warmup_steps, 10);
        assert_eq!(t.adam_beta2, 0.999);
        assert_eq!(t.adam_epsilon, 1e-8);
        assert_eq!(t.eval_every, Some(50));
        assert_eq!(t.save_every, Some(100));
        assert_eq!(t.logging_every, 1);
        assert!(!t.gradient_checkpointing);
        assert_eq!(r.output.dir, PathBuf::from("adapters/smollm2-135m-lora"));
        assert!(!r.output.private);
    }

    #[test]
    fn recipe_full_flow_style() {
        let f = fixture();
        let text = format!(
            "base_model: HuggingFaceTB/SmolLM2-135M-Instruct
adapter: {{type: qlora, r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj],
          bnb_4bit_compute_dtype: float16, init_lora_weights: gaussian}}
data: {{train: {train}, format: alpaca, sequence_len: 256, train_on_inputs: true}}
training: {{max_steps: 30, learning_rate: 1e-4, lr_scheduler: linear, warmup_ratio: 0.1}}
output: {{dir: out, hub_model_id: me/my-adapter, private: true}}
",
            train = f.train
        );
        let r = ok(&text, &[]);
        let AdapterSpec::Qlora(q) = &r.adapter else { panic!("expected qlora, got {:?}", r.adapter) };
        assert_eq!(q.lora.r, 4);
        assert_eq!(q.lora.target_modules, TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        assert_eq!(q.lora.init_lora_weights, InitLoraWeights::Gaussian);
        assert_eq!(q.bnb_4bit_quant_type, "nf4");
        assert!(q.bnb_4bit_use_double_quant);
        assert_eq!(q.bnb_4bit_compute_dtype, ComputeDtype::Float16);
        assert_eq!(r.data.format, DataFormat::Alpaca);
        assert_eq!(r.data.sequence_len, 256);
        assert!(r.data.train_on_inputs);
        assert_eq!(r.training.max_steps, Some(30));
        assert_eq!(r.training.epochs, None);
        assert_eq!(r.training.learning_rate, Some(1e-4));
        assert_eq!(r.training.warmup_ratio, Some(0.1));
        assert_eq!(r.output.hub_model_id.as_deref(), Some("me/my-adapter"));
        assert!(r.output.private);
    }

    #[test]
    fn recipe_gradient_checkpointing_key() {
        let f = fixture();
        assert!(!ok(&minimal(&f, "lora"), &[]).training.gradient_checkpointing);
        let text = format!("{}training:\n  gradient_checkpointing: true\n", minimal(&f, "qlora"));
        assert!(ok(&text, &[]).training.gradient_checkpointing);
        assert!(ok(&minimal(&f, "ia3"), &["training.gradient_checkpointing=true"]).training.gradient_checkpointing);
        let text = format!("{}training:\n  seed: 1\n  gradient_checkpointing: maybe\n", minimal(&f, "lora"));
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:10: training.gradient_checkpointing: expected true or false, found a string \"maybe\"",
            &[],
        );
        let text = format!("{}training: {{gradient_checkpoint: true}}\n", minimal(&f, "lora"));
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:8: training.gradient_checkpoint: unknown key",
            &["gradient_checkpointing"],
        );
    }

    #[test]
    fn recipe_defaults_filled() {
        let f = fixture();
        let r = ok(&minimal(&f, "lora"), &[]);
        assert_eq!(r.adapter.lora(), Some(&LoraSpec::default()));
        assert_eq!(r.data.format, DataFormat::Auto);
        assert_eq!(r.data.sequence_len, 512);
        assert_eq!(r.data.validation, None);
        assert_eq!(r.training.epochs, Some(1));
        assert_eq!(r.training.learning_rate, Some(2e-4));
        assert_eq!(r.training.micro_batch_size, 4);
        assert_eq!(r.training.seed, 42);
        assert_eq!(r.training.lr_scheduler, LrScheduler::Cosine);

        let r = ok(&minimal(&f, "ia3"), &[]);
        assert_eq!(r.training.learning_rate, Some(1e-2));
        let AdapterSpec::Ia3(ia3) = &r.adapter else { panic!("expected ia3") };
        assert_eq!(ia3, &Ia3Spec::default());
        assert!(r.adapter.target_modules().matches("model.layers.0.mlp.down_proj"));
        assert!(!r.adapter.target_modules().matches("model.layers.0.mlp.up_proj"));
    }

    #[test]
    fn recipe_target_modules_forms() {
        let f = fixture();
        let with = |targets: &str| {
            let text = format!(
                "base_model: m/x\nadapter: {{type: lora, target_modules: {targets}}}\n\
                 data: {{train: {}}}\noutput: {{dir: o}}\n",
                f.train
            );
            ok(&text, &[]).adapter.target_modules().clone()
        };
        assert_eq!(with("all-linear"), TargetModules::AllLinear);
        let regex = with("'.*\\.(q|v)_proj'");
        assert_eq!(regex, TargetModules::Regex(".*\\.(q|v)_proj".into()));
        assert!(regex.matches("model.layers.1.self_attn.q_proj"));
        assert!(!regex.matches("model.layers.1.self_attn.k_proj"));
        let list = with("[q_proj, model.layers.0.mlp.up_proj]");
        assert!(list.matches("model.layers.3.self_attn.q_proj"));
        assert!(list.matches("model.layers.0.mlp.up_proj"));
        assert!(!list.matches("model.layers.1.mlp.up_proj"));
        assert!(!list.matches("model.layers.3.self_attn.xq_proj"));
        assert!(TargetModules::AllLinear.matches("model.layers.0.mlp.up_proj"));
        assert!(!TargetModules::AllLinear.matches("lm_head"));
    }

    #[test]
    fn packing_group_by_length_and_tokens_format() {
        let f = fixture();
        let r = ok(&minimal(&f, "lora"), &[]);
        assert!(!r.data.packing && !r.data.group_by_length);
        let text = format!(
            "base_model: m/x\nadapter: {{type: lora}}\ndata:\n  train: {}\n  format: tokens\n  packing: true\n  \
             group_by_length: true\noutput: {{dir: o}}\n",
            f.train
        );
        let r = ok(&text, &[]);
        assert!(r.data.packing && r.data.group_by_length);
        assert_eq!(r.data.format, DataFormat::Tokens);
        assert!(!ok(&text, &["data.packing=false"]).data.packing);
        let bad = text.replace("packing: true", "packing: 3");
        let e = err(&bad, &[]);
        assert_eq!(e.key(), Some("data.packing"));
        assert_msg(&e, "recipes/x.yaml:6: data.packing: expected true or false, found the number 3", &[]);
        let e = err(&text.replace("format: tokens", "format: token_ids"), &[]);
        assert_msg(&e, "recipes/x.yaml:5: data.format:", &["tokens"]);
    }
}
