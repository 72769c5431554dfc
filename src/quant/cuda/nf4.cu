// NF4 (+ double quantization) kernels: fused dequantization, and fused dequantization + small-M GEMM.
//
// Format (bitsandbytes' `quantize_4bit(quant_type="nf4")`, see src/quant/nf4.rs): the flat row-major weight of n
// elements is cut into blocks of `bs` elements (a power of two, 32..4096; QLoRA uses 64). Element e is the nibble
// `packed[e/2] >> 4` when e is even (the FIRST element sits in the HIGH nibble) and `packed[e/2] & 15` when e is
// odd, and
//
//     w[e]       = code[nibble(e)] * scale[e / bs]
//     scale[b]   = absmax[b]                                        (plain)
//     scale[b]   = code2[q[b]] * absmax2[b / bs2] + offset          (double quantization, bs2 = 256)
//
// Every product and sum is rounded once in f32 in that order (__fmul_rn / __fadd_rn: no fused multiply-add), so the
// f32 results equal the CPU codec's bit for bit and the bf16 results are its values rounded to nearest-even.
//
// Kernels (all extern "C", launched from src/quant/cuda/dequant.rs and gemv.rs):
//   nf4_dequant_{bf16,f32}_{plain,double}   out[e] = w[e]: one pass, 16 packed bytes (32 elements) per thread and
//                                           grid-stride step, 16-byte stores; the n % 32 tail element by element.
//   nf4_gemm_{plain,double}_mt{1,2,3,4}     y (M x N, bf16) = x (M x K, bf16) . W^T for M <= 16*mt and K % 32 == 0,
//                                           bf16 tensor-core mma (m16n8k16, f32 accumulate), W dequantized into
//                                           registers; every packed weight byte is read once for all M rows; x is
//                                           staged in shared memory; optional split-K into an f32 workspace.
//   nf4_splitk_reduce                       y = bf16(sum of the split-K partials), in a fixed order.
//   nf4_gemm_generic_{plain,double}         the same product for any K (rows of W may start mid-byte and blocks may
//                                           straddle rows): one warp per output column, flat element indices.
//
// Reference: Dettmers et al., "QLoRA" (2023); bitsandbytes `csrc/kernels.cu` (kDequantizeBlockwise,
// kgemm_4bit_inference_naive) for the format; PTX ISA "Matrix Fragments for mma.m16n8k16" for the mma layout.
//
// Requires sm_80+ (mma.sync bf16, cvt.rn.bf16x2.f32). No CUDA headers beyond what nvcc includes by itself.

#include <stdint.h>

#define NF4_THREADS 256

namespace {

// ------------------------------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------------------------------

// Two f32 -> packed bf16x2 (round to nearest even); `lo` goes to the low 16 bits (the lower address / lower index).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ uint16_t to_bf16(float v) {
    uint16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}

__device__ __forceinline__ float bf16_to_f32(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// d (16x8, f32) += a (16x16, bf16, row-major) . b (16x8, bf16, "col": b's columns are contiguous in k).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------------------------------------------
// Block scales. `fetch` issues the global loads for block b (so they can be started early), `finish` turns the raw
// values into the f32 scale once the shared tables are ready.
// ------------------------------------------------------------------------------------------------------------------

struct RawScale {
    uint32_t a;  // plain: the absmax bits; double: q[b]
    float b;     // double: absmax2[b / bs2]
};

struct PlainScales {
    const float* __restrict__ absmax;

    __device__ __forceinline__ void stage(float* /*code2_s*/) const {}
    __device__ __forceinline__ RawScale fetch(uint64_t blk) const {
        RawScale r;
        r.a = __float_as_uint(__ldg(absmax + blk));
        r.b = 0.0f;
        return r;
    }
    __device__ __forceinline__ float finish(RawScale r, const float* /*code2_s*/) const { return __uint_as_float(r.a); }
};

struct DoubleScales {
    const uint8_t* __restrict__ q;
    const float* __restrict__ code2;
    const float* __restrict__ absmax2;
    float offset;
    uint32_t blocksize2;

    __device__ __forceinline__ void stage(float* code2_s) const {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) code2_s[i] = code2[i];
    }
    __device__ __forceinline__ RawScale fetch(uint64_t blk) const {
        RawScale r;
        r.a = __ldg(q + blk);
        r.b = __ldg(absmax2 + blk / blocksize2);
        return r;
    }
    __device__ __forceinline__ float finish(RawScale r, const float* code2_s) const {
        // Two roundings, as the CPU codec (and bitsandbytes' dequantize-then-add): never an FMA here.
        return __fadd_rn(__fmul_rn(code2_s[r.a], r.b), offset);
    }
};

