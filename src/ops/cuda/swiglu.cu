// SwiGLU (src/ops/swiglu.rs has the CPU kernels):
//   forward   y  = silu(a)·b = a·σ(a)·b
//   backward  da = g·b·σ(a)·(1 + a·(1 − σ(a))),  db = g·silu(a)   — written to one (2, n) buffer: da, then db
// Element-wise, f32 arithmetic, a, b, g and the outputs in one dtype (f32 or bf16). σ uses expf (the CPU kernel a
// polynomial eˣ within 2⁻²² relative): results agree to a few f32 ulp, not bit for bit.
//
// Kernels: swiglu_fwd_<x>(a, b, y, n), swiglu_bwd_<x>(a, b, g, dab, n), <x> ∈ {f32, bf16}.
// Grid: (min(⌈n/256⌉, …), 1, 1) × 256 threads, grid-stride loop.

#include "common.cuh"

using namespace peftkit;

namespace {

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                                           uint64_t n) {
    for (uint64_t i = first_index(); i < n; i += grid_stride()) {
        const float av = load(a, i);
        store(y, i, __fmul_rn(__fdiv_rn(av, 1.0f + expf(-av)), load(b, i)));
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ g,
                                           T* __restrict__ dab, uint64_t n) {
    for (uint64_t i = first_index(); i < n; i += grid_stride()) {
        const float av = load(a, i), bv = load(b, i), gv = load(g, i);
        const float sig = sigmoid(av);
        store(dab, i, __fmul_rn(__fmul_rn(__fmul_rn(gv, bv), sig), 1.0f + __fmul_rn(av, 1.0f - sig)));
        store(dab, n + i, __fmul_rn(__fmul_rn(gv, av), sig));
    }
}

}  // namespace

#define SWIGLU_KERNELS(S, T)                                                                                         \
    extern "C" __global__ void __launch_bounds__(PEFTKIT_THREADS)                                                    \
        swiglu_fwd_##S(const T* a, const T* b, T* y, uint64_t n) {                                                   \
        swiglu_fwd<T>(a, b, y, n);                                                                                   \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(PEFTKIT_THREADS)                                                    \
        swiglu_bwd_##S(const T* a, const T* b, const T* g, T* dab, uint64_t n) {                                     \
        swiglu_bwd<T>(a, b, g, dab, n);                                                                              \
    }

SWIGLU_KERNELS(f32, float)
SWIGLU_KERNELS(bf16, __nv_bfloat16)
