// spectral_l1, CPU: the elementwise part of FDIT's spectral loss (see
// dynkernels/ops/fdit.py) in one pass forward and one back, over the rfft2
// spectra a (of fake) and b (of real), complex (..., H, W/2 + 1):
//   m = sqrt(re^2 + im^2 + 1e-8), d = log1p(m_a) - log1p(m_b),
//   loss = sum_i w_i |d_i| / total,  w periodic with period P (the Hermitian
//   column weights, or the mask's, repeated over the leading dims);
//   backward: dL/d(re, im) of a = c w sign(d) (re, im) / (m (1 + m)),
//   c = grad / total (negated for b).
// The forward stores sign(d) as int8 (1 byte per bin: what the backward needs
// besides the spectrum), taken as sign(m_a - m_b): log1p is increasing, so this
// is the exact sign, where the rounded d could flip it for m_a ~ m_b. float32 uses a branch-free log1p (Cephes' logf
// polynomial on 1 + m, with the log1p correction log(u) m / (u - 1), about
// 1 ulp) so that the loop vectorises (with -fno-math-errno: a sqrt that may
// set errno is a call); float64 std::log1p. Sums per period
// block in double, added in block order: deterministic.
#include <ATen/Parallel.h>

#include <c10/util/complex.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace {

DK_INLINE float log1p_approx(float m) {
  const float u = 1.0f + m;
  int32_t bits;
  std::memcpy(&bits, &u, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  const int32_t mant = (bits & 0x807fffff) | 0x3f000000;  // u = x 2^e, x in [0.5, 1)
  float x;
  std::memcpy(&x, &mant, sizeof(x));
  const bool low = x < 0.707106781186547524f;
  e = low ? e - 1 : e;
  x = low ? x + x - 1.0f : x - 1.0f;
  const float z = x * x;
  float y = 7.0376836292E-2f;
  y = y * x - 1.1514610310E-1f;
  y = y * x + 1.1676998740E-1f;
  y = y * x - 1.2420140846E-1f;
  y = y * x + 1.4249322787E-1f;
  y = y * x - 1.6668057665E-1f;
  y = y * x + 2.0000714765E-1f;
  y = y * x - 2.4999993993E-1f;
  y = y * x + 3.3333331174E-1f;
  y = y * x * z;
  const float ef = float(e);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  const float log_u = x + y + 0.693359375f * ef;
  const float q = u - 1.0f;  // log1p(m) = log(u) m / (u - 1): the rounding of 1 + m undone
  const float ratio = m / (q == 0.0f ? 1.0f : q);  // divided unconditionally: the loop stays branch-free
  return q == 0.0f ? m : log_u * ratio;
}
DK_INLINE double log1p_approx(double m) { return std::log1p(m); }

template <typename T, dynkernels::CpuIsa I>
DK_INLINE void forward_block(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w, int64_t p,
                             int8_t* __restrict__ sign, double* __restrict__ out) {
  // The elementwise loop writes w |d| to a buffer (no reduction in it, so it vectorises without
  // reassociation); the buffer is summed into 16 lane sums (vectorisable), then in double.
  constexpr int64_t kSub = 256, kLanes = 16;
  T buf[kSub];
  double total = 0;
  for (int64_t j0 = 0; j0 < p; j0 += kSub) {
    const int64_t n = std::min(kSub, p - j0);
    const T* __restrict__ as = a + 2 * j0;
    const T* __restrict__ bs = b + 2 * j0;
    const T* __restrict__ ws = w + j0;
    int8_t* __restrict__ ss = sign + j0;
    for (int64_t j = 0; j < n; ++j) {
      const T ar = as[2 * j], ai = as[2 * j + 1], br = bs[2 * j], bi = bs[2 * j + 1];
      const T ma = std::sqrt(ar * ar + ai * ai + T(1e-8)), mb = std::sqrt(br * br + bi * bi + T(1e-8));
      const T d = log1p_approx(ma) - log1p_approx(mb);
      buf[j] = ws[j] * (d < T(0) ? -d : d);
      ss[j] = int8_t((ma > mb) - (ma < mb));  // sign(d) exactly (log1p is increasing), not the rounded d's
    }
    T lanes[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += buf[j + l];
    }
    double part = 0;
    for (; j < n; ++j) part += double(buf[j]);
    for (int64_t l = 0; l < kLanes; ++l) part += double(lanes[l]);
    total += part;
  }
  *out = total;
}
DK_ISA_DISPATCH(forward_block)

template <typename T, dynkernels::CpuIsa I>
DK_INLINE void backward_block(const T* __restrict__ a, const int8_t* __restrict__ sign, const T* __restrict__ w,
                              int64_t p, T c, T* __restrict__ g) {
  for (int64_t j = 0; j < p; ++j) {
    const T ar = a[2 * j], ai = a[2 * j + 1];
    const T m = std::sqrt(ar * ar + ai * ai + T(1e-8));
    const T f = c * w[j] * T(sign[j]) / (m * (T(1) + m));
    g[2 * j] = f * ar;
    g[2 * j + 1] = f * ai;
  }
}
DK_ISA_DISPATCH(backward_block)

void check_spectra(const at::Tensor& a, const at::Tensor& weights) {
  DK_CHECK_CPU(a);
  DK_CHECK_CPU(weights);
  TORCH_CHECK(a.scalar_type() == at::kComplexFloat || a.scalar_type() == at::kComplexDouble,
              "spectra must be complex64 or complex128, got ", a.scalar_type());
  TORCH_CHECK(weights.scalar_type() == c10::toRealValueType(a.scalar_type()), "weights must be the spectra's real dtype");
  TORCH_CHECK(weights.numel() > 0 && a.numel() % weights.numel() == 0,
              "weights must repeat with a period dividing the spectrum's size, got ", weights.numel(), " and ", a.numel());
}

std::tuple<at::Tensor, at::Tensor> spectral_l1_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& w_in,
                                                   double total) {
  check_spectra(a_in, w_in);
  TORCH_CHECK(b_in.sizes() == a_in.sizes() && b_in.scalar_type() == a_in.scalar_type(), "a and b must match");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), w = w_in.contiguous();
  const int64_t p = w.numel(), blocks = a.numel() / p;
  at::Tensor sign = at::empty(a.sizes(), a.options().dtype(at::kChar));
  std::vector<double> sums(size_t(blocks), 0.0);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spectral_l1", [&] {
    const scalar_t* ap = reinterpret_cast<const scalar_t*>(a.data_ptr());
    const scalar_t* bp = reinterpret_cast<const scalar_t*>(b.data_ptr());
    const scalar_t* wp = w.data_ptr<scalar_t>();
    int8_t* sp = sign.data_ptr<int8_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / p);
    at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        forward_block_isa<scalar_t>(ap + 2 * k * p, bp + 2 * k * p, wp, p, sp + k * p, &sums[size_t(k)]);
      }
    });
  });
  double loss = 0;
  for (double s : sums) loss += s;
  return {at::scalar_tensor(loss / total, w.options()), sign};
}

