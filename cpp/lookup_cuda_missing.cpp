// Compiled instead of lookup_cuda.cu and sampler_cuda.cu when the build found no CUDA toolkit:
// every entry point says so. The bindings check cuda::compiled() first, so these only guard against misuse.
#include <stdexcept>

#include "lookup_cuda.h"
#include "sampler_cuda.h"

namespace fullvq::cuda {

namespace {
[[noreturn]] void missing() {
    throw std::invalid_argument("this build of fullvq_rt has no CUDA support: rebuild with a CUDA toolkit installed");
}
}  // namespace

int device_count() noexcept { return 0; }
void* device_alloc(size_t, int) { missing(); }
void device_free(void*, int) noexcept {}
DeviceCodebook::DeviceCodebook(const MatrixView&, Metric, int) { missing(); }
DeviceCodebook::~DeviceCodebook() = default;
void DeviceCodebook::nearest(const MatrixView&, int32_t*, float*) const { missing(); }
void sample(const MatrixView&, const SamplingParams&, int32_t*, int) { missing(); }

}  // namespace fullvq::cuda
