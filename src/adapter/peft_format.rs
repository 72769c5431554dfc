//! PEFT's on-disk adapter format, read and written: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Tensor keys are `base_model.model.<module path>.lora_A.weight` (r × in) and `.lora_B.weight` (out × r), f32,
//! with safetensors metadata `{"format": "pt"}`; a DoRA adapter (`use_dora: true`) adds `.lora_magnitude_vector`
//! (out) per module. The config is written with the long-standing keys only, so that older PEFT versions (which
//! reject unknown keys) load it; on reading, every key PEFT writes is accepted and the ones that do not change the
//! math are ignored. Options peftkit does not implement (`fan_in_fan_out`, `modules_to_save` other than the
//! embedding and the head, a LoRA bias) are refused with a clear error rather than silently dropped.
//! `modules_to_save` / `trainable_token_indices` tensors are read and written by [`super::vocab`].
//! Reference: PEFT `config.py`, `utils/save_and_load.py` (`get_peft_model_state_dict`).

use super::dora::DoraLayer;
use super::ia3::{FeedforwardModules, Ia3Config, Ia3Layer};
use super::lora::{LoraConfig, LoraInit, LoraLayer};
use super::target::{ExcludeModules, LayersPattern, TargetModules};
use super::LayerAdapter;
use super::{AdapterConfig, AdapterError};
use crate::model::Llama;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

fn format_err(path: &Path, msg: impl Into<String>) -> AdapterError {
    AdapterError::Format { path: path.to_path_buf(), msg: msg.into() }
}

/// An adapter config as read from `adapter_config.json`, with the facts peftkit keeps.
#[derive(Debug, Clone)]
pub struct PeftConfig {
    pub adapter: AdapterConfig,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    /// `modules_to_save` and `trainable_token_indices` (the embedding and the head).
    pub vocab: super::vocab::VocabConfig,
}

fn target_from_json(v: &Value, path: &Path, key: &str) -> Result<TargetModules, AdapterError> {
    match v {
        Value::String(s) if s == "all-linear" => Ok(TargetModules::AllLinear),
        Value::String(s) => Ok(TargetModules::Regex(s.clone())),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(|| format_err(path, format!("{key}: expected strings"))))
            .collect::<Result<Vec<_>, _>>()
            .map(TargetModules::List),
        _ => Err(format_err(path, format!("{key}: expected a list of module names or a regex string"))),
    }
}

/// `exclude_modules`: absent, null, `[]` or `""` exclude nothing.
fn exclude_from_json(v: Option<&Value>, path: &Path) -> Result<Option<ExcludeModules>, AdapterError> {
    let e = match v {
        None => return Ok(None),
        Some(Value::String(s)) => ExcludeModules::Regex(s.clone()),
        Some(v) => match target_from_json(v, path, "exclude_modules")? {
            TargetModules::List(l) => ExcludeModules::List(l),
            _ => return Err(format_err(path, "exclude_modules: expected a list of module names or a regex string")),
        },
    };
    if let ExcludeModules::Regex(r) = &e {
        regex::Regex::new(r).map_err(|err| format_err(path, format!("exclude_modules: invalid regex: {err}")))?;
    }
    Ok(Some(e).filter(|e| !e.is_empty()))
}

fn exclude_to_json(e: &ExcludeModules) -> Value {
    match e {
        ExcludeModules::List(l) => json!(l),
        ExcludeModules::Regex(r) => json!(r),
    }
}

/// `layers_pattern`: a string or a list of strings; only `layers` (peftkit's `model.layers`) is accepted.
fn layers_pattern_from_json(v: Option<&Value>, path: &Path) -> Result<Option<LayersPattern>, AdapterError> {
    let p = match v {
        None => return Ok(None),
        Some(Value::String(s)) => LayersPattern::One(s.clone()),
        Some(v) => match target_from_json(v, path, "layers_pattern") {
            Ok(TargetModules::List(l)) => LayersPattern::List(l),
            _ => return Err(format_err(path, "layers_pattern: expected a string or a list of strings")),
        },
    };
    if let Err((_, name)) = p.check() {
        return Err(format_err(
            path,
            format!(
                "layers_pattern: `{name}` is not supported by peftkit (its models keep their decoder layers in \
                 `model.layers`: use `layers`)"
            ),
        ));
    }
    Ok(Some(p).filter(|p| !p.is_empty()))
}

