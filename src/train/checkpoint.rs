//! Training checkpoints: `<out>/checkpoints/step-NNNNNN/` holds the adapter (PEFT format), the optimizer moments
//! (`optimizer.safetensors`: `m.<name>`, `v.<name>`) and the typed [`TrainerState`] (`trainer_state.json`); with a
//! PiSSA/OLoRA init also the starting A₀, B₀ (`initial_adapter.safetensors`) that rebuild the residual base on resume.
//!
//! A checkpoint is written into `.step-NNNNNN.tmp-PID/` and renamed into place whole; an old one is renamed to
//! `.step-NNNNNN.del.tmp-PID/` before it is deleted. So a `step-NNNNNN/` folder is either complete or not
//! peftkit's, and only a folder with all four files counts as a checkpoint ([`checkpoints`]); what a killed run
//! leaves is removed by [`clean_output`] at the next start.
//!
//! The fingerprint stored in the state is a sha256 over the serde JSON of everything that determines the adapter
//! bytes (training settings but how often to evaluate, save or log; the adapter and vocabulary settings; the
//! tokens), so `--resume` refuses to continue with other settings or data.

use super::optim::AdamW;
use super::{io_err, EvalResult, LoraPlus, TrainConfig, TrainError};
use crate::adapter::vocab::VocabConfig;
use crate::adapter::{peft_format, AdapterConfig};
use crate::data::Example;
use crate::fsutil::TMP_MARK;
use crate::model::Llama;
use crate::outdir;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub(super) const CHECKPOINTS: &str = "checkpoints";
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// PiSSA/OLoRA's starting A₀, B₀ in a checkpoint (see [`resume_initial`]).
const INITIAL_FILE: &str = "initial_adapter.safetensors";
/// The files of a complete checkpoint (the state is written last).
const CHECKPOINT_FILES: [&str; 4] = [peft_format::WEIGHTS_FILE, peft_format::CONFIG_FILE, OPTIMIZER_FILE, STATE_FILE];

/// `trainer_state.json`: where a run stands after `step` optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// AdamW's step counter (bias correction).
    pub optimizer_t: usize,
    /// [`fingerprint`] of the run's settings and data.
    pub fingerprint: String,
    /// [`FINGERPRINT_VERSION`] when written (absent, 0, in earlier checkpoints).
    #[serde(default)]
    pub fingerprint_version: u32,
    /// Totals of the run so far, so the card describes the whole run after a resume.
    #[serde(default)]
    pub progress: Progress,
    /// The peftkit that wrote it.
    #[serde(default)]
    pub peftkit_version: String,
}

/// Totals of a run up to a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Input tokens processed (padding excluded).
    #[serde(default)]
    pub tokens: usize,
    /// Positions processed, padding included (absent in early checkpoints: then `tokens`).
    #[serde(default)]
    pub positions: Option<usize>,
    /// Seconds in optimizer steps.
    #[serde(default)]
    pub step_s: f64,
    /// Wall-clock seconds.
    #[serde(default)]
    pub wall_s: f64,
    /// Validation before training.
    #[serde(default)]
    pub initial_eval: Option<EvalResult>,
}

/// The layout of [`fingerprint`]'s input; a state without it (0) was fingerprinted differently, by an earlier peftkit.
pub const FINGERPRINT_VERSION: u32 = 2;

/// What the fingerprint hashes: the run's settings that change the adapter bytes, as serde JSON.
#[derive(Serialize)]
struct FingerprintInput<'a> {
    version: u32,
    micro_batch_size: usize,
    gradient_accumulation_steps: usize,
    max_steps: Option<usize>,
    epochs: usize,
    learning_rate: f64,
    lr_scheduler: &'a str,
    warmup_steps: usize,
    weight_decay: f64,
    adam_beta1: f64,
    adam_beta2: f64,
    adam_epsilon: f64,
    max_grad_norm: f64,
    seed: u64,
    shuffle: bool,
    pad_id: u32,
    packing: Option<usize>,
    group_by_length: bool,
    init_from: Option<&'a Path>,
    /// LoRA+: (lr_ratio, lr_embedding).
    loraplus: Option<(f64, f64)>,
    adapter: &'a AdapterConfig,
    vocab: &'a VocabConfig,
}

