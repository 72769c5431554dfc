//! Text generation: sampling, the KV-cached decode loop, stop tokens and streaming detokenization.
//!
//! **Sampling** ([`Sampler`]) follows transformers' `generate(do_sample=True)` pipeline, in its order:
//! repetition penalty (for every id already in the context, ℓ ← ℓ·θ if ℓ < 0 else ℓ/θ; CTRL, Keskar et al. 2019,
//! as `RepetitionPenaltyLogitsProcessor`), temperature (ℓ ← ℓ/T), top-k (keep the k largest logits, ties at the
//! k-th value included, as `TopKLogitsWarper`), top-p (nucleus, Holtzman et al. 2019: keep the smallest set of
//! most likely tokens whose probability sums to ≥ p, at least one, as `TopPLogitsWarper`), then a draw from
//! p = softmax(ℓ) with a seeded ChaCha8 generator. T = 0 is greedy decoding: argmax of the penalized logits,
//! the lowest id on ties (as `torch.argmax`).
//!
//! **Decoding** ([`Generator`], [`generate`]) runs the prompt through the model once (in chunks of
//! [`PREFILL_CHUNK`] positions), keeping every layer's keys and values in a [`KvCache`], then feeds one token per
//! step; only the last position's hidden state goes through the lm_head. It stops at a stop token, after
//! `max_new_tokens`, or when the sequence fills the model's context. A [`Generator`] keeps its cache between
//! calls and reuses the longest common prefix of the cached ids and the next prompt (a chat re-renders the
//! whole conversation each turn, and only the new tail is computed). [`generate_without_cache`] recomputes the
//! whole sequence at every step: the reference the cache is tested against.
//!
//! **Streaming** ([`TokenStream`]) turns ids into text as they come: the pending ids are decoded together with
//! the previously emitted chunk (so that decoders which strip a leading space, as sentencepiece's do, see the
//! same context as a full decode) and only the new text is emitted, never while it ends in an incomplete UTF-8
//! character (U+FFFD), as transformers' `TextStreamer` / tokenizers' `DecodeStream` do.

use crate::linear::ForwardCtx;
use crate::model::{KvCache, Llama, ModelConfig};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Prompt positions computed per forward pass during prefill (bounds the attention scores' memory).
pub const PREFILL_CHUNK: usize = 512;

/// Errors of generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid sampling parameters: {0}")]
    InvalidParams(String),
    #[error("the prompt is empty: generation needs at least one token")]
    EmptyPrompt,
    #[error("the prompt has {len} tokens but the model's context holds {max}: no room to generate")]
    PromptTooLong { len: usize, max: usize },
    #[error("token id {id} at prompt position {pos} is outside the model's vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, pos: usize, vocab: usize },
    #[error("the logits row has no finite value (all NaN or -inf): cannot pick a token")]
    NoFiniteLogits,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("decoding token ids {ids:?}: {msg}")]
    Decode { ids: Vec<u32>, msg: String },
    /// The `on_token` callback failed (writing to stdout, say).
    #[error("{0}")]
    Callback(#[source] Box<dyn std::error::Error + Send + Sync>),
}

// ---------------------------------------------------------------------------------------------------------------
// Sampling

