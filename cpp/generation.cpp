#include "generation.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace fullvq {

SamplingLoop::SamplingLoop(int64_t images, const CacheShape& shape, int64_t vocab, const SamplingParams& params,
                           int threads)
    : images_(images), vocab_(vocab), shape_(shape), params_(params), threads_(threads) {
    if (images < 1 || vocab < 1 || shape.layers < 1 || shape.heads < 1 || shape.seq_len < 1 || shape.head_dim < 1)
        throw std::invalid_argument("SamplingLoop: images, vocabulary and cache sizes must be positive");
    rows_ = guided() ? 2 * images : images;
    // The sampler's own checks of the parameters, on a stand-in view of the logits' shape.
    check_sampling(MatrixView{nullptr, rows_, vocab_, vocab_, 1}, params_);
    const size_t cache = size_t(shape.layers * rows_ * shape.heads * shape.seq_len * shape.head_dim);
    k_cache_.assign(cache, 0.0f);  // positions not yet written get weight 0 in the decode graph: keep them finite
    v_cache_.assign(cache, 0.0f);
    tokens_.assign(size_t(images * shape.seq_len), 0);
    drawn_.assign(size_t(images), 0);
    next_input_.assign(size_t(rows_), 0);
}

void SamplingLoop::step(const MatrixView& logits, const float* k, const float* v) {
    if (position_ >= shape_.seq_len)
        throw std::invalid_argument("SamplingLoop: all " + std::to_string(shape_.seq_len) +
                                    " tokens are drawn; start a new loop");
    if (logits.rows != rows_ || logits.cols != vocab_)
        throw std::invalid_argument("logits must have shape (" + std::to_string(rows_) + ", " + std::to_string(vocab_) +
                                    "), got (" + std::to_string(logits.rows) + ", " + std::to_string(logits.cols) + ")");
    write_cache(k_cache_, k);
    write_cache(v_cache_, v);
    SamplingParams params = params_;
    params.step = uint64_t(position_);
    sample(logits, params, drawn_.data(), threads_);
    for (int64_t b = 0; b < images_; ++b) {
        tokens_[size_t(b * shape_.seq_len + position_)] = drawn_[size_t(b)];
        for (int64_t copy = b; copy < rows_; copy += images_) next_input_[size_t(copy)] = drawn_[size_t(b)];
    }
    ++position_;
}

void SamplingLoop::write_cache(std::vector<float>& cache, const float* fresh) const {
    const int64_t blocks = shape_.layers * rows_ * shape_.heads, hd = shape_.head_dim;
    for (int64_t i = 0; i < blocks; ++i)
        std::copy_n(fresh + i * hd, hd, cache.data() + (i * shape_.seq_len + position_) * hd);
}

}  // namespace fullvq
