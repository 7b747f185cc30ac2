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
// Threads: one task per (b, query row) in the forward; fixed chunks of 32
//          rows in the backward, each one sweep (see backward_chunks).
// ISA:     the row workers are compiled for AVX-512VL + FMA, AVX2 + FMA and
//          the baseline, picked at run time (common/cpu_isa.h).
// Files:   evolve_cpu_simd.h (vectors, activations), evolve_cpu_band.h (row
//          layout and rings), evolve_cpu_conv.h (the convolutions); this file:
//          softmax rows, the forward and backward workers, and the torch glue.
#include <ATen/Parallel.h>

// The build turns FMA contraction off (-ffp-contract=off) so that the point
// ops reproduce their references bit for bit. This file has no such
// contract (it is held to a tolerance), and the convolution's multiply-adds
// are its whole cost: contract them here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/cpu_math.h"
#include "evolving_attention/evolve_cpu_band.h"
#include "evolving_attention/evolve_cpu_conv.h"
#include "evolving_attention/evolve_cpu_simd.h"
#include "evolving_attention/evolving_checks.h"

namespace {

using namespace dynkernels::evolving::cpu;  // evolve_cpu_{simd,band,conv}.h

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

// da += P (gP - <gP, P>) over the keys the mask keeps: a key masked by -inf
// passes no gradient and adds nothing to the dot, so a fully masked row (P all
// NaN) contributes nothing, as the reference's masked_fill / where give.
template <typename T>
DK_INLINE void softmax_grad_masked(const T* gp, const T* p, const T* mask, int64_t mask_stride, int64_t n, T* da) {
  constexpr T kMasked = -std::numeric_limits<T>::infinity();
  T dot = T(0);
  for (int64_t j = 0; j < n; ++j) {
    if (mask[j * mask_stride] != kMasked) dot += gp[j] * p[j];
  }
  for (int64_t j = 0; j < n; ++j) {
    if (mask[j * mask_stride] != kMasked) da[j] += p[j] * (gp[j] - dot);
  }
}

// One output row: a = w_conv act(z) + (1 - w_conv) m (stored), then
// p = softmax(a + mask) over the row, in three passes: (a, p = a + mask, lane
// maxima), (exp and lane sums), (scale). Explicit lanes and a branch-free exp
// let every pass vectorise. A fully masked row gives NaN, as torch.softmax
// does; masked keys get exactly 0.
template <typename T>
DK_INLINE void evolve_softmax_row(const T* z, const T* m, T w_conv, int64_t act, T slope, const T* mask,
                                  int64_t mask_stride, int64_t n, T* a, T* p) {
  constexpr int64_t kLanes = 16;
  const T keep = T(1) - w_conv;
  T lane[kLanes];
  for (int64_t u = 0; u < kLanes; ++u) lane[u] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) {
      const T x = w_conv * activate(z[j + u], act, slope) + keep * m[j + u];
      a[j + u] = x;
      const T y = mask == nullptr ? x : x + mask[(j + u) * mask_stride];
      p[j + u] = y;
      lane[u] = y > lane[u] ? y : lane[u];
    }
  }
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t u = 0; u < kLanes; ++u) top = lane[u] > top ? lane[u] : top;
  for (; j < n; ++j) {
    const T x = w_conv * activate(z[j], act, slope) + keep * m[j];
    a[j] = x;
    const T y = mask == nullptr ? x : x + mask[j * mask_stride];
    p[j] = y;
    top = y > top ? y : top;
  }
  if (top == -std::numeric_limits<T>::infinity()) {  // exp_approx clamps, so make the NaN explicit
    for (j = 0; j < n; ++j) p[j] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  for (int64_t u = 0; u < kLanes; ++u) lane[u] = T(0);
  for (j = 0; j + kLanes <= n; j += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) {
      const T x = p[j + u] - top;  // exactly 0 below exp's float range: masked keys get no weight
      const T e = x < T(-87) ? T(0) : dynkernels::exp_approx(x);
      p[j + u] = e;
      lane[u] += e;
    }
  }
  T total = T(0);
  for (int64_t u = 0; u < kLanes; ++u) total += lane[u];
  for (; j < n; ++j) {
    const T x = p[j] - top;
    p[j] = x < T(-87) ? T(0) : dynkernels::exp_approx(x);
    total += p[j];
  }
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
// for AVX-512, AVX2 and the baseline (DK_ISA_DISPATCH), so they take plain arguments.
template <typename T>
struct Problem {
  const T *logits, *prev, *weight, *bias, *probs, *grad_evolved, *grad_probs;
  MaskView mask;
  T w_prev, w_conv, slope;
  int64_t act;
  Shape s;
  const T* packed;       // pack_weights(weight)
  const T* bias_padded;  // padded_bias(bias)
  const T* evolved;      // backward: the forward's A
};

