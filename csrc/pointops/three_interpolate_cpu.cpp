// three_interpolate and its backward (to features), CPU.
//
// Forward:  features (B, C, m), idx (B, n, 3) int32/int64 in [0, m), weight
//           (B, n, 3) in features' dtype -> out (B, C, n),
//           out[b, c, i] = (w0 f[i0] + w1 f[i1]) + w2 f[i2], in fp32 for half types.
// Backward: grad_out (B, C, n) -> grad_features (B, C, m), the weighted
//           scatter-sum, deterministic (see common/scatter_cpu.h). The gradient to
//           weight is computed in Python from a gather.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "pointops/pointops_checks.h"
#include "common/scatter_cpu.h"

namespace {

at::Tensor three_interpolate_cpu(const at::Tensor& features, const at::Tensor& idx, const at::Tensor& weight,
                                 bool /*deterministic*/) {
  DK_CHECK_CPU(features);
  dynkernels::pointops::check_interpolate_args(features, idx, weight);
  const int64_t batch = features.size(0), channels = features.size(1), m = features.size(2), n = idx.size(1);
  at::Tensor out = at::empty({batch, channels, n}, features.options());
  if (out.numel() == 0) return out;
  at::Tensor f = features.contiguous(), index = idx.contiguous(), w = weight.contiguous();
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "three_interpolate_cpu_index", [&] {
    const index_t* id = index.const_data_ptr<index_t>();
    dynkernels::segment::check_index_range(id, batch * n * 3, 0, m);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "three_interpolate_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* src = f.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / channels;
          const index_t* ri = id + b * n * 3;
          const scalar_t* rw = wp + b * n * 3;
          const scalar_t* s = src + row * m;
          scalar_t* d = dst + row * n;
          for (int64_t i = 0; i < n; ++i) {
            const acc_t t0 = static_cast<acc_t>(rw[3 * i]) * static_cast<acc_t>(s[ri[3 * i]]);
            const acc_t t1 = static_cast<acc_t>(rw[3 * i + 1]) * static_cast<acc_t>(s[ri[3 * i + 1]]);
            const acc_t t2 = static_cast<acc_t>(rw[3 * i + 2]) * static_cast<acc_t>(s[ri[3 * i + 2]]);
            d[i] = static_cast<scalar_t>((t0 + t1) + t2);
          }
        }
      });
    });
  });
  return out;
}

at::Tensor three_interpolate_backward_cpu(const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& weight,
                                          int64_t num_points, bool /*deterministic*/) {
  DK_CHECK_CPU(grad_out);
  dynkernels::pointops::check_interpolate_args(grad_out, idx, weight);
  TORCH_CHECK(grad_out.size(2) == idx.size(1), "grad_out has ", grad_out.size(2), " columns, idx ", idx.size(1));
  TORCH_CHECK(num_points >= 0, "num_points must be >= 0, got ", num_points);
  const int64_t batch = idx.size(0), n = idx.size(1);
  return dynkernels::segment::scatter_columns_cpu(grad_out, idx.reshape({batch, n * 3}),
                                                    weight.reshape({batch, n * 3}), num_points, /*group=*/3,
                                                    /*lowest=*/0);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("three_interpolate", &three_interpolate_cpu);
  m.impl("three_interpolate_backward", &three_interpolate_backward_cpu);
}
