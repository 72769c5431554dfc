//! Command-line front end: one file per subcommand, each turning flags into library calls.

pub mod bench;
pub mod bench_cuda;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod push;
pub mod train;

use peftkit::compute::{Compute, DeviceRequest, DtypeRequest};
use std::fmt;

/// An error caused by the user's input (bad recipe, missing file, unknown model…): exit code 2.
#[derive(Debug)]
pub struct UserError(pub anyhow::Error);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for UserError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Marks an error as the user's.
pub fn user<E: Into<anyhow::Error>>(e: E) -> anyhow::Error {
    anyhow::Error::new(UserError(e.into()))
}

/// This process's command line, recorded in an output's lock (a second run names it).
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    shlex::try_join(args.iter().map(String::as_str)).unwrap_or_else(|_| args.join(" "))
}

/// Hub options from the environment, with progress bars when stderr is a terminal.
pub fn hub_options() -> peftkit::hub::HubOptions {
    let mut o = peftkit::hub::HubOptions::from_env();
    o.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    o
}

/// Which base model, for every command that reads one.
#[derive(clap::Args)]
pub struct BaseArgs {
    /// Base model: a Hub id (owner/name), a local folder or a local .gguf file.
    #[arg(long)]
    pub base: String,
    /// Hub revision (branch, tag or commit) of the base model.
    #[arg(long)]
    pub revision: Option<String>,
    /// A GGUF file of the Hub repo given by --base, used instead of its safetensors weights.
    #[arg(long)]
    pub gguf_file: Option<String>,
}

/// Where and in which dtype to compute, for every command that runs a model.
#[derive(clap::Args, Clone, Default)]
pub struct ComputeArgs {
    /// Compute device: auto, cpu, cuda or cuda:N [default: the recipe's training.device, else auto = the GPU in a
    /// `cuda` build that finds one, else the CPU].
    #[arg(long)]
    pub device: Option<DeviceRequest>,
    /// Dtype of the frozen weights and activations: auto, f32 or bf16 (adapters and optimizer stay f32)
    /// [default: the recipe's training.dtype, else auto = f32 on the CPU, bf16 on CUDA].
    #[arg(long)]
    pub dtype: Option<DtypeRequest>,
}

impl ComputeArgs {
    /// The flags over `defaults` (a recipe's choice), resolved against this build and machine; a request that
    /// cannot be met is the user's error.
    pub fn resolve(&self, defaults: (DeviceRequest, DtypeRequest)) -> anyhow::Result<Compute> {
        let c = Compute::resolve(self.device.unwrap_or(defaults.0), self.dtype.unwrap_or(defaults.1)).map_err(user)?;
        tracing::info!("computing on {} ({})", c.describe(), peftkit::cpu::describe());
        Ok(c)
    }
}

/// Which model to load, for `eval`, `generate` and `chat`.
#[derive(clap::Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub base: BaseArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// A PEFT adapter folder to apply (unmerged), as `DIR` or `NAME=DIR`; repeat it to load several adapters on
    /// the one base (names: letters, digits, `_`, `.`, `-`; an unnamed one is `default`, as in PEFT). One is
    /// active at a time: the first, or --active's. `chat` switches with /adapter NAME; `eval` scores each (or
    /// only --active's, when given).
    #[arg(long, value_name = "[NAME=]DIR")]
    pub adapter: Vec<String>,
    /// The adapter active at the start (generate, chat) or the one scored (eval), by its --adapter name; `none`
    /// for the base alone [default: the first --adapter; eval: each in turn].
    #[arg(long, value_name = "NAME")]
    pub active: Option<String>,
    /// Hold the base's projections in NF4 with double quantization (transformers' load_in_4bit), as a QLoRA
    /// adapter was trained. Pre-quantized bitsandbytes checkpoints are NF4 without this flag.
    #[arg(long, conflicts_with = "quant")]
    pub load_in_4bit: bool,
    /// The Hub repository (owner/name) that a local --base (folder or GGUF file) is a copy of, as a recipe's
    /// `base_model_id` names it: an adapter trained on that repository is then the base's own (no warning).
    #[arg(long)]
    pub base_model_id: Option<String>,
    /// For generation (`generate`, `chat`, `eval --questions`): multiply by the base's projections and output
    /// head in a llama.cpp block format with candle's quantized matmul. `auto`: a GGUF base's own quantized
    /// tensors, a safetensors base dense; `none`: dense (a GGUF base dequantized to f32); `q8_0`, `q4_0`, `q4_1`,
    /// `q4_k`, `q5_k`, `q6_k`: every projection quantized to that format at load.
    #[arg(long)]
    pub quant: Option<QuantArg>,
}

