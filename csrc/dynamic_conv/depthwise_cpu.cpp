// per_sample_depthwise_conv2d, CPU: a depthwise convolution in which every
// (sample, channel) plane has its own kh x kw kernel -- a dynamic
// convolution's depthwise layer once its experts are mixed per sample (see
// dynkernels/ops/dynamic_conv.py). Direct convolution, one plane at a time:
//   y[b, c, oy, ox] = bias[b, c] + sum_{i, j} k[b, c, i, j] x[b, c, oy*s - p + i*d, ox*s - p + j*d]
// (zero outside the plane). Column stride 1: the plane is copied into a
// zero-bordered buffer and each chunk of output columns sums all its taps in
// registers (forward_plane_padded). Otherwise, for each output row and tap
// the valid ox form one contiguous range and the inner loop is an axpy over
// the row with strided loads (forward_plane).
// Backward, per plane as well: dx by the same loops scattering into the
// plane's input (one thread owns a plane: no races, a fixed order), dk as one
// dot product per tap, dbias as the plane's sum. Deterministic.
// Threads: the B * C planes (at::parallel_for); float32 and float64; NCHW.
//
// Channels-last x (B, H, W, C in memory) runs the NHWC kernels instead, with
// the kernels transposed to (B, kh*kw, C) so that every tap is a contiguous
// channel vector: each output pixel is a sum of up to kh*kw axpys over the C
// channels (vectorised over channels whatever the stride), and y and dx come
// back channels-last. Forward: threads over (sample, output row). dx: the
// gather form, threads over (sample, input row), each input pixel summing the
// output taps that read it (no scatter, no races). dk and dbias: per sample,
// a fixed number of row chunks (set by the shape, not the thread count) each
// into its own partial, summed in chunk order. Deterministic.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "dynamic_conv/geometry.h"

namespace {

using dynkernels::CpuIsa;
using dynkernels::dynamic_conv::Geometry;
using dynkernels::dynamic_conv::is_nhwc;
using dynkernels::dynamic_conv::valid_columns;

constexpr int64_t kLanes = 8;  // partial sums of the backward's dot products

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

// Stride 1: the plane copied once into a zero-bordered buffer (pitch w + 2 px + V, in
// L1/L2), so that every output chunk of V columns sums all kh*kw taps in registers
// (kh*kw loads and one store per chunk, no bounds checks) instead of kh*kw passes of
// loads and stores over the output row. Taps in (i, j) order from the bias, as above;
// the border's zeros add exact zeros. The last chunk of a row ends at Wo, overlapping
// the one before it (the overlap is recomputed to the same values), so every store is
// a full chunk; V is the widest of 2, 1 and 1/2 vectors that fits in Wo.
template <typename T, CpuIsa I>
constexpr int64_t chunk_lanes() {
  return (I == CpuIsa::kAvx512 ? 64 : 32) / int64_t(sizeof(T)) * 2;  // two vectors of accumulators
}

template <typename T, int64_t V>
DK_INLINE void padded_rows(const T* pad, int64_t pitch, const T* k, T bias, const Geometry& g, T* y) {
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    T* out = y + oy * g.ow;
    for (int64_t c = 0; c < g.ow; c += V) {
      const int64_t ox0 = std::min(c, g.ow - V);
      T acc[V];
      for (int64_t l = 0; l < V; ++l) acc[l] = bias;
      for (int64_t i = 0; i < g.kh; ++i) {
        const T* row = pad + (oy * g.sy + i * g.dy) * pitch + ox0;
        for (int64_t j = 0; j < g.kw; ++j) {
          const T tap = k[i * g.kw + j];
          const T* __restrict__ src = row + j * g.dx;
          for (int64_t l = 0; l < V; ++l) acc[l] += tap * src[l];
        }
      }
      for (int64_t l = 0; l < V; ++l) out[ox0 + l] = acc[l];
    }
  }
}

// The plane (h, w) into pad (rows, pitch) at (py, px), zeros around it.
template <typename T>
DK_INLINE void pad_plane(const T* x, int64_t h, int64_t w, int64_t py, int64_t px, int64_t rows, int64_t pitch,
                         T* pad) {
  std::fill(pad, pad + rows * pitch, T(0));
  for (int64_t iy = 0; iy < h; ++iy) std::copy(x + iy * w, x + (iy + 1) * w, pad + (iy + py) * pitch + px);
}

// y (oh, ow) from a plane already zero-bordered by (py, px) in pad (pitch >= w + 2 px + V).
template <typename T, CpuIsa I>
DK_INLINE void padded_conv(const T* pad, int64_t pitch, const T* k, T bias, const Geometry& g, T* y) {
  constexpr int64_t V = chunk_lanes<T, I>();
  if (g.ow >= V) {
    padded_rows<T, V>(pad, pitch, k, bias, g, y);
  } else if (g.ow >= V / 2) {
    padded_rows<T, V / 2>(pad, pitch, k, bias, g, y);
  } else if (g.ow >= V / 4) {
    padded_rows<T, V / 4>(pad, pitch, k, bias, g, y);
  } else {
    padded_rows<T, 1>(pad, pitch, k, bias, g, y);
  }
}

