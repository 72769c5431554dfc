//! Validation of a deserialized recipe: ranges, files, formats and combinations of keys
//! ([`Recipe::validate`] and loading both run it). Failures are [`Problem`]s: a key path and a
//! message, placed in the file or on a `--set` argument by the caller.

use std::path::Path;

use regex::Regex;

use super::problem::{Problem, ProblemKind};
use super::{AdapterSpec, DataSpec, LoraSpec, OutputSpec, Recipe, TargetModules, TrainingSpec};

impl Recipe {
    pub(super) fn check(&self) -> Result<(), Problem> {
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
        if let Some(id) = &self.base_model_id {
            // A Hub id: owner/name, the characters the Hub allows.
            let ok = id.split('/').count() == 2
                && id
                    .split('/')
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
            if !ok {
                return Err(Problem::invalid(
                    "base_model_id",
                    format!("must be a Hugging Face Hub id like owner/name (got \"{id}\")"),
                ));
            }
        }
        check_adapter(&self.adapter)?;
        super::vocab::check_vocab_keys(&self.adapter, &self.tokenizer)?;
        check_data(&self.data)?;
        check_training(&self.training)?;
        if self.training.loraplus_lr_ratio.is_some() && self.adapter.lora().is_none() {
            return Err(Problem::invalid(
                "training.loraplus_lr_ratio",
                format!(
                    "LoRA+ sets the learning rate of LoRA's B matrices: it needs a lora or qlora adapter (got {})",
                    self.adapter.type_name()
                ),
            ));
        }
        check_output(&self.output)
    }
}

fn check_adapter(adapter: &AdapterSpec) -> Result<(), Problem> {
    match adapter {
        AdapterSpec::Lora(spec) => check_lora(spec),
        AdapterSpec::Qlora(spec) => {
            check_lora(&spec.lora)?;
            if spec.lora.init_lora_weights.rewrites_base() {
                // PEFT refuses PiSSA on a 4-bit weight too ("initialize PiSSA under float32, float16, or bfloat16.
                // Subsequently, re-quantize the residual model"); its OLoRA re-quantizes W − s·B·A, after which the
                // saved conversion no longer matches the original base.
                return Err(Problem::invalid(
                    "adapter.init_lora_weights",
                    format!(
                        "{} rewrites the base weights (W − s·B·A), which peftkit does not do on an NF4 base: use \
                         `type: lora` (a 16/32-bit base), or keep qlora with init_lora_weights true or gaussian",
                        spec.lora.init_lora_weights.name()
                    ),
                ));
            }
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
            check_exclude(spec.exclude_modules.as_ref())?;
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
    check_exclude(spec.exclude_modules.as_ref())?;
    if spec.use_dora && spec.init_lora_weights.rewrites_base() {
        // PEFT initialises it, but its conversion back to the original base drops lora_magnitude_vector.
        return Err(Problem::invalid(
            "adapter.init_lora_weights",
            format!(
                "{} with adapter.use_dora is not supported: PEFT's conversion of the trained adapter back to the \
                 original base (path_initial_model_for_weight_conversion) leaves out DoRA's magnitude vectors",
                spec.init_lora_weights.name()
            ),
        ));
    }
    if let Some(pattern) = &spec.layers_pattern {
        const KEY: &str = "adapter.layers_pattern";
        if let Err((index, name)) = pattern.check() {
            let at = match pattern {
                crate::adapter::LayersPattern::One(_) => Problem::path_of(KEY),
                crate::adapter::LayersPattern::List(_) => Problem::path_of(KEY).index(index),
            };
            return Err(at.with(ProblemKind::Invalid(format!(
                "\"{name}\" is not supported: peftkit's models keep their decoder layers in `model.layers`, so the \
                 only layers_pattern is \"layers\""
            ))));
        }
        if spec.layers_to_transform.is_none() && !pattern.is_empty() {
            return Err(Problem::invalid(
                KEY,
                "is only used with adapter.layers_to_transform (set the layer indices too, or leave layers_pattern out)",
            ));
        }
    }
    if !spec.target_parameters.is_empty() {
        return Err(Problem::invalid(
            "adapter.target_parameters",
            "LoRA on bare parameters (PEFT ≥ 0.17's target_parameters, for mixture-of-experts weights) is not \
             supported: peftkit has no MoE base model; adapt linear projections with adapter.target_modules",
        ));
    }
    Ok(())
}

fn check_exclude(exclude: Option<&crate::adapter::ExcludeModules>) -> Result<(), Problem> {
    const KEY: &str = "adapter.exclude_modules";
    match exclude {
        None => Ok(()),
        Some(crate::adapter::ExcludeModules::List(names)) => match names.iter().position(|n| n.trim().is_empty()) {
            Some(index) => {
                Err(Problem::path_of(KEY).index(index).with(ProblemKind::Invalid("must not be empty".into())))
            }
            None => Ok(()),
        },
        Some(crate::adapter::ExcludeModules::Regex(pattern)) => match Regex::new(pattern) {
            Ok(_) => Ok(()),
            Err(err) => Err(Problem::invalid(KEY, format!("invalid regular expression: {err}"))),
        },
    }
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
    let positive = [
        ("training.loraplus_lr_ratio", t.loraplus_lr_ratio),
        ("training.loraplus_lr_embedding", t.loraplus_lr_embedding),
    ];
    for (key, value) in positive {
        if let Some(value) = value {
            if !(value.is_finite() && value > 0.0) {
                return Err(Problem::invalid(key, format!("must be a positive number (got {value})")));
            }
        }
    }
    if t.loraplus_lr_embedding.is_some() && t.loraplus_lr_ratio.is_none() {
        return Err(Problem::invalid(
            "training.loraplus_lr_embedding",
            "is a LoRA+ setting: it needs training.loraplus_lr_ratio too",
        ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::testutil::{assert_msg, err, fixture, minimal, ok};
    use crate::recipe::{Origin, RecipeError};

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
            ("{loraplus_lr_ratio: 0}", "recipes/x.yaml:8: training.loraplus_lr_ratio: must be a positive number"),
            ("{loraplus_lr_ratio: .inf}", "recipes/x.yaml:8: training.loraplus_lr_ratio: must be a positive number"),
            (
                "{loraplus_lr_ratio: 16, loraplus_lr_embedding: -1}",
                "recipes/x.yaml:8: training.loraplus_lr_embedding: must be a positive number",
            ),
            (
                "{loraplus_lr_embedding: 1e-6}",
                "recipes/x.yaml:8: training.loraplus_lr_embedding: is a LoRA+ setting: it needs training.loraplus_lr_ratio",
            ),
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
}
