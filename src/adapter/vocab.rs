//! Trainable vocabulary matrices: PEFT's `modules_to_save` on the input embedding / output head (a full trainable
//! copy) and `trainable_token_indices` (PEFT ≥ 0.15's TrainableTokens: only chosen rows train).
//!
//! Both replace rows of a (vocab × hidden) matrix W, never add to them:
//! - a full copy C: W' = C (the embedding looks rows up in C; the head computes logits h·Cᵀ);
//! - trainable tokens with ids I and rows R (|I| × hidden): W'\[I\[j\]\] = R\[j\], every other row is W's. R starts as a
//!   copy of W\[I\] (PEFT's `trainable_tokens_delta` holds the new rows themselves, not a difference).
//!
//! Tied embeddings (SmolLM2): the head *is* the embedding. As PEFT does, trainable tokens on the embedding of a
//! tied model also act on the head (PEFT's "tied adapter": the same rows, saved once under the embedding's name),
//! so the model stays tied. A full copy of only one of the two unties them: the other keeps the base matrix, as
//! PEFT's `ModulesToSaveWrapper` leaves it (`ensure_weight_tying` false, PEFT's default), and a merge writes both
//! tensors with `tie_word_embeddings: false`.
//!
//! On-disk (PEFT `get_peft_model_state_dict`): a copy is `base_model.model.model.embed_tokens.weight` /
//! `base_model.model.lm_head.weight`; trainable rows are `base_model.model.<module>.token_adapter.trainable_tokens_delta`
//! with the ids in `adapter_config.json`'s `trainable_token_indices` (a list: the input embedding; or a map from
//! module name to ids). Reference: PEFT `utils/other.py` (`ModulesToSaveWrapper`, `TrainableTokensWrapper`),
//! `tuners/trainable_tokens/layer.py`.

use super::AdapterError;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};
use std::path::Path;

const PREFIX: &str = "base_model.model.";
const TOKENS_SUFFIX: &str = ".token_adapter.trainable_tokens_delta";

/// The two vocabulary matrices an adapter can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum VocabModule {
    /// `model.embed_tokens` (vocab, hidden).
    Embed,
    /// `lm_head` (vocab, hidden).
    Head,
}

impl VocabModule {
    /// PEFT matches module names by suffix: `embed_tokens`, `model.embed_tokens` and `lm_head` name these two.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "embed_tokens" | "model.embed_tokens" => Some(VocabModule::Embed),
            "lm_head" => Some(VocabModule::Head),
            _ => None,
        }
    }
    /// The name written in `adapter_config.json`.
    pub fn name(self) -> &'static str {
        match self {
            VocabModule::Embed => "embed_tokens",
            VocabModule::Head => "lm_head",
        }
    }
    /// The module path in the model.
    pub fn path(self) -> &'static str {
        match self {
            VocabModule::Embed => "model.embed_tokens",
            VocabModule::Head => "lm_head",
        }
    }
    /// The base model's tensor.
    pub fn base_tensor(self) -> String {
        format!("{}.weight", self.path())
    }
    /// PEFT's key of a full copy.
    pub fn copy_key(self) -> String {
        format!("{PREFIX}{}.weight", self.path())
    }
    /// PEFT's key of trainable rows.
    pub fn tokens_key(self) -> String {
        format!("{PREFIX}{}{TOKENS_SUFFIX}", self.path())
    }
    /// Which module an adapter tensor (its key without `base_model.model.`) belongs to, and whether it is a full
    /// copy (`true`) or trainable rows (`false`).
    pub fn of_key(rest: &str) -> Option<(Self, bool)> {
        for m in [VocabModule::Embed, VocabModule::Head] {
            if rest == format!("{}.weight", m.path()) {
                return Some((m, true));
            }
            if rest == format!("{}{TOKENS_SUFFIX}", m.path()) {
                return Some((m, false));
            }
        }
        None
    }
}

/// A recipe's `trainable_token_indices`: a list of ids (the input embedding, as PEFT reads a list) or a map from
/// module name (`embed_tokens`, `lm_head`) to ids.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenIndices {
    List(Vec<u32>),
    Map(Vec<(String, Vec<u32>)>),
}

impl TokenIndices {
    /// (module name, ids) pairs; a list belongs to `embed_tokens`.
    pub fn entries(&self) -> Vec<(&str, &[u32])> {
        match self {
            TokenIndices::List(ids) => vec![("embed_tokens", ids.as_slice())],
            TokenIndices::Map(m) => m.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect(),
        }
    }
}

