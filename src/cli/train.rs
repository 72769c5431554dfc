//! `peftkit train RECIPE.yaml [--set key=value]… [--resume]`

use super::{command_line, hub_options, user};
use anyhow::{Context, Result};
use peftkit::adapter::{peft_format, AdapterConfig};
use peftkit::base::load_base_quant;
use peftkit::card::{adapter_card, framework_versions, DataFacts, TrainingRecord, TRAINING_RECORD_FILE};
use peftkit::data::{self, Dataset, EncodeOptions, Format};
use peftkit::memory;
use peftkit::outdir::{OutputLock, Staging};
use peftkit::peft_model;
use peftkit::push::PushOptions;
use peftkit::recipe::{DataFormat, Projection, Recipe};
use peftkit::train::{self, TrainConfig, TrainOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// The recipe (YAML).
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. `--set training.learning_rate=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Start afresh even if the output folder holds an adapter or checkpoints from an earlier run (they are deleted).
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
}

/// Files of an earlier run in an output folder.
const RUN_FILES: [&str; 6] = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    "peftkit_recipe.yaml",
    TRAINING_RECORD_FILE,
    train::METRICS_FILE,
];

/// A recipe's data format as the data module's (None = detect).
pub fn data_format(f: DataFormat) -> Option<Format> {
    match f {
        DataFormat::Auto => None,
        DataFormat::Chat => Some(Format::Chat),
        DataFormat::Alpaca => Some(Format::Alpaca),
        DataFormat::Completion => Some(Format::Completion),
        DataFormat::Tokens => Some(Format::Tokens),
    }
}

fn facts(d: &Dataset) -> DataFacts {
    DataFacts {
        path: d.path.display().to_string(),
        sha256: d.stats.sha256.clone(),
        format: d.format.to_string(),
        examples: d.stats.examples,
        tokens: d.stats.tokens,
        supervised_tokens: d.stats.supervised_tokens,
    }
}

pub fn run(args: Args) -> Result<()> {
    // Everything about the recipe is checked before any download or computation.
    let recipe = Recipe::load(&args.recipe, &args.set).map_err(user)?;
    // Continuing an adapter: its own config (with PEFT's rank/alpha patterns, which a recipe cannot write).
    let init_from = recipe.adapter.lora().and_then(|l| l.init_from.clone());
    let adapter_cfg = match &init_from {
        Some(dir) => peft_format::read_config(dir).map_err(user)?.adapter,
        None => recipe.adapter.adapter_config(),
    };
    // A push at the end needs a token and the network: found out now, not after hours of training.
    let push_opts = recipe.output.hub_model_id.as_ref().map(|id| {
        let hub = hub_options();
        PushOptions {
            folder: recipe.output.dir.clone(),
            repo: id.clone(),
            private: recipe.output.private,
            revision: recipe.output.hub_revision.clone().unwrap_or_else(|| peftkit::hub::DEFAULT_REVISION.into()),
            message: None,
            progress: hub.progress,
            hub,
        }
    });
    if let Some(p) = &push_opts {
        peftkit::push::preflight(p)
            .map_err(|e| user(anyhow::anyhow!("{}: output.hub_model_id ({}): {e}", args.recipe.display(), p.repo)))?;
    }
    let out = recipe.output.dir.clone();
    if let Some(problem) = peftkit::fsutil::output_dir_problem(&out) {
        return Err(user(anyhow::anyhow!("{}: output.dir: {problem}", args.recipe.display())));
    }
    // One run per output folder: a second one stops here, naming the first's pid. Held until this function
    // returns (also on errors); an interrupted run releases it before exiting.
    let lock = OutputLock::folder(&out, &command_line()).map_err(user)?;
    // What killed runs left: their temporary files (a final save that was complete is finished instead), and
    // unfinished or incomplete checkpoints.
    for line in train::clean_output(&out).map_err(user)? {
        tracing::info!("{}: {line}", out.display());
    }
    if args.resume && train::latest_checkpoint(&out).is_none() {
        return Err(user(anyhow::anyhow!("--resume: no checkpoint in {}", out.join("checkpoints").display())));
    }
    let earlier: Vec<&str> = RUN_FILES.iter().copied().filter(|f| out.join(f).exists()).collect();
    if !args.resume && !args.overwrite && (!earlier.is_empty() || train::latest_checkpoint(&out).is_some()) {
        return Err(user(anyhow::anyhow!(
            "{} already holds an earlier run ({}); continue it with --resume, or start afresh with --overwrite",
            out.display(),
            if earlier.is_empty() { "checkpoints".to_string() } else { earlier.join(", ") }
        )));
    }
    if args.overwrite {
        train::clear_earlier_run(&out, &RUN_FILES).map_err(user)?;
    }

    let compute = args.compute.resolve((recipe.training.device, recipe.training.dtype))?;
    tracing::info!("loading base model {}", recipe.base_model);
    let quant = recipe.adapter.base_quant();
    let mut base = load_base_quant(
        &recipe.base_model,
        recipe.revision.as_deref(),
        recipe.gguf_file.as_deref(),
        quant,
        &hub_options(),
        &compute,
    )
    .map_err(user)?;
    if let Some(id) = &recipe.base_model_id {
        // A local copy of a Hub model: the adapter and its card name the Hub repository, not this machine's path.
        tracing::info!("base {} recorded as the Hub model {id} (base_model_id)", base.name);
        base.name = id.clone();
    }
    if base.model.linears().any(|l| l.weight.is_nf4()) {
        let bytes: usize = base.model.linears().map(|l| l.weight.bytes()).sum();
        tracing::info!("base projections held in NF4: {:.1} MB", bytes as f64 / 1e6);
        if let peftkit::recipe::AdapterSpec::Qlora(q) = &recipe.adapter {
            // training.dtype decides the compute dtype; bnb_4bit_compute_dtype is kept for PEFT's config.
            tracing::info!(
                "NF4 weights dequantized for {} compute (training.dtype; the recipe's bnb_4bit_compute_dtype {:?} is \
                 recorded in the adapter config)",
                peftkit::compute::dtype_name(compute.dtype),
                q.bnb_4bit_compute_dtype
            );
        }
    }
    // New special tokens: into the tokenizer (before any data is encoded), new embedding rows (mean-initialised).
    let mut new_tokens: Vec<(String, u32)> = Vec::new();
    if !recipe.tokenizer.add_special_tokens.is_empty() {
        let list = &recipe.tokenizer.add_special_tokens;
        let what = format!("{}: tokenizer.add_special_tokens", args.recipe.display());
        let ids = peftkit::tokens::add_special_tokens(&mut base.tokenizer, list, &what).map_err(user)?;
        let want = peftkit::tokens::tokenizer_len(&base.tokenizer).max(base.model.config.vocab_size);
        if want > base.model.config.vocab_size {
            tracing::info!(
                "vocabulary grows from {} to {want} tokens (new rows = the mean of the old ones, as transformers' \
                 resize_token_embeddings does)",
                base.model.config.vocab_size
            );
            peft_model::vocab::resize_vocab(&mut base.model, want)?;
        }
        new_tokens = list.iter().cloned().zip(ids).collect();
        let shown: Vec<String> = new_tokens.iter().map(|(t, i)| format!("{t} = {i}")).collect();
        tracing::info!("special tokens: {}", shown.join(", "));
    }
    recipe.check_token_ids(&args.recipe, &args.set, base.model.config.vocab_size).map_err(user)?;
    let projections: Vec<Projection> = base
        .model
        .linears()
        .map(|l| Projection { path: l.path.clone(), in_features: l.in_features, out_features: l.out_features })
        .collect();
    recipe.check_targets(&args.recipe, &args.set, base.model.config.num_hidden_layers, &projections).map_err(user)?;
    let opts = EncodeOptions {
        sequence_len: recipe.data.sequence_len,
        train_on_inputs: recipe.data.train_on_inputs,
        vocab_size: Some(base.model.config.vocab_size),
    };
    let format = data_format(recipe.data.format);
    let load = |p: &Path| {
        data::load_dataset(p, format, &base.tokenizer, base.template.as_ref(), base.eos_token.as_deref(), &opts)
    };
    let train_set = load(&recipe.data.train).map_err(user)?;
    let valid_set = recipe.data.validation.as_deref().map(load).transpose().map_err(user)?;
    for d in std::iter::once(&train_set).chain(valid_set.as_ref()) {
        let s = &d.stats;
        tracing::info!(
            "{}: {} examples ({} format), {} tokens, {} supervised{}{}",
            d.path.display(),
            s.examples,
            d.format,
            s.tokens,
            s.supervised_tokens,
            if s.truncated > 0 {
                format!(", {} truncated to {}", s.truncated, opts.sequence_len)
            } else {
                String::new()
            },
            if s.dropped > 0 {
                format!(", {} dropped (nothing to learn after truncation)", s.dropped)
            } else {
                String::new()
            },
        );
    }

    let n_adapted = match &init_from {
        Some(dir) => {
            peft_model::load_adapter(&mut base.model, dir)
                .with_context(|| format!("adapter.init_from: {}", dir.display()))
                .map_err(user)?;
            tracing::info!("adapter initialised from {}", dir.display());
            base.model.linears().filter(|l| l.adapter.is_some()).count()
        }
        None => {
            // A resumed PiSSA/OLoRA run rebuilds its residual base from the checkpoint's A₀, B₀.
            let initial = if args.resume { train::resume_initial(&out).map_err(user)? } else { None };
            peft_model::attach_with_initial(&mut base.model, &adapter_cfg, recipe.training.seed, initial.as_ref())
                .map_err(user)?
        }
    };
    let new_ids: Vec<u32> = new_tokens.iter().map(|(_, i)| *i).collect();
    let vocab_cfg = peftkit::tokens::with_trainable_ids(
        recipe.adapter.vocab_config(),
        &new_ids,
        base.model.config.tie_word_embeddings,
    );
    if matches!(adapter_cfg, AdapterConfig::Ia3(_)) && !vocab_cfg.trainable_tokens.is_empty() {
        return Err(user(anyhow::anyhow!(
            "{}: tokenizer.add_special_tokens: the new tokens' rows must train, and PEFT's IA3 has no \
             trainable_token_indices: add embed_tokens{} to adapter.modules_to_save, or use a LoRA adapter",
            args.recipe.display(),
            if base.model.config.tie_word_embeddings { "" } else { " and lm_head" }
        )));
    }
    let vocab_params = peft_model::vocab::attach(&mut base.model, &vocab_cfg, &args.recipe).map_err(user)?;
    let trainable: usize = peft_model::trainable(&base.model).iter().map(|(_, v)| v.elem_count()).sum();
    let dora = recipe.adapter.lora().is_some_and(|l| l.use_dora);
    let residual_init = recipe.adapter.lora().map(|l| l.init_lora_weights).filter(|i| i.rewrites_base());
    tracing::info!(
        "{} adapter{} on {n_adapted} projections: {trainable} trainable parameters{}",
        recipe.adapter.type_name(),
        match residual_init {
            _ if dora => " (DoRA: with a magnitude vector per projection)".to_string(),
            Some(i) => format!(
                " (init_lora_weights {}: trained on the residual base; saved converted for the original base)",
                i.name()
            ),
            None => String::new(),
        },
        match vocab_params {
            0 => String::new(),
            n => format!(" ({n} of them in {})", base.model.vocab.describe()),
        }
    );

    let cfg = TrainConfig::from_recipe(&recipe, base.pad_id, &train_set.examples);
    if let Some(plus) = &cfg.loraplus {
        tracing::info!(
            "LoRA+: lora_B (and DoRA magnitudes) at {:.2e} (×{}), lora_A at {:.2e}{}",
            cfg.learning_rate * plus.lr_ratio,
            plus.lr_ratio,
            cfg.learning_rate,
            if vocab_params > 0 {
                format!(", embedding rows/copy at {:.2e}", plus.lr_embedding)
            } else {
                String::new()
            }
        );
    }
    check_memory(&recipe, &args.recipe, &base.model.config, &compute, trainable, &train_set.examples)?;
    if cfg.packing.is_some() {
        let rows = cfg.rows(&train_set.examples).len();
        tracing::info!(
            "packing: {} examples in {rows} rows of up to {} tokens",
            train_set.examples.len(),
            recipe.data.sequence_len
        );
    }
    // Activation checkpointing changes memory and time, not the gradients: a model setting, outside the run's
    // fingerprint, so a run may be resumed with it switched on or off.
    base.model.gradient_checkpointing = recipe.training.gradient_checkpointing;
    if recipe.training.gradient_checkpointing {
        tracing::info!("gradient checkpointing: each decoder layer is recomputed in the backward pass");
    }
    let interrupt = Arc::new(AtomicBool::new(false));
    {
        // Ctrl-C, and SIGTERM / SIGHUP (what batch schedulers, containers and a closed terminal send): all stop
        // the run after the current step with a checkpoint. (A closed terminal may refuse the messages: ignored.)
        let flag = interrupt.clone();
        let _ = ctrlc::set_handler(move || {
            use std::io::Write;
            if flag.swap(true, Ordering::SeqCst) {
                let _ = writeln!(std::io::stderr(), "\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            let _ = writeln!(
                std::io::stderr(),
                "\ninterrupted (Ctrl-C, SIGTERM or SIGHUP): finishing this step and writing a checkpoint (interrupt \
                 again to quit at once)"
            );
        });
    }
    let options = TrainOptions {
        resume: args.resume,
        interrupt,
        stop_after_step: None,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        keep_checkpoints: 2,
    };
    let valid_examples = valid_set.as_ref().map(|d| d.examples.as_slice());
    let out_existed = out.exists();
    let summary = train::train(
        &mut base.model,
        &adapter_cfg,
        &train_set.examples,
        valid_examples,
        &cfg,
        &base.name,
        &out,
        &options,
    )
    .map_err(|e| match e {
        train::TrainError::Resume(_) | train::TrainError::EmptyDataset => user(e),
        // A loss that is not finite comes from the inputs (data, learning rate, a damaged base). Before the first
        // checkpoint there is nothing to resume: the log of the failed steps is removed with the folder it made.
        train::TrainError::NonFinite { checkpoint: None, .. } => {
            let _ = std::fs::remove_file(out.join(train::METRICS_FILE));
            if !out_existed {
                let _ = std::fs::remove_dir(&out);
            }
            user(e)
        }
        train::TrainError::NonFinite { .. } => user(e),
        other => anyhow::Error::new(other),
    })?;
    if let Some(ckpt) = &summary.interrupted_at {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "stopped after step {} of {}; checkpoint: {}\nresume with: {}",
            summary.steps,
            summary.total_steps,
            ckpt.display(),
            resume_command(&args)
        );
        // process::exit runs no destructors: the lock goes first.
        drop(lock);
        std::process::exit(130);
    }

    // The adapter, the resolved recipe and the card, each written to a temporary name and renamed into place.
    let revision = match &base.source {
        peftkit::hub::ModelSource::Hub { revision, .. } => Some(revision.as_str()),
        _ => None,
    };
    // Everything is written into a hidden folder first and moved into place once complete, the adapter config
    // last: a run killed while saving leaves no adapter without its config (see peftkit::outdir::Staging).
    let staging = Staging::create(&out, "save").map_err(user)?;
    let dir = staging.path();
    peft_model::save_adapter(&base.model, &adapter_cfg, &base.name, revision, dir)?;
    if !new_tokens.is_empty() {
        // The tokenizer with its new tokens, beside the adapter (PEFT users load it from there).
        let files = base.files.as_ref();
        let tok_cfg = files.and_then(|f| f.tokenizer_config.as_deref());
        peftkit::tokens::save(&base.tokenizer, &new_tokens, tok_cfg, dir)?;
        if let Some(t) = files.and_then(|f| f.chat_template.as_deref()) {
            std::fs::copy(t, dir.join("chat_template.jinja")).with_context(|| format!("copying {}", t.display()))?;
        }
    }
    let recipe_yaml = recipe.to_yaml();
    peft_format::write_atomic(&dir.join("peftkit_recipe.yaml"), recipe_yaml.as_bytes())?;
    let license = peftkit::base::license_of(&base, &hub_options());
    let record = TrainingRecord {
        base_model: base.name.clone(),
        base_is_hub: recipe.base_model_id.is_some() || matches!(base.source, peftkit::hub::ModelSource::Hub { .. }),
        revision: revision.map(str::to_string),
        license,
        method: recipe.adapter.type_name().to_string(),
        dora,
        residual_init: residual_init.map(|i| i.name()),
        adapter_dir: out.display().to_string(),
        sequence_len: recipe.data.sequence_len,
        train: facts(&train_set),
        validation: valid_set.as_ref().map(facts),
        trainable_params: trainable,
        steps: summary.steps,
        total_steps: summary.total_steps,
        last_train_loss: summary.last_train_loss,
        initial_eval: summary.initial_eval,
        final_eval: summary.final_eval,
        tokens: summary.tokens,
        wall_s: summary.wall_s,
        peak_rss_mb: peftkit::util::peak_rss_mb(),
        device: match compute.device {
            candle_core::Device::Cpu => format!(
                "CPU: {} ({} threads), {}",
                peftkit::cpu::features().model,
                candle_core::utils::get_num_threads(),
                peftkit::compute::dtype_name(compute.dtype)
            ),
            _ => match peftkit::gpu::info(&compute.device) {
                Some(g) => format!(
                    "{} ({}, sm_{}{}), {}",
                    compute.describe(),
                    g.name,
                    g.capability.0,
                    g.capability.1,
                    peftkit::compute::dtype_name(compute.dtype)
                ),
                None => compute.describe(),
            },
        },
        frameworks: framework_versions(),
        vocab: (vocab_params > 0).then(|| peftkit::card::VocabFacts {
            trained: base.model.vocab.describe(),
            params: vocab_params,
            added_tokens: new_tokens.clone(),
            vocab_size: base.model.config.vocab_size,
        }),
    };
    let record_json = serde_json::to_string_pretty(&record)?;
    peft_format::write_atomic(&dir.join(TRAINING_RECORD_FILE), record_json.as_bytes())?;
    let card = adapter_card(&record, &recipe_yaml);
    peft_format::write_atomic(&dir.join("README.md"), card.as_bytes()).context("writing the model card")?;
    staging.commit(&[peft_format::CONFIG_FILE]).map_err(user)?;

    let eval_line = |name: &str, r: &Option<train::EvalResult>| {
        if let Some(r) = r {
            println!("{name}: loss {:.4}, perplexity {:.2} ({} tokens)", r.loss, r.perplexity, r.tokens);
        }
    };
    eval_line("validation before", &summary.initial_eval);
    eval_line("validation after ", &summary.final_eval);
    println!(
        "trained {} steps in {:.1} s ({:.0} tokens/s); adapter written to {}",
        summary.steps,
        summary.wall_s,
        summary.tokens as f64 / summary.wall_s.max(1e-9),
        out.display()
    );
    println!(
        "training steps: {:.0} tokens/s (supervised + context, padding excluded, {:.1} s in steps); padding {:.1}% \
         of {} positions{}",
        summary.tokens_per_s(),
        summary.step_s,
        100.0 * summary.padding_fraction(),
        summary.positions,
        if cfg.packing.is_some() { " (packed)" } else { "" }
    );
    if let Some(p) = &push_opts {
        let report = super::push::run_push(p).with_context(|| {
            format!(
                "the adapter is saved in {}, but pushing it to {} failed; push it again with `peftkit push {} --repo {} \
                 --revision {}{}`",
                out.display(),
                p.repo,
                out.display(),
                p.repo,
                p.revision,
                if p.private { " --private" } else { "" }
            )
        })?;
        super::push::print_report(&report);
    }
    Ok(())
}

/// Refuses a run whose memory estimate ([`peftkit::memory`]) exceeds what the machine has, before its first step
/// allocates (on a CPU; a GPU's memory is the GPU's concern, reported by its out-of-memory error). The longest row
/// is the longest example, or `sequence_len` with packing.
fn check_memory(
    recipe: &Recipe,
    path: &Path,
    config: &peftkit::model::ModelConfig,
    compute: &peftkit::compute::Compute,
    trainable: usize,
    examples: &[data::Example],
) -> Result<()> {
    let longest = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let seq = if recipe.data.packing { recipe.data.sequence_len } else { longest.min(recipe.data.sequence_len) };
    let shape = memory::StepShape {
        batch: recipe.training.micro_batch_size.min(examples.len()),
        seq,
        activation_bytes: compute.dtype.size_in_bytes(),
        gradient_checkpointing: recipe.training.gradient_checkpointing,
    };
    let what = format!(
        "training.micro_batch_size {} × {seq} tokens ({})",
        shape.batch,
        if recipe.data.packing { "data.sequence_len" } else { "the longest example" }
    );
    memory::check_training(config, trainable, shape, 0.0, &compute.device, &what)
        .map_err(|m| user(anyhow::anyhow!("{}: {m}", path.display())))
}

/// The command that continues an interrupted run: the same recipe, `--set` overrides and compute flags, with
/// `--resume`, each argument quoted for a POSIX shell.
fn resume_command(args: &Args) -> String {
    let mut words: Vec<String> = vec!["peftkit".into(), "train".into(), args.recipe.display().to_string()];
    for s in &args.set {
        words.push("--set".into());
        words.push(s.clone());
    }
    if let Some(d) = &args.compute.device {
        words.extend(["--device".to_string(), d.to_string()]);
    }
    if let Some(d) = &args.compute.dtype {
        words.extend(["--dtype".to_string(), d.to_string()]);
    }
    words.push("--resume".into());
    shlex::try_join(words.iter().map(String::as_str)).unwrap_or_else(|_| words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_command_repeats_the_overrides_shell_quoted() {
        let args = Args {
            recipe: "my recipes/run.yaml".into(),
            set: vec!["training.learning_rate=1e-4".into(), "output.dir=out dir/it's".into()],
            resume: false,
            overwrite: true,
            compute: Default::default(),
        };
        assert_eq!(
            resume_command(&args),
            "peftkit train 'my recipes/run.yaml' --set 'training.learning_rate=1e-4' --set \"output.dir=out dir/it's\" \
             --resume"
        );
    }
}
