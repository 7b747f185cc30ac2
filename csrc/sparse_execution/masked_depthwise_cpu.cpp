// masked_depthwise_conv2d, CPU: a depthwise kh x kw convolution evaluated at
// the active output pixels only (see dynkernels/ops/sparse_execution.py):
//   out[i, c] = bias[c] + sum_{taps t} w[c, t] * rows[inverse[n, y_t, x_t], c]
// for output row i at (n, oy, ox) of out_index, tap t at input pixel
// (oy*s - p + i*d, ox*s - p + j*d); a tap outside the image, or on a pixel
// whose inverse entry is -1 (outside the dilated mask), reads zero (DynConv's
// masked_conv_dw reads rows[-1] there); an out_index of -1 (a capacity
// buffer's padding) gives a zero row. Rows are (P, C): each tap is one axpy
// over the row's C channels, the output row staying in L1 (threads over
// output rows).
// Backward: d rows in gather form -- per input row, the output rows whose taps
// read it, found through an output inverse table built from out_index --
// (threads over input rows, no races); d w and d bias as fixed chunks of
// output rows (set by the shape, not the thread count) summed in chunk order.
// Deterministic.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/cpu_isa.h"
#include "sparse_execution/masked_geometry.h"

namespace {

using dynkernels::CpuIsa;
using dynkernels::masked::Geometry;
using dynkernels::masked::source_index;

Geometry check(const at::Tensor& rows, const at::Tensor& inverse, const at::Tensor& out_index,
               const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  DK_CHECK_DIM(weight, 4);
  TORCH_CHECK(rows.dim() == 2 && weight.size(0) == rows.size(1) && weight.size(1) == 1,
              "weight must be (C, 1, kh, kw) with C = rows' channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == rows.scalar_type(), "rows and weight must share a dtype");
  return dynkernels::masked::check_tables(rows, inverse, out_index, weight.size(2), weight.size(3), stride, padding,
                                          dilation);
}

// (C, 1, kh, kw) -> (taps, C)
at::Tensor taps_by_channel(const at::Tensor& weight) { return weight.flatten(1).t().contiguous(); }

template <typename T, CpuIsa I>
DK_INLINE void forward_rows(const T* rp, const int64_t* ip, const int64_t* op, const T* wp, const T* bp,
                            const Geometry& g, int64_t rows_in, int64_t begin, int64_t end, T* yp) {
  const int64_t c = g.c;
  for (int64_t r = begin; r < end; ++r) {
    T* __restrict__ y = yp + r * c;
    const int64_t pos = op[r];
    if (pos < 0) {  // padding of a capacity buffer: a zero row
      std::fill(y, y + c, T(0));
      continue;
    }
    for (int64_t ch = 0; ch < c; ++ch) y[ch] = bp != nullptr ? bp[ch] : T(0);
    const int64_t n = pos / (g.oh * g.ow), oy = pos / g.ow % g.oh, ox = pos % g.ow;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t iy = oy * g.sy - g.py + i * g.dy;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ix = ox * g.sx - g.px + j * g.dx;
        if (ix < 0 || ix >= g.w) continue;
        const int64_t q = ip[(n * g.h + iy) * g.w + ix];
        if (q < 0 || q >= rows_in) continue;
        const T* __restrict__ src = rp + q * c;
        const T* __restrict__ tap = wp + (i * g.kw + j) * c;
        for (int64_t ch = 0; ch < c; ++ch) y[ch] += tap[ch] * src[ch];
      }
    }
  }
}
DK_ISA_DISPATCH(forward_rows)

at::Tensor masked_depthwise_cpu(const at::Tensor& rows, const at::Tensor& inverse, const at::Tensor& out_index,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check(rows, inverse, out_index, weight, stride, padding, dilation);
  const at::Tensor rc = rows.contiguous(), ic = inverse.contiguous(), oc = out_index.contiguous();
  const at::Tensor wt = taps_by_channel(weight);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t count = oc.numel(), c = g.c, rows_in = rc.size(0);
  at::Tensor out = at::empty({count, c}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "masked_depthwise_cpu", [&] {
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const int64_t* ip = ic.const_data_ptr<int64_t>();
    const int64_t* op = oc.const_data_ptr<int64_t>();
    const scalar_t* wp = wt.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = out.data_ptr<scalar_t>();
    at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
      forward_rows_isa<scalar_t>(rp, ip, op, wp, bp, g, rows_in, begin, end, yp);
    });
  });
  return out;
}

template <typename T, CpuIsa I>
DK_INLINE void grad_rows(const T* gp, const T* wp, const int64_t* in_pixel, const int64_t* out_row,
                         const Geometry& g, int64_t begin, int64_t end, T* grp) {
  const int64_t c = g.c;
  for (int64_t q = begin; q < end; ++q) {
    T* __restrict__ acc = grp + q * c;
    std::fill(acc, acc + c, T(0));
    const int64_t pix = in_pixel[q];
    if (pix < 0) continue;
    const int64_t n = pix / (g.h * g.w), iy = pix / g.w % g.h, ix = pix % g.w;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t oy = source_index(iy, i, g.sy, g.py, g.dy, g.oh);
      if (oy < 0) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ox = source_index(ix, j, g.sx, g.px, g.dx, g.ow);
        if (ox < 0) continue;
        const int64_t r = out_row[(n * g.oh + oy) * g.ow + ox];
        if (r < 0) continue;
        const T* __restrict__ gr = gp + r * c;
        const T* __restrict__ tap = wp + (i * g.kw + j) * c;
        for (int64_t ch = 0; ch < c; ++ch) acc[ch] += tap[ch] * gr[ch];
      }
    }
  }
}
DK_ISA_DISPATCH(grad_rows)

