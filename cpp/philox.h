// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based generator, so the random numbers of a sampling step are a pure function of
// (seed, step, row) and come out the same on any thread, core or device. Header-only; compiles
// as host code and, under nvcc, as host and device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FULLVQ_HD __host__ __device__ __forceinline__
#else  // internal linkage: the sampler's kernels compile these helpers for different instruction sets
#define FULLVQ_HD static inline __attribute__((always_inline))
#endif

namespace fullvq {

struct Philox4x32 {
    uint32_t v[4];
};

// Philox4x32-10 of the 128-bit counter (c0..c3) under the 64-bit key (k0, k1). Matches the
// Random123 known-answer vectors (tests/test_sampler.py checks them through the sampler).
FULLVQ_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    constexpr uint64_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
    constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
    for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = kMul0 * c0, p1 = kMul1 * c2;
        const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0), hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += kWeyl0;
        k1 += kWeyl1;
    }
    return Philox4x32{{c0, c1, c2, c3}};
}

// The sampler's uniform for output row `row` of step `step`: key = seed, counter = (step, row)
// as little-endian 32-bit words; words 0 and 1 of the output give 53 bits, u in [0, 1).
FULLVQ_HD double philox_uniform(uint64_t seed, uint64_t step, uint64_t row) {
    const Philox4x32 r = philox4x32_10(uint32_t(step), uint32_t(step >> 32), uint32_t(row), uint32_t(row >> 32),
                                       uint32_t(seed), uint32_t(seed >> 32));
    const uint64_t bits = (uint64_t(r.v[0]) << 21) | (r.v[1] >> 11);  // 32 + 21 = 53 bits
    return double(bits) * (1.0 / 9007199254740992.0);                  // 2^-53
}

}  // namespace fullvq
