// coordinate_refinement and its backward, CUDA: one thread per group (b, m);
// semantics as coordinate_refinement_cpu.cpp. Each thread recomputes the
// head-averaged weight w[s] on the fly (H * rows reads per key), so no (B, M, S)
// buffer is needed; accumulation in float (double for double).
#include <cassert>

#include "common/cuda_utils.cuh"
#include "pointformer/pointformer_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t group_weight(const scalar_t* attn, int64_t heads, int64_t rows, int64_t s,
                                              int64_t r0, int64_t r1, int64_t j) {
  acc_t w = acc_t(0);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = r0; r < r1; ++r) w += static_cast<acc_t>(to_compute(attn[(h * rows + r) * s + j]));
  }
  return w / static_cast<acc_t>(heads * (r1 - r0));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    refine_kernel(const scalar_t* __restrict__ attn, const scalar_t* __restrict__ xyz,
                  const int64_t* __restrict__ row_index, int64_t batch, int64_t m, int64_t heads, int64_t rows,
                  int64_t s, scalar_t* __restrict__ out) {
  using acc_t = typename ComputeType<scalar_t>::type;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= batch * m) return;
  const int64_t b = g / m, mm = g % m, row = row_index[g];
  assert(row >= -1 && row < rows);
  const int64_t r0 = row < 0 ? 0 : row, r1 = row < 0 ? rows : row + 1;
  const scalar_t* a = attn + g * heads * rows * s;
  acc_t acc[3] = {acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t j = 0; j < s; ++j) {
    const acc_t w = group_weight<scalar_t, acc_t>(a, heads, rows, s, r0, r1, j);
    for (int c = 0; c < 3; ++c) acc[c] += w * static_cast<acc_t>(to_compute(xyz[((b * 3 + c) * m + mm) * s + j]));
  }
  for (int c = 0; c < 3; ++c) out[g * 3 + c] = static_cast<scalar_t>(acc[c]);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    refine_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ attn,
                           const scalar_t* __restrict__ xyz, const int64_t* __restrict__ row_index, int64_t batch,
                           int64_t m, int64_t heads, int64_t rows, int64_t s, scalar_t* __restrict__ grad_attn,
                           scalar_t* __restrict__ grad_xyz) {
  using acc_t = typename ComputeType<scalar_t>::type;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= batch * m) return;
  const int64_t b = g / m, mm = g % m, row = row_index[g];
  assert(row >= -1 && row < rows);
  const int64_t r0 = row < 0 ? 0 : row, r1 = row < 0 ? rows : row + 1;
  const acc_t share = acc_t(1) / static_cast<acc_t>(heads * (r1 - r0));
  const scalar_t* a = attn + g * heads * rows * s;
  acc_t gc[3];
  for (int c = 0; c < 3; ++c) gc[c] = static_cast<acc_t>(to_compute(grad_out[g * 3 + c]));
  for (int64_t j = 0; j < s; ++j) {
    const acc_t w = group_weight<scalar_t, acc_t>(a, heads, rows, s, r0, r1, j);
    acc_t gw = acc_t(0);
    for (int c = 0; c < 3; ++c) {
      const int64_t off = ((b * 3 + c) * m + mm) * s + j;
      grad_xyz[off] = static_cast<scalar_t>(w * gc[c]);
      gw += gc[c] * static_cast<acc_t>(to_compute(xyz[off]));
    }
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t r = r0; r < r1; ++r) {
        grad_attn[((g * heads + h) * rows + r) * s + j] = static_cast<scalar_t>(gw * share);
      }
    }
  }
}

template <typename scalar_t>
struct Refine {
  static cudaError_t run(const void* attn, const void* xyz, const int64_t* row, int64_t batch, int64_t m,
                         int64_t heads, int64_t rows, int64_t s, void* out, cudaStream_t stream) {
    if (batch * m == 0) return cudaSuccess;
    refine_kernel<scalar_t><<<ceil_div(batch * m, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(attn), static_cast<const scalar_t*>(xyz), row, batch, m, heads, rows, s,
        static_cast<scalar_t*>(out));
    return cudaGetLastError();
  }
};

template <typename scalar_t>
struct RefineBackward {
  static cudaError_t run(const void* grad_out, const void* attn, const void* xyz, const int64_t* row, int64_t batch,
                         int64_t m, int64_t heads, int64_t rows, int64_t s, void* grad_attn, void* grad_xyz,
                         cudaStream_t stream) {
    if (batch * m == 0) return cudaSuccess;
    refine_backward_kernel<scalar_t><<<ceil_div(batch * m, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(attn),
        static_cast<const scalar_t*>(xyz), row, batch, m, heads, rows, s, static_cast<scalar_t*>(grad_attn),
        static_cast<scalar_t*>(grad_xyz));
    return cudaGetLastError();
  }
};


}  // namespace

cudaError_t launch_coordinate_refinement(ScalarKind kind, const void* attn, const void* grouped_xyz,
                                         const int64_t* row_index, int64_t batch, int64_t m, int64_t heads,
                                         int64_t rows, int64_t s, void* out, cudaStream_t stream) {
  return dispatch_kind<Refine>(kind, attn, grouped_xyz, row_index, batch, m, heads, rows, s, out, stream);
}

cudaError_t launch_coordinate_refinement_backward(ScalarKind kind, const void* grad_out, const void* attn,
                                                  const void* grouped_xyz, const int64_t* row_index, int64_t batch,
                                                  int64_t m, int64_t heads, int64_t rows, int64_t s, void* grad_attn,
                                                  void* grad_xyz, cudaStream_t stream) {
  return dispatch_kind<RefineBackward>(kind, grad_out, attn, grouped_xyz, row_index, batch, m, heads, rows, s,
                                       grad_attn, grad_xyz, stream);
}

}  // namespace cuda
}  // namespace dynkernels
