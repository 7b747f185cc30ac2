// evolve_attention_logits and its backward, CUDA; semantics as
// evolve_logits_cpu.cpp. CUDA headers only (built by plain nvcc in the tests).
//
// Forward: one block per query row (b, i), all heads. Shared memory holds the
//   mixed rows i - r .. i + r of every head, zero-padded by r on both sides
//   (the band), the weights, and the row of A + mask; each thread computes
//   whole (head, key) outputs of the convolution from the band; then one warp
//   per head does the softmax with shuffle reductions.
// Backward 1: one block per kRows query rows: Z recomputed from the band,
//   dA = gA + P (gP - <gP, P>) (one warp per head for the dot), dZ (to a
//   scratch in the compute type) and (1 - w_conv) dA (to the dM scratch).
//   Each (weight, tap) pair of dW belongs to one thread, which sums it over
//   the block's rows in shared memory; the per-block partials are summed in
//   block order by the caller (deterministic).
// Backward 2: one block per query row: dM += conv(dZ) with the flipped,
//   head-swapped kernel (given by the caller), then dS = (1 - w_prev) dM and
//   dA_prev = w_prev dM.
// Arithmetic in float (double for double).
#include <cmath>

#include "common/cuda_utils.cuh"
#include "evolving_attention/evolving_kernels.h"

namespace dynkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 8;  // query rows per block of backward 1

// NaN propagates as in torch: relu(NaN) = NaN, and its gradient passes.
template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z, int act, acc_t slope) {
  if (act == 1) return z < acc_t(0) ? acc_t(0) : z;
  if (act == 2) return z > acc_t(0) ? z : slope * z;
  return z;
}

template <typename acc_t>
__device__ __forceinline__ acc_t activate_grad(acc_t z, int act, acc_t slope) {
  if (act == 1) return z <= acc_t(0) ? acc_t(0) : acc_t(1);
  if (act == 2) return z > acc_t(0) ? acc_t(1) : slope;
  return acc_t(1);
}

// Whether the mask sets key j of row (b, h, i) to -inf: such a key passes no
// gradient back, so a fully masked row (P all NaN) contributes nothing.
template <typename scalar_t>
__device__ __forceinline__ bool masked_out(const scalar_t* mask, const EvolveMask& mv, int64_t b, int64_t h, int64_t i,
                                           int64_t j) {
  if (mask == nullptr) return false;
  const float m = static_cast<float>(to_compute(mask[b * mv.sb + h * mv.sh + i * mv.si + j * mv.sj]));
  return m == -INFINITY;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// Where each part of a block's shared memory starts (in acc_t elements).
struct Smem {
  int64_t width, band, weights, row;
  __host__ __device__ Smem(const EvolveShape& s) {
    width = s.n + 2 * (s.k / 2);
    band = 0;
    weights = band + s.h * s.k * width;
    row = weights + s.h * s.h * s.k * s.k;
  }
  // The forward's and backward 1's row buffer (H x N), then backward 1's dW
  // and dbias accumulators and the per-head <gP, P>.
  __host__ __device__ int64_t dw(const EvolveShape& s) const { return row + s.h * s.n; }
  __host__ __device__ int64_t total(const EvolveShape& s) const { return dw(s) + s.h * s.h * s.k * s.k + 2 * s.h; }
};

// band[(hi * K + di) * width + r + c] = keep * a[b, hi, i + di - r, c] + take * p[...] (0 outside the map).
template <typename scalar_t, typename acc_t>
__device__ void load_band(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p, acc_t keep, acc_t take,
                          const EvolveShape& s, int64_t b, int64_t i, int64_t width, acc_t* band) {
  const int k = static_cast<int>(s.k), r = k / 2, wd = static_cast<int>(width), n = static_cast<int>(s.n);
  const int total = static_cast<int>(s.h) * k * wd;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int c = e % wd - r, di = (e / wd) % k, hi = e / (wd * k), row = static_cast<int>(i) + di - r;
    acc_t v = acc_t(0);
    if (row >= 0 && row < n && c >= 0 && c < n) {
      const int64_t off = ((b * s.h + hi) * s.n + row) * s.n + c;
      v = keep * static_cast<acc_t>(to_compute(a[off]));
      if (p != nullptr) v += take * static_cast<acc_t>(to_compute(p[off]));
    }
    band[e] = v;
  }
}

