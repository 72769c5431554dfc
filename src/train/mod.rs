//! The training loop: forward, loss, backward (adapter variables only), accumulation, clipping, AdamW, schedule,
//! evaluation, checkpoints and resume — one function, [`train`], readable top to bottom.
//!
//! Determinism: the data order is a pure function of (seed, epoch), dropout masks of (seed, step, micro-batch,
//! layer), adapter initialisation of the seed. A checkpoint holds the adapter, the optimizer moments and the step,
//! which is all the state there is, so a run stopped and resumed writes the same adapter bytes as an
//! uninterrupted one.
//!
//! Rows: a micro-batch is `micro_batch_size` rows, each one example or, with packing, several
//! ([`TrainConfig::rows`]); every batch carries its rows' example boundaries, so attention never crosses an example
//! and skips the padding ([`crate::ops::attention_segments`]).
//!
//! Loss normalisation: each optimizer step's loss is the mean over the supervised tokens of all its micro-batches
//! (every micro-batch's summed loss is divided by the step's token count), so accumulation gives the same gradient
//! as one large batch, as transformers ≥ 4.46 does.
//!
//! Memory: with `model.gradient_checkpointing` set (the recipe's `training.gradient_checkpointing`), training
//! forwards keep only each decoder layer's input and recompute the layer during the backward pass
//! ([`crate::model::checkpoint`]); the gradients, and so the run, are the same.

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod step;

use crate::adapter::{peft_format, AdapterConfig, AdapterError};
use crate::data::{epoch_order, group_by_length, make_batch, make_packed_batch, pack, Example};
use crate::linear::ForwardCtx;
use crate::model::Llama;
use crate::ops::{self, Segments};
use crate::peft_model;
use crate::recipe::LrScheduler;
use candle_core::Tensor;
pub use checkpoint::{
    checkpoints, clean_output, clear_earlier_run, latest_checkpoint, resume_initial, Progress, TrainerState,
};
use checkpoint::{fingerprint, load_checkpoint, save_checkpoint, CHECKPOINTS};
use optim::AdamW;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("the training set is empty")]
    EmptyDataset,
    #[error("step {step}: the loss is {value} (not finite); stopping. {}", match .checkpoint {
        Some(c) => format!("The last good checkpoint is kept at {}", c.display()),
        None => "No checkpoint was written before it, so there is nothing to resume from: lower the learning rate \
                 or check the data, then start again".to_string(),
    })]
    NonFinite { step: usize, value: f32, checkpoint: Option<PathBuf> },
    #[error("--resume: {0}")]
    Resume(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// The settings of a run (from the recipe's `training` section).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// `Some(n)`: stop after n optimizer steps (wrapping over epochs); `None`: run `epochs` epochs.
    pub max_steps: Option<usize>,
    pub epochs: usize,
    pub learning_rate: f64,
    pub lr_scheduler: LrScheduler,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub shuffle: bool,
    pub eval_every: Option<usize>,
    pub save_every: Option<usize>,
    pub logging_every: usize,
    pub pad_id: u32,
    /// Sample packing (`data.packing`): `Some(capacity)` lays several examples into each row of up to `capacity`
    /// tokens ([`crate::data::pack`]); a micro-batch is then `micro_batch_size` packed rows.
    pub packing: Option<usize>,
    /// `data.group_by_length`: each epoch's rows grouped by length ([`crate::data::group_by_length`]).
    pub group_by_length: bool,
    /// `adapter.init_from`: the adapter folder the run started from (None: a fresh adapter).
    pub init_from: Option<std::path::PathBuf>,
    /// LoRA+ (`training.loraplus_lr_ratio`, `training.loraplus_lr_embedding`): per-group learning rates.
    pub loraplus: Option<LoraPlus>,
}

