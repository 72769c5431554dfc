//! Training recipes: the YAML file that says what to fine-tune, on which data, and how.
//!
//! A recipe names the base model, the adapter (`lora`, `qlora` or `ia3`, chosen by `adapter.type`),
//! the data files, the training hyper-parameters and the output folder. [`Recipe::load`] reads one,
//! applies `--set a.b=value` overrides, deserializes it strictly (unknown keys and wrong types are
//! errors), fills in defaults and validates it. Paths in `data.*` and `output.dir` are kept as written:
//! relative ones are relative to the current directory.
//!
//! Every error names where it comes from: `file:line: key.path: message`, or `--set arg: key.path:
//! message` when an override caused it. The text is parsed into a [`serde_yaml::Value`] (overrides
//! are applied to that tree), then deserialized with `serde_path_to_error` to learn the key path of a
//! failure. Since values deserialized through a `Value` carry no positions, the line is found by a
//! second pass over the original text ([`line_of`]): a `DeserializeSeed` walks serde_yaml's event
//! stream down the key path and fails on purpose at the target key, and serde_yaml stamps that
//! failure with the key's position. This works for block and flow style alike.

use std::fmt;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_yaml::{Mapping, Value};

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Where a recipe problem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A place in the recipe file. `line` (1-based) is `None` when the key is not written in the
    /// file (a default value, or a missing top-level key).
    File {
        /// The recipe's name as given to [`Recipe::load`] / [`Recipe::from_str`].
        file: String,
        /// 1-based line of the key, when it could be found.
        line: Option<usize>,
    },
    /// A `--set KEY=VALUE` override.
    Override {
        /// The recipe the override applies to.
        file: String,
        /// The override argument, as given (without `--set`).
        arg: String,
    },
    /// No source is known: [`Recipe::validate`] called on a recipe built in code.
    Unknown,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { file, line: Some(line) } => write!(f, "{file}:{line}"),
            Origin::File { file, line: None } => write!(f, "{file}"),
            Origin::Override { arg, .. } => write!(f, "--set {arg}"),
            Origin::Unknown => write!(f, "recipe"),
        }
    }
}

/// Everything that can go wrong while reading a recipe.
///
/// Displayed as `origin: key.path: message`, e.g.
/// `recipes/x.yaml:4: adapter.rank: unknown key (expected one of r, lora_alpha, …)`.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The recipe file could not be read.
    #[error("{file}: cannot read the recipe: {source}")]
    Read {
        /// The path as given.
        file: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid YAML.
    #[error("{}: invalid YAML: {message}", place(.file, *.line, *.column))]
    Syntax {
        /// The recipe's name.
        file: String,
        /// 1-based line, when the parser reported one.
        line: Option<usize>,
        /// 1-based column, when the parser reported one.
        column: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// A `--set` argument is malformed or cannot be applied.
    #[error("--set {arg}: {message}")]
    BadOverride {
        /// The argument, as given.
        arg: String,
        /// What is wrong with it.
        message: String,
    },
    /// A key that the recipe format does not have.
    #[error("{at}: {key}: unknown key ({})", expected_list(.expected))]
    UnknownKey {
        /// Where the key is written.
        at: Origin,
        /// Full key path, e.g. `adapter.rank`.
        key: String,
        /// The keys allowed at that place.
        expected: Vec<String>,
    },
    /// A required key is absent.
    #[error("{at}: {key}: missing required key")]
    MissingKey {
        /// Where the enclosing map is written.
        at: Origin,
        /// Full key path of the missing key, e.g. `data.train`.
        key: String,
    },
    /// A value of the wrong type (a string where a number is expected, …).
    #[error("{at}: {}{message}", keyed(.key))]
    WrongType {
        /// Where the value is written.
        at: Origin,
        /// Full key path (empty for the document itself).
        key: String,
        /// E.g. `expected a number, found a string "fast"`.
        message: String,
    },
    /// A value of the right type that is not acceptable (`r: 0`, a missing data file, …).
    #[error("{at}: {}{message}", keyed(.key))]
    Invalid {
        /// Where the value is written.
        at: Origin,
        /// Full key path.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl RecipeError {
    /// The full key path the error is about, if any (e.g. `training.learning_rate`).
    pub fn key(&self) -> Option<&str> {
        match self {
            RecipeError::UnknownKey { key, .. }
            | RecipeError::MissingKey { key, .. }
            | RecipeError::WrongType { key, .. }
            | RecipeError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Where the error comes from, for key-level errors.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            RecipeError::UnknownKey { at, .. }
            | RecipeError::MissingKey { at, .. }
            | RecipeError::WrongType { at, .. }
            | RecipeError::Invalid { at, .. } => Some(at),
            _ => None,
        }
    }

    /// The 1-based line in the recipe file, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            RecipeError::Syntax { line, .. } => *line,
            _ => match self.origin() {
                Some(Origin::File { line, .. }) => *line,
                _ => None,
            },
        }
    }
}

fn place(file: &str, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!("{file}:{line}:{column}"),
        (Some(line), None) => format!("{file}:{line}"),
        _ => file.to_string(),
    }
}

fn keyed(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

fn expected_list(expected: &[String]) -> String {
    if expected.is_empty() {
        "no keys are allowed here".to_string()
    } else {
        format!("expected one of {}", expected.join(", "))
    }
}

// ---------------------------------------------------------------------------------------------
// Name enums (a fixed set of lowercase names in the YAML)
// ---------------------------------------------------------------------------------------------

/// Declares a fieldless enum written in recipes as one of a fixed set of names.
macro_rules! name_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)? }
        default $default:ident
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $( $(#[$vmeta])* $variant ),+ }

        impl $name {
            /// Every accepted name, in documentation order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name as written in a recipe.
            pub fn as_str(self) -> &'static str {
                match self { $( Self::$variant => $text ),+ }
            }

            /// Parses a name as written in a recipe (exact match).
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $( $text => Some(Self::$variant), )+ _ => None }
            }
        }

        impl Default for $name {
            fn default() -> Self { Self::$default }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                Self::from_name(&name).ok_or_else(|| {
                    de::Error::custom(format!(
                        "unknown value \"{name}\" (expected one of {})",
                        Self::NAMES.join(", ")
                    ))
                })
            }
        }
    };
}

name_enum! {
    /// Learning-rate schedule after warmup.
    pub enum LrScheduler {
        /// Constant learning rate.
        Constant = "constant",
        /// Linear decay to zero.
        Linear = "linear",
        /// Cosine decay to zero.
        Cosine = "cosine",
    }
    default Cosine
}

name_enum! {
    /// Layout of the training records.
    pub enum DataFormat {
        /// Detect from the first record.
        Auto = "auto",
        /// `{"messages": [{"role", "content"}, …]}` rendered with the model's chat template.
        Chat = "chat",
        /// `{"instruction", "input", "output"}`.
        Alpaca = "alpaca",
        /// `{"text"}` (or `{"prompt", "completion"}`).
        Completion = "completion",
    }
    default Auto
}

name_enum! {
    /// Dtype in which QLoRA dequantized weights are multiplied.
    pub enum ComputeDtype {
        /// 32-bit float.
        Float32 = "float32",
        /// bfloat16.
        Bfloat16 = "bfloat16",
        /// IEEE half.
        Float16 = "float16",
    }
    default Bfloat16
}

