// crop_patches, CPU: GFNet's focus patches (see dynkernels/ops/early_exit.py)
// in one pass, without the official per-sample loop and its four .item() reads.
//
// Sample b's window starts at oy = floor(a[b, 0] * (H - P)), ox = floor(a[b, 1] * (W - P)),
// the product taken in the actions' dtype (as the official float32 product);
// a NaN or an offset outside [0, S - P] is clamped into the image (the op
// checks the range before calling us on a CPU).
//   out[s, c, y, x] = img[r_s, c, oy_s + y, ox_s + x],  r_s = index[s] (default s)
// (the index lets an early-exit loop crop its active samples straight from the
// full batch, without compacting the images first).
// The backward writes the whole image gradient once: the window's rows from
// the patch gradient, zeros elsewhere (windows of different samples never
// meet, so no accumulation). Rows are memcpy'd: P elements per (b, c, y) in
// NCHW, P * C per (b, y) in channels-last (the output keeps the layout).
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common/checks.h"

namespace {

bool use_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

int64_t clamp_offset(double v, int64_t span) {
  if (!(v >= 0)) return 0;  // NaN too
  const double f = std::floor(v);
  return f > double(span) ? span : int64_t(f);
}

// offsets (2 per sample: y, x) from the actions, in the actions' own arithmetic
std::vector<int64_t> window_offsets(const at::Tensor& actions_in, int64_t h, int64_t w, int64_t p) {
  const at::Tensor actions = actions_in.contiguous();
  const int64_t b = actions.size(0);
  std::vector<int64_t> off(2 * b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, actions.scalar_type(), "crop_patches_offsets", [&] {
    const scalar_t* a = actions.data_ptr<scalar_t>();
    const scalar_t sy = scalar_t(h - p), sx = scalar_t(w - p);
    for (int64_t i = 0; i < b; ++i) {
      const scalar_t py = a[2 * i] * sy, px = a[2 * i + 1] * sx;  // rounded to scalar_t, as torch's product
      off[2 * i] = clamp_offset(double(py), h - p);
      off[2 * i + 1] = clamp_offset(double(px), w - p);
    }
  });
  return off;
}

void check_actions(const at::Tensor& actions, int64_t b) {
  DK_CHECK_CPU(actions);
  TORCH_CHECK(actions.dim() == 2 && actions.size(0) == b && actions.size(1) == 2,
              "actions must be (B = ", b, ", 2), got ", actions.sizes());
  TORCH_CHECK(at::isFloatingType(actions.scalar_type()), "actions must be floating, got ", actions.scalar_type());
}

at::Tensor crop_patches_cpu(const at::Tensor& images, const at::Tensor& actions, const c10::optional<at::Tensor>& index_in,
                            int64_t p) {
  DK_CHECK_CPU(images);
  DK_CHECK_DIM(images, 4);
  const int64_t n_images = images.size(0), c = images.size(1), h = images.size(2), w = images.size(3);
  const bool indexed = index_in.has_value() && index_in->defined();
  const int64_t b = indexed ? index_in->numel() : n_images;
  check_actions(actions, b);
  std::vector<int64_t> rows;
  if (indexed) {
    DK_CHECK_CPU((*index_in));
    TORCH_CHECK(index_in->dim() == 1 && index_in->scalar_type() == at::kLong, "index must be a (n,) int64 tensor, got ",
                index_in->scalar_type(), " ", index_in->sizes());
    const at::Tensor index = index_in->contiguous();
    const int64_t* ix = index.data_ptr<int64_t>();
    rows.assign(ix, ix + b);
    for (int64_t r : rows) TORCH_CHECK(r >= 0 && r < n_images, "index must lie in [0, ", n_images, "), got ", r);
  }
  TORCH_CHECK(p >= 1 && p <= h && p <= w, "patch_size must lie in [1, min(H, W) = ", std::min(h, w), "], got ", p);
  const bool cl = use_channels_last(images);
  const at::Tensor src = cl ? images : images.contiguous();
  at::Tensor out =
      at::empty({b, c, p, p}, images.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const std::vector<int64_t> off = window_offsets(actions, h, w, p);
  const int64_t es = int64_t(src.element_size());
  const char* in = static_cast<const char*>(src.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  // a row is P elements (NCHW) or P * C (channels-last); rows per sample C * P or P
  const int64_t row = cl ? p * c : p, rows_per = cl ? p : c * p;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row * es));
  at::parallel_for(0, b * rows_per, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t s = r / rows_per, y = r % p;
      const int64_t oy = off[2 * s], ox = off[2 * s + 1], img = indexed ? rows[s] : s;
      int64_t from;
      if (cl) {
        from = ((img * h + oy + y) * w + ox) * c;
      } else {
        const int64_t ch = (r / p) % c;
        from = ((img * c + ch) * h + oy + y) * w + ox;
      }
      std::memcpy(o + r * row * es, in + from * es, size_t(row * es));
    }
  });
  return out;
}

at::Tensor crop_patches_backward_cpu(const at::Tensor& grad_in, const at::Tensor& actions, int64_t h, int64_t w) {
  DK_CHECK_CPU(grad_in);
  DK_CHECK_DIM(grad_in, 4);
  const int64_t b = grad_in.size(0), c = grad_in.size(1), p = grad_in.size(2);
  TORCH_CHECK(grad_in.size(3) == p && p <= h && p <= w, "grad must be (B, C, P, P) with P <= H, W, got ", grad_in.sizes());
  check_actions(actions, b);
  const bool cl = use_channels_last(grad_in);
  const at::Tensor grad = cl ? grad_in : grad_in.contiguous();
  at::Tensor out =
      at::empty({b, c, h, w}, grad.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const std::vector<int64_t> off = window_offsets(actions, h, w, p);
  const int64_t es = int64_t(grad.element_size());
  const char* g = static_cast<const char*>(grad.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  // an image row is W elements (NCHW) or W * C (channels-last), a patch row P or P * C
  const int64_t k = cl ? c : 1, row = w * k, prow = p * k, rows_per = cl ? h : c * h;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row * es));
  at::parallel_for(0, b * rows_per, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t s = r / rows_per, y = r % h;
      const int64_t oy = off[2 * s], ox = off[2 * s + 1];
      char* dst = o + r * row * es;
      if (y < oy || y >= oy + p) {
        std::memset(dst, 0, size_t(row * es));
        continue;
      }
      const int64_t patch_row = cl ? (s * p + (y - oy)) : ((s * c + (r / h) % c) * p + (y - oy));
      std::memset(dst, 0, size_t(ox * k * es));
      std::memcpy(dst + ox * k * es, g + patch_row * prow * es, size_t(prow * es));
      std::memset(dst + (ox * k + prow) * es, 0, size_t((row - ox * k - prow) * es));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("crop_patches", &crop_patches_cpu);
  m.impl("crop_patches_backward", &crop_patches_backward_cpu);
}
