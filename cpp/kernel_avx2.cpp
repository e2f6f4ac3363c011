// AVX2 + FMA kernel: 3 rows x 16 codes per block, fitting the 16 ymm registers.
// Compiled with -mavx2 -mfma (CMakeLists.txt); only called when the CPU supports it.
#include <immintrin.h>

#include "kernel_scan.h"

namespace fullvq {
namespace {

struct Avx2 {
    static constexpr int W = 8, R = 3, NV = 2;
    using F = __m256;
    using Mask = __m256;
    static F load(const float* p) { return _mm256_loadu_ps(p); }
    static F set1(float v) { return _mm256_set1_ps(v); }
    static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static F min(F a, F b) { return _mm256_min_ps(a, b); }
    static Mask less(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
    static Mask either(Mask a, Mask b) { return _mm256_or_ps(a, b); }
    static bool any_of(Mask m) { return _mm256_movemask_ps(m) != 0; }
    static float reduce_min(F v) {
        __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        m = _mm_min_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_min_ss(m, _mm_movehdup_ps(m)));
    }
    static int first_equal(F v, float s) {
        const int m = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(s), _CMP_EQ_OQ));
        return m ? __builtin_ctz(m) : -1;
    }
};

bool avx2_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

}  // namespace

const Kernel kAvx2Kernel{"avx2", Avx2::NV * Avx2::W, avx2_supported, scan<Avx2>};

}  // namespace fullvq