template <typename T, CpuIsa I>
DK_INLINE void forward_plane_padded(const T* x, const T* k, T bias, const Geometry& g, T* pad, T* y) {
  const int64_t pitch = g.w + 2 * g.px + chunk_lanes<T, I>();
  pad_plane(x, g.h, g.w, g.py, g.px, g.h + 2 * g.py, pitch, pad);
  padded_conv<T, I>(pad, pitch, k, bias, g, y);
}
DK_ISA_DISPATCH(forward_plane_padded)

constexpr int64_t kMaxLanes = chunk_lanes<float, CpuIsa::kAvx512>();

// The padded buffer's size for forward_plane_padded at the widest ISA.
inline int64_t padded_plane_size(const Geometry& g) { return (g.h + 2 * g.py) * (g.w + 2 * g.px + kMaxLanes); }

// Stride 1 with padding <= d (k - 1) on both axes: dx is the correlation of dy,
// zero-bordered by d (k - 1) - p, with the flipped kernel -- the forward's
// register-blocked chunks on the "transposed" geometry below.
inline bool padded_backward(const Geometry& g) {
  return g.sy == 1 && g.sx == 1 && g.py <= g.dy * (g.kh - 1) && g.px <= g.dx * (g.kw - 1);
}

inline Geometry transposed(const Geometry& g) {
  return Geometry{g.oh, g.ow, g.kh, g.kw, 1, 1, g.dy * (g.kh - 1) - g.py, g.dx * (g.kw - 1) - g.px,
                  g.dy, g.dx, g.h, g.w};
}

// The dy buffer's size for backward_plane_padded (dx's bordered dy, then dy's rows padded to chunks).
inline int64_t padded_grad_size(const Geometry& g) {
  return std::max(padded_plane_size(transposed(g)), g.oh * (g.ow + kMaxLanes));
}

// Backward of forward_plane_padded. dx as above; dk: per tap, V lane sums of
// dy * x over the plane (x zero-bordered as in the forward, dy's rows padded
// with zeros to whole chunks), summed over the lanes in order; dbias the same
// over dy. Every sum in a fixed order: deterministic whatever the threads.
template <typename T, CpuIsa I>
DK_INLINE void backward_plane_padded(const T* gy, const T* x, const T* k, const Geometry& g, T* pad, T* gpad,
                                     T* flipped, T* gx, T* gk, T* gb) {
  constexpr int64_t V = chunk_lanes<T, I>();
  const int64_t taps = g.kh * g.kw;
  for (int64_t q = 0; q < taps; ++q) flipped[q] = k[taps - 1 - q];  // both axes flipped
  const Geometry t = transposed(g);
  const int64_t pitch_t = t.w + 2 * t.px + V;
  pad_plane(gy, t.h, t.w, t.py, t.px, t.h + 2 * t.py, pitch_t, gpad);
  padded_conv<T, I>(gpad, pitch_t, flipped, T(0), t, gx);
  const int64_t pitch = g.w + 2 * g.px + V, cols = (g.ow + V - 1) / V * V;
  pad_plane(x, g.h, g.w, g.py, g.px, g.h + 2 * g.py, pitch, pad);
  pad_plane(gy, g.oh, g.ow, int64_t(0), int64_t(0), g.oh, cols, gpad);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      T acc[V] = {};
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        const T* __restrict__ xr = pad + (oy + i * g.dy) * pitch + j * g.dx;
        const T* __restrict__ gr = gpad + oy * cols;
        for (int64_t c = 0; c < cols; c += V) {
          for (int64_t l = 0; l < V; ++l) acc[l] += gr[c + l] * xr[c + l];
        }
      }
      T dot = T(0);
      for (int64_t l = 0; l < V; ++l) dot += acc[l];
      gk[i * g.kw + j] = dot;
    }
  }
  if (gb == nullptr) return;
  T acc[V] = {};
  for (int64_t q = 0; q < g.oh * cols; q += V) {
    for (int64_t l = 0; l < V; ++l) acc[l] += gpad[q + l];
  }
  T total = T(0);
  for (int64_t l = 0; l < V; ++l) total += acc[l];
  *gb = total;
}
DK_ISA_DISPATCH(backward_plane_padded)

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

// ---- channels-last (NHWC) ---------------------------------------------------