fn target_to_json(t: &TargetModules) -> Value {
    match t {
        TargetModules::AllLinear => json!("all-linear"),
        TargetModules::Regex(r) => json!(r),
        TargetModules::List(l) => json!(l),
    }
}

/// Reads `dir/adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<PeftConfig, AdapterError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| AdapterError::Io { path: path.clone(), source })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format_err(&path, format!("line {}: {e}", e.line())))?;
    let obj = v.as_object().ok_or_else(|| format_err(&path, "expected a JSON object"))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let str_of = |k: &str| get(k).and_then(|v| v.as_str()).map(str::to_string);
    let peft_type = str_of("peft_type").ok_or_else(|| format_err(&path, "peft_type is missing"))?;
    let refuse = |key: &str, why: &str| Err(format_err(&path, format!("{key}: {why} is not supported by peftkit")));
    if get("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
        return refuse("fan_in_fan_out", "true (Conv1D-style weights)");
    }
    // PEFT ≥ 0.17: LoRA on bare parameters (MoE experts); see `target`'s module docs for what it would take.
    match get("target_parameters") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(v) => {
            return refuse(
                "target_parameters",
                &format!("{v} (LoRA on nn.Parameter weights, such as mixture-of-experts experts)"),
            )
        }
    }
    let vocab = super::vocab::VocabConfig::from_peft_json(obj, &path)?;
    let exclude_modules = exclude_from_json(get("exclude_modules"), &path)?;
    let adapter = match peft_type.as_str() {
        "LORA" => {
            if let Some(b) = str_of("bias") {
                if b != "none" {
                    return refuse("bias", &format!("`{b}`"));
                }
            }
            let num = |k: &str| get(k).and_then(|v| v.as_f64());
            let r = num("r").unwrap_or(8.0) as usize;
            if r == 0 {
                return Err(format_err(&path, "r must be positive"));
            }
            let init = match get("init_lora_weights") {
                None | Some(Value::Bool(true)) => LoraInit::Kaiming,
                Some(Value::Bool(false)) => LoraInit::Random,
                Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
                // PiSSA, OLoRA and CorDA also rewrite the base weights (the adapter is only valid on the residual
                // model PEFT saved beside it), unless converted back to plain LoRA when saving.
                Some(Value::String(s)) if ["pissa", "olora", "corda"].iter().any(|p| s.to_lowercase().starts_with(p)) => {
                    return refuse(
                        "init_lora_weights",
                        &format!("`{s}` (it modifies the base weights; save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA adapter)"),
                    )
                }
                // Other schemes (loftq, eva…) only choose the starting values: the loaded weights are what count.
                Some(_) => LoraInit::Kaiming,
            };
            // In the file's order: PEFT takes the first key that matches.
            let pattern = |k: &str| -> Vec<(String, f64)> {
                get(k)
                    .and_then(|v| v.as_object())
                    .map(|m| m.iter().filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f))).collect())
                    .unwrap_or_default()
            };
            let layers_to_transform = match get("layers_to_transform") {
                Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as usize]),
                Some(Value::Array(a)) => Some(a.iter().filter_map(|v| v.as_u64().map(|n| n as usize)).collect()),
                _ => None,
            };
            AdapterConfig::Lora(LoraConfig {
                r,
                lora_alpha: num("lora_alpha").unwrap_or(8.0),
                lora_dropout: num("lora_dropout").unwrap_or(0.0),
                target_modules: match get("target_modules") {
                    Some(v) => target_from_json(v, &path, "target_modules")?,
                    None => TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
                },
                use_rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
                init,
                layers_to_transform,
                exclude_modules,
                layers_pattern: layers_pattern_from_json(get("layers_pattern"), &path)?,
                rank_pattern: pattern("rank_pattern").into_iter().map(|(k, v)| (k, v as usize)).collect(),
                alpha_pattern: pattern("alpha_pattern"),
                use_dora: get("use_dora").and_then(|v| v.as_bool()).unwrap_or(false),
            })
        }
        "IA3" => {
            let target_modules = match get("target_modules") {
                Some(v) => target_from_json(v, &path, "target_modules")?,
                None => Ia3Config::default().target_modules,
            };
            let feedforward_modules = match get("feedforward_modules") {
                Some(Value::String(r)) => FeedforwardModules::Regex(r.clone()),
                Some(v) => match target_from_json(v, &path, "feedforward_modules")? {
                    TargetModules::List(l) => FeedforwardModules::List(l),
                    _ => {
                        return Err(format_err(
                            &path,
                            "feedforward_modules: expected a list of module names or a regex string",
                        ))
                    }
                },
                None => Ia3Config::default().feedforward_modules,
            };
            AdapterConfig::Ia3(Ia3Config {
                target_modules,
                feedforward_modules,
                init_ia3_weights: get("init_ia3_weights").and_then(|v| v.as_bool()).unwrap_or(true),
                exclude_modules,
            })
        }
        other => return Err(format_err(&path, format!("peft_type `{other}` is not supported (supported: LORA, IA3)"))),
    };
    Ok(PeftConfig {
        adapter,
        base_model_name_or_path: str_of("base_model_name_or_path"),
        revision: str_of("revision"),
        vocab,
    })
}

