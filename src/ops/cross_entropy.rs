//! Output head + cross-entropy, fused and chunked: loss = Σ −log softmax(h·Wᵀ)[label] / denom over labelled rows.
//! The (tokens × vocab) logits are never held at once: [`CE_CHUNK_ROWS`] rows at a time, and dL/dh is computed in
//! the forward pass (it needs the softmax the forward computes anyway): dh = (softmax − onehot)·W / denom.
//! Logits, log-sum-exp and the loss are f32 (the sum in f64) whatever the storage dtype; dh has h's dtype.
//! Reference: the composed [`super::reference::linear_cross_entropy`]; transformers' `ForCausalLMLoss`.

use super::gemm::sgemm;
use crate::host::{exp_f32, f32_view, isa_variants, max_lanes, tensor_from_f32};
use crate::weight::FrozenWeight;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Rows of logits computed at a time by [`linear_cross_entropy`].
const CE_CHUNK_ROWS: usize = 128;

isa_variants! {
    /// One row of logits → its loss lse − logit[label], with lse = log Σ exp in f64 (the exponentials in f32,
    /// vectorized; their sum in f64). With `want_grad` the row becomes dlogits = (softmax − onehot)·grad_scale;
    /// otherwise it is left holding the exponentials.
    pub fn loss_row / loss_row_at(row: &mut [f32], label: usize, grad_scale: f32, want_grad: bool) -> f64 {
        let target = row[label];
        let mx = max_lanes(row);
        row.iter_mut().for_each(|v| *v = exp_f32(*v - mx));
        let mut acc = [0f64; 8];
        let n = row.len() / 8 * 8;
        for c in row[..n].chunks_exact(8) {
            for i in 0..8 {
                acc[i] += c[i] as f64;
            }
        }
        let sum = acc.iter().sum::<f64>() + row[n..].iter().map(|&v| v as f64).sum::<f64>();
        if want_grad {
            let k = (grad_scale as f64 / sum) as f32;
            row.iter_mut().for_each(|v| *v *= k);
            row[label] -= grad_scale;
        }
        mx as f64 + sum.ln() - target as f64
    }
}

struct LinearCrossEntropy {
    head: Tensor,
    labels: Vec<i64>,
    denom: f32,
    /// dL/dh, computed during the forward pass (it needs the softmax the forward computes anyway).
    grad: Mutex<Option<Tensor>>,
    want_grad: bool,
}

impl LinearCrossEntropy {
    /// Returns (Σ loss over labelled rows, dL/dh (n·d) if wanted). Labels < 0 are ignored.
    fn run(&self, h: &[f32], n: usize, d: usize, w: &[f32], vocab: usize) -> Result<(f64, Option<Vec<f32>>)> {
        let rows: Vec<usize> = (0..n).filter(|&i| self.labels[i] >= 0).collect();
        for &i in &rows {
            if self.labels[i] as usize >= vocab {
                candle_core::bail!("label {} at row {i} is outside the vocabulary ({vocab})", self.labels[i]);
            }
        }
        let mut dh = if self.want_grad { Some(vec![0f32; n * d]) } else { None };
        let mut total = 0f64;
        let mut hc = vec![0f32; CE_CHUNK_ROWS * d];
        let mut logits = vec![0f32; CE_CHUNK_ROWS * vocab];
        let mut dhc = vec![0f32; CE_CHUNK_ROWS * d];
        for chunk in rows.chunks(CE_CHUNK_ROWS) {
            let c = chunk.len();
            for (j, &i) in chunk.iter().enumerate() {
                hc[j * d..(j + 1) * d].copy_from_slice(&h[i * d..(i + 1) * d]);
            }
            // logits (c, V) = h_c (c, d) · Wᵀ (d, V)
            sgemm(c, vocab, d, &mut logits, false, &hc, (d, 1), w, (1, d), 1.0);
            let inv_denom = 1.0 / self.denom;
            let losses: Vec<f64> = logits[..c * vocab]
                .par_chunks_mut(vocab)
                .zip(chunk.par_iter())
                .map(|(row, &i)| loss_row(row, self.labels[i] as usize, inv_denom, self.want_grad))
                .collect();
            total += losses.iter().sum::<f64>();
            if let Some(dh) = dh.as_mut() {
                // dh_c (c, d) = dlogits (c, V) · W (V, d)
                sgemm(c, d, vocab, &mut dhc, false, &logits, (vocab, 1), w, (d, 1), 1.0);
                for (j, &i) in chunk.iter().enumerate() {
                    dh[i * d..(i + 1) * d].copy_from_slice(&dhc[j * d..(j + 1) * d]);
                }
            }
        }
        Ok((total, dh))
    }
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32_view(s, l, "linear_cross_entropy")?;
        let (n, d) = l.shape().dims2()?;
        let (vocab, dw) = self.head.dims2()?;
        if dw != d || self.labels.len() != n {
            candle_core::bail!("linear_cross_entropy: h {n}×{d}, head {vocab}×{dw}, {} labels", self.labels.len());
        }
        let (total, dh) = FrozenWeight::Dense(self.head.clone()).with_f32(|w| self.run(&h, n, d, w, vocab))??;
        if let Some(dh) = dh {
            let dh = tensor_from_f32(dh, (n, d), s.dtype())?;
            *self.grad.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))? = Some(dh);
        }
        Ok((CpuStorage::F32(vec![(total / self.denom as f64) as f32]), Shape::from(())))
    }
    fn bwd(&self, _h: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dh = self.grad.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?.take();
        match dh {
            Some(dh) => Ok(Some(dh.broadcast_mul(&g.to_dtype(dh.dtype())?)?)),
            None => candle_core::bail!("linear_cross_entropy: backward called twice or without gradients"),
        }
    }
}