// z = sum over (hi, di, dj) of w[ho, hi, di, dj] * band[hi, di][j + dj] (32-bit
// indices: the band and the weights are small).
template <typename acc_t>
__device__ __forceinline__ acc_t conv_at(const acc_t* band, const acc_t* w, const EvolveShape& s, int64_t width,
                                         int64_t ho, int64_t j) {
  const int h = static_cast<int>(s.h), k = static_cast<int>(s.k), wd = static_cast<int>(width);
  const acc_t* src = band + j;
  const acc_t* wr = w + static_cast<int>(ho) * h * k * k;
  acc_t z = acc_t(0);
#pragma unroll 1
  for (int row = 0; row < h * k; ++row, src += wd, wr += k) {  // row = hi * K + di
    for (int dj = 0; dj < k; ++dj) z += wr[dj] * src[dj];
  }
  return z;
}

template <typename scalar_t, typename acc_t>
__device__ void load_weights(const scalar_t* __restrict__ weight, const EvolveShape& s, acc_t* w) {
  for (int e = threadIdx.x; e < static_cast<int>(s.h * s.h * s.k * s.k); e += blockDim.x) {
    w[e] = static_cast<acc_t>(to_compute(weight[e]));
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t to_storage(acc_t v) {
  if constexpr (sizeof(acc_t) == sizeof(double)) {
    return static_cast<scalar_t>(v);
  } else {
    return from_compute<scalar_t>(v);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    evolve_fwd_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ prev,
                      const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                      const scalar_t* __restrict__ mask, EvolveMask mv, EvolveShape s, EvolveParams prm,
                      scalar_t* __restrict__ evolved, scalar_t* __restrict__ probs) {
  using acc_t = typename ComputeType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const Smem at(s);
  const int64_t b = static_cast<int>(blockIdx.x) / static_cast<int>(s.n);
  const int64_t i = static_cast<int>(blockIdx.x) % static_cast<int>(s.n), r = s.k / 2;
  acc_t* band = smem + at.band;
  acc_t* w = smem + at.weights;
  acc_t* arow = smem + at.row;
  const acc_t w_prev = prev != nullptr ? static_cast<acc_t>(prm.w_prev) : acc_t(0);
  const acc_t w_conv = static_cast<acc_t>(prm.w_conv), slope = static_cast<acc_t>(prm.slope);
  load_band(logits, prev, acc_t(1) - w_prev, w_prev, s, b, i, at.width, band);
  load_weights(weight, s, w);
  __syncthreads();
  for (int e = threadIdx.x; e < static_cast<int>(s.h * s.n); e += blockDim.x) {
    const int ho = e / static_cast<int>(s.n), j = e % static_cast<int>(s.n);
    acc_t z = conv_at(band, w, s, at.width, ho, j);
    if (bias != nullptr) z += static_cast<acc_t>(to_compute(bias[ho]));
    const acc_t m = band[(ho * s.k + r) * at.width + r + j];
    const scalar_t a = to_storage<scalar_t>(w_conv * activate(z, prm.act, slope) + (acc_t(1) - w_conv) * m);
    evolved[((b * s.h + ho) * s.n + i) * s.n + j] = a;
    acc_t x = static_cast<acc_t>(to_compute(a));  // softmax of A as stored
    if (mask != nullptr) x += static_cast<acc_t>(to_compute(mask[b * mv.sb + ho * mv.sh + i * mv.si + j * mv.sj]));
    arow[e] = x;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t ho = warp; ho < s.h; ho += kWarps) {
    const acc_t* x = arow + ho * s.n;
    acc_t top = -INFINITY;
    for (int64_t j = lane; j < s.n; j += 32) top = x[j] > top ? x[j] : top;
    top = warp_max(top);
    acc_t total = acc_t(0);
    if (top != -INFINITY) {
      for (int64_t j = lane; j < s.n; j += 32) total += exp(x[j] - top);
    }
    total = warp_sum(total);
    // A fully masked row (top = -inf) gives NaN, as torch.softmax does.
    const acc_t inv = top == -INFINITY ? acc_t(NAN) : acc_t(1) / total;
    scalar_t* out = probs + ((b * s.h + ho) * s.n + i) * s.n;
    for (int64_t j = lane; j < s.n; j += 32) {
      out[j] = to_storage<scalar_t>(top == -INFINITY ? acc_t(NAN) : exp(x[j] - top) * inv);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    evolve_bwd_rows_kernel(const scalar_t* __restrict__ grad_evolved, const scalar_t* __restrict__ grad_probs,
                           const scalar_t* __restrict__ logits, const scalar_t* __restrict__ prev,
                           const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                           const scalar_t* __restrict__ probs, const scalar_t* __restrict__ mask, EvolveMask mv,
                           EvolveShape s, EvolveParams prm, typename ComputeType<scalar_t>::type* __restrict__ dz,
                           typename ComputeType<scalar_t>::type* __restrict__ dm,
                           typename ComputeType<scalar_t>::type* __restrict__ partial) {
  using acc_t = typename ComputeType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const Smem at(s);
  const int blocks_per_image = static_cast<int>((s.n + kRows - 1) / kRows);
  const int64_t b = static_cast<int>(blockIdx.x) / blocks_per_image;
  const int64_t i0 = static_cast<int64_t>(static_cast<int>(blockIdx.x) % blocks_per_image) * kRows;
  const int64_t wsize = s.h * s.h * s.k * s.k, taps = s.k * s.k;
  acc_t* band = smem + at.band;
  acc_t* w = smem + at.weights;
  acc_t* dzrow = smem + at.row;  // dZ of the current row, H x N
  acc_t* dw = smem + at.dw(s);   // wsize dW sums, then H dbias sums
  acc_t* db = dw + wsize;
  acc_t* dots = db + s.h;
  const acc_t w_prev = prev != nullptr ? static_cast<acc_t>(prm.w_prev) : acc_t(0);
  const acc_t w_conv = static_cast<acc_t>(prm.w_conv), slope = static_cast<acc_t>(prm.slope);
  load_weights(weight, s, w);
  for (int64_t e = threadIdx.x; e < wsize + s.h; e += blockDim.x) dw[e] = acc_t(0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t i = i0; i < s.n && i < i0 + kRows; ++i) {
    __syncthreads();  // the previous row's readers of band and dzrow are done
    load_band(logits, prev, acc_t(1) - w_prev, w_prev, s, b, i, at.width, band);
    for (int64_t ho = warp; ho < s.h; ho += kWarps) {  // <gP, P> per head
      acc_t dot = acc_t(0);
      if (grad_probs != nullptr) {
        const int64_t off = ((b * s.h + ho) * s.n + i) * s.n;
        for (int64_t j = lane; j < s.n; j += 32) {
          if (masked_out(mask, mv, b, ho, i, j)) continue;  // no gradient, nothing in the dot
          dot += static_cast<acc_t>(to_compute(grad_probs[off + j])) * static_cast<acc_t>(to_compute(probs[off + j]));
        }
      }
      dot = warp_sum(dot);
      if (lane == 0) dots[ho] = dot;
    }
    __syncthreads();
    const int hn = static_cast<int>(s.h * s.n), n = static_cast<int>(s.n);
    for (int e = threadIdx.x; e < hn; e += blockDim.x) {
      const int ho = e / n, j = e % n;
      const int64_t off = ((b * s.h + ho) * s.n + i) * s.n + j;
      acc_t da = grad_evolved != nullptr ? static_cast<acc_t>(to_compute(grad_evolved[off])) : acc_t(0);
      if (grad_probs != nullptr && !masked_out(mask, mv, b, ho, i, j)) {
        da += static_cast<acc_t>(to_compute(probs[off])) * (static_cast<acc_t>(to_compute(grad_probs[off])) - dots[ho]);
      }
      acc_t z = conv_at(band, w, s, at.width, ho, j);
      if (bias != nullptr) z += static_cast<acc_t>(to_compute(bias[ho]));
      const acc_t g = w_conv * da * activate_grad(z, prm.act, slope);
      dz[off] = g;
      dzrow[e] = g;
      dm[off] = (acc_t(1) - w_conv) * da;
    }
    __syncthreads();
    const int h = static_cast<int>(s.h), k = static_cast<int>(s.k);
    const int tp = static_cast<int>(taps), width = static_cast<int>(at.width);
    for (int e = threadIdx.x; e < static_cast<int>(wsize); e += blockDim.x) {  // one thread per (ho, hi, di, dj)
      const int ho = e / (h * tp), hi = (e / tp) % h, di = (e % tp) / k, dj = e % k;
      const acc_t* src = band + (hi * k + di) * width + dj;
      const acc_t* d = dzrow + ho * n;
      acc_t sum = acc_t(0);
      for (int j = 0; j < n; ++j) sum += d[j] * src[j];
      dw[e] += sum;
    }
    for (int64_t ho = warp; ho < s.h; ho += kWarps) {
      acc_t sum = acc_t(0);
      for (int64_t j = lane; j < s.n; j += 32) sum += dzrow[ho * s.n + j];
      sum = warp_sum(sum);
      if (lane == 0) db[ho] += sum;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < wsize + s.h; e += blockDim.x) partial[blockIdx.x * (wsize + s.h) + e] = dw[e];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    evolve_bwd_transpose_kernel(const typename ComputeType<scalar_t>::type* __restrict__ dz,
                                const scalar_t* __restrict__ flipped,
                                const typename ComputeType<scalar_t>::type* __restrict__ dm, EvolveShape s,
                                EvolveParams prm, bool has_prev, scalar_t* __restrict__ d_logits,
                                scalar_t* __restrict__ d_prev) {
  using acc_t = typename ComputeType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const Smem at(s);
  const int64_t b = static_cast<int>(blockIdx.x) / static_cast<int>(s.n);
  const int64_t i = static_cast<int>(blockIdx.x) % static_cast<int>(s.n);
  acc_t* band = smem + at.band;
  acc_t* w = smem + at.weights;
  load_band(dz, static_cast<const acc_t*>(nullptr), acc_t(1), acc_t(0), s, b, i, at.width, band);
  load_weights(flipped, s, w);
  __syncthreads();
  const acc_t w_prev = has_prev ? static_cast<acc_t>(prm.w_prev) : acc_t(0);
  for (int e = threadIdx.x; e < static_cast<int>(s.h * s.n); e += blockDim.x) {
    const int hi = e / static_cast<int>(s.n), j = e % static_cast<int>(s.n);
    const int64_t off = ((b * s.h + hi) * s.n + i) * s.n + j;
    const acc_t total = dm[off] + conv_at(band, w, s, at.width, hi, j);
    d_logits[off] = to_storage<scalar_t>((acc_t(1) - w_prev) * total);
    if (has_prev) d_prev[off] = to_storage<scalar_t>(w_prev * total);
  }
}

template <typename scalar_t>
cudaError_t allow_smem(const void* kernel, size_t bytes) {
  return bytes > 48 * 1024 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(bytes))
                           : cudaSuccess;
}

template <typename scalar_t>
struct EvolveForward {
  static cudaError_t run(const void* logits, const void* prev, const void* weight, const void* bias, const void* mask,
                         EvolveMask mv, EvolveShape s, EvolveParams prm, void* evolved, void* probs,
                         cudaStream_t stream) {
    using acc_t = typename ComputeType<scalar_t>::type;
    if (s.b * s.n == 0) return cudaSuccess;
    const size_t bytes = Smem(s).dw(s) * sizeof(acc_t);
    cudaError_t err = allow_smem<scalar_t>(reinterpret_cast<const void*>(&evolve_fwd_kernel<scalar_t>), bytes);
    if (err != cudaSuccess) return err;
    evolve_fwd_kernel<scalar_t><<<static_cast<unsigned>(s.b * s.n), kThreads, bytes, stream>>>(
        static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(prev), static_cast<const scalar_t*>(weight),
        static_cast<const scalar_t*>(bias), static_cast<const scalar_t*>(mask), mv, s, prm,
        static_cast<scalar_t*>(evolved), static_cast<scalar_t*>(probs));
    return cudaGetLastError();
  }
};

template <typename scalar_t>
struct EvolveBackward {
  static cudaError_t run(const void* grad_evolved, const void* grad_probs, const void* logits, const void* prev,
                         const void* weight, const void* flipped, const void* bias, const void* probs,
                         const void* mask, EvolveMask mv, EvolveShape s, EvolveParams prm, void* dz, void* dm,
                         void* partial, void* d_logits, void* d_prev, cudaStream_t stream) {
    using acc_t = typename ComputeType<scalar_t>::type;
    if (s.b * s.n == 0) return cudaSuccess;
    const Smem at(s);
    const size_t rows_bytes = at.total(s) * sizeof(acc_t), band_bytes = at.row * sizeof(acc_t);
    cudaError_t err = allow_smem<scalar_t>(reinterpret_cast<const void*>(&evolve_bwd_rows_kernel<scalar_t>), rows_bytes);
    if (err != cudaSuccess) return err;
    err = allow_smem<scalar_t>(reinterpret_cast<const void*>(&evolve_bwd_transpose_kernel<scalar_t>), band_bytes);
    if (err != cudaSuccess) return err;
    const unsigned row_blocks = static_cast<unsigned>(s.b * ((s.n + kRows - 1) / kRows));
    evolve_bwd_rows_kernel<scalar_t><<<row_blocks, kThreads, rows_bytes, stream>>>(
        static_cast<const scalar_t*>(grad_evolved), static_cast<const scalar_t*>(grad_probs),
        static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(prev), static_cast<const scalar_t*>(weight),
        static_cast<const scalar_t*>(bias), static_cast<const scalar_t*>(probs), static_cast<const scalar_t*>(mask), mv,
        s, prm, static_cast<acc_t*>(dz),
        static_cast<acc_t*>(dm), static_cast<acc_t*>(partial));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    evolve_bwd_transpose_kernel<scalar_t><<<static_cast<unsigned>(s.b * s.n), kThreads, band_bytes, stream>>>(
        static_cast<const acc_t*>(dz), static_cast<const scalar_t*>(flipped), static_cast<const acc_t*>(dm), s, prm,
        prev != nullptr, static_cast<scalar_t*>(d_logits), static_cast<scalar_t*>(d_prev));
    return cudaGetLastError();
  }
};

}  // namespace

int64_t evolve_rows_per_block() { return kRows; }

size_t evolve_smem_bytes(const EvolveShape& s, bool backward, size_t acc_bytes) {
  const Smem at(s);
  return (backward ? at.total(s) : at.dw(s)) * acc_bytes;
}

cudaError_t launch_evolve_attention_logits(ScalarKind kind, const void* logits, const void* prev, const void* weight,
                                           const void* bias, const void* mask, EvolveMask mv, EvolveShape s,
                                           EvolveParams prm, void* evolved, void* probs, cudaStream_t stream) {
  return dispatch_kind<EvolveForward>(kind, logits, prev, weight, bias, mask, mv, s, prm, evolved, probs, stream);
}

cudaError_t launch_evolve_attention_logits_backward(ScalarKind kind, const void* grad_evolved, const void* grad_probs,
                                                    const void* logits, const void* prev, const void* weight,
                                                    const void* flipped, const void* bias, const void* probs,
                                                    const void* mask, EvolveMask mv, EvolveShape s, EvolveParams prm,
                                                    void* dz, void* dm, void* partial, void* d_logits, void* d_prev,
                                                    cudaStream_t stream) {
  return dispatch_kind<EvolveBackward>(kind, grad_evolved, grad_probs, logits, prev, weight, flipped, bias, probs,
                                       mask, mv, s, prm, dz, dm, partial, d_logits, d_prev, stream);
}

}  // namespace cuda
}  // namespace dynkernels
