// per_sample_conv2d, CPU: a grouped kh x kw convolution in which every sample
// has its own kernels -- a dynamic convolution's general layer once its
// experts are mixed per sample (see dynkernels/ops/dynamic_conv.py):
//   y[b, o] = bias[b, o] + sum_{c in o's group, i, j} k[b, o, c, i, j] x[b, c, oy*s - p + i*d, ox*s - p + j*d]
// (zero outside the plane).
//
// Blocked im2col + GEMM. One task per (sample, group), at::parallel_for over
// the B * groups tasks; each walks its output rows in blocks whose size is
// set by the shape alone (an im2col block of about 2^18 elements: 1 MiB in
// float32, so it stays in the core's 2 MiB L2 between being written and being
// read by the GEMM) and runs one single-threaded BLAS GEMM per block into y (the
// full (Cin/g*kh*kw, Ho*Wo) im2col matrix is never built). Channels-first x:
// col is (Cin/g*kh*kw, P) and y_block = K_b (Cout/g, depth) col. Channels-last
// x: col is (P, kh*kw*Cin/g) -- each tap one contiguous channel vector --,
// the kernels are reordered to (Cout, kh, kw, Cin/g), y_block = col K_b^T, and
// y comes back channels-last.
// Backward, by the same tasks and blocks: dK_b accumulates dy_block col^T
// block after block (a fixed order), dx by col2im of K_b^T dy_block into the
// task's own channels (no races), dbias as each filter's sum of dy.
// Deterministic: no reduction crosses tasks, and the blocks are the same
// whatever the thread count, so a run repeats bit for bit; across pool sizes
// MKL's GEMMs may round differently (as torch's own conv and matmul do).
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/checks.h"
#include "dynamic_conv/geometry.h"

namespace {

using dynkernels::dynamic_conv::Geometry;
using dynkernels::dynamic_conv::is_nhwc;
using dynkernels::dynamic_conv::valid_columns;

struct Plan {
  Geometry g;
  int64_t batch, groups, cin, cout, cg, og, depth, rows, blocks;
  bool nhwc;
};

Plan make_plan(const at::Tensor& x, const at::Tensor& kernels, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups) {
  DK_CHECK_CPU(x);
  DK_CHECK_CPU(kernels);
  DK_CHECK_DIM(x, 4);
  DK_CHECK_DIM(kernels, 5);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && kernels.size(1) % groups == 0,
              "groups must divide Cin and Cout, got groups=", groups);
  TORCH_CHECK(kernels.size(0) == x.size(0) && kernels.size(2) * groups == x.size(1),
              "kernels must be (B, Cout, Cin / groups, kh, kw) for x ", x.sizes(), " and groups=", groups, ", got ",
              kernels.sizes());
  TORCH_CHECK(x.scalar_type() == kernels.scalar_type(), "x and kernels must share a dtype");
  Plan p;
  p.g = dynkernels::dynamic_conv::make_geometry(x, kernels.size(3), kernels.size(4), stride, padding, dilation);
  p.batch = x.size(0);
  p.groups = groups;
  p.cin = x.size(1);
  p.cout = kernels.size(1);
  p.cg = kernels.size(2);
  p.og = p.cout / groups;
  p.depth = p.cg * p.g.kh * p.g.kw;
  constexpr int64_t kBlockElements = int64_t(1) << 18;
  p.rows = std::clamp<int64_t>(kBlockElements / std::max<int64_t>(1, p.depth * p.g.ow), 1, p.g.oh);
  p.blocks = (p.g.oh + p.rows - 1) / p.rows;
  p.nhwc = is_nhwc(x);
  return p;
}

// ---- im2col / col2im on output rows [r0, r1) --------------------------------

