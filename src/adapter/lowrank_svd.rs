//! The truncated SVD of a matrix given as a product of thin factors, Δ = P·Q with P (m, k) and Q (k, n), k small:
//! what PEFT's `svd` combination computes with `torch.linalg.svd` on the full (m, n) Δ, at the cost of the factors.
//!
//! Thin QR of both factors (faer's Householder QR): P = Qp·Rp with Qp (m, kp) orthonormal columns, Rp (kp, k), and
//! Qᵀ = Qq·Rq with Qq (n, kq), Rq (kq, k), kp = min(m, k), kq = min(n, k). Then Δ = Qp·(Rp·Rqᵀ)·Qqᵀ, and the SVD of
//! the small core Rp·Rqᵀ = Uc·diag(σ)·Vcᵀ (faer's thin SVD, (kp, kq)) gives Δ = (Qp·Uc)·diag(σ)·(Qq·Vc)ᵀ: the SVD of
//! Δ, exact in exact arithmetic, since Qp·Uc and Qq·Vc have orthonormal columns. Everything is in f64. The k of a
//! combination is the sum of the adapters' ranks (tens), so the work is O((m + n)·k²) instead of the
//! O(m·n·min(m, n)) of a dense SVD of Δ, which is never formed.
//! Reference: Golub & Van Loan, *Matrix Computations* (4th ed.), §2.4 and §5.2 (SVD, thin QR); faer 0.24
//! (`Mat::qr`, `Mat::thin_svd`, singular values in nonincreasing order).
//!
//! The singular vectors of a distinct singular value are unique up to sign only; callers compare U·diag(σ)·Vᵀ.

use faer::Mat;

/// Why the truncated SVD of P·Q could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum LowRankSvdError {
    #[error(
        "the factors do not have the stated shapes: P has {p_len} values for ({m}, {k}), Q {q_len} for ({k}, {n})"
    )]
    Shape { p_len: usize, q_len: usize, m: usize, k: usize, n: usize },
    #[error("the SVD of the {rows}×{cols} core of the product did not converge ({msg})")]
    NoConvergence { rows: usize, cols: usize, msg: String },
}

/// U·diag(σ) (m, rank) and Vᵀ (rank, n), both row-major, and σ (rank).
pub type Truncated = (Vec<f64>, Vec<f64>, Vec<f64>);

