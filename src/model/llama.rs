//! The Llama-family decoder forward pass (Llama 2/3, Mistral, Qwen2, SmolLM), written for training.
//!
//! Per layer: h += o_proj(attn(rope(q_proj(n₁)), rope(k_proj(n₁)), v_proj(n₁))), n₁ = rmsnorm(h);
//! h += down_proj(silu(gate_proj(n₂)) ⊙ up_proj(n₂)), n₂ = rmsnorm(h). Attention is causal and grouped-query
//! (each of the `num_key_value_heads` K/V heads serves num_heads / kv_heads query heads). Every projection is an
//! [`AdaptedLinear`]; every non-linear op is a [`crate::ops`] op with a checked backward. Reference: transformers'
//! `modeling_llama.py` / `modeling_qwen2.py`.

use super::config::ModelConfig;
use crate::linear::{AdaptedLinear, ForwardCtx, LayerAdapter};
use crate::ops::{self, Segments};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::sync::Arc;

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: Tensor,
    pub q_proj: AdaptedLinear,
    pub k_proj: AdaptedLinear,
    pub v_proj: AdaptedLinear,
    pub o_proj: AdaptedLinear,
    pub post_attention_layernorm: Tensor,
    pub gate_proj: AdaptedLinear,
    pub up_proj: AdaptedLinear,
    pub down_proj: AdaptedLinear,
}

impl Block {
    /// The seven projections, in PEFT's module order.
    pub fn linears(&self) -> [&AdaptedLinear; 7] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj]
    }
    /// The adapter variables of this layer (LoRA A then B; DoRA A, B then m; or the IA3 vector), projection by
    /// projection in [`Block::linears`] order.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut vars = Vec::new();
        for lin in self.linears() {
            match &lin.adapter {
                Some(LayerAdapter::Lora(l)) => vars.extend([l.a.clone(), l.b.clone()]),
                Some(LayerAdapter::Ia3(l)) => vars.push(l.l.clone()),
                Some(LayerAdapter::Dora(d)) => vars.extend([d.lora.a.clone(), d.lora.b.clone(), d.magnitude.clone()]),
                None => {}
            }
        }
        vars
    }

    /// The layer on the residual stream: h (b, t, hidden) f32 → h' (b, t, hidden) f32. With `cache` (this layer's
    /// slot of a [`KvCache`]), the keys and values of earlier positions come first and the slot is extended.
    /// Both the plain and the checkpointed forward ([`super::checkpoint`]) run this one body.
    pub fn forward(
        &self,
        h: &Tensor,
        env: &LayerEnv,
        ctx: &ForwardCtx,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let (nh, nkv, hd, dt) = (env.heads, env.kv_heads, env.head_dim, env.dtype);
        let x = ops::rms_norm(h, &self.input_layernorm, env.eps)?.to_dtype(dt)?;
        // (b, t, nh·hd) → (b, t, nh, hd): heads stay interleaved; the attention op reads them strided.
        let q = self.q_proj.forward(&x, ctx)?.reshape((b, t, nh, hd))?;
        let k = self.k_proj.forward(&x, ctx)?.reshape((b, t, nkv, hd))?;
        let v = self.v_proj.forward(&x, ctx)?.reshape((b, t, nkv, hd))?;
        let q = ops::rope(&q, &env.cos, &env.sin)?;
        let k = ops::rope(&k, &env.cos, &env.sin)?;
        // With a cache, keys and values of earlier positions come first: (b, s, nkv, hd)
        let (k, v) = match cache {
            Some(slot) => LayerCache::append(slot, &k, &v)?,
            None => (k, v),
        };
        // (b, t, nh, hd) → (b, t, nh·hd)
        let scale = 1.0 / (hd as f64).sqrt();
        let attn = match &env.segments {
            Some(segments) => ops::attention_segments(&q, &k, &v, scale, segments)?,
            None => ops::attention(&q, &k, &v, scale)?,
        }
        .reshape((b, t, nh * hd))?;
        let h = (h + self.o_proj.forward(&attn, ctx)?.to_dtype(DType::F32)?)?;

        let x = ops::rms_norm(&h, &self.post_attention_layernorm, env.eps)?.to_dtype(dt)?;
        let gate = self.gate_proj.forward(&x, ctx)?;
        let up = self.up_proj.forward(&x, ctx)?;
        h + self.down_proj.forward(&ops::swiglu(&gate, &up)?, ctx)?.to_dtype(DType::F32)?
    }

    pub fn linears_mut(&mut self) -> [&mut AdaptedLinear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// What every decoder layer of one forward shares: the attention shape, the norm ε, the compute dtype and the
/// RoPE tables of the forward's positions.
#[derive(Debug, Clone)]
pub struct LayerEnv {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    /// Dtype of the projections' inputs and outputs (the residual stream stays f32).
    pub dtype: DType,
    /// (t, head_dim/2), f32; (b·t, head_dim/2) for packed rows (positions restarting per example)
    pub cos: Tensor,
    /// (t, head_dim/2), f32; (b·t, head_dim/2) for packed rows (positions restarting per example)
    pub sin: Tensor,
    /// Packed rows: each row's example boundaries; attention is block-diagonal over them.
    pub segments: Option<Arc<Segments>>,
}

/// Keys and values of the positions already processed, per layer (for generation).
///
/// Each layer's keys and values live in buffers with room to spare, (b, capacity, kv_heads, d), which a step
/// extends in place; the layer reads the first `len` positions as a view. (Concatenating a new position onto the
/// cache would copy all of it at every step: 9 MB per token for SmolLM2-135M at 200 positions.) Not `Clone`: a
/// copy would share the buffers that the next step writes into.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
}

