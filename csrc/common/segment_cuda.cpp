// The segment substrate's ops, CUDA glue (kernels: segment_kernel.cu).
// No host sync: offsets, perms and indices are never read on the host.
#include "common/cuda_glue.h"
#include "common/segment_checks.h"
#include "common/segment_kernels.h"

namespace {

at::Tensor segment_reduce_cuda(const at::Tensor& src, const at::Tensor& offsets, const std::optional<at::Tensor>& perm,
                               c10::string_view reduce_name) {
  DK_CHECK_CUDA(src);
  const auto reduce = dynkernels::segment::check_reduce_args(src, offsets, perm, reduce_name);
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor x = src.contiguous(), off = offsets.contiguous();
  const at::Tensor order = perm.has_value() ? perm->contiguous() : at::Tensor();
  const int64_t segments = off.size(0) - 1, rows = x.size(0);
  at::Tensor out = at::empty({segments, x.size(1)}, x.options());
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_segment_reduce(
      dynkernels::cuda::kind_of(x), static_cast<int>(reduce), x.const_data_ptr(), off.const_data_ptr<int64_t>(),
      order.defined() ? order.const_data_ptr<int64_t>() : nullptr, rows, order.defined() ? order.size(0) : rows,
      x.size(1), segments, out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// "sum" only, by atomics (Python routes mean and max, and deterministic sums,
// through a sort and segment_reduce).
at::Tensor scatter_reduce_cuda(const at::Tensor& src, const at::Tensor& index, c10::SymInt num_segments,
                               c10::string_view reduce_name) {
  DK_CHECK_CUDA(src);
  const auto [segments, reduce] = dynkernels::segment::check_scatter_args(src, index, num_segments, reduce_name);
  TORCH_CHECK(reduce == dynkernels::segment::Reduce::kSum, "scatter_reduce on CUDA takes reduce='sum' (atomics)");
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor x = src.contiguous(), idx = index.contiguous();
  at::Tensor acc = at::zeros({segments, x.size(1)}, x.options().dtype(dynkernels::cuda::compute_dtype(x)));
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_scatter_add_rows_atomic(
      dynkernels::cuda::kind_of(x), idx.scalar_type() == at::kLong, x.const_data_ptr(), idx.const_data_ptr(),
      x.size(0), x.size(1), segments, acc.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return acc.scalar_type() == x.scalar_type() ? acc : acc.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) {
  m.impl("segment_reduce", &segment_reduce_cuda);
  m.impl("scatter_reduce", &scatter_reduce_cuda);
}
