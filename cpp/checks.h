// Input checks shared by the CPU and CUDA lookups, so both reject bad input with the same words.
#pragma once

#include <cstdint>

#include "lookup.h"

namespace fullvq {

// Squared norms above this could overflow float32 in bias + <x', c>: with |x|^2, |c|^2 <= L the
// score is bounded by 12 L < FLT_MAX.
constexpr double kMaxSquaredNorm = 1e37;

void check_codebook_shape(const MatrixView& codes);
void check_dims(const MatrixView& x, int64_t dim);

// Rejects row `row` of `what` ("x" or "codebook"): a non-finite squared_norm means the row holds
// NaN or Inf, a finite one that it exceeds kMaxSquaredNorm.
[[noreturn]] void reject_row(const char* what, int64_t row, double squared_norm);

}  // namespace fullvq
