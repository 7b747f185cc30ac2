// Geometry, table checks and the row copy shared by the CPU kernels of the
// sparse execution family (masked_depthwise_cpu.cpp, masked_conv_cpu.cpp,
// pixel_index_cpu.cpp): output
// rows at out_index pixels (flat b*Ho*Wo + y*Wo + x, -1 padding), input rows
// read through inverse (B, H, W) (row or -1).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace dynkernels {
namespace masked {

struct Geometry {
  int64_t batch, h, w, oh, ow, kh, kw, sy, sx, py, px, dy, dx, c;
};

// Checks rows (P_in, C), the two int64 tables and their entries' ranges;
// kh, kw from the caller's weight (whose shape the caller checks).
inline Geometry check_tables(const at::Tensor& rows, const at::Tensor& inverse, const at::Tensor& out_index,
                             int64_t kh, int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  DK_CHECK_CPU(rows);
  DK_CHECK_DIM(rows, 2);
  DK_CHECK_DIM(inverse, 3);
  DK_CHECK_DIM(out_index, 1);
  TORCH_CHECK(inverse.scalar_type() == at::kLong && out_index.scalar_type() == at::kLong,
              "inverse_map and out_index must be int64");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "stride, padding, dilation: pairs");
  Geometry g{inverse.size(0), inverse.size(1), inverse.size(2), 0, 0, kh, kw, stride[0],
             stride[1], padding[0], padding[1], dilation[0], dilation[1], rows.size(1)};
  g.oh = (g.h + 2 * g.py - g.dy * (g.kh - 1) - 1) / g.sy + 1;
  g.ow = (g.w + 2 * g.px - g.dx * (g.kw - 1) - 1) / g.sx + 1;
  TORCH_CHECK(g.oh >= 1 && g.ow >= 1, "the kernel does not fit the padded input");
  const at::Tensor ic = inverse.contiguous(), oc = out_index.contiguous();
  const int64_t* ip = ic.const_data_ptr<int64_t>();
  const int64_t* op = oc.const_data_ptr<int64_t>();
  const int64_t outputs = g.batch * g.oh * g.ow;
  for (int64_t p = 0; p < ic.numel(); ++p) {
    TORCH_CHECK_INDEX(ip[p] >= -1 && ip[p] < rows.size(0), "inverse_map must hold rows in [-1, P_in = ",
                      rows.size(0), "), got ", ip[p]);
  }
  for (int64_t r = 0; r < oc.numel(); ++r) {
    TORCH_CHECK_INDEX(op[r] >= -1 && op[r] < outputs, "index must hold pixels in [-1, B*H*W = ", outputs,
                      ") of the output, got ", op[r]);
  }
  return g;
}

// The output index o with o * s - p + t * d == n_in, or -1.
inline int64_t source_index(int64_t n_in, int64_t t, int64_t s, int64_t p, int64_t d, int64_t n_out) {
  const int64_t n = n_in + p - t * d;
  if (n < 0 || n % s != 0 || n / s >= n_out) return -1;
  return n / s;
}

// The input rows the taps (i, j) of output pixel pos read, in tap order, -1 outside the image or
// the mask (all -1 for a padding row, pos < 0).
inline void input_rows(const Geometry& g, const int64_t* inverse, int64_t pos, int64_t* taps) {
  if (pos < 0) {
    std::fill(taps, taps + g.kh * g.kw, int64_t(-1));
    return;
  }
  const int64_t n = pos / (g.oh * g.ow), oy = pos / g.ow % g.oh, ox = pos % g.ow;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t iy = oy * g.sy - g.py + i * g.dy;
    const int64_t* line = inverse + (n * g.h + iy) * g.w;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t ix = ox * g.sx - g.px + j * g.dx;
      *taps++ = (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) ? -1 : line[ix];
    }
  }
}

// The output rows whose taps (i, j) read input pixel pix, in tap order, -1 where none (all -1 for pix < 0).
inline void output_rows(const Geometry& g, const int64_t* out_row, int64_t pix, int64_t* taps) {
  if (pix < 0) {
    std::fill(taps, taps + g.kh * g.kw, int64_t(-1));
    return;
  }
  const int64_t n = pix / (g.h * g.w), iy = pix / g.w % g.h, ix = pix % g.w;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t oy = source_index(iy, i, g.sy, g.py, g.dy, g.oh);
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t ox = oy < 0 ? -1 : source_index(ix, j, g.sx, g.px, g.dx, g.ow);
      *taps++ = ox < 0 ? -1 : out_row[(n * g.oh + oy) * g.ow + ox];
    }
  }
}

// Each input row's pixel (rows_in entries) and each output pixel's row (B*Ho*Wo entries), -1 if none.
inline void invert_tables(const Geometry& g, const int64_t* inverse, const int64_t* out_index, int64_t rows_in,
                          int64_t count, std::vector<int64_t>& in_pixel, std::vector<int64_t>& out_row) {
  in_pixel.assign(rows_in, -1);
  out_row.assign(g.batch * g.oh * g.ow, -1);
  for (int64_t p = 0; p < g.batch * g.h * g.w; ++p) {
    if (inverse[p] >= 0) in_pixel[inverse[p]] = p;
  }
  for (int64_t r = 0; r < count; ++r) {
    if (out_index[r] >= 0) out_row[out_index[r]] = r;
  }
}

// rows [begin, end) of out (P, C) from the rows of x (pixel or row, C) at ip (a zero row for -1):
// an inline vector copy per row (a memmove call per 256-576-byte row costs as much as the copy)
template <typename T, CpuIsa I>
DK_INLINE void copy_rows(const T* x, const int64_t* ip, int64_t c, int64_t begin, int64_t end, T* out) {
  for (int64_t p = begin; p < end; ++p) {
    T* __restrict__ dst = out + p * c;
    if (ip[p] < 0) {
      for (int64_t ch = 0; ch < c; ++ch) dst[ch] = T(0);
      continue;
    }
    const T* __restrict__ src = x + ip[p] * c;
    for (int64_t ch = 0; ch < c; ++ch) dst[ch] = src[ch];
  }
}
DK_ISA_DISPATCH(copy_rows)

}  // namespace masked
}  // namespace dynkernels
