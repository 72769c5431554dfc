// Host shim (scripts/kernel-emu.sh): just enough of CUDA to run the kernels' source as C++ threads (one std::thread per CUDA thread).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __shared__ static
inline std::barrier<>* g_bar;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float shfl_slots[1024];
inline float __shfl_xor_sync(unsigned, float v, int off) {
    unsigned t = threadIdx.x;
    shfl_slots[t] = v;
    __syncthreads();
    float r = shfl_slots[t ^ off];
    __syncthreads();
    return r;
}
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t b = (uint32_t)h.x << 16; float f; std::memcpy(&f, &b, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t b; std::memcpy(&b, &f, 4);
    if (std::isnan(f)) return {(uint16_t)((b >> 16) | 0x40)};
    return {(uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16)};
}
