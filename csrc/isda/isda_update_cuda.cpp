// isda_update_full_, CUDA glue, with no host sync: the batch rows are sorted
// into one segment per class (common/scatter_cuda.h, labels outside [0, C)
// dropped), the class means come from the shared segment reduction, and one
// launch (isda_merge_kernel.cu) accumulates every present class's batch
// scatter and merges it, exactly symmetric. Semantics as isda_update_cpu.cpp;
// the label range is checked, once and optionally, by the Python caller.
#include "common/cuda_glue.h"
#include "common/scatter_cuda.h"
#include "common/segment_checks.h"
#include "isda/isda_checks.h"
#include "isda/isda_kernels.h"

namespace {

void isda_update_full_cuda(at::Tensor& cov, at::Tensor& mean, at::Tensor& amount, const at::Tensor& features,
                           const at::Tensor& labels) {
  DK_CHECK_CUDA(cov);
  const int64_t a = dynkernels::isda::check_update_args(cov, mean, amount, features, labels, /*full=*/true);
  const c10::cuda::CUDAGuard guard(cov.device());
  const int64_t m = features.size(0), classes = cov.size(0);
  if (m == 0 || classes == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto kind = dynkernels::cuda::kind_of(cov);
  auto [order, offsets] = dynkernels::segment::sort_into_segments(labels, classes);
  const at::Tensor x = features.index_select(0, order).contiguous();
  at::Tensor mu_b = at::empty({classes + 1, a}, x.options());  // row C: zero, the dropped rows' "mean"
  mu_b[classes].zero_();
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_segment_reduce(kind, static_cast<int>(dynkernels::segment::Reduce::kMean),
                                                          x.const_data_ptr(), offsets.const_data_ptr<int64_t>(),
                                                          /*perm=*/nullptr, m, m, a, classes, mu_b.data_ptr(), stream));
  const at::Tensor row_class = at::searchsorted(offsets.slice(0, 1), at::arange(m, offsets.options()),
                                                /*out_int32=*/false, /*right=*/true);
  const at::Tensor centred = (x - mu_b.index_select(0, row_class)).contiguous();
  const at::Tensor mu = mu_b.slice(0, 0, classes);
  const at::Tensor counts = (offsets.slice(0, 1) - offsets.slice(0, 0, classes)).to(cov.scalar_type());
  const at::Tensor present = counts > 0;
  const at::Tensor w = at::where(present, counts / (counts + amount), at::zeros_like(counts)).contiguous();
  const at::Tensor delta = (mean - mu).contiguous();
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_isda_segment_merge(kind, cov.data_ptr(), centred.const_data_ptr(),
                                                              offsets.const_data_ptr<int64_t>(), w.const_data_ptr(),
                                                              delta.const_data_ptr(), m, classes, a, stream));
  const at::Tensor wv = w.unsqueeze(1);
  mean.copy_(at::where(present.unsqueeze(1), mean * (1 - wv) + mu * wv, mean));
  amount.add_(counts);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) { m.impl("isda_update_full_", &isda_update_full_cuda); }
