// knn, CUDA: one thread per center scans its cloud in index order and keeps
// the k best (d2, index) pairs by insertion into a local array (k <= 128),
// so ties keep the lower index and NaN ranks after +inf, as on CPU.
#include "common/cuda_utils.cuh"
#include "pointops/pointops_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// A total order on non-negative distances: the IEEE bits, NaN above +inf.
__device__ __forceinline__ uint32_t order_key(float d) { return d != d ? 0x7fc00000u : __float_as_uint(d); }
__device__ __forceinline__ uint64_t order_key(double d) {
  return d != d ? 0x7ff8000000000000ull : static_cast<uint64_t>(__double_as_longlong(d));
}

template <typename scalar_t, int KMAX>
__global__ void __launch_bounds__(kThreads)
    knn_kernel(const scalar_t* __restrict__ xyz, const scalar_t* __restrict__ centers, int64_t batch, int64_t n,
               int64_t m, int k, typename ComputeType<scalar_t>::type* __restrict__ dist_out,
               int64_t* __restrict__ idx_out) {
  using dist_t = typename ComputeType<scalar_t>::type;
  using key_t = decltype(order_key(dist_t(0)));
  const int64_t query = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (query >= batch * m) return;
  const scalar_t* cloud = xyz + (query / m) * n * 3;
  const dist_t cx = to_compute(centers[3 * query]), cy = to_compute(centers[3 * query + 1]),
               cz = to_compute(centers[3 * query + 2]);
  key_t keys[KMAX];
  dist_t dists[KMAX];
  int64_t ids[KMAX];
  int count = 0;
  for (int64_t j = 0; j < n; ++j) {
    const dist_t d = sq_dist(to_compute(cloud[3 * j]), to_compute(cloud[3 * j + 1]), to_compute(cloud[3 * j + 2]),
                             cx, cy, cz);
    const key_t key = order_key(d);
    if (count == k && key >= keys[k - 1]) continue;  // ascending j: an equal key never beats an earlier index
    int pos = count < k ? count++ : k - 1;
    while (pos > 0 && keys[pos - 1] > key) {
      keys[pos] = keys[pos - 1];
      dists[pos] = dists[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    keys[pos] = key;
    dists[pos] = d;
    ids[pos] = j;
  }
  for (int i = 0; i < k; ++i) {
    dist_out[query * k + i] = dists[i];
    idx_out[query * k + i] = ids[i];
  }
}

template <typename scalar_t, int KMAX>
cudaError_t launch_k(const void* xyz, const void* centers, int64_t batch, int64_t n, int64_t m, int k, void* dist,
                     int64_t* idx, cudaStream_t stream) {
  using dist_t = typename ComputeType<scalar_t>::type;
  knn_kernel<scalar_t, KMAX><<<ceil_div(batch * m, kThreads), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(xyz), static_cast<const scalar_t*>(centers), batch, n, m, k,
      static_cast<dist_t*>(dist), idx);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch(const void* xyz, const void* centers, int64_t batch, int64_t n, int64_t m, int64_t k, void* dist,
                   int64_t* idx, cudaStream_t stream) {
  if (batch * m == 0) return cudaSuccess;
  const int kk = static_cast<int>(k);
  if (k <= 16) return launch_k<scalar_t, 16>(xyz, centers, batch, n, m, kk, dist, idx, stream);
  if (k <= 32) return launch_k<scalar_t, 32>(xyz, centers, batch, n, m, kk, dist, idx, stream);
  if (k <= 64) return launch_k<scalar_t, 64>(xyz, centers, batch, n, m, kk, dist, idx, stream);
  if (k <= kKnnMaxK) return launch_k<scalar_t, kKnnMaxK>(xyz, centers, batch, n, m, kk, dist, idx, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_knn(ScalarKind kind, const void* xyz, const void* centers, int64_t batch, int64_t n, int64_t m,
                       int64_t k, void* dist, int64_t* idx, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch<float>(xyz, centers, batch, n, m, k, dist, idx, stream);
    case ScalarKind::kFloat64:
      return launch<double>(xyz, centers, batch, n, m, k, dist, idx, stream);
    case ScalarKind::kFloat16:
      return launch<__half>(xyz, centers, batch, n, m, k, dist, idx, stream);
    case ScalarKind::kBFloat16:
      return launch<__nv_bfloat16>(xyz, centers, batch, n, m, k, dist, idx, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dynkernels