// One packed byte -> the bf16x2 of its two elements (high nibble = first element = low half).
__device__ __forceinline__ uint32_t byte_to_bf16x2(uint32_t byte, float s, const float* code_s) {
    return pack_bf16x2(__fmul_rn(code_s[byte >> 4], s), __fmul_rn(code_s[byte & 15u], s));
}

// 4 packed bytes (8 elements) -> 8 bf16 in one uint4.
__device__ __forceinline__ uint4 word_to_bf16x8(uint32_t w, float s, const float* code_s) {
    return make_uint4(byte_to_bf16x2(w & 0xffu, s, code_s), byte_to_bf16x2((w >> 8) & 0xffu, s, code_s),
                      byte_to_bf16x2((w >> 16) & 0xffu, s, code_s), byte_to_bf16x2(w >> 24, s, code_s));
}

// 2 packed bytes (the low or high half of a word) -> 4 f32.
__device__ __forceinline__ float4 half_word_to_f32x4(uint32_t w16, float s, const float* code_s) {
    const uint32_t b0 = w16 & 0xffu, b1 = (w16 >> 8) & 0xffu;
    return make_float4(__fmul_rn(code_s[b0 >> 4], s), __fmul_rn(code_s[b0 & 15u], s), __fmul_rn(code_s[b1 >> 4], s),
                       __fmul_rn(code_s[b1 & 15u], s));
}

// ------------------------------------------------------------------------------------------------------------------
// (a) Dequantization
// ------------------------------------------------------------------------------------------------------------------

struct OutBf16 {
    uint16_t* __restrict__ p;
    // Elements 32c .. 32c+31 from the 16 bytes v: four 16-byte stores.
    __device__ __forceinline__ void chunk(uint64_t c, uint4 v, float s, const float* code_s) const {
        uint4* o = reinterpret_cast<uint4*>(p + (c << 5));
        o[0] = word_to_bf16x8(v.x, s, code_s);
        o[1] = word_to_bf16x8(v.y, s, code_s);
        o[2] = word_to_bf16x8(v.z, s, code_s);
        o[3] = word_to_bf16x8(v.w, s, code_s);
    }
    __device__ __forceinline__ void one(uint64_t e, float v) const { p[e] = to_bf16(v); }
};

struct OutF32 {
    float* __restrict__ p;
    // Elements 32c .. 32c+31 from the 16 bytes v: eight 16-byte stores.
    __device__ __forceinline__ void chunk(uint64_t c, uint4 v, float s, const float* code_s) const {
        float4* o = reinterpret_cast<float4*>(p + (c << 5));
        o[0] = half_word_to_f32x4(v.x & 0xffffu, s, code_s);
        o[1] = half_word_to_f32x4(v.x >> 16, s, code_s);
        o[2] = half_word_to_f32x4(v.y & 0xffffu, s, code_s);
        o[3] = half_word_to_f32x4(v.y >> 16, s, code_s);
        o[4] = half_word_to_f32x4(v.z & 0xffffu, s, code_s);
        o[5] = half_word_to_f32x4(v.z >> 16, s, code_s);
        o[6] = half_word_to_f32x4(v.w & 0xffffu, s, code_s);
        o[7] = half_word_to_f32x4(v.w >> 16, s, code_s);
    }
    __device__ __forceinline__ void one(uint64_t e, float v) const { p[e] = v; }
};

