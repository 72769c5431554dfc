// The kernel emulator of scripts/kernel-emu.sh: runs each kernel of src/ops/cuda/ on CPU threads and checks it
// against its formula in double precision.
#include <cstdio>
#include <functional>
#include <random>
#include <thread>
#include <vector>
#include "../../src/ops/cuda/rms_norm.cu"
#include "../../src/ops/cuda/rope.cu"
#include "../../src/ops/cuda/swiglu.cu"
#include "../../src/ops/cuda/dropout.cu"
#include "../../src/ops/cuda/adamw.cu"

static void launch(unsigned grid, unsigned block, const std::function<void()>& k) {
    gridDim.x = grid; blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        g_bar = &bar;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; ++t)
            ts.emplace_back([&, b, t] { blockIdx.x = b; threadIdx.x = t; k(); });
        for (auto& t : ts) t.join();
    }
}
static std::mt19937 rng(1);
static std::vector<float> rnd(size_t n, float s = 1) { std::uniform_real_distribution<float> u(-s, s); std::vector<float> v(n); for (auto& x : v) x = u(rng); return v; }
static int fails = 0;
static void check(const char* what, double err, double tol) { printf("%-40s max err %.3g %s\n", what, err, err <= tol ? "ok" : "FAIL"); if (err > tol) fails++; }

uint64_t mix64h(uint64_t z) { z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull; z = (z ^ (z >> 27)) * 0x94d049bb133111ebull; return z ^ (z >> 31); }

