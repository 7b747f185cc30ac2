// Launchers of the Pointformer CUDA kernels: raw pointers, sizes and a stream
// (no ATen: the glue in *_cuda.cpp calls these). Every launcher returns the
// launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace dynkernels {
namespace cuda {

// attn (B, M, H, R, S), grouped_xyz (B, 3, M, S), row_index (B, M) -> out (B, M, 3).
cudaError_t launch_coordinate_refinement(ScalarKind kind, const void* attn, const void* grouped_xyz,
                                         const int64_t* row_index, int64_t batch, int64_t m, int64_t heads,
                                         int64_t rows, int64_t s, void* out, cudaStream_t stream);

// grad_out (B, M, 3) -> grad_attn (zero-filled by the caller; the used rows
// are written) and grad_xyz (every element written).
cudaError_t launch_coordinate_refinement_backward(ScalarKind kind, const void* grad_out, const void* attn,
                                                  const void* grouped_xyz, const int64_t* row_index, int64_t batch,
                                                  int64_t m, int64_t heads, int64_t rows, int64_t s, void* grad_attn,
                                                  void* grad_xyz, cudaStream_t stream);

}  // namespace cuda
}  // namespace dynkernels
