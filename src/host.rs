//! Host (CPU) tensor data as the CPU kernels see it: contiguous f32 views of f32 or bf16 storage, bf16 ↔ f32
//! conversion, and the per-ISA compilation of element-wise loops.
//!
//! Every CPU kernel in [`crate::ops`] computes in f32. A bf16 input is widened to f32 (exact) on the way in and
//! the result rounded back to bf16 (round to nearest, ties to even, as torch's `.to(torch.bfloat16)`) on the way
//! out; an f32 input is read in place. This is the mixed-precision contract of [`crate::compute`]: storage in bf16,
//! arithmetic and accumulation in f32.
//!
//! [`isa_variants!`] compiles one loop body three times — for AVX-512, AVX2+FMA and baseline x86-64 — and the
//! `*_at(isa, …)` entry picks one at run time ([`crate::cpu::isa`]); tests call each level and compare.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;
use std::borrow::Cow;

/// Defines `pub fn $name(args)` (at [`crate::cpu::isa`]) and `pub fn $name_at(isa, args)`, whose body is compiled
/// once per instruction-set level so the compiler vectorizes it at that width. The body must be safe code.
macro_rules! isa_variants {
    ($(#[$m:meta])* pub fn $name:ident / $name_at:ident ($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $crate::host::isa_variants! {
            $(#[$m])* pub fn $name / $name_at ($($arg: $ty),*) -> () $body
        }
    };
    ($(#[$m:meta])* pub fn $name:ident / $name_at:ident ($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) -> $ret {
            $name_at(crate::cpu::isa(), $($arg),*)
        }
        /// The same at a given level; a level above the CPU's runs the highest one it has.
        pub fn $name_at(isa: crate::cpu::Isa, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                fn v512($($arg: $ty),*) -> $ret $body
                #[target_feature(enable = "avx2,fma")]
                fn v256($($arg: $ty),*) -> $ret $body
                let isa = isa.min(crate::cpu::features().max_isa());
                match isa {
                    // SAFETY: the level is capped by what the CPU reports.
                    crate::cpu::Isa::Avx512 => return unsafe { v512($($arg),*) },
                    crate::cpu::Isa::Avx2 => return unsafe { v256($($arg),*) },
                    crate::cpu::Isa::Scalar => {}
                }
            }
            let _ = isa;
            $body
        }
    };
}
pub(crate) use isa_variants;

/// Elements per parallel chunk of the conversion loops.
const CHUNK: usize = 1 << 14;

/// bf16 → f32, one value: the 16 bits become the high half of the f32 (exact).
#[inline(always)]
fn widen(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

/// f32 → bf16, round to nearest even; NaN stays NaN (quiet).
#[inline(always)]
fn narrow(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Σ a\[i\]·b\[i\] over 16 independent lanes (so that it vectorizes at any width; the same sum at every level).
#[inline(always)]
pub fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len().min(b.len()) / 16 * 16;
    for (ca, cb) in a[..n].chunks_exact(16).zip(b[..n].chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in a[n..].iter().zip(&b[n..]) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a\[i\] over 16 independent lanes (vectorizes at any width; the same sum at every level).
#[inline(always)]
pub fn sum_lanes(a: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len() / 16 * 16;
    for c in a[..n].chunks_exact(16) {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + a[n..].iter().sum::<f32>()
}

/// max over 16 independent lanes (vectorizes at any width); −∞ for an empty slice.
#[inline(always)]
pub fn max_lanes(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let n = a.len() / 16 * 16;
    for c in a[..n].chunks_exact(16) {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(&a[n..]) {
        m = m.max(v);
    }
    m
}

/// eˣ in f32 without a libm call, so that loops over it vectorize: x = n·ln2 + r with |r| ≤ ln2/2, eʳ by Cephes'
/// degree-6 minimax polynomial (`expf.c`), 2ⁿ by building the exponent bits. Relative error ≤ 2⁻²² (a couple of
/// ulp) for x in [−87.3, 88.7]; below, the result is that of −87.3 (≈ 1e-38, harmless in the sums and products
/// it feeds); above, +∞; NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    if x > 88.722_83 {
        return f32::INFINITY;
    }
    let x = if x < -87.336_54 { -87.336_54 } else { x }; // (not f32::max, which would turn NaN into the bound)
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    // 2ⁿ as 2^⌊n/2⌋ · 2^(n − ⌊n/2⌋): each factor's exponent field stays valid for n in [−126, 128].
    let n = n as i32;
    let h = n >> 1;
    y * f32::from_bits(((h + 127) as u32) << 23) * f32::from_bits(((n - h + 127) as u32) << 23)
}

isa_variants! {
    /// dst\[i\] = src\[i\] as f32 (single-threaded; see [`bf16_to_f32`]).
    pub fn widen_slice / widen_slice_at(src: &[u16], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = widen(s);
        }
    }
}

isa_variants! {
    /// dst\[i\] = bf16(src\[i\]) with round-to-nearest-even (single-threaded; see [`f32_to_bf16`]).
    pub fn narrow_slice / narrow_slice_at(src: &[f32], dst: &mut [u16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = narrow(s);
        }
    }
}

fn as_bits(v: &[bf16]) -> &[u16] {
    // SAFETY: bf16 is a repr(transparent) u16.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) }
}

fn as_bits_mut(v: &mut [bf16]) -> &mut [u16] {
    // SAFETY: bf16 is a repr(transparent) u16.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u16, v.len()) }
}

/// Widens bf16 to f32 into `dst` (same length), in parallel for large inputs.
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    let src = as_bits(src);
    if src.len() <= CHUNK {
        return widen_slice(src, dst);
    }
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| widen_slice(s, d));
}

