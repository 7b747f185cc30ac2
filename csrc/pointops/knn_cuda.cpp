// knn, CUDA glue.
#include "common/cuda_glue.h"
#include "pointops/pointops_checks.h"
#include "pointops/pointops_kernels.h"

namespace {

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& xyz, const at::Tensor& centers, int64_t k) {
  DK_CHECK_CUDA(xyz);
  DK_CHECK_CUDA(centers);
  dynkernels::pointops::check_knn_args(xyz, centers, k);
  TORCH_CHECK(k <= dynkernels::cuda::kKnnMaxK, "knn on CUDA supports k <= ", dynkernels::cuda::kKnnMaxK, ", got ", k);
  const c10::cuda::CUDAGuard guard(xyz.device());
  const int64_t batch = xyz.size(0), n = xyz.size(1), m = centers.size(1);
  at::Tensor dist = at::empty({batch, m, k}, xyz.options().dtype(dynkernels::cuda::compute_dtype(xyz)));
  at::Tensor idx = at::empty({batch, m, k}, xyz.options().dtype(at::kLong));
  if (dist.numel() == 0) return {dist, idx};
  at::Tensor points = xyz.contiguous(), ctr = centers.contiguous();
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_knn(dynkernels::cuda::kind_of(points), points.const_data_ptr(),
                                               ctr.const_data_ptr(), batch, n, m, k, dist.data_ptr(),
                                               idx.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {dist, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) { m.impl("knn", &knn_cuda); }
