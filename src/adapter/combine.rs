//! A weighted combination of LoRA adapters, written as a new adapter: PEFT's `add_weighted_adapter`
//! (`tuners/lora/model.py`) with `combination_type` `linear`, `cat` or `svd`.
//!
//! For adapters i with weight wᵢ and scaling sᵢ (lora_alpha / r, or / √r with rsLoRA) on a projection:
//! - `linear` (equal ranks): A = Σ sgn(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ. Not Σ wᵢsᵢ·BᵢAᵢ (the cross terms
//!   remain): PEFT calls it a rough approximation, and so it is, exactly as PEFT computes it.
//! - `cat`: A = [w₁s₁·A₁; w₂s₂·A₂; …], B = [B₁ B₂ …], so B·A = Σ wᵢsᵢ·BᵢAᵢ exactly; the rank is the sum of the
//!   adapters' ranks (rows and columns beyond a projection's own adapters are zero).
//! - `svd`: Δ = Σ wᵢsᵢ·BᵢAᵢ truncated to rank R (`svd_rank`, else the largest rank): B = U_R·diag(σ_R),
//!   A = V_Rᵀ (see [`super::lowrank_svd`]; PEFT's `svd_clamp` is not offered).
//!
//! A projection only some adapters adapt combines those. The new config is the first adapter's with r = lora_alpha,
//! the new rank (so s = 1 without rsLoRA), empty rank/alpha patterns, and target_modules the union of the
//! adapters' (a list of names; regex strings are joined as `(a)|(b)`), as PEFT writes it.
//! Only plain LoRA adapters combine: DoRA, IA3, modules_to_save and trainable tokens are refused.

use super::peft_format::{read_adapter, save_safetensors, write_atomic, CONFIG_FILE, WEIGHTS_FILE};
use super::{AdapterConfig, AdapterError, LayerAdapter, TargetModules};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// PEFT's `combination_type`s that peftkit computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Svd,
}

impl std::str::FromStr for Combination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Self::Linear),
            "cat" => Ok(Self::Cat),
            "svd" => Ok(Self::Svd),
            "ties"
            | "ties_svd"
            | "dare_ties"
            | "dare_linear"
            | "dare_ties_svd"
            | "dare_linear_svd"
            | "magnitude_prune"
            | "magnitude_prune_svd" => {
                Err(format!("combination `{s}` is not supported by peftkit yet (supported: linear, cat, svd)"))
            }
            _ => Err(format!("unknown combination `{s}` (supported: linear, cat, svd)")),
        }
    }
}

/// A combined adapter, ready to be saved.
#[derive(Debug)]
pub struct Combined {
    /// `adapter_config.json`.
    pub config: Map<String, Value>,
    /// PEFT keys → f32 tensors, sorted by key.
    pub tensors: Vec<(String, Tensor)>,
    /// The new r.
    pub rank: usize,
    /// The combination actually used (PEFT uses `linear` for a single adapter).
    pub combination: Combination,
    /// Projections adapted.
    pub modules: usize,
}

fn err(path: &Path, msg: impl Into<String>) -> AdapterError {
    AdapterError::Format { path: path.to_path_buf(), msg: msg.into() }
}

/// One input adapter's facts.
struct Input {
    dir: PathBuf,
    raw: Map<String, Value>,
    /// `r`, or the largest of r and the rank pattern (what PEFT sizes the new adapter by).
    rank: usize,
    targets: TargetModules,
    /// Module path → (A (r, in), B (out, r), scaling).
    layers: BTreeMap<String, (Tensor, Tensor, f64)>,
}

fn read_input(dir: &Path) -> Result<Input, AdapterError> {
    let (cfg, loaded) = read_adapter(dir, &Device::Cpu)?;
    let cpath = dir.join(CONFIG_FILE);
    let lora = match &cfg.adapter {
        AdapterConfig::Lora(l) if !l.use_dora => l,
        AdapterConfig::Lora(_) => {
            return Err(err(&cpath, "use_dora: DoRA adapters cannot be combined by peftkit (plain LoRA only)"))
        }
        AdapterConfig::Ia3(_) => return Err(err(&cpath, "peft_type IA3: only LoRA adapters can be combined")),
    };
    if !cfg.vocab.is_empty() {
        return Err(err(
            &cpath,
            "modules_to_save / trainable_token_indices: adapters with their own embedding or head rows cannot be \
             combined by peftkit (LoRA projections only)",
        ));
    }
    let text = std::fs::read_to_string(&cpath).map_err(|source| AdapterError::Io { path: cpath.clone(), source })?;
    let raw = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => m,
        _ => return Err(err(&cpath, "expected a JSON object")),
    };
    let rank = lora.rank_pattern.iter().map(|(_, r)| *r).fold(lora.r, usize::max);
    let mut layers = BTreeMap::new();
    for l in loaded {
        let LayerAdapter::Lora(x) = l.adapter else { continue };
        layers.insert(l.path, (x.a.as_tensor().clone(), x.b.as_tensor().clone(), x.scaling));
    }
    Ok(Input { dir: dir.to_path_buf(), raw, rank, targets: lora.target_modules.clone(), layers })
}