/// One layer's slot of a [`KvCache`].
#[derive(Debug)]
pub struct LayerCache {
    /// (b, capacity, kv_heads, d): positions `0..len` hold data.
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Appends k, v (b, t, kv_heads, d) and returns the keys and values of all positions so far, (b, len, kv_heads, d).
    fn append(slot: &mut Option<LayerCache>, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let len = slot.as_ref().map_or(0, |c| c.len);
        let capacity = slot.as_ref().map_or(0, |c| c.k.dim(1).unwrap_or(0));
        if len + t > capacity {
            // Room for twice as many positions (at least 64), the cached ones copied once.
            let (b, _, h, d) = k.dims4()?;
            let cap = (2 * (len + t)).max(64);
            let grown = |old: Option<&Tensor>, x: &Tensor| -> Result<Tensor> {
                let buf = Tensor::zeros((b, cap, h, d), x.dtype(), x.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
                Ok(buf)
            };
            let (nk, nv) = (grown(slot.as_ref().map(|c| &c.k), k)?, grown(slot.as_ref().map(|c| &c.v), v)?);
            *slot = Some(LayerCache { k: nk, v: nv, len });
        }
        let Some(c) = slot.as_mut() else { candle_core::bail!("KV cache slot missing after growth") };
        c.k.slice_set(&k.contiguous()?, 1, len)?;
        c.v.slice_set(&v.contiguous()?, 1, len)?;
        c.len = len + t;
        Ok((c.k.narrow(1, 0, c.len)?, c.v.narrow(1, 0, c.len)?))
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect() }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|c| c.len).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keeps the first `len` cached positions of every layer and forgets the rest (a no-op when `len` ≥ the
    /// cached length): the next forward continues at position `len`.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for c in self.layers.iter_mut().flatten() {
            c.len = c.len.min(len);
        }
        Ok(())
    }
}

