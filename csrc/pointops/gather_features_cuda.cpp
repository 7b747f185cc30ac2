// gather_features and its backward, CUDA glue. The deterministic backward
// builds a CSR of idx with a stable sort (ATen), then sums each point's
// segment in ascending k without atomics.
#include "common/cuda_glue.h"
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
  const int64_t batch = grad_out.size(0), channels = grad_out.size(1), k = idx.size(1), n = num_points;
  at::Tensor g = grad_out.contiguous(), index = idx.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto kind = dynkernels::cuda::kind_of(g);
  if (deterministic) {
    at::Tensor grad = at::empty({batch, channels, n}, grad_out.options());
    if (grad.numel() == 0) return grad;
    at::Tensor base = at::arange(batch, index.options().dtype(at::kLong)).unsqueeze(1) * n;
    at::Tensor keys = at::where(index >= 0, index.to(at::kLong) + base, at::scalar_tensor(batch * n, base.options()))
                          .reshape({-1});
    auto [sorted_keys, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    at::Tensor offsets = at::searchsorted(sorted_keys, at::arange(batch * n + 1, base.options()));
    DK_CHECK_LAUNCH(dynkernels::cuda::launch_gather_features_backward_segments(
        kind, g.const_data_ptr(), order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), batch,
        channels, n, k, grad.data_ptr(), stream));
    return grad;
  }
  at::Tensor acc = at::zeros({batch, channels, n}, grad_out.options().dtype(dynkernels::cuda::compute_dtype(g)));
  if (acc.numel() == 0) return acc.to(grad_out.scalar_type());
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_gather_features_backward_atomic(
      kind, index.scalar_type() == at::kLong, g.const_data_ptr(), index.const_data_ptr(), batch, channels, n, k,
      acc.data_ptr(), stream));
  return acc.scalar_type() == grad_out.scalar_type() ? acc : acc.to(grad_out.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) {
  m.impl("gather_features", &gather_features_cuda);
  m.impl("gather_features_backward", &gather_features_backward_cuda);
}