// x: one sample's group (cg, H, W) -> col (cg*kh*kw, P), P = (r1 - r0) * Wo
template <typename T>
void im2col_nchw(const T* x, const Geometry& g, int64_t cg, int64_t r0, int64_t r1, T* col) {
  const int64_t p = (r1 - r0) * g.ow;
  for (int64_t c = 0; c < cg; ++c) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t lo, hi;
        valid_columns(g, j, lo, hi);
        const int64_t off = j * g.dx - g.px;
        T* dst = col + ((c * g.kh + i) * g.kw + j) * p;
        for (int64_t oy = r0; oy < r1; ++oy) {
          T* out = dst + (oy - r0) * g.ow;
          const int64_t iy = oy * g.sy - g.py + i * g.dy;
          if (iy < 0 || iy >= g.h) {
            std::fill(out, out + g.ow, T(0));
            continue;
          }
          const T* src = x + (c * g.h + iy) * g.w;
          std::fill(out, out + lo, T(0));
          if (g.sx == 1) {
            std::copy(src + lo + off, src + hi + off, out + lo);
          } else {
            for (int64_t ox = lo; ox < hi; ++ox) out[ox] = src[ox * g.sx + off];
          }
          std::fill(out + hi, out + g.ow, T(0));
        }
      }
    }
  }
}

// gx: one sample's group (cg, H, W) += col2im(dcol (cg*kh*kw, P))
template <typename T>
void col2im_nchw(const T* dcol, const Geometry& g, int64_t cg, int64_t r0, int64_t r1, T* gx) {
  const int64_t p = (r1 - r0) * g.ow;
  for (int64_t c = 0; c < cg; ++c) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t lo, hi;
        valid_columns(g, j, lo, hi);
        const int64_t off = j * g.dx - g.px;
        const T* src = dcol + ((c * g.kh + i) * g.kw + j) * p;
        for (int64_t oy = r0; oy < r1; ++oy) {
          const int64_t iy = oy * g.sy - g.py + i * g.dy;
          if (iy < 0 || iy >= g.h) continue;
          const T* __restrict__ in = src + (oy - r0) * g.ow;
          T* __restrict__ dst = gx + (c * g.h + iy) * g.w + off;
          for (int64_t ox = lo; ox < hi; ++ox) dst[ox * g.sx] += in[ox];
        }
      }
    }
  }
}

// x: one sample (H, W, Cin) from its group's first channel -> col (P, kh*kw*cg)
template <typename T>
void im2col_nhwc(const T* x, const Geometry& g, int64_t cin, int64_t cg, int64_t r0, int64_t r1, T* col) {
  const int64_t depth = g.kh * g.kw * cg;
  for (int64_t oy = r0; oy < r1; ++oy) {
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      T* out = col + ((oy - r0) * g.ow + ox) * depth;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t iy = oy * g.sy - g.py + i * g.dy;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t ix = ox * g.sx - g.px + j * g.dx;
          T* dst = out + (i * g.kw + j) * cg;
          if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) {
            std::fill(dst, dst + cg, T(0));
          } else {
            const T* src = x + (iy * g.w + ix) * cin;
            std::copy(src, src + cg, dst);
          }
        }
      }
    }
  }
}

// gx: one sample (H, W, Cin) from its group's first channel += col2im(dcol (P, kh*kw*cg))
template <typename T>
void col2im_nhwc(const T* dcol, const Geometry& g, int64_t cin, int64_t cg, int64_t r0, int64_t r1, T* gx) {
  const int64_t depth = g.kh * g.kw * cg;
  for (int64_t oy = r0; oy < r1; ++oy) {
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      const T* in = dcol + ((oy - r0) * g.ow + ox) * depth;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t iy = oy * g.sy - g.py + i * g.dy;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t ix = ox * g.sx - g.px + j * g.dx;
          if (ix < 0 || ix >= g.w) continue;
          const T* __restrict__ src = in + (i * g.kw + j) * cg;
          T* __restrict__ dst = gx + (iy * g.w + ix) * cin;
          for (int64_t c = 0; c < cg; ++c) dst[c] += src[c];
        }
      }
    }
  }
}

// ---- the tasks ---------------------------------------------------------------

// The block's im2col matrix, in the layout the GEMMs read.
template <typename T>
at::Tensor fill_col(const Plan& p, const T* xs, int64_t r0, int64_t r1, at::Tensor& buffer) {
  const int64_t pixels = (r1 - r0) * p.g.ow;
  T* col = buffer.data_ptr<T>();
  if (p.nhwc) {
    im2col_nhwc(xs, p.g, p.cin, p.cg, r0, r1, col);
    return buffer.narrow(0, 0, pixels * p.depth).view({pixels, p.depth});
  }
  im2col_nchw(xs, p.g, p.cg, r0, r1, col);
  return buffer.narrow(0, 0, pixels * p.depth).view({p.depth, pixels});
}

