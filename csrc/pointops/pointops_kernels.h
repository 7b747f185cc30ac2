// Launchers of the point-op CUDA kernels: raw pointers, sizes and a stream.
// Shapes and semantics are those of the CPU kernels beside them; every
// launcher returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace dynkernels {
namespace cuda {

// xyz (B, N, 3) contiguous -> out (B, M) int64. md_scratch: B*N elements of
// the distance type (float, or double for kFloat64), used when N exceeds the
// register-resident capacity (see fps_needs_scratch).
cudaError_t launch_furthest_point_sample(ScalarKind kind, const void* xyz, int64_t batch, int64_t n, int64_t m,
                                         int64_t start, void* md_scratch, int64_t* out, cudaStream_t stream);

// Whether launch_furthest_point_sample needs md_scratch for clouds of n points.
bool fps_needs_scratch(ScalarKind kind, int64_t n);

// xyz (B, N, 3), centers (B, M, 3) contiguous, same kind -> out (B, M, ns) int64.
cudaError_t launch_ball_query(ScalarKind kind, const void* xyz, const void* centers, int64_t batch, int64_t n,
                              int64_t m, double min_radius, double radius, int64_t ns, int64_t* out,
                              cudaStream_t stream);

// features (B, C, N), idx (B, K) (int64 when idx_is_64bit, else int32) -> out (B, C, K).
cudaError_t launch_gather_features(ScalarKind kind, bool idx_is_64bit, const void* features, const void* idx,
                                   int64_t batch, int64_t channels, int64_t n, int64_t k, void* out,
                                   cudaStream_t stream);

// Atomic backward: adds grad_out (B, C, K) into grad_acc (B, C, N), which is
// zero-filled and of type float (double for kFloat64).
cudaError_t launch_gather_features_backward_atomic(ScalarKind kind, bool idx_is_64bit, const void* grad_out,
                                                   const void* idx, int64_t batch, int64_t channels, int64_t n,
                                                   int64_t k, void* grad_acc, cudaStream_t stream);

// Deterministic backward from a CSR of idx: order holds the flat positions
// b*K + k sorted by (b*N + idx) then k; offsets (B*N + 1) bound each point's
// run. Writes every element of grad (B, C, N) in grad_out's type.
cudaError_t launch_gather_features_backward_segments(ScalarKind kind, const void* grad_out, const int64_t* order,
                                                     const int64_t* offsets, int64_t batch, int64_t channels,
                                                     int64_t n, int64_t k, void* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace dynkernels
