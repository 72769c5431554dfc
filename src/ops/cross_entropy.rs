//! Output head + cross-entropy, fused and chunked: loss = Σ −log softmax(h·Wᵀ)\[label\] / denom over labelled rows.
//! The (tokens × vocab) logits are never held at once: [`CE_CHUNK_ROWS`] rows at a time, and dL/dh is computed in
//! the forward pass (it needs the softmax the forward computes anyway): dh = (softmax − onehot)·W / denom.
//! Logits, log-sum-exp and the loss are f32 (the sum in f64) whatever the storage dtype; dh has h's dtype.
//! On CUDA, [`linear_cross_entropy`] takes [`linear_cross_entropy_chunked`]: the same chunking in candle tensor
//! ops (cuBLAS products), a bf16 head widened to f32 a piece of rows at a time, the result attached to the graph by
//! [`super::graft`].
//! Reference: the composed [`super::reference::linear_cross_entropy`]; transformers' `ForCausalLMLoss`.

use super::gemm::sgemm;
use crate::host::{exp_f32, f32_view, isa_variants, max_lanes, tensor_from_f32};
use crate::weight::FrozenWeight;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Rows of logits computed at a time by [`linear_cross_entropy`].
const CE_CHUNK_ROWS: usize = 128;

isa_variants! {
    /// One row of logits → its loss lse − logit\[label\], with lse = log Σ exp in f64 (the exponentials in f32,
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
/// correctly). h: (n, d), head: (V, d), labels: n targets (already shifted: row i predicts labels\[i\]).
/// Returns an f32 scalar. Rows with a negative label cost nothing: their logits are never computed.
pub fn linear_cross_entropy(h: &Tensor, head: &Tensor, labels: &[i64], denom: f64) -> Result<Tensor> {
    if h.device().is_cuda() {
        return linear_cross_entropy_chunked(h, head, labels, denom, None, None);
    }
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

// ---------------------------------------------------------------------------------------------------------------
// The chunked path (CUDA, and any device): tensor ops only, a chunk of labelled rows at a time.
// ---------------------------------------------------------------------------------------------------------------

/// Bytes of one row chunk's f32 logits that [`linear_cross_entropy_chunked`] aims for.
const CHUNK_LOGIT_BYTES: usize = 128 << 20;
/// Bytes of the f32 copy of a non-f32 head made at a time (the head is widened a piece of rows at a time).
const HEAD_PIECE_BYTES: usize = 64 << 20;

/// logits (c, V) = x (c, d) · headᵀ (d, V), f32; the head widened `piece` rows at a time.
fn head_product(x: &Tensor, head: &Tensor, piece: usize) -> Result<Tensor> {
    let (vocab, _) = head.dims2()?;
    if piece >= vocab {
        return x.matmul(&head.to_dtype(DType::F32)?.t()?);
    }
    let logits = Tensor::zeros((x.dim(0)?, vocab), DType::F32, x.device())?;
    for v0 in (0..vocab).step_by(piece) {
        let w = head.narrow(0, v0, piece.min(vocab - v0))?.to_dtype(DType::F32)?; // (vp, d)
        logits.slice_set(&x.matmul(&w.t()?)?, 1, v0)?; // (c, vp) into columns v0..
    }
    Ok(logits)
}

/// dx (c, d) = dlogits (c, V) · head (V, d), f32; the head widened `piece` rows at a time.
fn head_back(dl: &Tensor, head: &Tensor, piece: usize) -> Result<Tensor> {
    let (vocab, _) = head.dims2()?;
    if piece >= vocab {
        return dl.matmul(&head.to_dtype(DType::F32)?);
    }
    let mut acc: Option<Tensor> = None;
    for v0 in (0..vocab).step_by(piece) {
        let vp = piece.min(vocab - v0);
        let w = head.narrow(0, v0, vp)?.to_dtype(DType::F32)?; // (vp, d)
        let part = dl.narrow(1, v0, vp)?.contiguous()?.matmul(&w)?; // (c, vp)·(vp, d)
        acc = Some(match acc {
            Some(a) => (a + part)?,
            None => part,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("linear_cross_entropy: empty vocabulary".into()))
}

/// [`linear_cross_entropy`] in candle tensor ops on any device: the path CUDA takes, callable on the CPU so that
/// tests run exactly the GPU's code. Labelled rows go `rows` at a time (default: a chunk's f32 logits within
/// 128 MiB); a non-f32 head is widened `piece` rows at a time (default 64 MiB of f32), an f32 head used as is.
/// Per chunk: logits (f32), log-sum-exp, the loss (summed in f64) and dh = (softmax − onehot)·W / denom, so the
/// full logits never exist. The loss is an f32 scalar; its backward returns dh·g in h's dtype.
pub(crate) fn linear_cross_entropy_chunked(
    h: &Tensor,
    head: &Tensor,
    labels: &[i64],
    denom: f64,
    rows: Option<usize>,
    piece: Option<usize>,
) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (vocab, dw) = head.dims2()?;
    if dw != d || labels.len() != n {
        candle_core::bail!("linear_cross_entropy: h {n}×{d}, head {vocab}×{dw}, {} labels", labels.len());
    }
    let mut idx = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if l >= 0 {
            if l as usize >= vocab {
                candle_core::bail!("label {l} at row {i} is outside the vocabulary ({vocab})");
            }
            idx.push(i as u32);
        }
    }
    let rows = rows.unwrap_or(CHUNK_LOGIT_BYTES / (vocab * 4).max(1)).max(1);
    let piece = match piece {
        Some(p) => p.max(1),
        None if head.dtype() == DType::F32 => vocab,
        None => (HEAD_PIECE_BYTES / (d * 4).max(1)).max(1),
    };
    let (hd, head, dev) = (h.detach().contiguous()?, head.detach().contiguous()?, h.device());
    let want_grad = h.track_op();
    let mut total = Tensor::zeros((), DType::F64, dev)?;
    let mut dhs = Vec::new();
    for chunk in idx.chunks(rows) {
        let c = chunk.len();
        let tgt: Vec<u32> = chunk.iter().map(|&i| labels[i as usize] as u32).collect();
        let tgt = Tensor::from_vec(tgt, (c, 1), dev)?;
        let hc = hd.index_select(&Tensor::new(chunk, dev)?, 0)?.to_dtype(DType::F32)?; // (c, d)
        let (e, se) = {
            let logits = head_product(&hc, &head, piece)?; // (c, V)
            let m = logits.max_keepdim(1)?; // (c, 1)
            let e = logits.broadcast_sub(&m)?.exp()?; // (c, V)
            let se = e.sum_keepdim(1)?; // (c, 1)
                                        // loss rows: lse − logit[label] = m + ln Σ e − logit[label]
            let loss = ((m + se.log()?)? - logits.gather(&tgt, 1)?)?;
            total = (total + loss.to_dtype(DType::F64)?.sum_all()?)?;
            (e, se)
        };
        if want_grad {
            // dlogits (c, V) = (softmax − onehot) / denom
            let dl = e.broadcast_div(&(se * denom)?)?;
            drop(e);
            dl.scatter_add_set(&tgt, &Tensor::full((-1.0 / denom) as f32, (c, 1), dev)?, 1)?;
            dhs.push(head_back(&dl, &head, piece)?); // (c, d)
        }
    }
    let loss = (total / denom)?.to_dtype(DType::F32)?;
    if !want_grad {
        return Ok(loss);
    }
    let mut dh = Tensor::zeros((n, d), DType::F32, dev)?;
    if !idx.is_empty() {
        // scatter the labelled rows' gradients into (n, d); unlabelled rows get 0
        dh = dh.index_add(&Tensor::new(idx.as_slice(), dev)?, &Tensor::cat(&dhs, 0)?, 0)?;
    }
    let dh = Mutex::new(Some(dh.to_dtype(h.dtype())?));
    super::graft::graft1(h, loss, "linear-cross-entropy-chunked", move |_h, _loss, g| {
        let dh = dh.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?.take();
        match dh {
            Some(dh) => Ok(Some(dh.broadcast_mul(&g.detach().to_dtype(dh.dtype())?)?)),
            None => candle_core::bail!("linear_cross_entropy: backward called twice"),
        }
    })
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
            std::slice::from_ref(&h),
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

    #[test]
    fn chunked_matches_kernel_and_reference() {
        let head = rand(&[300, 16], 24);
        // 200 rows, every 7th unlabelled (171 labelled): row chunks of 1, 7 and 50 (none divides 171), the head in
        // one piece and in pieces of 64 rows (the last one 44).
        let labels: Vec<i64> = (0..200).map(|i| if i % 7 == 0 { -100 } else { (i * 37 % 300) as i64 }).collect();
        let h = rand(&[200, 16], 25);
        for (rows, piece) in [(1, None), (7, Some(64)), (50, None), (50, Some(64))] {
            let chunked =
                |t: &[Tensor]| linear_cross_entropy_chunked(&t[0], &head, &labels, 150.0, Some(rows), piece).unwrap();
            compare_with_reference(
                std::slice::from_ref(&h),
                chunked,
                |t| linear_cross_entropy(&t[0], &head, &labels, 150.0).unwrap(),
                1e-5,
            );
            compare_with_reference(
                std::slice::from_ref(&h),
                chunked,
                |t| super::super::reference::linear_cross_entropy(&t[0], &head, &labels, 150.0).unwrap(),
                1e-5,
            );
        }
        // No labelled row: loss 0, gradient 0.
        let none = vec![-100i64; 200];
        let (l, g) = forward_backward(std::slice::from_ref(&h), &|t| {
            linear_cross_entropy_chunked(&t[0], &head, &none, 1.0, None, None).unwrap()
        });
        assert_eq!(l.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(max_abs_diff(&g[0], &g[0].zeros_like().unwrap()), 0.0);
        // A label outside the vocabulary is an error.
        assert!(linear_cross_entropy_chunked(&h, &head, &[300; 200], 1.0, None, None).is_err());
    }

    #[test]
    fn chunked_gradient_and_bf16() {
        let head = rand(&[11, 6], 26);
        let labels = vec![3i64, -100, 0, 10, 7];
        check_grad(&[5, 6], |h| linear_cross_entropy_chunked(h, &head, &labels, 4.0, Some(2), Some(4)).unwrap(), 1e-2);
        let head = rand(&[300, 16], 27);
        let labels: Vec<i64> = (0..100).map(|i| if i % 5 == 0 { -100 } else { (i * 13 % 300) as i64 }).collect();
        let h = rand(&[100, 16], 28);
        // bf16 h and head (the head widened in pieces): an f32 loss and bf16 dh, within bf16 rounding of f32.
        let run = |dt: DType| {
            let head = head.to_dtype(dt).unwrap();
            forward_backward(&[h.to_dtype(dt).unwrap()], &|t| {
                linear_cross_entropy_chunked(&t[0], &head, &labels, 80.0, Some(30), Some(128)).unwrap()
            })
        };
        let (l32, g32) = run(DType::F32);
        let (l16, g16) = run(DType::BF16);
        assert_eq!(l16.dtype(), DType::F32);
        assert_eq!(g16[0].dtype(), DType::BF16);
        assert!(rel_l2(&l16, &l32) < 1e-2, "loss {l16} vs {l32}");
        assert!(rel_l2(&g16[0], &g32[0]) < BF16_TOL);
    }
}
