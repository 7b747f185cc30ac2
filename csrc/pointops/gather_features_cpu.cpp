// gather_features and its backward, CPU. Serves grouping_operation (idx (B, M,
// ns) flattened to (B, M*ns)) and gather_points (idx (B, M)).
//
// Forward:  features (B, C, N) any float dtype, idx (B, K) int32/int64 in
//           [-1, N) -> out (B, C, K), out[b, c, k] = features[b, c, idx[b, k]],
//           or 0 where idx == -1. Other indices raise.
// Backward: grad_out (B, C, K) -> grad_features (B, C, N), the scatter-sum of
//           grad_out over idx; -1 receives nothing. Each (b, c) row is summed by
//           one thread in ascending k (in fp32 for half types), so the result is
//           deterministic and no atomics are needed; `deterministic` is accepted
//           for the common schema.
#include <ATen/Parallel.h>

#include "pointops/pointops_checks.h"
#include "common/scatter_cpu.h"

namespace {

using dynkernels::segment::check_index_range;

at::Tensor gather_features_cpu(const at::Tensor& features, const at::Tensor& idx, bool /*deterministic*/) {
  DK_CHECK_CPU(features);
  DK_CHECK_CPU(idx);
  dynkernels::pointops::check_gather_args(features, idx);
  const int64_t batch = features.size(0), channels = features.size(1), n = features.size(2), k = idx.size(1);
  at::Tensor out = at::empty({batch, channels, k}, features.options());
  if (out.numel() == 0) return out;
  at::Tensor f = features.contiguous();
  at::Tensor index = idx.contiguous();
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "gather_features_cpu_index", [&] {
    const index_t* id = index.const_data_ptr<index_t>();
    check_index_range(id, batch * k, -1, n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "gather_features_cpu", [&] {
      const scalar_t* src = f.const_data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const index_t* row_idx = id + (row / channels) * k;
          const scalar_t* s = src + row * n;
          scalar_t* d = dst + row * k;
          for (int64_t j = 0; j < k; ++j) d[j] = row_idx[j] < 0 ? scalar_t(0) : s[row_idx[j]];
        }
      });
    });
  });
  return out;
}

at::Tensor gather_features_backward_cpu(const at::Tensor& grad_out, const at::Tensor& idx, int64_t num_points,
                                        bool /*deterministic*/) {
  DK_CHECK_CPU(grad_out);
  DK_CHECK_CPU(idx);
  dynkernels::pointops::check_gather_backward_args(grad_out, idx, num_points);
  return dynkernels::segment::scatter_columns_cpu(grad_out, idx, at::Tensor(), num_points, /*group=*/1,
                                                    /*lowest=*/-1);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("gather_features", &gather_features_cpu);
  m.impl("gather_features_backward", &gather_features_backward_cpu);
}
