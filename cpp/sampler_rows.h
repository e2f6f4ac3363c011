// The CPU sampler's row passes (sampler_kernels.h), written once over GCC/Clang vectors of W
// floats. Each sampler_rows_<isa>.cpp includes this with its own W and compiler flags; everything
// here has internal linkage so that no function compiled for one instruction set leaks into
// another (hence no standard library templates either).
//
// The passes walk a row in groups of 16 tokens (16 / W vectors); token i of a group lands in sum
// lane i % 16, and the 16 lanes are added in a fixed pairwise order, so the sums do not depend on W.
#pragma once

#include "sampler.h"
#include "sampler_kernels.h"

namespace fullvq {
namespace {

constexpr int kGroup = 16;         // canonical lanes of every sum
constexpr int64_t kDrawBlock = 64;  // the draw sums blocks of this many tokens before walking one

// The vector types of W lanes (GCC ignores a vector_size that depends on a template parameter).
template <int W>
struct Vectors;
#define FULLVQ_SAMPLER_VECTORS(W)                                               \
    template <>                                                                 \
    struct Vectors<W> {                                                         \
        typedef float F __attribute__((vector_size(W * sizeof(float))));       \
        typedef int32_t I __attribute__((vector_size(W * sizeof(int32_t))));   \
        typedef double D __attribute__((vector_size(W * sizeof(double))));     \
        typedef uint16_t S __attribute__((vector_size(W * sizeof(uint16_t)))); \
    };
FULLVQ_SAMPLER_VECTORS(4)
FULLVQ_SAMPLER_VECTORS(8)
FULLVQ_SAMPLER_VECTORS(16)
#undef FULLVQ_SAMPLER_VECTORS

template <int W>
struct Rows {
    static_assert(kGroup % W == 0, "the vector width must divide the group");
    static constexpr int kVectors = kGroup / W;
    using F = typename Vectors<W>::F;  // floats
    using I = typename Vectors<W>::I;  // int32 lanes, also the comparison masks of F
    using D = typename Vectors<W>::D;  // doubles
    using S = typename Vectors<W>::S;  // uint16 buckets
    static constexpr float kInf = __builtin_huge_valf();

    // Lanes [0, n) of p (n may be <= 0 or >= W); missing lanes read `pad`. Only the end of a row
    // is short, and -inf, the default, is ignored by every pass (no flags, no maximum, weight 0).
    static F load(const float* p, int64_t n, float pad = -kInf) {
        F x;
        if (n >= W) {
            __builtin_memcpy(&x, p, sizeof x);
        } else {
            for (int l = 0; l < W; ++l) x[l] = l < n ? p[l] : pad;
        }
        return x;
    }

    // Writes lanes [0, min(n, W)) of x to p.
    template <class V, class T>
    static void store(T* p, V x, int64_t n) {
        if (n >= W)
            __builtin_memcpy(p, &x, sizeof x);
        else if (n > 0)
            __builtin_memcpy(p, &x, size_t(n) * sizeof(T));
    }

    template <class M>
    static bool any(M mask) {
        uint64_t words[sizeof(M) / sizeof(uint64_t)];
        __builtin_memcpy(words, &mask, sizeof words);
        uint64_t all = 0;
        for (uint64_t w : words) all |= w;
        return all != 0;
    }

    static float reduce_max(const F* x) {
        float top = -kInf;
        for (int k = 0; k < kVectors; ++k)
            for (int l = 0; l < W; ++l) top = x[k][l] > top ? x[k][l] : top;
        return top;
    }

    // The sum of the 16 lanes held by acc[k][l] (lane k * W + l), in a fixed pairwise order.
    static double reduce_sum(const D* acc) {
        double lanes[kGroup];
        for (int k = 0; k < kVectors; ++k)
            for (int l = 0; l < W; ++l) lanes[k * W + l] = acc[k][l];
        for (int half = kGroup / 2; half > 0; half /= 2)
            for (int l = 0; l < half; ++l) lanes[l] += lanes[l + half];
        return lanes[0];
    }