// ---------------------------------------------------------------------------------------------
// Recipe types
// ---------------------------------------------------------------------------------------------

/// A fully resolved, validated training recipe.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    /// Hub id (`owner/name`), a local model folder, or a `.gguf` file.
    pub base_model: String,
    /// Hub revision (branch, tag or commit); Hub ids only.
    pub revision: Option<String>,
    /// Name of a GGUF file inside a Hub repository that holds GGUF files.
    pub gguf_file: Option<String>,
    /// Which adapter to train, and its settings.
    pub adapter: AdapterSpec,
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
    /// How the A/B matrices start.
    pub init_lora_weights: InitLoraWeights,
    /// Bias training; only `none` is supported.
    pub bias: String,
    /// Only adapt these decoder layers (indices); all layers when absent.
    pub layers_to_transform: Option<Vec<usize>>,
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
struct QloraDoc {
    r: usize,
    lora_alpha: f64,
    lora_dropout: f64,
    target_modules: TargetModules,
    use_rslora: bool,
    init_lora_weights: InitLoraWeights,
    bias: String,
    layers_to_transform: Option<Vec<usize>>,
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
        }
    }
}

/// Which modules an adapter attaches to (PEFT's `target_modules`; the matching rules live in
/// [`crate::adapter::target`]). In YAML: the string `all-linear`, a list of names, or any other string (a regex).
pub use crate::adapter::target::TargetModules;

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

/// How LoRA matrices are initialized (PEFT's `init_lora_weights`). All but `Random` start as a no-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true`: Kaiming-uniform A, zero B (PEFT's default).
    #[default]
    Default,
    /// `gaussian`: Gaussian A with std 1/r, zero B.
    Gaussian,
    /// `false`: both random, so the adapter is not a no-op (for tests and debugging).
    Random,
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Default => serializer.serialize_bool(true),
            InitLoraWeights::Random => serializer.serialize_bool(false),
            InitLoraWeights::Gaussian => serializer.serialize_str("gaussian"),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InitVisitor;

        impl Visitor<'_> for InitVisitor {
            type Value = InitLoraWeights;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or gaussian")
            }

            fn visit_bool<E: de::Error>(self, value: bool) -> Result<InitLoraWeights, E> {
                Ok(if value { InitLoraWeights::Default } else { InitLoraWeights::Random })
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<InitLoraWeights, E> {
                if text == "gaussian" {
                    Ok(InitLoraWeights::Gaussian)
                } else {
                    Err(E::custom(format!("unknown value \"{text}\" (expected true, false or gaussian)")))
                }
            }
        }

        deserializer.deserialize_any(InitVisitor)
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
}

fn default_sequence_len() -> usize {
    512
}

fn default_true() -> bool {
    true
}

/// How long a run lasts: [`TrainingSpec::max_steps`] wins over [`TrainingSpec::epochs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunLength {
    /// A number of passes over the training data.
    Epochs(usize),
    /// A number of optimizer steps.
    Steps(usize),
}

/// Optimization settings (AdamW plus a warmup-then-schedule learning rate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSpec {
    /// Passes over the data; 1 when neither this nor `max_steps` is given.
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
        }
    }
}

impl TrainingSpec {
    /// The peak learning rate: the recipe's, else the adapter's default (2e-4 LoRA/QLoRA, 1e-2 IA3).
    pub fn learning_rate(&self, adapter: &AdapterSpec) -> f64 {
        self.learning_rate.unwrap_or_else(|| adapter.default_learning_rate())
    }

    /// How long the run lasts: `max_steps` if given, else `epochs` (1 if neither).
    pub fn run_length(&self) -> RunLength {
        match (self.max_steps, self.epochs) {
            (Some(steps), _) => RunLength::Steps(steps),
            (None, Some(epochs)) => RunLength::Epochs(epochs),
            (None, None) => RunLength::Epochs(1),
        }
    }

    /// Sequences per optimizer step: `micro_batch_size × gradient_accumulation_steps`.
    pub fn effective_batch_size(&self) -> usize {
        self.micro_batch_size.saturating_mul(self.gradient_accumulation_steps)
    }

    /// Total optimizer steps for a run whose epoch has `micro_batches_per_epoch` micro-batches:
    /// `max_steps`, or `epochs × ceil(micro_batches_per_epoch / gradient_accumulation_steps)`.
    pub fn total_steps(&self, micro_batches_per_epoch: usize) -> usize {
        match self.run_length() {
            RunLength::Steps(steps) => steps,
            RunLength::Epochs(epochs) => {
                let accumulation = self.gradient_accumulation_steps.max(1);
                epochs.saturating_mul(micro_batches_per_epoch.div_ceil(accumulation))
            }
        }
    }

    /// Warmup steps for a run of `total_steps`: `warmup_steps`, or `ceil(warmup_ratio × total_steps)`.
    pub fn warmup_steps_for(&self, total_steps: usize) -> usize {
        match self.warmup_ratio {
            Some(ratio) if self.warmup_steps == 0 => (ratio * total_steps as f64).ceil() as usize,
            _ => self.warmup_steps,
        }
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
struct RecipeDoc {
    base_model: String,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    gguf_file: Option<String>,
    adapter: Value,
    data: DataSpec,
    #[serde(default)]
    training: TrainingSpec,
    output: OutputSpec,
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

impl Recipe {
    /// Reads the recipe at `path`, applies `--set a.b=value` overrides, deserializes, fills defaults
    /// and validates. Relative paths in `data.*` and `output.dir` stay as written (relative to the
    /// current directory).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read { file: file.clone(), source })?;
        Recipe::from_str(&text, &file, overrides)
    }

    /// Like [`Recipe::load`], from text; `source_name` names the text in error messages.
    pub fn from_str(text: &str, source_name: &str, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let mut overrides = overrides.iter().map(|arg| Override::parse(arg)).collect::<Result<Vec<_>, _>>()?;
        let mut doc: Value = serde_yaml::from_str(text).map_err(|err| syntax_error(source_name, text, &err))?;
        doc.apply_merge().map_err(|err| syntax_error(source_name, text, &err))?;
        for item in &mut overrides {
            item.path = item.apply(&mut doc)?;
        }

        let source = Source { name: source_name, text, overrides: &overrides };
        let mut recipe = build(doc).map_err(|problem| source.error(problem))?;
        recipe.resolve_defaults();
        recipe.check().map_err(|problem| source.error(problem))?;
        Ok(recipe)
    }

    /// Fills in defaults that depend on other keys: `training.epochs = 1` when neither `epochs` nor
    /// `max_steps` is set, and `training.learning_rate` from the adapter type. Loading calls this.
    pub fn resolve_defaults(&mut self) {
        if self.training.epochs.is_none() && self.training.max_steps.is_none() {
            self.training.epochs = Some(1);
        }
        if self.training.learning_rate.is_none() {
            self.training.learning_rate = Some(self.adapter.default_learning_rate());
        }
    }

    /// Checks every value (ranges, files, formats). Loading calls this; errors from a loaded recipe
    /// name the file and line, errors from this call name only the key path.
    pub fn validate(&self) -> Result<(), RecipeError> {
        self.check().map_err(|problem| problem.into_error(Origin::Unknown))
    }

    /// The resolved recipe (all defaults filled) as YAML, loadable again with [`Recipe::from_str`].
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|err| format!("# cannot serialize the recipe: {err}\n"))
    }