/// Cross-entropy of `softmax(h · headᵀ)` against `labels`, summed over rows whose label is ≥ 0 and divided by
/// `denom` (the number of labelled tokens of the whole optimizer step, so accumulated micro-batches average
/// correctly). h: (n, d), head: (V, d), labels: n targets (already shifted: row i predicts labels[i]).
/// Returns an f32 scalar. Rows with a negative label cost nothing: their logits are never computed.
pub fn linear_cross_entropy(h: &Tensor, head: &Tensor, labels: &[i64], denom: f64) -> Result<Tensor> {
    if !super::use_kernel(h, false) {
        return super::reference::linear_cross_entropy(h, head, labels, denom);
    }
    let op = LinearCrossEntropy {
        head: head.contiguous()?,
        labels: labels.to_vec(),
        denom: denom as f32,
        grad: Mutex::new(None),
        want_grad: h.track_op(),
    };
    h.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn linear_cross_entropy_gradient_and_value() {
        let head = rand(&[11, 6], 12);
        let labels = vec![3i64, -100, 0, 10, 7];
        check_grad(&[5, 6], |h| linear_cross_entropy(h, &head, &labels, 4.0).unwrap(), 1e-2);
        // Value against log_softmax of the full logits.
        let h = rand(&[5, 6], 13);
        let got = linear_cross_entropy(&h, &head, &labels, 4.0).unwrap().to_scalar::<f32>().unwrap();
        let lsm = candle_nn::ops::log_softmax(&h.matmul(&head.t().unwrap()).unwrap(), 1).unwrap();
        let lsm: Vec<Vec<f32>> = lsm.to_vec2().unwrap();
        let want: f32 =
            -labels.iter().enumerate().filter(|(_, &l)| l >= 0).map(|(i, &l)| lsm[i][l as usize]).sum::<f32>() / 4.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn kernel_matches_reference_and_bf16_is_close() {
        let head = rand(&[300, 16], 14);
        // More rows than one chunk, some unlabelled.
        let labels: Vec<i64> = (0..200).map(|i| if i % 7 == 0 { -100 } else { (i * 37 % 300) as i64 }).collect();
        let h = rand(&[200, 16], 15);
        compare_with_reference(
            &[h.clone()],
            |t| linear_cross_entropy(&t[0], &head, &labels, 150.0).unwrap(),
            |t| super::super::reference::linear_cross_entropy(&t[0], &head, &labels, 150.0).unwrap(),
            1e-5,
        );
        // bf16 h and head: the loss stays an f32 scalar, dh is bf16; both within bf16 rounding of f32.
        let run = |dt: candle_core::DType| {
            let head = head.to_dtype(dt).unwrap();
            forward_backward(&[h.to_dtype(dt).unwrap()], &|t| {
                linear_cross_entropy(&t[0], &head, &labels, 150.0).unwrap()
            })
        };
        let (l32, g32) = run(candle_core::DType::F32);
        let (l16, g16) = run(candle_core::DType::BF16);
        assert_eq!(l16.dtype(), candle_core::DType::F32);
        assert_eq!(g16[0].dtype(), candle_core::DType::BF16);
        assert!(rel_l2(&l16, &l32) < 1e-2, "loss {l16} vs {l32}");
        assert!(rel_l2(&g16[0], &g32[0]) < BF16_TOL);
    }
}
