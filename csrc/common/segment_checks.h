// Argument checks of the segment substrate's ops, shared by the CPU and CUDA
// glue (Python validates user input first, with friendlier messages).
#pragma once

#include <optional>
#include <string>

#include "common/checks.h"

namespace dynkernels {
namespace segment {

enum class Reduce : int { kSum = 0, kMean = 1, kMax = 2 };

inline Reduce parse_reduce(c10::string_view reduce) {
  if (reduce == "sum") return Reduce::kSum;
  if (reduce == "mean") return Reduce::kMean;
  if (reduce == "max") return Reduce::kMax;
  TORCH_CHECK(false, "reduce must be 'sum', 'mean' or 'max', got '", std::string(reduce), "'");
}

// src (M, D) floating, offsets (S + 1,) int64, perm (P,) int64 or none, on src's
// device; returns the reduction.
inline Reduce check_reduce_args(const at::Tensor& src, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& perm, c10::string_view reduce) {
  DK_CHECK_DIM(src, 2);
  TORCH_CHECK(at::isFloatingType(src.scalar_type()), "src must be a floating tensor, got ", src.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong,
              "offsets must be a 1-D int64 tensor of S + 1 >= 1 entries, got ", offsets.sizes(), " ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.device() == src.device(), "offsets must be on src's device");
  if (perm.has_value()) {
    TORCH_CHECK(perm->dim() == 1 && perm->scalar_type() == at::kLong, "perm must be a 1-D int64 tensor");
    TORCH_CHECK(perm->device() == src.device(), "perm must be on src's device");
  }
  return parse_reduce(reduce);
}

// CPU offsets are checked for free: 0 <= offsets[0] <= ... <= offsets[S] <= M
// (M: the rows of src, or the length of perm). On CUDA each segment's range is
// clamped instead, and perm entries outside [0, M) read nothing: no host sync.
inline void check_offsets_cpu(const at::Tensor& offsets, int64_t m) {
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t n = offsets.size(0);
  TORCH_CHECK(o[0] >= 0 && o[n - 1] <= m, "offsets must lie in [0, M] with M = ", m);
  for (int64_t i = 1; i < n; ++i) TORCH_CHECK(o[i] >= o[i - 1], "offsets must be non-decreasing");
}

// The perm entries the offsets reach must index rows of src.
inline void check_perm_cpu(const at::Tensor& perm, const at::Tensor& offsets, int64_t rows) {
  const int64_t* p = perm.const_data_ptr<int64_t>();
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  for (int64_t j = o[0]; j < o[offsets.size(0) - 1]; ++j) {
    TORCH_CHECK_INDEX(p[j] >= 0 && p[j] < rows, "perm must hold rows of src in [0, ", rows, "), got ", p[j]);
  }
}

struct ScatterArgs {
  int64_t segments;
  Reduce reduce;
};

// src (M, D) floating, index (M,) int32/int64 on src's device, num_segments >= 0.
inline ScatterArgs check_scatter_args(const at::Tensor& src, const at::Tensor& index, const c10::SymInt& num_segments,
                                      c10::string_view reduce) {
  const int64_t segments = num_segments.expect_int();
  DK_CHECK_DIM(src, 2);
  TORCH_CHECK(at::isFloatingType(src.scalar_type()), "src must be a floating tensor, got ", src.scalar_type());
  DK_CHECK_INDEX_DTYPE(index);
  TORCH_CHECK(index.dim() == 1 && index.size(0) == src.size(0), "index must be (M,) with M = ", src.size(0),
              ", got ", index.sizes());
  TORCH_CHECK(index.device() == src.device(), "index must be on src's device");
  TORCH_CHECK(segments >= 0, "num_segments must be >= 0, got ", segments);
  return {segments, parse_reduce(reduce)};
}

}  // namespace segment
}  // namespace dynkernels
