// Inverted dropout with a counter-based mask (src/ops/dropout.rs has the CPU kernel and `mix64`):
//   keep(i) = mix64(key ^ i·0x9e3779b97f4a7c15) ≥ threshold,   y[i] = x[i]·(keep(i) ? 1/(1−p) : 0)
// key = mix64(seed) and threshold = ⌊p·(2⁶⁴−1)⌋ come from the host, so the GPU draws the CPU's mask bit for bit
// (u64 arithmetic wraps identically). The backward is the same op applied to the gradient (same seed, same mask).
//
// Kernels: dropout_<x>(x, y, n, key, threshold, keep), <x> ∈ {f32, bf16}.
// Grid: (min(⌈n/256⌉, …), 1, 1) × 256 threads, grid-stride loop.

#include "common.cuh"

using namespace peftkit;

namespace {

// splitmix64's finaliser, as `mix64` in src/ops/dropout.rs.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ __forceinline__ void dropout(const T* __restrict__ x, T* __restrict__ y, uint64_t n, uint64_t key,
                                        uint64_t threshold, float keep) {
    for (uint64_t i = first_index(); i < n; i += grid_stride()) {
        const float m = mix64(key ^ (i * 0x9e3779b97f4a7c15ull)) < threshold ? 0.0f : keep;
        store(y, i, __fmul_rn(load(x, i), m));
    }
}

}  // namespace

#define DROPOUT_KERNEL(S, T)                                                                                         \
    extern "C" __global__ void __launch_bounds__(PEFTKIT_THREADS)                                                    \
        dropout_##S(const T* x, T* y, uint64_t n, uint64_t key, uint64_t threshold, float keep) {                    \
        dropout<T>(x, y, n, key, threshold, keep);                                                                   \
    }

DROPOUT_KERNEL(f32, float)
DROPOUT_KERNEL(bf16, __nv_bfloat16)
