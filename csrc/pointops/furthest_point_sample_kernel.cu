// furthest_point_sample, CUDA: one CTA per cloud.
//
// Per sample: every thread folds the new sample into the min-distances of its
// points, reduces its best (md, index) with warp shuffles (larger md, then
// lower index), and the warp winners meet in shared memory behind one
// __syncthreads. The winners' slots are double-buffered by iteration parity,
// so the next iteration can write while slower threads still read: one
// barrier per sample. The winner's coordinates travel with it, so no thread
// re-reads global memory to learn where the next sample is.
//
// Clouds of up to kThreads * max_per_thread points (8192 float, 4096 double) keep coordinates and
// min-distances in registers; larger clouds keep min-distances in a global
// scratch buffer (L2-resident at these sizes) and re-read coordinates.
#include <cfloat>
#include <climits>

#include "common/cuda_utils.cuh"
#include "pointops/pointops_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Points per thread that stay in registers without spilling under the
// 128-register cap of __launch_bounds__(512, 1): 16 for float, 8 for double.
template <typename scalar_t>
constexpr int max_per_thread() {
  return sizeof(typename ComputeType<scalar_t>::type) == 8 ? 8 : 16;
}

// A candidate sample: its min-distance, index and coordinates.
template <typename dist_t>
struct Best {
  dist_t md;
  int64_t index;
  dist_t x, y, z;
};

template <typename dist_t>
__device__ __forceinline__ bool beats(dist_t md, int64_t index, dist_t other_md, int64_t other_index) {
  return md > other_md || (md == other_md && index < other_index);
}

template <typename dist_t>
__device__ __forceinline__ void warp_argmax(Best<dist_t>& b) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const dist_t md = __shfl_xor_sync(0xffffffffu, b.md, offset);
    const int64_t index = __shfl_xor_sync(0xffffffffu, b.index, offset);
    const dist_t x = __shfl_xor_sync(0xffffffffu, b.x, offset);
    const dist_t y = __shfl_xor_sync(0xffffffffu, b.y, offset);
    const dist_t z = __shfl_xor_sync(0xffffffffu, b.z, offset);
    if (beats(md, index, b.md, b.index)) b = {md, index, x, y, z};
  }
}

// Publishes each warp's winner in slot[parity] and returns the CTA winner.
template <typename dist_t>
__device__ __forceinline__ Best<dist_t> block_argmax(Best<dist_t> b, Best<dist_t> (*slots)[kWarps], int parity) {
  warp_argmax(b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) slots[parity][warp] = b;
  __syncthreads();
  Best<dist_t> best = slots[parity][0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    const Best<dist_t> c = slots[parity][w];
    if (beats(c.md, c.index, best.md, best.index)) best = c;
  }
  return best;
}

// The sample at `index`, with its coordinates in the distance type.
template <typename scalar_t>
__device__ __forceinline__ Best<typename ComputeType<scalar_t>::type> sample_at(const scalar_t* cloud, int64_t index) {
  using dist_t = typename ComputeType<scalar_t>::type;
  return {dist_t(0), index, to_compute(cloud[3 * index]), to_compute(cloud[3 * index + 1]),
          to_compute(cloud[3 * index + 2])};
}