/// A short fingerprint of everything that determines the adapter bytes, stored in checkpoints so that `--resume`
/// refuses to continue a run with different settings or data: sha256 over the serde JSON of the settings, then
/// the tokens and labels.
pub(super) fn fingerprint(
    cfg: &TrainConfig,
    adapter: &AdapterConfig,
    vocab: &VocabConfig,
    train: &[Example],
) -> String {
    use sha2::{Digest, Sha256};
    // Every field named, so that a new setting must be placed here (in the fingerprint or, like how often to
    // evaluate, save or log, explicitly out of it).
    let TrainConfig {
        micro_batch_size,
        gradient_accumulation_steps,
        max_steps,
        epochs,
        learning_rate,
        lr_scheduler,
        warmup_steps,
        weight_decay,
        adam_beta1,
        adam_beta2,
        adam_epsilon,
        max_grad_norm,
        seed,
        shuffle,
        eval_every: _,
        save_every: _,
        logging_every: _,
        pad_id,
        packing,
        group_by_length,
        init_from,
        loraplus,
    } = cfg;
    let input = FingerprintInput {
        version: FINGERPRINT_VERSION,
        micro_batch_size: *micro_batch_size,
        gradient_accumulation_steps: *gradient_accumulation_steps,
        max_steps: *max_steps,
        epochs: *epochs,
        learning_rate: *learning_rate,
        lr_scheduler: lr_scheduler.as_str(),
        warmup_steps: *warmup_steps,
        weight_decay: *weight_decay,
        adam_beta1: *adam_beta1,
        adam_beta2: *adam_beta2,
        adam_epsilon: *adam_epsilon,
        max_grad_norm: *max_grad_norm,
        seed: *seed,
        shuffle: *shuffle,
        pad_id: *pad_id,
        packing: *packing,
        group_by_length: *group_by_length,
        init_from: init_from.as_deref(),
        loraplus: loraplus.map(|LoraPlus { lr_ratio, lr_embedding }| (lr_ratio, lr_embedding)),
        adapter,
        vocab,
    };
    let mut h = Sha256::new();
    // Plain data (numbers, strings, lists): serde_json cannot fail on it.
    h.update(serde_json::to_vec(&input).unwrap_or_default());
    for ex in train {
        h.update((ex.input_ids.len() as u64).to_le_bytes());
        for &id in &ex.input_ids {
            h.update(id.to_le_bytes());
        }
        for &l in &ex.labels {
            h.update(l.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())[..16].to_string()
}

/// `step-NNNNNN` → NNNNNN.
fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Whether `dir` holds every file of a checkpoint.
fn is_complete(dir: &Path) -> bool {
    CHECKPOINT_FILES.iter().all(|f| dir.join(f).is_file())
}

/// The `step-N` folders under `out/checkpoints/` with their step, complete or not, oldest first.
fn step_folders(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(out.join(CHECKPOINTS)) else { return vec![] };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((step_of(&e.file_name().to_string_lossy())?, e.path())))
        .collect();
    found.sort();
    found
}

/// The checkpoint folders under `out/checkpoints/` that are complete, newest first.
pub fn checkpoints(out: &Path) -> Vec<PathBuf> {
    step_folders(out).into_iter().rev().map(|(_, p)| p).filter(|p| is_complete(p)).collect()
}

/// The newest complete checkpoint folder under `out/checkpoints/`, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    checkpoints(out).into_iter().next()
}

/// Deletes a checkpoint folder: renamed out of the `step-N` names first, so that a deletion cut short leaves a
/// temporary name ([`clean_output`] removes it), never a half checkpoint.
fn retire(dir: &Path) -> Result<(), TrainError> {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let gone = dir.with_file_name(format!(".{name}.del{TMP_MARK}{}", std::process::id()));
    std::fs::rename(dir, &gone).map_err(io_err(dir))?;
    std::fs::remove_dir_all(&gone).map_err(io_err(&gone))
}

