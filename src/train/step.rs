//! One optimizer step: forward, loss and backward over the step's micro-batches (gradients of the adapter
//! variables summed; each micro-batch's summed loss divided by the supervised-token count of the whole step, so
//! accumulation equals one large batch), clipping by global norm, then AdamW — the same sequence as a
//! transformers `Trainer` step with PEFT (checked against `tests/fixtures/train-oracle`, `tests/train_oracle.rs`).

use super::optim::{self, AdamW};
use crate::data::Batch;
use crate::linear::ForwardCtx;
use crate::model::Llama;
use crate::ops::Segments;
use candle_core::{Result, Tensor};

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepOutcome {
    /// The variables were updated.
    Updated {
        /// The step's loss (mean over its supervised tokens).
        loss: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Tokens (unpadded) processed.
        tokens: usize,
    },
    /// A loss or the gradient norm was not finite: nothing was updated.
    NonFinite { value: f64 },
}

/// Runs one optimizer step on `batches` with learning rate `lr`. `dropout_seed(i)` gives micro-batch i's dropout
/// seed (None: no dropout).
pub fn optimizer_step(
    model: &Llama,
    opt: &mut AdamW,
    batches: &[Batch],
    dropout_seed: impl Fn(usize) -> Option<u64>,
    max_grad_norm: f64,
    lr: f64,
) -> Result<StepOutcome> {
    let denom = batches.iter().map(|b| Llama::count_targets(&b.labels, b.batch, b.seq)).sum::<usize>().max(1) as f64;
    let mut grads: Vec<Tensor> = Vec::new();
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    for (mi, batch) in batches.iter().enumerate() {
        let ctx = ForwardCtx { dropout_seed: dropout_seed(mi), no_grad: false };
        let ids = Tensor::from_vec(batch.input_ids.clone(), (batch.batch, batch.seq), &model.device)?;
        // Each row's examples attend only to themselves; attention skips the padding.
        let segments = Segments::new(batch.boundaries(), batch.seq)?;
        let hidden = model.forward_hidden_segments(&ids, &segments, &ctx)?;
        let loss = model.loss(&hidden, &batch.labels, denom)?;
        let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Ok(StepOutcome::NonFinite { value: value as f64 });
        }
        loss_sum += value as f64;
        tokens += batch.lengths.iter().sum::<usize>();
        let store = loss.backward()?;
        for (i, var) in opt.vars.iter().enumerate() {
            let g = match store.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.zeros_like()?,
            };
            if grads.len() <= i {
                grads.push(g);
            } else {
                grads[i] = (&grads[i] + g)?;
            }
        }
    }
    let grad_norm = optim::clip_grad_norm(&mut grads, max_grad_norm)?;
    if !grad_norm.is_finite() {
        return Ok(StepOutcome::NonFinite { value: grad_norm });
    }
    opt.step(&grads, lr)?;
    Ok(StepOutcome::Updated { loss: loss_sum, grad_norm, tokens })
}
