//! Test helpers for the recipe module: a temp folder with data files, recipe texts (a full one
//! and a minimal one), and loading shortcuts that panic with the recipe on the unexpected outcome.

use std::fs;

use super::{Recipe, RecipeError};

/// A temp folder with train/valid files, and their paths as YAML-safe strings.
pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    pub(crate) train: String,
    pub(crate) valid: String,
}

pub(crate) fn fixture() -> Fixture {
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

pub(crate) fn ok(text: &str, overrides: &[&str]) -> Recipe {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match Recipe::from_str(text, "recipes/x.yaml", &overrides) {
        Ok(recipe) => recipe,
        Err(err) => panic!("expected a valid recipe, got: {err}\n---\n{text}"),
    }
}

pub(crate) fn err(text: &str, overrides: &[&str]) -> RecipeError {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match Recipe::from_str(text, "recipes/x.yaml", &overrides) {
        Ok(recipe) => panic!("expected an error, got {recipe:?}\n---\n{text}"),
        Err(err) => err,
    }
}

/// Asserts that `err` displays as starting with `prefix` and contains each of `parts`.
pub(crate) fn assert_msg(err: &RecipeError, prefix: &str, parts: &[&str]) {
    let msg = err.to_string();
    assert!(msg.starts_with(prefix), "`{msg}` should start with `{prefix}`");
    for part in parts {
        assert!(msg.contains(part), "`{msg}` should contain `{part}`");
    }
}

pub(crate) fn full_block(f: &Fixture) -> String {
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

pub(crate) fn minimal(f: &Fixture, adapter: &str) -> String {
    format!("base_model: m/x\nadapter:\n  type: {adapter}\ndata:\n  train: {}\noutput:\n  dir: out\n", f.train)
}
