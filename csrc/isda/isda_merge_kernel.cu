// ISDA's full-covariance update, CUDA: one block per (class c, tile pair
// (I, J), I <= J) of the (A, A) covariance, over every class at once (no
// host sync: classes absent from the batch have empty segments, and their
// blocks exit at once). A block accumulates the tile of the class's batch
// scatter S = X_c^T X_c (rows centred on the batch class mean, sorted by
// class) through shared memory, in row order, then merges in place
//   Sigma[i, j] = (1 - w)/2 (Sigma[i, j] + Sigma[j, i]) + (w / n_b) S[i, j] + w (1 - w) (d_i d_j)
// into both (I, J) and (J, I). Every term is symmetric in (i, j) bit for bit
// (S[i, j] and S[j, i] are the same products summed in the same order), so
// Sigma stays exactly symmetric. The (J, I) tile goes through shared memory
// transposed, so both halves are read and written coalesced. CUDA headers only.
#include "common/cuda_utils.cuh"
#include "isda/isda_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;  // blockDim = (kTile, kRowsPerPass)
constexpr int kOut = kTile / kRowsPerPass;

template <typename T>
__global__ void __launch_bounds__(kTile* kRowsPerPass)
    segment_merge_kernel(T* __restrict__ cov, const T* __restrict__ x, const int64_t* __restrict__ offsets,
                         const T* __restrict__ w_of, const T* __restrict__ delta, int64_t m, int a, int tiles) {
  __shared__ T xi_s[kTile][kTile + 1];
  __shared__ T xj_s[kTile][kTile + 1];
  const int64_t c = blockIdx.y;
  const int64_t start = min(max(offsets[c], int64_t(0)), m), stop = min(max(offsets[c + 1], start), m);
  if (stop == start) return;  // class absent from the batch: untouched
  int ti = 0, left = static_cast<int>(blockIdx.x);
  while (left >= tiles - ti) {  // blockIdx.x -> (ti, tj), row-major over the upper triangle of tiles
    left -= tiles - ti;
    ++ti;
  }
  const int tj = ti + left, i0 = ti * kTile, j0 = tj * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  T acc[kOut];
  for (int q = 0; q < kOut; ++q) acc[q] = T(0);
  for (int64_t r0 = start; r0 < stop; r0 += kTile) {
    for (int r = ty; r < kTile; r += kRowsPerPass) {
      const int64_t row = r0 + r;
      const bool in = row < stop;
      xi_s[r][tx] = in && i0 + tx < a ? x[row * a + i0 + tx] : T(0);
      xj_s[r][tx] = in && j0 + tx < a ? x[row * a + j0 + tx] : T(0);
    }
    __syncthreads();
    for (int r = 0; r < kTile; ++r) {
      const T xj = xj_s[r][tx];
      for (int q = 0; q < kOut; ++q) acc[q] += xi_s[r][ty + q * kRowsPerPass] * xj;
    }
    __syncthreads();
  }
  T* sigma = cov + c * static_cast<int64_t>(a) * a;
  const T w = w_of[c], n_b = static_cast<T>(stop - start);
  const T keep = T(0.5) * (T(1) - w), take = w / n_b, cross = w * (T(1) - w);
  const T* d = delta + c * a;
  // the (J, I) tile of Sigma, read coalesced along its rows, stored transposed (reuses xi_s)
  for (int r = ty; r < kTile; r += kRowsPerPass) {
    const int row = j0 + r, col = i0 + tx;
    xi_s[tx][r] = row < a && col < a ? sigma[static_cast<int64_t>(row) * a + col] : T(0);
  }
  __syncthreads();
  T out[kOut];
  for (int q = 0; q < kOut; ++q) {
    const int r = ty + q * kRowsPerPass, row = i0 + r, col = j0 + tx;
    out[q] = T(0);
    if (row < a && col < a) {
      out[q] = keep * (sigma[static_cast<int64_t>(row) * a + col] + xi_s[r][tx]) + take * acc[q] +
               cross * (d[row] * d[col]);
    }
  }
  __syncthreads();  // every thread has read both tiles before either is written
  for (int q = 0; q < kOut; ++q) {
    const int r = ty + q * kRowsPerPass;
    xi_s[tx][r] = out[q];  // xi_s[col][row] = out[row][col]
    const int row = i0 + r, col = j0 + tx;
    if (row < a && col < a) sigma[static_cast<int64_t>(row) * a + col] = out[q];
  }
  __syncthreads();
  if (ti == tj) return;  // a diagonal tile is its own transpose
  for (int r = ty; r < kTile; r += kRowsPerPass) {
    const int row = j0 + r, col = i0 + tx;
    if (row < a && col < a) sigma[static_cast<int64_t>(row) * a + col] = xi_s[r][tx];
  }
}

template <typename T>
cudaError_t run_merge(void* cov, const void* x, const int64_t* offsets, const void* w, const void* delta, int64_t m,
                      int64_t classes, int64_t a, cudaStream_t stream) {
  if (a == 0 || classes == 0 || m == 0) return cudaSuccess;
  const int tiles = static_cast<int>((a + kTile - 1) / kTile);
  const dim3 grid(tiles * (tiles + 1) / 2, static_cast<unsigned>(classes));
  segment_merge_kernel<T><<<grid, dim3(kTile, kRowsPerPass), 0, stream>>>(
      static_cast<T*>(cov), static_cast<const T*>(x), offsets, static_cast<const T*>(w), static_cast<const T*>(delta),
      m, static_cast<int>(a), tiles);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_isda_segment_merge(ScalarKind kind, void* cov, const void* centred, const int64_t* offsets,
                                      const void* w, const void* delta, int64_t m, int64_t classes, int64_t a,
                                      cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return run_merge<float>(cov, centred, offsets, w, delta, m, classes, a, stream);
    case ScalarKind::kFloat64:
      return run_merge<double>(cov, centred, offsets, w, delta, m, classes, a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dynkernels
