// evolve_attention_logits and its backward, CPU: Evolving Attention's map
// step (mix, head-mixing KxK convolution over the (query, key) plane, act,
// residual, masked softmax) fused per query row.
//
// Args:    logits, prev (optional) (B, H, N, N); weight (H, H, K, K), K odd;
//          bias (H) optional; mask (optional) additive, already expanded to
//          (B, H, N, N) (any strides, unit stride along keys); float32/float64.
// Forward: M = (1 - w_prev) S + w_prev A_prev (M = S without prev);
//          Z = conv(M) + bias (zero padding); A = w_conv act(Z) + (1 - w_conv) M;
//          P = softmax(A + mask) over keys. Returns (A, P).
// Backward: dA = gA + P (gP - rowsum(gP P)); dZ = w_conv dA act'(Z);
//          dM = (1 - w_conv) dA + conv^T(dZ); dS = (1 - w_prev) dM, dA_prev =
//          w_prev dM; dW = sum over (b, i, j) of dZ x M (shifted), dbias = sum dZ.
//          The parameter gradients are summed per fixed chunk of rows, then the
//          chunks in order: deterministic for any thread count.
// Threads: one task per (b, query row) in the forward; in the backward the
//          chunks of rows, then the rows again for the transposed convolution.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DK_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define DK_MULTIVERSION
#endif
#if defined(__GNUC__)
#define DK_INLINE inline __attribute__((always_inline))
#else
#define DK_INLINE inline
#endif

namespace {

// Output positions per register block of the row convolutions: 4 vectors of 8 floats.
constexpr int64_t kBlock = 32;

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

enum Activation : int64_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2 };

template <typename T>
DK_INLINE T activate(T z, int64_t act, T slope) {
  if (act == kRelu) return z > T(0) ? z : T(0);
  if (act == kLeakyRelu) return z > T(0) ? z : slope * z;
  return z;
}

template <typename T>
DK_INLINE T activate_grad(T z, int64_t act, T slope) {
  if (act == kRelu) return z > T(0) ? T(1) : T(0);
  if (act == kLeakyRelu) return z > T(0) ? T(1) : slope;
  return T(1);
}

struct Shape {
  int64_t b, h, n, k, r;
};

// Row stride of the band: N + 2r, rounded up so that whole register blocks
// of the convolution can read past N (into zeros) without a tail loop.
inline int64_t band_width(const Shape& s) { return round_up(s.n, kBlock) + 2 * s.r; }

// The rows i - r .. i + r of M for every head, zero-padded by r on both sides
// of the key axis (and zero for rows outside the map): band[(hi * K + di) * width + r + j].
template <typename T>
DK_INLINE void mixed_band(const T* logits, const T* prev, T w_prev, const Shape& s, int64_t b, int64_t i, T* band) {
  const int64_t width = band_width(s);
  std::fill(band, band + s.h * s.k * width, T(0));
  for (int64_t hi = 0; hi < s.h; ++hi) {
    for (int64_t di = 0; di < s.k; ++di) {
      const int64_t row = i + di - s.r;
      if (row < 0 || row >= s.n) continue;
      const int64_t off = ((b * s.h + hi) * s.n + row) * s.n;
      T* dst = band + (hi * s.k + di) * width + s.r;
      if (prev == nullptr) {
        std::copy(logits + off, logits + off + s.n, dst);
      } else {
        for (int64_t j = 0; j < s.n; ++j) dst[j] = (T(1) - w_prev) * logits[off + j] + w_prev * prev[off + j];
      }
    }
  }
}

