//! Attention for generation on the CPU: a few new query rows against the cached keys and values, with no graph.
//!
//! A decode step has one query row per head and a KV cache of s positions: per head, s dot products of length d,
//! a softmax over s scores and a weighted sum of s value rows, some 2·s·d flops. Through the fused training op
//! ([`fn@super::attention`]) each head costs two calls into the `gemm` crate, whose dispatch and packing dominate at
//! this size; here each head is a plain loop compiled per instruction-set level ([`crate::host::isa_variants`])
//! and the heads share [`crate::pool`]. Same formula as the fused op: scores and sums in f32, causal with the
//! queries being the last t of the s positions.

use crate::host::{dot_lanes, exp_f32, max_lanes, sum_lanes, tensor_from_f32, with_f32};
use candle_core::{Result, Tensor};

/// Query rows up to which [`fn@super::attention`] takes this path (decode steps; prompts take the fused op).
pub(crate) const MAX_ROWS: usize = 4;

/// Whether `q`, `k`, `v` are a CPU decode step with no gradient wanted.
pub(crate) fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    q.device().is_cpu() && q.rank() == 4 && q.dims()[1] <= MAX_ROWS && !(q.track_op() || k.track_op() || v.track_op())
}

crate::host::isa_variants! {
    /// o = softmax(scale · K·q)ᵀ·V for one query row `q` (d) against `n` key and value rows of `k`, `v` that start
    /// every `stride` values; `scores` holds at least n values of scratch.
    pub fn attend_row / attend_row_at(
        q: &[f32], k: &[f32], v: &[f32], stride: usize, n: usize, scale: f32, scores: &mut [f32], o: &mut [f32]
    ) {
        let d = q.len();
        let scores = &mut scores[..n];
        for (j, sc) in scores.iter_mut().enumerate() {
            *sc = scale * dot_lanes(q, &k[j * stride..j * stride + d]);
        }
        let m = max_lanes(scores);
        for sc in scores.iter_mut() {
            *sc = exp_f32(*sc - m);
        }
        let inv = 1.0 / sum_lanes(scores);
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            for (a, b) in o.iter_mut().zip(&v[j * stride..j * stride + d]) {
                *a += p * b;
            }
        }
        for a in o.iter_mut() {
            *a *= inv;
        }
    }
}

/// Causal grouped-query attention as [`fn@super::attention`]: q (b, t, nh, d), k and v (b, s, nkv, d), s ≥ t.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, t, nh, d) = q.dims4()?;
    let (bk, s, nkv, dk) = k.dims4()?;
    if k.dims() != v.dims() || bk != b || dk != d || nkv == 0 || nh % nkv != 0 || s < t {
        candle_core::bail!("attention: incompatible q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    }
    let mut out = vec![0f32; b * t * nh * d];
    with_f32(q, |q| {
        with_f32(k, |k| {
            with_f32(v, |v| {
                let rows = crate::pool::SharedOut::new(&mut out);
                crate::pool::global().run(b * nh, &|bh| {
                    let (bi, h) = (bh / nh, bh % nh);
                    let g = h / (nh / nkv);
                    let (kb, vb) = (&k[(bi * s * nkv + g) * d..], &v[(bi * s * nkv + g) * d..]);
                    let mut scores = vec![0f32; s];
                    for i in 0..t {
                        let at = ((bi * t + i) * nh + h) * d;
                        // SAFETY: task (bi, h) alone writes the rows of head h of batch bi; `out` outlives the loop.
                        let o = unsafe { std::slice::from_raw_parts_mut(rows.at(at), d) };
                        attend_row(&q[at..at + d], kb, vb, nkv * d, s - t + i + 1, scale as f32, &mut scores, o);
                    }
                });
            })
        })
    })???;
    tensor_from_f32(out, (b, t, nh, d), q.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn decode_rows_match_the_reference_at_every_level() {
        let dev = Device::Cpu;
        for (b, t, s, nh, nkv) in [(1, 1, 1, 9, 3), (1, 1, 37, 9, 3), (2, 3, 20, 4, 2), (1, 4, 4, 2, 2)] {
            let d = 64;
            let q = Tensor::randn(0f32, 1.0, (b, t, nh, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, s, nkv, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, s, nkv, d), &dev).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            assert!(applies(&q, &k, &v));
            let want = crate::ops::reference::attention(&q, &k, &v, scale).unwrap();
            let got = attention(&q, &k, &v, scale).unwrap();
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{b} {t} {s} {nh} {nkv}: {diff}");
            // The bf16 path: widened in, rounded out.
            let got16 = attention(&q.to_dtype(candle_core::DType::BF16).unwrap(), &k, &v, scale).unwrap();
            assert_eq!(got16.dtype(), candle_core::DType::BF16);
        }
        // Every instruction-set level gives the same row within rounding.
        let (q, k) = (vec![0.3f32; 64], (0..64 * 5).map(|i| (i as f32 * 0.01).sin()).collect::<Vec<_>>());
        let mut outs = vec![];
        for isa in crate::host::available_isas() {
            let (mut sc, mut o) = (vec![0f32; 5], vec![0f32; 64]);
            attend_row_at(isa, &q, &k, &k, 64, 5, 0.125, &mut sc, &mut o);
            outs.push(o);
        }
        for o in &outs[1..] {
            assert!(o.iter().zip(&outs[0]).all(|(a, b)| (a - b).abs() < 1e-5));
        }
    }

    #[test]
    fn training_inputs_do_not_take_this_path() {
        let dev = Device::Cpu;
        let q = Var::randn(0f32, 1.0, (1, 1, 2, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 3, 2, 8), &dev).unwrap();
        assert!(!applies(q.as_tensor(), &k, &k));
        let q = Tensor::randn(0f32, 1.0, (1, MAX_ROWS + 1, 2, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, MAX_ROWS + 1, 2, 8), &dev).unwrap();
        assert!(!applies(&q, &k, &k));
    }
}
