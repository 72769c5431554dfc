//! Model cards (`README.md`) written beside a trained adapter, from facts only: what is unknown is left out.
//!
//! Front matter follows the Hub's model-card metadata (`base_model`, `base_model_relation`, `library_name`,
//! `pipeline_tag`, `tags`, `license`); the body says what the adapter is, how to use it, what it was trained on,
//! with which hyperparameters, how well it does and what the run cost.

use crate::train::{EvalResult, TrainSummary};
use std::fmt::Write;

/// A dataset file as the card reports it.
pub struct DataFacts {
    pub path: String,
    pub sha256: String,
    pub format: String,
    pub examples: usize,
    pub tokens: usize,
    pub supervised_tokens: usize,
}

/// Everything the adapter card states.
pub struct AdapterCardFacts<'a> {
    pub base_model: &'a str,
    /// True when `base_model` is a Hub id (a local path is not a valid `base_model` metadata value).
    pub base_is_hub: bool,
    pub revision: Option<&'a str>,
    pub license: Option<String>,
    pub method: &'a str,
    pub adapter_dir: &'a str,
    /// The recipe's `data.sequence_len`, so `peftkit eval` reproduces the reported figures.
    pub sequence_len: usize,
    pub recipe_yaml: &'a str,
    pub train: DataFacts,
    pub validation: Option<DataFacts>,
    pub summary: &'a TrainSummary,
    pub trainable_params: usize,
    pub peak_rss_mb: Option<f64>,
    pub device: String,
}

fn eval_row(out: &mut String, name: &str, r: &EvalResult) {
    let _ = writeln!(out, "| {name} | {:.4} | {:.2} | {} |", r.loss, r.perplexity, r.tokens);
}

/// The card's Markdown text.
pub fn adapter_card(f: &AdapterCardFacts) -> String {
    let mut s = String::from("---\n");
    if f.base_is_hub {
        let _ = writeln!(s, "base_model: {}", f.base_model);
        let _ = writeln!(s, "base_model_relation: adapter");
    }
    let _ = writeln!(s, "library_name: peft");
    let _ = writeln!(s, "pipeline_tag: text-generation");
    if let Some(l) = &f.license {
        let _ = writeln!(s, "license: {l}");
    }
    let _ = writeln!(s, "tags:\n- peftkit\n- {}", f.method);
    if f.base_is_hub {
        let _ = writeln!(s, "- base_model:adapter:{}", f.base_model);
    }
    s.push_str("---\n\n");
    let _ = writeln!(s, "# {} adapter for {}\n", f.method.to_uppercase(), f.base_model);
    let _ = writeln!(
        s,
        "A {} adapter ({} trainable parameters) for `{}`{}, trained with peftkit {}. It is stored in PEFT's format \
         (`adapter_config.json` + `adapter_model.safetensors`).\n",
        f.method.to_uppercase(),
        f.trainable_params,
        f.base_model,
        f.revision.map(|r| format!(" at revision `{r}`")).unwrap_or_default(),
        env!("CARGO_PKG_VERSION"),
    );
    s.push_str("## How to use\n\nWith peftkit:\n\n```sh\n");
    let data = f.validation.as_ref().unwrap_or(&f.train);
    let _ = writeln!(
        s,
        "peftkit eval --base {} --adapter {} --data {} --sequence-len {}",
        f.base_model, f.adapter_dir, data.path, f.sequence_len
    );
    s.push_str("```\n\nWith Python (transformers + PEFT):\n\n```python\n");
    let _ = writeln!(s, "from transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n");
    let _ = writeln!(s, "base = AutoModelForCausalLM.from_pretrained(\"{}\")", f.base_model);
    let _ = writeln!(s, "model = PeftModel.from_pretrained(base, \"{}\")", f.adapter_dir);
    let _ = writeln!(s, "tokenizer = AutoTokenizer.from_pretrained(\"{}\")", f.base_model);
    s.push_str("```\n\n## Training data\n\n| split | file | format | examples | tokens | supervised tokens | sha256 |\n|---|---|---|---|---|---|---|\n");
    for (split, d) in [("train", Some(&f.train)), ("validation", f.validation.as_ref())] {
        if let Some(d) = d {
            let _ = writeln!(
                s,
                "| {split} | `{}` | {} | {} | {} | {} | `{}` |",
                d.path, d.format, d.examples, d.tokens, d.supervised_tokens, d.sha256
            );
        }
    }
    s.push_str("\n## Training procedure\n\nThe recipe, as resolved (also saved as `peftkit_recipe.yaml`):\n\n```yaml\n");
    s.push_str(f.recipe_yaml.trim_end());
    s.push_str("\n```\n\n## Results\n\n");
    let sm = f.summary;
    let _ = writeln!(s, "Optimizer steps: {} of {}.", sm.steps, sm.total_steps);
    if let Some(l) = sm.last_train_loss {
        let _ = writeln!(s, "Training loss of the last step: {l:.4}.");
    }
    if sm.initial_eval.is_some() || sm.final_eval.is_some() {
        s.push_str("\nValidation (mean negative log-likelihood per supervised token):\n\n| model | loss | perplexity | tokens |\n|---|---|---|---|\n");
        if let Some(r) = &sm.initial_eval {
            eval_row(&mut s, "base model", r);
        }
        if let Some(r) = &sm.final_eval {
            eval_row(&mut s, "base + this adapter", r);
        }
    }
    s.push_str("\n## Compute\n\n");
    let _ = writeln!(s, "- device: {}", f.device);
    let _ = writeln!(s, "- wall time: {:.1} s", sm.wall_s);
    let _ = writeln!(s, "- tokens processed: {}", sm.tokens);
    if let Some(p) = f.peak_rss_mb {
        let _ = writeln!(s, "- peak memory (RSS): {p:.0} MiB");
    }
    s.push_str("\n## Framework versions\n\n");
    let _ = writeln!(s, "- peftkit {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(s, "- candle 0.11");
    s
}