// z[j] = bias + sum_{hi, di, dj} w[ho, hi, di, dj] * band[hi, di, j + dj] for
// one output head, j < round_up(N, kBlock) (z has that many entries). Each
// block of 32 outputs stays in four vector registers across the 9H taps.
template <typename T>
DK_INLINE void conv_row(const T* band, const T* weight, T bias, const Shape& s, int64_t ho, T* z) {
  const int64_t width = band_width(s), taps = s.h * s.k * s.k;
  const T* w = weight + ho * taps;
  for (int64_t j0 = 0; j0 < round_up(s.n, kBlock); j0 += kBlock) {
    T acc[kBlock];
    for (int64_t u = 0; u < kBlock; ++u) acc[u] = bias;
    for (int64_t hi = 0; hi < s.h; ++hi) {
      for (int64_t di = 0; di < s.k; ++di) {
        const T* src = band + (hi * s.k + di) * width + j0;
        for (int64_t dj = 0; dj < s.k; ++dj) {
          const T wt = w[(hi * s.k + di) * s.k + dj];
          for (int64_t u = 0; u < kBlock; ++u) acc[u] += wt * src[dj + u];
        }
      }
    }
    for (int64_t u = 0; u < kBlock; ++u) z[j0 + u] = acc[u];
  }
}

// sum_j x[j] * y[j] over explicit lanes (a plain float reduction would not vectorise).
template <typename T>
DK_INLINE T dot_lanes(const T* x, const T* y, int64_t n) {
  constexpr int64_t kLanes = 16;
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) lane[u] += x[j + u] * y[j + u];
  }
  T total = T(0);
  for (int64_t u = 0; u < kLanes; ++u) total += lane[u];
  for (; j < n; ++j) total += x[j] * y[j];
  return total;
}

// Softmax of a + mask over one row, into p (row length n). The maximum and
// the sum run over explicit lanes and exp is branch-free, so all of it
// vectorises. A fully masked row gives NaN, as torch.softmax does.
template <typename T>
DK_INLINE void masked_softmax_row(const T* a, const T* mask, int64_t mask_stride, int64_t n, T* p) {
  constexpr int64_t kLanes = 16;
  for (int64_t j = 0; j < n; ++j) p[j] = mask == nullptr ? a[j] : a[j] + mask[j * mask_stride];
  T lane[kLanes];
  for (int64_t u = 0; u < kLanes; ++u) lane[u] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) lane[u] = p[j + u] > lane[u] ? p[j + u] : lane[u];
  }
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t u = 0; u < kLanes; ++u) top = lane[u] > top ? lane[u] : top;
  for (; j < n; ++j) top = p[j] > top ? p[j] : top;
  if (top == -std::numeric_limits<T>::infinity()) {  // exp_approx clamps, so make the NaN explicit
    for (j = 0; j < n; ++j) p[j] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  for (j = 0; j < n; ++j) {  // exactly 0 below exp's float range, so masked keys get no weight
    const T x = p[j] - top;
    p[j] = x < T(-87) ? T(0) : dynkernels::exp_approx(x);
  }
  for (int64_t u = 0; u < kLanes; ++u) lane[u] = T(0);
  for (j = 0; j + kLanes <= n; j += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) lane[u] += p[j + u];
  }
  T total = T(0);
  for (int64_t u = 0; u < kLanes; ++u) total += lane[u];
  for (; j < n; ++j) total += p[j];
  const T inv = T(1) / total;
  for (j = 0; j < n; ++j) p[j] *= inv;
}

struct MaskView {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
};

template <typename T>
const T* mask_row(const MaskView& m, int64_t b, int64_t h, int64_t i) {
  return m.data == nullptr ? nullptr : static_cast<const T*>(m.data) + b * m.sb + h * m.sh + i * m.si;
}

// Everything one call needs, by pointer; the row workers below are compiled
// for AVX2 and the baseline (target_clones), so they take plain arguments.
template <typename T>
struct Problem {
  const T *logits, *prev, *weight, *bias, *probs, *grad_evolved, *grad_probs;
  MaskView mask;
  T w_prev, w_conv, slope;
  int64_t act;
  Shape s;
};

template <typename T>
DK_MULTIVERSION void forward_rows(const Problem<T>& p, int64_t begin, int64_t end, T* evolved, T* probs) {
  const Shape& s = p.s;
  const int64_t width = band_width(s);
  std::vector<T> band(s.h * s.k * width), z(round_up(s.n, kBlock));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / s.n, i = task % s.n;
    mixed_band(p.logits, p.prev, p.w_prev, s, b, i, band.data());
    for (int64_t ho = 0; ho < s.h; ++ho) {
      conv_row(band.data(), p.weight, p.bias == nullptr ? T(0) : p.bias[ho], s, ho, z.data());
      const T* m = band.data() + (ho * s.k + s.r) * width + s.r;
      const int64_t off = ((b * s.h + ho) * s.n + i) * s.n;
      T* a = evolved + off;
      for (int64_t j = 0; j < s.n; ++j) a[j] = p.w_conv * activate(z[j], p.act, p.slope) + (T(1) - p.w_conv) * m[j];
      masked_softmax_row(a, mask_row<T>(p.mask, b, ho, i), p.mask.sj, s.n, probs + off);
    }
  }
}

