// Shared by the dynamic convolution's CPU kernels (per_sample_depthwise_cpu.cpp,
// per_sample_conv_cpu.cpp): the convolution's geometry, the argument checks on
// it, and the range of output columns a tap reads inside the input.
#pragma once

#include <torch/extension.h>

#include <algorithm>

namespace dynkernels::dynamic_conv {

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

inline bool is_nhwc(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

// x (B, C, H, W), a kh x kw kernel: checks the geometry and returns it with the output size.
inline Geometry make_geometry(const at::Tensor& x, int64_t kh, int64_t kw, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "stride, padding, dilation: pairs");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              "stride and dilation must be >= 1, padding >= 0");
  Geometry g{x.size(2), x.size(3), kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
             0, 0};
  g.oh = (g.h + 2 * g.py - g.dy * (g.kh - 1) - 1) / g.sy + 1;
  g.ow = (g.w + 2 * g.px - g.dx * (g.kw - 1) - 1) / g.sx + 1;
  TORCH_CHECK(g.oh >= 1 && g.ow >= 1, "the kernel does not fit the padded input: output ", g.oh, " x ", g.ow);
  return g;
}

}  // namespace dynkernels::dynamic_conv
