//! `modules_to_save` / `trainable_token_indices` in a merge: the embedding and the head of the merged model.
//!
//! A full copy replaces the base matrix; trained rows are written into it; a vocabulary grown by added tokens first
//! grows the base matrix by mean rows (transformers' `resize_token_embeddings`; those rows are then replaced by the
//! trained ones). A base with tied embeddings whose adapter trains a copy of only one of the two matrices comes out
//! untied, as PEFT's `merge_and_unload()` leaves it: `lm_head.weight` is written (the base embedding, or the trained
//! head) and `config.json` gets `tie_word_embeddings: false`. Trained rows on a tied embedding keep the model tied.

// `MergeError` is large, as in the rest of `merge` (its variants carry paths and tensor names).
#![allow(clippy::result_large_err)]

use super::base::Base;
use super::options::{MergeError, OutDtype};
use super::plan::{Fetch, Planned};
use crate::adapter::vocab::{apply_to_base, grow_rows, LoadedVocab, VocabAdapter, VocabModule};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};

/// How an embedding / head tensor of the merged model is computed.
#[derive(Debug, Clone)]
pub(super) struct VocabOp {
    /// The base tensor read (the embedding, for an untied head made from a tied base).
    pub(super) read: String,
    pub(super) read_shape: Vec<usize>,
    /// Applied after growing to the output's rows (None: the base rows, grown).
    pub(super) adapter: Option<VocabAdapter>,
}

impl VocabOp {
    /// The tensor in f32: read, grown to `rows`, the adapter applied.
    pub(super) fn compute(&self, src: &dyn crate::model::TensorSource, rows: usize) -> Result<Tensor, MergeError> {
        let terr = |source: candle_core::Error| MergeError::Tensor { name: self.read.clone(), source };
        let t = src.get(&self.read, &self.read_shape, DType::F32, &candle_core::Device::Cpu)?;
        match &self.adapter {
            Some(a) => apply_to_base(&t, a, rows),
            // No adapter: the base rows, grown by mean rows for added tokens.
            None => grow_rows(&t, rows),
        }
        .map_err(terr)
    }
}

/// What the vocabulary adapters did to the model's shape and tying.
pub(super) struct VocabPlan {
    /// The merged model's vocabulary size.
    pub(super) vocab: usize,
    /// The base was tied and the merged model is not.
    pub(super) untied: bool,
}

/// Sets the embedding / head entries of `plan` as `loaded` says, adds `lm_head.weight` when the merge unties the
/// model; returns the merged vocabulary and tying.
pub(super) fn plan_vocab(
    plan: &mut Vec<Planned>,
    base: &Base,
    loaded: &[LoadedVocab],
    vocab: usize,
    dtype: OutDtype,
    file: &std::path::Path,
) -> Result<VocabPlan, MergeError> {
    let base_vocab = base.config.get("vocab_size").and_then(Value::as_u64).unwrap_or(0) as usize;
    let tied = base.config.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false)
        || !base.tensors.iter().any(|t| t.name == "lm_head.weight");
    if loaded.is_empty() && vocab <= base_vocab {
        return Ok(VocabPlan { vocab: base_vocab, untied: false });
    }
    let of = |m: VocabModule| loaded.iter().find(|l| l.module == m).map(|l| l.adapter.clone());
    let (embed, head) = (of(VocabModule::Embed), of(VocabModule::Head));
    // Trained rows on a tied embedding serve the head too; anything else on one of two tied matrices unties them.
    let head_follows = tied && head.is_none() && matches!(embed, Some(VocabAdapter::Tokens { .. }) | None);
    let untied = tied && !head_follows;
    let embed_name = VocabModule::Embed.base_tensor();
    let head_name = VocabModule::Head.base_tensor();
    let Some(pos) = plan.iter().position(|p| p.name == embed_name) else {
        return Err(MergeError::Mismatch {
            file: file.to_path_buf(),
            tensor: embed_name.clone(),
            msg: format!("the base {} has no `{embed_name}`", base.name),
        });
    };
    let hidden = plan[pos].shape.get(1).copied().unwrap_or(0);
    // Shapes from the adapter file against the base's (and the merged vocabulary).
    for l in loaded {
        let (key, dims, want) = match &l.adapter {
            VocabAdapter::Full(c) => (l.module.copy_key(), c.dims().to_vec(), vec![vocab, hidden]),
            VocabAdapter::Tokens { indices, rows } => {
                (l.module.tokens_key(), rows.dims().to_vec(), vec![indices.len(), hidden])
            }
        };
        if dims != want {
            return Err(MergeError::Mismatch {
                file: file.to_path_buf(),
                tensor: key,
                msg: format!("shape {dims:?}, expected {want:?} for the base {} (hidden size {hidden})", base.name),
            });
        }
    }
    let read_shape = plan[pos].shape.clone();
    plan[pos].shape = vec![vocab, hidden];
    plan[pos].dtype = dtype.dtype();
    plan[pos].fetch = Fetch::Stored;
    plan[pos].vocab = Some(VocabOp { read: embed_name.clone(), read_shape: read_shape.clone(), adapter: embed });
    if let Some(h) = plan.iter_mut().find(|p| p.name == head_name) {
        let head_shape = h.shape.clone();
        h.shape = vec![vocab, hidden];
        h.dtype = dtype.dtype();
        h.vocab = Some(VocabOp { read: head_name.clone(), read_shape: head_shape, adapter: head });
    } else if untied {
        // The tied base has no head tensor: the merged model gets one (the base embedding, or the trained head).
        plan.insert(
            pos + 1,
            Planned {
                name: head_name,
                shape: vec![vocab, hidden],
                dtype: dtype.dtype(),
                fetch: Fetch::Stored,
                merge: None,
                vocab: Some(VocabOp { read: embed_name, read_shape, adapter: head }),
            },
        );
    }
    Ok(VocabPlan { vocab, untied })
}

/// `config.json` for the merged model after [`plan_vocab`].
pub(super) fn patch_config(config: &mut Value, vp: &VocabPlan) {
    if let Some(obj) = config.as_object_mut() {
        obj.insert("vocab_size".into(), json!(vp.vocab));
        if vp.untied {
            obj.insert("tie_word_embeddings".into(), json!(false));
        }
    }
}

/// The merged card's sentence on the embedding and the head (None when the adapter trained neither).
pub(super) fn describe(loaded: &[LoadedVocab], vp: &VocabPlan, base_vocab: usize) -> Option<String> {
    if loaded.is_empty() && vp.vocab <= base_vocab {
        return None;
    }
    let parts: Vec<String> = loaded
        .iter()
        .map(|l| match &l.adapter {
            VocabAdapter::Full(_) => format!("`{}` is the adapter's trained copy", l.module.base_tensor()),
            VocabAdapter::Tokens { indices, .. } => {
                format!("{} rows of `{}` are the adapter's trained rows", indices.len(), l.module.base_tensor())
            }
        })
        .collect();
    let mut s = format!("The adapter also trained the embedding / output head (PEFT's `modules_to_save` / `trainable_token_indices`): {}.", parts.join("; "));
    if vp.vocab > base_vocab {
        s.push_str(&format!(
            " The vocabulary grew from {base_vocab} to {} tokens (added special tokens; the adapter's tokenizer is \
             included).",
            vp.vocab
        ));
    }
    if vp.untied {
        s.push_str(" The base tied the output head to the embedding; the merged model has them untied (`tie_word_embeddings: false`), as PEFT's `merge_and_unload()` leaves it.");
    }
    Some(s)
}