/// Which vocabulary matrices an adapter trains, and how.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct VocabConfig {
    /// Full trainable copies (PEFT's `modules_to_save`).
    pub modules_to_save: Vec<VocabModule>,
    /// Trainable rows per module (PEFT's `trainable_token_indices`).
    pub trainable_tokens: Vec<(VocabModule, Vec<u32>)>,
}

impl VocabConfig {
    pub fn is_empty(&self) -> bool {
        self.modules_to_save.is_empty() && self.trainable_tokens.is_empty()
    }

    /// Reads `modules_to_save` and `trainable_token_indices` of an `adapter_config.json` object. Modules other
    /// than the embedding and the head are refused (peftkit has no other full-precision modules to train).
    pub fn from_peft_json(obj: &serde_json::Map<String, Value>, path: &Path) -> Result<Self, AdapterError> {
        let err = |msg: String| AdapterError::Format { path: path.to_path_buf(), msg };
        let mut cfg = VocabConfig::default();
        if let Some(v) = obj.get("modules_to_save").filter(|v| !v.is_null()) {
            let items = v.as_array().ok_or_else(|| err("modules_to_save: expected a list of module names".into()))?;
            for item in items {
                let name = item.as_str().ok_or_else(|| err("modules_to_save: expected strings".into()))?;
                let m = VocabModule::parse(name).ok_or_else(|| {
                    err(format!(
                        "modules_to_save: `{name}` is not supported by peftkit (supported: embed_tokens, lm_head)"
                    ))
                })?;
                if !cfg.modules_to_save.contains(&m) {
                    cfg.modules_to_save.push(m);
                }
            }
        }
        let ids_of = |key: &str, v: &Value| -> Result<Vec<u32>, AdapterError> {
            v.as_array()
                .and_then(|a| a.iter().map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok())).collect())
                .ok_or_else(|| err(format!("{key}: expected a list of token ids")))
        };
        match obj.get("trainable_token_indices").filter(|v| !v.is_null()) {
            None => {}
            Some(v @ Value::Array(_)) => {
                cfg.trainable_tokens.push((VocabModule::Embed, ids_of("trainable_token_indices", v)?))
            }
            Some(Value::Object(map)) => {
                for (name, v) in map {
                    let key = format!("trainable_token_indices.{name}");
                    let m = VocabModule::parse(name).ok_or_else(|| {
                        err(format!("{key}: module `{name}` is not supported by peftkit (embed_tokens, lm_head)"))
                    })?;
                    cfg.trainable_tokens.push((m, ids_of(&key, v)?));
                }
            }
            Some(_) => return Err(err("trainable_token_indices: expected a list of ids or a map module → ids".into())),
        }
        Ok(cfg)
    }
}

/// The trainable part of one vocabulary matrix.
#[derive(Debug, Clone)]
pub enum VocabAdapter {
    /// A full copy (vocab, hidden), f32.
    Full(Var),
    /// Rows `indices` replaced by `rows` (|indices|, hidden), f32.
    Tokens { indices: Vec<u32>, rows: Var },
}

impl VocabAdapter {
    /// The matrix with this adapter applied to `base` (vocab, hidden), in f32, differentiable in the adapter's
    /// variable unless `no_grad`.
    pub fn weight(&self, base: &Tensor, no_grad: bool) -> candle_core::Result<Tensor> {
        match self {
            VocabAdapter::Full(v) => Ok(if no_grad { v.as_tensor().detach() } else { v.as_tensor().clone() }),
            VocabAdapter::Tokens { indices, rows } => {
                let vocab = base.dims2()?.0;
                let (map, mask) = row_map(indices, (0..vocab as u32).collect::<Vec<_>>().as_slice(), base.device())?;
                mix(&base.detach().to_dtype(DType::F32)?, rows, &map, &mask, no_grad)
            }
        }
    }

    /// Rows of the adapted matrix for the token ids `ids` (n,) → (n, hidden) f32, without building the whole
    /// matrix for trainable tokens.
    pub fn lookup(&self, base: &Tensor, ids: &Tensor, no_grad: bool) -> candle_core::Result<Tensor> {
        match self {
            VocabAdapter::Full(_) => self.weight(base, no_grad)?.index_select(ids, 0),
            VocabAdapter::Tokens { indices, rows } => {
                let ids_v: Vec<u32> = ids.to_dtype(DType::U32)?.to_vec1()?;
                let (map, mask) = row_map(indices, &ids_v, base.device())?;
                let base_rows = base.index_select(ids, 0)?.detach().to_dtype(DType::F32)?;
                mix(&base_rows, rows, &map, &mask, no_grad)
            }
        }
    }
}

