// ATen-side helpers of the segment substrate on CUDA (CUDA builds only):
// sort_into_segments (stable sort by key into a CSR, no host sync), and the
// column scatter-sum that the point ops' gather and three_interpolate
// backwards share. Kernels: common/segment_kernel.cu.
#pragma once

#include <tuple>

#include "common/cuda_glue.h"
#include "common/segment_kernels.h"

namespace dynkernels {
namespace segment {

// keys (M,) int32/int64 -> (order (M,) int64, offsets (S + 1,) int64): order
// lists the positions of keys in [0, S) sorted by key, ties in position order
// (stable), then the dropped positions (keys outside [0, S)); segment s is
// order[offsets[s] : offsets[s + 1]]. Device-side throughout (sort, searchsorted).
inline std::tuple<at::Tensor, at::Tensor> sort_into_segments(const at::Tensor& keys, int64_t segments) {
  const at::Tensor k = keys.to(at::kLong);
  const at::Tensor dropped = at::scalar_tensor(segments, k.options());
  const at::Tensor bounded = at::where((k >= 0).logical_and_(k < segments), k, dropped);
  auto [sorted_keys, order] = at::sort(bounded, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor offsets = at::searchsorted(sorted_keys, at::arange(segments + 1, k.options()));
  return {order, offsets};
}

// grad_out (B, C, K / group), idx (B, K), weight (B, K) or undefined -> (B, C, n).
inline at::Tensor scatter_columns_cuda(const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& weight,
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
    // key b * n + idx, or "dropped" for idx -1
    const at::Tensor base = at::arange(batch, index.options().dtype(at::kLong)).unsqueeze(1) * n;
    const at::Tensor keys = at::where(index >= 0, index.to(at::kLong) + base, at::scalar_tensor(-1, base.options()));
    auto [order, offsets] = sort_into_segments(keys.reshape({-1}), batch * n);
    DK_CHECK_LAUNCH(cuda::launch_scatter_columns_segments(kind, g.const_data_ptr(), wp,
                                                          order.const_data_ptr<int64_t>(),
                                                          offsets.const_data_ptr<int64_t>(), batch, channels, n, k,
                                                          group, grad.data_ptr(), stream));
    return grad;
  }
  at::Tensor acc = at::zeros({batch, channels, n}, grad_out.options().dtype(cuda::compute_dtype(g)));
  if (acc.numel() == 0) return acc.to(grad_out.scalar_type());
  DK_CHECK_LAUNCH(cuda::launch_scatter_columns_atomic(kind, index.scalar_type() == at::kLong, g.const_data_ptr(),
                                                      index.const_data_ptr(), wp, batch, channels, n, k, group,
                                                      acc.data_ptr(), stream));
  return acc.scalar_type() == grad_out.scalar_type() ? acc : acc.to(grad_out.scalar_type());
}

}  // namespace segment
}  // namespace dynkernels
