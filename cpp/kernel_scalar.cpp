// Portable kernel over GCC/Clang vector extensions (4 lanes), compiled for the baseline target
// only, so it runs on any CPU: the compiler lowers it to SSE2 on x86-64, NEON on arm64.
#include <cstring>

#include "kernel_scan.h"

namespace fullvq {
namespace {

struct Portable {
    static constexpr int W = 4, R = 4, NV = 2;
    typedef float F __attribute__((vector_size(W * sizeof(float))));
    typedef int32_t Mask __attribute__((vector_size(W * sizeof(int32_t))));  // -1 or 0
    static F load(const float* p) { F r; std::memcpy(&r, p, sizeof r); return r; }
    static F set1(float s) { return F{} + s; }
    static F fmadd(F a, F b, F c) { return a * b + c; }
    static F min(F a, F b) { return a < b ? a : b; }
    static Mask less(F a, F b) { return a < b; }
    static Mask either(Mask a, Mask b) { return a | b; }
    static bool any_of(Mask m) {
        for (int l = 0; l < W; ++l)
            if (m[l]) return true;
        return false;
    }
    static float reduce_min(F v) {
        float m = v[0];
        for (int l = 1; l < W; ++l) m = v[l] < m ? v[l] : m;
        return m;
    }
    static int first_equal(F v, float s) {
        for (int l = 0; l < W; ++l)
            if (v[l] == s) return l;
        return -1;
    }
};

bool always() { return true; }

}  // namespace

const Kernel kScalarKernel{"scalar", Portable::NV * Portable::W, always, scan<Portable>};

}  // namespace fullvq
