//! The adapter folder beside the adapter weights: what peftkit recorded about the training (the training record and
//! the resolved recipe), for the card and for which weights the adapter goes into.

use super::base::Base;
use super::RECIPE_FILE;
use crate::adapter::peft_format::PeftConfig;
use crate::card::{TrainingRecord, TRAINING_RECORD_FILE};
use std::path::Path;

/// What an adapter folder says about how the adapter was trained (peftkit writes both files beside it).
pub(super) struct TrainingInfo {
    pub(super) record: Option<TrainingRecord>,
    pub(super) recipe_yaml: Option<String>,
    /// The recipe's `adapter.type`, else the record's method: `lora`, `qlora`, `ia3`.
    pub(super) method: Option<String>,
    /// A QLoRA recipe's `adapter.bnb_4bit_use_double_quant` (default true, as in bitsandbytes' QLoRA setup).
    pub(super) double_quant: bool,
}

impl TrainingInfo {
    /// Reads what is there; a file that cannot be read is reported and ignored (it only feeds the card).
    pub(super) fn read(dir: &Path) -> Self {
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
pub(super) fn warn_if_trained_on_another_base(peft: &PeftConfig, base: &Base, adapter: &Path) {
    let Some(trained_on) = &peft.base_model_name_or_path else { return };
    let same = |a: &str, b: &str| {
        a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
    };
    if !same(trained_on, &base.name) {
        tracing::warn!("{} was trained on `{trained_on}`, not `{}`", adapter.display(), base.name);
    }
}