/// LoRA+'s learning rates (PEFT's `create_loraplus_optimizer`), as multiples of the scheduled learning rate so
/// that warmup and the schedule scale every group alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraPlus {
    /// `lora_B` and the 1-D adapter tensors (DoRA magnitudes) train at lr × this.
    pub lr_ratio: f64,
    /// The trained embedding copy or rows train at this peak learning rate (LoRA+'s default 1e-6).
    pub lr_embedding: f64,
}

impl LoraPlus {
    /// LoRA+'s default learning rate for embedding parameters.
    pub const DEFAULT_LR_EMBEDDING: f64 = 1e-6;

    /// The factor on the scheduled learning rate for the trainable tensor `name` (a PEFT tensor name, as
    /// [`peft_model::trainable`] gives it), with peak learning rate `lr`. PEFT's grouping: an embedding parameter →
    /// `lr_embedding`; `lora_B`, or any 1-D tensor (DoRA's `lora_magnitude_vector`, IA3 vectors) → `lr_ratio`;
    /// the rest (`lora_A`, the head copy or rows) → 1.
    pub fn scale(&self, name: &str, shape: &[usize], lr: f64) -> f64 {
        if name.contains("embed_tokens") {
            self.lr_embedding / lr
        } else if name.contains(".lora_B.") || shape.len() == 1 {
            self.lr_ratio
        } else {
            1.0
        }
    }
}

impl Default for TrainConfig {
    /// A recipe's defaults ([`crate::recipe::TrainingSpec`]'s, one epoch, LoRA's learning rate 2e-4, shuffled
    /// one-example rows), padding with id 0: tests and library callers override what they need with
    /// `..Default::default()`.
    fn default() -> Self {
        TrainConfig::from_training(&crate::recipe::TrainingSpec::default(), 2e-4)
    }
}

impl TrainConfig {
    /// The settings a `training` section gives alone, at peak learning rate `learning_rate`: shuffled
    /// one-example rows, pad id 0, no packing, LoRA+ as the section says.
    fn from_training(t: &crate::recipe::TrainingSpec, learning_rate: f64) -> Self {
        TrainConfig {
            micro_batch_size: t.micro_batch_size.max(1),
            gradient_accumulation_steps: t.gradient_accumulation_steps.max(1),
            max_steps: t.max_steps,
            epochs: t.epochs.unwrap_or(1),
            learning_rate,
            lr_scheduler: t.lr_scheduler,
            warmup_steps: t.warmup_steps,
            weight_decay: t.weight_decay,
            adam_beta1: t.adam_beta1,
            adam_beta2: t.adam_beta2,
            adam_epsilon: t.adam_epsilon,
            max_grad_norm: t.max_grad_norm,
            seed: t.seed,
            shuffle: true,
            eval_every: t.eval_every,
            save_every: t.save_every,
            logging_every: t.logging_every.max(1),
            pad_id: 0,
            packing: None,
            group_by_length: false,
            init_from: None,
            loraplus: t.loraplus_lr_ratio.map(|lr_ratio| LoraPlus {
                lr_ratio,
                lr_embedding: t.loraplus_lr_embedding.unwrap_or(LoraPlus::DEFAULT_LR_EMBEDDING),
            }),
        }
    }

    /// The settings of a recipe's `training` section (and of `data.packing`, `data.group_by_length`) for the
    /// training set `train`.
    pub fn from_recipe(recipe: &crate::recipe::Recipe, pad_id: u32, train: &[Example]) -> Self {
        let t = &recipe.training;
        let mut cfg = TrainConfig {
            shuffle: recipe.data.shuffle,
            pad_id,
            packing: recipe.data.packing.then_some(recipe.data.sequence_len),
            group_by_length: recipe.data.group_by_length,
            init_from: recipe.adapter.lora().and_then(|l| l.init_from.clone()),
            ..TrainConfig::from_training(t, t.learning_rate(&recipe.adapter))
        };
        // `warmup_ratio` (exclusive with `warmup_steps`, validated): a fraction of the run, rounded up as
        // transformers' `get_warmup_steps` does.
        if let (Some(ratio), 0) = (t.warmup_ratio, t.warmup_steps) {
            cfg.warmup_steps = (ratio * cfg.total_steps(cfg.rows(train).len()) as f64).ceil() as usize;
        }
        cfg
    }