    fn check(&self) -> Result<(), Problem> {
        if self.base_model.trim().is_empty() {
            return Err(Problem::invalid("base_model", "must not be empty"));
        }
        if let Some(revision) = &self.revision {
            if revision.trim().is_empty() {
                return Err(Problem::invalid("revision", "must not be empty (leave it out for the default branch)"));
            }
        }
        if let Some(gguf) = &self.gguf_file {
            if !gguf.to_ascii_lowercase().ends_with(".gguf") {
                return Err(Problem::invalid("gguf_file", format!("must name a .gguf file (got \"{gguf}\")")));
            }
        }
        check_adapter(&self.adapter)?;
        check_data(&self.data)?;
        check_training(&self.training)?;
        check_output(&self.output)
    }
}

/// Turns the document tree into a [`Recipe`] (defaults not yet resolved, not validated).
fn build(doc: Value) -> Result<Recipe, Problem> {
    if !doc.is_mapping() {
        return Err(Problem {
            path: Vec::new(),
            kind: ProblemKind::WrongType(format!(
                "a recipe must be a YAML map (base_model, adapter, data, training, output), found {}",
                describe_value(&doc)
            )),
        });
    }
    let raw: RecipeDoc = deserialize_at(&[], doc)?;
    Ok(Recipe {
        base_model: raw.base_model,
        revision: raw.revision,
        gguf_file: raw.gguf_file,
        adapter: build_adapter(raw.adapter)?,
        data: raw.data,
        training: raw.training,
        output: raw.output,
    })
}

/// Dispatches on `adapter.type` (done by hand: serde's internally tagged enums lose key paths).
fn build_adapter(value: Value) -> Result<AdapterSpec, Problem> {
    const TYPES: &str = "lora, qlora, ia3";
    let prefix = [Seg::key("adapter")];
    let Value::Mapping(mut map) = value else {
        return Err(Problem {
            path: prefix.to_vec(),
            kind: ProblemKind::WrongType(format!(
                "expected a map with a `type` key ({TYPES}), found {}",
                describe_value(&value)
            )),
        });
    };
    let type_path = || vec![Seg::key("adapter"), Seg::key("type")];
    let type_name = match map.remove("type") {
        None => return Err(Problem { path: type_path(), kind: ProblemKind::MissingKey }),
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(Problem {
                path: type_path(),
                kind: ProblemKind::WrongType(format!("expected one of {TYPES}, found {}", describe_value(&other))),
            })
        }
    };
    let rest = Value::Mapping(map);
    match type_name.as_str() {
        "lora" => deserialize_at(&prefix, rest).map(AdapterSpec::Lora),
        "qlora" => deserialize_at::<QloraDoc>(&prefix, rest).map(|doc| AdapterSpec::Qlora(doc.into())),
        "ia3" => deserialize_at(&prefix, rest).map(AdapterSpec::Ia3),
        other => Err(Problem {
            path: type_path(),
            kind: ProblemKind::Invalid(format!("unknown adapter type \"{other}\" (expected one of {TYPES})")),
        }),
    }
}

fn syntax_error(file: &str, text: &str, err: &serde_yaml::Error) -> RecipeError {
    let mut position = err.location().map(|loc| (loc.line(), loc.column()));
    let mut message = err.to_string();
    if let Some((line, column)) = position {
        // serde_yaml appends the position we already show in front; drop that copy.
        message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    // serde_yaml places a duplicate key at its map's start; point at the repeated key instead.
    if let Some(duplicate) = duplicate_key_position(text, &message) {
        position = Some(duplicate);
    }
    RecipeError::Syntax {
        file: file.to_string(),
        line: position.map(|(line, _)| line),
        column: position.map(|(_, column)| column),
        message,
    }
}

/// Where the second occurrence of the key named by serde_yaml's
/// `[path: ]duplicate entry with key "name"` message is.
fn duplicate_key_position(text: &str, message: &str) -> Option<(usize, usize)> {
    const MARK: &str = "duplicate entry with key \"";
    let at = message.find(MARK)?;
    let key = message[at + MARK.len()..].split('"').next()?;
    if key.contains('\\') {
        return None; // an escaped key: not worth decoding
    }
    let mut path = Vec::new();
    if let Some(parent) = message[..at].strip_suffix(": ") {
        // serde_yaml writes paths like `adapter.target_modules[1]`.
        for part in parent.split('.') {
            let mut pieces = part.split('[');
            let name = pieces.next().unwrap_or_default();
            if !name.is_empty() {
                path.push(Seg::key(name));
            }
            for index in pieces {
                path.push(Seg::Index(index.strip_suffix(']')?.parse().ok()?));
            }
        }
    }
    path.push(Seg::key(key));
    locate(text, &path, 1)
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn check_adapter(adapter: &AdapterSpec) -> Result<(), Problem> {
    match adapter {
        AdapterSpec::Lora(spec) => check_lora(spec),
        AdapterSpec::Qlora(spec) => {
            check_lora(&spec.lora)?;
            if spec.bnb_4bit_quant_type != "nf4" {
                return Err(Problem::invalid(
                    "adapter.bnb_4bit_quant_type",
                    format!("only nf4 is supported (got \"{}\")", spec.bnb_4bit_quant_type),
                ));
            }
            Ok(())
        }
        AdapterSpec::Ia3(spec) => {
            check_targets(&spec.target_modules)?;
            for (index, module) in spec.feedforward_modules.iter().enumerate() {
                let path = || Problem::path_of("adapter.feedforward_modules").index(index);
                if module.trim().is_empty() {
                    return Err(path().with(ProblemKind::Invalid("must not be empty".into())));
                }
                if let TargetModules::List(targets) = &spec.target_modules {
                    let covered =
                        targets.iter().any(|target| TargetModules::List(vec![target.clone()]).matches(module));
                    if !covered {
                        return Err(path().with(ProblemKind::Invalid(format!(
                            "\"{module}\" is not in adapter.target_modules \
                             (every feedforward module must also be a target)"
                        ))));
                    }
                }
            }
            Ok(())
        }
    }
}

fn check_lora(spec: &LoraSpec) -> Result<(), Problem> {
    if spec.r == 0 {
        return Err(Problem::invalid("adapter.r", "must be at least 1"));
    }
    if !(spec.lora_alpha.is_finite() && spec.lora_alpha > 0.0) {
        return Err(Problem::invalid(
            "adapter.lora_alpha",
            format!("must be a positive number (got {})", spec.lora_alpha),
        ));
    }
    if !(0.0..1.0).contains(&spec.lora_dropout) {
        return Err(Problem::invalid("adapter.lora_dropout", format!("must be in [0, 1) (got {})", spec.lora_dropout)));
    }
    check_targets(&spec.target_modules)?;
    if spec.bias != "none" {
        return Err(Problem::invalid(
            "adapter.bias",
            format!("only \"none\" is supported (got \"{}\"): peftkit does not train biases", spec.bias),
        ));
    }
    if let Some(layers) = &spec.layers_to_transform {
        if layers.is_empty() {
            return Err(Problem::invalid(
                "adapter.layers_to_transform",
                "must list at least one layer (leave it out to adapt every layer)",
            ));
        }
    }
    Ok(())
}

fn check_targets(targets: &TargetModules) -> Result<(), Problem> {
    const KEY: &str = "adapter.target_modules";
    match targets {
        TargetModules::AllLinear => Ok(()),
        TargetModules::List(names) => {
            if names.is_empty() {
                return Err(Problem::invalid(KEY, "must name at least one module"));
            }
            match names.iter().position(|name| name.trim().is_empty()) {
                Some(index) => {
                    Err(Problem::path_of(KEY).index(index).with(ProblemKind::Invalid("must not be empty".into())))
                }
                None => Ok(()),
            }
        }
        TargetModules::Regex(pattern) => match Regex::new(pattern) {
            Ok(_) => Ok(()),
            Err(err) => Err(Problem::invalid(KEY, format!("invalid regular expression: {err}"))),
        },
    }
}

fn check_data(data: &DataSpec) -> Result<(), Problem> {
    check_file("data.train", &data.train)?;
    if let Some(validation) = &data.validation {
        check_file("data.validation", validation)?;
    }
    if data.sequence_len == 0 {
        return Err(Problem::invalid("data.sequence_len", "must be at least 1"));
    }
    Ok(())
}

fn check_file(key: &str, path: &Path) -> Result<(), Problem> {
    if path.is_file() {
        return Ok(());
    }
    let what = if path.exists() { "is not a file" } else { "file not found" };
    let relative_note = match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => {
            format!(" (relative paths are taken from the current directory, {})", cwd.display())
        }
        _ => String::new(),
    };
    Err(Problem::invalid(key, format!("{what}: {}{relative_note}", path.display())))
}

fn check_training(t: &TrainingSpec) -> Result<(), Problem> {
    let counts = [
        ("training.epochs", t.epochs),
        ("training.max_steps", t.max_steps),
        ("training.micro_batch_size", Some(t.micro_batch_size)),
        ("training.gradient_accumulation_steps", Some(t.gradient_accumulation_steps)),
        ("training.eval_every", t.eval_every),
        ("training.save_every", t.save_every),
        ("training.logging_every", Some(t.logging_every)),
    ];
    for (key, value) in counts {
        if value == Some(0) {
            return Err(Problem::invalid(key, "must be at least 1"));
        }
    }
    if let Some(lr) = t.learning_rate {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Problem::invalid("training.learning_rate", format!("must be a positive number (got {lr})")));
        }
    }
    if let Some(ratio) = t.warmup_ratio {
        if !(0.0..1.0).contains(&ratio) {
            return Err(Problem::invalid("training.warmup_ratio", format!("must be in [0, 1) (got {ratio})")));
        }
        if t.warmup_steps > 0 {
            return Err(Problem::invalid(
                "training.warmup_ratio",
                format!("cannot be combined with training.warmup_steps ({}); set only one", t.warmup_steps),
            ));
        }
    }
    let non_negative = [("training.weight_decay", t.weight_decay), ("training.max_grad_norm", t.max_grad_norm)];
    for (key, value) in non_negative {
        if !(value.is_finite() && value >= 0.0) {
            return Err(Problem::invalid(key, format!("must be a number ≥ 0 (got {value})")));
        }
    }
    for (key, value) in [("training.adam_beta1", t.adam_beta1), ("training.adam_beta2", t.adam_beta2)] {
        if !(0.0..1.0).contains(&value) {
            return Err(Problem::invalid(key, format!("must be in [0, 1) (got {value})")));
        }
    }
    if !(t.adam_epsilon.is_finite() && t.adam_epsilon > 0.0) {
        return Err(Problem::invalid(
            "training.adam_epsilon",
            format!("must be a positive number (got {})", t.adam_epsilon),
        ));
    }
    Ok(())
}