// out[e] = w[e] for e < n. `packed` and the output must be 16-byte aligned (the launcher guarantees it); a 32-element
// chunk never crosses a block since bs >= 32 is a power of two.
template <typename Out, typename Scales>
__device__ __forceinline__ void dequant_body(const uint8_t* __restrict__ packed, const Scales sc,
                                             const float* __restrict__ code, const Out out, uint64_t n,
                                             uint32_t log2_bs) {
    __shared__ float code_s[16];
    __shared__ float code2_s[256];
    if (threadIdx.x < 16) code_s[threadIdx.x] = code[threadIdx.x];
    sc.stage(code2_s);
    __syncthreads();

    const uint64_t chunks = n >> 5;
    const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
#pragma unroll 2
    for (uint64_t c = tid; c < chunks; c += stride) {
        const uint4 v = ldg16(packed + (c << 4));
        const float s = sc.finish(sc.fetch((c << 5) >> log2_bs), code2_s);
        out.chunk(c, v, s, code_s);
    }
    // The last n % 32 elements (an odd n ends on a high nibble; its byte's low nibble is padding).
    for (uint64_t e = (chunks << 5) + tid; e < n; e += stride) {
        const uint32_t byte = packed[e >> 1];
        const uint32_t nib = (e & 1) ? (byte & 15u) : (byte >> 4);
        const float s = sc.finish(sc.fetch(e >> log2_bs), code2_s);
        out.one(e, __fmul_rn(code_s[nib], s));
    }
}

// ------------------------------------------------------------------------------------------------------------------
// (b) Fused dequantization + GEMM for small M on tensor cores
//
// Block: 8 warps; warp w owns the 8 output columns n0 = 64*blockIdx.x + 8*w .. n0+7 and the k-tiles (128 wide) of
// split blockIdx.y. Lane (g = lane/4, t = lane%4) loads, per k-tile, the 16 packed bytes = 32 elements
// 32t .. 32t+31 of weight row n0+g: one 16-byte load, a 32-element run that lies in one NF4 block (K % 32 == 0).
//
// mma.m16n8k16 wants, from lane (g,t), B[k][g] for k in {2t, 2t+1, 2t+8, 2t+9} and A[g or g+8][same k]. A dot
// product does not care about the order of k, so within a 128-wide tile the mma's logical k of step s (0..7) maps
// to the physical element 32t + 4s + {0,1,2,3} — the same map for A and B — which makes each lane's B elements the
// run it loaded. x is staged into shared memory permuted so that lane t reads its matching x elements (8 per
// 16-byte load) without bank conflicts: the 8 elements at physical offset 32tt + 8qq of tile kt are stored at
// kt*128 + 32qq + 8tt of the row (rows padded by 32 elements).
// ------------------------------------------------------------------------------------------------------------------

