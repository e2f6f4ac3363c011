#include "gather.h"

#include <stdexcept>
#include <string>

namespace fullvq {

template <class Id>
void gather_nchw(const MatrixView& codes, const Id* ids, int64_t batch, int64_t height, int64_t width, float* out) {
    const int64_t plane = height * width, total = batch * plane;
    for (int64_t i = 0; i < total; ++i) {
        if (ids[i] < 0 || int64_t(ids[i]) >= codes.rows)
            throw std::invalid_argument("token id " + std::to_string(int64_t(ids[i])) + " at flat position " +
                                        std::to_string(i) + " is outside [0, " + std::to_string(codes.rows) +
                                        "): ids must come from this tokenizer's codebook");
    }
    for (int64_t b = 0; b < batch; ++b) {
        const Id* row_ids = ids + b * plane;
        float* image = out + b * codes.cols * plane;
        for (int64_t d = 0; d < codes.cols; ++d) {
            float* channel = image + d * plane;
            for (int64_t p = 0; p < plane; ++p) channel[p] = codes.at(int64_t(row_ids[p]), d);
        }
    }
}

template void gather_nchw<int32_t>(const MatrixView&, const int32_t*, int64_t, int64_t, int64_t, float*);
template void gather_nchw<int64_t>(const MatrixView&, const int64_t*, int64_t, int64_t, int64_t, float*);

}  // namespace fullvq