fn check_output(output: &OutputSpec) -> Result<(), Problem> {
    if output.dir.as_os_str().is_empty() {
        return Err(Problem::invalid("output.dir", "must not be empty"));
    }
    if let Some(id) = &output.hub_model_id {
        if !crate::hub::valid_repo_id(id) {
            return Err(Problem::invalid("output.hub_model_id", format!("must look like owner/name (got \"{id}\")")));
        }
    }
    if let Some(rev) = &output.hub_revision {
        if output.hub_model_id.is_none() {
            return Err(Problem::invalid("output.hub_revision", "is only used with output.hub_model_id"));
        }
        if !crate::hub::valid_revision(rev) {
            return Err(Problem::invalid("output.hub_revision", format!("\"{rev}\" is not a valid branch name")));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Problems: an error before its origin (file line or override) is known
// ---------------------------------------------------------------------------------------------

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn key(name: &str) -> Seg {
        Seg::Key(name.to_string())
    }
}

fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

#[derive(Debug)]
enum ProblemKind {
    UnknownKey(Vec<String>),
    MissingKey,
    WrongType(String),
    Invalid(String),
}

#[derive(Debug)]
struct Problem {
    path: Vec<Seg>,
    kind: ProblemKind,
}

/// A key path under construction, for [`Problem`]s.
struct PathBuilder(Vec<Seg>);

impl PathBuilder {
    fn index(mut self, index: usize) -> Self {
        self.0.push(Seg::Index(index));
        self
    }

    fn with(self, kind: ProblemKind) -> Problem {
        Problem { path: self.0, kind }
    }
}

impl Problem {
    /// A dotted key path (`adapter.r`) as segments.
    fn path_of(dotted: &str) -> PathBuilder {
        PathBuilder(dotted.split('.').map(Seg::key).collect())
    }

    fn invalid(dotted: &str, message: impl Into<String>) -> Problem {
        Problem::path_of(dotted).with(ProblemKind::Invalid(message.into()))
    }

    /// Reads a deserialization error: its key path (after `prefix`) and a readable message.
    fn from_serde(prefix: &[Seg], err: &serde_path_to_error::Error<serde_yaml::Error>) -> Problem {
        use serde_path_to_error::Segment;
        let mut path = prefix.to_vec();
        for segment in err.path().iter() {
            match segment {
                Segment::Map { key } => path.push(Seg::Key(key.clone())),
                Segment::Seq { index } => path.push(Seg::Index(*index)),
                Segment::Enum { .. } | Segment::Unknown => {}
            }
        }
        let kind = classify(&err.inner().to_string(), &mut path);
        Problem { path, kind }
    }

    fn into_error(self, at: Origin) -> RecipeError {
        let key = path_string(&self.path);
        match self.kind {
            ProblemKind::UnknownKey(expected) => RecipeError::UnknownKey { at, key, expected },
            ProblemKind::MissingKey => RecipeError::MissingKey { at, key },
            ProblemKind::WrongType(message) => RecipeError::WrongType { at, key, message },
            ProblemKind::Invalid(message) => RecipeError::Invalid { at, key, message },
        }
    }
}

/// Deserializes `value`, reporting failures with their key path below `prefix`.
fn deserialize_at<T: DeserializeOwned>(prefix: &[Seg], value: Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|err| Problem::from_serde(prefix, &err))
}

/// Turns serde's message into a [`ProblemKind`], completing `path` with the key it names when
/// serde reports the enclosing map (missing keys).
fn classify(message: &str, path: &mut Vec<Seg>) -> ProblemKind {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = backticked(rest);
        if let Some((key, expected)) = names.split_first() {
            if path.last() != Some(&Seg::Key(key.clone())) {
                path.push(Seg::Key(key.clone()));
            }
            return ProblemKind::UnknownKey(expected.to_vec());
        }
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        if let Some(key) = backticked(rest).into_iter().next() {
            path.push(Seg::Key(key));
            return ProblemKind::MissingKey;
        }
    }
    for (prefix, is_type) in [("invalid type: ", true), ("invalid value: ", false)] {
        if let Some((found, expected)) = message.strip_prefix(prefix).and_then(|rest| rest.rsplit_once(", expected ")) {
            let text = format!("expected {}, found {}", describe_expected(expected), describe_found(found));
            return if is_type { ProblemKind::WrongType(text) } else { ProblemKind::Invalid(text) };
        }
    }
    ProblemKind::Invalid(message.to_string())
}