int main() {
    // RMSNorm: rows of d with several thread counts (d < 32, d not a multiple of 32, d > threads).
    for (unsigned d : {5u, 67u, 300u, 1000u}) {
        unsigned rows = 3, threads = std::min(256u, (d + 31) / 32 * 32);
        auto x = rnd(rows * d, 3), w = rnd(d), g = rnd(rows * d);
        for (auto& v : w) v += 1.5f;
        std::vector<float> y(rows * d), dx(rows * d);
        float eps = 1e-5f;
        launch(rows, threads, [&] { rms_norm_fwd_f32_f32(x.data(), w.data(), y.data(), d, eps); });
        launch(rows, threads, [&] { rms_norm_bwd_f32_f32(x.data(), w.data(), g.data(), dx.data(), d, eps); });
        double ey = 0, ed = 0;
        for (unsigned r = 0; r < rows; ++r) {
            double ss = 0, su = 0;
            for (unsigned i = 0; i < d; ++i) { double xv = x[r * d + i]; ss += xv * xv; su += (double)g[r * d + i] * w[i] * xv; }
            double rr = 1 / std::sqrt(ss / d + eps), c = rr * rr * rr * su / d;
            for (unsigned i = 0; i < d; ++i) {
                double xv = x[r * d + i], u = (double)g[r * d + i] * w[i];
                ey = std::max(ey, std::abs(y[r * d + i] - xv * rr * w[i]));
                ed = std::max(ed, std::abs(dx[r * d + i] - (rr * u - xv * c)));
            }
        }
        char b[64]; snprintf(b, 64, "rms_norm fwd d=%u", d); check(b, ey, 1e-5);
        snprintf(b, 64, "rms_norm bwd d=%u", d); check(b, ed, 1e-5);
    }
    // RMSNorm bf16 x, f32 w: bf16 round trip.
    {
        unsigned d = 40, rows = 2;
        auto xf = rnd(rows * d, 2), w = rnd(d);
        std::vector<__nv_bfloat16> x(rows * d), y(rows * d);
        for (size_t i = 0; i < x.size(); ++i) x[i] = __float2bfloat16_rn(xf[i]);
        launch(rows, 64, [&] { rms_norm_fwd_bf16_f32(x.data(), w.data(), y.data(), d, 1e-5f); });
        double e = 0;
        for (unsigned r = 0; r < rows; ++r) {
            double ss = 0; for (unsigned i = 0; i < d; ++i) { double v = __bfloat162float(x[r * d + i]); ss += v * v; }
            double rr = 1 / std::sqrt(ss / d + 1e-5);
            for (unsigned i = 0; i < d; ++i) { double want = __bfloat162float(x[r * d + i]) * rr * w[i]; e = std::max(e, std::abs(__bfloat162float(y[r * d + i]) - want) / (std::abs(want) + 1e-3)); }
        }
        check("rms_norm fwd bf16/f32 (relative)", e, 1.0 / 128);
    }
    // RoPE (b, t, h, d) with cos/sin (t, d/2), forward then inverse.
    {
        unsigned b = 2, t = 5, h = 3, d = 8, half = d / 2;
        auto x = rnd(b * t * h * d), ang = rnd(t * half, 3);
        std::vector<float> c(t * half), s(t * half), y(x.size()), z(x.size());
        for (size_t i = 0; i < ang.size(); ++i) { c[i] = std::cos(ang[i]); s[i] = std::sin(ang[i]); }
        uint64_t pairs = x.size() / 2;
        launch(2, 32, [&] { rope_f32(x.data(), c.data(), s.data(), y.data(), t, h, half, 1.0f, pairs); });
        launch(1, 64, [&] { rope_f32(y.data(), c.data(), s.data(), z.data(), t, h, half, -1.0f, pairs); });
        double e = 0, ei = 0;
        for (unsigned bi = 0; bi < b; ++bi) for (unsigned ti = 0; ti < t; ++ti) for (unsigned hi = 0; hi < h; ++hi) for (unsigned i = 0; i < half; ++i) {
            size_t at = ((size_t)(bi * t + ti) * h + hi) * d + i;
            double cc = c[ti * half + i], ss = s[ti * half + i];
            e = std::max(e, std::abs(y[at] - (x[at] * cc - x[at + half] * ss)));
            e = std::max(e, std::abs(y[at + half] - (x[at + half] * cc + x[at] * ss)));
        }
        for (size_t i = 0; i < x.size(); ++i) ei = std::max(ei, (double)std::abs(z[i] - x[i]));
        check("rope fwd", e, 1e-6); check("rope inverse(rope(x)) - x", ei, 1e-6);
    }
    // SwiGLU forward and backward (the stacked da, db).
    {
        size_t n = 1000;
        auto a = rnd(n, 4), bb = rnd(n), g = rnd(n);
        std::vector<float> y(n), dab(2 * n);
        launch(2, 256, [&] { swiglu_fwd_f32(a.data(), bb.data(), y.data(), n); });
        launch(1, 256, [&] { swiglu_bwd_f32(a.data(), bb.data(), g.data(), dab.data(), n); });
        double e = 0, ea = 0, eb = 0;
        for (size_t i = 0; i < n; ++i) {
            double av = a[i], sg = 1 / (1 + std::exp(-av));
            e = std::max(e, std::abs(y[i] - av * sg * bb[i]));
            ea = std::max(ea, std::abs(dab[i] - g[i] * bb[i] * sg * (1 + av * (1 - sg))));
            eb = std::max(eb, std::abs(dab[n + i] - g[i] * av * sg));
        }
        check("swiglu fwd", e, 1e-5); check("swiglu da", ea, 1e-5); check("swiglu db", eb, 1e-5);
    }
    // Dropout: the kernel's mask against the Rust formula (re-stated here), for a grid that strides.
    {
        size_t n = 10000; double p = 0.3; uint64_t seed = 7;
        std::vector<float> x(n, 1.0f), y(n);
        uint64_t key = mix64h(seed), thr = (uint64_t)(p * 18446744073709551615.0); float keep = 1.0f / (float)(1.0 - p);
        launch(3, 256, [&] { dropout_f32(x.data(), y.data(), n, key, thr, keep); });
        size_t bad = 0, zeros = 0;
        for (uint64_t i = 0; i < n; ++i) {
            float want = mix64h(key ^ (i * 0x9e3779b97f4a7c15ull)) < thr ? 0.0f : keep;
            bad += y[i] != want; zeros += y[i] == 0;
        }
        printf("dropout: %zu of %zu differ, dropped %.3f\n", bad, n, (double)zeros / n);
        check("dropout mask", bad, 0);
        // The first mask values, to compare with the Rust side.
        printf("dropout first 16 (p 0.3, seed 7):"); for (int i = 0; i < 16; ++i) printf(" %g", y[i]); printf("\n");
    }
    // AdamW: one step against the formula in double.
    {
        size_t n = 700;
        auto pp = rnd(n), g = rnd(n), m = rnd(n, 0.1f), v = rnd(n, 0.01f);
        for (auto& x : v) x = std::abs(x);
        auto p0 = pp, m0 = m, v0 = v;
        double b1 = 0.9, b2 = 0.999, lr = 1e-3, wd = 0.01, eps = 1e-8; int t = 3;
        double c1 = 1 - std::pow(b1, t), c2 = 1 - std::pow(b2, t);
        launch(2, 256, [&] { adamw_step_f32(pp.data(), g.data(), m.data(), v.data(), n, (float)b1, (float)(1 - b1), (float)b2, (float)(1 - b2), (float)(1 - lr * wd), (float)(1 / c1), (float)(1 / c2), (float)eps, (float)lr); });
        double e = 0;
        for (size_t i = 0; i < n; ++i) {
            double mm = b1 * m0[i] + (1 - b1) * g[i], vv = b2 * v0[i] + (1 - b2) * (double)g[i] * g[i];
            double want = p0[i] * (1 - lr * wd) - lr * (mm / c1) / (std::sqrt(vv / c2) + eps);
            e = std::max({e, std::abs(pp[i] - want), std::abs(m[i] - mm), std::abs(v[i] - vv)});
        }
        check("adamw step", e, 1e-6);
    }
    printf("%d failures\n", fails);
    return fails != 0;
}
