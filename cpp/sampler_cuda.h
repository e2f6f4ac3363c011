// The sampler on a CUDA device: the contract of sampler.h (same weights, ranking, cuts and Philox
// draws, so the tokens match the CPU's up to float rounding), with logits and tokens in device
// memory. Defined in sampler_cuda.cu when the build found a CUDA toolkit, else in
// lookup_cuda_missing.cpp; callers check cuda::compiled() (lookup_cuda.h) first.
#pragma once

#include <cstdint>

#include "sampler.h"

namespace fullvq::cuda {

// logits: device matrix (R, V), columns contiguous; tokens: device (B). Blocks until the tokens
// are written. Throws std::invalid_argument for bad parameters or logits, in the CPU's words.
void sample(const MatrixView& logits, const SamplingParams& params, int32_t* tokens, int device);

}  // namespace fullvq::cuda