/// For each id of `ids`: the position of that id in `indices` (0 when absent) and 1.0 if present, else 0.0.
fn row_map(indices: &[u32], ids: &[u32], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let pos: std::collections::HashMap<u32, u32> = indices.iter().enumerate().map(|(j, &i)| (i, j as u32)).collect();
    let map: Vec<u32> = ids.iter().map(|i| pos.get(i).copied().unwrap_or(0)).collect();
    let mask: Vec<f32> = ids.iter().map(|i| if pos.contains_key(i) { 1.0 } else { 0.0 }).collect();
    let n = ids.len();
    Ok((Tensor::from_vec(map, n, device)?, Tensor::from_vec(mask, (n, 1), device)?))
}

/// base ⊙ (1 − mask) + rows\[map\] ⊙ mask: (n, hidden) f32.
fn mix(base: &Tensor, rows: &Var, map: &Tensor, mask: &Tensor, no_grad: bool) -> candle_core::Result<Tensor> {
    let rows = if no_grad { rows.as_tensor().detach() } else { rows.as_tensor().clone() };
    let picked = rows.index_select(map, 0)?; // (n, hidden)
    let keep = mask.affine(-1.0, 1.0)?; // 1 − mask, (n, 1)
    base.broadcast_mul(&keep)? + picked.broadcast_mul(mask)?
}

/// The vocabulary adapters attached to a model.
#[derive(Debug, Clone, Default)]
pub struct VocabAdapters {
    pub embed: Option<VocabAdapter>,
    pub head: Option<VocabAdapter>,
    /// The head's adapter is the embedding's (tied embeddings with trainable tokens): not saved on its own.
    pub head_tied: bool,
}

impl VocabAdapters {
    pub fn is_empty(&self) -> bool {
        self.embed.is_none() && self.head.is_none()
    }

    /// The config that describes these adapters (what `adapter_config.json` records).
    pub fn config(&self) -> VocabConfig {
        let mut cfg = VocabConfig::default();
        for (m, a) in [(VocabModule::Embed, &self.embed), (VocabModule::Head, &self.head)] {
            if m == VocabModule::Head && self.head_tied {
                continue;
            }
            match a {
                Some(VocabAdapter::Full(_)) => cfg.modules_to_save.push(m),
                Some(VocabAdapter::Tokens { indices, .. }) => cfg.trainable_tokens.push((m, indices.clone())),
                None => {}
            }
        }
        cfg
    }

