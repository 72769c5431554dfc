// Shared by the training-primitive kernels (src/ops/cuda/*.cu): f32/bf16 loads and stores (every kernel computes in
// f32; bf16 is widened exactly on the way in and rounded to nearest-even on the way out, as src/host.rs does on the
// CPU), and the warp/block sums of the row kernels.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#define PEFTKIT_THREADS 256

namespace peftkit {

__device__ __forceinline__ float load(const float* p, uint64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, uint64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, uint64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, uint64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Sums each of v[0..N) over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// totals. Warp sums by shuffles, then each warp adds the per-warp partials itself (one barrier, fixed order).
// Call at most once per kernel (the partials are not reset).
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N]) {
    __shared__ float part[N][32];
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = (blockDim.x + 31u) >> 5;
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = warp_sum(v[k]);
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < N; ++k) part[k][warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = warp_sum(lane < warps ? part[k][lane] : 0.0f);
}

// The grid-stride loop's first index and stride, in 64 bits.
__device__ __forceinline__ uint64_t first_index() { return (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ uint64_t grid_stride() { return (uint64_t)gridDim.x * blockDim.x; }

}  // namespace peftkit
