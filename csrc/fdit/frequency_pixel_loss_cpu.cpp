// frequency_pixel_loss, CPU: FDIT's frequency pixel loss (see
// dynkernels/ops/fdit.py) in one pass forward and one back, from the images.
//
// d = fake - real (N, 3, H, W), gd = 0.299 d_0 + 0.587 d_1 + 0.114 d_2, B the
// separable Gaussian blur with zero padding (symmetric: B is its own adjoint).
//   L = w_low / (3 N H W) sum_c |B d_c| + w_high / (N H W) sum |gd - B gd|
//   dL/dd_c = a B(sign(B d_c)) + b g_c (s - B s),  s = sign(gd - B gd),
//   a = w_low / (3 N H W), b = w_high / (N H W), g_c the gray weights.
// Each (image, channel) plane is one task: the plane of d built in a thread
// buffer, a horizontal pass over a zero-padded row, a vertical pass over row
// vectors (both vectorise over x); sums of |.| in double per task, added in
// task order (deterministic for any thread count). The backward recomputes
// the blur, blurs the signs, and combines the four planes; nothing of pixel
// size is saved between the two passes.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace {

constexpr double kGray[3] = {0.299, 0.587, 0.114};

// Columns per register block: the block's sums stay in vector registers across the k taps
// (a row-long accumulator would be loaded and stored once per tap).
constexpr int64_t kBlock = 32;

template <typename T, dynkernels::CpuIsa I>
DK_INLINE void blur_plane(const T* __restrict__ in, T* __restrict__ row, T* __restrict__ tmp, T* __restrict__ out,
                          int64_t h, int64_t w, const T* __restrict__ g, int64_t k) {
  // row holds w + k - 1 + kBlock values (zeros around the image row), tmp h * w + kBlock
  const int64_t pad = (k - 1) / 2;
  for (int64_t x = 0; x < pad; ++x) row[x] = T(0);
  for (int64_t x = pad + w; x < w + k - 1 + kBlock; ++x) row[x] = T(0);
  for (int64_t y = 0; y < h; ++y) {  // horizontal: tmp[y, x] = sum_j g_j in[y, x + j - pad]
    const T* __restrict__ src = in + y * w;
    for (int64_t x = 0; x < w; ++x) row[pad + x] = src[x];
    T* __restrict__ dst = tmp + y * w;
    for (int64_t x0 = 0; x0 < w; x0 += kBlock) {
      T acc[kBlock];
      for (int64_t i = 0; i < kBlock; ++i) acc[i] = T(0);
      for (int64_t j = 0; j < k; ++j) {
        const T gj = g[j];
        const T* __restrict__ r = row + x0 + j;
        for (int64_t i = 0; i < kBlock; ++i) acc[i] += gj * r[i];
      }
      const int64_t n = std::min(kBlock, w - x0);
      for (int64_t i = 0; i < n; ++i) dst[x0 + i] = acc[i];
    }
  }
  for (int64_t y = 0; y < h; ++y) {  // vertical: out[y, x] = sum_j g_j tmp[y + j - pad, x]
    T* __restrict__ dst = out + y * w;
    const int64_t lo = std::max<int64_t>(0, pad - y), hi = std::min<int64_t>(k, h + pad - y);
    for (int64_t x0 = 0; x0 < w; x0 += kBlock) {
      T acc[kBlock];
      for (int64_t i = 0; i < kBlock; ++i) acc[i] = T(0);
      for (int64_t j = lo; j < hi; ++j) {
        const T gj = g[j];
        const T* __restrict__ src = tmp + (y + j - pad) * w + x0;  // a tail block reads past the row: padded
        for (int64_t i = 0; i < kBlock; ++i) acc[i] += gj * src[i];
      }
      const int64_t n = std::min(kBlock, w - x0);
      for (int64_t i = 0; i < n; ++i) dst[x0 + i] = acc[i];
    }
  }
}
DK_ISA_DISPATCH(blur_plane)  // the worker inlines into each ISA's copy (a non-inline one would run baseline code)

// plane q of d for image n: d_q (q < 3) or gd (q = 3)
template <typename T>
void difference_plane(const T* fake, const T* real, int64_t n, int64_t q, int64_t hw, T* out) {
  const T* f = fake + n * 3 * hw;
  const T* r = real + n * 3 * hw;
  if (q < 3) {
    for (int64_t i = 0; i < hw; ++i) out[i] = f[q * hw + i] - r[q * hw + i];
    return;
  }
  const T g0 = T(kGray[0]), g1 = T(kGray[1]), g2 = T(kGray[2]);
  for (int64_t i = 0; i < hw; ++i) {
    out[i] = (f[i] - r[i]) * g0 + (f[hw + i] - r[hw + i]) * g1 + (f[2 * hw + i] - r[2 * hw + i]) * g2;
  }
}

template <typename T>
T sign_of(T v) {
  return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0));
}

void check_inputs(const at::Tensor& fake, const at::Tensor& real, const at::Tensor& kernel) {
  DK_CHECK_CPU(fake);
  DK_CHECK_CPU(real);
  DK_CHECK_CPU(kernel);
  DK_CHECK_DIM(fake, 4);
  TORCH_CHECK(fake.size(1) == 3 && real.sizes() == fake.sizes(), "fake and real must be one (N, 3, H, W) shape, got ",
              fake.sizes(), " and ", real.sizes());
  TORCH_CHECK(fake.scalar_type() == real.scalar_type() && kernel.scalar_type() == fake.scalar_type() &&
                  (fake.scalar_type() == at::kFloat || fake.scalar_type() == at::kDouble),
              "fake, real and kernel must share float32 or float64");
  TORCH_CHECK(kernel.dim() == 1 && kernel.numel() % 2 == 1, "kernel must be (k,) with k odd, got ", kernel.sizes());
}

