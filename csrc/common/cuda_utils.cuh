// Small device helpers shared by the CUDA kernels (nvcc only). CUDA headers only (no
// ATen), so every *_kernel.cu compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace dynkernels {
namespace cuda {

// Conversions between storage types and their arithmetic type (float, or
// double for double).
__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_compute(float v);
template <>
__device__ __forceinline__ float from_compute<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_compute<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

// ((dx*dx + dy*dy) + dz*dz) with every operation rounded on its own: no FMA,
// so distances equal the CPU kernels' and the reference's bit for bit.
__device__ __forceinline__ float sq_dist(float x, float y, float z, float px, float py, float pz) {
  const float dx = __fsub_rn(x, px), dy = __fsub_rn(y, py), dz = __fsub_rn(z, pz);
  return __fadd_rn(__fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy)), __fmul_rn(dz, dz));
}
__device__ __forceinline__ double sq_dist(double x, double y, double z, double px, double py, double pz) {
  const double dx = __dsub_rn(x, px), dy = __dsub_rn(y, py), dz = __dsub_rn(z, pz);
  return __dadd_rn(__dadd_rn(__dmul_rn(dx, dx), __dmul_rn(dy, dy)), __dmul_rn(dz, dz));
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Blocks for a grid-stride loop over `total` elements, capped (the stride covers the rest).
inline unsigned grid_stride_blocks(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

// Fn<scalar_t>::run(args...) for the storage type of a runtime ScalarKind.
template <template <typename> class Fn, typename... Args>
cudaError_t dispatch_kind(ScalarKind kind, Args... args) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return Fn<float>::run(args...);
    case ScalarKind::kFloat64:
      return Fn<double>::run(args...);
    case ScalarKind::kFloat16:
      return Fn<__half>::run(args...);
    case ScalarKind::kBFloat16:
      return Fn<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dynkernels
