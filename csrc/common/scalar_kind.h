// The element type behind a void* buffer, shared by CUDA launchers (nvcc) and
// their torch glue (host compiler). No CUDA or torch headers.
#pragma once

namespace dynkernels {
namespace cuda {

enum class ScalarKind : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace cuda
}  // namespace dynkernels
