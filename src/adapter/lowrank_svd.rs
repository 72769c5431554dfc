//! The truncated SVD of a matrix given as a product of thin factors, Δ = P·Q with P (m, k) and Q (k, n), k small:
//! what PEFT's `svd` combination computes with `torch.linalg.svd` on the full (m, n) Δ, at the cost of the factors.
//!
//! Qᵀ = Y·R (thin QR, Y (n, k) orthonormal columns, R (k, k) upper triangular; modified Gram–Schmidt, twice), so
//! Δ = (P·Rᵀ)·Yᵀ = C·Yᵀ with C (m, k). One-sided Jacobi rotations (Hestenes 1958; Demmel & Veselić 1992) make the
//! columns of C·V mutually orthogonal: C·V = U·diag(σ), hence Δ = U·diag(σ)·(Y·V)ᵀ — the SVD of Δ, exact in
//! exact arithmetic. Everything is in f64. The k of a combination is the sum of the adapters' ranks (tens), so the
//! work is O((m + n)·k²) instead of the O(m·n·min(m, n)) of a dense SVD; no linear-algebra crate is needed for it.
//!
//! The singular vectors of a distinct singular value are unique up to sign only; callers compare U·diag(σ)·Vᵀ.

/// The `rank` leading singular triplets of P·Q, as (U·diag(σ) (m, rank), Vᵀ (rank, n)) row-major, and σ. `p` is
/// (m, k) row-major, `q` (k, n) row-major. Singular values are in decreasing order; when `rank` exceeds k the
/// extra columns and rows are zero (their singular values are 0).
pub fn truncated_svd(
    p: &[f64],
    q: &[f64],
    m: usize,
    k: usize,
    n: usize,
    rank: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    debug_assert_eq!(p.len(), m * k);
    debug_assert_eq!(q.len(), k * n);
    // Rows of Q are the columns of Qᵀ: Gram–Schmidt on them.
    let mut y: Vec<Vec<f64>> = Vec::with_capacity(k);
    let mut r = vec![0.0f64; k * k]; // (k, k) upper triangular, row-major
    for j in 0..k {
        let mut v = q[j * n..(j + 1) * n].to_vec();
        let norm0 = dot(&v, &v).sqrt();
        for _pass in 0..2 {
            for (i, yi) in y.iter().enumerate() {
                let c = dot(yi, &v);
                r[i * k + j] += c;
                axpy(-c, yi, &mut v);
            }
        }
        let norm = dot(&v, &v).sqrt();
        if norm > 1e-13 * norm0.max(f64::MIN_POSITIVE) {
            r[j * k + j] = norm;
            v.iter_mut().for_each(|x| *x /= norm);
        } else {
            // Dependent on the rows before: no new direction.
            v.iter_mut().for_each(|x| *x = 0.0);
        }
        y.push(v);
    }
    // C = P·Rᵀ, kept as k columns of length m: column i = Σ_j R[i][j]·P[:, j].
    let mut c: Vec<Vec<f64>> = (0..k)
        .map(|i| {
            let mut col = vec![0.0f64; m];
            for j in i..k {
                let rij = r[i * k + j];
                if rij != 0.0 {
                    for (row, x) in col.iter_mut().enumerate() {
                        *x += rij * p[row * k + j];
                    }
                }
            }
            col
        })
        .collect();
    // V (k, k) as columns, starting from the identity.
    let mut v: Vec<Vec<f64>> = (0..k).map(|i| (0..k).map(|j| f64::from(u8::from(i == j))).collect()).collect();
    for _sweep in 0..80 {
        let mut rotated = false;
        for a in 0..k {
            for b in a + 1..k {
                let alpha = dot(&c[a], &c[a]);
                let beta = dot(&c[b], &c[b]);
                let gamma = dot(&c[a], &c[b]);
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let cs = 1.0 / (1.0 + t * t).sqrt();
                let sn = cs * t;
                rotate(&mut c, a, b, cs, sn);
                rotate(&mut v, a, b, cs, sn);
            }
        }
        if !rotated {
            break;
        }
    }
    let sigma: Vec<f64> = c.iter().map(|col| dot(col, col).sqrt()).collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| sigma[b].total_cmp(&sigma[a]));
    let mut us = vec![0.0f64; m * rank]; // (m, rank)
    let mut vt = vec![0.0f64; rank * n]; // (rank, n)
    let mut s = vec![0.0f64; rank];
    for (t, &i) in order.iter().take(rank).enumerate() {
        s[t] = sigma[i];
        if sigma[i] == 0.0 {
            continue;
        }
        for row in 0..m {
            us[row * rank + t] = c[i][row];
        }
        // Right singular vector: Y·v_i (n).
        let out = &mut vt[t * n..(t + 1) * n];
        for (j, yj) in y.iter().enumerate() {
            axpy(v[i][j], yj, out);
        }
    }
    (us, vt, s)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// y += a·x
fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// Columns a, b ← (cs·a − sn·b, sn·a + cs·b).
fn rotate(cols: &mut [Vec<f64>], a: usize, b: usize, cs: f64, sn: f64) {
    let (left, right) = cols.split_at_mut(b);
    for (x, y) in left[a].iter_mut().zip(right[0].iter_mut()) {
        let (xa, yb) = (*x, *y);
        *x = cs * xa - sn * yb;
        *y = sn * xa + cs * yb;
    }
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

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    #[test]
    fn a_known_decomposition_is_recovered() {
        // Δ = diag(3, 2, 1) embedded in (4, 5), given as P = Δ[:, :3]… through a rotation of the factors.
        let (m, k, n) = (4, 3, 5);
        let p = vec![3.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let q = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let (_, _, s) = truncated_svd(&p, &q, m, k, n, 3);
        for (got, want) in s.iter().zip([3.0, 2.0, 1.0]) {
            assert!((got - want).abs() < 1e-12, "{s:?}");
        }
    }

    #[test]
    fn full_rank_reconstructs_and_truncation_is_optimal() {
        let mut seed = 7;
        let (m, k, n) = (9, 4, 7);
        let p: Vec<f64> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        // Q with a repeated row: rank 3, not 4.
        let mut q: Vec<f64> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let row1 = q[n..2 * n].to_vec();
        q[3 * n..4 * n].copy_from_slice(&row1);
        let delta = matmul(&p, &q, m, k, n);
        let (us, vt, s) = truncated_svd(&p, &q, m, k, n, 5);
        let back = matmul(&us, &vt, m, 5, n);
        let err = delta.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "{err}");
        assert!(s[3] < 1e-12 && s[4] == 0.0 && s[0] >= s[1] && s[1] >= s[2], "{s:?}");
        // Rows of Vᵀ for nonzero σ are orthonormal.
        for a in 0..3 {
            for b in 0..3 {
                let d = dot(&vt[a * n..(a + 1) * n], &vt[b * n..(b + 1) * n]);
                assert!((d - f64::from(u8::from(a == b))).abs() < 1e-12, "{a} {b} {d}");
            }
        }
        // Rank 1: the error is σ₂ (Eckart–Young, spectral norm) ≥ its Frobenius error / √rank… check Frobenius.
        let (us1, vt1, _) = truncated_svd(&p, &q, m, k, n, 1);
        let back1 = matmul(&us1, &vt1, m, 1, n);
        let fro: f64 = delta.iter().zip(&back1).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let want = (s[1] * s[1] + s[2] * s[2]).sqrt();
        assert!((fro - want).abs() < 1e-10, "{fro} vs {want}");
    }
}