/// The adapter of one projection as read from a PEFT folder, before it is placed on a model.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    pub adapter: LayerAdapter,
}

/// Reads a PEFT adapter folder without a model: its config and the adapter of every projection it names, in the
/// order of the file. Shapes are checked against each other here and against the model by the caller
/// ([`LayerAdapter::check_fits`]). `device` is where the weights go.
pub fn read_adapter(dir: &Path, device: &Device) -> Result<(PeftConfig, Vec<LoadedAdapter>), AdapterError> {
    let cfg = read_config(dir)?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (adapter_model.bin, a pickle, is not read: re-save it with safe_serialization=True)"
        } else {
            ""
        };
        return Err(format_err(&wpath, format!("missing{hint}")));
    }
    let tensors = candle_core::safetensors::load(&wpath, &Device::Cpu)
        .map_err(|e| format_err(&wpath, format!("cannot read: {e}")))?;
    // Group the tensors by module path, in a stable (sorted) order.
    let mut has_vocab = false;
    let mut by_module: std::collections::BTreeMap<String, Vec<(String, Tensor)>> = Default::default();
    for (key, t) in tensors {
        let Some(rest) = key.strip_prefix(PREFIX) else {
            return Err(format_err(&wpath, format!("tensor `{key}` is not named `{PREFIX}<module>.<adapter tensor>`")));
        };
        // Embedding / head copies and rows: read by `vocab` (checked against the config there).
        if super::vocab::VocabModule::of_key(rest).is_some() {
            has_vocab = true;
            continue;
        }
        let (module, leaf) = match cfg.adapter {
            AdapterConfig::Lora(ref l) => {
                // PEFT writes the magnitude as `lora_magnitude_vector`; some versions kept a `.weight` suffix.
                let magnitude = rest
                    .strip_suffix(".lora_magnitude_vector")
                    .or_else(|| rest.strip_suffix(".lora_magnitude_vector.weight"));
                match rest.strip_suffix(".lora_A.weight").or_else(|| rest.strip_suffix(".lora_B.weight")) {
                    Some(m) => (m.to_string(), rest[m.len() + 1..].to_string()),
                    None => match magnitude {
                        Some(m) if l.use_dora => (m.to_string(), "lora_magnitude_vector".to_string()),
                        Some(_) => {
                            let msg = format!(
                                "tensor `{key}` is a DoRA magnitude vector, but {CONFIG_FILE} does not set \
                                 use_dora: true"
                            );
                            return Err(format_err(&wpath, msg));
                        }
                        None => {
                            let what = match l.use_dora {
                                true => "lora_A / lora_B weight or a lora_magnitude_vector",
                                false => "lora_A / lora_B weight",
                            };
                            return Err(format_err(&wpath, format!("tensor `{key}` is not a {what}")));
                        }
                    },
                }
            }
            AdapterConfig::Ia3(_) => match rest.strip_suffix(".ia3_l") {
                Some(m) => (m.to_string(), "ia3_l".to_string()),
                None => return Err(format_err(&wpath, format!("tensor `{key}` is not an ia3_l vector"))),
            },
        };
        by_module.entry(module).or_default().push((leaf, t));
    }
    // The config must describe the tensors: a module it does not target would be adapted by peftkit but skipped by
    // PEFT (and the other way round), so a hand-edited or mixed-up folder is refused here, not silently trusted.
    let matcher = super::target_matcher(&cfg.adapter, usize::MAX)
        .map_err(|e| format_err(&dir.join(CONFIG_FILE), e.to_string()))?;
    if let Some(module) = by_module.keys().find(|m| !matcher.matches(m)) {
        return Err(format_err(
            &wpath,
            format!(
                "holds tensors for `{PREFIX}{module}`, which {CONFIG_FILE}'s target_modules / layers_to_transform / \
                 exclude_modules do not select: the config does not describe these weights"
            ),
        ));
    }
    let mut out = Vec::with_capacity(by_module.len());
    for (module, mut parts) in by_module {
        let adapter = match &cfg.adapter {
            AdapterConfig::Lora(lcfg) => {
                let mut take = |leaf: &str| parts.iter().position(|(l, _)| l == leaf).map(|i| parts.swap_remove(i).1);
                let (a, b) = match (take("lora_A.weight"), take("lora_B.weight")) {
                    (Some(a), Some(b)) => (a, b),
                    (None, None) => {
                        return Err(format_err(
                            &wpath,
                            format!("{PREFIX}{module} has a magnitude vector but no lora_A / lora_B"),
                        ))
                    }
                    _ => return Err(format_err(&wpath, format!("{module} has only one of lora_A / lora_B"))),
                };
                let a_key = format!("{PREFIX}{module}.lora_A.weight");
                if a.rank() != 2 || b.rank() != 2 || a.dims()[0] != b.dims()[1] {
                    return Err(format_err(
                        &wpath,
                        format!(
                            "{a_key}: lora_A (r × in) and lora_B (out × r) do not fit together: {:?} and {:?}",
                            a.dims(),
                            b.dims()
                        ),
                    ));
                }
                let r = a.dims()[0];
                let (config_r, alpha) = lcfg.rank_alpha(&module);
                if r != config_r {
                    return Err(format_err(
                        &wpath,
                        format!(
                            "{a_key}: rank {r} (shape {:?}), but {CONFIG_FILE} gives this module r = {config_r}{}",
                            a.dims(),
                            if lcfg.rank_pattern.is_empty() { "" } else { " (r and rank_pattern)" }
                        ),
                    ));
                }
                let lora = LoraLayer::from_weights(
                    a.to_device(device)?,
                    b.to_device(device)?,
                    lcfg.scaling(r, alpha),
                    lcfg.lora_dropout,
                )?;
                if lcfg.use_dora {
                    let m_key = format!("{PREFIX}{module}.lora_magnitude_vector");
                    let Some(m) = take("lora_magnitude_vector") else {
                        let msg = format!(
                            "`{m_key}` is missing: {CONFIG_FILE} sets use_dora: true, which needs a magnitude \
                             vector for every adapted module"
                        );
                        return Err(format_err(&wpath, msg));
                    };
                    let out = b.dims()[0];
                    // PEFT's magnitude is 1-D (out); accept an (out, 1) column too.
                    if m.elem_count() != out || !(m.rank() == 1 || (m.rank() == 2 && m.dims()[1] == 1)) {
                        return Err(format_err(
                            &wpath,
                            format!(
                                "{m_key}: shape {:?}, expected [{out}] (one magnitude per output row of lora_B {:?})",
                                m.dims(),
                                b.dims()
                            ),
                        ));
                    }
                    LayerAdapter::Dora(DoraLayer::from_weights(lora, m.to_device(device)?)?)
                } else {
                    LayerAdapter::Lora(lora)
                }
            }
            AdapterConfig::Ia3(icfg) => {
                let l = parts.pop().map(|(_, t)| t).expect("one ia3_l per module");
                let feedforward = icfg.feedforward_modules.matches(&module);
                let d = l.dims();
                let fits = d.len() == 2 && if feedforward { d[0] == 1 } else { d[1] == 1 };
                if !fits {
                    return Err(format_err(
                        &wpath,
                        format!(
                            "{PREFIX}{module}.ia3_l: shape {d:?}, expected {} for {} module",
                            if feedforward { "(1, in)" } else { "(out, 1)" },
                            if feedforward { "a feedforward (input-scaled)" } else { "an output-scaled" }
                        ),
                    ));
                }
                LayerAdapter::Ia3(Ia3Layer::from_weights(l.to_device(device)?, feedforward)?)
            }
        };
        out.push(LoadedAdapter { path: module, adapter });
    }
    if out.is_empty() && !has_vocab {
        return Err(format_err(&wpath, "holds no adapter tensor"));
    }
    if !has_vocab && !cfg.vocab.is_empty() {
        return Err(format_err(
            &wpath,
            "adapter_config.json names modules_to_save / trainable_token_indices, but the file holds none of their \
             tensors",
        ));
    }
    Ok((cfg, out))
}

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
    let matcher = super::target_matcher(&cfg.adapter, model.config.num_hidden_layers)
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
/// the original (unmodified) base model ([`super::pissa`]).
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
                let f = if convert && super::pissa::rewrites_base(l.init) { 2.0 } else { 1.0 };
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
            let converted = convert && super::pissa::rewrites_base(l.init);
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
            if let Some(super::LayerAdapter::Lora(LoraLayer { a, b, initial: Some(i), .. })) = &lin.adapter {
                let (a2, b2) = super::pissa::convert(a.as_tensor(), b.as_tensor(), i)?;
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

/// Writes f32 tensors with `{"format": "pt"}` metadata, atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), AdapterError> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| format_err(path, e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let meta: std::collections::HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| format_err(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename ([`crate::fsutil`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    crate::fsutil::write_atomic(path, bytes).map_err(|source| AdapterError::Io { path: path.to_path_buf(), source })
}

