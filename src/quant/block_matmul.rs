//! llama.cpp's Q4_1 and Q8_0 weights multiplied directly, for generation: y = x·Wᵀ with W in blocks of 32 and x
//! quantized to 8 bits per 32-element block on the fly, as ggml does (`ggml_vec_dot_q4_1_q8_1`,
//! `ggml_vec_dot_q8_0_q8_0`). candle 0.11.1 multiplies Q4_1 with scalar code only (10× slower than its Q8_0 kernel
//! on the SmolLM2 file), and runs its Q8_0 kernel on a spinning thread pool of its own that competes with rayon's
//! for the two cores; these are AVX2 versions on [`crate::pool`] (the calling thread works too), with a plain loop
//! beside them (other CPUs, test oracle). Decoding is bound by memory bandwidth (SmolLM2-135M reads 96 MB of
//! weights per token), so the AVX2 path takes four weight rows per activation block and prefetches the rows
//! [`PREFETCH_ROWS`] below: measured on the 2-core EPYC, a 1536×576 Q4_1 product out of cache went from 141 to 78 µs
//! (3.9 → 7.0 GB/s) and the 49152×576 Q8_0 head from 8.8 to 6.1 ms.
//!
//! ```text
//! Q4_1 block (20 bytes):  d: f16, m: f16, qs: [u8; 16]    w[j] = d·(qs[j] & 15) + m,  w[j+16] = d·(qs[j] >> 4) + m
//! Q8_0 block (34 bytes):  d: f16, qs: [i8; 32]             w[j] = d·qs[j]
//! x block (32 values):    d8 = max|x|/127, q8[i] = round(x[i]/d8) (i8), s8 = d8·Σq8
//! block dot:              Q4_1: Σ w·x ≈ d·d8·Σ q4·q8 + m·s8      Q8_0: Σ w·x ≈ d·d8·Σ qs·q8
//! ```
//! Reference: ggml's `block_q4_1`, `block_q8_0`, `block_q8_1` and their dot products (llama.cpp, ggml-quants.c).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Result, Tensor};
use half::f16;

const QK: usize = 32;

/// The block formats this file multiplies, with their bytes per 32 weights.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Q4_1,
    Q8_0,
}

impl Format {
    fn of(t: GgmlDType) -> Option<Self> {
        match t {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// Whether [`matmul`] takes weights of this type.
pub fn supports(t: GgmlDType) -> bool {
    Format::of(t).is_some()
}

/// One activation row quantized per 32-block: codes, scales d8 and d8·Σcodes.
struct Q8Row {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

fn quantize_row(x: &[f32]) -> Q8Row {
    let blocks = x.len() / QK;
    let mut r = Q8Row { q: vec![0; x.len()], d: vec![0.0; blocks], s: vec![0.0; blocks] };
    for b in 0..blocks {
        let xs = &x[b * QK..(b + 1) * QK];
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in r.q[b * QK..(b + 1) * QK].iter_mut().zip(xs) {
            let q = (v * inv).round() as i32;
            *o = q as i8;
            sum += q;
        }
        r.d[b] = d;
        r.s[b] = d * sum as f32;
    }
    r
}

/// Σ over the blocks of one weight row (`w`: its bytes) against one quantized activation row: the plain version.
fn dot_row_plain(f: Format, w: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(f.block_bytes()).enumerate() {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let q8 = &x.q[b * QK..(b + 1) * QK];
        match f {
            Format::Q4_1 => {
                let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                let mut isum = 0i32;
                for j in 0..16 {
                    isum += (blk[4 + j] & 15) as i32 * q8[j] as i32 + (blk[4 + j] >> 4) as i32 * q8[j + 16] as i32;
                }
                acc += d * x.d[b] * isum as f32 + m * x.s[b];
            }
            Format::Q8_0 => {
                let isum: i32 = blk[2..34].iter().zip(q8).map(|(&w, &q)| w as i8 as i32 * q as i32).sum();
                acc += d * x.d[b] * isum as f32;
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_row_avx2(w: &[u8], x: &Q8Row) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(15);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut macc = 0f32;
    for (b, blk) in w.chunks_exact(20).enumerate() {
        // d and m (two f16) widened by one F16C instruction.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]])));
        let d = _mm_cvtss_f32(dm);
        let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
        // 16 bytes of codes → 32 unsigned nibbles in element order (low nibbles 0..15, high nibbles 16..31).
        let v = _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        let q4 = _mm256_set_m128i(hi, lo);
        let q8 = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
        // u8 × i8 pairs summed to i16 (≤ 2·15·127), then pairs of those to i32.
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d[b]), _mm256_cvtepi32_ps(p), acc);
        macc += m * x.s[b];
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h) + macc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_row_q8_0_avx2(w: &[u8], x: &Q8Row) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i16::from_le_bytes([blk[0], blk[1]]) as u16 as i32)));
        let qw = _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i);
        let qx = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
        // i8 × i8 through maddubs (u8 × i8): |w| against x carrying w's sign.
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
        let p = _mm256_madd_epi16(p, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d[b]), _mm256_cvtepi32_ps(p), acc);
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}

/// How many weight rows ahead [`dot_rows4_avx2`] prefetches.
const PREFETCH_ROWS: usize = 8;

