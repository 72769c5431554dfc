//! Putting vocabulary adapters (`modules_to_save` copies, `trainable_token_indices` rows; see
//! [`crate::adapter::vocab`] for their math and on-disk names) on a model: fresh ([`attach`]), from a PEFT folder
//! ([`load`]), growing the model's vocabulary for added tokens ([`resize_vocab`]), and folding them in ([`merge`]).

use crate::adapter::peft_format::{CONFIG_FILE, WEIGHTS_FILE};
use crate::adapter::vocab::{
    check_announced, check_ids, grow_rows, read_tensors, VocabAdapter, VocabAdapters, VocabConfig, VocabModule,
};
use crate::adapter::AdapterError;
use crate::model::Llama;
use candle_core::{DType, Tensor, Var};
use std::path::Path;

fn err(path: &Path, msg: impl Into<String>) -> AdapterError {
    AdapterError::Format { path: path.to_path_buf(), msg: msg.into() }
}

/// The model's base matrix of `m`, and whether the model ties it to the other one.
fn base_of(model: &Llama, m: VocabModule) -> &Tensor {
    match m {
        VocabModule::Embed => &model.embed_tokens,
        VocabModule::Head => &model.lm_head,
    }
}

/// Attaches fresh vocabulary adapters as `cfg` says (copies of the model's matrices, or of their chosen rows), in
/// f32; returns the number of trainable parameters. `what` names the setting in errors (a recipe key or a file).
pub fn attach(model: &mut Llama, cfg: &VocabConfig, what: &Path) -> Result<usize, AdapterError> {
    model.vocab = VocabAdapters::default();
    if cfg.is_empty() {
        return Ok(0);
    }
    let tied = model.config.tie_word_embeddings;
    let vocab = model.embed_tokens.dims2()?.0;
    let dev = model.device.clone();
    for &m in &cfg.modules_to_save {
        if cfg.trainable_tokens.iter().any(|(t, _)| *t == m) {
            return Err(err(
                what,
                format!("{} is both in modules_to_save and in trainable_token_indices: choose one", m.name()),
            ));
        }
        // A copy of its own: a Var made from the base tensor would share (and update) the base's storage.
        let copy = Var::from_tensor(&base_of(model, m).to_dtype(DType::F32)?.to_device(&dev)?.copy()?)?;
        set(&mut model.vocab, m, VocabAdapter::Full(copy));
    }
    for (m, ids) in &cfg.trainable_tokens {
        if tied && *m == VocabModule::Head {
            return Err(err(
                what,
                "trainable_token_indices: the model ties lm_head to embed_tokens; list the ids under embed_tokens \
                 (the head then uses the same trained rows)",
            ));
        }
        check_ids(ids, vocab, what, m.name())?;
        let idx = Tensor::new(ids.as_slice(), &dev)?;
        let rows = base_of(model, *m).index_select(&idx, 0)?.to_dtype(DType::F32)?.copy()?;
        let rows = Var::from_tensor(&rows)?;
        let a = VocabAdapter::Tokens { indices: ids.clone(), rows };
        if tied && *m == VocabModule::Embed && model.vocab.head.is_none() {
            model.vocab.head = Some(a.clone());
            model.vocab.head_tied = true;
        }
        set(&mut model.vocab, *m, a);
    }
    Ok(model.vocab.param_count())
}

fn set(v: &mut VocabAdapters, m: VocabModule, a: VocabAdapter) {
    match m {
        VocabModule::Embed => v.embed = Some(a),
        VocabModule::Head => v.head = Some(a),
    }
}