template <typename T, CpuIsa I>
DK_INLINE void forward_row_nhwc(const T* x, const T* kt, const T* bias, const Geometry& g, int64_t c, int64_t oy,
                                T* y) {
  // x: one sample (H, W, C); kt: its kernels (taps, C); y: output row oy (Wo, C). Each
  // valid tap is one axpy over the pixel's C channels (the output vector stays in L1).
  for (int64_t ox = 0; ox < g.ow; ++ox) {
    T* __restrict__ out = y + ox * c;
    for (int64_t ch = 0; ch < c; ++ch) out[ch] = bias != nullptr ? bias[ch] : T(0);
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t iy = oy * g.sy - g.py + i * g.dy;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ix = ox * g.sx - g.px + j * g.dx;
        if (ix < 0 || ix >= g.w) continue;
        const T* __restrict__ src = x + (iy * g.w + ix) * c;
        const T* __restrict__ tap = kt + (i * g.kw + j) * c;
        for (int64_t ch = 0; ch < c; ++ch) out[ch] += tap[ch] * src[ch];
      }
    }
  }
}
DK_ISA_DISPATCH(forward_row_nhwc)

// The output index o with o * s - p + t * d == n_in, or -1.
inline int64_t source_index(int64_t n_in, int64_t t, int64_t s, int64_t p, int64_t d, int64_t n_out) {
  const int64_t n = n_in + p - t * d;
  if (n < 0 || n % s != 0 || n / s >= n_out) return -1;
  return n / s;
}

template <typename T, CpuIsa I>
DK_INLINE void grad_input_row_nhwc(const T* gy, const T* kt, const Geometry& g, int64_t c, int64_t iy, T* gx) {
  // gy: one sample (Ho, Wo, C); gx: input row iy (W, C); the same axpys as the forward
  for (int64_t ix = 0; ix < g.w; ++ix) {
    T* __restrict__ out = gx + ix * c;
    for (int64_t ch = 0; ch < c; ++ch) out[ch] = T(0);
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t oy = source_index(iy, i, g.sy, g.py, g.dy, g.oh);
      if (oy < 0) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ox = source_index(ix, j, g.sx, g.px, g.dx, g.ow);
        if (ox < 0) continue;
        const T* __restrict__ src = gy + (oy * g.ow + ox) * c;
        const T* __restrict__ tap = kt + (i * g.kw + j) * c;
        for (int64_t ch = 0; ch < c; ++ch) out[ch] += tap[ch] * src[ch];
      }
    }
  }
}
DK_ISA_DISPATCH(grad_input_row_nhwc)

template <typename T, CpuIsa I>
DK_INLINE void grad_kernel_rows_nhwc(const T* gy, const T* x, const Geometry& g, int64_t c, int64_t row0,
                                     int64_t row1, T* part) {
  // part: (taps + 1, C) -- the taps' sums, then the bias sum -- over output rows [row0, row1)
  const int64_t taps = g.kh * g.kw;
  std::fill(part, part + (taps + 1) * c, T(0));
  T* __restrict__ bias_sum = part + taps * c;
  for (int64_t oy = row0; oy < row1; ++oy) {
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      const T* __restrict__ grad = gy + (oy * g.ow + ox) * c;
      for (int64_t ch = 0; ch < c; ++ch) bias_sum[ch] += grad[ch];
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t iy = oy * g.sy - g.py + i * g.dy;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t ix = ox * g.sx - g.px + j * g.dx;
          if (ix < 0 || ix >= g.w) continue;
          const T* __restrict__ src = x + (iy * g.w + ix) * c;
          T* __restrict__ acc = part + (i * g.kw + j) * c;
          for (int64_t ch = 0; ch < c; ++ch) acc[ch] += grad[ch] * src[ch];
        }
      }
    }
  }
}
DK_ISA_DISPATCH(grad_kernel_rows_nhwc)

// (B, C, kh, kw) -> (B, kh*kw, C), contiguous
at::Tensor taps_by_channel(const at::Tensor& kernels) {
  return kernels.flatten(2).transpose(1, 2).contiguous();
}

