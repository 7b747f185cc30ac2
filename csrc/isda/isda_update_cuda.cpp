// isda_update_full_, CUDA glue: per present class, the batch's covariance
// with one cuBLAS product (centred rows), then the fused symmetric merge
// kernel (isda_merge_kernel.cu); semantics as isda_update_cpu.cpp.
#include "common/cuda_glue.h"
#include "isda/isda_kernels.h"

namespace {

void isda_update_full_cuda(at::Tensor& cov, at::Tensor& mean, at::Tensor& amount, const at::Tensor& features,
                           const at::Tensor& labels) {
  DK_CHECK_CUDA(cov);
  DK_CHECK_DIM(cov, 3);
  const int64_t classes = cov.size(0), a = cov.size(1);
  TORCH_CHECK(cov.size(2) == a && cov.is_contiguous(), "cov must be a contiguous (C, A, A) tensor");
  TORCH_CHECK(mean.sizes() == at::IntArrayRef({classes, a}) && mean.is_contiguous(), "mean must be contiguous (C, A)");
  TORCH_CHECK(amount.sizes() == at::IntArrayRef({classes}), "amount must be (C,)");
  TORCH_CHECK(features.dim() == 2 && features.size(1) == a, "features must be (N, A) with A = ", a);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0) && labels.scalar_type() == at::kLong,
              "labels must be int64 (N,)");
  TORCH_CHECK(cov.scalar_type() == at::kFloat || cov.scalar_type() == at::kDouble, "float32 or float64");
  TORCH_CHECK(mean.scalar_type() == cov.scalar_type() && amount.scalar_type() == cov.scalar_type() &&
                  features.scalar_type() == cov.scalar_type(),
              "cov, mean, amount and features must share a dtype");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&mean, &amount, &features, &labels}) {
    TORCH_CHECK(t->device() == cov.device(), "all tensors must be on cov's device");
  }
  const c10::cuda::CUDAGuard guard(cov.device());
  if (features.size(0) == 0) return;
  TORCH_CHECK(labels.min().item<int64_t>() >= 0 && labels.max().item<int64_t>() < classes, "labels must lie in [0, ",
              classes, ")");
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
