// ISDA's full-covariance merge, CUDA: one block per tile pair (I, J), I <= J,
// of one class's (A, A) covariance. The (J, I) tiles go through shared memory
// transposed, so both halves are read and written coalesced, and both get the
// same value: the covariance stays exactly symmetric. CUDA headers only.
#include "common/cuda_utils.cuh"
#include "isda/isda_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;  // blockDim = (kTile, kRowsPerPass)

template <typename T>
__global__ void __launch_bounds__(kTile* kRowsPerPass)
    merge_symmetric_kernel(T* __restrict__ cov, const T* __restrict__ s, const T* __restrict__ delta, T w, int a,
                           int tiles) {
  __shared__ T cov_t[kTile][kTile + 1];
  __shared__ T s_t[kTile][kTile + 1];
  // blockIdx.x -> (ti, tj), ti <= tj, row-major over the upper triangle of tiles
  int ti = 0, left = static_cast<int>(blockIdx.x);
  while (left >= tiles - ti) {
    left -= tiles - ti;
    ++ti;
  }
  const int tj = ti + left, i0 = ti * kTile, j0 = tj * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  // (J, I) tile, read coalesced along its rows, stored transposed
  for (int r = ty; r < kTile; r += kRowsPerPass) {
    const int row = j0 + r, col = i0 + tx;
    const bool ok = row < a && col < a;
    cov_t[tx][r] = ok ? cov[static_cast<int64_t>(row) * a + col] : T(0);
    s_t[tx][r] = ok ? s[static_cast<int64_t>(row) * a + col] : T(0);
  }
  __syncthreads();
  const T keep = T(0.5) * (T(1) - w), take = T(0.5) * w, cross = w * (T(1) - w);
  T out[kTile / kRowsPerPass];
  int n_out = 0;
  for (int r = ty; r < kTile; r += kRowsPerPass, ++n_out) {
    const int row = i0 + r, col = j0 + tx;
    T v = T(0);
    if (row < a && col < a) {
      const int64_t off = static_cast<int64_t>(row) * a + col;
      v = keep * (cov[off] + cov_t[r][tx]) + take * (s[off] + s_t[r][tx]) + (cross * delta[row]) * delta[col];
    }
    out[n_out] = v;
  }
  __syncthreads();  // every thread has read the (J, I) tile before it is overwritten
  n_out = 0;
  for (int r = ty; r < kTile; r += kRowsPerPass, ++n_out) {
    cov_t[tx][r] = out[n_out];  // cov_t[col][row] = out[row][col]
  }
  __syncthreads();
  n_out = 0;
  for (int r = ty; r < kTile; r += kRowsPerPass, ++n_out) {
    const int row = i0 + r, col = j0 + tx;
    // on a diagonal tile, (row, col) and (col, row) must get one value: the upper one
    if (row < a && col < a && (ti != tj || col >= row)) cov[static_cast<int64_t>(row) * a + col] = out[n_out];
  }
  for (int r = ty; r < kTile; r += kRowsPerPass) {
    const int row = j0 + r, col = i0 + tx;  // the (J, I) tile, from the transposed results
    if (row < a && col < a && (ti != tj || row > col)) cov[static_cast<int64_t>(row) * a + col] = cov_t[r][tx];
  }
}

template <typename T>
struct Merge {
  static cudaError_t run(void* cov, const void* s, const void* delta, double w, int64_t a, cudaStream_t stream) {
    if (a == 0) return cudaSuccess;
    const int tiles = static_cast<int>((a + kTile - 1) / kTile);
    merge_symmetric_kernel<T><<<tiles * (tiles + 1) / 2, dim3(kTile, kRowsPerPass), 0, stream>>>(
        static_cast<T*>(cov), static_cast<const T*>(s), static_cast<const T*>(delta), static_cast<T>(w),
        static_cast<int>(a), tiles);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_isda_merge_symmetric(ScalarKind kind, void* cov, const void* s, const void* delta, double w,
                                        int64_t a, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return Merge<float>::run(cov, s, delta, w, a, stream);
    case ScalarKind::kFloat64:
      return Merge<double>::run(cov, s, delta, w, a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dynkernels