/// The files a run writes into its output folder through a temporary name (`.NAME.tmp-PID`), and its staging
/// folder for the final save (`save`); earlier versions wrote the final files directly.
const OUTPUT_NAMES: [&str; 11] = [
    "save",
    // The checkpoints folder of a run being replaced (`--overwrite`), on its way out.
    CHECKPOINTS,
    "adapter_model.safetensors",
    "adapter_config.json",
    "README.md",
    "peftkit_recipe.yaml",
    "peftkit_training.json",
    super::METRICS_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// Whether `stem` (of `.STEM.tmp-PID`) names a checkpoint being written (`step-N`) or deleted (`step-N.del`).
fn checkpoint_name(stem: &str) -> bool {
    step_of(stem.strip_suffix(".del").unwrap_or(stem)).is_some()
}

/// Removes what killed runs left in the output folder `out` (the caller holds its lock): peftkit's temporary
/// files of processes that are gone (a final save that was complete is finished instead, see
/// [`crate::outdir::Staging`]), temporary checkpoint folders (and the pid-less `.step-N.tmp` of earlier
/// versions), and incomplete `step-N` folders. Nothing else. Returns what was done, one line each.
pub fn clean_output(out: &Path) -> Result<Vec<String>, TrainError> {
    let root = out.join(CHECKPOINTS);
    let outdir_err = |e: outdir::OutDirError| match e {
        outdir::OutDirError::Io { path, source } => TrainError::Io { path, source },
        other => TrainError::Io { path: root.clone(), source: std::io::Error::other(other.to_string()) },
    };
    let mut done = outdir::clean_stale(out, &|stem| OUTPUT_NAMES.contains(&stem)).map_err(outdir_err)?;
    done.extend(outdir::clean_stale(&root, &checkpoint_name).map_err(outdir_err)?);
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let legacy = name.strip_prefix(".step-").and_then(|r| r.strip_suffix(".tmp")).is_some();
            if legacy {
                outdir::remove_any(&e.path()).map_err(outdir_err)?;
                done.push(format!("removed {} (an unfinished checkpoint)", e.path().display()));
            }
        }
    }
    for (_, dir) in step_folders(out) {
        if !is_complete(&dir) {
            retire(&dir)?;
            done.push(format!("removed {} (an incomplete checkpoint)", dir.display()));
        }
    }
    Ok(done)
}

/// Removes an earlier run from `out` (`train --overwrite`): its checkpoints leave at once (the folder renamed to a
/// temporary name, then deleted: a run killed in between leaves only that name, which the next start removes,
/// never a half-deleted checkpoint), then the files `run_files`, in reverse order (the caller lists the adapter
/// config first, so that it goes last and no adapter weights are left without it). A file that cannot be removed
/// is an error naming it.
pub fn clear_earlier_run(out: &Path, run_files: &[&str]) -> Result<(), TrainError> {
    let root = out.join(CHECKPOINTS);
    if root.exists() {
        let gone = crate::fsutil::tmp_name(&root);
        std::fs::rename(&root, &gone).map_err(io_err(&root))?;
        std::fs::remove_dir_all(&gone).map_err(io_err(&gone))?;
    }
    for f in run_files.iter().rev() {
        let path = out.join(f);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
            _ => {}
        }
    }
    Ok(())
}

/// PiSSA/OLoRA's starting A₀, B₀ as the newest checkpoint under `out` stores them (every checkpoint of a run holds
/// the same), for [`crate::peft_model::attach_with_initial`] when resuming; `None` when there is no such file.
pub fn resume_initial(out: &Path) -> Result<Option<std::collections::HashMap<String, Tensor>>, TrainError> {
    let Some(path) = checkpoints(out).into_iter().map(|c| c.join(INITIAL_FILE)).find(|p| p.exists()) else {
        return Ok(None);
    };
    candle_core::safetensors::load(&path, &Device::Cpu)
        .map(Some)
        .map_err(|e| TrainError::Resume(format!("{}: {e}", path.display())))
}

