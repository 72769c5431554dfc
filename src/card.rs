//! Model cards (`README.md`) written beside a trained adapter, from facts only: what is unknown is left out.
//!
//! Front matter follows the Hub's model-card metadata (`base_model`, `base_model_relation`, `library_name`,
//! `pipeline_tag`, `tags`, `license`); the body says what the adapter is, how to use it, what it was trained on,
//! with which hyperparameters, how well it does and what the run cost.
//!
//! The facts of a training run are also kept as JSON ([`TrainingRecord`], `peftkit_training.json` beside the
//! adapter), so that `peftkit merge` can state them again in the merged model's card.

use crate::train::EvalResult;
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// The file beside an adapter that holds its [`TrainingRecord`].
pub const TRAINING_RECORD_FILE: &str = "peftkit_training.json";

/// A dataset file as the card reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFacts {
    pub path: String,
    pub sha256: String,
    pub format: String,
    pub examples: usize,
    pub tokens: usize,
    pub supervised_tokens: usize,
}

/// Everything known about how an adapter was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// The base model as the run named it: a Hub id, or a local folder or .gguf path.
    pub base_model: String,
    /// True when `base_model` is a Hub id (a local path is not a valid `base_model` metadata value).
    pub base_is_hub: bool,
    /// The Hub revision the base was resolved at (a commit), when it came from the Hub.
    pub revision: Option<String>,
    /// The license the base model declares, when it declares one.
    pub license: Option<String>,
    /// `lora`, `qlora` or `ia3`.
    pub method: String,
    /// A LoRA/QLoRA adapter trained as DoRA (`adapter.use_dora`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dora: bool,
    /// `pissa`, `pissa_niter_N` or `olora` when the adapter started from the base weights (`init_lora_weights`)
    /// and was saved converted for the original base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_init: Option<String>,
    /// The adapter folder as the run wrote it.
    pub adapter_dir: String,
    /// The recipe's `data.sequence_len`, so `peftkit eval` reproduces the reported figures.
    pub sequence_len: usize,
    pub train: DataFacts,
    pub validation: Option<DataFacts>,
    pub trainable_params: usize,
    pub steps: usize,
    pub total_steps: usize,
    /// Mean loss of the last optimizer step.
    pub last_train_loss: Option<f64>,
    /// Validation before training (the base model) and after (base + adapter).
    pub initial_eval: Option<EvalResult>,
    pub final_eval: Option<EvalResult>,
    /// Input tokens processed (padding excluded).
    pub tokens: usize,
    pub wall_s: f64,
    pub peak_rss_mb: Option<f64>,
    pub device: String,
    /// `name version` of peftkit and of the crates that did the numerics.
    pub frameworks: Vec<String>,
    /// Trained embedding / head parts (`modules_to_save`, `trainable_token_indices`) and added tokens, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<VocabFacts>,
}

/// What an adapter trains of the embedding and the head, and the tokens its run added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VocabFacts {
    /// E.g. `embed_tokens (full copy), lm_head (full copy)` or `embed_tokens (4 token rows), lm_head (2 token rows)`.
    pub trained: String,
    /// Trainable parameters among `trainable_params` that belong to them.
    pub params: usize,
    /// Special tokens the run added, with their ids.
    pub added_tokens: Vec<(String, u32)>,
    /// The model's vocabulary size after adding them.
    pub vocab_size: usize,
}

/// `name version` of peftkit and of the crates whose behaviour the results depend on (from Cargo.lock, by build.rs).
pub fn framework_versions() -> Vec<String> {
    vec![
        format!("peftkit {}", env!("CARGO_PKG_VERSION")),
        format!("candle-core {}", env!("PEFTKIT_CANDLE_VERSION")),
        format!("tokenizers {}", env!("PEFTKIT_TOKENIZERS_VERSION")),
        format!("hf-hub {}", env!("PEFTKIT_HF_HUB_VERSION")),
    ]
}

fn eval_row(out: &mut String, name: &str, r: &EvalResult) {
    let _ = writeln!(out, "| {name} | {:.4} | {:.2} | {} |", r.loss, r.perplexity, r.tokens);
}