/// A Llama-family causal language model with adaptable projections.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    /// (vocab, hidden)
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// (vocab, hidden); shares storage with `embed_tokens` when the embeddings are tied.
    pub lm_head: Tensor,
    /// The output head in a llama.cpp block format, for generation ([`super::BaseQuant::Ggml`]): the logits of
    /// a forward without a graph use it (candle's quantized matmul) instead of `lm_head`.
    pub lm_head_q: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
    /// Trained copies or rows of the embedding and the head (`modules_to_save`, `trainable_token_indices`; see
    /// [`crate::adapter::vocab`]); empty by default.
    pub vocab: crate::adapter::vocab::VocabAdapters,
    /// (head_dim / 2) inverse frequencies.
    inv_freq: Vec<f32>,
    pub device: Device,
    pub dtype: DType,
    /// Activation checkpointing (transformers' `gradient_checkpointing`): training forwards keep only each
    /// decoder layer's input and recompute the layer during the backward pass ([`super::checkpoint`]). Same
    /// gradients, less memory, about one more forward pass of compute. Inference forwards ignore it.
    pub gradient_checkpointing: bool,
}

impl Llama {
    pub fn new(config: ModelConfig, embed_tokens: Tensor, layers: Vec<Block>, norm: Tensor, lm_head: Tensor) -> Self {
        let inv_freq = config.rope_inv_freq().into_iter().map(|f| f as f32).collect();
        let (device, dtype) = (embed_tokens.device().clone(), embed_tokens.dtype());
        Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            lm_head_q: None,
            vocab: Default::default(),
            inv_freq,
            device,
            dtype,
            gradient_checkpointing: false,
        }
    }

    /// Every projection, layer by layer.
    pub fn linears(&self) -> impl Iterator<Item = &AdaptedLinear> {
        self.layers.iter().flat_map(|b| b.linears())
    }
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut AdaptedLinear> {
        self.layers.iter_mut().flat_map(|b| b.linears_mut())
    }

    /// cos, sin (f32, whatever the compute dtype) of shape (t, head_dim/2) for positions offset..offset+t.
    fn rope_tables(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        self.rope_tables_at(&(offset..offset + t).collect::<Vec<_>>())
    }

    /// cos, sin (f32) of shape (n, head_dim/2) for the n given positions.
    fn rope_tables_at(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let (t, half) = (positions.len(), self.inv_freq.len());
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // position × inv_freq in f32, as transformers computes it
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), &Device::Cpu)?.to_device(&self.device)?;
        let sin = Tensor::from_vec(sin, (t, half), &Device::Cpu)?.to_device(&self.device)?;
        Ok((cos, sin))
    }

    /// Final-norm hidden states (b, t, hidden), in f32, for token ids (b, t). With a cache, the ids continue the cached
    /// positions and the cache is extended.
    pub fn forward_hidden(&self, ids: &Tensor, ctx: &ForwardCtx, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_hidden_inner(ids, ctx, cache, None)
    }

    /// [`Llama::forward_hidden`] of a batch whose rows hold the examples delimited by `segments` (packed rows, or
    /// one example per row): each example attends only to itself, its RoPE positions start at 0, and the padding
    /// after a row's last example is attended by nothing. Without a cache.
    pub fn forward_hidden_segments(&self, ids: &Tensor, segments: &Segments, ctx: &ForwardCtx) -> Result<Tensor> {
        self.forward_hidden_inner(ids, ctx, None, Some(segments))
    }

    fn forward_hidden_inner(
        &self,
        ids: &Tensor,
        ctx: &ForwardCtx,
        mut cache: Option<&mut KvCache>,
        segments: Option<&Segments>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if let Some(w) = self.config.sliding_window {
            if offset + t > w {
                candle_core::bail!(
                    "sequence of {} positions exceeds the model's sliding_window of {w}, which peftkit does not implement; \
                     use a sequence_len of at most {w}",
                    offset + t
                );
            }
        }
        let (cos, sin) = match segments {
            // Positions restart at 0 in every example: one row of angles per (batch, position).
            Some(seg) if !seg.one_per_row() => self.rope_tables_at(&seg.positions())?,
            _ => self.rope_tables(offset, t)?,
        };
        let cfg = &self.config;
        let env = LayerEnv {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
            dtype: self.dtype,
            cos,
            sin,
            segments: segments.map(|s| Arc::new(s.clone())),
        };
        // The base embedding is frozen: no gradient flows into it (only into a trained copy or trained rows).
        // Mixed precision as torch.autocast does it: the residual stream h stays f32 (norm statistics and the sums
        // of the residual additions in f32); the projections' inputs and outputs are in the compute dtype.
        let flat = ids.flatten_all()?;
        let mut h = match &self.vocab.embed {
            // (b·t, hidden) f32
            Some(a) => a.lookup(&self.embed_tokens, &flat, ctx.no_grad)?.reshape((b, t, cfg.hidden_size))?,
            None => self
                .embed_tokens
                .index_select(&flat, 0)?
                .reshape((b, t, cfg.hidden_size))?
                .detach()
                .to_dtype(DType::F32)?,
        };
        // Activation checkpointing applies to training forwards only (a graph is wanted, no KV cache).
        let checkpointed = self.gradient_checkpointing && !ctx.no_grad && cache.is_none();
        for (li, layer) in self.layers.iter().enumerate() {
            h = if checkpointed {
                super::checkpoint::checkpointed_block(layer, &h, &env, ctx)?
            } else {
                layer.forward(&h, &env, ctx, cache.as_deref_mut().map(|c| &mut c.layers[li]))?
            };
        }
        ops::rms_norm(&h, &self.norm, cfg.rms_norm_eps)
    }

    /// Logits (b, t, vocab) from final hidden states (b, t, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if let Some(a) = &self.vocab.head {
            // A trained head: (b, t, hidden) · (vocab, hidden)ᵀ in f32.
            let w = a.weight(&self.lm_head, true)?;
            return ops::frozen_matmul(&hidden.to_dtype(DType::F32)?, &w);
        }
        if let Some(q) = &self.lm_head_q {
            let w = crate::weight::FrozenWeight::Ggml(q.clone());
            return ops::frozen_product(&hidden.to_dtype(DType::F32)?, &w);
        }
        if hidden.device().is_cuda() && hidden.dtype() != self.lm_head.dtype() {
            // cuBLAS wants one dtype: the (b, t, hidden) activations are cast, never the (vocab, hidden) head.
            return ops::frozen_matmul(&hidden.to_dtype(self.lm_head.dtype())?, &self.lm_head)?.to_dtype(DType::F32);
        }
        // On the CPU the kernel widens a bf16 head itself and multiplies in f32.
        ops::frozen_matmul(hidden, &self.lm_head)
    }

    /// Logits (b, t, vocab) for every position of `ids` (b, t).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.forward_hidden(ids, &ForwardCtx { dropout_seed: None, no_grad: true }, None)?;
        self.logits(&h)
    }

    /// Next-token cross-entropy summed over supervised positions and divided by `denom`. `labels` is (b·t),
    /// aligned with the inputs as in transformers (−100 = not supervised); the shift happens here.
    pub fn loss(&self, hidden: &Tensor, labels: &[i32], denom: f64) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        // Position j predicts token j+1: target[j] = labels[j+1], nothing for the last position of a row.
        let mut targets = vec![-100i64; b * t];
        for r in 0..b {
            for j in 0..t.saturating_sub(1) {
                targets[r * t + j] = labels[r * t + j + 1] as i64;
            }
        }
        if let Some(a) = &self.vocab.head {
            // A trained head takes gradients: the composed cross-entropy over its (differentiable) weight.
            let w = a.weight(&self.lm_head, false)?;
            return crate::adapter::vocab::cross_entropy(&hidden.reshape((b * t, d))?, &w, &targets, denom);
        }
        ops::linear_cross_entropy(&hidden.reshape((b * t, d))?, &self.lm_head, &targets, denom)
    }

    /// Number of supervised next-token targets in a label row set (b, t).
    pub fn count_targets(labels: &[i32], b: usize, t: usize) -> usize {
        (0..b).map(|r| (1..t).filter(|&j| labels[r * t + j] >= 0).count()).sum()
    }
}
