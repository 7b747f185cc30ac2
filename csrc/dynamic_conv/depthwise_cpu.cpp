// per_sample_depthwise_conv2d, CPU: a depthwise convolution in which every
// (sample, channel) plane has its own kh x kw kernel -- a dynamic
// convolution's depthwise layer once its experts are mixed per sample (see
// dynkernels/ops/dynamic_conv.py). Direct convolution, one plane at a time:
//   y[b, c, oy, ox] = bias[b, c] + sum_{i, j} k[b, c, i, j] x[b, c, oy*s - p + i*d, ox*s - p + j*d]
// (zero outside the plane). For each output row and tap the valid ox form
// one contiguous range, so the inner loop is an axpy over the row
// (vectorised for stride 1; strided loads otherwise).
// Backward, per plane as well: dx by the same loops scattering into the
// plane's input (one thread owns a plane: no races, a fixed order), dk as one
// dot product per tap, dbias as the plane's sum. Deterministic.
// Threads: the B * C planes (at::parallel_for); float32 and float64; NCHW.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace {

using dynkernels::CpuIsa;

constexpr int64_t kLanes = 8;  // partial sums of the backward's dot products

struct Geometry {
  int64_t h, w, kh, kw, sy, sx, py, px, dy, dx, oh, ow;
};

// The output columns [lo, hi) whose tap column ox*s - p + j*d lies in [0, w).
inline void valid_columns(const Geometry& g, int64_t j, int64_t& lo, int64_t& hi) {
  const int64_t off = j * g.dx - g.px;  // input column = ox * sx + off
  lo = off >= 0 ? 0 : (-off + g.sx - 1) / g.sx;
  hi = g.w - off <= 0 ? 0 : std::min(g.ow, (g.w - off - 1) / g.sx + 1);
  if (hi < lo) hi = lo;
}

template <typename T, CpuIsa I>
DK_INLINE void forward_plane(const T* x, const T* k, T bias, const Geometry& g, T* y) {
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    T* out = y + oy * g.ow;
    for (int64_t ox = 0; ox < g.ow; ++ox) out[ox] = bias;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t iy = oy * g.sy - g.py + i * g.dy;
      if (iy < 0 || iy >= g.h) continue;
      const T* row = x + iy * g.w;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t lo, hi;
        valid_columns(g, j, lo, hi);
        const T tap = k[i * g.kw + j];
        const T* __restrict__ src = row + j * g.dx - g.px;
        T* __restrict__ dst = out;  // the output row and the input plane never overlap
        if (g.sx == 1) {
          for (int64_t ox = lo; ox < hi; ++ox) dst[ox] += tap * src[ox];
        } else {
          for (int64_t ox = lo; ox < hi; ++ox) dst[ox] += tap * src[ox * g.sx];
        }
      }
    }
  }
}
DK_ISA_DISPATCH(forward_plane)

template <typename T, CpuIsa I>
DK_INLINE void backward_plane(const T* gy, const T* x, const T* k, const Geometry& g, T* gx, T* gk, T* gb) {
  std::fill(gx, gx + g.h * g.w, T(0));
  std::fill(gk, gk + g.kh * g.kw, T(0));
  T bias_sum = T(0);
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    const T* grad = gy + oy * g.ow;
    for (int64_t ox = 0; ox < g.ow; ++ox) bias_sum += grad[ox];
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t iy = oy * g.sy - g.py + i * g.dy;
      if (iy < 0 || iy >= g.h) continue;
      const T* row = x + iy * g.w;
      T* grow = gx + iy * g.w;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t lo, hi;
        valid_columns(g, j, lo, hi);
        const T tap = k[i * g.kw + j];
        const int64_t off = j * g.dx - g.px;
        const T* __restrict__ gr = grad;
        const T* __restrict__ src = row + off;
        T* __restrict__ dst = grow + off;
        // the tap's dot product in kLanes fixed partial sums (vectorisable, and the
        // same order whatever the thread count)
        T part[kLanes] = {};
        int64_t ox = lo;
        if (g.sx == 1) {
          for (; ox + kLanes <= hi; ox += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) {
              dst[ox + l] += tap * gr[ox + l];
              part[l] += gr[ox + l] * src[ox + l];
            }
          }
        }
        T dot = T(0);
        for (; ox < hi; ++ox) {
          dst[ox * g.sx] += tap * gr[ox];
          dot += gr[ox] * src[ox * g.sx];
        }
        for (int64_t l = 0; l < kLanes; ++l) dot += part[l];
        gk[i * g.kw + j] += dot;
      }
    }
  }
  if (gb != nullptr) *gb = bias_sum;
}
DK_ISA_DISPATCH(backward_plane)