    /// The training rows: with packing, the example indices of each packed row ([`crate::data::pack`], seeded
    /// with `seed`); else one example per row. Micro-batches take `micro_batch_size` rows.
    pub fn rows(&self, train: &[Example]) -> Vec<Vec<usize>> {
        match self.packing {
            Some(capacity) => pack(&train.iter().map(Example::len).collect::<Vec<_>>(), capacity, self.seed),
            None => (0..train.len()).map(|i| vec![i]).collect(),
        }
    }

    /// The order in which epoch `epoch` visits rows of `lengths` tokens: [`epoch_order`], then grouped by length
    /// (mega-batches of [`crate::data::packing::MEGABATCH_MULT`] optimizer steps) with `group_by_length`.
    pub fn row_order(&self, lengths: &[usize], epoch: usize) -> Vec<usize> {
        let order = epoch_order(lengths.len(), self.seed, epoch, self.shuffle);
        if !self.group_by_length {
            return order;
        }
        let megabatch = crate::data::packing::MEGABATCH_MULT * self.micro_batch_size * self.gradient_accumulation_steps;
        group_by_length(&order, lengths, megabatch)
    }

    /// Micro-batches in one pass over `n` examples.
    pub fn micro_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.micro_batch_size)
    }
    /// Optimizer steps in one epoch (the last one may accumulate fewer micro-batches).
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        self.micro_per_epoch(n).div_ceil(self.gradient_accumulation_steps)
    }
    /// Optimizer steps of the whole run over `n` rows: `max_steps` if set (it wins over `epochs`, wrapping over
    /// epochs), else `epochs × ceil(ceil(n / micro_batch_size) / gradient_accumulation_steps)`. The one place a
    /// run's length is computed: the schedule, the warmup ratio, progress and the model card all take it from here.
    pub fn total_steps(&self, n: usize) -> usize {
        self.max_steps.unwrap_or(self.epochs.saturating_mul(self.steps_per_epoch(n)))
    }
}

/// How a run is driven from outside.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in `<output>/checkpoints/`.
    pub resume: bool,
    /// Set (e.g. by Ctrl-C) to stop after the current step with a checkpoint.
    pub interrupt: Arc<AtomicBool>,
    /// Stop with a checkpoint once this many steps are done (as an interrupt would; used by tests).
    pub stop_after_step: Option<usize>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Number of checkpoints to keep (older ones are deleted); 0 keeps all.
    pub keep_checkpoints: usize,
}

/// What the run left behind.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub total_steps: usize,
    /// Mean loss of the last optimizer step.
    pub last_train_loss: Option<f64>,
    /// Validation loss at the end (mean NLL per supervised token).
    pub final_eval: Option<EvalResult>,
    /// Validation loss before training, when a validation set is given and the run started fresh.
    pub initial_eval: Option<EvalResult>,
    /// Input tokens processed (supervised and context; padding excluded).
    pub tokens: usize,
    /// Positions processed, padding included (`tokens` + padded positions).
    pub positions: usize,
    /// Seconds spent in optimizer steps (evaluation and checkpoints excluded): `tokens / step_s` is the training
    /// throughput.
    pub step_s: f64,
    pub wall_s: f64,
    /// Set when the run stopped early (interrupt): the checkpoint to resume from.
    pub interrupted_at: Option<PathBuf>,
}

impl TrainSummary {
    /// Padded positions over all positions processed (0 without padding).
    pub fn padding_fraction(&self) -> f64 {
        1.0 - self.tokens as f64 / self.positions.max(1) as f64
    }
    /// Training throughput: tokens (supervised + context, padding excluded) per second spent in optimizer steps.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.step_s.max(1e-9)
    }
}