pub use crate::fsutil::{sync_dir, tmp_name};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{attach, Ia3Config};
    use crate::model::{load_llama_quant, BaseQuant};

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
            lora_dropout: 0.0,
            target_modules: TargetModules::AllLinear,
            use_rslora: false,
            init: LoraInit::Kaiming,
            layers_to_transform: layers,
            exclude_modules: exclude,
            layers_pattern: pattern,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            use_dora: false,
        }
    }

    fn write_config(dir: &Path, json: &str) {
        std::fs::write(dir.join(CONFIG_FILE), json).unwrap();
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
    fn target_keys_as_peft_writes_them_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let read = |json: &str| {
            write_config(dir.path(), json);
            read_config(dir.path())
        };
        // PEFT ≥ 0.17 writes nulls for the keys not used.
        let c = read(
            r#"{"peft_type": "LORA", "exclude_modules": null, "layers_pattern": null, "target_parameters": null}"#,
        )
        .unwrap();
        let AdapterConfig::Lora(l) = c.adapter else { panic!() };
        assert_eq!((l.exclude_modules, l.layers_pattern), (None, None));
        let c = read(
            r#"{"peft_type": "LORA", "exclude_modules": ["o_proj"], "layers_to_transform": 0,
                "layers_pattern": ["layers"], "target_parameters": []}"#,
        )
        .unwrap();
        let AdapterConfig::Lora(l) = c.adapter else { panic!() };
        assert_eq!(l.exclude_modules, Some(ExcludeModules::List(vec!["o_proj".into()])));
        assert_eq!(l.layers_to_transform, Some(vec![0]));
        assert_eq!(l.layers_pattern, Some(LayersPattern::List(vec!["layers".into()])));
        // empty exclusions exclude nothing
        let c = read(r#"{"peft_type": "IA3", "exclude_modules": ""}"#).unwrap();
        let AdapterConfig::Ia3(i) = c.adapter else { panic!() };
        assert_eq!(i.exclude_modules, None);
    }

    #[test]
    fn target_keys_peftkit_cannot_honour_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = |json: &str| {
            write_config(dir.path(), json);
            read_config(dir.path()).unwrap_err().to_string()
        };
        let e = err(r#"{"peft_type": "LORA", "target_parameters": ["feed_forward.experts.down_proj"]}"#);
        assert!(e.contains("target_parameters: [\"feed_forward.experts.down_proj\"]"), "{e}");
        assert!(e.contains("is not supported by peftkit") && e.contains(CONFIG_FILE), "{e}");
        let e = err(r#"{"peft_type": "LORA", "layers_to_transform": [0], "layers_pattern": "h"}"#);
        assert!(e.contains("layers_pattern: `h` is not supported by peftkit"), "{e}");
        let e = err(r#"{"peft_type": "LORA", "exclude_modules": "(q"}"#);
        assert!(e.contains("exclude_modules: invalid regex"), "{e}");
        let e = err(r#"{"peft_type": "IA3", "exclude_modules": 3}"#);
        assert!(e.contains("exclude_modules: expected"), "{e}");
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