// What every row worker keeps: the layout, its band ring, the conv outputs of
// every head (padded to whole groups) and the band's row pointers.
template <typename T>
struct RowScratch {
  explicit RowScratch(const Shape& s) : lay(s), band(s, lay), z(groups_of(s.h, lay.group) * lay.group * lay.zlen) {}
  Layout<T> lay;
  Band<T> band;
  std::vector<T> z;
  const T* rows[kMaxKernel];
};

// Z rows of one query row for every head: z[ho * zlen + j].
template <typename T, dynkernels::CpuIsa kIsa>
DK_INLINE void conv_all(const Problem<T>& p, const Layout<T>& lay, const T* const* rows, int64_t head_stride, T* z) {
  const Shape& s = p.s;
  if (lay.wino) {
    conv_wino<T, kIsa>(rows, head_stride, p.packed, p.bias_padded, s, lay, z);
    return;
  }
  for (int64_t g = 0; g < groups_of(s.h, kHeads); ++g) {
    conv_direct(rows, head_stride, p.packed + g * s.h * s.k * s.k * kHeads, p.bias_padded + g * kHeads, s, lay,
                z + g * kHeads * lay.zlen);
  }
}

// The convolution one term at a time, for bands holding Inf or NaN: the
// Winograd transform's differences would turn one Inf into NaNs around it
// (Inf - Inf), where the reference's direct sum keeps it an Inf. Rare, so plain.
template <typename T>
void conv_plain(const T* const* rows, int64_t head_stride, const T* weight, const T* bias, const Shape& s,
                const Layout<T>& lay, T* z) {
  for (int64_t ho = 0; ho < s.h; ++ho) {
    T* zr = z + ho * lay.zlen;
    for (int64_t j = 0; j < s.n; ++j) zr[j] = bias[ho];
    for (int64_t hi = 0; hi < s.h; ++hi) {
      for (int64_t di = 0; di < s.k; ++di) {
        const T* src = rows[di] + hi * head_stride;
        for (int64_t dj = 0; dj < s.k; ++dj) {
          const T w = weight[((ho * s.h + hi) * s.k + di) * s.k + dj];
          for (int64_t j = 0; j < s.n; ++j) zr[j] += w * src[j + dj];
        }
      }
    }
  }
}

// Z rows from the band of M (the forward direction, p's own weights).
template <typename T, dynkernels::CpuIsa kIsa>
DK_INLINE void conv_band(const Problem<T>& p, const Layout<T>& lay, const T* const* rows, int64_t head_stride,
                         bool finite, T* z) {
  if (finite) {
    conv_all<T, kIsa>(p, lay, rows, head_stride, z);
  } else {
    conv_plain(rows, head_stride, p.weight, p.bias_padded, p.s, lay, z);
  }
}

template <typename T, dynkernels::CpuIsa kIsa>
DK_INLINE void forward_rows(const Problem<T>* pp, int64_t begin, int64_t end, T* evolved, T* probs) {
  const Problem<T>& p = *pp;
  const Shape& s = p.s;
  RowScratch<T> w(s);
  const Layout<T>& lay = w.lay;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / s.n, i = task % s.n;
    const bool finite = w.band.load(p.logits, p.prev, p.w_prev, b, i, w.rows);
    conv_band<T, kIsa>(p, lay, w.rows, w.band.head_stride(), finite, w.z.data());
    for (int64_t ho = 0; ho < s.h; ++ho) {
      const T* zr = w.z.data() + ho * lay.zlen;
      const T* m = w.rows[s.r] + ho * w.band.head_stride() + s.r;
      const int64_t off = ((b * s.h + ho) * s.n + i) * s.n;
      evolve_softmax_row(zr, m, p.w_conv, p.act, p.slope, mask_row<T>(p.mask, b, ho, i), p.mask.sj, s.n, evolved + off,
                         probs + off);
    }
  }
}
DK_ISA_DISPATCH(forward_rows)

