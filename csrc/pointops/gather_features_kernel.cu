// gather_features (grouping_operation, gather_points) and the scatter backward
// it shares with three_interpolate, CUDA.
//
// Forward: one thread per output element, k fastest (coalesced stores; idx
// reads are shared by the C rows and hit L1). Index -1 reads zero; any other
// out-of-range index trips a device assert, as torch's own index kernels do.
// Backward (shared with three_interpolate: optional weights, `group` index
// positions per grad_out column), fast: atomicAdd into a float (double for
// double) buffer. Deterministic: per (b, c, n) a fixed-order sum over the
// point's CSR segment (ascending position), the same order as the CPU kernel,
// so both give equal bits for float and double.
#include <cassert>

#include "common/cuda_utils.cuh"
#include "pointops/pointops_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t total) { return grid_stride_blocks(total, kThreads); }

template <typename scalar_t, typename index_t>
__global__ void gather_kernel(const scalar_t* __restrict__ features, const index_t* __restrict__ idx, int64_t channels,
                              int64_t n, int64_t k, int64_t total, scalar_t* __restrict__ out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / k, col = e % k;  // row = b * C + c
    const int64_t b = row / channels;
    const int64_t i = static_cast<int64_t>(idx[b * k + col]);
    assert(i >= -1 && i < n);
    out[e] = i < 0 ? scalar_t(0.0f) : features[row * n + i];
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t weighted(const scalar_t* weight, int64_t position, acc_t value) {
  return weight == nullptr ? value : static_cast<acc_t>(to_compute(weight[position])) * value;
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void scatter_atomic_kernel(const scalar_t* __restrict__ grad_out, const index_t* __restrict__ idx,
                                      const scalar_t* __restrict__ weight, int64_t channels, int64_t n, int64_t k,
                                      int64_t group, int64_t total, acc_t* __restrict__ grad) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / k, col = e % k;  // row = b * C + c, col = position in idx
    const int64_t position = (row / channels) * k + col;
    const int64_t i = static_cast<int64_t>(idx[position]);
    assert(i >= -1 && i < n);
    if (i < 0) continue;
    const acc_t value = static_cast<acc_t>(to_compute(grad_out[row * (k / group) + col / group]));
    atomicAdd(grad + row * n + i, weighted(weight, position, value));
  }
}

template <typename scalar_t>
__global__ void scatter_segments_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ weight,
                                        const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                        int64_t channels, int64_t n, int64_t k, int64_t group, int64_t total,
                                        scalar_t* __restrict__ grad) {
  using acc_t = typename ComputeType<scalar_t>::type;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / n, point = e % n;  // row = b * C + c
    const int64_t b = row / channels;
    const int64_t segment = b * n + point;
    acc_t acc = acc_t(0);
    for (int64_t j = offsets[segment]; j < offsets[segment + 1]; ++j) {
      const int64_t position = order[j];
      const acc_t value = to_compute(grad_out[row * (k / group) + (position - b * k) / group]);
      acc += weighted(weight, position, value);
    }
    grad[e] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename index_t>
cudaError_t gather(const void* features, const void* idx, int64_t batch, int64_t channels, int64_t n, int64_t k,
                   void* out, cudaStream_t stream) {
  const int64_t total = batch * channels * k;
  if (total == 0) return cudaSuccess;
  gather_kernel<scalar_t, index_t><<<grid_for(total), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(features), static_cast<const index_t*>(idx), channels, n, k, total,
      static_cast<scalar_t*>(out));
  return cudaGetLastError();
}

template <typename scalar_t, typename index_t>
cudaError_t scatter_atomic(const void* grad_out, const void* idx, const void* weight, int64_t batch,
                           int64_t channels, int64_t n, int64_t k, int64_t group, void* grad_acc,
                           cudaStream_t stream) {
  using acc_t = typename ComputeType<scalar_t>::type;
  const int64_t total = batch * channels * k;
  if (total == 0 || n == 0) return cudaSuccess;
  scatter_atomic_kernel<scalar_t, acc_t, index_t><<<grid_for(total), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(grad_out), static_cast<const index_t*>(idx), static_cast<const scalar_t*>(weight),
      channels, n, k, group, total, static_cast<acc_t*>(grad_acc));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t scatter_segments(const void* grad_out, const void* weight, const int64_t* order, const int64_t* offsets,
                             int64_t batch, int64_t channels, int64_t n, int64_t k, int64_t group, void* grad,
                             cudaStream_t stream) {
  const int64_t total = batch * channels * n;
  if (total == 0) return cudaSuccess;
  scatter_segments_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(weight), order, offsets, channels, n, k,
      group, total, static_cast<scalar_t*>(grad));
  return cudaGetLastError();
}

template <typename scalar_t>
struct Gather {
  static cudaError_t run(bool idx64, const void* f, const void* idx, int64_t b, int64_t c, int64_t n, int64_t k,
                         void* out, cudaStream_t s) {
    return idx64 ? gather<scalar_t, int64_t>(f, idx, b, c, n, k, out, s)
                 : gather<scalar_t, int32_t>(f, idx, b, c, n, k, out, s);
  }
};

template <typename scalar_t>
struct ScatterAtomic {
  static cudaError_t run(bool idx64, const void* g, const void* idx, const void* w, int64_t b, int64_t c, int64_t n,
                         int64_t k, int64_t group, void* acc, cudaStream_t s) {
    return idx64 ? scatter_atomic<scalar_t, int64_t>(g, idx, w, b, c, n, k, group, acc, s)
                 : scatter_atomic<scalar_t, int32_t>(g, idx, w, b, c, n, k, group, acc, s);
  }
};

template <typename scalar_t>
struct ScatterSegments {
  static cudaError_t run(const void* g, const void* w, const int64_t* order, const int64_t* offsets, int64_t b,
                         int64_t c, int64_t n, int64_t k, int64_t group, void* grad, cudaStream_t s) {
    return scatter_segments<scalar_t>(g, w, order, offsets, b, c, n, k, group, grad, s);
  }
};

}  // namespace

cudaError_t launch_gather_features(ScalarKind kind, bool idx_is_64bit, const void* features, const void* idx,
                                   int64_t batch, int64_t channels, int64_t n, int64_t k, void* out,
                                   cudaStream_t stream) {
  return dispatch_kind<Gather>(kind, idx_is_64bit, features, idx, batch, channels, n, k, out, stream);
}

cudaError_t launch_scatter_backward_atomic(ScalarKind kind, bool idx_is_64bit, const void* grad_out,
                                           const void* idx, const void* weight, int64_t batch, int64_t channels,
                                           int64_t n, int64_t k, int64_t group, void* grad_acc, cudaStream_t stream) {
  return dispatch_kind<ScatterAtomic>(kind, idx_is_64bit, grad_out, idx, weight, batch, channels, n, k, group,
                                      grad_acc, stream);
}

cudaError_t launch_scatter_backward_segments(ScalarKind kind, const void* grad_out, const void* weight,
                                             const int64_t* order, const int64_t* offsets, int64_t batch,
                                             int64_t channels, int64_t n, int64_t k, int64_t group, void* grad,
                                             cudaStream_t stream) {
  return dispatch_kind<ScatterSegments>(kind, grad_out, weight, order, offsets, batch, channels, n, k, group, grad,
                                        stream);
}

}  // namespace cuda
}  // namespace dynkernels