    /// The trainable variables with their PEFT tensor names (a tied head's rows are the embedding's: listed once).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (m, a) in [(VocabModule::Embed, &self.embed), (VocabModule::Head, &self.head)] {
            if m == VocabModule::Head && self.head_tied {
                continue;
            }
            match a {
                Some(VocabAdapter::Full(v)) => out.push((m.copy_key(), v.clone())),
                Some(VocabAdapter::Tokens { rows, .. }) => out.push((m.tokens_key(), rows.clone())),
                None => {}
            }
        }
        out
    }

    /// What trains, for messages: `embed_tokens (full copy), lm_head (2 rows)`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (m, a) in [(VocabModule::Embed, &self.embed), (VocabModule::Head, &self.head)] {
            match a {
                Some(_) if m == VocabModule::Head && self.head_tied => {
                    parts.push("lm_head (tied: the embedding's rows)".to_string())
                }
                Some(VocabAdapter::Full(_)) => parts.push(format!("{} (full copy)", m.name())),
                Some(VocabAdapter::Tokens { indices, .. }) => {
                    parts.push(format!("{} ({} token rows)", m.name(), indices.len()))
                }
                None => {}
            }
        }
        parts.join(", ")
    }

    /// Number of trainable parameters.
    pub fn param_count(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

impl VocabConfig {
    /// `adapter_config.json`'s `modules_to_save` value (null when none).
    pub fn modules_to_save_json(&self) -> Value {
        if self.modules_to_save.is_empty() {
            Value::Null
        } else {
            json!(self.modules_to_save.iter().map(|m| m.name()).collect::<Vec<_>>())
        }
    }
    /// `adapter_config.json`'s `trainable_token_indices`: a list for the embedding alone, else a map (None when
    /// there are none: the key is left out, so that PEFT < 0.15 still loads the adapter).
    pub fn trainable_token_indices_json(&self) -> Option<Value> {
        match &self.trainable_tokens[..] {
            [] => None,
            [(VocabModule::Embed, ids)] => Some(json!(ids)),
            all => Some(Value::Object(all.iter().map(|(m, ids)| (m.name().to_string(), json!(ids))).collect())),
        }
    }
}

fn err(path: &Path, msg: impl Into<String>) -> AdapterError {
    AdapterError::Format { path: path.to_path_buf(), msg: msg.into() }
}

/// Checks token ids against a vocabulary of `vocab` rows: in range and without duplicates.
pub fn check_ids(ids: &[u32], vocab: usize, what: &Path, module: &str) -> Result<(), AdapterError> {
    if ids.is_empty() {
        return Err(err(what, format!("trainable_token_indices.{module}: no token ids")));
    }
    let mut seen = std::collections::HashSet::new();
    for &i in ids {
        if i as usize >= vocab {
            return Err(err(
                what,
                format!("trainable_token_indices.{module}: token id {i} is outside the vocabulary of {vocab} tokens"),
            ));
        }
        if !seen.insert(i) {
            return Err(err(what, format!("trainable_token_indices.{module}: token id {i} is listed twice")));
        }
    }
    Ok(())
}

/// Every vocabulary tensor of the file must be announced by the config (`modules_to_save` for a copy,
/// `trainable_token_indices` for rows): an unannounced one would be silently ignored by PEFT.
pub(crate) fn check_announced(
    tensors: &[(String, Tensor)],
    cfg: &VocabConfig,
    wpath: &Path,
) -> Result<(), AdapterError> {
    for (key, _) in tensors {
        let Some((m, full)) = key.strip_prefix(PREFIX).and_then(VocabModule::of_key) else { continue };
        let announced =
            if full { cfg.modules_to_save.contains(&m) } else { cfg.trainable_tokens.iter().any(|(t, _)| *t == m) };
        if !announced {
            let setting = if full { "modules_to_save" } else { "trainable_token_indices" };
            return Err(err(wpath, format!("tensor `{key}` is not announced by {setting} in adapter_config.json")));
        }
    }
    Ok(())
}

/// The vocabulary tensors of an adapter file (only those: the rest is read by [`super::peft_format`]).
pub(crate) fn read_tensors(wpath: &Path) -> Result<Vec<(String, Tensor)>, AdapterError> {
    // SAFETY: read-only map of a file peftkit does not modify while it is open.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(wpath) }
        .map_err(|e| err(wpath, format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    for (name, _) in st.tensors() {
        if name.strip_prefix(PREFIX).and_then(VocabModule::of_key).is_some() {
            let t = st.load(&name, &Device::Cpu).map_err(|e| err(wpath, format!("`{name}`: {e}")))?;
            out.push((name, t));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The output tensors a merge writes for the vocabulary adapters of a folder: for each base tensor name, the
/// adapter to apply. Used by `peftkit merge` (see [`crate::merge`]).
#[derive(Debug, Clone)]
pub struct LoadedVocab {
    pub module: VocabModule,
    pub adapter: VocabAdapter,
}

/// Reads the vocabulary adapters of a folder without a model (for `peftkit merge`): `vocab` is the base's
/// vocabulary size (ids are checked against the larger of it and the adapter's own).
pub fn read_for_merge(dir: &Path, cfg: &VocabConfig, vocab: usize) -> Result<Vec<LoadedVocab>, AdapterError> {
    let wpath = dir.join(super::peft_format::WEIGHTS_FILE);
    let tensors = read_tensors(&wpath)?;
    check_announced(&tensors, cfg, &wpath)?;
    if cfg.is_empty() {
        return Ok(vec![]);
    }
    let get = |key: &str| {
        tensors
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| err(&wpath, format!("tensor `{key}` is missing (adapter_config.json announces it)")))
    };
    let mut out = Vec::new();
    for &m in &cfg.modules_to_save {
        let t = get(&m.copy_key())?.to_dtype(DType::F32)?;
        if t.rank() != 2 {
            return Err(err(&wpath, format!("`{}`: shape {:?}, expected (vocab, hidden)", m.copy_key(), t.dims())));
        }
        out.push(LoadedVocab { module: m, adapter: VocabAdapter::Full(Var::from_tensor(&t)?) });
    }
    let grown = out
        .iter()
        .filter_map(|l| match &l.adapter {
            VocabAdapter::Full(v) => v.dims().first().copied(),
            _ => None,
        })
        .max()
        .unwrap_or(0)
        .max(super::super::tokens::saved_vocab_size(dir).unwrap_or(0))
        .max(vocab);
    for (m, ids) in &cfg.trainable_tokens {
        check_ids(ids, grown, &dir.join(super::peft_format::CONFIG_FILE), m.name())?;
        let key = m.tokens_key();
        let t = get(&key)?.to_dtype(DType::F32)?;
        if t.dims().len() != 2 || t.dims()[0] != ids.len() {
            return Err(err(&wpath, format!("`{key}`: shape {:?}, expected ({}, hidden)", t.dims(), ids.len())));
        }
        out.push(LoadedVocab {
            module: *m,
            adapter: VocabAdapter::Tokens { indices: ids.clone(), rows: Var::from_tensor(&t)? },
        });
    }
    Ok(out)
}

/// The vocabulary size after applying `loaded` to a base of `vocab` rows (growth by added tokens).
pub fn merged_vocab(loaded: &[LoadedVocab], vocab: usize, dir: &Path) -> usize {
    let mut v = vocab;
    for l in loaded {
        match &l.adapter {
            VocabAdapter::Full(c) => v = v.max(c.dims().first().copied().unwrap_or(0)),
            VocabAdapter::Tokens { indices, .. } => {
                if let Some(&m) = indices.iter().max() {
                    if m as usize >= v {
                        v = v.max(m as usize + 1).max(super::super::tokens::saved_vocab_size(dir).unwrap_or(0));
                    }
                }
            }
        }
    }
    v
}

/// `base` (vocab, hidden), grown to `vocab` rows by mean rows ([`crate::peft_model::vocab::resize_vocab`]'s rule), with `a` applied; f32.
pub fn apply_to_base(base: &Tensor, a: &VocabAdapter, vocab: usize) -> candle_core::Result<Tensor> {
    a.weight(&grow_rows(base, vocab)?, true)
}

/// `base` (v, hidden) in f32, with rows equal to the mean of its rows appended up to `vocab` rows (as
/// [`crate::peft_model::vocab::resize_vocab`] grows a model).
pub fn grow_rows(base: &Tensor, vocab: usize) -> candle_core::Result<Tensor> {
    let base = base.to_dtype(DType::F32)?;
    let (v, _) = base.dims2()?;
    if vocab <= v {
        return Ok(base);
    }
    let mean = base.mean_keepdim(0)?; // (1, hidden)
    Tensor::cat(&[&base, &mean.repeat((vocab - v, 1))?], 0)
}

/// Next-token cross-entropy through a trainable head `w` (vocab, hidden): Σ over labelled rows of
/// −log softmax(h·wᵀ)\[label\], divided by `denom`; composed from candle's differentiable ops (gradients reach both
/// h and w). Only the labelled rows' logits are formed: (n_labelled, vocab) f32.
pub fn cross_entropy(h: &Tensor, w: &Tensor, labels: &[i64], denom: f64) -> candle_core::Result<Tensor> {
    let vocab = w.dims2()?.0;
    let rows: Vec<u32> = labels.iter().enumerate().filter(|(_, &l)| l >= 0).map(|(i, _)| i as u32).collect();
    if rows.is_empty() {
        return (h.to_dtype(DType::F32)?.sum_all()? * 0.0)?.to_dtype(DType::F32);
    }
    let tgt: Vec<u32> = rows.iter().map(|&i| labels[i as usize] as u32).collect();
    if let Some(&bad) = tgt.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("label {bad} is outside the vocabulary ({vocab})");
    }
    let dev = h.device();
    let sel = h.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?.to_dtype(DType::F32)?; // (n, hidden)
    let logits = sel.matmul(&w.to_dtype(DType::F32)?.t()?)?; // (n, vocab)
    let lsm = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
    let picked = lsm.gather(&Tensor::new(tgt.as_slice(), dev)?.unsqueeze(1)?, 1)?; // (n, 1)
    picked.sum_all()?.neg()? / denom
}
