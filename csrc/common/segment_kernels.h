// Launchers of the shared segment / scatter CUDA kernels (no ATen: the glue in
// segment_cuda.cpp, scatter_cuda.h and the families' glue call them with raw
// pointers). Semantics are those of the CPU kernels in segment_cpu.cpp and
// scatter_cpu.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace dynkernels {
namespace cuda {

// Rows form. src (rows, D); segment s is positions offsets[s] .. offsets[s + 1] - 1
// of perm (m entries; perm null: of src itself, m = rows) -> out (S, D): reduce
// 0 sum / 1 mean / 2 max over each segment's rows in that order (one thread per
// output element: deterministic); empty segments give 0. Positions are clamped
// to [0, m) and perm entries outside [0, rows) read nothing, so bad offsets or
// perms cannot read out of bounds.
cudaError_t launch_segment_reduce(ScalarKind kind, int reduce, const void* src, const int64_t* offsets,
                                  const int64_t* perm, int64_t rows, int64_t m, int64_t d, int64_t segments,
                                  void* out, cudaStream_t stream);

// src (M, D), index (M,) -> acc (S, D) += src rows by atomicAdd (acc: float,
// or double for kFloat64; zeroed by the caller). Indices outside [0, S) add nothing.
cudaError_t launch_scatter_add_rows_atomic(ScalarKind kind, bool idx_is_64bit, const void* src, const void* index,
                                           int64_t m, int64_t d, int64_t segments, void* acc, cudaStream_t stream);

// Columns form (the point ops' gather backward): grad_out (B, C, K / group),
// idx (B, K), optional weight (B, K) -> grad (B, C, n),
// grad[b, c, idx[b, j]] += weight[b, j] * grad_out[b, c, j / group]; idx -1 adds nothing.
// Atomic: into acc (float, or double for kFloat64), zeroed by the caller.
cudaError_t launch_scatter_columns_atomic(ScalarKind kind, bool idx_is_64bit, const void* grad_out, const void* idx,
                                          const void* weight, int64_t batch, int64_t channels, int64_t n, int64_t k,
                                          int64_t group, void* grad_acc, cudaStream_t stream);

// Deterministic: order / offsets are the CSR of idx by target (b * n + idx),
// positions b * K + j in ascending j (see sort_into_segments in scatter_cuda.h).
cudaError_t launch_scatter_columns_segments(ScalarKind kind, const void* grad_out, const void* weight,
                                            const int64_t* order, const int64_t* offsets, int64_t batch,
                                            int64_t channels, int64_t n, int64_t k, int64_t group, void* grad,
                                            cudaStream_t stream);

}  // namespace cuda
}  // namespace dynkernels
