// AVX-512F kernel: 6 rows x 32 codes per block, 12 accumulators in zmm registers.
// Compiled with -mavx512f -mfma (CMakeLists.txt); only called when the CPU supports it.
#include <immintrin.h>

#include "kernel_scan.h"

namespace fullvq {
namespace {

struct Avx512 {
    static constexpr int W = 16, R = 6, NV = 2;
    using F = __m512;
    using Mask = __mmask16;
    static F load(const float* p) { return _mm512_loadu_ps(p); }
    static F set1(float v) { return _mm512_set1_ps(v); }
    static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static F min(F a, F b) { return _mm512_min_ps(a, b); }
    static Mask less(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
    static Mask either(Mask a, Mask b) { return _kor_mask16(a, b); }
    static bool any_of(Mask m) { return m != 0; }
    static float reduce_min(F v) { return _mm512_reduce_min_ps(v); }
    static int first_equal(F v, float s) {
        const Mask m = _mm512_cmp_ps_mask(v, _mm512_set1_ps(s), _CMP_EQ_OQ);
        return m ? __builtin_ctz(m) : -1;
    }
};

bool avx512_supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"); }

}  // namespace

const Kernel kAvx512Kernel{"avx512", Avx512::NV * Avx512::W, avx512_supported, scan<Avx512>};

}  // namespace fullvq
