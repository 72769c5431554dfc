//! PiSSA and OLoRA: LoRA initialisations that move part of the frozen weight into the adapter, and the conversion
//! of such an adapter back to a plain LoRA adapter for the original weight.
//!
//! For a projection W (out × in), rank r and scale s (lora_alpha / r, or lora_alpha / √r with rsLoRA):
//! - **PiSSA** (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation"): with the
//!   thin SVD W = U·diag(S)·Vᵀ and S' = S[..r] / s, A = diag(√S')·V[:, ..r]ᵀ (r × in), B = U[:, ..r]·diag(√S')
//!   (out × r). `pissa_niter_N` takes U, S, V from a randomized SVD with N subspace iterations instead (Halko et
//!   al. 2009, algorithm 5.1, as `torch.svd_lowrank(W, q=r, niter=N)` computes it, which PEFT uses).
//! - **OLoRA** (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation"): with the thin QR W = Q·R, A = R[..r, :],
//!   B = Q[:, ..r] — unscaled, as PEFT does.
//!
//! In both the frozen base becomes the residual W_res = W − s·B·A, so the model starts where it was: W_res + s·B·A
//! = W. The factorisations run in f64 on the CPU (faer); A and B are kept in f32 and W_res is computed from them,
//! as PEFT computes it from its f32 A and B, then stored in the base's dtype. Singular vectors and QR factors are
//! defined up to the sign of each component (torch and faer may choose differently); B·A and W_res are not.
//!
//! **Conversion** (PEFT's `save_pretrained(path_initial_model_for_weight_conversion=…)`, `subtract_mutated_init`):
//! after training, W_res + s·B·A = W + s·(B·A − B₀·A₀), where A₀, B₀ are the initial values. That is the plain
//! LoRA adapter of rank 2r A' = [A; A₀] (2r × in), B' = [B, −B₀] (out × 2r) on the original W, saved with r and
//! lora_alpha doubled (so s is unchanged; with rsLoRA lora_alpha·√2) and `init_lora_weights: true`.
//! Reference: PEFT `tuners/lora/layer.py` (`pissa_init`, `olora_init`), `peft_model.py` (`save_pretrained`),
//! `tuners/lora/model.py` (`subtract_mutated_init`).

use candle_core::{Device, Tensor};
use faer::Mat;

use super::lora::{normal, LoraInit};

/// Why a PiSSA/OLoRA initialisation could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "adapter.r: {module} is {out}×{inp}, so rank {r} exceeds min(out, in) = {}: {init} initialisation needs r \
         singular vectors / QR columns; lower adapter.r",
        .out.min(.inp)
    )]
    RankTooLarge { module: String, out: usize, inp: usize, r: usize, init: &'static str },
    #[error("{module}: the SVD of the weight did not converge ({msg})")]
    Svd { module: String, msg: String },
}

/// The starting A₀ (r × in) and B₀ (out × r) of an adapter whose initialisation rewrote its base weight: the
/// conversion back to a plain LoRA adapter needs them.
#[derive(Debug, Clone)]
pub struct InitialAdapter {
    /// (r, in), f32 on the CPU.
    pub a: Tensor,
    /// (out, r), f32 on the CPU.
    pub b: Tensor,
}

/// Whether `init` rewrites the base weight (PiSSA, OLoRA).
pub fn rewrites_base(init: LoraInit) -> bool {
    matches!(init, LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora)
}

