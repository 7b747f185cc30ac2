// Auto Seg-Loss's region surrogates, CPU: the per-class statistics of one
// pass over the logits, and the gradient of one recomputing pass (see
// dynkernels/ops/auto_seg_loss.py). Nothing of pixel size is stored.
//
// logits z (N, C, H, W), labels l (N, H, W), optional region r (N, H, W) uint8
// (BIoU's trimap), curves h1 (theta_i) and h2 (theta_u, may be empty). At a
// pixel with m = [l in [0, C), l != ignore_index] * r and s = softmax(z):
//   stats[0, c] = sum m h1(s_c) [l == c]      (the intersection)
//   stats[1, c] = sum m h2(s_c) [l != c]      (the union's predicted part)
//   stats[2, c] = sum m [l == c]              (the class's pixel count)
// Backward, from G = dL/dstats[0..1]: g_c = m (G0_c h1'(s_c) [l == c] +
// G1_c h2'(s_c) [l != c]), dz_c = s_c (g_c - sum_k s_k g_k).
//
// h is the piecewise quadratic Bezier curve; on a piece from A through Q to B,
// x' = (x - A_x) / (B_x - A_x), q = (Q_x - A_x) / (B_x - A_x), the official
// root t = (q - sqrt(D)) / (2q - 1), D = q^2 + (1 - 2q) x', is evaluated as
// t = x' / (q + sqrt(D)) (no cancellation, no special case at q = 0.5; t = 0
// where q + sqrt(D) = 0, i.e. q = x' = 0; t = 1 where x >= B_x), y = (1 - t)^2
// A_y + 2 t (1 - t) Q_y + t^2 B_y (so h(0) = 0 and h(1) = 1 exactly), and h' = dy/dt / (2 sqrt(D) (B_x - A_x)) (dx'/dt = 2
// sqrt(D)); h' = 0 where D = 0 (an end of a piece whose slope is infinite:
// the official gradient is inf or NaN there). Pieces are selected as the
// official code does: the first with x <= B_x, later ones with A_x < x <= B_x.
//
// Pixels are cut into fixed blocks; each block's sums (one float per class
// and tile lane, then double) land in its own slot, and slots are added in block order, so
// the result is the same for any thread count. Accumulates in float for
// float / half / bfloat16 logits, in double for double.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <type_traits>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/cpu_math.h"

namespace {

constexpr int64_t kTile = 32;      // pixels whose class values sit in registers / L1 together
constexpr int64_t kBlock = 4096;   // pixels per deterministic partial sum
constexpr int kMaxPieces = 16;

template <typename A>
struct Curve {
  int pieces = 0;
  A ax[kMaxPieces], ay[kMaxPieces], qy[kMaxPieces], bx[kMaxPieces], by[kMaxPieces];
  A q[kMaxPieces], inv_w[kMaxPieces];