/// Four weight rows against one activation row: the activation block is loaded once per four rows, and the four
/// rows' accumulators are independent chains (one row at a time waits on one FMA chain and on one row's loads).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows4_avx2(f: Format, w: [&[u8]; 4], x: &Q8Row) -> [f32; 4] {
    use std::arch::x86_64::*;
    let bb = f.block_bytes();
    let blocks = x.d.len();
    for r in &w {
        assert!(r.len() >= blocks * bb, "block_matmul: short weight row");
    }
    let mask = _mm_set1_epi8(15);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut macc = [0f32; 4];
    let ahead = PREFETCH_ROWS * blocks * bb;
    for b in 0..blocks {
        let q8 = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
        let (dx, sx) = (*x.d.get_unchecked(b), *x.s.get_unchecked(b));
        for r in 0..4 {
            let blk = w[r].as_ptr().add(b * bb);
            // The same block of the rows 8 below (the weight streams from memory: decode is bandwidth-bound).
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(ahead) as *const i8);
            match f {
                Format::Q4_1 => {
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
                    let d = _mm_cvtss_f32(dm);
                    let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
                    let v = _mm_loadu_si128(blk.add(4) as *const __m128i);
                    let q4 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(p), acc[r]);
                    macc[r] += m * sx;
                }
                Format::Q8_0 => {
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const u16).read_unaligned() as i32)));
                    let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(q8, qw));
                    let p = _mm256_madd_epi16(p, ones);
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(p), acc[r]);
                }
            }
        }
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        let a = acc[r];
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        out[r] = _mm_cvtss_f32(h) + macc[r];
    }
    out
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::isa() >= crate::cpu::Isa::Avx2 && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dot_row(f: Format, w: &[u8], x: &Q8Row, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when the CPU has AVX2, FMA and F16C (has_avx2); the slices hold whole blocks.
        return unsafe {
            match f {
                Format::Q4_1 => dot_row_avx2(w, x),
                Format::Q8_0 => dot_row_q8_0_avx2(w, x),
            }
        };
    }
    let _ = simd;
    dot_row_plain(f, w, x)
}

/// y (…, n) = x (…, k) · Wᵀ for `w` an (n, k) Q4_1 or Q8_0 tensor on the CPU; f32 in, f32 out (x's dtype back).
pub fn matmul(x: &Tensor, w: &QTensor) -> Result<Tensor> {
    matmul_with(x, w, has_avx2())
}

pub(crate) fn matmul_with(x: &Tensor, w: &QTensor, simd: bool) -> Result<Tensor> {
    let Some(f) = Format::of(w.dtype()) else { candle_core::bail!("block_matmul: weight is {:?}", w.dtype()) };
    let (n, k) = w.shape().dims2()?;
    if k % QK != 0 || x.dims().last() != Some(&k) {
        candle_core::bail!("block_matmul: x {:?} against a {n}×{k} weight", x.dims());
    }
    let rows = x.elem_count() / k;
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let q8: Vec<Q8Row> = xs.chunks_exact(k).map(quantize_row).collect();
    let data = w.data()?;
    let row_bytes = k / QK * f.block_bytes();
    if data.len() != n * row_bytes {
        candle_core::bail!("block_matmul: {} bytes for a {n}×{k} {f:?} weight", data.len());
    }
    // Output rows of W in parallel (the decode pool: the caller works too, no wake-up per product), in chunks small
    // enough to balance the threads; each weight row is read once for all activation rows.
    let mut yt = vec![0f32; n * rows]; // (n, rows)
    let pool = crate::pool::global();
    let chunk = n.div_ceil(pool.threads() * 8).max(8);
    let out = crate::pool::SharedOut::new(&mut yt);
    let chunk = chunk.next_multiple_of(4);
    pool.run(n.div_ceil(chunk), &|c| {
        let (start, end) = (c * chunk, ((c + 1) * chunk).min(n));
        let row = |r: usize| &data[r * row_bytes..(r + 1) * row_bytes];
        // SAFETY (both writes): task c alone writes rows c·chunk … of yt, which outlives the loop.
        let mut r = start;
        #[cfg(target_arch = "x86_64")]
        if simd {
            while r + 4 <= end {
                for (j, xj) in q8.iter().enumerate() {
                    // SAFETY: AVX2/FMA/F16C present (`simd`); each row holds whole blocks (checked inside).
                    let y = unsafe { dot_rows4_avx2(f, [row(r), row(r + 1), row(r + 2), row(r + 3)], xj) };
                    for (i, v) in y.into_iter().enumerate() {
                        unsafe { *out.at((r + i) * rows + j) = v };
                    }
                }
                r += 4;
            }
        }
        for r in r..end {
            for (j, xj) in q8.iter().enumerate() {
                unsafe { *out.at(r * rows + j) = dot_row(f, row(r), xj, simd) };
            }
        }
    });
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    // (n, rows) → (rows, n)
    Tensor::from_vec(yt, (n, rows), &candle_core::Device::Cpu)?.t()?.contiguous()?.reshape(dims)?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn block_products_match_the_dequantized_weight_and_the_plain_loop() {
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            check(t);
        }
    }

    fn check(t: GgmlDType) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (n, k) = (70, 96);
        let wv: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0) + 0.3).collect();
        let w = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, t).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        for rows in [1, 3, 17] {
            let xv: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let x = Tensor::from_vec(xv, (rows, k), &Device::Cpu).unwrap();
            let want = x.matmul(&dense.t().unwrap()).unwrap();
            let plain = matmul_with(&x, &q, false).unwrap();
            let fast = matmul(&x, &q).unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale
            };
            // 8-bit activations: within 1% of the exact product of the stored weights.
            assert!(diff(&plain, &want) < 1e-2, "{t:?} {rows}: {}", diff(&plain, &want));
            // The SIMD loop is the plain loop (same integer sums; f32 sums in another order).
            assert!(diff(&fast, &plain) < 1e-5, "{t:?} {rows}: {}", diff(&fast, &plain));
        }
    }
}