at::Tensor forward_nhwc(const at::Tensor& x, const at::Tensor& kernels, const at::Tensor& bias, const Geometry& g) {
  const int64_t batch = x.size(0), c = x.size(1);
  const at::Tensor kt = taps_by_channel(kernels);
  at::Tensor y = at::empty({batch, c, g.oh, g.ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_sample_depthwise_nhwc", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* kp = kt.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, batch * g.oh, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / g.oh, oy = r % g.oh;
        forward_row_nhwc_isa<scalar_t>(xp + b * g.h * g.w * c, kp + b * g.kh * g.kw * c, bp ? bp + b * c : nullptr,
                                       g, c, oy, yp + (b * g.oh + oy) * g.ow * c);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_nhwc(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& kernels, bool with_bias,
                                                             const Geometry& g) {
  const int64_t batch = x.size(0), c = x.size(1), taps = g.kh * g.kw;
  const at::Tensor gc = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor kt = taps_by_channel(kernels);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  // a fixed chunking of each sample's output rows (by the shape, never the thread count)
  const int64_t rows = std::max<int64_t>(1, (g.oh + 7) / 8), chunks = (g.oh + rows - 1) / rows;
  at::Tensor parts = at::empty({batch, chunks, taps + 1, c}, x.options());
  at::Tensor gk = at::empty(kernels.sizes(), x.options());
  at::Tensor gb = with_bias ? at::empty({batch, c}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_sample_depthwise_backward_nhwc", [&] {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* kp = kt.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* pp = parts.data_ptr<scalar_t>();
    at::parallel_for(0, batch * g.h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / g.h, iy = r % g.h;
        grad_input_row_nhwc_isa<scalar_t>(gp + b * g.oh * g.ow * c, kp + b * taps * c, g, c, iy,
                                          gxp + (b * g.h + iy) * g.w * c);
      }
    });
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / chunks, k = t % chunks;
        grad_kernel_rows_nhwc_isa<scalar_t>(gp + b * g.oh * g.ow * c, xp + b * g.h * g.w * c, g, c, k * rows,
                                            std::min(g.oh, (k + 1) * rows), pp + t * (taps + 1) * c);
      }
    });
    // the chunks' partials summed in chunk order, into dk (B, C, kh, kw) and dbias (B, C)
    scalar_t* gkp = gk.data_ptr<scalar_t>();
    scalar_t* gbp = with_bias ? gb.data_ptr<scalar_t>() : nullptr;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = 0; t <= taps; ++t) {
        if (t == taps && gbp == nullptr) break;
        for (int64_t ch = 0; ch < c; ++ch) {
          scalar_t total = scalar_t(0);
          for (int64_t k = 0; k < chunks; ++k) total += pp[((b * chunks + k) * (taps + 1) + t) * c + ch];
          if (t < taps) {
            gkp[(b * c + ch) * taps + t] = total;
          } else {
            gbp[b * c + ch] = total;
          }
        }
      }
    }
  });
  return {gx, gk, gb};
}

Geometry check_args(const at::Tensor& x, const at::Tensor& kernels, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation) {
  DK_CHECK_CPU(x);
  DK_CHECK_DIM(x, 4);
  DK_CHECK_DIM(kernels, 4);
  TORCH_CHECK(kernels.size(0) == x.size(0) && kernels.size(1) == x.size(1),
              "kernels must be (B, C, kh, kw) with (B, C) of x, got ", kernels.sizes(), " for x ", x.sizes());
  TORCH_CHECK(x.scalar_type() == kernels.scalar_type(), "x and kernels must share a dtype");
  return dynkernels::dynamic_conv::make_geometry(x, kernels.size(2), kernels.size(3), stride, padding, dilation);
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
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (is_nhwc(x)) return forward_nhwc(x, kernels, bc, g);
  const at::Tensor xc = x.contiguous(), kc = kernels.contiguous();
  at::Tensor y = at::empty({x.size(0), x.size(1), g.oh, g.ow}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_sample_depthwise_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* kp = kc.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> pad(g.sx == 1 ? padded_plane_size(g) : 0);
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* xs = xp + p * g.h * g.w;
        const scalar_t* ks = kp + p * g.kh * g.kw;
        const scalar_t bias = bp ? bp[p] : scalar_t(0);
        if (g.sx == 1) {
          forward_plane_padded_isa<scalar_t>(xs, ks, bias, g, pad.data(), yp + p * g.oh * g.ow);
        } else {
          forward_plane_isa<scalar_t>(xs, ks, bias, g, yp + p * g.oh * g.ow);
        }
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
  if (is_nhwc(x)) return backward_nhwc(grad, x, kernels, with_bias, g);
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
    const bool padded = padded_backward(g);
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> pad(padded ? padded_plane_size(g) : 0), gpad(padded ? padded_grad_size(g) : 0);
      std::vector<scalar_t> flipped(g.kh * g.kw);
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* gs = gp + p * g.oh * g.ow;
        const scalar_t* xs = xp + p * g.h * g.w;
        const scalar_t* ks = kp + p * g.kh * g.kw;
        scalar_t* gbs = gbp ? gbp + p : nullptr;
        if (padded) {
          backward_plane_padded_isa<scalar_t>(gs, xs, ks, g, pad.data(), gpad.data(), flipped.data(),
                                              gxp + p * g.h * g.w, gkp + p * g.kh * g.kw, gbs);
        } else {
          backward_plane_isa<scalar_t>(gs, xs, ks, g, gxp + p * g.h * g.w, gkp + p * g.kh * g.kw, gbs);
        }
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
