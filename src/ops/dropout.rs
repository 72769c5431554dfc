//! Inverted dropout with a counter-based generator: each element is kept with probability 1 − p and scaled by
//! 1/(1 − p); the mask is a pure function of (seed, element index), so a resumed run draws exactly the masks an
//! uninterrupted one would, with no generator state to save, and any device can draw the same mask (a CUDA kernel
//! computing [`mix64`] per element gives the CPU's bits: `src/ops/cuda/dropout.cu` does). Backward: g ⊙ mask, the
//! same op applied to the gradient (same seed, same element indices), so it runs wherever the gradient is. No mask
//! is stored: each kernel draws it while it multiplies.
//! Reference: Srivastava et al. (2014); the mixer is splitmix64's finaliser (Steele et al., 2014).

use crate::host::{f32_view, storage_from_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A 64-bit mix (splitmix64's finaliser).
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// x ⊙ mask(seed, index): the forward pass and, applied to the gradient, the backward one.
struct Dropout {
    p: f64,
    seed: u64,
}

/// What every kernel needs to draw the mask: `key` = mix64(seed), the drop `threshold` on the mixed index, and the
/// multiplier `keep` = 1/(1 − p) of a kept element (as f32, the value [`dropout_mask`] writes).
struct MaskParams {
    key: u64,
    threshold: u64,
    keep: f32,
}

fn mask_params(p: f64, seed: u64) -> MaskParams {
    MaskParams { key: mix64(seed), threshold: (p * (u64::MAX as f64)) as u64, keep: 1.0 / (1.0 - p) as f32 }
}

/// The multiplier of element `i` (0 or `keep`).
#[inline(always)]
fn multiplier(m: &MaskParams, i: u64) -> f32 {
    if mix64(m.key ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) < m.threshold {
        0.0
    } else {
        m.keep
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(s, l, "dropout")?;
        let m = mask_params(self.p, self.seed);
        let out = x.par_iter().enumerate().map(|(i, a)| a * multiplier(&m, i as u64)).collect::<Vec<f32>>();
        Ok((storage_from_f32(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self as k, alloc, elementwise, launched, suffix, view};
        use candle_core::cuda::cudarc::driver::{DeviceRepr, PushKernelArg};
        use candle_core::cuda::CudaDType;
        use candle_core::{CudaStorage, DType};

        fn go<T: CudaDType + DeviceRepr>(s: &CudaStorage, l: &Layout, m: &MaskParams) -> Result<CudaStorage> {
            let dev = s.device();
            let x = view::<T>(s, l, "dropout")?;
            let n = x.len();
            let mut y = alloc::<T>(dev, n)?;
            if n > 0 {
                let f = k::func(dev, &k::DROPOUT, &format!("dropout_{}", suffix(s.dtype(), "dropout")?))?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                let n64 = n as u64;
                b.arg(&x).arg(&mut y).arg(&n64).arg(&m.key).arg(&m.threshold).arg(&m.keep);
                // SAFETY: the arguments match dropout.cu's signature; x and y hold n elements.
                launched(unsafe { b.launch(elementwise(n)) })?;
            }
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        let m = mask_params(self.p, self.seed);
        let out = match s.dtype() {
            DType::F32 => go::<f32>(s, l, &m)?,
            DType::BF16 => go::<half::bf16>(s, l, &m)?,
            other => candle_core::bail!("dropout: the CUDA kernel takes f32 or bf16, not {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = Dropout { p: self.p, seed: self.seed };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// Inverted dropout: each element kept with probability 1 − p and scaled by 1/(1 − p). The mask depends only on
/// `seed` and the element's index.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if !super::use_kernel(x, true) {
        return super::reference::dropout(x, p, seed);
    }
    x.contiguous()?.apply_op1(Dropout { p, seed })
}

/// The mask as a tensor of `x`'s shape, dtype and device (for the reference composition).
pub(crate) fn mask_like(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    Tensor::from_vec(dropout_mask(x.elem_count(), p, seed), x.shape(), &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())
}

/// The inverted-dropout multipliers (0 or 1/(1 − p)) of `n` elements for `seed`.
pub(crate) fn dropout_mask(n: usize, p: f64, seed: u64) -> Vec<f32> {
    let m = mask_params(p, seed);
    (0..n as u64).into_par_iter().map(|i| multiplier(&m, i)).collect()
}

/// Mixes several integers into one seed (for per-step, per-layer dropout streams).
pub fn seed_of(parts: &[u64]) -> u64 {
    parts.iter().fold(0x5eed_u64, |acc, &p| mix64(acc ^ mix64(p)))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use candle_core::DType;

    #[test]
    fn dropout_gradient_rate_and_determinism() {
        check_grad(&[4, 16], |x| dropout(x, 0.3, 7).unwrap(), 1e-2);
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        let y: Vec<f32> = dropout(&x, 0.25, 3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.25).abs() < 0.02, "dropped {zeros}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let y2: Vec<f32> = dropout(&x, 0.25, 3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, y2);
    }

    #[test]
    fn the_mask_is_pinned() {
        // Resumed runs and the CUDA kernel (src/ops/cuda/dropout.cu; scripts/kernel-emu.sh prints the same 16 values)
        // rely on these exact bits: the first multipliers for p = 0.3, seed 7.
        let k = 1.0 / 0.7f32;
        let want = [k, k, k, k, k, k, k, 0.0, k, k, k, k, 0.0, k, 0.0, 0.0];
        assert_eq!(dropout_mask(16, 0.3, 7), want);
    }

    #[test]
    fn kernel_matches_reference_and_bf16_keeps_the_mask() {
        let x = rand(&[6, 10], 16);
        compare_with_reference(
            std::slice::from_ref(&x),
            |t| dropout(&t[0], 0.4, 5).unwrap(),
            |t| super::super::reference::dropout(&t[0], 0.4, 5).unwrap(),
            1e-6,
        );
        compare_bf16_with_f32(std::slice::from_ref(&x), |t| dropout(&t[0], 0.4, 5).unwrap(), BF16_TOL);
        // The same elements are dropped in bf16.
        let z32: Vec<f32> = dropout(&x, 0.4, 5).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let z16: Vec<f32> = dropout(&x.to_dtype(DType::BF16).unwrap(), 0.4, 5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(z32.iter().zip(&z16).all(|(a, b)| (*a == 0.0) == (*b == 0.0)));
    }
}