/// A YAML scalar, quoted when plain style would change its meaning.
pub fn yaml_scalar(s: &str) -> String {
    serde_yaml::to_string(s).map(|y| y.trim_end().to_string()).unwrap_or_else(|_| format!("{s:?}"))
}

/// The method's name as a heading says it.
pub fn method_title(method: &str) -> String {
    match method {
        "lora" => "LoRA".into(),
        "qlora" => "QLoRA".into(),
        "ia3" => "IA3".into(),
        other => other.to_uppercase(),
    }
}

/// The adapter's name as a heading says it: the method's, or DoRA for a LoRA/QLoRA adapter trained as DoRA.
pub fn adapter_title(method: &str, dora: bool) -> String {
    match dora {
        true if method == "qlora" => "QLoRA + DoRA".to_string(),
        true => "DoRA".to_string(),
        false => method_title(method),
    }
}

/// The card's Markdown text. `recipe_yaml` is the resolved recipe (also saved as `peftkit_recipe.yaml`).
pub fn adapter_card(f: &TrainingRecord, recipe_yaml: &str) -> String {
    let mut s = String::from("---\n");
    if f.base_is_hub {
        let _ = writeln!(s, "base_model: {}", yaml_scalar(&f.base_model));
        let _ = writeln!(s, "base_model_relation: adapter");
    }
    let _ = writeln!(s, "library_name: peft");
    let _ = writeln!(s, "pipeline_tag: text-generation");
    if let Some(l) = &f.license {
        let _ = writeln!(s, "license: {}", yaml_scalar(l));
    }
    let _ = writeln!(s, "tags:\n- peftkit\n- {}", f.method);
    if f.dora {
        let _ = writeln!(s, "- dora");
    }
    if f.base_is_hub {
        let _ = writeln!(s, "- {}", yaml_scalar(&format!("base_model:adapter:{}", f.base_model)));
    }
    s.push_str("---\n\n");
    let title = adapter_title(&f.method, f.dora);
    let _ = writeln!(s, "# {title} adapter for {}\n", f.base_model);
    let article = if title.starts_with(['A', 'E', 'I', 'O', 'U']) { "An" } else { "A" };
    let _ = writeln!(
        s,
        "{article} {title} adapter ({} trainable parameters) for `{}`{}, trained with peftkit {}. It is stored in PEFT's format \
         (`adapter_config.json` + `adapter_model.safetensors`).\n",
        f.trainable_params,
        f.base_model,
        f.revision.as_deref().map(|r| format!(" at revision `{r}`")).unwrap_or_default(),
        env!("CARGO_PKG_VERSION"),
    );
    if f.method == "qlora" {
        s.push_str(
            "It was trained on the base held in NF4 4-bit with double quantization (bitsandbytes' format); load \
             the base the same way (`--load-in-4bit`, or `BitsAndBytesConfig(load_in_4bit=True, \
             bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True)`) to reproduce the figures below.\n\n",
        );
    }
    if let Some(init) = &f.residual_init {
        let _ = writeln!(
            s,
            "It was initialised with `init_lora_weights: {init}` (A and B from the base weights, trained on the residual \
             W − s·B·A) and saved converted, as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=…)` \
             saves it: a plain LoRA adapter of twice the rank for the original, unmodified base model.\n"
        );
    }
    s.push_str("## How to use\n\nWith peftkit:\n\n```sh\n");
    let q = if f.method == "qlora" { " --load-in-4bit" } else { "" };
    let _ = writeln!(s, "peftkit chat --base {} --adapter {}{q}", f.base_model, f.adapter_dir);
    let data = f.validation.as_ref().unwrap_or(&f.train);
    let _ = writeln!(
        s,
        "peftkit eval --base {} --adapter {} --data {} --sequence-len {}{q}",
        f.base_model, f.adapter_dir, data.path, f.sequence_len
    );
    let _ = writeln!(s, "peftkit merge --base {} --adapter {} --out merged", f.base_model, f.adapter_dir);
    s.push_str("```\n\nWith Python (transformers + PEFT):\n\n```python\n");
    let _ = writeln!(s, "from transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n");
    // transformers reads a GGUF file as (folder, gguf_file=name) and dequantizes it, as peftkit does.
    let load_args = match f.base_model.rsplit_once('/') {
        Some((dir, file)) if file.to_ascii_lowercase().ends_with(".gguf") => format!("\"{dir}\", gguf_file=\"{file}\""),
        None if f.base_model.to_ascii_lowercase().ends_with(".gguf") => {
            format!("\".\", gguf_file=\"{}\"", f.base_model)
        }
        _ => format!("\"{}\"", f.base_model),
    };
    let _ = writeln!(s, "base = AutoModelForCausalLM.from_pretrained({load_args})");
    match f.vocab.as_ref().filter(|v| !v.added_tokens.is_empty()) {
        Some(v) => {
            // The new tokens live in the tokenizer saved beside the adapter; the base must grow to hold them first.
            let _ = writeln!(s, "tokenizer = AutoTokenizer.from_pretrained(\"{}\")", f.adapter_dir);
            let _ = writeln!(s, "base.resize_token_embeddings({})  # len(tokenizer): the added tokens", v.vocab_size);
            let _ = writeln!(s, "model = PeftModel.from_pretrained(base, \"{}\")", f.adapter_dir);
        }
        None => {
            let _ = writeln!(s, "model = PeftModel.from_pretrained(base, \"{}\")", f.adapter_dir);
            let _ = writeln!(s, "tokenizer = AutoTokenizer.from_pretrained({load_args})");
        }
    }
    s.push_str("```\n\n");
    if let Some(v) = &f.vocab {
        vocab_section(&mut s, v);
    }
    training_sections(&mut s, f, Some(recipe_yaml));
    s
}

