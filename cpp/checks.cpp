#include "checks.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>

namespace fullvq {

void check_codebook_shape(const MatrixView& codes) {
    if (codes.rows < 1 || codes.cols < 1)
        throw std::invalid_argument("codebook has shape (" + std::to_string(codes.rows) + ", " +
                                    std::to_string(codes.cols) + "): expected (K, D) with K >= 1 and D >= 1");
    if (codes.rows > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument("codebook has " + std::to_string(codes.rows) +
                                    " codes: at most 2**31 - 1 are supported (int32 indices)");
}

void check_dims(const MatrixView& x, int64_t dim) {
    if (x.cols != dim)
        throw std::invalid_argument("x has " + std::to_string(x.cols) + " columns but the codebook dimension is " +
                                    std::to_string(dim) + ": expected x of shape (M, " + std::to_string(dim) + ")");
}

void reject_row(const char* what, int64_t row, double squared_norm) {
    const std::string prefix = std::string(what) + " row " + std::to_string(row);
    if (!std::isfinite(squared_norm))
        throw std::invalid_argument(prefix + " contains NaN or Inf; remove or replace non-finite values");
    char norm[32];
    std::snprintf(norm, sizeof norm, "%.3g", squared_norm);
    throw std::invalid_argument(prefix + " has squared norm " + norm +
                                " > 1e37, which overflows float32 distances; rescale the inputs");
}

float l2_scale(double spread) {
    if (!(spread > 0.0 && spread < 1.0)) return 1.f;
    int exponent = 0;
    std::frexp(spread, &exponent);  // spread = f * 2^exponent, f in [0.5, 1), exponent <= 0
    // spread * scale^2 in [1/4, 1); codes closer than 2^-126 to their mean stay partly scaled.
    return std::ldexp(1.f, std::min(-exponent / 2, 126));
}

void reject_far_row(int64_t row) {
    throw std::invalid_argument("x row " + std::to_string(row) +
                                " is over 1e18 times farther from the codebook's mean than any code, beyond what "
                                "float32 distances can order; check that x and the codebook are in the same units");
}

}  // namespace fullvq