/// How the next token is chosen. Defaults are transformers' usual chat settings (a model's
/// `generation_config.json` for chat models typically sets the same): temperature 0.7, top-p 0.9, top-k 50, no
/// repetition penalty, at most 256 new tokens, seed 0 (so a run is reproducible unless the seed is changed).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; 0 = greedy decoding (argmax). Must be finite and ≥ 0.
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this cumulative probability; 1.0 = off. In (0, 1].
    pub top_p: f64,
    /// Keep only the k most likely tokens (ties at the k-th included); 0 = off.
    pub top_k: usize,
    /// > 1 discourages tokens already in the context (prompt and generated); 1.0 = off. Finite, > 0.
    pub repetition_penalty: f64,
    /// Seed of the sampling generator: the same seed, model and prompt give the same tokens.
    pub seed: u64,
    /// At most this many tokens are generated (a stop token included).
    pub max_new_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.7, top_p: 0.9, top_k: 50, repetition_penalty: 1.0, seed: 0, max_new_tokens: 256 }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0) of at most `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { temperature: 0.0, max_new_tokens, ..Self::default() }
    }

    /// Checks the ranges documented on each field.
    pub fn validate(&self) -> Result<(), GenerateError> {
        let bad = |msg: String| Err(GenerateError::InvalidParams(msg));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be a finite number ≥ 0 (0 = greedy), got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1] (1 = off), got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be a finite number > 0 (1 = off), got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Picks next tokens from logit rows: repetition penalty → temperature → top-k → top-p → seeded draw.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler seeded with `params.seed`; fails on parameters out of range.
    pub fn new(params: &SamplingParams) -> Result<Self, GenerateError> {
        params.validate()?;
        Ok(Self { params: params.clone(), rng: ChaCha8Rng::seed_from_u64(params.seed) })
    }

    /// The next token for `logits` (one row, vocab-sized) after `context` (the prompt and the tokens generated
    /// so far, for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32, GenerateError> {
        let dist = self.distribution(logits, context)?;
        if dist.len() == 1 {
            return Ok(dist[0].0);
        }
        let u: f64 = self.rng.random(); // [0, 1)
        let mut cum = 0.0;
        for &(id, p) in &dist {
            cum += p;
            if u < cum {
                return Ok(id);
            }
        }
        // Rounding left the probabilities summing to just under u: the last kept token.
        Ok(dist[dist.len() - 1].0)
    }

    /// The distribution [`Sampler::sample`] draws from: the kept tokens with their renormalized probabilities,
    /// most likely first (ties by lowest id). Greedy decoding gives the argmax with probability 1.
    pub fn distribution(&self, logits: &[f32], context: &[u32]) -> Result<Vec<(u32, f64)>, GenerateError> {
        let p = &self.params;
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, context, p.repetition_penalty);
        if p.temperature == 0.0 {
            return argmax(&logits).map(|id| vec![(id, 1.0)]).ok_or(GenerateError::NoFiniteLogits);
        }
        // Candidates: every token with a usable logit, scaled by the temperature (in f64: no overflow for small T
        // unless the logit itself is huge, handled below).
        let mut cands: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
            .map(|(i, &l)| (i as u32, l as f64 / p.temperature))
            .collect();
        if cands.is_empty() {
            return Err(GenerateError::NoFiniteLogits);
        }
        // Most likely first, lowest id first among equals.
        let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cands.len() {
            // The k-th largest value is the threshold; every token at or above it stays (ties included).
            cands.select_nth_unstable_by(p.top_k - 1, order);
            let threshold = cands[p.top_k - 1].1;
            cands.retain(|c| c.1 >= threshold);
        }
        cands.sort_by(order);
        // An infinite scaled logit dominates everything else: those tokens share the probability.
        if cands[0].1 == f64::INFINITY {
            cands.retain(|c| c.1 == f64::INFINITY);
            let n = cands.len() as f64;
            return Ok(cands.into_iter().map(|(id, _)| (id, 1.0 / n)).collect());
        }
        // softmax, shifted by the maximum
        let max = cands[0].1;
        let mut sum = 0.0;
        for c in &mut cands {
            c.1 = (c.1 - max).exp();
            sum += c.1;
        }
        for c in &mut cands {
            c.1 /= sum;
        }
        if p.top_p < 1.0 {
            // The smallest prefix whose mass reaches top_p (at least one token).
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                cum += c.1;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
            let mass: f64 = cands.iter().map(|c| c.1).sum();
            for c in &mut cands {
                c.1 /= mass;
            }
        }
        Ok(cands)
    }
}

/// transformers' repetition penalty: for every distinct id of `context` inside the vocabulary, a negative logit
/// is multiplied by `penalty` and a non-negative one divided by it (so `penalty` > 1 always makes it less likely).
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let penalty = penalty as f32;
    let seen: HashSet<u32> = context.iter().copied().collect();
    for id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// Index of the largest logit (NaN ignored), the lowest on ties; `None` when every value is NaN or -inf.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
}

// ---------------------------------------------------------------------------------------------------------------
// The decode loop

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was generated (it is the last of [`GenerationOutput::tokens`]).
    StopToken(u32),
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The sequence (prompt + generated) filled the model's context ([`context_limit`]).
    ContextFull,
    /// The `on_token` callback asked to stop.
    Callback,
}

/// What one generation produced.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// The generated ids, in order; ends with the stop token when generation stopped on one.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Length of the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were already in the cache (not recomputed).
    pub reused_tokens: usize,
    /// Seconds spent on the prompt's forward pass (up to the first token's logits).
    pub prefill_secs: f64,
    /// Seconds from the end of prefill to the end of generation (sampling, the per-token forwards, callbacks).
    pub decode_secs: f64,
}

impl GenerationOutput {
    /// Whether generation ended on a stop token.
    pub fn stopped_on_stop_token(&self) -> bool {
        matches!(self.stop, StopReason::StopToken(_))
    }

    /// The generated ids without the stop token: the reply's content.
    pub fn content_tokens(&self) -> &[u32] {
        match self.stop {
            StopReason::StopToken(_) => &self.tokens[..self.tokens.len().saturating_sub(1)],
            _ => &self.tokens,
        }
    }

    /// Decoding speed: forward passes of one token per second. The first token comes from the prompt's logits,
    /// so `n` tokens took `n − 1` decoding steps (0 when fewer than two tokens were generated).
    pub fn tokens_per_sec(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        if self.decode_secs > 0.0 && steps > 0 {
            steps as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

/// The longest sequence the model can process: `max_position_embeddings`, or the sliding window when smaller
/// (peftkit's attention does not implement the window, so longer sequences are refused by the forward).
pub fn context_limit(config: &ModelConfig) -> usize {
    config.max_position_embeddings.min(config.sliding_window.unwrap_or(usize::MAX))
}

/// Generates from `prompt_ids` with a fresh KV cache; see [`Generator::generate`].
pub fn generate<E>(
    model: &Llama,
    prompt_ids: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    on_token: impl FnMut(u32) -> Result<bool, E>,
) -> Result<GenerationOutput, GenerateError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Generator::new(model).generate(prompt_ids, params, stop_ids, on_token)
}

/// The same generation without a cache: every step runs the whole sequence through the model. Slow
/// (quadratic); the reference that proves the cached path exact.
pub fn generate_without_cache<E>(
    model: &Llama,
    prompt_ids: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    on_token: impl FnMut(u32) -> Result<bool, E>,
) -> Result<GenerationOutput, GenerateError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    check_prompt(model, prompt_ids)?;
    let ctx = ForwardCtx { dropout_seed: None, no_grad: true };
    let mut seq: Vec<u32> = Vec::with_capacity(prompt_ids.len() + params.max_new_tokens);
    let forward = |new: &[u32]| -> Result<Vec<f32>, GenerateError> {
        seq.extend_from_slice(new);
        let ids = Tensor::new(seq.as_slice(), &model.device)?.unsqueeze(0)?; // (1, t)
        let hidden = model.forward_hidden(&ids, &ctx, None)?; // (1, t, hidden)
        last_logits(model, &hidden)
    };
    decode_loop(model, prompt_ids, 0, params, stop_ids, on_token, forward)
}

/// A model with a KV cache that persists between generations (one conversation at a time).
///
/// Invariant: `cache` holds the keys and values of exactly the ids in `cached`.
pub struct Generator<'m> {
    model: &'m Llama,
    cache: KvCache,
    cached: Vec<u32>,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Llama) -> Self {
        Self { model, cache: KvCache::new(model.layers.len()), cached: Vec::new() }
    }

    /// The ids whose keys and values are cached.
    pub fn cached_ids(&self) -> &[u32] {
        &self.cached
    }

    /// Forgets the cache.
    pub fn reset(&mut self) {
        self.cache = KvCache::new(self.model.layers.len());
        self.cached.clear();
    }

    /// Generates a continuation of `prompt_ids` (the full prompt, not a delta: the part shared with the cache
    /// is found here and not recomputed).
    ///
    /// `on_token` is called with each generated token except a stop token, as soon as it is chosen; returning
    /// `Ok(false)` ends generation after that token ([`StopReason::Callback`]), an error aborts it. Generation
    /// ends at any of `stop_ids` (reported in the output, not passed to `on_token`), after
    /// `params.max_new_tokens` tokens, or when prompt + generated fill [`context_limit`] positions. On error the
    /// cache is cleared.
    pub fn generate<E>(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        stop_ids: &[u32],
        on_token: impl FnMut(u32) -> Result<bool, E>,
    ) -> Result<GenerationOutput, GenerateError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let result = self.generate_inner(prompt_ids, params, stop_ids, on_token);
        if result.is_err() {
            // A forward may have failed halfway through the layers: the cache is no longer trustworthy.
            self.reset();
        }
        result
    }

    fn generate_inner<E>(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        stop_ids: &[u32],
        on_token: impl FnMut(u32) -> Result<bool, E>,
    ) -> Result<GenerationOutput, GenerateError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        check_prompt(self.model, prompt_ids)?;
        params.validate()?;
        // Reuse the shared prefix, but recompute at least the last prompt token: its logits are not kept.
        let shared = self.cached.iter().zip(prompt_ids).take_while(|(a, b)| a == b).count();
        let reuse = shared.min(prompt_ids.len() - 1);
        self.cache.truncate(reuse)?;
        self.cached.truncate(reuse);
        let model = self.model;
        let (cache, cached) = (&mut self.cache, &mut self.cached);
        let forward = |new: &[u32]| -> Result<Vec<f32>, GenerateError> {
            let logits = forward_cached(model, cache, new)?;
            cached.extend_from_slice(new);
            Ok(logits)
        };
        decode_loop(model, prompt_ids, reuse, params, stop_ids, on_token, forward)
    }
}

/// Rejects prompts the model cannot continue: empty, with ids outside the vocabulary, or filling the context.
fn check_prompt(model: &Llama, prompt_ids: &[u32]) -> Result<(), GenerateError> {
    if prompt_ids.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let vocab = model.embed_tokens.dim(0)?;
    if let Some((pos, &id)) = prompt_ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(GenerateError::TokenOutOfRange { id, pos, vocab });
    }
    let max = context_limit(&model.config);
    if prompt_ids.len() >= max {
        return Err(GenerateError::PromptTooLong { len: prompt_ids.len(), max });
    }
    Ok(())
}

/// Feeds `ids` after the cached positions (in chunks of [`PREFILL_CHUNK`]) and returns the last position's logits.
fn forward_cached(model: &Llama, cache: &mut KvCache, ids: &[u32]) -> Result<Vec<f32>, GenerateError> {
    let ctx = ForwardCtx { dropout_seed: None, no_grad: true };
    let mut last = None;
    for chunk in ids.chunks(PREFILL_CHUNK) {
        let t = Tensor::new(chunk, &model.device)?.unsqueeze(0)?; // (1, t)
        last = Some(model.forward_hidden(&t, &ctx, Some(&mut *cache))?); // (1, t, hidden)
    }
    match last {
        Some(hidden) => last_logits(model, &hidden),
        None => Err(GenerateError::EmptyPrompt),
    }
}

/// Logits of the last position of `hidden` (1, t, hidden), as f32: only that row goes through the lm_head.
fn last_logits(model: &Llama, hidden: &Tensor) -> Result<Vec<f32>, GenerateError> {
    let (_, t, _) = hidden.dims3()?;
    let last = hidden.narrow(1, t - 1, 1)?; // (1, 1, hidden)
    let logits = model.logits(&last)?; // (1, 1, vocab)
    Ok(logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The loop shared by the cached and uncached paths. `forward(ids)` feeds ids not yet seen (first the prompt
/// from `reused` on, then one token per step) and returns the logits after the last of them.
fn decode_loop<E>(
    model: &Llama,
    prompt_ids: &[u32],
    reused: usize,
    params: &SamplingParams,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> Result<bool, E>,
    mut forward: impl FnMut(&[u32]) -> Result<Vec<f32>, GenerateError>,
) -> Result<GenerationOutput, GenerateError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut sampler = Sampler::new(params)?;
    let limit = context_limit(&model.config);
    let mut out = GenerationOutput {
        tokens: Vec::new(),
        stop: StopReason::MaxTokens,
        prompt_tokens: prompt_ids.len(),
        reused_tokens: reused,
        prefill_secs: 0.0,
        decode_secs: 0.0,
    };
    if params.max_new_tokens == 0 {
        return Ok(out);
    }
    let start = Instant::now();
    let mut logits = forward(&prompt_ids[reused..])?;
    out.prefill_secs = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    // The repetition penalty looks at the prompt and everything generated.
    let mut context = prompt_ids.to_vec();
    loop {
        let id = sampler.sample(&logits, &context)?;
        out.tokens.push(id);
        if stop_ids.contains(&id) {
            out.stop = StopReason::StopToken(id);
            break;
        }
        context.push(id);
        if !on_token(id).map_err(|e| GenerateError::Callback(e.into()))? {
            out.stop = StopReason::Callback;
            break;
        }
        if out.tokens.len() >= params.max_new_tokens {
            out.stop = StopReason::MaxTokens;
            break;
        }
        if context.len() >= limit {
            out.stop = StopReason::ContextFull;
            break;
        }
        logits = forward(&[id])?;
    }
    out.decode_secs = decode_start.elapsed().as_secs_f64();
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------------
// Streaming detokenization

/// Turns generated ids into text incrementally. Concatenating every piece [`TokenStream::push`] and
/// [`TokenStream::finish`] return gives `tokenizer.decode(ids, skip_special_tokens)`.
///
/// Layout of `ids`: `[prev, cur)` is the last emitted chunk (kept as left context), `[cur, len)` are pending ids
/// whose text is not out yet (an incomplete character, or special tokens that decode to nothing).
pub struct TokenStream<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prev: usize,
    cur: usize,
}

impl<'t> TokenStream<'t> {
    /// A stream that skips special tokens (as a chat shows text).
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        Self::with_special_tokens(tokenizer, true)
    }

    pub fn with_special_tokens(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        Self { tokenizer, skip_special_tokens, ids: Vec::new(), prev: 0, cur: 0 }
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, GenerateError> {
        let before = self.decode(self.prev, self.cur)?;
        self.ids.push(id);
        let after = self.decode(self.prev, self.ids.len())?;
        // Wait while the text ends in an incomplete character (or gained nothing, e.g. a skipped special token).
        if after.ends_with('\u{FFFD}') || after.len() <= before.len() {
            return Ok(None);
        }
        let new = new_suffix(&before, &after);
        self.prev = self.cur;
        self.cur = self.ids.len();
        Ok(Some(new.to_string()).filter(|s| !s.is_empty()))
    }

    /// The text of the pending ids, complete or not (at the end of generation: an incomplete character comes
    /// out as U+FFFD, as in a full decode).
    pub fn finish(&mut self) -> Result<Option<String>, GenerateError> {
        let before = self.decode(self.prev, self.cur)?;
        let after = self.decode(self.prev, self.ids.len())?;
        self.prev = self.cur;
        self.cur = self.ids.len();
        let new = new_suffix(&before, &after);
        Ok(Some(new.to_string()).filter(|s| !s.is_empty()))
    }

    /// Forgets every id (a new reply).
    pub fn clear(&mut self) {
        self.ids.clear();
        self.prev = 0;
        self.cur = 0;
    }

    fn decode(&self, from: usize, to: usize) -> Result<String, GenerateError> {
        let ids = &self.ids[from..to];
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| GenerateError::Decode { ids: ids.to_vec(), msg: e.to_string() })
    }
}

/// The part of `after` past `before`. Decoders keep the text of a left context unchanged as more ids follow, so
/// `after` starts with `before`; should one not, the text past their longest common prefix is returned.
fn new_suffix<'a>(before: &str, after: &'a str) -> &'a str {
    if let Some(rest) = after.strip_prefix(before) {
        return rest;
    }
    let common: usize = before.chars().zip(after.chars()).take_while(|(a, b)| a == b).map(|(c, _)| c.len_utf8()).sum();
    &after[common..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn params(temperature: f64, top_p: f64, top_k: usize, repetition_penalty: f64) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, repetition_penalty, seed: 0, max_new_tokens: 16 }
    }

    fn softmax(l: &[f64]) -> Vec<f64> {
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    #[test]
    fn greedy_is_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(&params(0.0, 1.0, 0, 1.0)).unwrap();
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN, f32::NEG_INFINITY, -5.0], &[]).unwrap(), 2);
        assert!(matches!(s.sample(&[f32::NAN, f32::NEG_INFINITY], &[]), Err(GenerateError::NoFiniteLogits)));
        assert!(matches!(s.sample(&[], &[]), Err(GenerateError::NoFiniteLogits)));
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 * 0.1 - 2.0).collect();
        let best = argmax(&logits).unwrap();
        for seed in 0..20 {
            let mut s = Sampler::new(&SamplingParams { seed, ..params(1.3, 1.0, 1, 1.0) }).unwrap();
            assert_eq!(s.sample(&logits, &[]).unwrap(), best);
        }
    }

    #[test]
    fn top_k_keeps_ties_at_the_threshold() {
        let s = Sampler::new(&params(1.0, 1.0, 2, 1.0)).unwrap();
        let d = s.distribution(&[3.0, 1.0, 1.0, 0.0], &[]).unwrap();
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.3, 0.15, 0.05 (as logits ln p)
        let probs = [0.05f64, 0.5, 0.15, 0.3];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let kept = |top_p: f64| {
            let s = Sampler::new(&params(1.0, top_p, 0, 1.0)).unwrap();
            s.distribution(&logits, &[]).unwrap()
        };
        // 0.5 < 0.7 ≤ 0.5 + 0.3
        let d = kept(0.7);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((d[0].1 - 0.5 / 0.8).abs() < 1e-6 && (d[1].1 - 0.3 / 0.8).abs() < 1e-6);
        assert_eq!(kept(0.9).len(), 3); // 0.8 < 0.9 ≤ 0.95
        assert_eq!(kept(0.4).len(), 1); // always at least the most likely token
        assert_eq!(kept(1.0).len(), 4);
    }

    #[test]
    fn temperature_scales_logits_before_softmax() {
        let logits = [1.0f32, 2.0, 0.5];
        let s = Sampler::new(&params(0.5, 1.0, 0, 1.0)).unwrap();
        let d = s.distribution(&logits, &[]).unwrap();
        let expected = softmax(&[2.0, 4.0, 1.0]);
        for (id, p) in d {
            assert!((p - expected[id as usize]).abs() < 1e-6);
        }
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut l = [2.0f32, -2.0, 1.0, -1.0];
        // id 1 twice: penalized once; id 9 is outside the vocabulary: ignored.
        apply_repetition_penalty(&mut l, &[0, 1, 1, 9], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0, -1.0]);
        // Greedy sees the penalized logits: 0 (2.0) beats 2 (1.5) only without the penalty.
        let logits = [2.0f32, 0.0, 1.5];
        let mut s = Sampler::new(&params(0.0, 1.0, 0, 1.5)).unwrap();
        assert_eq!(s.sample(&logits, &[]).unwrap(), 0);
        assert_eq!(s.sample(&logits, &[0]).unwrap(), 2);
    }

    #[test]
    fn same_seed_same_sequence() {
        let logits: Vec<f32> = (0..30).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(&SamplingParams { seed, ..params(1.0, 0.95, 20, 1.0) }).unwrap();
            (0..64).map(|_| s.sample(&logits, &[]).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn sample_frequencies_follow_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let expected = softmax(&[0.0, 1.0, 2.0]);
        let mut s = Sampler::new(&params(1.0, 1.0, 0, 1.0)).unwrap();
        let n = 30_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits, &[]).unwrap() as usize] += 1;
        }
        for i in 0..3 {
            let f = counts[i] as f64 / n as f64;
            // binomial standard deviation ≤ 0.003 at n = 30000: 0.015 is 5σ
            assert!((f - expected[i]).abs() < 0.015, "token {i}: {f} vs {}", expected[i]);
        }
    }

    #[test]
    fn infinite_logits_and_bad_params() {
        let s = Sampler::new(&params(1.0, 1.0, 0, 1.0)).unwrap();
        let d = s.distribution(&[0.0, f32::INFINITY, 5.0, f32::INFINITY], &[]).unwrap();
        assert_eq!(d, vec![(1, 0.5), (3, 0.5)]);
        for p in [
            params(-1.0, 1.0, 0, 1.0),
            params(f64::NAN, 1.0, 0, 1.0),
            params(1.0, 0.0, 0, 1.0),
            params(1.0, 1.5, 0, 1.0),
            params(1.0, 1.0, 0, 0.0),
        ] {
            assert!(matches!(Sampler::new(&p), Err(GenerateError::InvalidParams(_))), "{p:?}");
        }
    }

    fn fixture_tokenizer() -> Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/tokenizer.json");
        Tokenizer::from_file(path).unwrap()
    }

    /// Streams `ids` through a [`TokenStream`] and checks the pieces against a full decode; returns the pieces
    /// and how many ids were held back (produced no text when pushed).
    fn stream_matches_decode(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, usize) {
        let mut stream = TokenStream::new(tok);
        let mut pieces = Vec::new();
        let mut held = 0;
        for &id in ids {
            match stream.push(id).unwrap() {
                Some(p) => {
                    assert!(!p.contains('\u{FFFD}'), "partial character emitted: {p:?}");
                    pieces.push(p);
                }
                None => held += 1,
            }
        }
        pieces.extend(stream.finish().unwrap());
        assert_eq!(pieces.concat(), tok.decode(ids, true).unwrap(), "ids {ids:?}");
        (pieces, held)
    }

    const TEXTS: [&str; 6] = [
        "Hello world, this is a test.",
        "Café crème brûlée, s'il vous plaît.",
        "日本語のテキスト",
        "emoji 🦀🎉 and 👩‍👩‍👧 family",
        "  leading spaces\nand\ttabs  ",
        "mixé 日本 🦀x",
    ];

    #[test]
    fn stream_byte_level_bpe_matches_full_decode() {
        let tok = fixture_tokenizer();
        for text in TEXTS {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            let (pieces, held) = stream_matches_decode(&tok, &ids);
            assert_eq!(pieces.concat(), text);
            // The tiny vocabulary splits multi-byte characters across tokens: the stream must have held some back.
            if !text.is_ascii() {
                assert!(held > 0, "{text:?}: ids {ids:?}");
            }
        }
        // Special tokens are skipped, as in decode(…, true).
        let ids = tok.encode("<|im_start|>assistant\nhé<|im_end|>", false).unwrap().get_ids().to_vec();
        stream_matches_decode(&tok, &ids);
    }

    #[test]
    fn stream_flushes_an_incomplete_character_at_the_end() {
        let tok = fixture_tokenizer();
        let ids = tok.encode("ab🦀", false).unwrap().get_ids().to_vec();
        // Cut inside the emoji: the full decode ends with U+FFFD, and so does the stream, but only from finish().
        let cut = &ids[..ids.len() - 1];
        let full = tok.decode(cut, true).unwrap();
        assert!(full.ends_with('\u{FFFD}'), "{full:?}");
        let mut stream = TokenStream::new(&tok);
        let mut text = String::new();
        for &id in cut {
            text.extend(stream.push(id).unwrap());
        }
        assert!(!text.contains('\u{FFFD}'));
        text.extend(stream.finish().unwrap());
        assert_eq!(text, full);
    }

    /// A Llama-2-style sentencepiece tokenizer: a few pieces, byte fallback for everything else, and the
    /// decoder that turns ▁ into spaces and strips the first one.
    fn byte_fallback_tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), i.into());
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
        }
        let pieces = ["▁", "a", "b", "c", "e", "h", "l", "o", "r", "w", "d", "▁h", "▁w", "ll", "é"];
        for (i, p) in pieces.iter().enumerate() {
            vocab.insert(p.to_string(), (259 + i).into());
        }
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
            ]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                      "vocab": vocab, "merges": [["▁", "h"], ["▁", "w"], ["l", "l"]]}
        });
        json.to_string().parse().unwrap()
    }

    #[test]
    fn stream_sentencepiece_byte_fallback_matches_full_decode() {
        let tok = byte_fallback_tokenizer();
        for text in ["hello world", "héllo wörld", "日本語", "crab 🦀 hello", "a  b"] {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            let (pieces, held) = stream_matches_decode(&tok, &ids);
            // The first piece's leading space is stripped, as in a full decode; later ones keep theirs.
            assert_eq!(pieces.concat(), text, "ids {ids:?}");
            // Characters outside the pieces come as byte tokens, held back until complete.
            if text.chars().any(|c| !c.is_ascii() && c != 'é') {
                assert!(held > 0, "{text:?}: ids {ids:?}");
            }
        }
        // Byte tokens really are used, and a word boundary keeps its space in the stream.
        let ids = tok.encode("hello wörld", false).unwrap().get_ids().to_vec();
        assert!(ids.iter().any(|&i| (3..259).contains(&i)), "{ids:?}");
        let ids = tok.encode("<s>hello world", false).unwrap().get_ids().to_vec();
        stream_matches_decode(&tok, &ids);
    }
}
