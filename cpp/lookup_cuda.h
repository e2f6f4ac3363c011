// Nearest-code lookup on a CUDA device: the same contract as lookup.h (metrics, centring, ties to
// the lowest index, finite-input checks), with inputs and outputs in device memory.
// Declared unconditionally; defined in lookup_cuda.cu only when the build found a CUDA toolkit
// (FULLVQ_WITH_CUDA), so callers check compiled() first.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lookup.h"

namespace fullvq::cuda {

constexpr bool compiled() {
#ifdef FULLVQ_WITH_CUDA
    return true;
#else
    return false;
#endif
}

// Number of usable CUDA devices (0 when there is no driver or device); creates no context.
int device_count() noexcept;

// Device memory for results handed to Python (freed by the returned array's owner): stream-ordered
// on the device's legacy default stream, from the device's memory pool, so neither call
// synchronises the device. The memory may be reused once that stream's work before the free is
// done: a reader on another (non-blocking) stream must finish before the array is released.
void* device_alloc(size_t bytes, int device);
void device_free(void* ptr, int device) noexcept;

// A codebook prepared once on `device`: codes centred (l2) or normalised (cosine) plus the bias
// term, in device memory. `codes` is a device pointer with element strides. Thread-safe const use.
class DeviceCodebook {
public:
    DeviceCodebook(const MatrixView& codes, Metric metric, int device);
    ~DeviceCodebook();
    DeviceCodebook(const DeviceCodebook&) = delete;
    DeviceCodebook& operator=(const DeviceCodebook&) = delete;

    // x: device matrix (M, D); indices: device (M); distances: device (M) or nullptr.
    // Blocks until the results are written. Throws std::invalid_argument on non-finite input.
    void nearest(const MatrixView& x, int32_t* indices, float* distances) const;

    int64_t size() const { return size_; }
    int64_t dim() const { return dim_; }
    int device() const { return device_; }

private:
    int64_t size_, dim_;
    Metric metric_;
    int device_;
    float* codes_ = nullptr;  // (K, D) transformed codes, row-major
    float* bias_ = nullptr;   // (K)
    float* mean_ = nullptr;   // (D) l2 centring offset (zeros for cosine)
    float scale_ = 1.f;       // l2: the power of two applied to codes and queries (checks.h l2_scale)
};

}  // namespace fullvq::cuda