template <typename T>
void forward(const Problem<T>& p, T* evolved, T* probs) {
  at::parallel_for(0, p.s.b * p.s.n, 4, [&](int64_t begin, int64_t end) {
    forward_rows_isa<T>(&p, begin, end, evolved, probs);
  });
}

// Rows per chunk of the parameter-gradient reduction: fixed, so the sums do
// not depend on the thread count.
constexpr int64_t kChunkRows = 32;

// lanes[(ho * taps + t) * L + u] += sum over j = u (mod L) of dz[ho][j] * row(t)[j + dj]
// for the kHeads heads from h0 (dz rows dz_stride apart, zero past N, so whole
// vectors are summed). Register block: kHeads heads x KB taps along the row
// (KB = K when K is the template's, else 1), so each source load feeds
// kHeads FMAs and each dZ load KB.
template <typename T, int64_t KB>
DK_INLINE void weight_grad_heads(const T* const* rows, int64_t head_stride, const T* dz, int64_t dz_stride, int64_t h0,
                                 const Shape& s, const Layout<T>& lay, T* lanes) {
  typedef typename Simd<T>::V V;
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t taps = s.h * s.k * s.k, heads = std::min(kHeads, s.h - h0), used = round_up(s.n, L);
  const T* dzg = dz + h0 * dz_stride;
  for (int64_t hi = 0; hi < s.h; ++hi) {
    for (int64_t di = 0; di < s.k; ++di) {
      const T* src = rows[di] + hi * head_stride;
      for (int64_t dj0 = 0; dj0 < s.k; dj0 += KB) {
        V acc[kHeads][KB];
        for (int64_t q = 0; q < kHeads; ++q) {
          for (int64_t e = 0; e < KB; ++e) acc[q][e] = V{};
        }
        for (int64_t j = 0; j < used; j += L) {
          V x[KB];
          for (int64_t e = 0; e < KB; ++e) x[e] = vload(src + dj0 + e + j);
          for (int64_t q = 0; q < kHeads; ++q) {
            const V d = vload(dzg + q * dz_stride + j);
            for (int64_t e = 0; e < KB; ++e) acc[q][e] += d * x[e];
          }
        }
        for (int64_t q = 0; q < kHeads; ++q) {  // constant bounds keep acc in registers
          if (q >= heads) break;
          for (int64_t e = 0; e < KB; ++e) {
            T* dst = lanes + ((h0 + q) * taps + (hi * s.k + di) * s.k + dj0 + e) * L;
            vstore(dst, vload(dst) + acc[q][e]);
          }
        }
      }
    }
  }
}

template <typename T>
DK_INLINE void weight_grad_group(const T* const* rows, int64_t head_stride, const T* dz, int64_t dz_stride, int64_t h0,
                                 const Shape& s, const Layout<T>& lay, T* lanes) {
  if (s.k == 3) {
    weight_grad_heads<T, 3>(rows, head_stride, dz, dz_stride, h0, s, lay, lanes);
  } else {
    weight_grad_heads<T, 1>(rows, head_stride, dz, dz_stride, h0, s, lay, lanes);
  }
}

