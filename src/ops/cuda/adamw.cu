// Fused AdamW step for f32 parameters, in place (src/train/optim.rs has the composed version and the semantics,
// torch.optim.AdamW's):
//   m ← β₁·m + (1−β₁)·g;  v ← β₂·v + (1−β₂)·g²;  p ← p·(1 − lr·wd) − lr·(m·(1/c₁)) / (√(v·(1/c₂)) + ε)
// with c₁ = 1 − β₁ᵗ, c₂ = 1 − β₂ᵗ. The scalars arrive as the f32 values candle's scalar ops use on the CPU, and every
// product, sum, quotient and square root is rounded once in f32 in the CPU's order (no fused multiply-add), so the
// kernel reproduces the composed CPU step's values (candle's scalar ops also add a +0.0, which can only turn a −0
// into +0).
//
// Kernel: adamw_step_f32(p, g, m, v, n, b1, one_minus_b1, b2, one_minus_b2, decay, inv_c1, inv_c2, eps, lr).
// Grid: (min(⌈n/256⌉, …), 1, 1) × 256 threads, grid-stride loop.

#include "common.cuh"

using namespace peftkit;

extern "C" __global__ void __launch_bounds__(PEFTKIT_THREADS)
    adamw_step_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                   uint64_t n, float b1, float one_minus_b1, float b2, float one_minus_b2, float decay, float inv_c1,
                   float inv_c2, float eps, float lr) {
    for (uint64_t i = first_index(); i < n; i += grid_stride()) {
        const float gv = g[i];
        const float mv = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gv, one_minus_b1));
        const float vv = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gv, gv), one_minus_b2));
        const float den = __fadd_rn(__fsqrt_rn(__fmul_rn(vv, inv_c2)), eps);
        const float update = __fdiv_rn(__fmul_rn(mv, inv_c1), den);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fmul_rn(update, lr));
        m[i] = mv;
        v[i] = vv;
    }
}