  explicit Curve(const at::Tensor& theta) {
    if (theta.numel() == 0) return;
    const at::Tensor t = theta.to(at::kDouble).contiguous();
    const double* v = t.data_ptr<double>();
    const int64_t n = t.numel();
    TORCH_CHECK(n % 4 == 2 && (n + 2) / 4 <= kMaxPieces, "theta must hold 4M - 2 numbers (M <= ", kMaxPieces,
                "), got ", n);
    pieces = static_cast<int>((n + 2) / 4);
    std::vector<double> cp(n + 4, 0.0);
    for (int64_t i = 0; i < n; ++i) cp[i + 2] = v[i];
    cp[n + 2] = 1.0;
    cp[n + 3] = 1.0;
    for (int k = 0; k < pieces; ++k) {
      const double* p = cp.data() + 4 * k;  // A = p[0..1], Q = p[2..3], B = p[4..5]
      ax[k] = A(p[0]);
      ay[k] = A(p[1]);
      qy[k] = A(p[3]);
      bx[k] = A(p[4]);
      by[k] = A(p[5]);
      q[k] = A((p[2] - p[0]) / (p[4] - p[0]));
      inv_w[k] = A(1.0 / (p[4] - p[0]));
    }
  }
};

// h(x), and h'(x) when SLOPE. P > 0: the curve has P pieces (the piece loop
// unrolls); P = 0: c.pieces at run time.
template <int P, bool SLOPE, typename A>
DK_INLINE A curve_eval(const Curve<A>& c, A x, A& slope) {
  A pax = c.ax[0], pay = c.ay[0], pqy = c.qy[0], pbx = c.bx[0], pby = c.by[0], pq = c.q[0], pinv = c.inv_w[0];
  const int pieces = P > 0 ? P : c.pieces;
  // selects, so that loops over pixels vectorise; unrolled before the vectoriser
  // looks (a loop left inside the pixel loop blocks it)
#pragma GCC unroll 16
  for (int k = 1; k < pieces; ++k) {
    const bool in = x > c.ax[k];
    pax = in ? c.ax[k] : pax;
    pay = in ? c.ay[k] : pay;
    pqy = in ? c.qy[k] : pqy;
    pbx = in ? c.bx[k] : pbx;
    pby = in ? c.by[k] : pby;
    pq = in ? c.q[k] : pq;
    pinv = in ? c.inv_w[k] : pinv;
  }
  const A xn = (x - pax) * pinv;
  A d = pq * pq + (A(1) - A(2) * pq) * xn;
  d = d > A(0) ? d : A(0);
  const A root = std::sqrt(d);
  const A den = pq + root;
  A t = xn / (den > A(0) ? den : A(1));
  t = den > A(0) ? t : A(0);
  t = x >= pbx ? A(1) : t;  // exactly 1 at the piece's end (x' may round under 1)
  const A u = A(1) - t;
  if (SLOPE) {
    const A dydt = A(2) * u * (pqy - pay) + A(2) * t * (pby - pqy);
    const A s = dydt * pinv / (A(2) * (root > A(0) ? root : A(1)));
    slope = root > A(0) ? s : A(0);
  }
  return u * (u * pay + A(2) * t * pqy) + t * t * pby;  // Bernstein form: exactly A_y at t = 0, B_y at t = 1
}

template <typename L>
DK_INLINE int32_t class_of(L label, int64_t classes, int64_t ignore_index) {
  const int64_t v = static_cast<int64_t>(label);
  return (v >= 0 && v < classes && v != ignore_index) ? static_cast<int32_t>(v) : -1;
}

// per pixel of the tile: its class, or -1 where m = 0 (and for the tile's padding)
DK_INLINE void tile_classes(const void* labels, at::ScalarType kind, const uint8_t* region, int64_t classes,
                            int64_t ignore_index, int64_t count, int32_t* cls) {
  for (int64_t p = 0; p < kTile; ++p) cls[p] = -1;
  for (int64_t p = 0; p < count; ++p) {
    int32_t v;
    if (kind == at::kLong) v = class_of(static_cast<const int64_t*>(labels)[p], classes, ignore_index);
    else if (kind == at::kInt) v = class_of(static_cast<const int32_t*>(labels)[p], classes, ignore_index);
    else v = class_of(static_cast<const uint8_t*>(labels)[p], classes, ignore_index);
    cls[p] = (region == nullptr || region[p] != 0) ? v : -1;
  }
}

// softmax over classes of a tile of `count` pixels: s[c * kTile + p] (0 past count)
template <typename T, typename A>
DK_INLINE void tile_softmax(const T* z, int64_t hw, int64_t classes, int64_t count, A* s) {
  A mx[kTile], total[kTile];
  for (int64_t c = 0; c < classes; ++c) {
    const T* zc = z + c * hw;
    A* sc = s + c * kTile;
    for (int64_t p = 0; p < count; ++p) sc[p] = A(zc[p]);
    for (int64_t p = count; p < kTile; ++p) sc[p] = A(0);
  }
  for (int64_t p = 0; p < kTile; ++p) {
    mx[p] = s[p];
    total[p] = A(0);
  }
  for (int64_t c = 1; c < classes; ++c) {
    const A* sc = s + c * kTile;
    for (int64_t p = 0; p < kTile; ++p) mx[p] = sc[p] > mx[p] ? sc[p] : mx[p];
  }
  for (int64_t c = 0; c < classes; ++c) {
    A* sc = s + c * kTile;
    for (int64_t p = 0; p < kTile; ++p) {
      sc[p] = dynkernels::exp_approx(sc[p] - mx[p]);
      total[p] += sc[p];
    }
  }
  for (int64_t p = 0; p < kTile; ++p) total[p] = A(1) / total[p];
  for (int64_t c = 0; c < classes; ++c) {
    A* sc = s + c * kTile;
    for (int64_t p = 0; p < kTile; ++p) sc[p] *= total[p];
  }
}

template <typename A>
struct Work {  // one call's constants, passed by pointer to the ISA workers
  const Curve<A>* h1;
  const Curve<A>* h2;
  const void* labels;
  at::ScalarType label_kind;
  const uint8_t* region;
  int64_t classes, hw, ignore_index;
};

// one block's sums: per class and lane in `lanes` (3 x C x kTile), then in
// double, in order, into acc (3 x C)
template <typename T, int P, bool U>
DK_INLINE void stats_block_body(const T* logits, const Work<at::opmath_type<T>>& w, int64_t img, int64_t start,
                                int64_t stop, at::opmath_type<T>* s, at::opmath_type<T>* lanes, double* acc) {
  using A = at::opmath_type<T>;
  const int64_t classes = w.classes, hw = w.hw;
  const Curve<A> c1 = *w.h1, c2 = *w.h2;  // locals: no loads the pixel loop's stores might alias
  for (int64_t i = 0; i < 3 * classes * kTile; ++i) lanes[i] = A(0);
  for (int64_t p0 = start; p0 < stop; p0 += kTile) {
    const int64_t count = std::min(kTile, stop - p0);
    int32_t cls[kTile];
    const int64_t at = img * hw + p0;
    tile_classes(static_cast<const char*>(w.labels) + at * c10::elementSize(w.label_kind), w.label_kind,
                 w.region == nullptr ? nullptr : w.region + at, classes, w.ignore_index, count, cls);
    tile_softmax(logits + img * classes * hw + p0, hw, classes, count, s);
    for (int64_t c = 0; c < classes; ++c) {
      const A* __restrict__ sc = s + c * kTile;
      A* __restrict__ li = lanes + c * kTile;
      A* __restrict__ lu = lanes + (classes + c) * kTile;
      A* __restrict__ lc = lanes + (2 * classes + c) * kTile;
      const int32_t cc = static_cast<int32_t>(c);
      for (int64_t p = 0; p < kTile; ++p) {
        A unused;
        const A h1 = curve_eval<P, false>(c1, sc[p], unused);
        li[p] += cls[p] == cc ? h1 : A(0);
        lc[p] += cls[p] == cc ? A(1) : A(0);
        if (U) {
          const A h2 = curve_eval<P, false>(c2, sc[p], unused);
          lu[p] += (cls[p] >= 0 && cls[p] != cc) ? h2 : A(0);
        }
      }
    }
  }
  for (int64_t i = 0; i < 3 * classes; ++i) {
    double sum = 0.0;
    for (int64_t p = 0; p < kTile; ++p) sum += double(lanes[i * kTile + p]);
    acc[i] = sum;
  }
}

template <typename T, int P, bool U>
DK_INLINE void backward_tile_body(const double* grad, const T* logits, const Work<at::opmath_type<T>>& w, int64_t img,
                                  int64_t p0, at::opmath_type<T>* s, at::opmath_type<T>* g, T* out) {
  using A = at::opmath_type<T>;
  const int64_t classes = w.classes, hw = w.hw;
  const int64_t count = std::min(kTile, hw - p0);
  int32_t cls[kTile];
  const int64_t at = img * hw + p0;
  tile_classes(static_cast<const char*>(w.labels) + at * c10::elementSize(w.label_kind), w.label_kind,
               w.region == nullptr ? nullptr : w.region + at, classes, w.ignore_index, count, cls);
  const int64_t offset = img * classes * hw + p0;
  tile_softmax(logits + offset, hw, classes, count, s);
  const Curve<A> c1 = *w.h1, c2 = *w.h2;  // locals: no loads the pixel loop's stores might alias
  A dot[kTile];
  for (int64_t p = 0; p < kTile; ++p) dot[p] = A(0);
  for (int64_t c = 0; c < classes; ++c) {
    const A* __restrict__ sc = s + c * kTile;
    A* __restrict__ gc = g + c * kTile;
    const A g_inter = A(grad[c]), g_rest = A(grad[classes + c]);
    const int32_t cc = static_cast<int32_t>(c);
    for (int64_t p = 0; p < kTile; ++p) {
      A slope1 = 0, slope2 = 0;
      curve_eval<P, true>(c1, sc[p], slope1);
      A v = cls[p] == cc ? g_inter * slope1 : A(0);
      if (U) {
        curve_eval<P, true>(c2, sc[p], slope2);
        v += (cls[p] >= 0 && cls[p] != cc) ? g_rest * slope2 : A(0);
      }
      gc[p] = v;
      dot[p] += sc[p] * v;
    }
  }
  for (int64_t c = 0; c < classes; ++c) {
    const A* sc = s + c * kTile;
    const A* gc = g + c * kTile;
    T* oc = out + offset + c * hw;
    for (int64_t p = 0; p < count; ++p) oc[p] = T(sc[p] * (gc[p] - dot[p]));
  }
}

// the curves' piece count as a template argument where it is 1 or 2 (every official preset)
template <typename F>
DK_INLINE void with_pieces(int p1, int p2, F&& body) {
  const bool u = p2 > 0;
  const int p = (p1 == p2 || !u) ? p1 : 0;
  if (p == 1) {
    if (u) body(std::integral_constant<int, 1>{}, std::true_type{});
    else body(std::integral_constant<int, 1>{}, std::false_type{});
  } else if (p == 2) {
    if (u) body(std::integral_constant<int, 2>{}, std::true_type{});
    else body(std::integral_constant<int, 2>{}, std::false_type{});
  } else {
    if (u) body(std::integral_constant<int, 0>{}, std::true_type{});
    else body(std::integral_constant<int, 0>{}, std::false_type{});
  }
}

template <typename T, dynkernels::CpuIsa I>
DK_INLINE void stats_block(const T* logits, const Work<at::opmath_type<T>>* w, int64_t img, int64_t start,
                           int64_t stop, at::opmath_type<T>* s, at::opmath_type<T>* lanes, double* acc) {
  with_pieces(w->h1->pieces, w->h2->pieces, [&](auto p, auto u) {
    stats_block_body<T, decltype(p)::value, decltype(u)::value>(logits, *w, img, start, stop, s, lanes, acc);
  });
}
DK_ISA_DISPATCH(stats_block)

template <typename T, dynkernels::CpuIsa I>
DK_INLINE void backward_tiles(const double* grad, const T* logits, const Work<at::opmath_type<T>>* w, int64_t begin,
                              int64_t end, int64_t tiles_per_image, at::opmath_type<T>* s, at::opmath_type<T>* g,
                              T* out) {
  with_pieces(w->h1->pieces, w->h2->pieces, [&](auto p, auto u) {
    for (int64_t tile = begin; tile < end; ++tile) {
      backward_tile_body<T, decltype(p)::value, decltype(u)::value>(
          grad, logits, *w, tile / tiles_per_image, (tile % tiles_per_image) * kTile, s, g, out);
    }
  });
}
DK_ISA_DISPATCH(backward_tiles)

template <typename T>
void stats_kernel(const T* logits, const Work<at::opmath_type<T>>& w, int64_t n, double* out) {
  using A = at::opmath_type<T>;
  const int64_t classes = w.classes;
  const int64_t blocks_per_image = (w.hw + kBlock - 1) / kBlock, blocks = n * blocks_per_image;
  std::vector<double> partial(static_cast<size_t>(blocks) * 3 * classes, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> s(classes * kTile), lanes(3 * classes * kTile);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t img = block / blocks_per_image, start = (block % blocks_per_image) * kBlock;
      stats_block_isa<T>(logits, &w, img, start, std::min(w.hw, start + kBlock), s.data(), lanes.data(),
                         partial.data() + block * 3 * classes);
    }
  });
  for (int64_t i = 0; i < 3 * classes; ++i) out[i] = 0.0;
  for (int64_t block = 0; block < blocks; ++block)
    for (int64_t i = 0; i < 3 * classes; ++i) out[i] += partial[block * 3 * classes + i];
}

