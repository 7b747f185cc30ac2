// Torch-side helpers for the *_cuda.cpp glue (compiled only in CUDA builds).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "common/scalar_kind.h"

namespace dynkernels {
namespace cuda {

inline ScalarKind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kDouble:
      return ScalarKind::kFloat64;
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, "unsupported dtype ", t.scalar_type(), "; expected float16, bfloat16, float32 or float64");
  }
}

// The distance/accumulation dtype of a storage dtype: double stays double,
// everything else computes in float.
inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace cuda
}  // namespace dynkernels

#define DK_CHECK_LAUNCH(err) TORCH_CHECK((err) == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(err))
