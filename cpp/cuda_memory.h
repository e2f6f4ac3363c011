// Device memory shared by the CUDA sources (host code only): the stream all kernels run on, the
// per-device memory pool and stream-ordered scratch from it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda_errors.h"

namespace fullvq::cuda {

// Every kernel, copy, allocation and free runs on the legacy default stream of the current device
// (DLPack stream 1: inputs are exported for it, see fullvq_rt/lookup.py).
inline const cudaStream_t kStream = cudaStreamLegacy;

// The memory pool of `device`, created on first use and never destroyed (defined in
// lookup_cuda.cu). Unlike the default pool (release threshold 0, which returns every free block
// to the driver at each synchronisation) it keeps up to 256 MB cached between calls.
cudaMemPool_t device_pool(int device);

// Stream-ordered scratch of n elements of T from `pool` on kStream (nullptr when n == 0). The
// device of `pool` must be current for the scratch's lifetime.
template <class T>
class Scratch {
public:
    Scratch(int64_t n, cudaMemPool_t pool) {
        if (n > 0)
            check(cudaMallocFromPoolAsync(reinterpret_cast<void**>(&ptr_), size_t(n) * sizeof(T), pool, kStream),
                  "cudaMallocFromPoolAsync");
    }
    ~Scratch() {
        if (ptr_) cudaFreeAsync(ptr_, kStream);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    T* get() const { return ptr_; }

private:
    T* ptr_ = nullptr;
};

}  // namespace fullvq::cuda
