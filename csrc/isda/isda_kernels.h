// Launchers of the ISDA CUDA kernels (no ATen: the glue in isda_update_cuda.cpp
// calls them with raw pointers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace dynkernels {
namespace cuda {

// In place on one class's covariance cov (A, A): cov = (1 - w) sym(cov) + w sym(s)
// + w (1 - w) delta delta^T, written exactly symmetric (s: the batch's (A, A)
// population covariance; float32 or float64, like cov).
cudaError_t launch_isda_merge_symmetric(ScalarKind kind, void* cov, const void* s, const void* delta, double w,
                                        int64_t a, cudaStream_t stream);

}  // namespace cuda
}  // namespace dynkernels
