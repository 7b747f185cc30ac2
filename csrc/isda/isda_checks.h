// Argument checks of the ISDA estimator updates, shared by the CPU and CUDA
// glue (Python validates user input first, with friendlier messages).
#pragma once

#include <initializer_list>

#include "common/checks.h"

namespace dynkernels {
namespace isda {

// cov (C, A, A) (full) or (C, A) (diagonal), mean (C, A), amount (C,), all
// contiguous, one float dtype and device; features (N, A) in that dtype;
// labels int64 (N,). Returns A. The label range: check_labels_cpu on CPU; the
// CUDA update drops labels outside [0, C) (no host sync), and Python checks
// them once beforehand unless asked not to.
inline int64_t check_update_args(const at::Tensor& cov, const at::Tensor& mean, const at::Tensor& amount,
                                 const at::Tensor& features, const at::Tensor& labels, bool full) {
  DK_CHECK_DIM(cov, full ? 3 : 2);
  const int64_t classes = cov.size(0), a = cov.size(1);
  TORCH_CHECK(cov.is_contiguous() && (!full || cov.size(2) == a), "cov must be a contiguous (C, A, A) or (C, A) tensor");
  TORCH_CHECK(mean.sizes() == at::IntArrayRef({classes, a}) && mean.is_contiguous(), "mean must be contiguous (C, A)");
  TORCH_CHECK(amount.sizes() == at::IntArrayRef({classes}) && amount.is_contiguous(), "amount must be (C,)");
  TORCH_CHECK(features.dim() == 2 && features.size(1) == a, "features must be (N, A) with A = ", a);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0) && labels.scalar_type() == at::kLong,
              "labels must be int64 (N,)");
  TORCH_CHECK(cov.scalar_type() == at::kFloat || cov.scalar_type() == at::kDouble, "float32 or float64");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&mean, &amount, &features}) {
    TORCH_CHECK(t->scalar_type() == cov.scalar_type(), "cov, mean, amount and features must share a dtype");
  }
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&mean, &amount, &features, &labels}) {
    TORCH_CHECK(t->device() == cov.device(), "all tensors must be on cov's device");
  }
  return a;
}

// labels in [0, C): read on the host, so CPU only.
inline void check_labels_cpu(const at::Tensor& labels, int64_t classes) {
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.numel(); ++i) {
    TORCH_CHECK_INDEX(l[i] >= 0 && l[i] < classes, "labels must lie in [0, ", classes, "), got ", l[i]);
  }
}

}  // namespace isda
}  // namespace dynkernels