/// The `name`s in "`a`, expected one of `b`, `c`".
fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// serde's "expected" (a visitor's description) in recipe terms.
fn describe_expected(expected: &str) -> String {
    match expected {
        "f64" | "f32" => "a number".into(),
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number ≥ 0".into(),
        "isize" | "i64" | "i32" | "i16" | "i8" => "a whole number".into(),
        "a sequence" => "a list".into(),
        "path string" => "a path".into(),
        "field identifier" => "a key name".into(),
        "a boolean" => "true or false".into(),
        other if other.starts_with("struct ") => "a map".into(),
        other => other.to_string(),
    }
}

/// serde's `Unexpected` description in recipe terms.
fn describe_found(found: &str) -> String {
    let untick = |s: &str| s.trim_matches('`').to_string();
    if let Some(v) = found.strip_prefix("integer ") {
        format!("the number {}", untick(v))
    } else if let Some(v) = found.strip_prefix("floating point ") {
        format!("the number {}", untick(v))
    } else if let Some(v) = found.strip_prefix("boolean ") {
        untick(v)
    } else if let Some(v) = found.strip_prefix("string ") {
        format!("a string {v}")
    } else {
        match found {
            "unit value" => "null".into(),
            "sequence" => "a list".into(),
            "map" => "a map".into(),
            other => other.to_string(),
        }
    }
}

fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("a string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a map".into(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
    }
}

/// What an error needs to say where it comes from.
struct Source<'a> {
    name: &'a str,
    text: &'a str,
    overrides: &'a [Override],
}

impl Source<'_> {
    /// Names the `--set` argument that set the key, an ancestor or a descendant of it; else the
    /// key's line in the file.
    fn error(&self, problem: Problem) -> RecipeError {
        let path = &problem.path;
        let from_override = self
            .overrides
            .iter()
            .rev()
            .find(|item| path.starts_with(&item.path) || (!path.is_empty() && item.path.starts_with(path)));
        let at = match from_override {
            Some(item) => Origin::Override { file: self.name.to_string(), arg: item.arg.clone() },
            None => Origin::File { file: self.name.to_string(), line: line_of(self.text, &problem.path) },
        };
        problem.into_error(at)
    }
}

// ---------------------------------------------------------------------------------------------
// Overrides
// ---------------------------------------------------------------------------------------------

/// One `--set KEY=VALUE` argument.
#[derive(Debug)]
struct Override {
    arg: String,
    keys: Vec<String>,
    value: Value,
    /// The key path written: the keys, with numeric keys into lists as indices (set once applied).
    path: Vec<Seg>,
}

impl Override {
    fn parse(arg: &str) -> Result<Override, RecipeError> {
        let bad = |message: &str| RecipeError::BadOverride { arg: arg.to_string(), message: message.to_string() };
        let Some((key, raw)) = arg.split_once('=') else {
            return Err(bad("expected KEY=VALUE, e.g. --set training.learning_rate=1e-4"));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(bad("the key before `=` is empty"));
        }
        let keys: Vec<String> = key.split('.').map(|k| k.trim().to_string()).collect();
        if keys.iter().any(String::is_empty) {
            return Err(bad("the key has an empty part (write it like adapter.r)"));
        }
        let value: Value =
            serde_yaml::from_str(raw).map_err(|err| bad(&format!("the value is not valid YAML: {err}")))?;
        let path = keys.iter().map(|k| Seg::Key(k.clone())).collect();
        Ok(Override { arg: arg.to_string(), keys, value, path })
    }

    /// Writes the value into `root`, creating missing (or null) intermediate maps; returns the
    /// key path written.
    fn apply(&self, root: &mut Value) -> Result<Vec<Seg>, RecipeError> {
        let mut node = root;
        let mut path = Vec::with_capacity(self.keys.len());
        for (depth, key) in self.keys.iter().enumerate() {
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
            let last = depth + 1 == self.keys.len();
            node = match node {
                Value::Mapping(map) => {
                    path.push(Seg::Key(key.clone()));
                    let slot = map.entry(Value::String(key.clone())).or_insert(Value::Null);
                    if last {
                        *slot = self.value.clone();
                        return Ok(path);
                    }
                    slot
                }
                Value::Sequence(items) => {
                    let len = items.len();
                    let index = key.parse::<usize>().ok().filter(|&i| i < len);
                    let Some(index) = index else {
                        let what = match len {
                            0 => "is an empty list".to_string(),
                            _ => format!("is a list of {len} items; use an index below {len}"),
                        };
                        return Err(self.cannot(depth, &what));
                    };
                    path.push(Seg::Index(index));
                    let item = &mut items[index];
                    if last {
                        *item = self.value.clone();
                        return Ok(path);
                    }
                    item
                }
                other => {
                    let found = describe_value(other);
                    return Err(self.cannot(depth, &format!("is {found}, not a map")));
                }
            };
        }
        Ok(path)
    }