template <typename T>
void backward_kernel(const double* grad, const T* logits, const Work<at::opmath_type<T>>& w, int64_t n, T* out) {
  using A = at::opmath_type<T>;
  const int64_t tiles_per_image = (w.hw + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles_per_image, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> s(w.classes * kTile), g(w.classes * kTile);
    backward_tiles_isa<T>(grad, logits, &w, begin, end, tiles_per_image, s.data(), g.data(), out);
  });
}

void check_inputs(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& region,
                  const at::Tensor& theta_i, const at::Tensor& theta_u) {
  DK_CHECK_CPU(logits);
  DK_CHECK_CPU(target);
  DK_CHECK_DIM(logits, 4);
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "logits must be floating, got ", logits.scalar_type());
  TORCH_CHECK(target.dim() == 3 && target.size(0) == logits.size(0) && target.size(1) == logits.size(2) &&
                  target.size(2) == logits.size(3),
              "target must be (N, H, W) matching logits ", logits.sizes(), ", got ", target.sizes());
  const auto kind = target.scalar_type();
  TORCH_CHECK(kind == at::kLong || kind == at::kInt || kind == at::kByte, "target must be int64, int32 or uint8, got ",
              kind);
  if (region.has_value()) {
    DK_CHECK_CPU((*region));
    TORCH_CHECK(region->scalar_type() == at::kByte && region->sizes() == target.sizes(),
                "region must be uint8 of the target's shape ", target.sizes());
  }
  TORCH_CHECK(theta_i.numel() > 0, "theta_i must not be empty");
  TORCH_CHECK(theta_i.device().is_cpu() && theta_u.device().is_cpu(), "theta must be CPU tensors");
}