/// Writes a checkpoint for the state after `step` steps: `<out>/checkpoints/step-NNNNNN/`; then keeps the newest
/// `keep` complete checkpoints (0: all) and deletes incomplete ones.
#[allow(clippy::too_many_arguments)]
pub(super) fn save_checkpoint(
    model: &Llama,
    adapter: &AdapterConfig,
    opt: &AdamW,
    names: &[String],
    state: &TrainerState,
    base: &str,
    out: &Path,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let root = out.join(CHECKPOINTS);
    let final_dir = root.join(format!("step-{:06}", state.step));
    let tmp = crate::fsutil::tmp_name(&final_dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let written = (|| {
        // As trained (for the residual base of PiSSA/OLoRA), with their starting A₀, B₀ beside it for --resume.
        crate::peft_model::save_adapter_residual(model, adapter, base, None, &tmp)?;
        let initial = crate::peft_model::initial_tensors(model);
        if !initial.is_empty() {
            peft_format::save_safetensors(&tmp.join(INITIAL_FILE), &initial)?;
        }
        let mut moments = Vec::with_capacity(names.len() * 2);
        for (i, n) in names.iter().enumerate() {
            moments.push((format!("m.{n}"), opt.m[i].clone()));
            moments.push((format!("v.{n}"), opt.v[i].clone()));
        }
        peft_format::save_safetensors(&tmp.join(OPTIMIZER_FILE), &moments)?;
        let text = serde_json::to_string(state).map_err(|e| TrainError::Resume(e.to_string()))?;
        peft_format::write_atomic(&tmp.join(STATE_FILE), text.as_bytes())?;
        peft_format::sync_dir(&tmp);
        if final_dir.exists() {
            retire(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))
    })();
    if let Err(e) = written {
        // A full disk or an I/O error: no half checkpoint left behind.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    peft_format::sync_dir(&root);
    // Older checkpoints go only once the new one is on disk.
    let folders = step_folders(out);
    let complete: Vec<&PathBuf> = folders.iter().rev().map(|(_, p)| p).filter(|p| is_complete(p)).collect();
    for (_, dir) in &folders {
        let old = keep > 0 && complete.iter().skip(keep).any(|p| p == &dir);
        if old || !is_complete(dir) {
            // Not worth stopping the run for: the next start removes what is left.
            if let Err(e) = retire(dir) {
                tracing::warn!("could not delete the old checkpoint {}: {e}", dir.display());
            }
        }
    }
    Ok(final_dir)
}

/// Restores adapter weights and optimizer moments from a checkpoint; returns its state.
pub(super) fn load_checkpoint(
    dir: &Path,
    opt: &mut AdamW,
    names: &[String],
    fp: &str,
) -> Result<TrainerState, TrainError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| TrainError::Resume(format!("{}: {e}", state_path.display())))?;
    if state.fingerprint_version != FINGERPRINT_VERSION {
        return Err(TrainError::Resume(format!(
            "{} was written by an earlier peftkit ({}), whose settings fingerprint this one cannot check; finish that \
             run with the peftkit that started it, or start afresh with --overwrite",
            dir.display(),
            if state.peftkit_version.is_empty() { "version unknown" } else { state.peftkit_version.as_str() }
        )));
    }
    if state.fingerprint != fp {
        return Err(TrainError::Resume(format!(
            "{} was written by a run with other training settings, adapter settings or data (everything but \
             eval_every, save_every and logging_every must match){}; restore them, or start afresh with --overwrite",
            dir.display(),
            if state.peftkit_version != env!("CARGO_PKG_VERSION") {
                format!(" (peftkit {})", state.peftkit_version)
            } else {
                String::new()
            }
        )));
    }
    let read = |f: &str| {
        let p = dir.join(f);
        candle_core::safetensors::load(&p, &Device::Cpu)
            .map_err(|e| TrainError::Resume(format!("{}: {e}", p.display())))
    };
    let weights = read(peft_format::WEIGHTS_FILE)?;
    let moments = read(OPTIMIZER_FILE)?;
    for (i, n) in names.iter().enumerate() {
        let missing = |k: &str| TrainError::Resume(format!("{}: tensor {k} is missing", dir.display()));
        let w = weights.get(n).ok_or_else(|| missing(n))?;
        let dev = opt.vars[i].device().clone();
        opt.vars[i].set(&w.to_device(&dev)?)?;
        opt.m[i] = moments.get(&format!("m.{n}")).ok_or_else(|| missing(n))?.to_device(&dev)?;
        opt.v[i] = moments.get(&format!("v.{n}")).ok_or_else(|| missing(n))?.to_device(&dev)?;
    }
    opt.t = state.optimizer_t;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_checkpoint(out: &Path, step: usize, files: &[&str]) -> PathBuf {
        let d = out.join(CHECKPOINTS).join(format!("step-{step:06}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in files {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        d
    }

    #[test]
    fn only_complete_checkpoints_count_and_cleaning_removes_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path();
        let full = fake_checkpoint(out, 4, &CHECKPOINT_FILES);
        // A half-deleted old checkpoint: weights gone, state kept (an earlier version's deletion, cut short).
        let half = fake_checkpoint(out, 8, &[STATE_FILE, OPTIMIZER_FILE, peft_format::CONFIG_FILE]);
        assert_eq!(checkpoints(out), std::slice::from_ref(&full));
        assert_eq!(latest_checkpoint(out), Some(full.clone()));
        // Leftovers of killed runs: a temporary checkpoint of a dead pid, an earlier version's pid-less one.
        let root = out.join(CHECKPOINTS);
        std::fs::create_dir(root.join(".step-000012.tmp-4194305")).unwrap();
        std::fs::create_dir(root.join(".step-000012.tmp")).unwrap();
        std::fs::create_dir(root.join(".step-000002.del.tmp-4194305")).unwrap();
        let done = clean_output(out).unwrap();
        assert_eq!(done.len(), 4, "{done:?}");
        let left: Vec<String> =
            std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        assert_eq!(left, ["step-000004"]);
        assert!(!half.exists());
    }

    #[test]
    fn fingerprint_covers_settings_that_change_the_adapter_only() {
        let cfg = TrainConfig {
            micro_batch_size: 2,
            max_steps: Some(1),
            learning_rate: 1e-3,
            lr_scheduler: crate::recipe::LrScheduler::Constant,
            seed: 1,
            ..Default::default()
        };
        let ia3 = AdapterConfig::Ia3(Default::default());
        let data = [Example { input_ids: vec![1, 2], labels: vec![1, 2] }];
        let vocab = VocabConfig::default();
        let fp = |c: &TrainConfig, a: &AdapterConfig, v: &VocabConfig| fingerprint(c, a, v, &data);
        let base = fp(&cfg, &ia3, &vocab);
        assert_eq!(base.len(), 16);
        let cadence = TrainConfig { eval_every: Some(3), save_every: Some(5), logging_every: 7, ..cfg.clone() };
        assert_eq!(fp(&cadence, &ia3, &vocab), base, "how often to evaluate, save or log is left out");
        let lr = TrainConfig { learning_rate: 2e-3, ..cfg.clone() };
        let scheduler = TrainConfig { lr_scheduler: crate::recipe::LrScheduler::Linear, ..cfg.clone() };
        let no_init = AdapterConfig::Ia3(crate::adapter::Ia3Config { init_ia3_weights: false, ..Default::default() });
        let rows = VocabConfig {
            modules_to_save: vec![],
            trainable_tokens: vec![(crate::adapter::vocab::VocabModule::Embed, vec![3])],
        };
        let others =
            [fp(&lr, &ia3, &vocab), fp(&scheduler, &ia3, &vocab), fp(&cfg, &no_init, &vocab), fp(&cfg, &ia3, &rows)];
        for (i, o) in others.iter().enumerate() {
            assert_ne!(o, &base, "change {i} not in the fingerprint");
        }
        let other_data = [Example { input_ids: vec![1, 3], labels: vec![1, 3] }];
        assert_ne!(fingerprint(&cfg, &ia3, &vocab, &other_data), base);
    }

    #[test]
    fn trainer_state_reads_earlier_files() {
        // A state as the untyped version wrote it, and one from before `positions`.
        let text = r#"{"step":5,"optimizer_t":5,"fingerprint":"abc","progress":{"tokens":10,"positions":12,
            "step_s":1.5,"wall_s":2.0,"initial_eval":{"loss":2.0,"perplexity":7.38,"tokens":30}},"peftkit_version":"0.1.0"}"#;
        let s: TrainerState = serde_json::from_str(text).unwrap();
        assert_eq!((s.step, s.progress.positions, s.progress.initial_eval.unwrap().tokens), (5, Some(12), 30));
        let old: TrainerState = serde_json::from_str(
            r#"{"step":2,"optimizer_t":2,"fingerprint":"f","progress":{"tokens":3,"initial_eval":null}}"#,
        )
        .unwrap();
        assert_eq!((old.progress.positions, old.progress.initial_eval), (None, None));
        // Written before the serde fingerprint: version 0, refused on resume with its own message.
        assert_eq!(old.fingerprint_version, 0);
        // Round trip.
        let back: TrainerState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
