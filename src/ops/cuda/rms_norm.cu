// RMSNorm over the last dimension with a frozen weight (src/ops/rms_norm.rs has the CPU kernels and the formulas):
//   forward   y  = x·r·w,                       r = (Σx²/d + ε)^-½
//   backward  dx = r·u − x·r³·(Σ u⊙x)/d,        u = dy⊙w   (w frozen: no dw)
// One block per row (blockDim.x threads, a multiple of 32), statistics summed in f32 by warp shuffles and one
// shared-memory step (common.cuh). x, y, dy, dx share one dtype (f32 or bf16), w has its own.
//
// Kernels: rms_norm_fwd_<x>_<w>(x, w, y, d, eps), rms_norm_bwd_<x>_<w>(x, w, dy, dx, d, eps), <x>, <w> ∈ {f32, bf16}.
// Grid: (rows, 1, 1), rows = elements / d.

#include "common.cuh"

using namespace peftkit;

namespace {

template <typename TX, typename TW>
__device__ __forceinline__ void rms_norm_fwd(const TX* __restrict__ x, const TW* __restrict__ w, TX* __restrict__ y,
                                             uint32_t d, float eps) {
    const uint64_t base = (uint64_t)blockIdx.x * d;
    float ss[1] = {0.0f};
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = load(x, base + i);
        ss[0] = fmaf(v, v, ss[0]);
    }
    block_sum(ss);
    const float r = 1.0f / sqrtf(ss[0] / (float)d + eps);
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        store(y, base + i, __fmul_rn(__fmul_rn(load(x, base + i), r), load(w, i)));
    }
}

template <typename TX, typename TW>
__device__ __forceinline__ void rms_norm_bwd(const TX* __restrict__ x, const TW* __restrict__ w,
                                             const TX* __restrict__ dy, TX* __restrict__ dx, uint32_t d, float eps) {
    const uint64_t base = (uint64_t)blockIdx.x * d;
    float s[2] = {0.0f, 0.0f};  // Σx², Σ(dy⊙w)⊙x
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = load(x, base + i);
        const float u = __fmul_rn(load(dy, base + i), load(w, i));
        s[0] = fmaf(v, v, s[0]);
        s[1] = fmaf(u, v, s[1]);
    }
    block_sum(s);
    const float r = 1.0f / sqrtf(s[0] / (float)d + eps);
    const float c = r * r * r * s[1] / (float)d;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float u = __fmul_rn(load(dy, base + i), load(w, i));
        store(dx, base + i, __fsub_rn(__fmul_rn(r, u), __fmul_rn(load(x, base + i), c)));
    }
}

}  // namespace

#define RMS_NORM_KERNELS(SX, TX, SW, TW)                                                                            \
    extern "C" __global__ void __launch_bounds__(1024)                                                               \
        rms_norm_fwd_##SX##_##SW(const TX* x, const TW* w, TX* y, uint32_t d, float eps) {                           \
        rms_norm_fwd<TX, TW>(x, w, y, d, eps);                                                                       \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(1024)                                                               \
        rms_norm_bwd_##SX##_##SW(const TX* x, const TW* w, const TX* dy, TX* dx, uint32_t d, float eps) {            \
        rms_norm_bwd<TX, TW>(x, w, dy, dx, d, eps);                                                                  \
    }

RMS_NORM_KERNELS(f32, float, f32, float)
RMS_NORM_KERNELS(f32, float, bf16, __nv_bfloat16)
RMS_NORM_KERNELS(bf16, __nv_bfloat16, f32, float)
RMS_NORM_KERNELS(bf16, __nv_bfloat16, bf16, __nv_bfloat16)
