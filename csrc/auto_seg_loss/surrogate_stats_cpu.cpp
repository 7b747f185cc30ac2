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
// Pixels are cut into fixed blocks; each block's sums (float lanes per tile,
// then double) land in its own slot, and slots are added in block order, so
// the result is the same for any thread count. Accumulates in float for
// float / half / bfloat16 logits, in double for double.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
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

  // h(x), and h'(x) in *slope when slope != nullptr
  inline A eval(A x, A* slope) const {
    A pax = ax[0], pay = ay[0], pqy = qy[0], pbx = bx[0], pby = by[0], pq = q[0], pinv = inv_w[0];
    for (int k = 1; k < pieces; ++k) {  // selects, so that loops over pixels vectorise
      const bool in = x > ax[k];
      pax = in ? ax[k] : pax;
      pay = in ? ay[k] : pay;
      pqy = in ? qy[k] : pqy;
      pbx = in ? bx[k] : pbx;
      pby = in ? by[k] : pby;
      pq = in ? q[k] : pq;
      pinv = in ? inv_w[k] : pinv;
    }
    const A xn = (x - pax) * pinv;
    A d = pq * pq + (A(1) - A(2) * pq) * xn;
    d = d > A(0) ? d : A(0);
    const A root = std::sqrt(d);
    const A den = pq + root;
    A t = den > A(0) ? xn / den : A(0);
    t = x >= pbx ? A(1) : t;  // exactly 1 at the piece's end (x' may round under 1)
    const A u = A(1) - t;
    if (slope != nullptr) {
      const A dydt = A(2) * u * (pqy - pay) + A(2) * t * (pby - pqy);
      *slope = root > A(0) ? dydt * pinv / (A(2) * root) : A(0);
    }
    return u * (u * pay + A(2) * t * pqy) + t * t * pby;  // Bernstein form: exactly A_y at t = 0, B_y at t = 1
  }
};

template <typename L>
inline bool pixel_valid(L label, int64_t classes, int64_t ignore_index) {
  const int64_t v = static_cast<int64_t>(label);
  return v >= 0 && v < classes && v != ignore_index;
}

// softmax over classes of a tile of `count` pixels: s[c * kTile + p]
template <typename T, typename A>
inline void tile_softmax(const T* z, int64_t hw, int64_t classes, int64_t count, A* s) {
  A mx[kTile], total[kTile];
  for (int64_t p = 0; p < kTile; ++p) {
    mx[p] = p < count ? A(z[p]) : A(0);
    total[p] = A(0);
  }
  for (int64_t c = 1; c < classes; ++c) {
    const T* zc = z + c * hw;
    for (int64_t p = 0; p < count; ++p) mx[p] = A(zc[p]) > mx[p] ? A(zc[p]) : mx[p];
  }
  for (int64_t c = 0; c < classes; ++c) {
    const T* zc = z + c * hw;
    A* sc = s + c * kTile;
    for (int64_t p = 0; p < count; ++p) {
      sc[p] = dynkernels::exp_approx(A(zc[p]) - mx[p]);
      total[p] += sc[p];
    }
  }
  for (int64_t p = 0; p < count; ++p) total[p] = A(1) / total[p];
  for (int64_t c = 0; c < classes; ++c) {
    A* sc = s + c * kTile;
    for (int64_t p = 0; p < count; ++p) sc[p] *= total[p];
  }
}

// per pixel of the tile: its class (or -1 where m = 0)
template <typename L>
inline void tile_classes(const L* labels, const uint8_t* region, int64_t classes, int64_t ignore_index, int64_t count,
                         int32_t* cls) {
  for (int64_t p = 0; p < count; ++p) {
    const bool keep = pixel_valid(labels[p], classes, ignore_index) && (region == nullptr || region[p] != 0);
    cls[p] = keep ? static_cast<int32_t>(labels[p]) : -1;
  }
}

