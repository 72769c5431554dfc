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
    /// A PEFT adapter folder to apply (unmerged).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// Hold the base's projections in NF4 with double quantization (transformers' load_in_4bit), as a QLoRA
    /// adapter was trained. Pre-quantized bitsandbytes checkpoints are NF4 without this flag.
    #[arg(long)]
    pub load_in_4bit: bool,
}

/// Loads the base model of `m` and applies its adapter, warning when the adapter was trained on another base.
pub fn load_model(m: &ModelArgs) -> anyhow::Result<peftkit::base::BaseModel> {
    let quant = if m.load_in_4bit {
        peftkit::model::BaseQuant::Nf4 { double_quant: true }
    } else {
        peftkit::model::BaseQuant::None
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
    if let Some(dir) = &m.adapter {
        let cfg = peftkit::adapter::peft_format::load_adapter(&mut base.model, dir).map_err(user)?;
        // The same model named two ways (relative and absolute path) is the same model.
        let same = |a: &str, b: &str| {
            a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
        };
        if let Some(trained_on) = cfg.base_model_name_or_path.filter(|b| !same(b, &base.name)) {
            tracing::warn!("{} was trained on `{trained_on}`, not `{}`", dir.display(), base.name);
        }
    }
    Ok(base)
}
