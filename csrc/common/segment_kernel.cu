// The shared segment / scatter substrate, CUDA (launchers: segment_kernels.h).
//
// Rows form: segment_reduce, one thread per output element (s, d), d fastest
// (a warp reads one row's consecutive columns), summing its segment's rows in
// row order: deterministic, no atomics. scatter_add_rows: one thread per
// input element, atomicAdd into a float (double for double) buffer.
// Columns form (the point ops' gather backward, with optional weights and
// `group` index positions per grad_out column): atomic, or deterministic over
// a CSR of the indices (a fixed-order sum per target, ascending position, the
// same order as the CPU kernel, so both give equal bits for float and double).
#include <cassert>
#include <cmath>

#include "common/cuda_utils.cuh"
#include "common/segment_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t total) { return grid_stride_blocks(total, kThreads); }

template <typename scalar_t>
__global__ void segment_reduce_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ offsets,
                                      const int64_t* __restrict__ perm, int64_t rows, int64_t m, int64_t d,
                                      int64_t total, int reduce, scalar_t* __restrict__ out) {
  using acc_t = typename ComputeType<scalar_t>::type;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = e / d, col = e % d;
    const int64_t start = min(max(offsets[s], int64_t(0)), m);
    const int64_t stop = min(max(offsets[s + 1], start), m);
    acc_t acc = reduce == 2 ? -INFINITY : acc_t(0);
    for (int64_t r = start; r < stop; ++r) {
      const int64_t row = perm == nullptr ? r : perm[r];
      if (row < 0 || row >= rows) continue;  // a bad perm entry reads nothing
      const acc_t v = to_compute(src[row * d + col]);
      if (reduce == 2) {
        acc = ((v > acc || v != v) && acc == acc) ? v : acc;  // NaN sticks
      } else {
        acc += v;
      }
    }
    if (stop == start) acc = acc_t(0);
    if (reduce == 1 && stop > start) acc /= static_cast<acc_t>(stop - start);
    out[e] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void scatter_add_rows_kernel(const scalar_t* __restrict__ src, const index_t* __restrict__ index,
                                        int64_t d, int64_t segments, int64_t total, acc_t* __restrict__ acc) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, col = e % d;
    const int64_t s = static_cast<int64_t>(index[i]);
    if (s < 0 || s >= segments) continue;
    atomicAdd(acc + s * d + col, static_cast<acc_t>(to_compute(src[e])));
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
struct SegmentReduce {
  static cudaError_t run(int reduce, const void* src, const int64_t* offsets, const int64_t* perm, int64_t rows,
                         int64_t m, int64_t d, int64_t segments, void* out, cudaStream_t stream) {
    const int64_t total = segments * d;
    if (total == 0) return cudaSuccess;
    segment_reduce_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(src), offsets, perm, rows, m, d, total, reduce, static_cast<scalar_t*>(out));
    return cudaGetLastError();
  }
};

template <typename scalar_t>
struct ScatterAddRows {
  template <typename index_t>
  static cudaError_t launch(const void* src, const void* index, int64_t m, int64_t d, int64_t segments, void* acc,
                            cudaStream_t stream) {
    using acc_t = typename ComputeType<scalar_t>::type;
    const int64_t total = m * d;
    if (total == 0 || segments == 0) return cudaSuccess;
    scatter_add_rows_kernel<scalar_t, acc_t, index_t><<<grid_for(total), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(src), static_cast<const index_t*>(index), d, segments, total,
        static_cast<acc_t*>(acc));
    return cudaGetLastError();
  }
  static cudaError_t run(bool idx64, const void* src, const void* index, int64_t m, int64_t d, int64_t segments,
                         void* acc, cudaStream_t stream) {
    return idx64 ? launch<int64_t>(src, index, m, d, segments, acc, stream)
                 : launch<int32_t>(src, index, m, d, segments, acc, stream);
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

cudaError_t launch_segment_reduce(ScalarKind kind, int reduce, const void* src, const int64_t* offsets,
                                  const int64_t* perm, int64_t rows, int64_t m, int64_t d, int64_t segments,
                                  void* out, cudaStream_t stream) {
  return dispatch_kind<SegmentReduce>(kind, reduce, src, offsets, perm, rows, m, d, segments, out, stream);
}

cudaError_t launch_scatter_add_rows_atomic(ScalarKind kind, bool idx_is_64bit, const void* src, const void* index,
                                           int64_t m, int64_t d, int64_t segments, void* acc, cudaStream_t stream) {
  return dispatch_kind<ScatterAddRows>(kind, idx_is_64bit, src, index, m, d, segments, acc, stream);
}

cudaError_t launch_scatter_columns_atomic(ScalarKind kind, bool idx_is_64bit, const void* grad_out,
                                           const void* idx, const void* weight, int64_t batch, int64_t channels,
                                           int64_t n, int64_t k, int64_t group, void* grad_acc, cudaStream_t stream) {
  return dispatch_kind<ScatterAtomic>(kind, idx_is_64bit, grad_out, idx, weight, batch, channels, n, k, group,
                                      grad_acc, stream);
}

cudaError_t launch_scatter_columns_segments(ScalarKind kind, const void* grad_out, const void* weight,
                                             const int64_t* order, const int64_t* offsets, int64_t batch,
                                             int64_t channels, int64_t n, int64_t k, int64_t group, void* grad,
                                             cudaStream_t stream) {
  return dispatch_kind<ScatterSegments>(kind, grad_out, weight, order, offsets, batch, channels, n, k, group, grad,
                                        stream);
}

}  // namespace cuda
}  // namespace dynkernels