/// Combines the adapters in `dirs` with `weights` as PEFT's `add_weighted_adapter` does (see the module docs).
/// `svd_rank` applies to `svd` only.
pub fn combine(
    dirs: &[PathBuf],
    weights: &[f64],
    combination: Combination,
    svd_rank: Option<usize>,
) -> Result<Combined, AdapterError> {
    let first = dirs.first().ok_or_else(|| err(Path::new("."), "no adapter to combine"))?;
    if weights.len() != dirs.len() {
        return Err(err(first, format!("{} adapters but {} weights", dirs.len(), weights.len())));
    }
    let inputs = dirs.iter().map(|d| read_input(d)).collect::<Result<Vec<_>, _>>()?;
    // PEFT: a single adapter can only be combined linearly.
    let combination = if inputs.len() == 1 { Combination::Linear } else { combination };
    let ranks: Vec<usize> = inputs.iter().map(|i| i.rank).collect();
    let rank = match combination {
        Combination::Linear => {
            if ranks.iter().any(|r| *r != ranks[0]) {
                let list = inputs.iter().map(|i| format!("{} (r={})", i.dir.display(), i.rank)).collect::<Vec<_>>();
                return Err(err(
                    first,
                    format!(
                        "the linear combination needs adapters of one rank, got {}; use cat or svd",
                        list.join(", ")
                    ),
                ));
            }
            ranks[0]
        }
        Combination::Cat => ranks.iter().sum(),
        Combination::Svd => match svd_rank {
            Some(0) => return Err(err(first, "the SVD rank must be at least 1")),
            Some(r) => r,
            None => ranks.iter().copied().max().unwrap_or(1),
        },
    };
    let target_modules = union_targets(&inputs)?;

    // Every projection any adapter adapts, in a stable order.
    let mut modules: Vec<&String> = inputs.iter().flat_map(|i| i.layers.keys()).collect();
    modules.sort();
    modules.dedup();
    let mut tensors = Vec::with_capacity(2 * modules.len());
    for module in &modules {
        let parts: Vec<(&Input, f64)> =
            inputs.iter().zip(weights).filter(|(i, _)| i.layers.contains_key(*module)).map(|(i, w)| (i, *w)).collect();
        let key = |leaf: &str| format!("base_model.model.{module}.{leaf}.weight");
        let (a, b) = match combination {
            Combination::Linear => linear(&parts, module)?,
            Combination::Cat => cat(&parts, module, rank)?,
            Combination::Svd => svd(&parts, module, rank)?,
        };
        tensors.push((key("lora_A"), a));
        tensors.push((key("lora_B"), b));
    }

    let mut config = inputs[0].raw.clone();
    config.insert("r".into(), json!(rank));
    config.insert("lora_alpha".into(), json!(rank));
    config.insert("target_modules".into(), target_modules);
    config.insert("rank_pattern".into(), json!({}));
    config.insert("alpha_pattern".into(), json!({}));
    config.insert("inference_mode".into(), json!(true));
    Ok(Combined { config, tensors, rank, combination, modules: modules.len() })
}

/// The new adapter's `target_modules`: the union of the names (sorted), or the regexes joined as `(a)|(b)`.
fn union_targets(inputs: &[Input]) -> Result<Value, AdapterError> {
    let regexes: Vec<&str> = inputs
        .iter()
        .filter_map(|i| match &i.targets {
            TargetModules::Regex(r) => Some(r.as_str()),
            _ => None,
        })
        .collect();
    if regexes.len() == inputs.len() {
        return Ok(json!(regexes.iter().map(|r| format!("({r})")).collect::<Vec<_>>().join("|")));
    }
    if !regexes.is_empty() {
        return Err(err(
            &inputs[0].dir,
            "target_modules: the adapters mix a regex string with lists of names, which PEFT cannot combine either",
        ));
    }
    let mut names: Vec<String> = Vec::new();
    for i in inputs {
        match &i.targets {
            TargetModules::List(l) => names.extend(l.iter().cloned()),
            // PEFT resolves `all-linear` to the adapted projections' names when it loads the adapter.
            _ => names.extend(i.layers.keys().filter_map(|p| p.rsplit('.').next().map(str::to_string))),
        }
    }
    names.sort();
    names.dedup();
    Ok(json!(names))
}