/// The card's section on trained embedding / head parts and added tokens.
fn vocab_section(s: &mut String, v: &VocabFacts) {
    s.push_str("## Trained embedding and output head\n\n");
    let _ = writeln!(
        s,
        "Besides the adapter, this run trained {} ({} parameters), saved in `adapter_model.safetensors` under PEFT's \
         names (`modules_to_save` / `trainable_token_indices` in `adapter_config.json`; PEFT ≥ 0.15 reads \
         `trainable_token_indices`). `peftkit merge` and PEFT's `merge_and_unload()` write them into the merged model; \
         llama.cpp's LoRA format cannot hold them (merge instead of `peftkit export --to gguf`).",
        v.trained, v.params
    );
    if !v.added_tokens.is_empty() {
        let list: Vec<String> = v.added_tokens.iter().map(|(t, i)| format!("`{t}` = {i}")).collect();
        let _ = writeln!(
            s,
            "\nAdded special tokens: {}. The vocabulary grew to {} tokens (new rows started as the mean of the old \
             ones, as transformers' `resize_token_embeddings` does, then trained). The tokenizer with these tokens is \
             saved beside the adapter (`tokenizer.json`, `tokenizer_config.json`): load it from the adapter folder, \
             and call `model.resize_token_embeddings({})` on the base before `PeftModel.from_pretrained`. peftkit's \
             `generate`, `chat`, `eval` and `merge` use it by themselves.",
            list.join(", "),
            v.vocab_size,
            v.vocab_size
        );
    }
    s.push('\n');
}