template <typename scalar_t, int kPerThread>
__global__ void __launch_bounds__(kThreads, 1)
    fps_registers_kernel(const scalar_t* __restrict__ xyz, int64_t n, int64_t m, int64_t start,
                         int64_t* __restrict__ out) {
  using dist_t = typename ComputeType<scalar_t>::type;
  __shared__ Best<dist_t> slots[2][kWarps];
  const scalar_t* cloud = xyz + static_cast<int64_t>(blockIdx.x) * n * 3;
  int64_t* samples = out + static_cast<int64_t>(blockIdx.x) * m;
  dist_t px[kPerThread], py[kPerThread], pz[kPerThread], md[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    const bool valid = j < n;
    px[i] = valid ? to_compute(cloud[3 * j]) : dist_t(0);
    py[i] = valid ? to_compute(cloud[3 * j + 1]) : dist_t(0);
    pz[i] = valid ? to_compute(cloud[3 * j + 2]) : dist_t(0);
    md[i] = valid ? dist_t(INFINITY) : dist_t(-INFINITY);  // padding never wins
  }
  Best<dist_t> cur = sample_at(cloud, start);
  for (int64_t it = 0; it < m; ++it) {
    if (threadIdx.x == 0) samples[it] = cur.index;
    if (it + 1 == m) break;
    Best<dist_t> b{dist_t(-INFINITY), INT64_MAX, dist_t(0), dist_t(0), dist_t(0)};
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
      const dist_t d = sq_dist(px[i], py[i], pz[i], cur.x, cur.y, cur.z);
      md[i] = d < md[i] ? d : md[i];  // a NaN d changes nothing
      if (j == cur.index) md[i] = dist_t(-1);
      if (beats(md[i], j, b.md, b.index)) b = {md[i], j, px[i], py[i], pz[i]};
    }
    cur = block_argmax(b, slots, static_cast<int>(it & 1));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1)
    fps_streaming_kernel(const scalar_t* __restrict__ xyz, int64_t n, int64_t m, int64_t start,
                         typename ComputeType<scalar_t>::type* __restrict__ md_scratch, int64_t* __restrict__ out) {
  using dist_t = typename ComputeType<scalar_t>::type;
  __shared__ Best<dist_t> slots[2][kWarps];
  const scalar_t* cloud = xyz + static_cast<int64_t>(blockIdx.x) * n * 3;
  dist_t* md = md_scratch + static_cast<int64_t>(blockIdx.x) * n;
  int64_t* samples = out + static_cast<int64_t>(blockIdx.x) * m;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) md[j] = dist_t(INFINITY);
  Best<dist_t> cur = sample_at(cloud, start);
  for (int64_t it = 0; it < m; ++it) {
    if (threadIdx.x == 0) samples[it] = cur.index;
    if (it + 1 == m) break;
    Best<dist_t> b{dist_t(-INFINITY), INT64_MAX, dist_t(0), dist_t(0), dist_t(0)};
    // Each thread owns the same points every iteration, so its md writes are
    // read back only by itself: no barrier is needed around md.
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const dist_t x = to_compute(cloud[3 * j]), y = to_compute(cloud[3 * j + 1]), z = to_compute(cloud[3 * j + 2]);
      const dist_t d = sq_dist(x, y, z, cur.x, cur.y, cur.z);
      dist_t v = md[j];
      v = d < v ? d : v;
      if (j == cur.index) v = dist_t(-1);
      md[j] = v;
      if (beats(v, j, b.md, b.index)) b = {v, j, x, y, z};
    }
    cur = block_argmax(b, slots, static_cast<int>(it & 1));
  }
}

template <typename scalar_t>
cudaError_t launch(const scalar_t* xyz, int64_t batch, int64_t n, int64_t m, int64_t start, void* md_scratch,
                   int64_t* out, cudaStream_t stream) {
  if (batch == 0 || m == 0) return cudaSuccess;
  using dist_t = typename ComputeType<scalar_t>::type;
  const dim3 grid(static_cast<unsigned>(batch)), block(kThreads);
  const int64_t per_thread = (n + kThreads - 1) / kThreads;
  if (per_thread <= 1) {
    fps_registers_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(xyz, n, m, start, out);
  } else if (per_thread <= 2) {
    fps_registers_kernel<scalar_t, 2><<<grid, block, 0, stream>>>(xyz, n, m, start, out);
  } else if (per_thread <= 4) {
    fps_registers_kernel<scalar_t, 4><<<grid, block, 0, stream>>>(xyz, n, m, start, out);
  } else if (per_thread <= 8) {
    fps_registers_kernel<scalar_t, 8><<<grid, block, 0, stream>>>(xyz, n, m, start, out);
  } else if (per_thread <= max_per_thread<scalar_t>()) {
    fps_registers_kernel<scalar_t, max_per_thread<scalar_t>()><<<grid, block, 0, stream>>>(xyz, n, m, start, out);
  } else {
    fps_streaming_kernel<scalar_t>
        <<<grid, block, 0, stream>>>(xyz, n, m, start, static_cast<dist_t*>(md_scratch), out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_furthest_point_sample(ScalarKind kind, const void* xyz, int64_t batch, int64_t n, int64_t m,
                                         int64_t start, void* md_scratch, int64_t* out, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch(static_cast<const float*>(xyz), batch, n, m, start, md_scratch, out, stream);
    case ScalarKind::kFloat64:
      return launch(static_cast<const double*>(xyz), batch, n, m, start, md_scratch, out, stream);
    case ScalarKind::kFloat16:
      return launch(static_cast<const __half*>(xyz), batch, n, m, start, md_scratch, out, stream);
    case ScalarKind::kBFloat16:
      return launch(static_cast<const __nv_bfloat16*>(xyz), batch, n, m, start, md_scratch, out, stream);
  }
  return cudaErrorInvalidValue;
}

bool fps_needs_scratch(ScalarKind kind, int64_t n) {
  const int per_thread = kind == ScalarKind::kFloat64 ? max_per_thread<double>() : max_per_thread<float>();
  return n > static_cast<int64_t>(kThreads) * per_thread;
}

}  // namespace cuda
}  // namespace dynkernels
