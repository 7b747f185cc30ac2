// evolve_attention_logits and its backward, CUDA glue (kernels in
// evolve_logits_kernel.cu). float16, bfloat16, float32 (float arithmetic) and
// float64. A block holds one query row's band (H * K * (N + K - 1) values)
// in shared memory; sizes beyond the device's per-block limit are refused
// with a pointer to the Triton backend, which tiles the keys.
#include <cuda_runtime.h>

#include "common/cuda_glue.h"
#include "evolving_attention/evolving_checks.h"
#include "evolving_attention/evolving_kernels.h"

namespace {

using dynkernels::cuda::EvolveMask;
using dynkernels::cuda::EvolveParams;
using dynkernels::cuda::EvolveShape;

EvolveShape checked_shape(const at::Tensor& logits, const c10::optional<at::Tensor>& prev, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                          bool backward) {
  DK_CHECK_CUDA(logits);
  const auto dims = dynkernels::evolving::check_args(logits, prev, weight, bias, mask);
  const EvolveShape s{dims[0], dims[1], dims[2], dims[3]};
  const size_t acc = logits.scalar_type() == at::kDouble ? 8 : 4;
  const size_t need = dynkernels::cuda::evolve_smem_bytes(s, backward, acc);
  int limit_attr = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&limit_attr, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                                 static_cast<int>(logits.device().index()));
  TORCH_CHECK(err == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  const size_t limit = static_cast<size_t>(limit_attr);
  TORCH_CHECK(need <= limit, "evolve_attention_logits (cuda): H=", s.h, ", N=", s.n, ", K=", s.k, " needs ", need,
              " bytes of shared memory per block, the device allows ", limit, "; use backend='triton'");
  return s;
}

const void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return c10::nullopt;
  return t->contiguous();
}

EvolveMask mask_view(const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return {0, 0, 0, 0};
  return {mask->stride(0), mask->stride(1), mask->stride(2), mask->stride(3)};
}

std::tuple<at::Tensor, at::Tensor> evolve_attention_logits_cuda(const at::Tensor& logits_in,
                                                                const c10::optional<at::Tensor>& prev_in,
                                                                const at::Tensor& weight_in,
                                                                const c10::optional<at::Tensor>& bias_in,
                                                                double w_prev, double w_conv, int64_t activation,
                                                                double negative_slope,
                                                                const c10::optional<at::Tensor>& mask) {
  const EvolveShape s = checked_shape(logits_in, prev_in, weight_in, bias_in, mask, false);
  TORCH_CHECK(activation >= 0 && activation <= 2, "activation must be 0, 1 or 2");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in.contiguous(), weight = weight_in.contiguous();
  const c10::optional<at::Tensor> prev = contiguous(prev_in), bias = contiguous(bias_in);
  at::Tensor evolved = at::empty_like(logits), probs = at::empty_like(logits);
  if (logits.numel() == 0) return {evolved, probs};
  const EvolveParams prm{w_prev, w_conv, negative_slope, static_cast<int>(activation)};
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_evolve_attention_logits(
      dynkernels::cuda::kind_of(logits), logits.const_data_ptr(), ptr_or_null(prev), weight.const_data_ptr(),
      ptr_or_null(bias), ptr_or_null(mask), mask_view(mask), s, prm, evolved.data_ptr(), probs.data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream()));
  return {evolved, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> evolve_attention_logits_backward_cuda(
    const c10::optional<at::Tensor>& grad_evolved, const c10::optional<at::Tensor>& grad_probs,
    const at::Tensor& logits_in, const c10::optional<at::Tensor>& prev_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& probs_in, const at::Tensor& /*evolved: unused,
    the kernel recomputes Z*/, double w_prev, double w_conv, int64_t activation, double negative_slope,
    const c10::optional<at::Tensor>& mask) {
  const EvolveShape s = checked_shape(logits_in, prev_in, weight_in, bias_in, mask, true);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in.contiguous(), weight = weight_in.contiguous(), probs = probs_in.contiguous();
  const c10::optional<at::Tensor> prev = contiguous(prev_in), bias = contiguous(bias_in);
  const c10::optional<at::Tensor> ge = contiguous(grad_evolved), gp = contiguous(grad_probs);
  at::Tensor d_logits = at::empty_like(logits);
  // Without prev (bias) their gradient is an empty (0,) tensor.
  at::Tensor d_prev = prev.has_value() ? at::empty_like(logits) : at::empty({0}, logits.options());
  const int64_t wsize = weight.numel();
  if (logits.numel() == 0) {
    return {d_logits, d_prev, at::zeros_like(weight),
            bias.has_value() ? at::zeros_like(*bias) : at::empty({0}, logits.options())};
  }
  const auto acc_options = logits.options().dtype(dynkernels::cuda::compute_dtype(logits));
  at::Tensor dz = at::empty(logits.sizes(), acc_options), dm = at::empty(logits.sizes(), acc_options);
  const int64_t blocks = s.b * ((s.n + dynkernels::cuda::evolve_rows_per_block() - 1) /
                                dynkernels::cuda::evolve_rows_per_block());
  at::Tensor partial = at::empty({blocks, wsize + s.h}, acc_options);
  at::Tensor flipped = weight.flip({2, 3}).transpose(0, 1).contiguous();
  const EvolveParams prm{w_prev, w_conv, negative_slope, static_cast<int>(activation)};
  DK_CHECK_LAUNCH(dynkernels::cuda::launch_evolve_attention_logits_backward(
      dynkernels::cuda::kind_of(logits), ptr_or_null(ge), ptr_or_null(gp), logits.const_data_ptr(),
      ptr_or_null(prev), weight.const_data_ptr(), flipped.const_data_ptr(), ptr_or_null(bias),
      probs.const_data_ptr(), ptr_or_null(mask), mask_view(mask), s, prm, dz.data_ptr(), dm.data_ptr(), partial.data_ptr(), d_logits.data_ptr(),
      prev.has_value() ? d_prev.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream()));
  // Per-block partials summed by torch's reduction (no atomics): deterministic.
  at::Tensor sums = partial.sum(0);
  at::Tensor d_weight = sums.narrow(0, 0, wsize).view(weight.sizes()).to(weight.scalar_type());
  at::Tensor d_bias = bias.has_value() ? sums.narrow(0, wsize, s.h).to(bias->scalar_type())
                                       : at::empty({0}, logits.options());
  return {d_logits, d_prev, d_weight, d_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) {
  m.impl("evolve_attention_logits", &evolve_attention_logits_cuda);
  m.impl("evolve_attention_logits_backward", &evolve_attention_logits_backward_cuda);
}