/// "Training data", "Training procedure", "Results", "Compute" and "Framework versions", shared by the adapter
/// card and the merged model's card.
pub fn training_sections(s: &mut String, f: &TrainingRecord, recipe_yaml: Option<&str>) {
    s.push_str("## Training data\n\n| split | file | format | examples | tokens | supervised tokens | sha256 |\n|---|---|---|---|---|---|---|\n");
    for (split, d) in [("train", Some(&f.train)), ("validation", f.validation.as_ref())] {
        if let Some(d) = d {
            let _ = writeln!(
                s,
                "| {split} | `{}` | {} | {} | {} | {} | `{}` |",
                d.path, d.format, d.examples, d.tokens, d.supervised_tokens, d.sha256
            );
        }
    }
    if let Some(yaml) = recipe_yaml {
        s.push_str(
            "\n## Training procedure\n\nThe recipe, as resolved (also saved as `peftkit_recipe.yaml`):\n\n```yaml\n",
        );
        s.push_str(yaml.trim_end());
        s.push_str("\n```\n");
    }
    s.push_str("\n## Results\n\n");
    let _ = writeln!(s, "Optimizer steps: {} of {}.", f.steps, f.total_steps);
    if let Some(l) = f.last_train_loss {
        let _ = writeln!(s, "Training loss of the last step: {l:.4}.");
    }
    if f.initial_eval.is_some() || f.final_eval.is_some() {
        s.push_str("\nValidation (mean negative log-likelihood per supervised token):\n\n| model | loss | perplexity | tokens |\n|---|---|---|---|\n");
        if let Some(r) = &f.initial_eval {
            eval_row(s, "base model", r);
        }
        if let Some(r) = &f.final_eval {
            eval_row(s, "base + this adapter", r);
        }
    }
    s.push_str("\n## Compute\n\n");
    let _ = writeln!(s, "- device: {}", f.device);
    let _ = writeln!(s, "- wall time: {:.1} s", f.wall_s);
    let _ = writeln!(s, "- tokens processed: {}", f.tokens);
    if let Some(p) = f.peak_rss_mb {
        let _ = writeln!(s, "- peak memory (RSS): {p:.0} MiB");
    }
    s.push_str("\n## Framework versions\n\n");
    for v in &f.frameworks {
        let _ = writeln!(s, "- {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(base: &str, hub: bool) -> TrainingRecord {
        let data = DataFacts {
            path: "datasets/x/train.jsonl".into(),
            sha256: "ab".repeat(32),
            format: "chat".into(),
            examples: 10,
            tokens: 1000,
            supervised_tokens: 400,
        };
        TrainingRecord {
            base_model: base.into(),
            base_is_hub: hub,
            revision: hub.then(|| "0123abcd".into()),
            license: hub.then(|| "apache-2.0".into()),
            method: "ia3".into(),
            dora: false,
            residual_init: None,
            adapter_dir: "adapters/x".into(),
            sequence_len: 256,
            train: data.clone(),
            validation: Some(data),
            trainable_params: 57600,
            steps: 40,
            total_steps: 40,
            last_train_loss: Some(1.5),
            initial_eval: Some(EvalResult { loss: 2.9, perplexity: 18.2, tokens: 400 }),
            final_eval: Some(EvalResult { loss: 1.5, perplexity: 4.5, tokens: 400 }),
            tokens: 9000,
            wall_s: 12.0,
            vocab: None,
            peak_rss_mb: Some(1400.0),
            device: "CPU (2 threads)".into(),
            frameworks: framework_versions(),
        }
    }

    fn front_matter(card: &str) -> serde_yaml::Value {
        let rest = card.strip_prefix("---\n").expect("front matter");
        serde_yaml::from_str(&rest[..rest.find("\n---\n").expect("end of front matter")]).unwrap()
    }

    #[test]
    fn card_tells_peft_users_about_trained_rows_and_added_tokens() {
        let mut f = record("me/base", true);
        f.method = "lora".into();
        let plain = adapter_card(&f, "x: 1\n");
        assert!(!plain.contains("Trained embedding"), "{plain}");
        f.vocab = Some(VocabFacts {
            trained: "embed_tokens (3 token rows), lm_head (1 token rows)".into(),
            params: 256,
            added_tokens: vec![("<|tool|>".into(), 384)],
            vocab_size: 385,
        });
        let card = adapter_card(&f, "x: 1\n");
        assert!(card.contains("## Trained embedding and output head"), "{card}");
        assert!(card.contains("embed_tokens (3 token rows), lm_head (1 token rows) (256 parameters)"), "{card}");
        assert!(card.contains("`<|tool|>` = 384"), "{card}");
        assert!(card.contains("tokenizer = AutoTokenizer.from_pretrained(\"adapters/x\")"), "{card}");
        assert!(card.contains("base.resize_token_embeddings(385)"), "{card}");
        let resize = card.find("resize_token_embeddings(385)").unwrap();
        assert!(resize < card.find("PeftModel.from_pretrained(base").unwrap(), "{card}");
    }

    #[test]
    fn adapter_card_front_matter_is_hub_metadata() {
        let card = adapter_card(&record("HuggingFaceTB/SmolLM2-135M-Instruct", true), "base_model: x\n");
        let m = front_matter(&card);
        assert_eq!(m["base_model"], "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(m["base_model_relation"], "adapter");
        assert_eq!(m["library_name"], "peft");
        assert_eq!(m["pipeline_tag"], "text-generation");
        assert_eq!(m["license"], "apache-2.0");
        let tags: Vec<&str> = m["tags"].as_sequence().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(tags, ["peftkit", "ia3", "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct"]);
        assert!(card.contains("An IA3 adapter (57600 trainable parameters)"), "{card}");
        assert!(card.contains("| base model | 2.9000 | 18.20 | 400 |"));
        assert!(card.contains(&format!("- candle-core {}", env!("PEFTKIT_CANDLE_VERSION"))));
        assert!(!env!("PEFTKIT_CANDLE_VERSION").contains("unknown"));
    }

    #[test]
    fn dora_adapter_card_names_dora() {
        let f =
            TrainingRecord { method: "lora".into(), dora: true, ..record("HuggingFaceTB/SmolLM2-135M-Instruct", true) };
        let card = adapter_card(&f, "adapter:\n  type: lora\n  use_dora: true\n");
        let m = front_matter(&card);
        let tags: Vec<&str> = m["tags"].as_sequence().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(tags, ["peftkit", "lora", "dora", "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct"]);
        assert!(card.contains("# DoRA adapter for HuggingFaceTB/SmolLM2-135M-Instruct"), "{card}");
        assert!(card.contains("A DoRA adapter (57600 trainable parameters)"), "{card}");
        // The record without the key (written before DoRA existed) reads as plain LoRA.
        let json = serde_json::to_string(&record("x", false)).unwrap();
        assert!(!json.contains("dora"));
        assert!(!serde_json::from_str::<TrainingRecord>(&json).unwrap().dora);
    }

    #[test]
    fn local_base_leaves_hub_keys_out_and_gguf_snippet_uses_gguf_file() {
        let card = adapter_card(&record("/models/smol/SmolLM2.Q4_1.gguf", false), "x: 1\n");
        let m = front_matter(&card);
        assert!(m.get("base_model").is_none() && m.get("license").is_none());
        assert_eq!(m["tags"].as_sequence().unwrap().len(), 2);
        assert!(card.contains("from_pretrained(\"/models/smol\", gguf_file=\"SmolLM2.Q4_1.gguf\")"), "{card}");
    }
}

/// What the card of a merged model (`peftkit merge`) states about the merge.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedFacts {
    /// The base as given to `peftkit merge`: a Hub id, or a local folder or .gguf path.
    pub base_model: String,
    /// True when `base_model` is a Hub id.
    pub base_is_hub: bool,
    /// The Hub revision (a commit when known) the base was resolved at.
    pub revision: Option<String>,
    /// The license the base declares, when it declares one.
    pub license: Option<String>,
    /// `lora`, `qlora` or `ia3`.
    pub method: String,
    /// The adapter is DoRA (`use_dora` in its config).
    pub dora: bool,
    /// PEFT's `peft_type` of the adapter (`LORA`, `IA3`).
    pub peft_type: String,
    /// The adapter folder as given.
    pub adapter_dir: String,
    /// Projections the adapter changed.
    pub merged_modules: usize,
    /// Which weights the adapter was merged into, as a phrase ("the base's original (unquantized) weights").
    pub weights: String,
    /// transformers' name of the output dtype (`bfloat16`, `float16`, `float32`).
    pub dtype: String,
    /// The merged model's folder as given.
    pub out_dir: String,
    pub shards: usize,
    /// Bytes of tensor data.
    pub total_bytes: u64,
    /// Whether the folder holds tokenizer files.
    pub has_tokenizer: bool,
    /// What the adapter's trained embedding / head (`modules_to_save`, `trainable_token_indices`, added tokens)
    /// did to the merged model, as a sentence; None when it had none.
    pub vocab: Option<String>,
}

/// The card (`README.md`) of a merged model: front matter for the Hub, what the model is, how to use it, the merge,
/// and how the adapter was trained when its folder recorded it (`training`, from `peftkit_training.json`, and the
/// recipe from `peftkit_recipe.yaml`). What is not known is left out.
pub fn merged_card(f: &MergedFacts, training: Option<&TrainingRecord>, recipe_yaml: Option<&str>) -> String {
    let mut s = String::from("---\n");
    if f.base_is_hub {
        let _ = writeln!(s, "base_model: {}", yaml_scalar(&f.base_model));
    }
    let _ = writeln!(s, "base_model_relation: merge");
    let _ = writeln!(s, "library_name: transformers");
    let _ = writeln!(s, "pipeline_tag: text-generation");
    if let Some(l) = &f.license {
        let _ = writeln!(s, "license: {}", yaml_scalar(l));
    }
    let _ = writeln!(s, "tags:\n- peftkit\n- {}", yaml_scalar(&f.method));
    if f.base_is_hub {
        let _ = writeln!(s, "- {}", yaml_scalar(&format!("base_model:merge:{}", f.base_model)));
    }
    s.push_str("---\n\n");

    let title = adapter_title(&f.method, f.dora);
    // A local base is named by its last path component in the heading (the full path follows in the text).
    let shown = match std::path::Path::new(&f.base_model).file_name() {
        Some(name) if !f.base_is_hub => name.to_string_lossy().to_string(),
        _ => f.base_model.clone(),
    };
    let _ = writeln!(s, "# {shown} with a {title} adapter merged in\n");
    let _ = writeln!(
        s,
        "`{}`{} with the {title} adapter `{}` merged into its weights by peftkit {} (`peftkit merge`): a plain \
         transformers model in {}, which runs without PEFT or the adapter.\n",
        f.base_model,
        f.revision.as_deref().map(|r| format!(" at revision `{r}`")).unwrap_or_default(),
        f.adapter_dir,
        env!("CARGO_PKG_VERSION"),
        f.dtype,
    );
    let _ = writeln!(
        s,
        "The adapter was merged into {}. It changed {} projections; all tensors are stored in {}.\n",
        f.weights, f.merged_modules, f.dtype
    );
    if let Some(v) = &f.vocab {
        let _ = writeln!(s, "{v}\n");
    }

    s.push_str("## How to use\n\nWith peftkit:\n\n```sh\n");
    let _ = writeln!(s, "peftkit chat --base {}", f.out_dir);
    let _ = writeln!(s, "peftkit generate --base {} --prompt \"Hello\"", f.out_dir);
    s.push_str("```\n\nWith Python (transformers):\n\n```python\n");
    let tok_import = if f.has_tokenizer { ", AutoTokenizer" } else { "" };
    let _ = writeln!(s, "from transformers import AutoModelForCausalLM{tok_import}\n");
    let _ = writeln!(s, "model = AutoModelForCausalLM.from_pretrained(\"{}\")", f.out_dir);
    if f.has_tokenizer {
        let _ = writeln!(s, "tokenizer = AutoTokenizer.from_pretrained(\"{}\")", f.out_dir);
    }
    s.push_str("```\n\n");
    if !f.has_tokenizer {
        s.push_str("The base had no tokenizer files, so this folder has none either.\n\n");
    }

    s.push_str("## Merge\n\n");
    let _ = writeln!(
        s,
        "- base: `{}`{}",
        f.base_model,
        f.revision.as_deref().map(|r| format!(" (revision `{r}`)")).unwrap_or_default()
    );
    let _ = writeln!(s, "- adapter: `{}` ({title}, PEFT type {})", f.adapter_dir, f.peft_type);
    let _ = writeln!(s, "- merged into: {}", f.weights);
    let _ = writeln!(s, "- dtype: {}", f.dtype);
    let _ = writeln!(
        s,
        "- weights: {} safetensors file{}, {:.1} MB",
        f.shards,
        if f.shards == 1 { "" } else { "s" },
        f.total_bytes as f64 / 1e6
    );
    let _ = writeln!(s, "- merged with: {}\n", framework_versions().join(", "));

    match (training, recipe_yaml) {
        (Some(record), recipe) => training_sections(&mut s, record, recipe),
        (None, Some(yaml)) => {
            s.push_str(
                "## Training procedure\n\nThe adapter folder has no training record (`peftkit_training.json`); its \
                 recipe (also saved as `peftkit_recipe.yaml`):\n\n```yaml\n",
            );
            s.push_str(yaml.trim_end());
            s.push_str("\n```\n");
        }
        (None, None) => s.push_str(
            "## Training\n\nThe adapter folder has neither a training record (`peftkit_training.json`) nor a recipe \
             (`peftkit_recipe.yaml`): how the adapter was trained is not recorded here.\n",
        ),
    }
    s
}