template <typename T>
void forward(const Problem<T>& p, T* evolved, T* probs) {
  at::parallel_for(0, p.s.b * p.s.n, 4, [&](int64_t begin, int64_t end) { forward_rows(p, begin, end, evolved, probs); });
}

// Rows per chunk of the parameter-gradient reduction: fixed, so the sums do
// not depend on the thread count.
constexpr int64_t kChunkRows = 16;

// Backward pass 1 over chunks [begin, end): dA, dZ (kept for pass 2), the
// (1 - w_conv) dA part of dM (into d_logits for now), and each chunk's dW and
// dbias partial (partial: (wsize + H) per chunk).
template <typename T>
DK_MULTIVERSION void backward_chunks(const Problem<T>& p, int64_t begin, int64_t end, T* dz, T* d_logits,
                                     T* partial) {
  const Shape& s = p.s;
  const int64_t width = band_width(s), rows = s.b * s.n, wsize = s.h * s.h * s.k * s.k;
  std::vector<T> band(s.h * s.k * width), z(round_up(s.n, kBlock)), da(s.n);
  for (int64_t c = begin; c < end; ++c) {
    T* pw = partial + c * (wsize + s.h);
    T* pb = pw + wsize;
    for (int64_t task = c * kChunkRows; task < std::min(rows, (c + 1) * kChunkRows); ++task) {
      const int64_t b = task / s.n, i = task % s.n;
      mixed_band(p.logits, p.prev, p.w_prev, s, b, i, band.data());
      for (int64_t ho = 0; ho < s.h; ++ho) {
        const int64_t off = ((b * s.h + ho) * s.n + i) * s.n;
        for (int64_t j = 0; j < s.n; ++j) da[j] = p.grad_evolved == nullptr ? T(0) : p.grad_evolved[off + j];
        if (p.grad_probs != nullptr) {
          const T dot = dot_lanes(p.grad_probs + off, p.probs + off, s.n);
          for (int64_t j = 0; j < s.n; ++j) da[j] += p.probs[off + j] * (p.grad_probs[off + j] - dot);
        }
        conv_row(band.data(), p.weight, p.bias == nullptr ? T(0) : p.bias[ho], s, ho, z.data());
        T* dzr = dz + off;
        T* dm = d_logits + off;
        for (int64_t j = 0; j < s.n; ++j) {
          dzr[j] = p.w_conv * da[j] * activate_grad(z[j], p.act, p.slope);
          dm[j] = (T(1) - p.w_conv) * da[j];
        }
        T dz_sum = T(0);
        for (int64_t j = 0; j < s.n; ++j) dz_sum += dzr[j];
        pb[ho] += dz_sum;
        for (int64_t hi = 0; hi < s.h; ++hi) {
          for (int64_t di = 0; di < s.k; ++di) {
            const T* src = band.data() + (hi * s.k + di) * width;
            for (int64_t dj = 0; dj < s.k; ++dj) {
              pw[((ho * s.h + hi) * s.k + di) * s.k + dj] += dot_lanes(dzr, src + dj, s.n);
            }
          }
        }
      }
    }
  }
}