template <int MT, int KC, typename Scales>
__device__ __forceinline__ void gemm_body(const uint16_t* __restrict__ x, const uint8_t* __restrict__ packed,
                                          const Scales sc, const float* __restrict__ code, uint16_t* __restrict__ y,
                                          float* __restrict__ ws, uint32_t M, uint32_t N, uint32_t K,
                                          uint32_t log2_bs, uint32_t tiles_per_split) {
    constexpr int CT = KC / 128;       // k-tiles per staged chunk
    constexpr int ROWS = 16 * MT;      // M padded to the mma's 16 rows
    constexpr int RSE = KC + 32;       // shared row stride in elements (2*KC + 64 bytes: 64 mod 128)
    constexpr int VPR = KC / 8;        // 16-byte vectors per staged row
    __shared__ __align__(16) uint16_t xs[ROWS * RSE];
    __shared__ float code_s[16];
    __shared__ float code2_s[256];

    const uint32_t lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const uint32_t g = lane >> 2, t = lane & 3u;
    const uint32_t n0 = blockIdx.x * 64u + warp * 8u;
    const uint32_t col = n0 + g;  // the weight row this lane loads
    const bool col_ok = col < N;
    const uint32_t KT = (K + 127u) / 128u;
    const uint32_t tile_begin = blockIdx.y * tiles_per_split;
    const uint32_t tile_end = min(tile_begin + tiles_per_split, KT);
    const uint32_t k_end = min(tile_end * 128u, K);

    if (threadIdx.x < 16) code_s[threadIdx.x] = code[threadIdx.x];
    sc.stage(code2_s);  // visible after the first __syncthreads below

    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;

    for (uint32_t tile0 = tile_begin; tile0 < tile_end; tile0 += CT) {
        // 1. This chunk's weights and scales: global loads first, so they are in flight while x is staged.
        uint4 wv[CT];
        RawScale raw[CT];
        bool ok[CT];
#pragma unroll
        for (int c = 0; c < CT; ++c) {
            const uint32_t k = (tile0 + c) * 128u + 32u * t;
            ok[c] = col_ok && k < k_end;
            wv[c] = make_uint4(0u, 0u, 0u, 0u);
            raw[c].a = 0u;
            raw[c].b = 0.0f;
            if (ok[c]) {
                const uint64_t e = static_cast<uint64_t>(col) * K + k;
                wv[c] = ldg16(packed + (e >> 1));
                raw[c] = sc.fetch(e >> log2_bs);
            }
        }

        // 2. Stage x[0..M, kc0 .. kc0+KC) (zeros past M, past this split's k range and past K).
        __syncthreads();  // the previous chunk's reads of xs are done
        const uint32_t kc0 = tile0 * 128u;
        for (uint32_t v = threadIdx.x; v < static_cast<uint32_t>(ROWS * VPR); v += blockDim.x) {
            const uint32_t r = v / VPR, j = v % VPR;
            const uint32_t k = kc0 + 8u * j;
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (r < M && k < k_end) val = ldg16(x + static_cast<uint64_t>(r) * K + k);
            const uint32_t kt = j >> 4, w = j & 15u;  // w = 4*tt + qq
            *reinterpret_cast<uint4*>(xs + r * RSE + kt * 128u + (w & 3u) * 32u + (w >> 2) * 8u) = val;
        }
        __syncthreads();

        // 3. Tensor-core products.
#pragma unroll
        for (int c = 0; c < CT; ++c) {
            if (tile0 + c >= tile_end) break;  // uniform across the block
            const float s = ok[c] ? sc.finish(raw[c], code2_s) : 0.0f;
            const uint32_t words[4] = {wv[c].x, wv[c].y, wv[c].z, wv[c].w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                // Word q holds elements 32t + 8q .. +7; steps 2q (bytes 0,1) and 2q+1 (bytes 2,3).
                const uint32_t wd = words[q];
                uint32_t b00 = 0u, b01 = 0u, b10 = 0u, b11 = 0u;
                if (ok[c]) {
                    b00 = byte_to_bf16x2(wd & 0xffu, s, code_s);
                    b01 = byte_to_bf16x2((wd >> 8) & 0xffu, s, code_s);
                    b10 = byte_to_bf16x2((wd >> 16) & 0xffu, s, code_s);
                    b11 = byte_to_bf16x2(wd >> 24, s, code_s);
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const uint16_t* base = xs + (mt * 16 + g) * RSE + c * 128 + q * 32 + t * 8;
                    const uint4 lo = *reinterpret_cast<const uint4*>(base);            // row g
                    const uint4 hi = *reinterpret_cast<const uint4*>(base + 8 * RSE);  // row g + 8
                    mma_bf16_16816(acc[mt], lo.x, hi.x, lo.y, hi.y, b00, b01);
                    mma_bf16_16816(acc[mt], lo.z, hi.z, lo.w, hi.w, b10, b11);
                }
            }
        }
    }

    // 4. Output: acc[mt] = {(r0, c0), (r0, c0+1), (r0+8, c0), (r0+8, c0+1)} with r0 = 16mt + g, c0 = n0 + 2t.
    const uint32_t c0 = n0 + 2u * t;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t r = mt * 16u + g + ((i & 2) ? 8u : 0u);
            const uint32_t cc = c0 + static_cast<uint32_t>(i & 1);
            if (r < M && cc < N) {
                if (ws == nullptr) {
                    y[static_cast<uint64_t>(r) * N + cc] = to_bf16(acc[mt][i]);
                } else {
                    ws[(static_cast<uint64_t>(blockIdx.y) * M + r) * N + cc] = acc[mt][i];
                }
            }
        }
    }
}

