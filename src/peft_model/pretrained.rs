//! Loading a PEFT adapter folder onto a model and saving a model's adapters as one (PEFT's `from_pretrained` /
//! `save_pretrained`). The format itself — file names, tensor keys, which config keys are read and written — is
//! [`crate::adapter::peft_format`]'s.

use crate::adapter::peft_format::{
    exclude_to_json, format_err, read_adapter, save_safetensors, target_to_json, write_atomic, PeftConfig, CONFIG_FILE,
    PREFIX, WEIGHTS_FILE,
};
use crate::adapter::{
    pissa, AdapterConfig, AdapterError, FeedforwardModules, LayerAdapter, LayersPattern, LoraInit, LoraLayer,
    TargetModules,
};
use crate::model::Llama;
use candle_core::Tensor;
use serde_json::{json, Map, Value};
use std::path::Path;

/// Loads a PEFT adapter folder onto `model` (replacing any attached adapter). Returns its config.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<PeftConfig, AdapterError> {
    let device = model.device.clone();
    let (cfg, loaded) = read_adapter(dir, &device)?;
    let wpath = dir.join(WEIGHTS_FILE);
    let mut by_path: std::collections::HashMap<String, LayerAdapter> =
        loaded.into_iter().map(|l| (l.path, l.adapter)).collect();
    super::detach_all(model);
    let mut used = 0;
    for lin in model.linears_mut() {
        let Some(adapter) = by_path.remove(&lin.path) else { continue };
        adapter
            .check_fits(lin.out_features, lin.in_features)
            .map_err(|msg| format_err(&wpath, format!("{PREFIX}{}: {msg}", lin.path)))?;
        lin.adapter = Some(adapter);
        used += 1;
    }
    if used == 0 && cfg.vocab.is_empty() {
        return Err(format_err(&wpath, "no tensor matches a projection of this model (is it for another model?)"));
    }
    if let Some(k) = by_path.keys().next() {
        return Err(format_err(&wpath, format!("`{PREFIX}{k}` does not match any projection of this model")));
    }
    // And every projection the config selects must have its tensors (PEFT would leave it at its initial values).
    let matcher = crate::adapter::target_matcher(&cfg.adapter, model.config.num_hidden_layers)
        .map_err(|e| format_err(&dir.join(CONFIG_FILE), e.to_string()))?;
    if let Some(lin) = model.linears().find(|l| l.adapter.is_none() && matcher.matches(&l.path)) {
        return Err(format_err(
            &wpath,
            format!(
                "has no tensors for `{}`, which {CONFIG_FILE}'s target_modules selects: the config does not \
                 describe these weights",
                lin.path
            ),
        ));
    }
    super::vocab::load(model, dir, &cfg.vocab)?;
    Ok(cfg)
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` for the adapters attached to `model`.
/// Each file is written to a temporary name and renamed into place. A PiSSA/OLoRA adapter is saved converted, as
/// PEFT's `save_pretrained(path_initial_model_for_weight_conversion=…)` saves it: a plain LoRA adapter of rank 2r for
/// the original (unmodified) base model ([`crate::adapter::pissa`]).
pub fn save_adapter(
    model: &Llama,
    config: &AdapterConfig,
    base_model_name_or_path: &str,
    revision: Option<&str>,
    dir: &Path,
) -> Result<(), AdapterError> {
    save_adapter_as(model, config, base_model_name_or_path, revision, dir, true)
}

/// [`save_adapter`] without PiSSA/OLoRA's conversion: the adapter as trained, valid on the residual base, with
/// `init_lora_weights` naming the initialisation (PEFT loading it onto the original base redoes the factorisation,
/// and with it the residual, before loading the weights). Checkpoints are saved so, for `--resume`.
pub fn save_adapter_residual(
    model: &Llama,
    config: &AdapterConfig,
    base_model_name_or_path: &str,
    revision: Option<&str>,
    dir: &Path,
) -> Result<(), AdapterError> {
    save_adapter_as(model, config, base_model_name_or_path, revision, dir, false)
}

fn save_adapter_as(
    model: &Llama,
    config: &AdapterConfig,
    base_model_name_or_path: &str,
    revision: Option<&str>,
    dir: &Path,
    convert: bool,
) -> Result<(), AdapterError> {
    std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io { path: dir.into(), source })?;
    let vocab = model.vocab.config();
    if matches!(config, AdapterConfig::Ia3(_)) && !vocab.trainable_tokens.is_empty() {
        return Err(format_err(dir, "trainable_token_indices: PEFT's IA3Config has no such key (use LoRA)"));
    }
    let mut cfg = Map::new();
    match config {
        AdapterConfig::Lora(l) => {
            // Long-standing LoraConfig keys only (PEFT ≥ 0.7 reads all of them).
            let targets = match &l.target_modules {
                // Like PEFT, save the resolved module names rather than the `all-linear` shorthand.
                TargetModules::AllLinear => {
                    let mut names: Vec<String> = model
                        .linears()
                        .filter(|lin| lin.adapter.is_some())
                        .filter_map(|lin| lin.path.rsplit('.').next().map(str::to_string))
                        .collect();
                    names.sort();
                    names.dedup();
                    json!(names)
                }
                // PEFT refuses a regex together with layers_to_transform: name the adapted modules instead.
                TargetModules::Regex(_) if l.layers_to_transform.is_some() => {
                    json!(model
                        .linears()
                        .filter(|lin| lin.adapter.is_some())
                        .map(|lin| lin.path.clone())
                        .collect::<Vec<_>>())
                }
                t => target_to_json(t),
            };
            let layers = match &l.target_modules {
                TargetModules::Regex(_) => None,
                _ => l.layers_to_transform.clone(),
            };
            // PEFT refuses a layers_pattern without layers_to_transform (or with a regex target).
            let layers_pattern = match (&layers, &l.layers_pattern) {
                (Some(_), Some(LayersPattern::One(s))) => json!(s),
                (Some(_), Some(LayersPattern::List(v))) => json!(v),
                _ => Value::Null,
            };
            let pattern_json =
                |p: &[(String, f64)]| Value::Object(p.iter().map(|(k, v)| (k.clone(), json!(v))).collect());
            let double = |p: &[(String, f64)]| -> Vec<(String, f64)> {
                let f = if convert && pissa::rewrites_base(l.init) { 2.0 } else { 1.0 };
                p.iter().map(|(k, v)| (k.clone(), v * f)).collect()
            };
            cfg.insert("alpha_pattern".into(), pattern_json(&double(&l.alpha_pattern)));
            cfg.insert("auto_mapping".into(), Value::Null);
            cfg.insert("base_model_name_or_path".into(), json!(base_model_name_or_path));
            cfg.insert("bias".into(), json!("none"));
            // PEFT ≥ 0.14's key: written only when used, so that older versions load every other adapter.
            if let Some(e) = l.exclude_modules.as_ref().filter(|e| !e.is_empty()) {
                cfg.insert("exclude_modules".into(), exclude_to_json(e));
            }
            cfg.insert("fan_in_fan_out".into(), json!(false));
            cfg.insert("inference_mode".into(), json!(true));
            // PiSSA/OLoRA converted for the original base (PEFT's `path_initial_model_for_weight_conversion`):
            // twice the rank, lora_alpha scaled so that s is unchanged, and a plain LoRA start.
            let converted = convert && pissa::rewrites_base(l.init);
            let (r_factor, alpha_factor) = match (converted, l.use_rslora) {
                (false, _) => (1, 1.0),
                (true, false) => (2, 2.0),
                (true, true) => (2, std::f64::consts::SQRT_2),
            };
            if converted && l.use_rslora && (!l.rank_pattern.is_empty() || !l.alpha_pattern.is_empty()) {
                // As PEFT refuses: the doubled pattern ranks would change their rsLoRA scales.
                return Err(format_err(
                    dir,
                    "init_lora_weights: converting a PiSSA/OLoRA adapter with use_rslora and rank_pattern / \
                     alpha_pattern is not supported (PEFT refuses it too)",
                ));
            }
            cfg.insert(
                "init_lora_weights".into(),
                match l.init {
                    _ if converted => json!(true),
                    LoraInit::Kaiming => json!(true),
                    LoraInit::Gaussian => json!("gaussian"),
                    LoraInit::Random => json!(false),
                    LoraInit::Pissa => json!("pissa"),
                    LoraInit::PissaNiter(n) => json!(format!("pissa_niter_{n}")),
                    LoraInit::Olora => json!("olora"),
                },
            );
            cfg.insert("layers_pattern".into(), layers_pattern);
            cfg.insert("layers_to_transform".into(), json!(layers));
            cfg.insert("lora_alpha".into(), json!(l.lora_alpha * alpha_factor));
            cfg.insert("lora_dropout".into(), json!(l.lora_dropout));
            cfg.insert("modules_to_save".into(), vocab.modules_to_save_json());
            cfg.insert("peft_type".into(), json!("LORA"));
            cfg.insert("r".into(), json!(l.r * r_factor));
            let ranks: Vec<(String, f64)> = l.rank_pattern.iter().map(|(k, v)| (k.clone(), *v as f64)).collect();
            cfg.insert("rank_pattern".into(), pattern_json(&double(&ranks)));
            cfg.insert("revision".into(), json!(revision));
            cfg.insert("target_modules".into(), targets);
            cfg.insert("task_type".into(), json!("CAUSAL_LM"));
            // PEFT ≥ 0.15's key: written only when used, so that older versions load every other adapter.
            if let Some(t) = vocab.trainable_token_indices_json() {
                cfg.insert("trainable_token_indices".into(), t);
            }
            cfg.insert("use_rslora".into(), json!(l.use_rslora));
            // Written only when set: PEFT before 0.9 does not know the key.
            if l.use_dora {
                cfg.insert("use_dora".into(), json!(true));
            }
        }
        AdapterConfig::Ia3(c) => {
            // Long-standing IA3Config keys only. As for LoRA, `all-linear` is saved as the module names it resolved to.
            let adapted: Vec<&str> =
                model.linears().filter(|lin| lin.adapter.is_some()).map(|lin| lin.path.as_str()).collect();
            let targets = match &c.target_modules {
                TargetModules::AllLinear => {
                    let mut names: Vec<String> =
                        adapted.iter().filter_map(|p| p.rsplit('.').next().map(str::to_string)).collect();
                    names.sort();
                    names.dedup();
                    json!(names)
                }
                t => target_to_json(t),
            };
            let feedforward = match &c.feedforward_modules {
                FeedforwardModules::List(l) => json!(l),
                FeedforwardModules::Regex(r) => json!(r),
            };
            cfg.insert("auto_mapping".into(), Value::Null);
            cfg.insert("base_model_name_or_path".into(), json!(base_model_name_or_path));
            if let Some(e) = c.exclude_modules.as_ref().filter(|e| !e.is_empty()) {
                cfg.insert("exclude_modules".into(), exclude_to_json(e));
            }
            cfg.insert("fan_in_fan_out".into(), json!(false));
            cfg.insert("feedforward_modules".into(), feedforward);
            cfg.insert("inference_mode".into(), json!(true));
            cfg.insert("init_ia3_weights".into(), json!(c.init_ia3_weights));
            cfg.insert("modules_to_save".into(), vocab.modules_to_save_json());
            cfg.insert("peft_type".into(), json!("IA3"));
            cfg.insert("revision".into(), json!(revision));
            cfg.insert("target_modules".into(), targets);
            cfg.insert("task_type".into(), json!("CAUSAL_LM"));
        }
    }
    // The weights first, then the config that describes them.
    let mut tensors: Vec<(String, Tensor)> =
        super::trainable(model).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
    if convert {
        // PiSSA/OLoRA: A' = [A; A₀], B' = [B, −B₀], the adapter for the original base.
        let mut pairs = std::collections::HashMap::new();
        for lin in model.linears() {
            if let Some(LayerAdapter::Lora(LoraLayer { a, b, initial: Some(i), .. })) = &lin.adapter {
                let (a2, b2) = pissa::convert(a.as_tensor(), b.as_tensor(), i)?;
                pairs.insert(format!("base_model.model.{}.lora_A.weight", lin.path), a2);
                pairs.insert(format!("base_model.model.{}.lora_B.weight", lin.path), b2);
            }
        }
        for (k, t) in tensors.iter_mut() {
            if let Some(c) = pairs.remove(k) {
                *t = c;
            }
        }
    }
    save_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    let text = serde_json::to_string_pretty(&Value::Object(cfg)).map_err(|e| format_err(dir, e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::peft_format::read_config;
    use crate::adapter::{ExcludeModules, Ia3Config, LoraConfig};
    use crate::model::{load_llama_quant, BaseQuant};
    use crate::peft_model::attach;
    use candle_core::{DType, Device};

    /// The 2-layer Llama fixture (7 projections per layer).
    fn tiny() -> Llama {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        load_llama_quant(
            &dir.join("config.json"),
            &[dir.join("model.safetensors")],
            &Device::Cpu,
            DType::F32,
            BaseQuant::None,
        )
        .unwrap()
    }

    fn lora(exclude: Option<ExcludeModules>, layers: Option<Vec<usize>>, pattern: Option<LayersPattern>) -> LoraConfig {
        LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            target_modules: TargetModules::AllLinear,
            layers_to_transform: layers,
            exclude_modules: exclude,
            layers_pattern: pattern,
            ..Default::default()
        }
    }

    fn raw(dir: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap()
    }

    #[test]
    fn target_keys_round_trip_through_adapter_config() {
        let dir = tempfile::tempdir().unwrap();
        let ex = ExcludeModules::List(vec!["down_proj".into(), "model.layers.1.self_attn.q_proj".into()]);
        let cfg = lora(Some(ex.clone()), Some(vec![1]), Some(LayersPattern::One("layers".into())));
        let mut m = tiny();
        // layer 1's 7 projections, less down_proj and q_proj
        assert_eq!(attach(&mut m, &AdapterConfig::Lora(cfg.clone()), 0).unwrap(), 5);
        save_adapter(&m, &AdapterConfig::Lora(cfg), "base", None, dir.path()).unwrap();
        let v = raw(dir.path());
        assert_eq!(v["exclude_modules"], json!(["down_proj", "model.layers.1.self_attn.q_proj"]));
        assert_eq!(v["layers_pattern"], json!("layers"));
        assert_eq!(v["layers_to_transform"], json!([1]));
        assert!(v.get("target_parameters").is_none(), "{v}");
        let back = read_config(dir.path()).unwrap();
        let AdapterConfig::Lora(l) = &back.adapter else { panic!() };
        assert_eq!(l.exclude_modules, Some(ex));
        assert_eq!(l.layers_pattern, Some(LayersPattern::One("layers".into())));
        // the excluded modules have no tensors, and the adapter loads back
        let (_, loaded) = read_adapter(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.len(), 5);
        assert!(loaded.iter().all(|a| !a.path.ends_with("down_proj") && a.path != "model.layers.1.self_attn.q_proj"));
        load_adapter(&mut tiny(), dir.path()).unwrap();

        // IA3 with a regex exclusion; the long-standing keys only when nothing is excluded.
        let ia3 = Ia3Config {
            exclude_modules: Some(ExcludeModules::Regex(r".*\.layers\.0\..*".into())),
            ..Default::default()
        };
        let mut m = tiny();
        assert_eq!(attach(&mut m, &AdapterConfig::Ia3(ia3.clone()), 0).unwrap(), 3);
        save_adapter(&m, &AdapterConfig::Ia3(ia3.clone()), "base", None, dir.path()).unwrap();
        assert_eq!(raw(dir.path())["exclude_modules"], json!(r".*\.layers\.0\..*"));
        assert_eq!(read_config(dir.path()).unwrap().adapter, AdapterConfig::Ia3(ia3));
        let mut m = tiny();
        let plain = lora(None, None, None);
        attach(&mut m, &AdapterConfig::Lora(plain.clone()), 0).unwrap();
        save_adapter(&m, &AdapterConfig::Lora(plain), "base", None, dir.path()).unwrap();
        let v = raw(dir.path());
        assert!(v.get("exclude_modules").is_none(), "{v}");
        assert_eq!(v["layers_pattern"], Value::Null);
    }

    #[test]
    fn target_errors_on_attach_say_what_went_wrong() {
        let mut m = tiny();
        let e = attach(&mut m, &AdapterConfig::Lora(lora(None, Some(vec![99]), None)), 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "layers_to_transform: layer 99 is out of range: the model has 2 decoder layers (indices 0–1)"
        );
        let all = ExcludeModules::Regex(".*".into());
        let e = attach(&mut m, &AdapterConfig::Lora(lora(Some(all), None, None)), 0).unwrap_err();
        assert!(
            e.to_string().starts_with("exclude_modules excludes every projection that target_modules matches (14"),
            "{e}"
        );
        assert!(m.linears().all(|l| l.adapter.is_none()));
        let bad = ExcludeModules::Regex("(".into());
        let e = attach(&mut m, &AdapterConfig::Lora(lora(Some(bad), None, None)), 0).unwrap_err();
        assert!(e.to_string().starts_with("exclude_modules: invalid regex"), "{e}");
    }
}
