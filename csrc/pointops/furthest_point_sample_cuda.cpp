// furthest_point_sample, CUDA glue: checks, device guard, stream, launch.
#include "common/cuda_glue.h"
#include "pointops/pointops_checks.h"
#include "pointops/pointops_kernels.h"

namespace {

at::Tensor furthest_point_sample_cuda(const at::Tensor& xyz, int64_t num_points, int64_t start_index) {
  DK_CHECK_CUDA(xyz);
  dynkernels::pointops::check_fps_args(xyz, num_points, start_index);
  const int64_t batch = xyz.size(0), n = xyz.size(1);
  const c10::cuda::CUDAGuard guard(xyz.device());
  at::Tensor out = at::empty({batch, num_points}, xyz.options().dtype(at::kLong));
  if (batch == 0 || num_points == 0) return out;
  at::Tensor points = xyz.contiguous();
  at::Tensor scratch;
  if (dynkernels::cuda::fps_needs_scratch(dynkernels::cuda::kind_of(points), n)) {
    scratch = at::empty({batch, n}, xyz.options().dtype(dynkernels::cuda::compute_dtype(xyz)));
  }
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_furthest_point_sample(
      dynkernels::cuda::kind_of(points), points.const_data_ptr(), batch, n, num_points, start_index,
      scratch.defined() ? scratch.data_ptr() : nullptr, out.data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) { m.impl("furthest_point_sample", &furthest_point_sample_cuda); }