// The backward, one sweep per fixed chunk of query rows [t0, t1):
//   for u = t0 - r .. t1 + r - 1 (flat rows; the r rows on each side are a
//   halo, recomputed by both neighbouring chunks):
//     Z(u) recomputed from the M band; dA = gA + P (gP - <gP, P>);
//     dZ(u) = w_conv dA act'(Z) into the dZ ring; for own rows also
//     d_logits(u) = (1 - w_conv) dA and the chunk's dW / dbias partial.
//   then, once dZ rows v - r .. v + r are in the ring, row v = u - r (own rows):
//     dM(v) = d_logits(v) + conv(dZ, W')(v), W'[hi, ho, a, c] =
//     W[ho, hi, K-1-a, K-1-c] (heads swapped, taps flipped: the transposed
//     convolution as a forward one, in tp.packed); dS = (1 - w_prev) dM,
//     dA_prev = w_prev dM.
// No (B, H, N, N) scratch: dZ lives in a K-row ring. Partials: (wsize + H) * L
// lanes per chunk, summed afterwards in chunk order (deterministic).
template <typename T, dynkernels::CpuIsa kIsa>
DK_INLINE void backward_chunks(const Problem<T>* pp, const Problem<T>* tpp, int64_t begin, int64_t end, T* d_logits,
                               T* d_prev, T* partial) {
  const Problem<T>& p = *pp;
  const Problem<T>& tp = *tpp;
  constexpr int64_t L = Simd<T>::kLanes;
  const Shape& s = p.s;
  const int64_t rows_total = s.b * s.n, wsize = s.h * s.h * s.k * s.k;
  RowScratch<T> w(s);
  const Layout<T>& lay = w.lay;
  DzRing<T> ring(s, lay);
  std::vector<T> da(s.n);
  const T* dz_rows[kMaxKernel];
  // act'(Z) without recomputing Z: identity needs none; with w_conv = 1, A is
  // act(Z) exactly, and ReLU / LeakyReLU (slope > 0) keep Z's sign.
  const bool from_a = p.act == kIdentity || (p.w_conv == T(1) && (p.act == kRelu || (p.act == kLeakyRelu && p.slope > T(0))));
  for (int64_t c = begin; c < end; ++c) {
    T* lanes = partial + c * (wsize + s.h) * L;
    const int64_t t0 = c * kChunkRows, t1 = std::min(rows_total, t0 + kChunkRows);
    for (int64_t u = std::max<int64_t>(0, t0 - s.r); u < t1 + s.r; ++u) {
      const bool own = u >= t0 && u < t1;
      if (u < rows_total) {
        const int64_t b = u / s.n, i = u % s.n;
        const bool finite = w.band.load(p.logits, p.prev, p.w_prev, b, i, w.rows);
        T* dz = ring.row(u);
        if (!from_a) conv_band<T, kIsa>(p, lay, w.rows, w.band.head_stride(), finite, w.z.data());
        for (int64_t ho = 0; ho < s.h; ++ho) {
          const int64_t off = ((b * s.h + ho) * s.n + i) * s.n;
          for (int64_t j = 0; j < s.n; ++j) da[j] = p.grad_evolved == nullptr ? T(0) : p.grad_evolved[off + j];
          if (p.grad_probs != nullptr) {
            const T* mrow = mask_row<T>(p.mask, b, ho, i);
            if (mrow == nullptr) {
              const T dot = dot_lanes(p.grad_probs + off, p.probs + off, s.n);
              for (int64_t j = 0; j < s.n; ++j) da[j] += p.probs[off + j] * (p.grad_probs[off + j] - dot);
            } else {
              softmax_grad_masked(p.grad_probs + off, p.probs + off, mrow, p.mask.sj, s.n, da.data());
            }
          }
          const T* zr = from_a ? p.evolved + off : w.z.data() + ho * lay.zlen;
          T* dzr = dz + ho * ring.head_stride();
          for (int64_t j = 0; j < s.n; ++j) dzr[j] = p.w_conv * da[j] * activate_grad(zr[j], p.act, p.slope);
          if (!own) continue;
          T* dm = d_logits + off;
          for (int64_t j = 0; j < s.n; ++j) dm[j] = (T(1) - p.w_conv) * da[j];
          typename Simd<T>::V bias_lanes = vload(lanes + (wsize + ho) * L);
          for (int64_t j = 0; j < round_up(s.n, L); j += L) bias_lanes += vload(dzr + j);  // zero past N
          vstore(lanes + (wsize + ho) * L, bias_lanes);
        }
        ring.finish(u);
        if (own) {
          for (int64_t h0 = 0; h0 < s.h; h0 += kHeads) {
            weight_grad_group(w.rows, w.band.head_stride(), dz, ring.head_stride(), h0, s, lay, lanes);
          }
        }
      }
      const int64_t v = u - s.r;
      if (v < t0 || v >= t1) continue;
      const int64_t b = v / s.n, i = v % s.n;
      ring.rows_for(b, i, dz_rows);
      conv_all<T, kIsa>(tp, lay, dz_rows, ring.head_stride(), w.z.data());
      for (int64_t hi = 0; hi < s.h; ++hi) {
        const T* zr = w.z.data() + hi * lay.zlen;
        const int64_t off = ((b * s.h + hi) * s.n + i) * s.n;
        T* dm = d_logits + off;
        if (d_prev == nullptr) {
          for (int64_t j = 0; j < s.n; ++j) dm[j] += zr[j];
          continue;
        }
        T* dp = d_prev + off;
        for (int64_t j = 0; j < s.n; ++j) {
          const T total = dm[j] + zr[j];
          dp[j] = p.w_prev * total;
          dm[j] = (T(1) - p.w_prev) * total;
        }
      }
    }
  }
}
DK_ISA_DISPATCH(backward_chunks)