at::Tensor surrogate_stats_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                               const std::optional<at::Tensor>& region_in, const at::Tensor& theta_i,
                               const at::Tensor& theta_u, int64_t ignore_index) {
  check_inputs(logits_in, target_in, region_in, theta_i, theta_u);
  const at::Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const at::Tensor region = region_in.has_value() ? region_in->contiguous() : at::Tensor();
  const int64_t n = logits.size(0), classes = logits.size(1), hw = logits.size(2) * logits.size(3);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sums = at::empty({3, classes}, logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "surrogate_stats", [&] {
    using A = at::opmath_type<scalar_t>;
    const Curve<A> h1(theta_i), h2(theta_u);
    const Work<A> w{&h1, &h2, target.data_ptr(), target.scalar_type(),
                    region.defined() ? region.data_ptr<uint8_t>() : nullptr, classes, hw, ignore_index};
    stats_kernel<scalar_t>(logits.data_ptr<scalar_t>(), w, n, sums.data_ptr<double>());
  });
  return sums.to(acc_type);
}

at::Tensor surrogate_stats_backward_cpu(const at::Tensor& grad, const at::Tensor& logits_in,
                                        const at::Tensor& target_in, const std::optional<at::Tensor>& region_in,
                                        const at::Tensor& theta_i, const at::Tensor& theta_u, int64_t ignore_index) {
  check_inputs(logits_in, target_in, region_in, theta_i, theta_u);
  const at::Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const at::Tensor region = region_in.has_value() ? region_in->contiguous() : at::Tensor();
  const int64_t n = logits.size(0), classes = logits.size(1), hw = logits.size(2) * logits.size(3);
  TORCH_CHECK(grad.numel() == 3 * classes, "grad must be (3, C), got ", grad.sizes());
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "surrogate_stats_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const Curve<A> h1(theta_i), h2(theta_u);
    const Work<A> w{&h1, &h2, target.data_ptr(), target.scalar_type(),
                    region.defined() ? region.data_ptr<uint8_t>() : nullptr, classes, hw, ignore_index};
    backward_kernel<scalar_t>(g.data_ptr<double>(), logits.data_ptr<scalar_t>(), w, n, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("surrogate_stats", &surrogate_stats_cpu);
  m.impl("surrogate_stats_backward", &surrogate_stats_backward_cpu);
}
