// AVX-512 sampler kernel: 16-lane vectors. Compiled with -mavx512f (CMakeLists.txt); only called
// when the CPU supports it. Same availability rule as the lookup's AVX-512 kernel.
#include "sampler_rows.h"

namespace fullvq {
namespace {
bool supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"); }
}  // namespace

const SamplerKernel kSamplerAvx512 = Rows<16>::kernel("avx512", supported);

}  // namespace fullvq
