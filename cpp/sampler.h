// One sampling step of the generator on the CPU: everything after the network.
//
// logits (R, V) float32 -> tokens (B,) int32, per output row b:
//   1. guidance   cfg_scale == 1: B = R, g = logits[b]. Otherwise R = 2B, rows [0, B) conditional
//                 (c), [B, 2B) unconditional (u): g = u + s (c - u), and a token that is -inf in
//                 either row stays -inf (masked).
//   2. weights    w_i = exp((g_i - max g) * (1 / temperature)); tokens whose scaled logit is more than
//                 126 ln 2 (about 87) below the maximum get weight 0.
//   3. ranking    tokens ordered by g descending, equal g by lower token index first.
//   4. top-k      keep the first k tokens of the ranking (k == 0 or k >= V: all).
//   5. top-p      keep the shortest prefix of the ranking whose weight is >= top_p times the weight
//                 kept by top-k (always >= 1 token).
//   6. draw       u = philox_uniform(seed, step, b) in [0, 1); walking the kept tokens in token
//                 index order, the first token whose cumulative weight exceeds u times the kept
//                 weight (inverse CDF).
// Weights are accumulated in double; the same (seed, step, logits) give the same tokens whatever
// the thread count or CPU kernel. The helpers below are shared with the CUDA sampler
// (sampler_cuda.cu), which so computes the same weights and ranking bit for bit; only the order of
// its sums differs, so its tokens differ only where a draw or a top-p cut falls within rounding
// (about 1e-16 relative) of a token boundary.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "lookup.h"
#include "philox.h"

namespace fullvq {

struct SamplingParams {
    double cfg_scale = 1.0;    // >= 0, finite; 1 = no guidance
    double temperature = 1.0;  // > 0, finite
    int64_t top_k = 0;         // >= 0; 0 = off
    double top_p = 1.0;        // (0, 1]; 1 = off
    uint64_t seed = 0;         // Philox key
    uint64_t step = 0;         // Philox counter (high half: the output row)
};

// Checks the parameters and the shape of logits (columns contiguous) and returns B, the number of
// output rows. Throws std::invalid_argument naming the parameter and its allowed range.
int64_t check_sampling(const MatrixView& logits, const SamplingParams& params);

// Per-row findings of the finite-value checks, as bit flags (uint32, so that the CUDA kernels can
// OR them atomically). In a guided row, NaN or +inf means float32 overflow.
enum RowFlag : uint32_t {
    kRowNaN = 1,     // holds a NaN
    kRowPosInf = 2,  // holds +inf
    kRowFinite = 4,  // holds at least one finite value
};

// Throws for the first bad row: input[r] are the flags of logits row r (r < R), guided[b] those of
// guided row b (b < B; nullptr without guidance).
void check_row_flags(const uint32_t* input, int64_t rows, const uint32_t* guided, int64_t batch);

// Samples one token per output row into tokens (B). threads <= 0: all cores this process may run on.
// kernel: "auto" or one of available_kernels() (lookup.h): the sampler has a kernel of each name,
// available on the same CPUs, and all of them draw the same tokens.
void sample(const MatrixView& logits, const SamplingParams& params, int32_t* tokens, int threads,
            const std::string& kernel = "auto");

// ---------------------------------------------------------------------------------------------
// Arithmetic shared by the CPU sampler and the CUDA kernels. Each helper is written once for T =
// float (CUDA, CPU) and for the CPU's vectors of floats (GCC/Clang vector extensions), so every
// path computes the same bits.

// x truncated to int32 (per lane).
#if defined(__CUDACC__)
template <class T>
FULLVQ_HD int32_t to_int(T x) {
    return int32_t(x);
}
#else
template <class T>
FULLVQ_HD auto to_int(T x) {
    if constexpr (std::is_same_v<T, float>)
        return int32_t(x);
    else
        return __builtin_convertvector(x, decltype(x < x));  // the int vector of T's width
}
#endif

template <class To, class From>
FULLVQ_HD To bit_cast(From x) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
    To y;
    std::memcpy(&y, &x, sizeof y);
    return y;
}

// c in every lane.
template <class T>
FULLVQ_HD T splat(float c) {
    return T{} + c;
}

// The RowFlag bits of one value (per lane).
template <class T>
FULLVQ_HD auto value_flags(T x) {
    const float inf = __builtin_huge_valf();
    return (x != x ? kRowNaN : 0u) | (x == inf ? kRowPosInf : 0u) | ((x > -inf) & (x < inf) ? kRowFinite : 0u);
}

// The guided logit (masked if either branch is).
template <class T>
FULLVQ_HD T guided_logit(T cond, T uncond, float scale) {
    const float inf = __builtin_huge_valf();
    return (cond == -inf) | (uncond == -inf) ? splat<T>(-inf) : uncond + scale * (cond - uncond);
}

// exp(z) for z <= 0 (and -inf), relative error < 2e-7; 0 for z < -126 ln 2. A polynomial, so
// that the CPU computes it in vectors and the CUDA kernels get the same values.
template <class T>
FULLVQ_HD T exp_nonpositive(T z) {
    const T x = z * 1.44269504f;  // z / ln 2
    const auto under = x < -126.f;
    const T xc = under ? splat<T>(-126.f) : x;         // keeps 2^n a normal float
    const T n = (xc + 12582912.f) - 12582912.f;        // round to nearest (1.5 * 2^23 trick)
    const T f = xc - n;                                // [-0.5, 0.5]
    // 2^f: least-squares fit of the relative error on [-0.5, 0.5] (at most 1.8e-7)
    const T p = 1.f + f * (0.693146884f + f * (0.240222380f + f * (0.0555089302f + f * (0.00967169832f +
                                                                                         f * 0.00132186722f))));
    const auto scale = (to_int(n) + 127) << 23;  // 2^n as float bits
    return under ? T{} : p * bit_cast<T>(scale);
}

// 1 / temperature as the float that scales g - max: positive and finite for any positive t, so
// that (g - max) * (1 / t) is never NaN.
inline float inverse_temperature(double t) {
    constexpr double kMin = 1.40129846e-45, kMax = 3.40282347e38;  // smallest subnormal, largest finite float
    const double inverse = 1.0 / t;
    return float(inverse < kMin ? kMin : inverse > kMax ? kMax : inverse);
}

// A key that orders logits as signed integers like the floats do (-0 and +0 equal); NaN-free input.
template <class T>
FULLVQ_HD auto rank_key(T g) {
    const auto bits = bit_cast<decltype(to_int(g))>(g + 0.f);  // -0 -> +0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF);                  // negative: flip the magnitude bits
}

}  // namespace fullvq