at::Tensor spectral_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& a_in, const at::Tensor& sign_in,
                                    const at::Tensor& w_in, double total, double direction) {
  check_spectra(a_in, w_in);
  TORCH_CHECK(sign_in.sizes() == a_in.sizes() && sign_in.scalar_type() == at::kChar, "sign must be int8 like a");
  const at::Tensor a = a_in.contiguous(), sign = sign_in.contiguous(), w = w_in.contiguous();
  const int64_t p = w.numel(), blocks = a.numel() / p;
  at::Tensor out = at::empty_like(a, at::MemoryFormat::Contiguous);
  const double c = grad.item<double>() * direction / total;  // the scalar loss's incoming gradient (a CPU scalar)
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spectral_l1_backward", [&] {
    const scalar_t* ap = reinterpret_cast<const scalar_t*>(a.data_ptr());
    const int8_t* sp = sign.data_ptr<int8_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* gp = reinterpret_cast<scalar_t*>(out.data_ptr());
    const int64_t grain = std::max<int64_t>(1, 16384 / p);
    at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        backward_block_isa<scalar_t>(ap + 2 * k * p, sp + k * p, wp, p, scalar_t(c), gp + 2 * k * p);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("spectral_l1", &spectral_l1_cpu);
  m.impl("spectral_l1_backward", &spectral_l1_backward_cpu);
}