// Backward pass 2 over rows [begin, end): the transposed convolution
// dM += conv(dZ, W') with W'[hi, ho, a, c] = W[ho, hi, K-1-a, K-1-c] (heads
// swapped, taps flipped), so it reuses the forward's band and register-blocked
// row convolution; then dM splits into the logits' and the previous logits' gradients.
template <typename T>
DK_MULTIVERSION void transpose_rows(const Problem<T>& p, const T* flipped, int64_t begin, int64_t end, const T* dz,
                                    T* d_logits, T* d_prev) {
  const Shape& s = p.s;
  std::vector<T> band(s.h * s.k * band_width(s)), z(round_up(s.n, kBlock));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / s.n, i = task % s.n;
    mixed_band(dz, static_cast<const T*>(nullptr), T(0), s, b, i, band.data());
    for (int64_t hi = 0; hi < s.h; ++hi) {
      conv_row(band.data(), flipped, T(0), s, hi, z.data());
      T* dm = d_logits + ((b * s.h + hi) * s.n + i) * s.n;
      for (int64_t j = 0; j < s.n; ++j) dm[j] += z[j];
      if (d_prev != nullptr) {
        T* dp = d_prev + ((b * s.h + hi) * s.n + i) * s.n;
        for (int64_t j = 0; j < s.n; ++j) {
          dp[j] = p.w_prev * dm[j];
          dm[j] *= T(1) - p.w_prev;
        }
      }
    }
  }
}

template <typename T>
void backward(const Problem<T>& p, T* d_logits, T* d_prev, T* d_weight, T* d_bias) {
  const Shape& s = p.s;
  const int64_t rows = s.b * s.n, wsize = s.h * s.h * s.k * s.k;
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  std::vector<T> dz(static_cast<size_t>(s.b * s.h * s.n * s.n));
  std::vector<T> partial(static_cast<size_t>(chunks * (wsize + s.h)), T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    backward_chunks(p, begin, end, dz.data(), d_logits, partial.data());
  });
  std::vector<T> flipped(static_cast<size_t>(wsize));
  for (int64_t ho = 0; ho < s.h; ++ho) {
    for (int64_t hi = 0; hi < s.h; ++hi) {
      for (int64_t a = 0; a < s.k; ++a) {
        for (int64_t c = 0; c < s.k; ++c) {
          flipped[((hi * s.h + ho) * s.k + a) * s.k + c] = p.weight[((ho * s.h + hi) * s.k + (s.k - 1 - a)) * s.k + (s.k - 1 - c)];
        }
      }
    }
  }
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    transpose_rows(p, flipped.data(), begin, end, dz.data(), d_logits, d_prev);
  });
  std::fill(d_weight, d_weight + wsize, T(0));
  if (d_bias != nullptr) std::fill(d_bias, d_bias + s.h, T(0));
  for (int64_t c = 0; c < chunks; ++c) {  // chunk order: deterministic
    const T* pw = partial.data() + c * (wsize + s.h);
    for (int64_t e = 0; e < wsize; ++e) d_weight[e] += pw[e];
    if (d_bias != nullptr) {
      for (int64_t h = 0; h < s.h; ++h) d_bias[h] += pw[wsize + h];
    }
  }
}