/// `--quant` of `generate`, `chat` and `eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantArg {
    Auto,
    None,
    To(candle_core::quantized::GgmlDType),
}

impl std::str::FromStr for QuantArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use candle_core::quantized::GgmlDType as G;
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "none" | "f32" => Self::None,
            "q8_0" => Self::To(G::Q8_0),
            "q4_0" => Self::To(G::Q4_0),
            "q4_1" => Self::To(G::Q4_1),
            "q4_k" => Self::To(G::Q4K),
            "q5_k" => Self::To(G::Q5K),
            "q6_k" => Self::To(G::Q6K),
            _ => {
                return Err(format!("unknown --quant {s:?}: expected auto, none, q8_0, q4_0, q4_1, q4_k, q5_k or q6_k"))
            }
        })
    }
}

/// The `--adapter` values of `m` as (name, folder), names checked (exit 2 on a bad or repeated one).
pub fn adapter_specs(m: &ModelArgs) -> anyhow::Result<Vec<(String, std::path::PathBuf)>> {
    use peftkit::peft_model::multi;
    let specs = m.adapter.iter().map(|s| multi::parse_spec(s)).collect::<Result<Vec<_>, _>>();
    let specs = specs.map_err(|e| user(anyhow::anyhow!("--adapter: {e}")))?;
    multi::check_names(&specs).map_err(|e| user(anyhow::anyhow!("--adapter: {e}")))?;
    if let Some(a) = m.active.as_deref().filter(|a| !matches!(*a, "none" | "base")) {
        if !specs.iter().any(|(n, _)| n == a) {
            let names = specs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
            return Err(user(anyhow::anyhow!("--active {a}: no --adapter is named so (given: {names})")));
        }
    }
    Ok(specs)
}

/// Loads the base model of `m` and its adapters (the active one applied), warning when an adapter was trained on
/// another base. `generation`: the model will generate text (`--quant auto` keeps a GGUF base quantized), rather
/// than score it.
pub fn load_model(
    m: &ModelArgs,
    generation: bool,
) -> anyhow::Result<(peftkit::base::BaseModel, peftkit::peft_model::multi::AdapterSet)> {
    use peftkit::model::BaseQuant;
    // Flags are checked before the (slow) model load.
    let specs = adapter_specs(m)?;
    let quant = match (m.load_in_4bit, m.quant.unwrap_or(QuantArg::Auto)) {
        (true, _) => BaseQuant::Nf4 { double_quant: true },
        (false, QuantArg::Auto) if generation => BaseQuant::Ggml { to: None },
        (false, QuantArg::Auto | QuantArg::None) => BaseQuant::None,
        (false, QuantArg::To(t)) => BaseQuant::Ggml { to: Some(t) },
    };
    let mut base = peftkit::base::load_base_quant(
        &m.base.base,
        m.base.revision.as_deref(),
        m.base.gguf_file.as_deref(),
        quant,
        &hub_options(),
        &m.compute.resolve(Default::default())?,
    )
    .map_err(user)?;
    if let Some(id) = &m.base_model_id {
        base.name = id.clone();
    }
    // An adapter trained with added tokens carries its tokenizer: alone, it replaces the base's; several
    // adapters share one model and so one tokenizer.
    for (name, dir) in &specs {
        if let Some(t) = peftkit::tokens::load_saved(dir).map_err(user)? {
            if specs.len() > 1 {
                return Err(user(anyhow::anyhow!(
                    "--adapter {name}={}: this adapter carries its own tokenizer (added tokens), so it cannot share \
                     the base with other adapters; load it alone",
                    dir.display()
                )));
            }
            tracing::info!(
                "using the tokenizer saved with the adapter ({} tokens)",
                peftkit::tokens::tokenizer_len(&t)
            );
            base.tokenizer = t;
        }
    }
    let mut set = peftkit::peft_model::multi::AdapterSet::load(&mut base.model, &specs).map_err(|e| {
        use peftkit::peft_model::multi::MultiError;
        match e {
            MultiError::Candle(e) => anyhow::Error::new(e),
            e => user(e),
        }
    })?;
    // The same model named two ways (relative and absolute path) is the same model.
    let same = |a: &str, b: &str| {
        a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
    };
    for (name, dir) in &specs {
        let trained_on = set.get(name).and_then(|(_, c)| c.base_model_name_or_path.clone());
        if let Some(trained_on) = trained_on.filter(|b| !same(b, &base.name)) {
            tracing::warn!("{} was trained on `{trained_on}`, not `{}`", dir.display(), base.name);
        }
    }
    if let Some(a) = &m.active {
        let name = Some(a.as_str()).filter(|a| !matches!(*a, "none" | "base"));
        set.activate(&mut base.model, name).map_err(user)?;
    }
    Ok((base, set))
}
