// gather_features (grouping_operation, gather_points), CUDA. Its backward is
// the shared column scatter (common/segment_kernel.cu).
//
// One thread per output element, k fastest (coalesced stores; idx reads are
// shared by the C rows and hit L1). Index -1 reads zero; any other
// out-of-range index trips a device assert, as torch's own index kernels do.
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

template <typename scalar_t>
struct Gather {
  static cudaError_t run(bool idx64, const void* f, const void* idx, int64_t b, int64_t c, int64_t n, int64_t k,
                         void* out, cudaStream_t s) {
    return idx64 ? gather<scalar_t, int64_t>(f, idx, b, c, n, k, out, s)
                 : gather<scalar_t, int32_t>(f, idx, b, c, n, k, out, s);
  }
};

}  // namespace

cudaError_t launch_gather_features(ScalarKind kind, bool idx_is_64bit, const void* features, const void* idx,
                                   int64_t batch, int64_t channels, int64_t n, int64_t k, void* out,
                                   cudaStream_t stream) {
  return dispatch_kind<Gather>(kind, idx_is_64bit, features, idx, batch, channels, n, k, out, stream);
}

}  // namespace cuda
}  // namespace dynkernels