    static float scan(const float* x, int64_t v, bool* clean) {
        F top[kVectors];
        I bad{};
        for (int k = 0; k < kVectors; ++k) top[k] = splat<F>(-kInf);
        for (int64_t i = 0; i < v; i += kGroup)
            for (int k = 0; k < kVectors; ++k) {
                const F xi = load(x + i + k * W, v - i - k * W);
                bad |= ~(xi < kInf);
                top[k] = xi > top[k] ? xi : top[k];
            }
        *clean = !any(bad);
        return reduce_max(top);
    }

    static float guide(const float* c, const float* u, float scale, int64_t v, float* g, bool* clean) {
        F top[kVectors];
        I bad{};
        for (int k = 0; k < kVectors; ++k) top[k] = splat<F>(-kInf);
        for (int64_t i = 0; i < v; i += kGroup)
            for (int k = 0; k < kVectors; ++k) {
                const int64_t j = i + k * W;
                const F cj = load(c + j, v - j), uj = load(u + j, v - j), gj = guided_logit(cj, uj, scale);
                store(g + j, gj, v - j);
                bad |= ~((cj < kInf) & (uj < kInf) & (gj < kInf));
                top[k] = gj > top[k] ? gj : top[k];
            }
        *clean = !any(bad);
        return reduce_max(top);
    }

    static double weigh(const float* g, int64_t v, float top, float inv_t, float* w, uint16_t* bucket) {
        D sum[kVectors] = {};
        for (int64_t i = 0; i < v; i += kGroup)
            for (int k = 0; k < kVectors; ++k) {
                const int64_t j = i + k * W;
                const F z = (load(g + j, v - j) - top) * inv_t;
                const F wj = exp_nonpositive(z);
                store(w + j, wj, v - j);
                sum[k] += __builtin_convertvector(wj, D);
                if (bucket) {
                    const F y = -z * kSamplerBucketsPerUnit;  // >= 0
                    const F last = splat<F>(kSamplerBuckets - 1);
                    store(bucket + j, __builtin_convertvector(to_int(y < last ? y : last), S), v - j);
                }
            }
        return reduce_sum(sum);
    }

    static int64_t collect(const uint16_t* bucket, int64_t v, uint16_t chosen, int32_t* out) {
        int64_t n = 0;
        for (int64_t i = 0; i < v; i += W) {  // most vectors hold no candidate
            if (i + W <= v) {
                S b;
                __builtin_memcpy(&b, bucket + i, sizeof b);
                if (!any(b == chosen)) continue;
            }
            for (int64_t j = i; j < i + W && j < v; ++j)
                if (bucket[j] == chosen) out[n++] = int32_t(j);
        }
        return n;
    }

    static bool keeps(int32_t key, int64_t i, int32_t cut_key, int64_t cut_index) {
        return key > cut_key || (key == cut_key && i <= cut_index);
    }

    static int32_t draw(const float* g, const float* w, int64_t v, int32_t cut_key, int64_t cut_index, double target) {
        I lane;
        for (int l = 0; l < W; ++l) lane[l] = l;
        double cum = 0.0;
        for (int64_t start = 0; start < v; start += kDrawBlock) {
            const int64_t end = start + kDrawBlock < v ? start + kDrawBlock : v;
            D block[kVectors] = {};
            for (int64_t i = start; i < end; i += kGroup)
                for (int k = 0; k < kVectors; ++k) {
                    const int64_t j = i + k * W;
                    const I key = rank_key(load(g + j, end - j)), index = lane + int32_t(j);
                    const I keep = (key > cut_key) | ((key == cut_key) & (index <= int32_t(cut_index)));
                    block[k] += __builtin_convertvector(keep ? load(w + j, end - j, 0.f) : F{}, D);
                }
            const double sum = reduce_sum(block);
            if (cum + sum <= target) {
                cum += sum;
                continue;
            }
            for (int64_t i = start; i < end; ++i) {
                if (w[i] > 0.f && keeps(rank_key(g[i]), i, cut_key, cut_index)) {
                    cum += w[i];
                    if (cum > target) return int32_t(i);
                }
            }
        }
        for (int64_t i = v - 1; i > 0; --i)
            if (w[i] > 0.f && keeps(rank_key(g[i]), i, cut_key, cut_index)) return int32_t(i);
        return 0;
    }

    static constexpr SamplerKernel kernel(const char* name, bool (*supported)()) {
        return SamplerKernel{name, supported, scan, guide, weigh, collect, draw};
    }
};

}  // namespace
}  // namespace fullvq
