// Launchers of the ISDA CUDA kernels (no ATen: the glue in isda_update_cuda.cpp
// calls them with raw pointers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace dynkernels {
namespace cuda {

// In place on cov (C, A, A), every class c at once: centred (M, A) holds the
// batch rows sorted by class and centred on their class's batch mean, class c
// owning rows offsets[c] .. offsets[c + 1] - 1 (offsets (C + 1,)); w (C,) the
// merge weights n_b / (n_b + n), delta (C, A) old mean - batch mean. Classes
// with no rows are not touched; the rest get
// cov_c = (1 - w) sym(cov_c) + (w / n_b) X^T X + w (1 - w) delta delta^T, exactly symmetric.
// float32 or float64, every array of cov's type.
cudaError_t launch_isda_segment_merge(ScalarKind kind, void* cov, const void* centred, const int64_t* offsets,
                                      const void* w, const void* delta, int64_t m, int64_t classes, int64_t a,
                                      cudaStream_t stream);

}  // namespace cuda
}  // namespace dynkernels
