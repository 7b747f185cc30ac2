// isda_update_full_, CUDA glue: per present class, the batch's covariance
// with one cuBLAS product (centred rows), then the fused symmetric merge
// kernel (isda_merge_kernel.cu); semantics as isda_update_cpu.cpp.
#include "common/cuda_glue.h"
#include "isda/isda_checks.h"
#include "isda/isda_kernels.h"

namespace {

void isda_update_full_cuda(at::Tensor& cov, at::Tensor& mean, at::Tensor& amount, const at::Tensor& features,
                           const at::Tensor& labels) {
  DK_CHECK_CUDA(cov);
  const int64_t a = dynkernels::isda::check_update_args(cov, mean, amount, features, labels, /*full=*/true);
  const c10::cuda::CUDAGuard guard(cov.device());
  if (features.size(0) == 0) return;
  const at::Tensor present = std::get<0>(at::_unique(labels, /*sorted=*/true)).cpu();
  const auto* ids = present.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < present.numel(); ++k) {
    const int64_t c = ids[k];
    const at::Tensor rows = features.index_select(0, (labels == c).nonzero().squeeze(1));
    const int64_t n_b = rows.size(0);
    const at::Tensor mu_b = rows.mean(0);
    const at::Tensor centred = rows - mu_b;
    const at::Tensor s = at::mm(centred.t(), centred).div_(static_cast<double>(n_b)).contiguous();
    const double n_old = amount[c].item<double>();
    const double w = static_cast<double>(n_b) / (static_cast<double>(n_b) + n_old);
    const at::Tensor delta = (mean[c] - mu_b).contiguous();
    DK_CHECK_LAUNCH(dynkernels::cuda::launch_isda_merge_symmetric(
        dynkernels::cuda::kind_of(cov), cov[c].data_ptr(), s.const_data_ptr(), delta.const_data_ptr(), w, a,
        c10::cuda::getCurrentCUDAStream().stream()));
    mean[c].mul_(1.0 - w).add_(mu_b, w);
    amount[c].add_(static_cast<double>(n_b));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) { m.impl("isda_update_full_", &isda_update_full_cuda); }
