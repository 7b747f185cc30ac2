// three_interpolate and its backward (to features), CUDA glue.
#include "common/cuda_glue.h"
#include "common/scatter_cuda.h"
#include "pointops/pointops_checks.h"
#include "pointops/pointops_kernels.h"

namespace {

at::Tensor three_interpolate_cuda(const at::Tensor& features, const at::Tensor& idx, const at::Tensor& weight,
                                  bool /*deterministic*/) {
  DK_CHECK_CUDA(features);
  dynkernels::pointops::check_interpolate_args(features, idx, weight);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t batch = features.size(0), channels = features.size(1), m = features.size(2), n = idx.size(1);
  at::Tensor out = at::empty({batch, channels, n}, features.options());
  if (out.numel() == 0) return out;
  at::Tensor f = features.contiguous(), index = idx.contiguous(), w = weight.contiguous();
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_three_interpolate(
      dynkernels::cuda::kind_of(f), index.scalar_type() == at::kLong, f.const_data_ptr(), index.const_data_ptr(),
      w.const_data_ptr(), batch, channels, m, n, out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor three_interpolate_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx,
                                           const at::Tensor& weight, int64_t num_points, bool deterministic) {
  DK_CHECK_CUDA(grad_out);
  dynkernels::pointops::check_interpolate_args(grad_out, idx, weight);
  TORCH_CHECK(grad_out.size(2) == idx.size(1), "grad_out has ", grad_out.size(2), " columns, idx ", idx.size(1));
  TORCH_CHECK(num_points >= 0, "num_points must be >= 0, got ", num_points);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t batch = idx.size(0), n = idx.size(1);
  return dynkernels::segment::scatter_columns_cuda(grad_out, idx.reshape({batch, n * 3}),
                                                     weight.reshape({batch, n * 3}), num_points, /*group=*/3,
                                                     deterministic);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) {
  m.impl("three_interpolate", &three_interpolate_cuda);
  m.impl("three_interpolate_backward", &three_interpolate_backward_cuda);
}