template <typename T, CpuIsa I>
DK_INLINE void grad_weight_chunks(const T* gp, const T* rp, const int64_t* ip, const int64_t* op, const Geometry& g,
                                  int64_t rows_in, int64_t count, int64_t chunk, int64_t begin, int64_t end, T* pp) {
  const int64_t c = g.c, taps = g.kh * g.kw;
  for (int64_t k = begin; k < end; ++k) {
    T* part = pp + k * (taps + 1) * c;
    for (int64_t r = k * chunk; r < std::min(count, (k + 1) * chunk); ++r) {
      const int64_t pos = op[r];
      if (pos < 0) continue;  // a padding row: no output, no gradient
      const T* __restrict__ gr = gp + r * c;
      T* __restrict__ bias_sum = part + taps * c;
      for (int64_t ch = 0; ch < c; ++ch) bias_sum[ch] += gr[ch];
      const int64_t n = pos / (g.oh * g.ow), oy = pos / g.ow % g.oh, ox = pos % g.ow;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t iy = oy * g.sy - g.py + i * g.dy;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t ix = ox * g.sx - g.px + j * g.dx;
          if (ix < 0 || ix >= g.w) continue;
          const int64_t q = ip[(n * g.h + iy) * g.w + ix];
          if (q < 0 || q >= rows_in) continue;
          const T* __restrict__ src = rp + q * c;
          T* __restrict__ dst = part + (i * g.kw + j) * c;
          for (int64_t ch = 0; ch < c; ++ch) dst[ch] += gr[ch] * src[ch];
        }
      }
    }
  }
}
DK_ISA_DISPATCH(grad_weight_chunks)

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_depthwise_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& inverse, const at::Tensor& out_index,
    const at::Tensor& weight, bool with_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const Geometry g = check(rows, inverse, out_index, weight, stride, padding, dilation);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == out_index.numel() && grad.size(1) == g.c,
              "grad must be (P_out, C), got ", grad.sizes());
  const at::Tensor gc = grad.contiguous(), rc = rows.contiguous(), ic = inverse.contiguous(),
                   oc = out_index.contiguous();
  const at::Tensor wt = taps_by_channel(weight);
  const int64_t count = oc.numel(), c = g.c, taps = g.kh * g.kw, rows_in = rc.size(0);
  // each input row's pixel, and each output pixel's row (-1: inactive)
  std::vector<int64_t> in_pixel, out_row;
  dynkernels::masked::invert_tables(g, ic.const_data_ptr<int64_t>(), oc.const_data_ptr<int64_t>(), rows_in, count,
                                    in_pixel, out_row);
  at::Tensor g_rows = at::empty({rows_in, c}, rows.options());
  const int64_t chunk = 64, chunks = (count + chunk - 1) / chunk;
  at::Tensor parts = at::zeros({std::max<int64_t>(chunks, 1), taps + 1, c}, rows.options());
  at::Tensor g_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor g_bias = with_bias ? at::empty({c}, rows.options()) : at::empty({0}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "masked_depthwise_backward_cpu", [&] {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const int64_t* ip = ic.const_data_ptr<int64_t>();
    const int64_t* op = oc.const_data_ptr<int64_t>();
    const scalar_t* wp = wt.const_data_ptr<scalar_t>();
    scalar_t* grp = g_rows.data_ptr<scalar_t>();
    at::parallel_for(0, rows_in, 16, [&](int64_t begin, int64_t end) {
      grad_rows_isa<scalar_t>(gp, wp, in_pixel.data(), out_row.data(), g, begin, end, grp);
    });
    scalar_t* pp = parts.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      grad_weight_chunks_isa<scalar_t>(gp, rp, ip, op, g, rows_in, count, chunk, begin, end, pp);
    });
    // the chunks' partials in chunk order: d w (C, 1, kh, kw) and d bias (C)
    scalar_t* gwp = g_weight.data_ptr<scalar_t>();
    scalar_t* gbp = with_bias ? g_bias.data_ptr<scalar_t>() : nullptr;
    for (int64_t t = 0; t <= taps; ++t) {
      if (t == taps && gbp == nullptr) break;
      for (int64_t ch = 0; ch < c; ++ch) {
        scalar_t total = scalar_t(0);
        for (int64_t k = 0; k < chunks; ++k) total += pp[(k * (taps + 1) + t) * c + ch];
        if (t < taps) {
          gwp[ch * taps + t] = total;
        } else {
          gbp[ch] = total;
        }
      }
    }
  });
  return {g_rows, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("masked_depthwise_conv2d", &masked_depthwise_cpu);
  m.impl("masked_depthwise_conv2d_backward", &masked_depthwise_backward_cpu);
}
