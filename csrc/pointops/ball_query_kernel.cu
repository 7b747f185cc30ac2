// ball_query, CUDA: one warp per center, scanning the cloud cooperatively.
//
// Each step the warp tests 32 consecutive points (one per lane, coalesced),
// ballots the hits, and each hit lane writes itself at count + (hits in lower
// lanes), which keeps mmcv's index order exactly. The warp stops as soon as
// ns hits are found, then pads with the first hit, or writes -1 if none.
#include "common/cuda_utils.cuh"
#include "pointops/pointops_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    ball_query_kernel(const scalar_t* __restrict__ xyz, const scalar_t* __restrict__ centers, int64_t batch,
                      int64_t n, int64_t m, typename ComputeType<scalar_t>::type min_r2,
                      typename ComputeType<scalar_t>::type r2, int64_t ns, int64_t* __restrict__ out) {
  using dist_t = typename ComputeType<scalar_t>::type;
  const int lane = threadIdx.x % 32;
  const int64_t query = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (query >= batch * m) return;  // whole warps exit together
  const int64_t b = query / m;
  const scalar_t* cloud = xyz + b * n * 3;
  const dist_t cx = to_compute(centers[3 * query]), cy = to_compute(centers[3 * query + 1]),
               cz = to_compute(centers[3 * query + 2]);
  int64_t* row = out + query * ns;
  int64_t count = 0, first = -1;
  for (int64_t base = 0; base < n && count < ns; base += 32) {
    const int64_t j = base + lane;
    bool hit = false;
    if (j < n) {
      const dist_t d = sq_dist(to_compute(cloud[3 * j]), to_compute(cloud[3 * j + 1]), to_compute(cloud[3 * j + 2]),
                               cx, cy, cz);
      hit = d == dist_t(0) || (d >= min_r2 && d < r2);
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (ballot == 0u) continue;
    if (first < 0) first = base + __ffs(ballot) - 1;
    const int64_t slot = count + __popc(ballot & ((1u << lane) - 1u));
    if (hit && slot < ns) row[slot] = j;
    count += __popc(ballot);
  }
  for (int64_t k = (count < ns ? count : ns) + lane; k < ns; k += 32) row[k] = first;  // -1 when empty
}

template <typename scalar_t>
cudaError_t launch(const scalar_t* xyz, const scalar_t* centers, int64_t batch, int64_t n, int64_t m,
                   double min_radius, double radius, int64_t ns, int64_t* out, cudaStream_t stream) {
  if (batch * m == 0) return cudaSuccess;
  using dist_t = typename ComputeType<scalar_t>::type;
  // Radii are cast to the distance type first and squared in it, as on CPU.
  const dist_t r = static_cast<dist_t>(radius), r_min = static_cast<dist_t>(min_radius);
  const int blocks = ceil_div(batch * m, kWarpsPerBlock);
  ball_query_kernel<scalar_t>
      <<<blocks, kWarpsPerBlock * 32, 0, stream>>>(xyz, centers, batch, n, m, r_min * r_min, r * r, ns, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ball_query(ScalarKind kind, const void* xyz, const void* centers, int64_t batch, int64_t n,
                              int64_t m, double min_radius, double radius, int64_t ns, int64_t* out,
                              cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch(static_cast<const float*>(xyz), static_cast<const float*>(centers), batch, n, m, min_radius,
                    radius, ns, out, stream);
    case ScalarKind::kFloat64:
      return launch(static_cast<const double*>(xyz), static_cast<const double*>(centers), batch, n, m, min_radius,
                    radius, ns, out, stream);
    case ScalarKind::kFloat16:
      return launch(static_cast<const __half*>(xyz), static_cast<const __half*>(centers), batch, n, m, min_radius,
                    radius, ns, out, stream);
    case ScalarKind::kBFloat16:
      return launch(static_cast<const __nv_bfloat16*>(xyz), static_cast<const __nv_bfloat16*>(centers), batch, n,
                    m, min_radius, radius, ns, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dynkernels