Shape check_args(const at::Tensor& logits, const c10::optional<at::Tensor>& prev, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask) {
  DK_CHECK_CPU(logits);
  DK_CHECK_DIM(logits, 4);
  const int64_t b = logits.size(0), h = logits.size(1), n = logits.size(2);
  TORCH_CHECK(logits.size(3) == n, "logits must be (B, H, N, N), got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "evolve_attention_logits on CPU takes float32 or float64, got ", logits.scalar_type());
  DK_CHECK_DIM(weight, 4);
  const int64_t k = weight.size(3);
  TORCH_CHECK(weight.size(0) == h && weight.size(1) == h && weight.size(2) == k && k % 2 == 1,
              "weight must be (H, H, K, K) with H = ", h, " and K odd, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == logits.scalar_type(), "weight must have the logits' dtype");
  if (prev.has_value()) {
    TORCH_CHECK(prev->sizes() == logits.sizes() && prev->scalar_type() == logits.scalar_type(),
                "prev_logits must match logits, got ", prev->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == h && bias->scalar_type() == logits.scalar_type(),
                "bias must be (H,) = (", h, ",) in the logits' dtype");
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == logits.sizes() && mask->scalar_type() == logits.scalar_type(),
                "mask must be expanded to the logits' shape and dtype");
  }
  return {b, h, n, k, k / 2};
}

MaskView mask_view(const c10::optional<at::Tensor>& mask) {
  MaskView v;
  if (mask.has_value()) {
    v.data = mask->const_data_ptr();
    v.sb = mask->stride(0);
    v.sh = mask->stride(1);
    v.si = mask->stride(2);
    v.sj = mask->stride(3);
  }
  return v;
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> evolve_attention_logits_cpu(const at::Tensor& logits_in,
                                                               const c10::optional<at::Tensor>& prev_in,
                                                               const at::Tensor& weight_in,
                                                               const c10::optional<at::Tensor>& bias_in,
                                                               double w_prev, double w_conv, int64_t activation,
                                                               double negative_slope,
                                                               const c10::optional<at::Tensor>& mask) {
  const Shape s = check_args(logits_in, prev_in, weight_in, bias_in, mask);
  TORCH_CHECK(activation >= kIdentity && activation <= kLeakyRelu, "activation must be 0, 1 or 2");
  at::Tensor logits = logits_in.contiguous(), weight = weight_in.contiguous();
  c10::optional<at::Tensor> prev, bias;
  if (prev_in.has_value()) prev = prev_in->contiguous();
  if (bias_in.has_value()) bias = bias_in->contiguous();
  at::Tensor evolved = at::empty_like(logits), probs = at::empty_like(logits);
  if (logits.numel() == 0) return {evolved, probs};
  const MaskView mv = mask_view(mask);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "evolve_attention_logits_cpu", [&] {
    const Problem<scalar_t> p{logits.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(prev),
                              weight.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias), nullptr, nullptr,
                              nullptr, mv, static_cast<scalar_t>(w_prev), static_cast<scalar_t>(w_conv),
                              static_cast<scalar_t>(negative_slope), activation, s};
    forward(p, evolved.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>());
  });
  return {evolved, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> evolve_attention_logits_backward_cpu(
    const c10::optional<at::Tensor>& grad_evolved, const c10::optional<at::Tensor>& grad_probs,
    const at::Tensor& logits_in, const c10::optional<at::Tensor>& prev_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& probs_in, double w_prev, double w_conv,
    int64_t activation, double negative_slope) {
  const Shape s = check_args(logits_in, prev_in, weight_in, bias_in, c10::nullopt);
  at::Tensor logits = logits_in.contiguous(), weight = weight_in.contiguous(), probs = probs_in.contiguous();
  c10::optional<at::Tensor> prev, bias, ge, gp;
  if (prev_in.has_value()) prev = prev_in->contiguous();
  if (bias_in.has_value()) bias = bias_in->contiguous();
  if (grad_evolved.has_value()) ge = grad_evolved->contiguous();
  if (grad_probs.has_value()) gp = grad_probs->contiguous();
  at::Tensor d_logits = at::empty_like(logits);
  // Without prev (bias) their gradient is an empty (0,) tensor.
  at::Tensor d_prev = prev.has_value() ? at::empty_like(logits) : at::empty({0}, logits.options());
  at::Tensor d_weight = at::empty_like(weight);
  at::Tensor d_bias = bias.has_value() ? at::empty_like(*bias) : at::empty({0}, logits.options());
  if (logits.numel() == 0) {
    d_weight.zero_();
    d_bias.zero_();
    return {d_logits, d_prev, d_weight, d_bias};
  }
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "evolve_attention_logits_backward_cpu", [&] {
    const Problem<scalar_t> p{logits.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(prev),
                              weight.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias),
                              probs.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(ge), ptr_or_null<scalar_t>(gp),
                              MaskView(), static_cast<scalar_t>(w_prev), static_cast<scalar_t>(w_conv),
                              static_cast<scalar_t>(negative_slope), activation, s};
    backward(p, d_logits.data_ptr<scalar_t>(), prev.has_value() ? d_prev.data_ptr<scalar_t>() : nullptr,
             d_weight.data_ptr<scalar_t>(), bias.has_value() ? d_bias.data_ptr<scalar_t>() : nullptr);
  });
  return {d_logits, d_prev, d_weight, d_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("evolve_attention_logits", &evolve_attention_logits_cpu);
  m.impl("evolve_attention_logits_backward", &evolve_attention_logits_backward_cpu);
}