/// The `rank` leading singular triplets of P·Q, as (U·diag(σ) (m, rank), Vᵀ (rank, n)) row-major, and σ. `p` is
/// (m, k) row-major, `q` (k, n) row-major. Singular values are in decreasing order; when `rank` exceeds
/// min(m, k, n) the extra columns and rows are zero (their singular values are 0).
pub fn truncated_svd(
    p: &[f64],
    q: &[f64],
    m: usize,
    k: usize,
    n: usize,
    rank: usize,
) -> Result<Truncated, LowRankSvdError> {
    if p.len() != m * k || q.len() != k * n {
        return Err(LowRankSvdError::Shape { p_len: p.len(), q_len: q.len(), m, k, n });
    }
    let mut us = vec![0.0f64; m * rank]; // (m, rank)
    let mut vt = vec![0.0f64; rank * n]; // (rank, n)
    let mut s = vec![0.0f64; rank];
    if m == 0 || k == 0 || n == 0 || rank == 0 {
        return Ok((us, vt, s)); // Δ = 0
    }
    let pm = Mat::<f64>::from_fn(m, k, |i, j| p[i * k + j]); // (m, k)
    let qt = Mat::<f64>::from_fn(n, k, |i, j| q[j * n + i]); // Qᵀ (n, k)
    let qr_p = pm.qr();
    let qr_q = qt.qr();
    let qp = qr_p.compute_thin_Q(); // (m, kp)
    let qq = qr_q.compute_thin_Q(); // (n, kq)
    let core = qr_p.thin_R() * qr_q.thin_R().transpose(); // (kp, k)·(k, kq) = (kp, kq)
    let svd = core.thin_svd().map_err(|e| LowRankSvdError::NoConvergence {
        rows: core.nrows(),
        cols: core.ncols(),
        msg: format!("{e:?}"),
    })?;
    let u = &qp * svd.U(); // (m, kp)·(kp, c) = (m, c), c = min(kp, kq)
    let v = &qq * svd.V(); // (n, kq)·(kq, c) = (n, c)
    let sigma = svd.S().column_vector(); // (c), nonincreasing
    for t in 0..rank.min(sigma.nrows()) {
        let st = sigma[t];
        s[t] = st;
        for row in 0..m {
            us[row * rank + t] = u[(row, t)] * st;
        }
        for (col, x) in vt[t * n..(t + 1) * n].iter_mut().enumerate() {
            *x = v[(col, t)];
        }
    }
    Ok((us, vt, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for l in 0..k {
                for j in 0..n {
                    out[i * n + j] += a[i * k + l] * b[l * n + j];
                }
            }
        }
        out
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    /// The singular values of the dense (m, n) matrix `a`, by faer's dense SVD (an independent computation: no QR
    /// of the factors, no small core).
    fn dense_sigma(a: &[f64], m: usize, n: usize) -> Vec<f64> {
        let am = Mat::<f64>::from_fn(m, n, |i, j| a[i * n + j]);
        am.singular_values().unwrap()
    }

    #[test]
    fn a_known_decomposition_is_recovered() {
        // Δ = diag(3, 2, 1) embedded in (4, 5): P = Δ[:, :3], Q = [I₃ 0].
        let (m, k, n) = (4, 3, 5);
        let p = vec![3.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let q = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let (_, _, s) = truncated_svd(&p, &q, m, k, n, 3).unwrap();
        for (got, want) in s.iter().zip([3.0, 2.0, 1.0]) {
            assert!((got - want).abs() < 1e-12, "{s:?}");
        }
    }

    #[test]
    fn matches_the_dense_product_and_its_dense_svd() {
        let mut seed = 11;
        let (m, k, n) = (23, 6, 17);
        let p: Vec<f64> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let q: Vec<f64> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let delta = matmul(&p, &q, m, k, n); // (m, n)
        let (us, vt, s) = truncated_svd(&p, &q, m, k, n, k).unwrap();
        let back = matmul(&us, &vt, m, k, n);
        let err = max_abs_diff(&delta, &back);
        assert!(err < 1e-12, "U·diag(σ)·Vᵀ differs from P·Q by {err}");
        let want = dense_sigma(&delta, m, n);
        let serr = max_abs_diff(&s, &want[..k]);
        assert!(serr < 1e-12, "σ {s:?} vs the dense SVD's {want:?}");
        assert!(want[k..].iter().all(|x| *x < 1e-12), "{want:?}");
        assert!(s.windows(2).all(|w| w[0] >= w[1]), "{s:?}");
    }

    #[test]
    fn rank_above_k_is_zero_padded() {
        let mut seed = 3;
        let (m, k, n) = (8, 2, 6);
        let p: Vec<f64> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let q: Vec<f64> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let (us, vt, s) = truncated_svd(&p, &q, m, k, n, 5).unwrap();
        assert!(s[1] > 0.0 && s[2..].iter().all(|x| *x == 0.0), "{s:?}");
        assert!((0..m).all(|i| us[i * 5 + 2..i * 5 + 5].iter().all(|x| *x == 0.0)));
        assert!(vt[2 * n..].iter().all(|x| *x == 0.0));
        let err = max_abs_diff(&matmul(&p, &q, m, k, n), &matmul(&us, &vt, m, 5, n));
        assert!(err < 1e-12, "{err}");
    }

    #[test]
    fn more_factors_than_rows_or_columns() {
        // k > m and k > n: the core Rp·Rqᵀ is (m, n) = (3, 4), not square.
        let mut seed = 5;
        let (m, k, n) = (3, 6, 4);
        let p: Vec<f64> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let q: Vec<f64> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let delta = matmul(&p, &q, m, k, n);
        let (us, vt, s) = truncated_svd(&p, &q, m, k, n, 4).unwrap();
        let err = max_abs_diff(&delta, &matmul(&us, &vt, m, 4, n));
        assert!(err < 1e-12, "{err}");
        let want = dense_sigma(&delta, m, n);
        assert!(max_abs_diff(&s[..3], &want) < 1e-12 && s[3] == 0.0, "{s:?} vs {want:?}");
    }

    #[test]
    fn wrong_factor_lengths_are_an_error() {
        let e = truncated_svd(&[1.0; 5], &[1.0; 6], 2, 3, 2, 1).unwrap_err();
        assert!(matches!(e, LowRankSvdError::Shape { p_len: 5, .. }), "{e}");
    }

    #[test]
    fn rank_deficient_reconstructs_and_truncation_is_optimal() {
        let mut seed = 7;
        let (m, k, n) = (9, 4, 7);
        let p: Vec<f64> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        // Q with a repeated row: rank 3, not 4.
        let mut q: Vec<f64> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let row1 = q[n..2 * n].to_vec();
        q[3 * n..4 * n].copy_from_slice(&row1);
        let delta = matmul(&p, &q, m, k, n);
        let (us, vt, s) = truncated_svd(&p, &q, m, k, n, 5).unwrap();
        let back = matmul(&us, &vt, m, 5, n);
        let err = max_abs_diff(&delta, &back);
        assert!(err < 1e-12, "{err}");
        assert!(s[3] < 1e-12 && s[4] == 0.0 && s[0] >= s[1] && s[1] >= s[2], "{s:?}");
        let want = dense_sigma(&delta, m, n);
        assert!(max_abs_diff(&s[..4], &want[..4]) < 1e-12, "{s:?} vs {want:?}");
        // Rows of Vᵀ for nonzero σ are orthonormal.
        for a in 0..3 {
            for b in 0..3 {
                let d = dot(&vt[a * n..(a + 1) * n], &vt[b * n..(b + 1) * n]);
                assert!((d - f64::from(u8::from(a == b))).abs() < 1e-12, "{a} {b} {d}");
            }
        }
        // Rank 1: the Frobenius error of the best rank-1 approximation is √(σ₂² + σ₃²) (Eckart–Young).
        let (us1, vt1, _) = truncated_svd(&p, &q, m, k, n, 1).unwrap();
        let back1 = matmul(&us1, &vt1, m, 1, n);
        let fro: f64 = delta.iter().zip(&back1).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let want = (s[1] * s[1] + s[2] * s[2]).sqrt();
        assert!((fro - want).abs() < 1e-10, "{fro} vs {want}");
    }
}
