// coordinate_refinement and its backward, CUDA glue.
#include "common/cuda_glue.h"
#include "pointformer/pointformer_checks.h"
#include "pointformer/pointformer_kernels.h"

namespace {

at::Tensor coordinate_refinement_cuda(const at::Tensor& attn, const at::Tensor& grouped_xyz,
                                      const at::Tensor& row_index) {
  DK_CHECK_CUDA(attn);
  dynkernels::pointformer::check_refinement_args(attn, grouped_xyz, row_index);
  const c10::cuda::CUDAGuard guard(attn.device());
  const int64_t batch = attn.size(0), m = attn.size(1);
  at::Tensor out = at::empty({batch, m, 3}, grouped_xyz.options());
  if (out.numel() == 0) return out;
  at::Tensor a = attn.contiguous(), xyz = grouped_xyz.contiguous(), rows = row_index.contiguous();
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_coordinate_refinement(
      dynkernels::cuda::kind_of(a), a.const_data_ptr(), xyz.const_data_ptr(), rows.const_data_ptr<int64_t>(), batch,
      m, a.size(2), a.size(3), a.size(4), out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> coordinate_refinement_backward_cuda(const at::Tensor& grad_out,
                                                                       const at::Tensor& attn,
                                                                       const at::Tensor& grouped_xyz,
                                                                       const at::Tensor& row_index) {
  DK_CHECK_CUDA(attn);
  dynkernels::pointformer::check_refinement_args(attn, grouped_xyz, row_index);
  const c10::cuda::CUDAGuard guard(attn.device());
  const int64_t batch = attn.size(0), m = attn.size(1);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({batch, m, 3}), "grad_out must be (B, M, 3), got ", grad_out.sizes());
  at::Tensor grad_attn = at::zeros_like(attn, at::MemoryFormat::Contiguous);
  at::Tensor grad_xyz = at::empty_like(grouped_xyz, at::MemoryFormat::Contiguous);
  if (grad_xyz.numel() == 0) return {grad_attn, grad_xyz};
  at::Tensor a = attn.contiguous(), xyz = grouped_xyz.contiguous(), rows = row_index.contiguous();
  at::Tensor g = grad_out.to(attn.scalar_type()).contiguous();
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_coordinate_refinement_backward(
      dynkernels::cuda::kind_of(a), g.const_data_ptr(), a.const_data_ptr(), xyz.const_data_ptr(),
      rows.const_data_ptr<int64_t>(), batch, m, a.size(2), a.size(3), a.size(4), grad_attn.data_ptr(),
      grad_xyz.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return {grad_attn, grad_xyz};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) {
  m.impl("coordinate_refinement", &coordinate_refinement_cuda);
  m.impl("coordinate_refinement_backward", &coordinate_refinement_backward_cuda);
}
