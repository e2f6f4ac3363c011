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

// l2 only. The lookup works on the codebook multiplied by a power of two, 2^e with e >= 0, chosen
// so that its largest squared distance from the mean (`spread`, in double) lands in [1/4, 1): codes of
// |c| ~ 1e-25 would otherwise give biases and products that underflow float32, every code would
// score 0 and index 0 would come back. A power of two changes no rounding, so results at ordinary
// magnitudes are bit for bit those of the unscaled arithmetic. Returns 1 for spread >= 1 or 0.
float l2_scale(double spread);

// Rejects x row `row`, whose squared distance from the codebook's mean, times l2_scale^2, is over
// kMaxSquaredNorm: its float32 scores would overflow. Only checked when l2_scale > 1; at scale 1
// the per-row kMaxSquaredNorm check bounds every score.
[[noreturn]] void reject_far_row(int64_t row);

}  // namespace fullvq