/// A₀ (r × in) and B₀ (out × r), row-major f32, for the weight `w` (out × in, row-major f32) by `init` (OLoRA,
/// else PiSSA: `PissaNiter` randomized, any other full). `rng` draws the Gaussian test matrix of the randomized SVD (`pissa_niter_N` only).
#[allow(clippy::too_many_arguments)]
pub fn decompose(
    w: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    scaling: f64,
    init: LoraInit,
    module: &str,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<(Vec<f32>, Vec<f32>), InitError> {
    let name = match init {
        LoraInit::Olora => "olora",
        _ => "pissa",
    };
    if r > out.min(inp) {
        return Err(InitError::RankTooLarge { module: module.to_string(), out, inp, r, init: name });
    }
    let wm = Mat::<f64>::from_fn(out, inp, |i, j| w[i * inp + j] as f64);
    let svd_err = |e: faer::linalg::svd::SvdError| InitError::Svd { module: module.to_string(), msg: format!("{e:?}") };
    let (a, b) = match init {
        LoraInit::Olora => {
            let qr = wm.qr();
            let q = qr.compute_thin_Q(); // (out, k)
            let rr = qr.thin_R(); // (k, in)
            let a: Vec<f32> =
                (0..r).flat_map(|i| (0..inp).map(move |j| (i, j))).map(|(i, j)| rr[(i, j)] as f32).collect();
            let b: Vec<f32> =
                (0..out).flat_map(|i| (0..r).map(move |j| (i, j))).map(|(i, j)| q[(i, j)] as f32).collect();
            (a, b)
        }
        // PiSSA (the only other initialisation that rewrites the base).
        _ => {
            // U (out, ≥r), S (≥r), V (in, ≥r): the leading r singular triplets.
            let (u, s, v) = match init {
                LoraInit::PissaNiter(niter) => svd_lowrank(&wm, r, niter, rng).map_err(svd_err)?,
                _ => {
                    let svd = wm.thin_svd().map_err(svd_err)?;
                    let s: Vec<f64> = (0..r).map(|i| svd.S().column_vector()[i]).collect();
                    (svd.U().to_owned(), s, svd.V().to_owned())
                }
            };
            // √(S / s), as PEFT divides S by the scale before the square root.
            let root: Vec<f64> = s.iter().map(|x| (x / scaling).sqrt()).collect();
            let a: Vec<f32> =
                (0..r).flat_map(|i| (0..inp).map(move |j| (i, j))).map(|(i, j)| (root[i] * v[(j, i)]) as f32).collect();
            let b: Vec<f32> =
                (0..out).flat_map(|i| (0..r).map(move |j| (i, j))).map(|(i, j)| (u[(i, j)] * root[j]) as f32).collect();
            (a, b)
        }
    };
    Ok((a, b))
}

/// W_res = W − s·B·A (out × in, row-major f32), summed in f64.
pub fn residual(w: &[f32], a: &[f32], b: &[f32], out: usize, inp: usize, r: usize, scaling: f64) -> Vec<f32> {
    use rayon::prelude::*;
    let mut res = vec![0f32; out * inp];
    res.par_chunks_mut(inp.max(1)).enumerate().for_each(|(i, row)| {
        for (j, x) in row.iter_mut().enumerate() {
            let mut d = 0f64;
            for k in 0..r {
                d += b[i * r + k] as f64 * a[k * inp + j] as f64;
            }
            *x = (w[i * inp + j] as f64 - scaling * d) as f32;
        }
    });
    res
}

/// U (m × q), S (q), V (n × q).
type Triplets = (Mat<f64>, Vec<f64>, Mat<f64>);

/// The randomized SVD of `a` (m × n) with q components and `niter` subspace iterations, as
/// `torch.svd_lowrank(a, q, niter)`: returns U (m × q), S (q), V (n × q).
fn svd_lowrank(
    a: &Mat<f64>,
    q: usize,
    niter: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Triplets, faer::linalg::svd::SvdError> {
    // Work on the tall orientation, as torch does.
    let tall = a.nrows() >= a.ncols();
    let a: Mat<f64> = if tall { a.clone() } else { a.transpose().to_owned() };
    let n = a.ncols();
    let orth = |x: Mat<f64>| x.qr().compute_thin_Q();
    let r = Mat::<f64>::from_fn(n, q, |_, _| normal(rng));
    let mut basis = orth(&a * &r); // (m, q)
    for _ in 0..niter {
        let z = orth(a.transpose() * &basis); // (n, q)
        basis = orth(&a * &z); // (m, q)
    }
    let small = basis.transpose() * &a; // (q, n)
    let svd = small.thin_svd()?;
    let u = &basis * svd.U(); // (m, q)
    let s: Vec<f64> = (0..q).map(|i| svd.S().column_vector()[i]).collect();
    let v = svd.V().to_owned(); // (n, q)
    Ok(if tall { (u, s, v) } else { (v, s, u) })
}

/// Initialises one projection: A₀ and B₀ as tensors (f32, on `device`) and the residual weight (out × in, f32 on
/// the CPU) from the dense weight `w` (out × in).
pub fn init_projection(
    w: &Tensor,
    r: usize,
    scaling: f64,
    init: LoraInit,
    module: &str,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<(InitialAdapter, Tensor), super::AdapterError> {
    let (out, inp) = w.dims2()?;
    let data: Vec<f32> = w.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    let (a, b) = decompose(&data, out, inp, r, scaling, init, module, rng)?;
    let res = residual(&data, &a, &b, out, inp, r, scaling);
    let initial = InitialAdapter {
        a: Tensor::from_vec(a, (r, inp), &Device::Cpu)?,
        b: Tensor::from_vec(b, (out, r), &Device::Cpu)?,
    };
    Ok((initial, Tensor::from_vec(res, (out, inp), &Device::Cpu)?))
}

/// The residual weight for given A₀, B₀ (resuming a run: no factorisation, the checkpoint's values).
pub fn residual_of(w: &Tensor, initial: &InitialAdapter, scaling: f64) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let r = initial.a.dims2()?.0;
    let f = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()
    };
    let res = residual(&f(w)?, &f(&initial.a)?, &f(&initial.b)?, out, inp, r, scaling);
    Tensor::from_vec(res, (out, inp), &Device::Cpu)
}

/// The plain LoRA pair for the original weight: A' = [A; A₀] (2r × in), B' = [B, −B₀] (out × 2r).
pub fn convert(a: &Tensor, b: &Tensor, initial: &InitialAdapter) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = a.device();
    let a0 = initial.a.to_device(dev)?.to_dtype(a.dtype())?;
    let b0 = initial.b.to_device(dev)?.to_dtype(b.dtype())?;
    Ok((Tensor::cat(&[a, &a0], 0)?, Tensor::cat(&[b, &b0.neg()?], 1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] as f64 * b[l * n + j] as f64).sum();
            }
        }
        c
    }

    /// W = U·diag(σ)·Vᵀ with orthonormal U, V from QR of seeded Gaussian matrices and a fast-decaying σ.
    fn low_rank_heavy(out: usize, inp: usize, rng: &mut rand_chacha::ChaCha8Rng) -> (Vec<f32>, Vec<f64>) {
        let k = out.min(inp);
        let g1 = Mat::<f64>::from_fn(out, k, |_, _| normal(rng));
        let g2 = Mat::<f64>::from_fn(inp, k, |_, _| normal(rng));
        let (u, v) = (g1.qr().compute_thin_Q(), g2.qr().compute_thin_Q());
        let sigma: Vec<f64> = (0..k).map(|i| 10.0 * 0.5f64.powi(i as i32)).collect();
        let w = Mat::<f64>::from_fn(out, inp, |i, j| (0..k).map(|l| u[(i, l)] * sigma[l] * v[(j, l)]).sum());
        ((0..out * inp).map(|x| w[(x / inp, x % inp)] as f32).collect(), sigma)
    }

    #[test]
    fn residual_plus_update_is_the_weight_for_every_init() {
        let mut rng = super::super::lora::init_rng(7);
        let (out, inp, r, s) = (24, 16, 4, 2.0);
        let (w, _) = low_rank_heavy(out, inp, &mut rng);
        for init in [LoraInit::Pissa, LoraInit::PissaNiter(4), LoraInit::Olora] {
            let (a, b) = decompose(&w, out, inp, r, s, init, "m", &mut rng).unwrap();
            let res = residual(&w, &a, &b, out, inp, r, s);
            let ba = matmul(&b, &a, out, r, inp);
            let err = (0..out * inp).map(|i| (res[i] as f64 + s * ba[i] - w[i] as f64).abs()).fold(0.0, f64::max);
            assert!(err <= 1e-5, "{init:?}: W_res + s·B·A differs from W by {err}");
        }
    }

    #[test]
    fn randomized_pissa_finds_the_top_subspace_of_a_decaying_spectrum() {
        // Closed form: for W with singular values 10·2⁻ⁱ, the best rank-r approximation is the top-r SVD part,
        // and ‖W − W_r‖ = σ_r; the randomized SVD with a few iterations gets B·A within a small factor of it.
        let mut rng = super::super::lora::init_rng(11);
        for (out, inp) in [(40, 24), (24, 40)] {
            let (w, sigma) = low_rank_heavy(out, inp, &mut rng);
            let (r, s) = (4, 1.5);
            let (a0, b0) = decompose(&w, out, inp, r, s, LoraInit::Pissa, "m", &mut rng).unwrap();
            let (a1, b1) = decompose(&w, out, inp, r, s, LoraInit::PissaNiter(8), "m", &mut rng).unwrap();
            let (p0, p1) = (matmul(&b0, &a0, out, r, inp), matmul(&b1, &a1, out, r, inp));
            let diff = (0..out * inp).map(|i| s * (p0[i] - p1[i])).map(|d| d * d).sum::<f64>().sqrt();
            assert!(diff <= 1e-3 * sigma[0], "{out}×{inp}: randomized vs full PiSSA differ by {diff}");
            // The residual of the full SVD has norm² Σ_{i≥r} σᵢ².
            let res = residual(&w, &a0, &b0, out, inp, r, s);
            let norm = res.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let want = sigma[r..].iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - want).abs() <= 1e-5 * sigma[0], "{norm} vs {want}");
        }
    }

    #[test]
    fn a_rank_above_the_smaller_dimension_is_an_error() {
        let mut rng = super::super::lora::init_rng(1);
        let w = vec![1f32; 6 * 3];
        let e = decompose(&w, 6, 3, 4, 1.0, LoraInit::Olora, "model.layers.0.mlp.up_proj", &mut rng).unwrap_err();
        assert_eq!(
            e.to_string(),
            "adapter.r: model.layers.0.mlp.up_proj is 6×3, so rank 4 exceeds min(out, in) = 3: olora initialisation \
             needs r singular vectors / QR columns; lower adapter.r"
        );
    }
}
