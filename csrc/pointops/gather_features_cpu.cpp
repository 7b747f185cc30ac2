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
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "pointops/pointops_checks.h"

namespace {

template <typename index_t>
void check_index_range(const index_t* idx, int64_t count, int64_t n) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_INDEX(idx[i] >= -1 && idx[i] < n, "idx must hold indices in [-1, ", n, "), got ",
                      static_cast<int64_t>(idx[i]));
  }
}

// grad row d (n) = sum over j of s[j] at row_idx[j], in ascending j. float
// and double accumulate in d itself; half types in the fp32 scratch row,
// rounded once at the end.
template <typename scalar_t, typename acc_t, typename index_t>
void scatter_row(const scalar_t* s, const index_t* row_idx, int64_t k, int64_t n, scalar_t* d, acc_t* scratch) {
  acc_t* acc = nullptr;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    acc = d;
  } else {
    acc = scratch;
  }
  std::fill(acc, acc + n, acc_t(0));
  for (int64_t j = 0; j < k; ++j) {
    if (row_idx[j] >= 0) acc[row_idx[j]] += static_cast<acc_t>(s[j]);
  }
  if constexpr (!std::is_same_v<acc_t, scalar_t>) {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<scalar_t>(acc[i]);
  }
}


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
    check_index_range(id, batch * k, n);
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
  const int64_t batch = grad_out.size(0), channels = grad_out.size(1), k = idx.size(1), n = num_points;
  if (k == 0 || batch * channels * n == 0) return at::zeros({batch, channels, n}, grad_out.options());
  at::Tensor grad = at::empty({batch, channels, n}, grad_out.options());  // every row is written below
  at::Tensor g = grad_out.contiguous();
  at::Tensor index = idx.contiguous();
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "gather_features_backward_cpu_index", [&] {
    const index_t* id = index.const_data_ptr<index_t>();
    check_index_range(id, batch * k, n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gather_features_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* src = g.const_data_ptr<scalar_t>();
      scalar_t* dst = grad.data_ptr<scalar_t>();
      at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(std::is_same_v<acc_t, scalar_t> ? 0 : static_cast<size_t>(n));
        for (int64_t row = begin; row < end; ++row) {
          const index_t* row_idx = id + (row / channels) * k;
          const scalar_t* s = src + row * k;
          scalar_t* d = dst + row * n;
          scatter_row(s, row_idx, k, n, d, scratch.data());
        }
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("gather_features", &gather_features_cpu);
  m.impl("gather_features_backward", &gather_features_backward_cpu);
}
