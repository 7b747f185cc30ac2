// The column scatter-sum of the segment substrate on CPU (the rows form is in
// segment_cpu.cpp), shared by the backward of gather_features
// (grouping_operation, gather_points) and of three_interpolate.
//
// grad_out (B, C, K / group), idx (B, K), optional weight (B, K) ->
// grad (B, C, n): grad[b, c, idx[b, j]] += weight[b, j] * grad_out[b, c, j / group],
// idx -1 adding nothing. Each (b, c) row is summed by one thread in ascending
// j (in fp32 for half types), so results are deterministic without atomics.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "common/checks.h"

namespace dynkernels {
namespace segment {

template <typename index_t>
void check_index_range(const index_t* idx, int64_t count, int64_t lowest, int64_t n) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_INDEX(idx[i] >= lowest && idx[i] < n, "idx must hold indices in [", lowest, ", ", n, "), got ",
                      static_cast<int64_t>(idx[i]));
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
void scatter_row(const scalar_t* s, const index_t* row_idx, const scalar_t* row_weight, int64_t k, int64_t group,
                 int64_t n, scalar_t* d, acc_t* scratch) {
  acc_t* acc = nullptr;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    acc = d;
  } else {
    acc = scratch;
  }
  std::fill(acc, acc + n, acc_t(0));
  for (int64_t j = 0; j < k; ++j) {
    if (row_idx[j] < 0) continue;
    const acc_t value = static_cast<acc_t>(s[j / group]);
    acc[row_idx[j]] += row_weight == nullptr ? value : static_cast<acc_t>(row_weight[j]) * value;
  }
  if constexpr (!std::is_same_v<acc_t, scalar_t>) {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<scalar_t>(acc[i]);
  }
}

// weight may be undefined (all ones). idx values are checked to lie in
// [lowest, n).
inline at::Tensor scatter_columns_cpu(const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& weight,
                                       int64_t n, int64_t group, int64_t lowest) {
  const int64_t batch = grad_out.size(0), channels = grad_out.size(1), k = idx.size(1);
  if (k == 0 || batch * channels * n == 0) return at::zeros({batch, channels, n}, grad_out.options());
  at::Tensor grad = at::empty({batch, channels, n}, grad_out.options());  // every row is written below
  at::Tensor g = grad_out.contiguous();
  at::Tensor index = idx.contiguous();
  at::Tensor w = weight.defined() ? weight.contiguous() : weight;
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "scatter_backward_cpu_index", [&] {
    const index_t* id = index.const_data_ptr<index_t>();
    check_index_range(id, batch * k, lowest, n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scatter_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* src = g.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* dst = grad.data_ptr<scalar_t>();
      const int64_t cols = k / group;
      at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(std::is_same_v<acc_t, scalar_t> ? 0 : static_cast<size_t>(n));
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / channels;
          scatter_row(src + row * cols, id + b * k, wp == nullptr ? nullptr : wp + b * k, k, group, n, dst + row * n,
                      scratch.data());
        }
      });
    });
  });
  return grad;
}

}  // namespace segment
}  // namespace dynkernels