template <typename T>
void backward(const Problem<T>& p, T* d_logits, T* d_prev, T* d_weight, T* d_bias) {
  constexpr int64_t L = Simd<T>::kLanes;
  const Shape& s = p.s;
  const int64_t rows = s.b * s.n, wsize = s.h * s.h * s.k * s.k;
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  std::vector<T> partial(static_cast<size_t>(chunks * (wsize + s.h) * L), T(0));
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
  const std::vector<T> packed_flipped = pack_weights(flipped.data(), s, Layout<T>(s)), zeros = padded_bias<T>(nullptr, s);
  Problem<T> tp = p;
  tp.packed = packed_flipped.data();
  tp.bias_padded = zeros.data();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    backward_chunks_isa<T>(&p, &tp, begin, end, d_logits, d_prev, partial.data());
  });
  // Lanes, then chunks, in a fixed order: deterministic for any thread count.
  std::fill(d_weight, d_weight + wsize, T(0));
  if (d_bias != nullptr) std::fill(d_bias, d_bias + s.h, T(0));
  for (int64_t c = 0; c < chunks; ++c) {
    const T* lanes = partial.data() + c * (wsize + s.h) * L;
    for (int64_t e = 0; e < wsize; ++e) {
      T sum = T(0);
      for (int64_t u = 0; u < L; ++u) sum += lanes[e * L + u];
      d_weight[e] += sum;
    }
    if (d_bias != nullptr) {
      for (int64_t h = 0; h < s.h; ++h) {
        T sum = T(0);
        for (int64_t u = 0; u < L; ++u) sum += lanes[(wsize + h) * L + u];
        d_bias[h] += sum;
      }
    }
  }
}

Shape check_args(const at::Tensor& logits, const c10::optional<at::Tensor>& prev, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask) {
  DK_CHECK_CPU(logits);
  const auto dims = dynkernels::evolving::check_args(logits, prev, weight, bias, mask);
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "evolve_attention_logits on CPU takes float32 or float64, got ", logits.scalar_type());
  return {dims[0], dims[1], dims[2], dims[3], dims[3] / 2};
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
    Problem<scalar_t> p{logits.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(prev),
                              weight.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias), nullptr, nullptr,
                              nullptr, mv, static_cast<scalar_t>(w_prev), static_cast<scalar_t>(w_conv),
                              static_cast<scalar_t>(negative_slope), activation, s, nullptr, nullptr, nullptr};
    const std::vector<scalar_t> packed = pack_weights(p.weight, s, Layout<scalar_t>(s)), bias_pad = padded_bias(p.bias, s);
    p.packed = packed.data();
    p.bias_padded = bias_pad.data();
    forward(p, evolved.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>());
  });
  return {evolved, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> evolve_attention_logits_backward_cpu(
    const c10::optional<at::Tensor>& grad_evolved, const c10::optional<at::Tensor>& grad_probs,
    const at::Tensor& logits_in, const c10::optional<at::Tensor>& prev_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& probs_in, const at::Tensor& evolved_in, double w_prev,
    double w_conv, int64_t activation, double negative_slope, const c10::optional<at::Tensor>& mask) {
  const Shape s = check_args(logits_in, prev_in, weight_in, bias_in, mask);
  TORCH_CHECK(probs_in.sizes() == logits_in.sizes() && evolved_in.sizes() == logits_in.sizes(),
              "probs and evolved must match logits");
  at::Tensor logits = logits_in.contiguous(), weight = weight_in.contiguous(), probs = probs_in.contiguous();
  at::Tensor evolved = evolved_in.contiguous();
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
    Problem<scalar_t> p{logits.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(prev),
                              weight.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias),
                              probs.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(ge), ptr_or_null<scalar_t>(gp),
                              mask_view(mask), static_cast<scalar_t>(w_prev), static_cast<scalar_t>(w_conv),
                              static_cast<scalar_t>(negative_slope), activation, s, nullptr, nullptr, nullptr};
    const std::vector<scalar_t> packed = pack_weights(p.weight, s, Layout<scalar_t>(s)), bias_pad = padded_bias(p.bias, s);
    p.packed = packed.data();
    p.bias_padded = bias_pad.data();
    p.evolved = evolved.const_data_ptr<scalar_t>();
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
