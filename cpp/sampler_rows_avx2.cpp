// AVX2 sampler kernel: 8-lane vectors. Compiled with -mavx2 (CMakeLists.txt); only called when the
// CPU supports it. Same availability rule as the lookup's AVX2 kernel, so cpu_kernels() names both.
#include "sampler_rows.h"

namespace fullvq {
namespace {
bool supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
}  // namespace

const SamplerKernel kSamplerAvx2 = Rows<8>::kernel("avx2", supported);

}  // namespace fullvq