// Pointer to sample b's group grp in x (either layout).
template <typename T>
const T* group_input(const Plan& p, const T* x, int64_t b, int64_t grp) {
  const int64_t plane = p.g.h * p.g.w;
  return p.nhwc ? x + b * plane * p.cin + grp * p.cg : x + (b * p.cin + grp * p.cg) * plane;
}

at::Tensor per_sample_conv_cpu(const at::Tensor& x, const at::Tensor& kernels, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const Plan p = make_plan(x, kernels, stride, padding, dilation, groups);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == p.batch && bias->size(1) == p.cout &&
                    bias->scalar_type() == x.scalar_type(),
                "bias must be (B, Cout) of x's dtype, got ", bias->sizes());
  }
  const at::MemoryFormat format = p.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // detached: the GEMMs below (run on the pool's threads, where no grad-mode guard reaches) are
  // the kernel's own work, never autograd's
  const at::Tensor xc = x.detach().contiguous(format);
  // (B, groups, Cout/g, depth), depth in col's order: (c, i, j) channels-first, (i, j, c) channels-last
  const at::Tensor km = (p.nhwc ? kernels.detach().permute({0, 1, 3, 4, 2}) : kernels.detach())
                            .contiguous()
                            .view({p.batch, p.groups, p.og, p.depth});
  const at::Tensor bm = bias.has_value() ? bias->detach().contiguous().view({p.batch, p.groups, p.og}) : at::Tensor();
  at::Tensor y = at::empty({p.batch, p.cout, p.g.oh, p.g.ow}, x.options().memory_format(format));
  const int64_t plane_out = p.g.oh * p.g.ow;
  // channels-first: (B, groups, Cout/g, Ho*Wo); channels-last: (B, Ho*Wo, Cout)
  const at::Tensor ym = p.nhwc ? y.permute({0, 2, 3, 1}).view({p.batch, plane_out, p.cout})
                               : y.view({p.batch, p.groups, p.og, plane_out});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_sample_conv_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    at::parallel_for(0, p.batch * p.groups, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = at::empty({p.depth * p.rows * p.g.ow}, x.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / p.groups, grp = t % p.groups;
        const at::Tensor k = km[b][grp];
        for (int64_t blk = 0; blk < p.blocks; ++blk) {
          const int64_t r0 = blk * p.rows, r1 = std::min(p.g.oh, r0 + p.rows), pixels = (r1 - r0) * p.g.ow;
          const at::Tensor col = fill_col<scalar_t>(p, group_input(p, xp, b, grp), r0, r1, buffer);
          if (p.nhwc) {
            at::Tensor out = ym[b].narrow(0, r0 * p.g.ow, pixels).narrow(1, grp * p.og, p.og);  // (P, Cout/g)
            if (bm.defined()) {
              at::addmm_out(out, bm[b][grp].unsqueeze(0).expand({pixels, p.og}), col, k.t());
            } else {
              at::mm_out(out, col, k.t());
            }
          } else {
            at::Tensor out = ym[b][grp].narrow(1, r0 * p.g.ow, pixels);  // (Cout/g, P)
            if (bm.defined()) {
              at::addmm_out(out, bm[b][grp].unsqueeze(1).expand({p.og, pixels}), k, col);
            } else {
              at::mm_out(out, k, col);
            }
          }
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> per_sample_conv_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& kernels, bool with_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Plan p = make_plan(x, kernels, stride, padding, dilation, groups);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == p.batch && grad.size(1) == p.cout && grad.size(2) == p.g.oh &&
                  grad.size(3) == p.g.ow && grad.scalar_type() == x.scalar_type(),
              "grad must be (B, Cout, Ho, Wo) = the forward's output shape, got ", grad.sizes());
  const at::MemoryFormat format = p.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor xc = x.detach().contiguous(format), gc = grad.detach().contiguous(format);  // see the forward
  const at::Tensor kperm = p.nhwc ? kernels.detach().permute({0, 1, 3, 4, 2}) : kernels.detach();
  const at::Tensor km = kperm.contiguous().view({p.batch, p.groups, p.og, p.depth});
  at::Tensor gkm = at::empty({p.batch, p.groups, p.og, p.depth}, x.options());
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(format)).zero_();  // (at::zeros drops the format)
  at::Tensor gb = with_bias ? at::empty({p.batch, p.cout}, x.options()) : at::empty({0}, x.options());
  const int64_t plane_out = p.g.oh * p.g.ow;
  const at::Tensor dym = p.nhwc ? gc.permute({0, 2, 3, 1}).view({p.batch, plane_out, p.cout})
                                : gc.view({p.batch, p.groups, p.og, plane_out});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_sample_conv_backward_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gbp = with_bias ? gb.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, p.batch * p.groups, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = at::empty({p.depth * p.rows * p.g.ow}, x.options());
      at::Tensor dbuffer = at::empty({p.depth * p.rows * p.g.ow}, x.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / p.groups, grp = t % p.groups;
        const at::Tensor k = km[b][grp];
        at::Tensor gk = gkm[b][grp];  // (Cout/g, depth)
        scalar_t* gxs = const_cast<scalar_t*>(group_input(p, static_cast<const scalar_t*>(gxp), b, grp));
        for (int64_t blk = 0; blk < p.blocks; ++blk) {
          const int64_t r0 = blk * p.rows, r1 = std::min(p.g.oh, r0 + p.rows), pixels = (r1 - r0) * p.g.ow;
          const at::Tensor col = fill_col<scalar_t>(p, group_input(p, xp, b, grp), r0, r1, buffer);
          scalar_t* dcol = dbuffer.data_ptr<scalar_t>();
          if (p.nhwc) {
            const at::Tensor dy = dym[b].narrow(0, r0 * p.g.ow, pixels).narrow(1, grp * p.og, p.og);  // (P, Cout/g)
            if (blk == 0) {
              at::mm_out(gk, dy.t(), col);
            } else {
              gk.addmm_(dy.t(), col);
            }
            at::Tensor dc = dbuffer.narrow(0, 0, pixels * p.depth).view({pixels, p.depth});
            at::mm_out(dc, dy, k);
            col2im_nhwc(dcol, p.g, p.cin, p.cg, r0, r1, gxs);
          } else {
            const at::Tensor dy = dym[b][grp].narrow(1, r0 * p.g.ow, pixels);  // (Cout/g, P)
            if (blk == 0) {
              at::mm_out(gk, dy, col.t());
            } else {
              gk.addmm_(dy, col.t());
            }
            at::Tensor dc = dbuffer.narrow(0, 0, pixels * p.depth).view({p.depth, pixels});
            at::mm_out(dc, k.t(), dy);
            col2im_nchw(dcol, p.g, p.cg, r0, r1, gxs);
          }
        }
        if (gbp == nullptr) continue;
        // each filter's sum of dy over the pixels, in pixel order
        const scalar_t* dyp = gc.const_data_ptr<scalar_t>();
        for (int64_t o = 0; o < p.og; ++o) {
          const int64_t ch = grp * p.og + o;
          scalar_t total = scalar_t(0);
          if (p.nhwc) {
            for (int64_t q = 0; q < plane_out; ++q) total += dyp[(b * plane_out + q) * p.cout + ch];
          } else {
            const scalar_t* row = dyp + (b * p.cout + ch) * plane_out;
            for (int64_t q = 0; q < plane_out; ++q) total += row[q];
          }
          gbp[b * p.cout + ch] = total;
        }
      }
    });
  });
  // back to (B, Cout, Cin/g, kh, kw)
  at::Tensor gk = p.nhwc ? gkm.view({p.batch, p.cout, p.g.kh, p.g.kw, p.cg}).permute({0, 1, 4, 2, 3}).contiguous()
                         : gkm.view(kernels.sizes());
  return {gx, gk, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("per_sample_conv2d", &per_sample_conv_cpu);
  m.impl("per_sample_conv2d_backward", &per_sample_conv_backward_cpu);
}
