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
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub(crate) const PREFIX: &str = "base_model.model.";

pub(crate) fn format_err(path: &Path, msg: impl Into<String>) -> AdapterError {
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

pub(crate) fn exclude_to_json(e: &ExcludeModules) -> Value {
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

pub(crate) fn target_to_json(t: &TargetModules) -> Value {
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

    fn write_config(dir: &Path, json: &str) {
        std::fs::write(dir.join(CONFIG_FILE), json).unwrap();
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
}
