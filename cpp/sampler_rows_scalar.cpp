// Portable sampler kernel over 4-lane GCC/Clang vectors, compiled for the baseline target only, so
// it runs on any CPU: the compiler lowers it to SSE2 on x86-64, NEON on arm64.
#include "sampler_rows.h"

namespace fullvq {
namespace {
bool always() { return true; }
}  // namespace

const SamplerKernel kSamplerScalar = Rows<4>::kernel("scalar", always);

}  // namespace fullvq
