//! `adapter.init_from: DIR`: continue training an existing PEFT LoRA adapter. The folder's `adapter_config.json`
//! decides every adapter setting, so the recipe's LoRA keys are filled from it here, at load time: a key the
//! recipe also writes must hold the folder's value (the resolved recipe that peftkit saves writes them all, and
//! loads again), and any other value is an error on that key naming both. The tensors are loaded by the trainer.
//! Reference: PEFT's `PeftModel.from_pretrained(…, is_trainable=True)`, which likewise takes the config from the
//! folder.

use serde::Serialize;
use serde_yaml::{Mapping, Value};

use super::problem::Problem;
use super::{InitLoraWeights, LoraSpec};
use crate::adapter::{peft_format, AdapterConfig};

/// Replaces the LoRA settings of `spec` by those of the adapter folder `spec.init_from` (if set), after checking
/// that the keys written in the recipe (`raw`, the adapter map without `type`) agree with it.
pub(super) fn resolve(raw: &Mapping, spec: &mut LoraSpec) -> Result<(), Problem> {
    const KEY: &str = "adapter.init_from";
    let Some(dir) = spec.init_from.clone() else { return Ok(()) };
    let here = match std::env::current_dir() {
        Ok(cwd) if dir.is_relative() => {
            format!(" (relative paths are taken from the current directory, {})", cwd.display())
        }
        _ => String::new(),
    };
    if !dir.is_dir() {
        let what = if dir.exists() { "is not a folder" } else { "folder not found" };
        return Err(Problem::invalid(KEY, format!("{what}: {}{here}", dir.display())));
    }
    for file in [peft_format::CONFIG_FILE, peft_format::WEIGHTS_FILE] {
        if !dir.join(file).is_file() {
            return Err(Problem::invalid(
                KEY,
                format!("{} holds no {file}: not a PEFT adapter folder{here}", dir.display()),
            ));
        }
    }
    let cfg = peft_format::read_config(&dir).map_err(|e| Problem::invalid(KEY, e.to_string()))?;
    let lora = match cfg.adapter {
        AdapterConfig::Lora(l) => l,
        AdapterConfig::Ia3(_) => {
            return Err(Problem::invalid(
                KEY,
                format!("{} holds an IA3 adapter; init_from continues LoRA adapters", dir.display()),
            ))
        }
    };
    if !cfg.vocab.is_empty() {
        return Err(Problem::invalid(
            KEY,
            format!(
                "{} trains embedding rows or copies (modules_to_save / trainable_token_indices): continuing such an \
                 adapter is not supported yet",
                dir.display()
            ),
        ));
    }
    let from = LoraSpec {
        r: lora.r,
        lora_alpha: lora.lora_alpha,
        lora_dropout: lora.lora_dropout,
        target_modules: lora.target_modules,
        use_rslora: lora.use_rslora,
        init_lora_weights: InitLoraWeights::Default,
        bias: "none".to_string(),
        layers_to_transform: lora.layers_to_transform,
        layers_pattern: lora.layers_pattern,
        exclude_modules: lora.exclude_modules,
        target_parameters: Vec::new(),
        use_dora: lora.use_dora,
        modules_to_save: Vec::new(),
        trainable_token_indices: None,
        init_from: Some(dir.clone()),
    };
    let config = dir.join(peft_format::CONFIG_FILE);
    let check = |key: &str, recipe: Value, folder: Value| -> Result<(), Problem> {
        if !raw.contains_key(key) || recipe == folder {
            return Ok(());
        }
        let show = |v: &Value| serde_json::to_string(v).unwrap_or_else(|_| format!("{v:?}"));
        let folder = if key == "init_lora_weights" {
            "has no effect: the starting values are the folder's tensors".to_string()
        } else {
            format!("{} says {key} = {}", config.display(), show(&folder))
        };
        Err(Problem::invalid(
            &format!("adapter.{key}"),
            format!(
                "{} conflicts with adapter.init_from: {folder}; leave the key out (the folder's config decides)",
                show(&recipe)
            ),
        ))
    };
    fn v<T: Serialize>(x: &T) -> Value {
        serde_yaml::to_value(x).unwrap_or(Value::Null)
    }
    check("r", v(&spec.r), v(&from.r))?;
    check("lora_alpha", v(&spec.lora_alpha), v(&from.lora_alpha))?;
    check("lora_dropout", v(&spec.lora_dropout), v(&from.lora_dropout))?;
    check("target_modules", v(&spec.target_modules), v(&from.target_modules))?;
    check("use_rslora", v(&spec.use_rslora), v(&from.use_rslora))?;
    check("init_lora_weights", v(&spec.init_lora_weights), v(&from.init_lora_weights))?;
    check("layers_to_transform", v(&spec.layers_to_transform), v(&from.layers_to_transform))?;
    check("layers_pattern", v(&spec.layers_pattern), v(&from.layers_pattern))?;
    check("exclude_modules", v(&spec.exclude_modules), v(&from.exclude_modules))?;
    check("use_dora", v(&spec.use_dora), v(&from.use_dora))?;
    check("modules_to_save", v(&spec.modules_to_save), v(&from.modules_to_save))?;
    check("trainable_token_indices", v(&spec.trainable_token_indices), v(&from.trainable_token_indices))?;
    *spec = from;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::recipe::testutil::{assert_msg, err, fixture, minimal, ok};
    use crate::recipe::{Recipe, TargetModules};

    fn init_dir() -> String {
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/train-oracle/init").to_string()
    }

    #[test]
    fn init_from_takes_the_adapter_settings_from_the_folder() {
        let f = fixture();
        let with = |keys: &str| {
            minimal(&f, "lora").replace("type: lora", &format!("type: lora\n  init_from: {}{keys}", init_dir()))
        };
        let recipe = ok(&with(""), &[]);
        let lora = recipe.adapter.lora().unwrap();
        assert_eq!((lora.r, lora.lora_alpha, lora.lora_dropout), (4, 8.0, 0.0));
        assert_eq!(lora.init_from.as_deref(), Some(std::path::Path::new(&init_dir())));
        assert!(matches!(&lora.target_modules, TargetModules::List(l) if l.len() == 14), "{:?}", lora.target_modules);
        // The resolved recipe (every key written) loads again; the folder's own values are no conflict.
        assert_eq!(Recipe::from_str(&recipe.to_yaml(), "resolved.yaml", &[]).unwrap(), recipe);
        ok(&with("\n  r: 4\n  lora_alpha: 8"), &[]);
        let config = format!("{}/adapter_config.json", init_dir());
        assert_msg(
            &err(&with("\n  r: 16"), &[]),
            "recipes/x.yaml:5: adapter.r: 16 conflicts with adapter.init_from: ",
            &[&format!("{config} says r = 4"), "leave the key out"],
        );
        assert_msg(
            &err(&with(""), &["adapter.use_dora=true"]),
            "--set adapter.use_dora=true: adapter.use_dora: true conflicts with adapter.init_from",
            &[],
        );
        assert_msg(
            &err(&with("\n  init_lora_weights: gaussian"), &[]),
            "recipes/x.yaml:5: adapter.init_lora_weights: \"gaussian\" conflicts with adapter.init_from: has no effect",
            &[],
        );
        let missing = minimal(&f, "qlora").replace("type: qlora", "type: qlora\n  init_from: /no/such/adapter");
        assert_msg(&err(&missing, &[]), "recipes/x.yaml:4: adapter.init_from: folder not found: /no/such/adapter", &[]);
        let not_adapter = minimal(&f, "lora")
            .replace("type: lora", &format!("type: lora\n  init_from: {}", env!("CARGO_MANIFEST_DIR")));
        assert_msg(&err(&not_adapter, &[]), "recipes/x.yaml:4: adapter.init_from: ", &["holds no adapter_config.json"]);
        let ia3 = minimal(&f, "ia3").replace("type: ia3", &format!("type: ia3\n  init_from: {}", init_dir()));
        assert_msg(&err(&ia3, &[]), "recipes/x.yaml:4: adapter.init_from: continues LoRA adapters", &[]);
    }

    #[test]
    fn loraplus_needs_a_lora_adapter() {
        let f = fixture();
        let text = format!("{}training: {{loraplus_lr_ratio: 16}}\n", minimal(&f, "ia3"));
        assert_msg(&err(&text, &[]), "recipes/x.yaml:8: training.loraplus_lr_ratio: LoRA+ sets the learning rate", &[]);
        let text = format!("{}training: {{loraplus_lr_ratio: 16, loraplus_lr_embedding: 1e-5}}\n", minimal(&f, "lora"));
        let recipe = ok(&text, &[]);
        assert_eq!(recipe.training.loraplus_lr_ratio, Some(16.0));
        assert_eq!(Recipe::from_str(&recipe.to_yaml(), "resolved.yaml", &[]).unwrap(), recipe);
    }
}
