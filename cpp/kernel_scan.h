// The register-blocked distance + argmin micro-kernel, written once over a SIMD traits type V.
// Each kernel_<isa>.cpp includes this with its own V and compiler flags; everything here has
// internal linkage so that no function compiled for one instruction set leaks into another.
//
// V provides: W (lanes), R (rows per block), NV (vectors per panel, P = NV * W), types F and Mask,
// and load, set1, fmadd, min, less, either, any_of, reduce_min, first_equal (lane or -1).
//
// Each row's threshold register holds its best distance so far, so a panel rarely improves a row
// (about ln(K) times per row over a whole scan). The common case costs one min per vector and one
// compare per row; only a panel that beats some row's best is searched lane by lane, in code order
// with a strict "less", which keeps the lowest index among equal distances.
#pragma once

#include "kernels.h"

namespace fullvq {
namespace {

// Rows [row0, row0 + RB) against every panel of the chunk; RB <= V::R.
template <class V, int RB>
void scan_row_block(const ScanArgs& a, int64_t row0) {
    constexpr int P = V::NV * V::W;
    const int64_t d = a.d;
    const float* x = a.x + row0 * d;
    float* best_val = a.best_val + row0;
    int32_t* best_idx = a.best_idx + row0;

    typename V::F best[RB];
    for (int r = 0; r < RB; ++r) best[r] = V::set1(best_val[r]);

    for (int64_t p = 0; p < a.n_panels; ++p) {
        const float* panel = a.panels + p * d * P;
        typename V::F acc[RB][V::NV];
        for (int v = 0; v < V::NV; ++v) {  // j = 0 starts from the bias
            const typename V::F b = V::load(a.bias + p * P + v * V::W);
            const typename V::F c = V::load(panel + v * V::W);
            for (int r = 0; r < RB; ++r) acc[r][v] = V::fmadd(V::set1(x[r * d]), c, b);
        }
        for (int64_t j = 1; j < d; ++j) {
            typename V::F c[V::NV];
            for (int v = 0; v < V::NV; ++v) c[v] = V::load(panel + j * P + v * V::W);
            for (int r = 0; r < RB; ++r) {
                const typename V::F xr = V::set1(x[r * d + j]);
                for (int v = 0; v < V::NV; ++v) acc[r][v] = V::fmadd(xr, c[v], acc[r][v]);
            }
        }
        typename V::F lowest[RB];
        typename V::Mask improved;
        for (int r = 0; r < RB; ++r) {
            lowest[r] = acc[r][0];
            for (int v = 1; v < V::NV; ++v) lowest[r] = V::min(lowest[r], acc[r][v]);
            const typename V::Mask m = V::less(lowest[r], best[r]);
            improved = r == 0 ? m : V::either(improved, m);
        }
        if (!V::any_of(improved)) continue;
        for (int r = 0; r < RB; ++r) {
            if (!V::any_of(V::less(lowest[r], best[r]))) continue;
            // The row's new best is the panel minimum; its first occurrence is the lowest index.
            const float panel_min = V::reduce_min(lowest[r]);
            for (int v = 0; v < V::NV; ++v) {
                const int lane = V::first_equal(acc[r][v], panel_min);
                if (lane >= 0) {
                    best_val[r] = panel_min;
                    best_idx[r] = static_cast<int32_t>(a.k_begin + p * P + v * V::W + lane);
                    break;
                }
            }
            best[r] = V::set1(panel_min);
        }
    }
}

template <class V, int RB>
void scan_tail(const ScanArgs& a, int64_t row0, int64_t rows) {
    if constexpr (RB > 0) {
        if (rows == RB) return scan_row_block<V, RB>(a, row0);
        scan_tail<V, RB - 1>(a, row0, rows);
    }
}

template <class V>
void scan(const ScanArgs& a) {
    int64_t row = 0;
    for (; row + V::R <= a.m; row += V::R) scan_row_block<V, V::R>(a, row);
    if (row < a.m) scan_tail<V, V::R - 1>(a, row, a.m - row);
}

}  // namespace
}  // namespace fullvq
