// The scatter-sum backward on CUDA, shared by the glue of gather_features and
// three_interpolate (see launch_scatter_backward_* in pointops_kernels.h).
// Deterministic mode builds a CSR of idx with a stable sort (ATen), then sums
// each point's segment in ascending position without atomics.
#pragma once

#include "common/cuda_glue.h"
#include "pointops/pointops_kernels.h"

namespace dynkernels {
namespace pointops {

// grad_out (B, C, K / group), idx (B, K), weight (B, K) or undefined -> (B, C, n).
inline at::Tensor scatter_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& weight,
                                        int64_t n, int64_t group, bool deterministic) {
  const int64_t batch = grad_out.size(0), channels = grad_out.size(1), k = idx.size(1);
  at::Tensor g = grad_out.contiguous(), index = idx.contiguous();
  at::Tensor w = weight.defined() ? weight.contiguous() : weight;
  const void* wp = w.defined() ? w.const_data_ptr() : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto kind = cuda::kind_of(g);
  if (deterministic) {
    at::Tensor grad = at::empty({batch, channels, n}, grad_out.options());
    if (grad.numel() == 0) return grad;
    at::Tensor base = at::arange(batch, index.options().dtype(at::kLong)).unsqueeze(1) * n;
    at::Tensor keys = at::where(index >= 0, index.to(at::kLong) + base, at::scalar_tensor(batch * n, base.options()))
                          .reshape({-1});
    auto [sorted_keys, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    at::Tensor offsets = at::searchsorted(sorted_keys, at::arange(batch * n + 1, base.options()));
    DK_CHECK_LAUNCH(cuda::launch_scatter_backward_segments(kind, g.const_data_ptr(), wp,
                                                           order.const_data_ptr<int64_t>(),
                                                           offsets.const_data_ptr<int64_t>(), batch, channels, n, k,
                                                           group, grad.data_ptr(), stream));
    return grad;
  }
  at::Tensor acc = at::zeros({batch, channels, n}, grad_out.options().dtype(cuda::compute_dtype(g)));
  if (acc.numel() == 0) return acc.to(grad_out.scalar_type());
  DK_CHECK_LAUNCH(cuda::launch_scatter_backward_atomic(kind, index.scalar_type() == at::kLong, g.const_data_ptr(),
                                                       index.const_data_ptr(), wp, batch, channels, n, k, group,
                                                       acc.data_ptr(), stream));
  return acc.scalar_type() == grad_out.scalar_type() ? acc : acc.to(grad_out.scalar_type());
}

}  // namespace pointops
}  // namespace dynkernels