/// PEFT's `linear`: A = Σ sgn(ws)·√|ws|·Aᵢ, B = Σ √|ws|·Bᵢ.
fn linear(parts: &[(&Input, f64)], module: &str) -> Result<(Tensor, Tensor), AdapterError> {
    let mut acc: Option<(Tensor, Tensor)> = None;
    for (input, w) in parts {
        let (a, b, s) = &input.layers[module];
        let ws = w * s;
        let root = ws.abs().sqrt();
        let (a, b) = ((a.to_dtype(DType::F64)? * (ws.signum() * root))?, (b.to_dtype(DType::F64)? * root)?);
        acc = Some(match acc {
            None => (a, b),
            Some((sa, sb)) => {
                if sa.dims() != a.dims() || sb.dims() != b.dims() {
                    return Err(err(
                        &input.dir,
                        format!(
                            "base_model.model.{module}.lora_A.weight: rank {} here but {} in the adapters before; \
                             the linear combination needs one rank per projection (use cat or svd)",
                            a.dims()[0],
                            sa.dims()[0]
                        ),
                    ));
                }
                ((sa + a)?, (sb + b)?)
            }
        });
    }
    let (a, b) = acc.ok_or_else(|| err(Path::new(module), "no adapter for this projection"))?;
    Ok((a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?))
}

/// PEFT's `cat`: A = \[wᵢsᵢ·Aᵢ\] stacked by rows, B = \[Bᵢ\] by columns, zero-padded to `rank`.
fn cat(parts: &[(&Input, f64)], module: &str, rank: usize) -> Result<(Tensor, Tensor), AdapterError> {
    let mut a_rows = Vec::new();
    let mut b_cols = Vec::new();
    for (input, w) in parts {
        let (a, b, s) = &input.layers[module];
        a_rows.push((a.to_dtype(DType::F64)? * (w * s))?);
        b_cols.push(b.to_dtype(DType::F64)?);
    }
    let a = Tensor::cat(&a_rows, 0)?; // (Σr, in)
    let b = Tensor::cat(&b_cols, 1)?; // (out, Σr)
    let used = a.dims()[0];
    let (a, b) = if used < rank {
        let (in_f, out_f) = (a.dims()[1], b.dims()[0]);
        let za = Tensor::zeros((rank - used, in_f), DType::F64, &Device::Cpu)?;
        let zb = Tensor::zeros((out_f, rank - used), DType::F64, &Device::Cpu)?;
        (Tensor::cat(&[a, za], 0)?, Tensor::cat(&[b, zb], 1)?)
    } else {
        (a, b)
    };
    Ok((a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?))
}

/// PEFT's `svd`: the rank-`rank` truncation of Σ wᵢsᵢ·BᵢAᵢ, B = U·diag(σ), A = Vᵀ.
fn svd(parts: &[(&Input, f64)], module: &str, rank: usize) -> Result<(Tensor, Tensor), AdapterError> {
    // Δ = P·Q with P = [w₁s₁·B₁ …] (out, k) and Q = [A₁; …] (k, in).
    let mut p_cols = Vec::new();
    let mut q_rows = Vec::new();
    for (input, w) in parts {
        let (a, b, s) = &input.layers[module];
        p_cols.push((b.to_dtype(DType::F64)? * (w * s))?);
        q_rows.push(a.to_dtype(DType::F64)?);
    }
    let p = Tensor::cat(&p_cols, 1)?; // (out, k)
    let q = Tensor::cat(&q_rows, 0)?; // (k, in)
    let (m, k) = p.dims2()?;
    let n = q.dims2()?.1;
    if rank > m.min(n) {
        return Err(err(
            Path::new(module),
            format!("the SVD rank {rank} exceeds the projection's smaller dimension {}", m.min(n)),
        ));
    }
    let pv: Vec<f64> = p.flatten_all()?.to_vec1()?;
    let qv: Vec<f64> = q.flatten_all()?.to_vec1()?;
    let (us, vt, _) = super::lowrank_svd::truncated_svd(&pv, &qv, m, k, n, rank)
        .map_err(|source| AdapterError::LowRankSvd { module: module.to_string(), source })?;
    let b = Tensor::from_vec(us, (m, rank), &Device::Cpu)?.to_dtype(DType::F32)?;
    let a = Tensor::from_vec(vt, (rank, n), &Device::Cpu)?.to_dtype(DType::F32)?;
    Ok((a, b))
}

/// Writes the combined adapter as a PEFT folder (`adapter_model.safetensors`, then `adapter_config.json`, each
/// atomically).
pub fn save(c: &Combined, dir: &Path) -> Result<(), AdapterError> {
    std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io { path: dir.into(), source })?;
    save_safetensors(&dir.join(WEIGHTS_FILE), &c.tensors)?;
    let text = serde_json::to_string_pretty(&Value::Object(c.config.clone())).map_err(|e| err(dir, e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}
