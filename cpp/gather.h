// Codebook gather for decoding: token ids -> code vectors in the decoder's NCHW layout.
#pragma once

#include <cstdint>

#include "lookup.h"

namespace fullvq {

// ids (B, H, W) row-major, any integer type; out (B, D, H, W) row-major: out[b, d, y, x] =
// codes[ids[b, y, x], d]. Throws std::invalid_argument naming the first id outside [0, K).
template <class Id>
void gather_nchw(const MatrixView& codes, const Id* ids, int64_t batch, int64_t height, int64_t width, float* out);

}  // namespace fullvq