/// Mean negative log-likelihood over supervised tokens.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// Evaluates `model` on `examples`: mean next-token NLL over supervised positions.
pub fn evaluate(
    model: &Llama,
    examples: &[Example],
    micro_batch: usize,
    pad_id: u32,
) -> candle_core::Result<EvalResult> {
    let ctx = ForwardCtx { dropout_seed: None, no_grad: true };
    let (mut sum, mut count) = (0f64, 0usize);
    let refs: Vec<&Example> = examples.iter().collect();
    for chunk in refs.chunks(micro_batch.max(1)) {
        let batch = make_batch(chunk, pad_id);
        let n = Llama::count_targets(&batch.labels, batch.batch, batch.seq);
        if n == 0 {
            continue;
        }
        let ids = Tensor::from_vec(batch.input_ids.clone(), (batch.batch, batch.seq), &model.device)?;
        let hidden = model.forward_hidden_segments(&ids, &Segments::new(batch.boundaries(), batch.seq)?, &ctx)?;
        let loss = model.loss(&hidden, &batch.labels, 1.0)?.to_scalar::<f32>()? as f64;
        sum += loss;
        count += n;
    }
    let loss = if count > 0 { sum / count as f64 } else { f64::NAN };
    Ok(EvalResult { loss, perplexity: loss.exp(), tokens: count })
}

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Keeps the lines of `metrics.jsonl` up to `step` (used on resume, so the file reads as one run).
fn truncate_metrics(path: &Path, step: usize) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    peft_format::write_atomic(path, kept.as_bytes())?;
    Ok(())
}