/// Loads the vocabulary tensors of a PEFT adapter folder (as `cfg`, read from its config, announces them) onto
/// `model`. A copy with more rows than the model has, or token ids beyond its vocabulary (an adapter trained with
/// added tokens), first grows the model's vocabulary ([`resize_vocab`]) to the copy's rows, or to the size of the
/// tokenizer saved beside the adapter.
pub fn load(model: &mut Llama, dir: &Path, cfg: &VocabConfig) -> Result<(), AdapterError> {
    model.vocab = VocabAdapters::default();
    let wpath = dir.join(WEIGHTS_FILE);
    let tensors = read_tensors(&wpath)?;
    // Keys the config does not announce are an error, as are announced keys that are missing.
    check_announced(&tensors, cfg, &wpath)?;
    let get = |key: &str| {
        tensors
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| err(&wpath, format!("tensor `{key}` is missing (adapter_config.json announces it)")))
    };
    let hidden = model.config.hidden_size;
    // The vocabulary the adapter was trained with.
    let mut want = model.embed_tokens.dims2()?.0;
    for &m in &cfg.modules_to_save {
        let t = get(&m.copy_key())?;
        match t.dims() {
            [v, h] if *h == hidden => want = want.max(*v),
            d => {
                return Err(err(&wpath, format!("`{}`: shape {d:?}, expected (vocab, {hidden})", m.copy_key())));
            }
        }
    }
    if let Some(m) = cfg.modules_to_save.iter().find(|m| cfg.trainable_tokens.iter().any(|(t, _)| t == *m)) {
        let cpath = dir.join(CONFIG_FILE);
        return Err(err(&cpath, format!("{} is both in modules_to_save and in trainable_token_indices", m.name())));
    }
    let max_id = cfg.trainable_tokens.iter().flat_map(|(_, ids)| ids.iter().copied()).max();
    if let Some(max_id) = max_id.filter(|&i| i as usize >= want) {
        // Ids beyond the model's vocabulary are new tokens only when the adapter's saved tokenizer has them.
        match crate::tokens::saved_vocab_size(dir) {
            Some(tok) if tok > max_id as usize => want = tok,
            _ => {
                let cpath = dir.join(CONFIG_FILE);
                return Err(err(
                    &cpath,
                    format!(
                        "trainable_token_indices: token id {max_id} is outside the model's vocabulary of {want} tokens \
                         (and no tokenizer.json beside the adapter adds it)"
                    ),
                ));
            }
        }
    }
    if want > model.embed_tokens.dims2()?.0 {
        tracing::info!("{}: the adapter's vocabulary has {want} tokens; growing the model's to match", dir.display());
        resize_vocab(model, want)?;
    }
    let vocab = model.embed_tokens.dims2()?.0;
    let dev = model.device.clone();
    let tied = model.config.tie_word_embeddings;
    for &m in &cfg.modules_to_save {
        let key = m.copy_key();
        let t = get(&key)?;
        if t.dims() != [vocab, hidden] {
            return Err(err(&wpath, format!("`{key}`: shape {:?}, the model's is {:?}", t.dims(), [vocab, hidden])));
        }
        let v = Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(&dev)?)?;
        set(&mut model.vocab, m, VocabAdapter::Full(v));
    }
    for (m, ids) in &cfg.trainable_tokens {
        check_ids(ids, vocab, &dir.join(CONFIG_FILE), m.name())?;
        let key = m.tokens_key();
        let t = get(&key)?;
        if t.dims() != [ids.len(), hidden] {
            return Err(err(
                &wpath,
                format!(
                    "`{key}`: shape {:?}, expected ({}, {hidden}) for {} token ids",
                    t.dims(),
                    ids.len(),
                    ids.len()
                ),
            ));
        }
        let rows = Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(&dev)?)?;
        let a = VocabAdapter::Tokens { indices: ids.clone(), rows };
        let head_listed = cfg.trainable_tokens.iter().any(|(t, _)| *t == VocabModule::Head);
        if tied && *m == VocabModule::Embed && !head_listed && model.vocab.head.is_none() {
            // PEFT's tied adapter: the head uses the embedding's rows.
            model.vocab.head = Some(a.clone());
            model.vocab.head_tied = true;
        }
        set(&mut model.vocab, *m, a);
    }
    Ok(())
}

/// Grows the model's vocabulary to `new_vocab` rows as transformers' `resize_token_embeddings` does by default
/// (`mean_resizing=True`, transformers ≥ 4.46): each new row of the embedding (and of an untied head) is the mean
/// of the old rows. transformers draws them from N(mean, 1e-9·covariance) — a perturbation ~3·10⁻⁵ of the rows'
/// spread — and uses the plain mean when that covariance is not positive definite; peftkit uses the mean, which is
/// deterministic. The adapter then trains (and saves) the new rows, so the draw does not matter to PEFT users.
pub fn resize_vocab(model: &mut Llama, new_vocab: usize) -> candle_core::Result<()> {
    let (vocab, _) = model.embed_tokens.dims2()?;
    if new_vocab <= vocab {
        return Ok(());
    }
    let grow = |w: &Tensor| grow_rows(w, new_vocab)?.to_dtype(w.dtype());
    let tied = model.config.tie_word_embeddings;
    model.embed_tokens = grow(&model.embed_tokens)?;
    model.lm_head = if tied { model.embed_tokens.clone() } else { grow(&model.lm_head)? };
    // A quantized head (GGUF generation) would miss the new rows: the dense one is used instead.
    model.lm_head_q = None;
    model.config.vocab_size = new_vocab;
    Ok(())
}

/// Folds the vocabulary adapters into the model's matrices and removes them (PEFT's `merge_and_unload()`: a copy
/// replaces the base matrix, trainable rows are written into it). A copy of only one of two tied matrices unties
/// them (`config.tie_word_embeddings` becomes false).
pub fn merge(model: &mut Llama) -> candle_core::Result<()> {
    let v = std::mem::take(&mut model.vocab);
    if v.is_empty() {
        return Ok(());
    }
    let dtype = model.embed_tokens.dtype();
    let tied = model.config.tie_word_embeddings;
    let new_embed = match &v.embed {
        Some(a) => Some(a.weight(&model.embed_tokens, true)?.to_dtype(dtype)?),
        None => None,
    };
    let new_head = match (&v.head, v.head_tied) {
        (Some(_), true) => new_embed.clone(),
        (Some(a), false) => Some(a.weight(&model.lm_head, true)?.to_dtype(model.lm_head.dtype())?),
        (None, _) => None,
    };
    let untied = tied && !v.head_tied && (new_embed.is_some() || new_head.is_some());
    if let Some(e) = new_embed {
        model.embed_tokens = e;
    }
    if let Some(h) = new_head {
        model.lm_head = h;
        model.lm_head_q = None;
    }
    if untied {
        model.config.tie_word_embeddings = false;
    }
    Ok(())
}