template <typename T, typename L>
void stats_kernel(const T* logits, const L* labels, const uint8_t* region, const Curve<at::opmath_type<T>>& h1,
                  const Curve<at::opmath_type<T>>& h2, int64_t n, int64_t classes, int64_t hw, int64_t ignore_index,
                  double* out) {
  using A = at::opmath_type<T>;
  const int64_t blocks_per_image = (hw + kBlock - 1) / kBlock, blocks = n * blocks_per_image;
  std::vector<double> partial(static_cast<size_t>(blocks) * 3 * classes, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> s(classes * kTile);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t img = block / blocks_per_image, start = (block % blocks_per_image) * kBlock;
      const int64_t stop = std::min(hw, start + kBlock);
      double* acc = partial.data() + block * 3 * classes;
      for (int64_t p0 = start; p0 < stop; p0 += kTile) {
        const int64_t count = std::min(kTile, stop - p0);
        int32_t cls[kTile];
        tile_classes(labels + img * hw + p0, region == nullptr ? nullptr : region + img * hw + p0, classes,
                     ignore_index, count, cls);
        tile_softmax(logits + img * classes * hw + p0, hw, classes, count, s.data());
        for (int64_t c = 0; c < classes; ++c) {
          const A* sc = s.data() + c * kTile;
          A inter = 0, rest = 0, hits = 0;
          for (int64_t p = 0; p < count; ++p) {
            const A own = cls[p] == c ? A(1) : A(0);
            const A other = cls[p] >= 0 && cls[p] != c ? A(1) : A(0);
            inter += own * h1.eval(sc[p], nullptr);
            hits += own;
            if (h2.pieces > 0) rest += other * h2.eval(sc[p], nullptr);
          }
          acc[c] += inter;
          acc[classes + c] += rest;
          acc[2 * classes + c] += hits;
        }
      }
    }
  });
  for (int64_t i = 0; i < 3 * classes; ++i) out[i] = 0.0;
  for (int64_t block = 0; block < blocks; ++block)
    for (int64_t i = 0; i < 3 * classes; ++i) out[i] += partial[block * 3 * classes + i];
}

template <typename T, typename L>
void backward_kernel(const double* grad, const T* logits, const L* labels, const uint8_t* region,
                     const Curve<at::opmath_type<T>>& h1, const Curve<at::opmath_type<T>>& h2, int64_t n,
                     int64_t classes, int64_t hw, int64_t ignore_index, T* out) {
  using A = at::opmath_type<T>;
  const int64_t tiles_per_image = (hw + kTile - 1) / kTile;
  std::vector<A> g_inter(classes), g_rest(classes);
  for (int64_t c = 0; c < classes; ++c) {
    g_inter[c] = A(grad[c]);
    g_rest[c] = A(grad[classes + c]);
  }
  at::parallel_for(0, n * tiles_per_image, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> s(classes * kTile), g(classes * kTile);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t img = tile / tiles_per_image, p0 = (tile % tiles_per_image) * kTile;
      const int64_t count = std::min(kTile, hw - p0);
      int32_t cls[kTile];
      tile_classes(labels + img * hw + p0, region == nullptr ? nullptr : region + img * hw + p0, classes,
                   ignore_index, count, cls);
      const int64_t offset = img * classes * hw + p0;
      tile_softmax(logits + offset, hw, classes, count, s.data());
      A dot[kTile];
      for (int64_t p = 0; p < kTile; ++p) dot[p] = A(0);
      for (int64_t c = 0; c < classes; ++c) {
        const A* sc = s.data() + c * kTile;
        A* gc = g.data() + c * kTile;
        for (int64_t p = 0; p < count; ++p) {
          A slope1 = 0, slope2 = 0;
          h1.eval(sc[p], &slope1);
          if (h2.pieces > 0) h2.eval(sc[p], &slope2);
          const A own = cls[p] == c ? A(1) : A(0);
          const A other = cls[p] >= 0 && cls[p] != c ? A(1) : A(0);
          gc[p] = own * g_inter[c] * slope1 + other * g_rest[c] * slope2;
          dot[p] += sc[p] * gc[p];
        }
      }
      for (int64_t c = 0; c < classes; ++c) {
        const A* sc = s.data() + c * kTile;
        const A* gc = g.data() + c * kTile;
        T* oc = out + offset + c * hw;
        for (int64_t p = 0; p < count; ++p) oc[p] = T(sc[p] * (gc[p] - dot[p]));
      }
    }
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

template <typename F>
void dispatch_labels(const at::Tensor& target, F&& body) {
  switch (target.scalar_type()) {
    case at::kLong: return body(target.data_ptr<int64_t>());
    case at::kInt: return body(target.data_ptr<int32_t>());
    default: return body(target.data_ptr<uint8_t>());
  }
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
    dispatch_labels(target, [&](const auto* labels) {
      stats_kernel<scalar_t>(logits.data_ptr<scalar_t>(), labels,
                             region.defined() ? region.data_ptr<uint8_t>() : nullptr, h1, h2, n, classes, hw,
                             ignore_index, sums.data_ptr<double>());
    });
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
    dispatch_labels(target, [&](const auto* labels) {
      backward_kernel<scalar_t>(g.data_ptr<double>(), logits.data_ptr<scalar_t>(), labels,
                                region.defined() ? region.data_ptr<uint8_t>() : nullptr, h1, h2, n, classes, hw,
                                ignore_index, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("surrogate_stats", &surrogate_stats_cpu);
  m.impl("surrogate_stats_backward", &surrogate_stats_backward_cpu);
}