/// Trains the adapters attached to `model` on `train_set`, writing checkpoints and `metrics.jsonl` into `out`.
/// The final adapter is left attached to `model` (the caller saves it).
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &mut Llama,
    adapter: &AdapterConfig,
    train_set: &[Example],
    valid_set: Option<&[Example]>,
    cfg: &TrainConfig,
    base_model: &str,
    out: &Path,
    opts: &TrainOptions,
) -> Result<TrainSummary, TrainError> {
    if train_set.is_empty() {
        return Err(TrainError::EmptyDataset);
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let started = Instant::now();
    // The rows micro-batches are cut from: single examples, or packed ones.
    let rows = cfg.rows(train_set);
    let row_lengths: Vec<usize> = rows.iter().map(|row| row.iter().map(|&i| train_set[i].len()).sum()).collect();
    let n = rows.len();
    let micro_per_epoch = cfg.micro_per_epoch(n);
    let steps_per_epoch = cfg.steps_per_epoch(n);
    let total_steps = cfg.total_steps(n);
    let fp = fingerprint(cfg, adapter, &model.vocab.config(), train_set);

    // The trainable variables, in a fixed order, with their PEFT names.
    let (names, vars): (Vec<String>, Vec<_>) = peft_model::trainable(model).into_iter().unzip();
    let mut opt = AdamW::new(vars.clone(), cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay)?;
    if let Some(plus) = &cfg.loraplus {
        opt.lr_scale = names.iter().zip(&vars).map(|(n, v)| plus.scale(n, v.dims(), cfg.learning_rate)).collect();
    }

    let metrics_path = out.join(METRICS_FILE);
    let mut start_step = 0;
    let mut last_checkpoint = None;
    let mut resumed_progress = Progress::default();
    if opts.resume {
        let all = checkpoints(out);
        if all.is_empty() {
            return Err(TrainError::Resume(format!("no checkpoint in {}", out.join(CHECKPOINTS).display())));
        }
        // The newest checkpoint that loads; a damaged one (e.g. after a power loss) falls back to the one before.
        let mut last_err = None;
        for ckpt in all {
            match load_checkpoint(&ckpt, &mut opt, &names, &fp) {
                Ok(state) => {
                    start_step = state.step;
                    resumed_progress = state.progress;
                    tracing::info!("resuming from {} (step {start_step} of {total_steps})", ckpt.display());
                    last_checkpoint = Some(ckpt);
                    break;
                }
                Err(e) => {
                    tracing::warn!("cannot resume from {}: {e}", ckpt.display());
                    last_err = Some(e);
                }
            }
        }
        if last_checkpoint.is_none() {
            return Err(last_err.unwrap_or_else(|| TrainError::Resume("no usable checkpoint".into())));
        }
        truncate_metrics(&metrics_path, start_step)?;
    } else {
        // A fresh run starts a fresh log and forgets older checkpoints of this folder.
        let _ = std::fs::remove_file(&metrics_path);
        let _ = std::fs::remove_dir_all(out.join(CHECKPOINTS));
    }
    let mut metrics =
        std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path).map_err(io_err(&metrics_path))?;
    let mut log =
        |v: serde_json::Value| -> Result<(), TrainError> { writeln!(metrics, "{v}").map_err(io_err(&metrics_path)) };

    let eval_batch = cfg.micro_batch_size;
    let initial_eval = match valid_set {
        Some(v) if start_step == 0 && !v.is_empty() => {
            let r = evaluate(model, v, eval_batch, cfg.pad_id)?;
            log(json!({"step": 0, "eval_loss": r.loss, "eval_perplexity": r.perplexity, "eval_tokens": r.tokens}))?;
            Some(r)
        }
        _ => resumed_progress.initial_eval,
    };
    // Totals carried over from before a resume, so the card describes the whole run.
    let prior_tokens = resumed_progress.tokens;
    let prior_positions = resumed_progress.positions.unwrap_or(prior_tokens);
    let prior_wall = resumed_progress.wall_s;
    let prior_step_s = resumed_progress.step_s;

    let bar = if opts.progress {
        let pb = indicatif::ProgressBar::new(total_steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(start_step as u64);
        Some(pb)
    } else {
        None
    };

    let (mut tokens_total, mut positions_total, mut step_s_total) = (0usize, 0usize, 0f64);
    let mut last_loss = None;
    let mut interrupted_at = None;
    let mut step = start_step;
    // (epoch, its visiting order), recomputed when a step enters a new epoch.
    let mut order = (usize::MAX, Vec::new());
    while step < total_steps {
        let step_started = Instant::now();
        // The micro-batches of this step: a window of this epoch's order.
        let epoch = step / steps_per_epoch;
        if order.0 != epoch {
            order = (epoch, cfg.row_order(&row_lengths, epoch));
        }
        let order = &order.1;
        let first_micro = (step % steps_per_epoch) * cfg.gradient_accumulation_steps;
        let last_micro = (first_micro + cfg.gradient_accumulation_steps).min(micro_per_epoch);
        let batches: Vec<_> = (first_micro..last_micro)
            .map(|mi| {
                let idx = &order[mi * cfg.micro_batch_size..((mi + 1) * cfg.micro_batch_size).min(n)];
                let exs: Vec<Vec<&Example>> =
                    idx.iter().map(|&r| rows[r].iter().map(|&i| &train_set[i]).collect()).collect();
                make_packed_batch(&exs, cfg.pad_id)
            })
            .collect();
        let step_positions: usize = batches.iter().map(|b| b.batch * b.seq).sum();
        let lr = schedule::lr_at(cfg.lr_scheduler, cfg.learning_rate, cfg.warmup_steps, total_steps, step);
        let seed = |mi: usize| Some(ops::seed_of(&[cfg.seed, step as u64, mi as u64]));
        let (step_loss, grad_norm, step_tokens) =
            match step::optimizer_step(model, &mut opt, &batches, seed, cfg.max_grad_norm, lr)? {
                step::StepOutcome::Updated { loss, grad_norm, tokens } => (loss, grad_norm, tokens),
                step::StepOutcome::NonFinite { value } => {
                    return Err(TrainError::NonFinite {
                        step: step + 1,
                        value: value as f32,
                        checkpoint: last_checkpoint,
                    })
                }
            };
        step += 1;

        let dt = step_started.elapsed().as_secs_f64();
        tokens_total += step_tokens;
        positions_total += step_positions;
        step_s_total += dt;
        let padding = 1.0 - step_tokens as f64 / step_positions.max(1) as f64;
        last_loss = Some(step_loss);
        let tps = step_tokens as f64 / dt.max(1e-9);
        if step % cfg.logging_every.max(1) == 0 || step == total_steps {
            log(json!({
                "step": step, "epoch": step as f64 / steps_per_epoch as f64, "loss": step_loss, "lr": lr,
                "grad_norm": grad_norm, "tokens": step_tokens, "tokens_per_s": tps, "step_s": dt,
                "padding_fraction": padding,
                "elapsed_s": started.elapsed().as_secs_f64(),
            }))?;
        }
        if let Some(pb) = &bar {
            pb.set_message(format!("loss {step_loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
            pb.set_position(step as u64);
        } else if step % cfg.logging_every.max(1) == 0 {
            tracing::info!("step {step}/{total_steps} loss {step_loss:.4} lr {lr:.2e} {tps:.0} tok/s");
        }

        if let (Some(every), Some(v)) = (cfg.eval_every, valid_set) {
            if step % every == 0 && step < total_steps && !v.is_empty() {
                let r = evaluate(model, v, eval_batch, cfg.pad_id)?;
                log(
                    json!({"step": step, "eval_loss": r.loss, "eval_perplexity": r.perplexity, "eval_tokens": r.tokens}),
                )?;
                if let Some(pb) = &bar {
                    pb.println(format!("step {step}: eval loss {:.4} (perplexity {:.2})", r.loss, r.perplexity));
                }
            }
        }
        // An interrupt during the last step just lets the run finish.
        let stop = (opts.interrupt.load(Ordering::SeqCst) || opts.stop_after_step == Some(step)) && step < total_steps;
        let scheduled = cfg.save_every.is_some_and(|e| step % e == 0) && step < total_steps;
        if stop || scheduled {
            let state = TrainerState {
                step,
                optimizer_t: opt.t,
                fingerprint: fp.clone(),
                fingerprint_version: checkpoint::FINGERPRINT_VERSION,
                progress: Progress {
                    tokens: prior_tokens + tokens_total,
                    positions: Some(prior_positions + positions_total),
                    step_s: prior_step_s + step_s_total,
                    wall_s: prior_wall + started.elapsed().as_secs_f64(),
                    initial_eval,
                },
                peftkit_version: env!("CARGO_PKG_VERSION").to_string(),
            };
            let dir = save_checkpoint(model, adapter, &opt, &names, &state, base_model, out, opts.keep_checkpoints)?;
            last_checkpoint = Some(dir.clone());
            if stop {
                interrupted_at = Some(dir);
                break;
            }
        }
    }
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    let final_eval = match valid_set {
        Some(v) if interrupted_at.is_none() && !v.is_empty() => {
            let r = evaluate(model, v, eval_batch, cfg.pad_id)?;
            log(json!({"step": step, "eval_loss": r.loss, "eval_perplexity": r.perplexity, "eval_tokens": r.tokens}))?;
            Some(r)
        }
        _ => None,
    };
    Ok(TrainSummary {
        steps: step,
        total_steps,
        last_train_loss: last_loss,
        final_eval,
        initial_eval,
        tokens: prior_tokens + tokens_total,
        positions: prior_positions + positions_total,
        step_s: prior_step_s + step_s_total,
        wall_s: prior_wall + started.elapsed().as_secs_f64(),
        interrupted_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::vocab::VocabConfig;

    #[test]
    fn loraplus_groups_as_peft() {
        // PEFT's create_loraplus_optimizer: lora_B and 1-D tensors → lr·ratio; A and 2-D rest → lr; embedding → its own.
        let plus = LoraPlus { lr_ratio: 16.0, lr_embedding: 1e-6 };
        let p = "base_model.model.model.layers.0.self_attn.q_proj";
        assert_eq!(plus.scale(&format!("{p}.lora_B.weight"), &[64, 4], 1e-3), 16.0);
        assert_eq!(plus.scale(&format!("{p}.lora_A.weight"), &[4, 64], 1e-3), 1.0);
        assert_eq!(plus.scale(&format!("{p}.lora_magnitude_vector"), &[64], 1e-3), 16.0);
        assert_eq!(plus.scale("base_model.model.lm_head.weight", &[100, 64], 1e-3), 1.0);
        let e = plus.scale("base_model.model.model.embed_tokens.weight", &[100, 64], 1e-3);
        assert!((e * 1e-3 - 1e-6).abs() < 1e-18, "{e}");
        let rows = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
        assert!((plus.scale(rows, &[2, 64], 1e-3) * 1e-3 - 1e-6).abs() < 1e-18);
    }

    #[test]
    fn row_layout_enters_the_fingerprint_only_when_set() {
        let cfg = TrainConfig {
            micro_batch_size: 2,
            max_steps: Some(1),
            learning_rate: 1e-3,
            lr_scheduler: LrScheduler::Constant,
            seed: 1,
            ..Default::default()
        };
        let adapter = AdapterConfig::Ia3(Default::default());
        let data = [Example { input_ids: vec![1, 2], labels: vec![1, 2] }];
        let plain = fingerprint(&cfg, &adapter, &VocabConfig::default(), &data);
        let packed =
            fingerprint(&TrainConfig { packing: Some(64), ..cfg.clone() }, &adapter, &VocabConfig::default(), &data);
        let grouped = fingerprint(
            &TrainConfig { group_by_length: true, ..cfg.clone() },
            &adapter,
            &VocabConfig::default(),
            &data,
        );
        assert!(plain != packed && plain != grouped && packed != grouped);
        let init = TrainConfig { init_from: Some("a".into()), ..cfg.clone() };
        let plus = TrainConfig { loraplus: Some(LoraPlus { lr_ratio: 16.0, lr_embedding: 1e-6 }), ..cfg.clone() };
        let fp = |c: &TrainConfig| fingerprint(c, &adapter, &VocabConfig::default(), &data);
        let (init, plus) = (fp(&init), fp(&plus));
        assert!(init != plain && plus != plain && init != plus);
    }

    #[test]
    fn run_length_and_warmup_come_from_the_recipe() {
        let f = crate::recipe::testutil::fixture();
        let recipe = |training: &str| {
            crate::recipe::testutil::ok(
                &format!(
                    "base_model: m/x\nadapter: {{type: lora}}\ndata: {{train: {}}}\ntraining: {training}\noutput: {{dir: o}}\n",
                    f.train
                ),
                &[],
            )
        };
        let data: Vec<Example> = (0..9).map(|_| Example { input_ids: vec![1, 2], labels: vec![1, 2] }).collect();
        // 9 rows, micro-batches of 1, 2 per step: ceil(9 / 2) = 5 steps an epoch.
        let r = recipe("{epochs: 2, micro_batch_size: 1, gradient_accumulation_steps: 2, warmup_ratio: 0.15}");
        let cfg = TrainConfig::from_recipe(&r, 0, &data);
        assert_eq!((cfg.steps_per_epoch(data.len()), cfg.total_steps(data.len())), (5, 10));
        assert_eq!(cfg.warmup_steps, 2); // ceil(0.15 × 10), as transformers rounds
                                         // max_steps wins over epochs; warmup_steps as given.
        let r = recipe("{epochs: 2, max_steps: 7, micro_batch_size: 2, warmup_steps: 3}");
        let cfg = TrainConfig::from_recipe(&r, 0, &data);
        assert_eq!((cfg.total_steps(data.len()), cfg.warmup_steps), (7, 3));
        // Neither: one epoch of ceil(9 / 4) = 3 steps.
        let cfg = TrainConfig::from_recipe(&recipe("{micro_batch_size: 4}"), 0, &data);
        assert_eq!(cfg.total_steps(data.len()), 3);
    }
}
