// The O(V) row passes of the CPU sampler, one implementation per instruction set (sampler_rows.h
// compiled by sampler_rows_<isa>.cpp with its own flags), picked at run time like the lookup's
// kernels. Every kernel computes the same bits: sums run over 16 canonical lanes in a fixed order
// whatever the vector width, and no kernel contracts into fused multiply-adds.
#pragma once

#include <cstdint>

namespace fullvq {

// Pass 2 puts token i in bucket min(floor(-z_i * 16), 2047) of its scaled logit z_i = (g_i - max) / t
// <= 0: the bucket falls as g rises, so tokens of a lower bucket rank higher.
constexpr int kSamplerBuckets = 2048;
constexpr float kSamplerBucketsPerUnit = 16.f;

struct SamplerKernel {
    const char* name;
    bool (*supported)();
    // Pass 1 without guidance: the maximum of x (V); *clean = false if x holds NaN or +inf.
    float (*scan)(const float* x, int64_t v, bool* clean);
    // Pass 1 with guidance: g (V) = guided_logit(c, u, scale) and its maximum; *clean = false if
    // c, u or g hold NaN or +inf.
    float (*guide)(const float* c, const float* u, float scale, int64_t v, float* g, bool* clean);
    // Pass 2: w (V) = exp_nonpositive((g - top) * inv_t) and, unless bucket is nullptr, the bucket
    // of each scaled logit (sampler.cpp); returns the sum of w.
    double (*weigh)(const float* g, int64_t v, float top, float inv_t, float* w, uint16_t* bucket);
    // Writes the indices i with bucket[i] == chosen to out (capacity V), in order; returns their count.
    int64_t (*collect)(const uint16_t* bucket, int64_t v, uint16_t chosen, int32_t* out);
    // Inverse CDF over the kept tokens (rank_key(g) > cut_key, or == cut_key and index <=
    // cut_index) in index order: the first whose cumulative weight exceeds target, else the last
    // kept token of positive weight (rounding), else 0.
    int32_t (*draw)(const float* g, const float* w, int64_t v, int32_t cut_key, int64_t cut_index, double target);
};

extern const SamplerKernel kSamplerScalar;
#ifdef FULLVQ_X86_KERNELS
extern const SamplerKernel kSamplerAvx2, kSamplerAvx512;
#endif

}  // namespace fullvq