/// Rounds f32 to bf16 (nearest even) into `dst` (same length), in parallel for large inputs.
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    let dst = as_bits_mut(dst);
    if src.len() <= CHUNK {
        return narrow_slice(src, dst);
    }
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| narrow_slice(s, d));
}

/// The contiguous data of a CPU storage seen through `layout`, as f32: borrowed when it is f32, widened when bf16.
pub fn f32_view<'a>(storage: &'a CpuStorage, layout: &Layout, op: &'static str) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: input must be contiguous") };
    match storage {
        CpuStorage::F32(v) => Ok(Cow::Borrowed(&v[start..end])),
        CpuStorage::BF16(v) => {
            let mut out = vec![0f32; end - start];
            bf16_to_f32(&v[start..end], &mut out);
            Ok(Cow::Owned(out))
        }
        other => candle_core::bail!("{op}: expected f32 or bf16 data, got {:?}", other.dtype()),
    }
}

/// f32 results stored as `dtype` (f32 as is, bf16 rounded).
pub fn storage_from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    match dtype {
        DType::F32 => Ok(CpuStorage::F32(v)),
        DType::BF16 => Ok(CpuStorage::BF16(narrowed(&v))),
        other => candle_core::bail!("CPU kernels store f32 or bf16, not {other:?}"),
    }
}

/// A CPU tensor of `dtype` from f32 results.
pub fn tensor_from_f32(v: Vec<f32>, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    let shape = shape.into();
    if shape.elem_count() != v.len() {
        candle_core::bail!("tensor_from_f32: {} values for shape {shape:?}", v.len());
    }
    match dtype {
        DType::F32 => Tensor::from_vec(v, shape, &Device::Cpu),
        DType::BF16 => Tensor::from_vec(narrowed(&v), shape, &Device::Cpu),
        other => candle_core::bail!("CPU kernels store f32 or bf16, not {other:?}"),
    }
}

/// `v` rounded to bf16 (nearest even).
fn narrowed(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    f32_to_bf16(v, &mut out);
    out
}

/// Runs `f` on the contiguous data of a CPU tensor (f32 or bf16) as f32.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(&f32_view(cpu, layout, "with_f32")?)),
        _ => candle_core::bail!("expected a CPU tensor, found one on {:?}", t.device().location()),
    }
}

/// The contiguous bf16 data of a CPU tensor (no copy), or None for another dtype or device.
pub fn with_bf16<R>(t: &Tensor, f: impl FnOnce(&[bf16]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}

/// Levels this CPU can run, lowest first (for tests that compare them).
#[cfg(test)]
pub fn available_isas() -> Vec<crate::cpu::Isa> {
    use crate::cpu::Isa;
    [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= crate::cpu::features().max_isa()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_matches_the_half_crate_on_every_level() {
        // Ties, subnormals, infinities, large and small values: half's bf16::from_f32 is round-to-nearest-even.
        let mut xs: Vec<f32> =
            vec![0.0, -0.0, 1.0, -1.5, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE];
        xs.extend([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 1e-40, -3.0e38, 65504.0]);
        let mut s = 0x1234_5678u32;
        for _ in 0..5000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = f32::from_bits(s);
            if !x.is_nan() {
                xs.push(x);
            }
        }
        let want: Vec<u16> = xs.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        for isa in available_isas() {
            let mut got = vec![0u16; xs.len()];
            narrow_slice_at(isa, &xs, &mut got);
            assert_eq!(got, want, "{isa:?}");
            let mut back = vec![0f32; xs.len()];
            widen_slice_at(isa, &got, &mut back);
            for (b, w) in back.iter().zip(&want) {
                assert_eq!(b.to_bits(), bf16::from_bits(*w).to_f32().to_bits(), "{isa:?}");
            }
        }
        let mut nan = [0u16];
        narrow_slice(&[f32::NAN], &mut nan);
        assert!(bf16::from_bits(nan[0]).is_nan());
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm_on_every_level() {
        // Dense over the range softmax and sigmoid use, plus the ends.
        let xs: Vec<f32> = (-197_000..=201_000).map(|i| i as f32 * 4.4e-4).chain([-87.0, 88.5, -1e-30, 0.0]).collect();
        let mut worst = 0f64;
        for &x in &xs {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4e-7, "relative error {worst:e}");
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(-1000.0) >= 0.0);
        assert!(exp_f32(88.7).is_finite() && ((exp_f32(88.7) as f64 / (88.7f32 as f64).exp()) - 1.0).abs() < 4e-7);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(max_lanes(&[]), f32::NEG_INFINITY);
        let v: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        assert_eq!(max_lanes(&v), 50.0);
    }

    #[test]
    fn views_and_round_trips() {
        let v: Vec<f32> = (0..40000).map(|i| (i as f32 * 0.37).sin() * 100.0).collect();
        let t = tensor_from_f32(v.clone(), (200, 200), DType::BF16).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        let want: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        let got = with_f32(&t, |s| s.to_vec()).unwrap();
        assert_eq!(got, want);
        // candle's own conversion agrees
        let c: Vec<f32> = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(c, want);
    }
}
