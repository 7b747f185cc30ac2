// gather_features and its backward, CUDA glue (the backward: common/scatter_cuda.h).
#include "common/cuda_glue.h"
#include "common/scatter_cuda.h"
#include "pointops/pointops_checks.h"
#include "pointops/pointops_kernels.h"

namespace {


at::Tensor gather_features_cuda(const at::Tensor& features, const at::Tensor& idx, bool /*deterministic*/) {
  DK_CHECK_CUDA(features);
  DK_CHECK_CUDA(idx);
  dynkernels::pointops::check_gather_args(features, idx);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t batch = features.size(0), channels = features.size(1), n = features.size(2), k = idx.size(1);
  at::Tensor out = at::empty({batch, channels, k}, features.options());
  if (out.numel() == 0) return out;
  at::Tensor f = features.contiguous(), index = idx.contiguous();
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_gather_features(
      dynkernels::cuda::kind_of(f), index.scalar_type() == at::kLong, f.const_data_ptr(), index.const_data_ptr(),
      batch, channels, n, k, out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor gather_features_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx, int64_t num_points,
                                         bool deterministic) {
  DK_CHECK_CUDA(grad_out);
  DK_CHECK_CUDA(idx);
  dynkernels::pointops::check_gather_backward_args(grad_out, idx, num_points);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return dynkernels::segment::scatter_columns_cuda(grad_out, idx, at::Tensor(), num_points, /*group=*/1,
                                                     deterministic);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) {
  m.impl("gather_features", &gather_features_cuda);
  m.impl("gather_features_backward", &gather_features_backward_cuda);
}
