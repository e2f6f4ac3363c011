// Nearest-code lookup on the CPU: the public C++ interface of fullvq's core.
//
// Distances are computed as bias[k] + <x', c_k> with
//   l2:     x' = -2 (x - mu), bias[k] = |c_k - mu|^2   (mu = codebook mean; centring keeps the
//           expansion |x|^2 - 2<x,c> + |c|^2 well conditioned when codes share an offset), all
//           times a power of two that keeps tiny codebooks out of float32's underflow (checks.h)
//   cosine: x' = -x/|x|,     c_k <- c_k/|c_k|, bias = 0 (zero vectors stay zero)
// so the nearest code is the smallest value, ties going to the lowest index.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fullvq {

enum class Metric { L2, Cosine };

Metric parse_metric(const std::string& name);  // throws std::invalid_argument

// A read-only 2-D float32 matrix with arbitrary element strides.
struct MatrixView {
    const float* data;
    int64_t rows, cols;
    int64_t row_stride, col_stride;  // in elements
    float at(int64_t r, int64_t c) const { return data[r * row_stride + c * col_stride]; }
};

struct Kernel;  // one SIMD implementation (kernels.h)

// Names of the CPU kernels this machine can run, best first (e.g. {"avx512", "avx2", "scalar"}).
std::vector<std::string> available_kernels();

// Codes packed once into the chosen kernel's panel layout; immutable, safe to share between threads.
class Codebook {
public:
    // kernel: "auto" or one of available_kernels(). Throws std::invalid_argument on bad input.
    Codebook(const MatrixView& codes, Metric metric, const std::string& kernel = "auto");

    // x: (M, D). Writes M indices and, if distances != nullptr, M distances (squared l2, or 1 - cos).
    // threads <= 0 means all cores this process may run on.
    void nearest(const MatrixView& x, int32_t* indices, float* distances, int threads) const;

    int64_t size() const { return size_; }
    int64_t dim() const { return dim_; }
    Metric metric() const { return metric_; }
    const char* kernel_name() const;

private:
    int64_t size_, dim_;
    Metric metric_;
    const Kernel* kernel_;
    std::vector<float> mean_;   // (D) l2 only: the centring offset mu
    float scale_;               // l2 only: the power of two applied to codes and queries (l2_scale)
    std::vector<float> panels_; // packed codes, kernel layout
    std::vector<float> bias_;   // (K padded to the panel width)
};

// One-shot lookup that packs the codebook chunk by chunk into cache-sized buffers instead of
// copying it whole: extra memory O(M + threads * chunk), whatever K is.
void nearest(const MatrixView& x, const MatrixView& codes, Metric metric, int32_t* indices,
             float* distances, int threads, const std::string& kernel = "auto");

}  // namespace fullvq
