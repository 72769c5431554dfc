//! f32 GEMM on the CPU through the `gemm` crate (what candle itself uses), with (row, column) strides so that
//! transposed and strided operands need no copy.
//!
//! The crate picks its kernel once per process from the CPU's flags: AVX-512 where `avx512f` is present (peftkit
//! builds it with `x86-v4`), else AVX2/FMA, else scalar. bf16 operands reach these products widened to f32 (see
//! [`crate::host`] and [`crate::weight`]); a native bf16 product (AVX512-BF16 `vdpbf16ps`, AMX tiles) would be a
//! second entry here with the same signature over bf16 data, selected at run time.

/// `dst (m×n) = [dst +] alpha · lhs (m×k) · rhs (k×n)`, strides given as (row stride, column stride); `dst` is
/// row-major with row stride n.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    alpha: f32,
) {
    let threads = candle_core::utils::get_num_threads();
    let parallel = threads > 1 && m * n * k > 64 * 64 * 64;
    gemm_strided(m, n, k, dst, (n, 1), accumulate, lhs, lhs_strides, rhs, rhs_strides, alpha, parallel)
}

/// `dst = [dst +] alpha · lhs · rhs` with arbitrary (row, column) strides on all three operands.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    alpha: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() > (m - 1) * dst_strides.0 + (n - 1) * dst_strides.1, "gemm: dst too small");
    assert!(k == 0 || lhs.len() > (m - 1) * lhs_strides.0 + (k - 1) * lhs_strides.1, "gemm: lhs too small");
    assert!(k == 0 || rhs.len() > (k - 1) * rhs_strides.0 + (n - 1) * rhs_strides.1, "gemm: rhs too small");
    let par = if parallel {
        gemm::Parallelism::Rayon(candle_core::utils::get_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index the kernel reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides.1 as isize,
            dst_strides.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}
