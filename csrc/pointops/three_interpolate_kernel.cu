// three_interpolate, CUDA: out[b, c, i] = sum_j weight[b, i, j] features[b, c, idx[b, i, j]]
// over the 3 neighbours, summed ((t0 + t1) + t2) in the compute type as the CPU
// kernel does. One thread per output element; its backward is the scatter in
// gather_features_kernel.cu (with weights).
#include <cassert>

#include "common/cuda_utils.cuh"
#include "pointops/pointops_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename index_t>
__global__ void three_interpolate_kernel(const scalar_t* __restrict__ features, const index_t* __restrict__ idx,
                                         const scalar_t* __restrict__ weight, int64_t channels, int64_t m, int64_t n,
                                         int64_t total, scalar_t* __restrict__ out) {
  using acc_t = typename ComputeType<scalar_t>::type;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / n, i = e % n;  // row = b * C + c
    const int64_t base = ((row / channels) * n + i) * 3;
    const scalar_t* f = features + row * m;
    acc_t t[3];
    for (int j = 0; j < 3; ++j) {
      const int64_t src = static_cast<int64_t>(idx[base + j]);
      assert(src >= 0 && src < m);
      t[j] = to_compute(weight[base + j]) * to_compute(f[src]);
    }
    out[e] = static_cast<scalar_t>((t[0] + t[1]) + t[2]);
  }
}

template <typename scalar_t, typename index_t>
cudaError_t three_interpolate_launch(const void* features, const void* idx, const void* weight, int64_t batch,
                                     int64_t channels, int64_t m, int64_t n, void* out, cudaStream_t stream) {
  const int64_t total = batch * channels * n;
  if (total == 0) return cudaSuccess;
  three_interpolate_kernel<scalar_t, index_t><<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(features), static_cast<const index_t*>(idx), static_cast<const scalar_t*>(weight),
      channels, m, n, total, static_cast<scalar_t*>(out));
  return cudaGetLastError();
}

template <typename scalar_t>
struct ThreeInterpolate {
  static cudaError_t run(bool idx64, const void* f, const void* idx, const void* w, int64_t b, int64_t c, int64_t m,
                         int64_t n, void* out, cudaStream_t s) {
    return idx64 ? three_interpolate_launch<scalar_t, int64_t>(f, idx, w, b, c, m, n, out, s)
                 : three_interpolate_launch<scalar_t, int32_t>(f, idx, w, b, c, m, n, out, s);
  }
};

}  // namespace

cudaError_t launch_three_interpolate(ScalarKind kind, bool idx_is_64bit, const void* features, const void* idx,
                                     const void* weight, int64_t batch, int64_t channels, int64_t m, int64_t n,
                                     void* out, cudaStream_t stream) {
  return dispatch_kind<ThreeInterpolate>(kind, idx_is_64bit, features, idx, weight, batch, channels, m, n, out,
                                         stream);
}

}  // namespace cuda
}  // namespace dynkernels
