// ball_query, CUDA glue.
#include "common/cuda_glue.h"
#include "pointops/pointops_checks.h"
#include "pointops/pointops_kernels.h"

namespace {

at::Tensor ball_query_cuda(const at::Tensor& xyz, const at::Tensor& centers, double min_radius, double radius,
                           int64_t num_samples) {
  DK_CHECK_CUDA(xyz);
  DK_CHECK_CUDA(centers);
  dynkernels::pointops::check_ball_query_args(xyz, centers, min_radius, radius, num_samples);
  const c10::cuda::CUDAGuard guard(xyz.device());
  const int64_t batch = xyz.size(0), n = xyz.size(1), m = centers.size(1);
  at::Tensor out = at::empty({batch, m, num_samples}, xyz.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  at::Tensor points = xyz.contiguous(), ctr = centers.contiguous();
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_ball_query(dynkernels::cuda::kind_of(points), points.const_data_ptr(),
                                                      ctr.const_data_ptr(), batch, n, m, min_radius, radius,
                                                      num_samples, out.data_ptr<int64_t>(),
                                                      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) { m.impl("ball_query", &ball_query_cuda); }