Geometry check_args(const at::Tensor& x, const at::Tensor& kernels, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation) {
  DK_CHECK_CPU(x);
  DK_CHECK_DIM(x, 4);
  DK_CHECK_DIM(kernels, 4);
  TORCH_CHECK(kernels.size(0) == x.size(0) && kernels.size(1) == x.size(1),
              "kernels must be (B, C, kh, kw) with (B, C) of x, got ", kernels.sizes(), " for x ", x.sizes());
  TORCH_CHECK(x.scalar_type() == kernels.scalar_type(), "x and kernels must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "stride, padding, dilation: pairs");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              "stride and dilation must be >= 1, padding >= 0");
  Geometry g{x.size(2), x.size(3), kernels.size(2), kernels.size(3), stride[0], stride[1], padding[0], padding[1],
             dilation[0], dilation[1], 0, 0};
  g.oh = (g.h + 2 * g.py - g.dy * (g.kh - 1) - 1) / g.sy + 1;
  g.ow = (g.w + 2 * g.px - g.dx * (g.kw - 1) - 1) / g.sx + 1;
  TORCH_CHECK(g.oh >= 1 && g.ow >= 1, "the kernel does not fit the padded input: output ", g.oh, " x ", g.ow);
  return g;
}

at::Tensor per_sample_depthwise_cpu(const at::Tensor& x, const at::Tensor& kernels,
                                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_args(x, kernels, stride, padding, dilation);
  const int64_t planes = x.size(0) * x.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->sizes() == x.sizes().slice(0, 2) && bias->scalar_type() == x.scalar_type(),
                "bias must be (B, C) of x's dtype");
  }
  const at::Tensor xc = x.contiguous(), kc = kernels.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({x.size(0), x.size(1), g.oh, g.ow}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_sample_depthwise_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* kp = kc.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        forward_plane_isa<scalar_t>(xp + p * g.h * g.w, kp + p * g.kh * g.kw, bp ? bp[p] : scalar_t(0), g,
                                    yp + p * g.oh * g.ow);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> per_sample_depthwise_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& kernels, bool with_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_args(x, kernels, stride, padding, dilation);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1) && grad.size(2) == g.oh &&
                  grad.size(3) == g.ow && grad.scalar_type() == x.scalar_type(),
              "grad must be (B, C, Ho, Wo) = the forward's output shape, got ", grad.sizes());
  const int64_t planes = x.size(0) * x.size(1);
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), kc = kernels.contiguous();
  at::Tensor gx = at::empty_like(xc), gk = at::empty_like(kc);
  at::Tensor gb = with_bias ? at::empty({x.size(0), x.size(1)}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_sample_depthwise_backward_cpu", [&] {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* kp = kc.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gkp = gk.data_ptr<scalar_t>();
    scalar_t* gbp = with_bias ? gb.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        backward_plane_isa<scalar_t>(gp + p * g.oh * g.ow, xp + p * g.h * g.w, kp + p * g.kh * g.kw, g,
                                     gxp + p * g.h * g.w, gkp + p * g.kh * g.kw, gbp ? gbp + p : nullptr);
      }
    });
  });
  return {gx, gk, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("per_sample_depthwise_conv2d", &per_sample_depthwise_cpu);
  m.impl("per_sample_depthwise_conv2d_backward", &per_sample_depthwise_backward_cpu);
}
