// The generator's sampling loop between network calls: the KV cache the decode graph reads, the
// draw of each token (sampler.h), the tokens so far and the next input of every row.
//
// Rows R = B images, or 2B with guidance (rows [B, 2B) the unconditional copies). One call of
// step() per token: the network has just returned logits (R, V) and the keys and values of the
// current position (L, R, H, 1, hd); step() writes those into the cache at the current position,
// draws token `position` of every image (Philox counter = position), records it, and sets the next
// input of both copies of each image to it.
#pragma once

#include <cstdint>
#include <vector>

#include "lookup.h"
#include "sampler.h"

namespace fullvq {

struct CacheShape {
    int64_t layers, heads, seq_len, head_dim;
};

class SamplingLoop {
public:
    // Throws std::invalid_argument for non-positive sizes or sampling parameters out of range.
    SamplingLoop(int64_t images, const CacheShape& shape, int64_t vocab, const SamplingParams& params, int threads);

    bool guided() const { return params_.cfg_scale != 1.0; }
    int64_t images() const { return images_; }
    int64_t rows() const { return rows_; }
    int64_t position() const { return position_; }
    const CacheShape& shape() const { return shape_; }

    // logits (R, V); k, v contiguous (L, R, H, 1, hd). Throws once the sequence is complete.
    void step(const MatrixView& logits, const float* k, const float* v);

    float* k_cache() { return k_cache_.data(); }    // (L, R, H, T, hd), zero where not yet written
    float* v_cache() { return v_cache_.data(); }
    const int64_t* next_input() const { return next_input_.data(); }  // (R,)
    const int32_t* tokens() const { return tokens_.data(); }          // (B, T)

private:
    void write_cache(std::vector<float>& cache, const float* fresh) const;

    int64_t images_, rows_, vocab_;
    CacheShape shape_;
    SamplingParams params_;
    int threads_;
    int64_t position_ = 0;
    std::vector<float> k_cache_, v_cache_;
    std::vector<int32_t> tokens_, drawn_;
    std::vector<int64_t> next_input_;
};

}  // namespace fullvq
