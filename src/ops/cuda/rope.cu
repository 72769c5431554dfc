// Rotary position embedding, transformers' "rotate_half" layout (src/ops/rope.rs has the CPU kernel):
//   y[i] = x[i]·cos − x[i+h]·s,   y[i+h] = x[i+h]·cos + x[i]·s,   s = sign·sin,  i < h = d/2
// x, y: (b, t, heads, d) contiguous, f32 or bf16; cos, sin: (t, d/2) f32. sign = −1 is the backward (the inverse
// rotation). One thread per (row, i) pair, grid-stride loop; each product and sum is rounded once in f32 in the
// CPU kernel's order (no fused multiply-add), so f32 results equal the CPU's bit for bit.
//
// Kernels: rope_<x>(x, cos, sin, y, t, heads, half, sign, pairs), <x> ∈ {f32, bf16}; pairs = elements / 2.
// Grid: (min(⌈pairs/256⌉, 65535·…), 1, 1) × 256 threads.

#include "common.cuh"

using namespace peftkit;

namespace {

template <typename T>
__device__ __forceinline__ void rope(const T* __restrict__ x, const float* __restrict__ cos,
                                     const float* __restrict__ sin, T* __restrict__ y, uint32_t t, uint32_t heads,
                                     uint32_t half, float sign, uint64_t pairs) {
    for (uint64_t p = first_index(); p < pairs; p += grid_stride()) {
        const uint64_t row = p / half;  // (batch, position, head)
        const uint32_t i = (uint32_t)(p - row * half);
        const uint32_t pos = (uint32_t)((row / heads) % t);
        const uint64_t at = row * 2 * half + i;
        const float x1 = load(x, at), x2 = load(x, at + half);
        const float c = cos[(uint64_t)pos * half + i];
        const float s = __fmul_rn(sign, sin[(uint64_t)pos * half + i]);
        store(y, at, __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
        store(y, at + half, __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
    }
}

}  // namespace

#define ROPE_KERNEL(S, T)                                                                                            \
    extern "C" __global__ void __launch_bounds__(PEFTKIT_THREADS)                                                    \
        rope_##S(const T* x, const float* cos, const float* sin, T* y, uint32_t t, uint32_t heads, uint32_t half,    \
                 float sign, uint64_t pairs) {                                                                       \
        rope<T>(x, cos, sin, y, t, heads, half, sign, pairs);                                                        \
    }

ROPE_KERNEL(f32, float)
ROPE_KERNEL(bf16, __nv_bfloat16)