struct Scratch {  // one task's buffers: the plane, the horizontal pass (+ a block), the blur, the padded row
  template <typename T>
  static std::vector<T> make(int64_t hw, int64_t w, int64_t k) {
    return std::vector<T>(size_t(3 * hw + kBlock + w + k + kBlock));
  }
};

at::Tensor frequency_pixel_loss_cpu(const at::Tensor& fake_in, const at::Tensor& real_in, const at::Tensor& kernel_in,
                                    double w_low, double w_high) {
  check_inputs(fake_in, real_in, kernel_in);
  const at::Tensor fake = fake_in.contiguous(), real = real_in.contiguous(), kernel = kernel_in.contiguous();
  const int64_t n = fake.size(0), h = fake.size(2), w = fake.size(3), hw = h * w, k = kernel.numel();
  std::vector<double> sums(size_t(4 * n), 0.0);
  AT_DISPATCH_FLOATING_TYPES(fake.scalar_type(), "frequency_pixel_loss", [&] {
    const scalar_t* f = fake.data_ptr<scalar_t>();
    const scalar_t* r = real.data_ptr<scalar_t>();
    const scalar_t* g = kernel.data_ptr<scalar_t>();
    at::parallel_for(0, 4 * n, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> buf = Scratch::make<scalar_t>(hw, w, k);
      scalar_t *plane = buf.data(), *tmp = plane + hw, *out = tmp + hw + kBlock, *row = out + hw;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t img = t / 4, q = t % 4;
        difference_plane(f, r, img, q, hw, plane);
        blur_plane_isa<scalar_t>(plane, row, tmp, out, h, w, g, k);
        double acc = 0;
        if (q < 3) {
          for (int64_t i = 0; i < hw; ++i) acc += std::abs(double(out[i]));
        } else {
          for (int64_t i = 0; i < hw; ++i) acc += std::abs(double(plane[i] - out[i]));
        }
        sums[size_t(t)] = acc;
      }
    });
  });
  double low = 0, high = 0;
  for (int64_t t = 0; t < 4 * n; ++t) (t % 4 < 3 ? low : high) += sums[size_t(t)];
  const double count = double(n) * double(hw);
  const double loss = count > 0 ? w_low * low / (3 * count) + w_high * high / count : std::nan("");
  return at::scalar_tensor(loss, fake.options());
}

at::Tensor frequency_pixel_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& fake_in, const at::Tensor& real_in,
                                             const at::Tensor& kernel_in, double w_low, double w_high) {
  check_inputs(fake_in, real_in, kernel_in);
  const at::Tensor fake = fake_in.contiguous(), real = real_in.contiguous(), kernel = kernel_in.contiguous();
  const int64_t n = fake.size(0), h = fake.size(2), w = fake.size(3), hw = h * w, k = kernel.numel();
  at::Tensor out = at::empty_like(fake);
  if (out.numel() == 0) return out;
  const double go = grad.item<double>();  // the scalar loss's incoming gradient (a CPU scalar)
  const double count = double(n) * double(hw);
  at::Tensor signs = at::empty({n, 4, h, w}, fake.options());  // B(sign) per plane; the gray plane s - B s
  AT_DISPATCH_FLOATING_TYPES(fake.scalar_type(), "frequency_pixel_loss_backward", [&] {
    const scalar_t* f = fake.data_ptr<scalar_t>();
    const scalar_t* r = real.data_ptr<scalar_t>();
    const scalar_t* g = kernel.data_ptr<scalar_t>();
    scalar_t* e = signs.data_ptr<scalar_t>();
    at::parallel_for(0, 4 * n, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> buf = Scratch::make<scalar_t>(hw, w, k);
      scalar_t *plane = buf.data(), *tmp = plane + hw, *blurred = tmp + hw + kBlock, *row = blurred + hw;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t q = t % 4;
        difference_plane(f, r, t / 4, q, hw, plane);
        blur_plane_isa<scalar_t>(plane, row, tmp, blurred, h, w, g, k);
        // the sign of what the loss takes |.| of, into plane
        if (q < 3) {
          for (int64_t i = 0; i < hw; ++i) plane[i] = sign_of(blurred[i]);
        } else {
          for (int64_t i = 0; i < hw; ++i) plane[i] = sign_of(plane[i] - blurred[i]);
        }
        scalar_t* dst = e + t * hw;
        blur_plane_isa<scalar_t>(plane, row, tmp, dst, h, w, g, k);
        if (q == 3) {
          for (int64_t i = 0; i < hw; ++i) dst[i] = plane[i] - dst[i];  // s - B s
        }
      }
    });
    const scalar_t a = scalar_t(go * w_low / (3 * count)), b = scalar_t(go * w_high / count);
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * 3, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t img = t / 3, c = t % 3;
        const scalar_t* low = e + (img * 4 + c) * hw;
        const scalar_t* gray = e + (img * 4 + 3) * hw;
        const scalar_t bc = b * scalar_t(kGray[c]);
        scalar_t* dst = o + t * hw;
        for (int64_t i = 0; i < hw; ++i) dst[i] = a * low[i] + bc * gray[i];
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("frequency_pixel_loss", &frequency_pixel_loss_cpu);
  m.impl("frequency_pixel_loss_backward", &frequency_pixel_loss_backward_cpu);
}