    fn cannot(&self, depth: usize, what: &str) -> RecipeError {
        let parent = if depth == 0 { "the recipe".to_string() } else { format!("`{}`", self.keys[..depth].join(".")) };
        RecipeError::BadOverride {
            arg: self.arg.clone(),
            message: format!("cannot set `{}`: {parent} {what}", self.keys[depth]),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Locating a key path in the YAML text
// ---------------------------------------------------------------------------------------------

/// Marker carried by the deliberate error that stops the walk at the target.
const FOUND: &str = "__peftkit_recipe_key_found__";

/// The 1-based line of `path` in `text`: the key's line for a map key, the element's for a list
/// index. When the path is not written (a default, a missing key), the line of its nearest
/// written ancestor; `None` if none is.
fn line_of(text: &str, path: &[Seg]) -> Option<usize> {
    (1..=path.len()).rev().find_map(|len| locate(text, &path[..len], 0)).map(|(line, _column)| line)
}

/// The 1-based (line, column) of exactly `path` in `text`; with `skip` = n, of the (n+1)-th
/// occurrence of its last key (duplicate keys).
fn locate(text: &str, path: &[Seg], skip: usize) -> Option<(usize, usize)> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    let finder = Finder { path, skip };
    match finder.deserialize(deserializer) {
        Err(err) if err.to_string().contains(FOUND) => err.location().map(|loc| (loc.line(), loc.column())),
        _ => None,
    }
}

/// Walks the event stream down `path`; fails with [`FOUND`] at the target, which serde_yaml
/// stamps with the position of the event it was reading. Returns `Ok(())` when the path is absent.
struct Finder<'p> {
    path: &'p [Seg],
    /// Occurrences of the final key to pass over before stopping.
    skip: usize,
}

impl<'de> DeserializeSeed<'de> for Finder<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Finder<'_> {
    fn scalar<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Finder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FOUND)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((head, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let want = match head {
            Seg::Key(want) => Some(want.as_str()),
            Seg::Index(_) => None,
        };
        let is_last = rest.is_empty();
        let mut matches = 0;
        loop {
            let seed = KeySeed { want, stop_here: is_last && matches == self.skip };
            match map.next_key_seed(seed)? {
                None => return Ok(()),
                Some(true) if !is_last && matches == 0 => {
                    matches += 1;
                    let finder = Finder { path: rest, skip: self.skip };
                    map.next_value_seed(finder)?;
                }
                Some(true) => {
                    matches += 1;
                    map.next_value::<IgnoredAny>()?;
                }
                Some(false) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((head, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let want = match head {
            Seg::Index(index) => Some(*index),
            Seg::Key(_) => None,
        };
        let mut index = 0;
        loop {
            let more = if Some(index) == want {
                let finder = Finder { path: rest, skip: self.skip };
                seq.next_element_seed(finder)?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| ())
            };
            if more.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }
}

/// Reads a map key; `true` if it is the wanted one. With `stop_here`, fails with [`FOUND`] on
/// it instead, so the error carries the key's position.
struct KeySeed<'k> {
    want: Option<&'k str>,
    stop_here: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl KeySeed<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        match self.want {
            Some(want) if want == key => {
                if self.stop_here {
                    Err(E::custom(FOUND))
                } else {
                    Ok(true)
                }
            }
            _ => Ok(false),
        }
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        self.check(key)
    }

    fn visit_bool<E: de::Error>(self, key: bool) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_i64<E: de::Error>(self, key: i64) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_u64<E: de::Error>(self, key: u64) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_f64<E: de::Error>(self, key: f64) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A temp folder with train/valid files, and their paths as YAML-safe strings.
    struct Fixture {
        _dir: tempfile::TempDir,
        train: String,
        valid: String,
    }

    fn fixture() -> Fixture {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(err) => panic!("tempdir: {err}"),
        };
        let train = dir.path().join("train.jsonl");
        let valid = dir.path().join("valid.jsonl");
        for path in [&train, &valid] {
            if let Err(err) = fs::write(path, "{\"text\": \"hi\"}\n") {
                panic!("write {}: {err}", path.display());
            }
        }
        Fixture { train: train.display().to_string(), valid: valid.display().to_string(), _dir: dir }
    }

    fn ok(text: &str, overrides: &[&str]) -> Recipe {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        match Recipe::from_str(text, "recipes/x.yaml", &overrides) {
            Ok(recipe) => recipe,
            Err(err) => panic!("expected a valid recipe, got: {err}\n---\n{text}"),
        }
    }

    fn err(text: &str, overrides: &[&str]) -> RecipeError {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        match Recipe::from_str(text, "recipes/x.yaml", &overrides) {
            Ok(recipe) => panic!("expected an error, got {recipe:?}\n---\n{text}"),
            Err(err) => err,
        }
    }

    /// Asserts that `err` displays as starting with `prefix` and contains each of `parts`.
    fn assert_msg(err: &RecipeError, prefix: &str, parts: &[&str]) {
        let msg = err.to_string();
        assert!(msg.starts_with(prefix), "`{msg}` should start with `{prefix}`");
        for part in parts {
            assert!(msg.contains(part), "`{msg}` should contain `{part}`");
        }
    }

    fn full_block(f: &Fixture) -> String {
        format!(
            "\
# a full recipe
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
revision: main
gguf_file: null
adapter:
  type: lora
  r: 16
  lora_alpha: 32
  lora_dropout: 0.05
  target_modules: all-linear
data:
  train: {train}
  validation: {valid}
  format: chat
  sequence_len: 512
training:
  epochs: 2
  micro_batch_size: 4
  gradient_accumulation_steps: 2
  learning_rate: 2.0e-4
  lr_scheduler: cosine
  warmup_steps: 10
  weight_decay: 0.0
  max_grad_norm: 1.0
  seed: 42
  eval_every: 50
  save_every: 100
output:
  dir: adapters/smollm2-135m-lora
",
            train = f.train,
            valid = f.valid
        )
    }

    fn minimal(f: &Fixture, adapter: &str) -> String {
        format!("base_model: m/x\nadapter:\n  type: {adapter}\ndata:\n  train: {}\noutput:\n  dir: out\n", f.train)
    }

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
        assert_eq!(t.effective_batch_size(), 8);
        assert_eq!(t.total_steps(9), 10); // 2 epochs × ceil(9 / 2)
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
        assert_eq!(r.training.run_length(), RunLength::Steps(30));
        assert_eq!(r.training.learning_rate, Some(1e-4));
        assert_eq!(r.training.warmup_steps_for(30), 3);
        assert_eq!(r.output.hub_model_id.as_deref(), Some("me/my-adapter"));
        assert!(r.output.private);
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
    fn recipe_unknown_key_block_and_flow() {
        let f = fixture();
        let text = format!(
            "base_model: m/x\nadapter:\n  type: lora\n  rank: 4\ndata:\n  train: {}\noutput:\n  dir: o\n",
            f.train
        );
        let e = err(&text, &[]);
        assert!(matches!(e, RecipeError::UnknownKey { .. }), "{e:?}");
        assert_eq!(e.key(), Some("adapter.rank"));
        assert_eq!(e.line(), Some(4));
        assert_msg(
            &e,
            "recipes/x.yaml:4: adapter.rank: unknown key (expected one of r, lora_alpha,",
            &["target_modules"],
        );

        // Flow style, spread over lines.
        let text = format!(
            "base_model: m/x\nadapter: {{type: qlora,\n  r: 4,\n  bnb_4bit_foo: 1}}\n\
             data: {{train: {}}}\noutput: {{dir: o}}\n",
            f.train
        );
        let e = err(&text, &[]);
        assert_msg(
            &e,
            "recipes/x.yaml:4: adapter.bnb_4bit_foo: unknown key (expected one of r,",
            &["bnb_4bit_compute_dtype"],
        );

        // Top level and nested, in a one-line flow map.
        let text = format!(
            "base_model: m/x\nadapter: {{type: lora}}\ndata: {{train: {}, shufle: false}}\noutput: {{dir: o}}\n",
            f.train
        );
        assert_msg(&err(&text, &[]), "recipes/x.yaml:3: data.shufle: unknown key", &["shuffle"]);
        let text = format!("{}epochs: 3\n", minimal(&f, "lora"));
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:8: epochs: unknown key (expected one of base_model,",
            &["training"],
        );
    }

    #[test]
    fn recipe_wrong_types() {
        let f = fixture();
        let text = format!(
            "base_model: m/x\nadapter:\n  type: lora\ndata:\n  train: {}\ntraining:\n  learning_rate: fast\noutput:\n  dir: o\n",
            f.train
        );
        let e = err(&text, &[]);
        assert!(matches!(e, RecipeError::WrongType { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "recipes/x.yaml:7: training.learning_rate: expected a number, found a string \"fast\""
        );

        // Flow style on a later line; a list element; a negative count; a bool.
        let text = format!(
            "base_model: m/x\nadapter: {{type: lora,\n   target_modules: [q_proj,\n      3]}}\n\
             data: {{train: {}}}\noutput: {{dir: o}}\n",
            f.train
        );
        let e = err(&text, &[]);
        assert_eq!(e.key(), Some("adapter.target_modules[1]"));
        assert_msg(&e, "recipes/x.yaml:4: adapter.target_modules[1]: expected a string, found the number 3", &[]);
        let text = format!(
            "base_model: m/x\nadapter: {{type: ia3}}\ndata: {{train: {}}}\ntraining: {{epochs: 1,\n  micro_batch_size: -2}}\noutput: {{dir: o}}\n",
            f.train
        );
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:5: training.micro_batch_size: expected a whole number ≥ 0, found the number -2",
            &[],
        );
        let text = format!("{}training:\n  seed: 1\n  shuffle: yes\n", minimal(&f, "lora"));
        assert_msg(&err(&text, &[]), "recipes/x.yaml:10: training.shuffle: unknown key", &[]);
        let text = format!("{}\ntraining: {{lr_scheduler: cosinus}}\n", minimal(&f, "lora"));
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:9: training.lr_scheduler: unknown value \"cosinus\" (expected one of constant, linear, cosine)",
            &[],
        );
        let text = format!(
            "base_model: m/x\nadapter:\n  type: lora\n  use_rslora: 3\ndata: {{train: {}}}\noutput: {{dir: o}}\n",
            f.train
        );
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:4: adapter.use_rslora: expected true or false, found the number 3",
            &[],
        );
        let text = "base_model: m/x\nadapter: lora\ndata: {train: x}\noutput: {dir: o}\n";
        assert_msg(
            &err(text, &[]),
            "recipes/x.yaml:2: adapter: expected a map with a `type` key",
            &["found a string \"lora\""],
        );
        assert_msg(&err("- a\n- b\n", &[]), "recipes/x.yaml: a recipe must be a YAML map", &[]);
    }

    #[test]
    fn recipe_missing_keys() {
        let f = fixture();
        let e = err("base_model: m/x\nadapter: {type: lora}\ndata:\n  format: chat\noutput: {dir: o}\n", &[]);
        assert!(matches!(e, RecipeError::MissingKey { .. }), "{e:?}");
        assert_eq!(e.key(), Some("data.train"));
        assert_eq!(e.to_string(), "recipes/x.yaml:3: data.train: missing required key");

        let text = format!("adapter: {{type: lora}}\ndata: {{train: {}}}\noutput: {{dir: o}}\n", f.train);
        assert_msg(&err(&text, &[]), "recipes/x.yaml: base_model: missing required key", &[]);
        let text = format!("base_model: m/x\nadapter: {{r: 4}}\ndata: {{train: {}}}\noutput: {{dir: o}}\n", f.train);
        assert_msg(&err(&text, &[]), "recipes/x.yaml:2: adapter.type: missing required key", &[]);
        let text =
            format!("base_model: m/x\nadapter: {{type: dora}}\ndata: {{train: {}}}\noutput: {{dir: o}}\n", f.train);
        assert_msg(
            &err(&text, &[]),
            "recipes/x.yaml:2: adapter.type: unknown adapter type \"dora\" (expected one of lora, qlora, ia3)",
            &[],
        );
        let text = format!("base_model: m/x\nadapter: {{type: lora}}\ndata: {{train: {}}}\noutput: {{}}\n", f.train);
        assert_msg(&err(&text, &[]), "recipes/x.yaml:4: output.dir: missing required key", &[]);
    }

    #[test]
    fn recipe_validation_errors() {
        let f = fixture();
        let base = |adapter: &str, extra: &str| {
            format!(
                "base_model: m/x\nadapter:\n  type: {adapter}\n{extra}data:\n  train: {}\noutput:\n  dir: o\n",
                f.train
            )
        };
        let e = err(&base("lora", "  r: 0\n"), &[]);
        assert!(matches!(e, RecipeError::Invalid { .. }), "{e:?}");
        assert_eq!(e.to_string(), "recipes/x.yaml:4: adapter.r: must be at least 1");
        assert_msg(
            &err(&base("lora", "  lora_dropout: 1.5\n"), &[]),
            "recipes/x.yaml:4: adapter.lora_dropout: must be in [0, 1) (got 1.5)",
            &[],
        );
        assert_msg(
            &err(&base("lora", "  r: 4\n  bias: all\n"), &[]),
            "recipes/x.yaml:5: adapter.bias: only \"none\" is supported (got \"all\")",
            &[],
        );
        assert_msg(
            &err(&base("lora", "  target_modules: '(q_proj'\n"), &[]),
            "recipes/x.yaml:4: adapter.target_modules: invalid regular expression",
            &[],
        );
        assert_msg(
            &err(&base("qlora", "  bnb_4bit_quant_type: fp4\n"), &[]),
            "recipes/x.yaml:4: adapter.bnb_4bit_quant_type: only nf4 is supported",
            &[],
        );
        assert_msg(
            &err(&base("ia3", "  target_modules: [k_proj, v_proj]\n"), &[]),
            "recipes/x.yaml:2: adapter.feedforward_modules[0]: \"down_proj\" is not in adapter.target_modules",
            &[],
        );
        assert_msg(
            &err(&base("ia3", "  feedforward_modules: [up_proj]\n"), &[]),
            "recipes/x.yaml:4: adapter.feedforward_modules[0]: \"up_proj\" is not in",
            &[],
        );

        // Missing data files name the key and the path.
        let text = "base_model: m/x\nadapter: {type: lora}\ndata:\n  train: no/such/train.jsonl\noutput: {dir: o}\n";
        assert_msg(
            &err(text, &[]),
            "recipes/x.yaml:4: data.train: file not found: no/such/train.jsonl",
            &["current directory"],
        );
        let text = format!(
            "base_model: m/x\nadapter: {{type: lora}}\ndata:\n  train: {}\n  validation: /no/such/valid.jsonl\noutput: {{dir: o}}\n",
            f.train
        );
        assert_msg(&err(&text, &[]), "recipes/x.yaml:5: data.validation: file not found: /no/such/valid.jsonl", &[]);

        let with_training = |training: &str| format!("{}training: {training}\n", minimal(&f, "lora"));
        for (training, expected) in [
            ("{learning_rate: 0}", "recipes/x.yaml:8: training.learning_rate: must be a positive number"),
            ("{learning_rate: .nan}", "recipes/x.yaml:8: training.learning_rate: must be a positive number"),
            ("{epochs: 0}", "recipes/x.yaml:8: training.epochs: must be at least 1"),
            ("{micro_batch_size: 0}", "recipes/x.yaml:8: training.micro_batch_size: must be at least 1"),
            (
                "{warmup_steps: 5, warmup_ratio: 0.1}",
                "recipes/x.yaml:8: training.warmup_ratio: cannot be combined with training.warmup_steps",
            ),
            ("{warmup_ratio: 1.0}", "recipes/x.yaml:8: training.warmup_ratio: must be in [0, 1)"),
            ("{adam_beta2: 1.0}", "recipes/x.yaml:8: training.adam_beta2: must be in [0, 1)"),
            ("{max_grad_norm: -1}", "recipes/x.yaml:8: training.max_grad_norm: must be a number ≥ 0"),
        ] {
            assert_msg(&err(&with_training(training), &[]), expected, &[]);
        }
        let text = minimal(&f, "lora").replace("dir: out", "dir: out\n  hub_model_id: not-a-repo-id");
        assert_msg(&err(&text, &[]), "recipes/x.yaml:8: output.hub_model_id: must look like owner/name", &[]);
        assert_msg(
            &err(&minimal(&f, "lora").replace("m/x", "''"), &[]),
            "recipes/x.yaml:1: base_model: must not be empty",
            &[],
        );

        // `validate` on a recipe changed in code names the key only.
        let mut recipe = ok(&minimal(&f, "lora"), &[]);
        if let AdapterSpec::Lora(lora) = &mut recipe.adapter {
            lora.r = 0;
        }
        let e = match recipe.validate() {
            Err(e) => e,
            Ok(()) => panic!("r = 0 should not validate"),
        };
        assert_eq!(e.to_string(), "recipe: adapter.r: must be at least 1");
        assert_eq!(e.origin(), Some(&Origin::Unknown));
    }

    #[test]
    fn recipe_overrides() {
        let f = fixture();
        let other = f.valid.clone();
        let r = ok(
            &full_block(&f),
            &[
                "training.learning_rate=1e-4",
                "adapter.r=8",
                &format!("data.train={other}"),
                "adapter.target_modules=[q_proj,v_proj]",
                "output.hub_model_id=me/run",
            ],
        );
        assert_eq!(r.training.learning_rate, Some(1e-4));
        let lora = r.adapter.lora().cloned().unwrap_or_default();
        assert_eq!(lora.r, 8);
        assert_eq!(lora.lora_alpha, 32.0);
        assert_eq!(lora.target_modules, TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        assert_eq!(r.data.train, PathBuf::from(&other));
        assert_eq!(r.output.hub_model_id.as_deref(), Some("me/run"));

        // Missing intermediate maps are created; the adapter type can be switched.
        let r = ok(&minimal(&f, "lora"), &["training.seed=7", "adapter.type=ia3", "revision=v1.0"]);
        assert_eq!(r.training.seed, 7);
        assert_eq!(r.adapter.type_name(), "ia3");
        assert_eq!(r.training.learning_rate, Some(1e-2));
        assert_eq!(r.revision.as_deref(), Some("v1.0"));
        // A whole recipe from overrides alone, and an index into a list.
        let r = ok(
            "",
            &[
                "base_model=m/x",
                "adapter={type: lora, target_modules: [a, b]}",
                &format!("data.train={}", f.train),
                "output.dir=o",
                "adapter.target_modules.1=c",
            ],
        );
        assert_eq!(r.adapter.target_modules(), &TargetModules::List(vec!["a".into(), "c".into()]));

        // Errors caused by an override name the argument, not a line.
        assert_msg(
            &err(&minimal(&f, "lora"), &["adapter.target_modules.0=x"]),
            "--set adapter.target_modules.0=x: adapter.target_modules: expected all-linear, a regex, \
             or a list of module names, found a map",
            &[],
        );
        let e = err(&full_block(&f), &["adapter.r=0"]);
        assert_eq!(e.to_string(), "--set adapter.r=0: adapter.r: must be at least 1");
        assert!(matches!(e.origin(), Some(Origin::Override { arg, .. }) if arg == "adapter.r=0"));
        assert_eq!(e.line(), None);
        assert_msg(
            &err(&full_block(&f), &["training.learning_rate=fast"]),
            "--set training.learning_rate=fast: training.learning_rate: expected a number, found a string \"fast\"",
            &[],
        );
        assert_msg(
            &err(&full_block(&f), &["adapter.rank=4"]),
            "--set adapter.rank=4: adapter.rank: unknown key (expected one of r,",
            &[],
        );
        assert_msg(
            &err(&full_block(&f), &["data={format: chat}"]),
            "--set data={format: chat}: data.train: missing required key",
            &[],
        );
        // …while other errors still point into the file.
        let text = full_block(&f).replace("  r: 16", "  r: 0");
        assert_msg(&err(&text, &["training.seed=1"]), "recipes/x.yaml:7: adapter.r:", &[]);

        // Malformed arguments.
        for (arg, expected) in [
            ("adapter.r", "--set adapter.r: expected KEY=VALUE"),
            ("=3", "--set =3: the key before `=` is empty"),
            ("adapter..r=3", "--set adapter..r=3: the key has an empty part"),
            ("adapter.target_modules=[q_proj", "--set adapter.target_modules=[q_proj: the value is not valid YAML"),
            ("base_model.x=1", "--set base_model.x=1: cannot set `x`: `base_model` is a string"),
        ] {
            let e = err(&full_block(&f), &[arg]);
            assert!(matches!(e, RecipeError::BadOverride { .. }), "{e:?}");
            assert_msg(&e, expected, &[]);
        }
    }

    #[test]
    fn recipe_syntax_errors() {
        let e = err("base_model: m/x\nadapter:\n  type: lora\n r: 3\n", &[]);
        assert!(matches!(e, RecipeError::Syntax { .. }), "{e:?}");
        assert_eq!(e.line(), Some(4));
        assert_msg(&e, "recipes/x.yaml:4:", &["invalid YAML"]);

        let e = err("base_model: m/x\nadapter: {type: lora,\n  r: [1, 2}\n", &[]);
        assert!(matches!(e, RecipeError::Syntax { line: Some(3), column: Some(_), .. }), "{e:?}");

        let e = err("adapter: {type: lora}\nadapter: {type: ia3}\n", &[]);
        assert_msg(&e, "recipes/x.yaml:2:1: invalid YAML: duplicate entry with key \"adapter\"", &[]);
        let e = err("base_model: m\nadapter:\n  type: lora\n  r: 4\n  r: 8\n", &[]);
        assert_msg(&e, "recipes/x.yaml:5:3: invalid YAML: adapter: duplicate entry with key \"r\"", &[]);
        let e = err("data: {train: a,\n  train: b}\n", &[]);
        assert_msg(&e, "recipes/x.yaml:2:3:", &["duplicate entry"]);
    }

    #[test]
    fn recipe_to_yaml_round_trip() {
        let f = fixture();
        let texts = [
            full_block(&f),
            minimal(&f, "ia3"),
            minimal(&f, "qlora")
                .replace("type: qlora", "type: qlora\n  init_lora_weights: false\n  target_modules: '.*_proj'"),
        ];
        for text in texts {
            let recipe = ok(&text, &[]);
            let yaml = recipe.to_yaml();
            let again = match Recipe::from_str(&yaml, "resolved.yaml", &[]) {
                Ok(r) => r,
                Err(e) => panic!("to_yaml output does not load: {e}\n{yaml}"),
            };
            assert_eq!(recipe, again, "\n{yaml}");
            assert!(yaml.contains("learning_rate:"), "{yaml}");
            assert!(yaml.contains("epochs: 1") || yaml.contains("epochs: 2"), "{yaml}");
        }
    }

    #[test]
    fn recipe_load_from_file() {
        let f = fixture();
        let path = std::env::temp_dir().join(format!(
            "peftkit-recipe-{}-{:?}.yaml",
            std::process::id(),
            std::thread::current().id()
        ));
        if let Err(e) = fs::write(&path, minimal(&f, "lora").replace("  type: lora", "  type: lora\n  r: zero")) {
            panic!("write: {e}");
        }
        let result = Recipe::load(&path, &[]);
        let _ = fs::remove_file(&path);
        let e = match result {
            Err(e) => e,
            Ok(r) => panic!("should fail: {r:?}"),
        };
        assert_msg(
            &e,
            &format!("{}:4: adapter.r: expected a whole number ≥ 0, found a string \"zero\"", path.display()),
            &[],
        );
        let missing = Recipe::load(Path::new("/no/such/recipe.yaml"), &[]);
        assert!(matches!(missing, Err(RecipeError::Read { .. })), "{missing:?}");
    }
}