// Any K: one warp per output column j, lanes striding over k; the block of each element from its flat index
// j*K + k. Rows of 8 outputs at a time (registers), the weights re-read per group of 8 rows.
template <typename Scales>
__device__ __forceinline__ void gemm_generic_body(const uint16_t* __restrict__ x, const uint8_t* __restrict__ packed,
                                                  const Scales sc, const float* __restrict__ code,
                                                  uint16_t* __restrict__ y, uint32_t M, uint32_t N, uint32_t K,
                                                  uint32_t log2_bs) {
    __shared__ float code_s[16];
    __shared__ float code2_s[256];
    if (threadIdx.x < 16) code_s[threadIdx.x] = code[threadIdx.x];
    sc.stage(code2_s);
    __syncthreads();

    const uint32_t lane = threadIdx.x & 31u;
    const uint32_t warps = (gridDim.x * blockDim.x) >> 5;
    for (uint32_t j = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; j < N; j += warps) {
        for (uint32_t m0 = 0; m0 < M; m0 += 8) {
            float acc[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
            for (uint32_t k = lane; k < K; k += 32) {
                const uint64_t e = static_cast<uint64_t>(j) * K + k;
                const uint32_t byte = packed[e >> 1];
                const uint32_t nib = (e & 1) ? (byte & 15u) : (byte >> 4);
                const float s = sc.finish(sc.fetch(e >> log2_bs), code2_s);
                // The weight rounded to bf16, as the tensor-core path (and dequantize-then-matmul) uses it.
                const float w = bf16_to_f32(to_bf16(__fmul_rn(code_s[nib], s)));
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (m0 + i < M) acc[i] = fmaf(bf16_to_f32(x[static_cast<uint64_t>(m0 + i) * K + k]), w, acc[i]);
                }
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float v = warp_sum(acc[i]);
                if (lane == 0 && m0 + i < M) y[static_cast<uint64_t>(m0 + i) * N + j] = to_bf16(v);
            }
        }
    }
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------------------------------

#define NF4_DOUBLE_ARGS \
    const uint8_t *__restrict__ q, const float *__restrict__ code2, const float *__restrict__ absmax2, float offset, \
        uint32_t blocksize2
#define NF4_DOUBLE_SCALES                     \
    DoubleScales sc;                          \
    sc.q = q;                                 \
    sc.code2 = code2;                         \
    sc.absmax2 = absmax2;                     \
    sc.offset = offset;                       \
    sc.blocksize2 = blocksize2;
#define NF4_PLAIN_SCALES \
    PlainScales sc;      \
    sc.absmax = absmax;

extern "C" __global__ void __launch_bounds__(NF4_THREADS)
    nf4_dequant_bf16_plain(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                           const float* __restrict__ code, uint16_t* __restrict__ out, uint64_t n, uint32_t log2_bs) {
    NF4_PLAIN_SCALES
    dequant_body(packed, sc, code, OutBf16{out}, n, log2_bs);
}

extern "C" __global__ void __launch_bounds__(NF4_THREADS)
    nf4_dequant_bf16_double(const uint8_t* __restrict__ packed, NF4_DOUBLE_ARGS, const float* __restrict__ code,
                            uint16_t* __restrict__ out, uint64_t n, uint32_t log2_bs) {
    NF4_DOUBLE_SCALES
    dequant_body(packed, sc, code, OutBf16{out}, n, log2_bs);
}

extern "C" __global__ void __launch_bounds__(NF4_THREADS)
    nf4_dequant_f32_plain(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                          const float* __restrict__ code, float* __restrict__ out, uint64_t n, uint32_t log2_bs) {
    NF4_PLAIN_SCALES
    dequant_body(packed, sc, code, OutF32{out}, n, log2_bs);
}

extern "C" __global__ void __launch_bounds__(NF4_THREADS)
    nf4_dequant_f32_double(const uint8_t* __restrict__ packed, NF4_DOUBLE_ARGS, const float* __restrict__ code,
                           float* __restrict__ out, uint64_t n, uint32_t log2_bs) {
    NF4_DOUBLE_SCALES
    dequant_body(packed, sc, code, OutF32{out}, n, log2_bs);
}

// y = x . dequant(W)^T. M <= 16*MT, K % 32 == 0, x/packed 16-byte aligned; ws == null: write bf16 y directly
// (one split), else ws[split][M][N] f32 partials for nf4_splitk_reduce.
#define NF4_GEMM_ENTRIES(MT, KC)                                                                                       \
    extern "C" __global__ void __launch_bounds__(NF4_THREADS)                                                          \
        nf4_gemm_plain_mt##MT(const uint16_t* __restrict__ x, const uint8_t* __restrict__ packed,                      \
                              const float* __restrict__ absmax, const float* __restrict__ code,                        \
                              uint16_t* __restrict__ y, float* __restrict__ ws, uint32_t M, uint32_t N, uint32_t K,    \
                              uint32_t log2_bs, uint32_t tiles_per_split) {                                            \
        NF4_PLAIN_SCALES                                                                                               \
        gemm_body<MT, KC>(x, packed, sc, code, y, ws, M, N, K, log2_bs, tiles_per_split);                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(NF4_THREADS)                                                          \
        nf4_gemm_double_mt##MT(const uint16_t* __restrict__ x, const uint8_t* __restrict__ packed, NF4_DOUBLE_ARGS,    \
                               const float* __restrict__ code, uint16_t* __restrict__ y, float* __restrict__ ws,       \
                               uint32_t M, uint32_t N, uint32_t K, uint32_t log2_bs, uint32_t tiles_per_split) {       \
        NF4_DOUBLE_SCALES                                                                                              \
        gemm_body<MT, KC>(x, packed, sc, code, y, ws, M, N, K, log2_bs, tiles_per_split);                             \
    }

