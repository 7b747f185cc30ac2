// Argument checks of evolve_attention_logits shared by the CPU and CUDA glue
// (Python validates user input first, with friendlier messages).
#pragma once

#include <array>

#include "common/checks.h"

namespace dynkernels {
namespace evolving {

// Largest kernel size the kernels take.
constexpr int64_t kMaxKernel = 31;

// Shapes and dtypes (devices are the caller's): logits (B, H, N, N); prev
// as logits; weight (H, H, K, K), K odd; bias (H,); mask expanded to the
// logits' shape; all in the logits' dtype. Returns {B, H, N, K}.
inline std::array<int64_t, 4> check_args(const at::Tensor& logits, const c10::optional<at::Tensor>& prev,
                                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& mask) {
  DK_CHECK_DIM(logits, 4);
  const int64_t b = logits.size(0), h = logits.size(1), n = logits.size(2);
  TORCH_CHECK(logits.size(3) == n, "logits must be (B, H, N, N), got ", logits.sizes());
  DK_CHECK_DIM(weight, 4);
  const int64_t k = weight.size(3);
  TORCH_CHECK(weight.size(0) == h && weight.size(1) == h && weight.size(2) == k && k % 2 == 1,
              "weight must be (H, H, K, K) with H = ", h, " and K odd, got ", weight.sizes());
  TORCH_CHECK(k <= kMaxKernel, "kernel size must be at most ", kMaxKernel, ", got ", k);
  TORCH_CHECK(weight.scalar_type() == logits.scalar_type(), "weight must have the logits' dtype");
  for (const auto* t : {&prev, &bias, &mask}) {
    if (t->has_value()) TORCH_CHECK((*t)->device() == logits.device(), "all tensors must be on the logits' device");
  }
  TORCH_CHECK(weight.device() == logits.device(), "weight must be on the logits' device");
  if (prev.has_value()) {
    TORCH_CHECK(prev->sizes() == logits.sizes() && prev->scalar_type() == logits.scalar_type(),
                "prev_logits must match logits, got ", prev->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == h && bias->scalar_type() == logits.scalar_type(),
                "bias must be (H,) = (", h, ",) in the logits' dtype");
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == logits.sizes() && mask->scalar_type() == logits.scalar_type(),
                "mask must be expanded to the logits' shape and dtype");
  }
  return {b, h, n, k};
}

}  // namespace evolving
}  // namespace dynkernels