// The chunk width KC (k per shared-memory stage) keeps the x stage at <= 36 KiB: 16*MT rows of KC+32 bf16.
// Keep in sync with `gemm_chunk_tiles` in mod.rs.
NF4_GEMM_ENTRIES(1, 512)
NF4_GEMM_ENTRIES(2, 512)
NF4_GEMM_ENTRIES(3, 256)
NF4_GEMM_ENTRIES(4, 256)

extern "C" __global__ void __launch_bounds__(NF4_THREADS)
    nf4_splitk_reduce(const float* __restrict__ ws, uint16_t* __restrict__ y, uint32_t mn, uint32_t splits) {
    const uint32_t stride = gridDim.x * blockDim.x;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < mn; i += stride) {
        float s = 0.0f;
        for (uint32_t p = 0; p < splits; ++p) s += ws[static_cast<uint64_t>(p) * mn + i];
        y[i] = to_bf16(s);
    }
}

extern "C" __global__ void __launch_bounds__(NF4_THREADS)
    nf4_gemm_generic_plain(const uint16_t* __restrict__ x, const uint8_t* __restrict__ packed,
                           const float* __restrict__ absmax, const float* __restrict__ code, uint16_t* __restrict__ y,
                           uint32_t M, uint32_t N, uint32_t K, uint32_t log2_bs) {
    NF4_PLAIN_SCALES
    gemm_generic_body(x, packed, sc, code, y, M, N, K, log2_bs);
}

extern "C" __global__ void __launch_bounds__(NF4_THREADS)
    nf4_gemm_generic_double(const uint16_t* __restrict__ x, const uint8_t* __restrict__ packed, NF4_DOUBLE_ARGS,
                            const float* __restrict__ code, uint16_t* __restrict__ y, uint32_t M, uint32_t N,
                            uint32_t K, uint32_t log2_bs) {
    NF4_DOUBLE_SCALES
    gemm_generic_body(x, packed, sc, code, y, M, N, K, log2_bs);
}
