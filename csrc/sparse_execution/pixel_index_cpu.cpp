// Spatially sparse execution, CPU: mask compaction and pixel gather/scatter
// (see dynkernels/ops/sparse_execution.py).
//
// mask_to_index: the active pixels of a (B, 1, H, W) bool mask -- with a halo,
// of the mask dilated by a (2 halo + 1)^2 square -- as flat indices
// b*H*W + y*W + x in increasing order. The dilation is separable: a running
// count over each row's window (threads over rows), then a running count over
// each column's window (threads over samples, rows in order). Then each row's
// active count (threads over rows), one serial prefix sum over the B*H rows,
// and each row writes its indices (and the inverse map) from its offset.
// O(B*H*W) whatever the halo; the output is the same whatever the threads.
//
// gather_pixels: rows (P, C) of x (B, C, H, W) at flat indices (-1: a zero
// row). Channels-last x: one contiguous copy of C values per row (threads
// over rows). Channels-first x: blocks of 64 rows, channel by channel, so that
// the reads of one channel plane walk forward through it.
// scatter_pixels: out with rows written (set) or added (add) at the indices
// (-1: dropped), out of place. Indices that repeat are refused in set mode;
// in add mode they are summed in row order by threads that own channel ranges
// (no races, deterministic); unique indices run threads over rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "sparse_execution/masked_geometry.h"

namespace {

using dynkernels::CpuIsa;

bool is_nhwc(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

// Running-window OR of `in` (n values, stride `step`) into `out`: out[i] = any(in[i-h .. i+h]).
inline void window_or(const uint8_t* in, int64_t n, int64_t step, int64_t h, uint8_t* out) {
  int64_t count = 0;
  for (int64_t i = 0; i < std::min(n, h); ++i) count += in[i * step];
  for (int64_t i = 0; i < n; ++i) {
    if (i + h < n) count += in[(i + h) * step];
    if (i - h - 1 >= 0) count -= in[(i - h - 1) * step];
    out[i * step] = count > 0;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_to_index_cpu(const at::Tensor& mask, int64_t halo,
                                                                 int64_t capacity, bool with_inverse) {
  DK_CHECK_CPU(mask);
  DK_CHECK_DIM(mask, 4);
  TORCH_CHECK(mask.size(1) == 1 && mask.scalar_type() == at::kBool, "mask must be (B, 1, H, W) bool, got ",
              mask.sizes(), " ", mask.scalar_type());
  TORCH_CHECK(halo >= 0, "halo must be >= 0, got ", halo);
  const int64_t batch = mask.size(0), h = mask.size(2), w = mask.size(3), rows = batch * h, plane = h * w;
  const at::Tensor m = mask.contiguous().view(at::kByte);
  at::Tensor dilated = m;
  if (halo > 0) {
    at::Tensor across = at::empty({batch * plane}, m.options());
    dilated = at::empty({batch * plane}, m.options());
    const uint8_t* mp = m.const_data_ptr<uint8_t>();
    uint8_t* ap = across.data_ptr<uint8_t>();
    uint8_t* dp = dilated.data_ptr<uint8_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) window_or(mp + r * w, w, 1, halo, ap + r * w);
    });
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> count(w);
      for (int64_t b = begin; b < end; ++b) {
        const uint8_t* in = ap + b * plane;
        uint8_t* out = dp + b * plane;
        std::fill(count.begin(), count.end(), 0);
        for (int64_t y = 0; y < std::min(h, halo); ++y) {
          for (int64_t x = 0; x < w; ++x) count[x] += in[y * w + x];
        }
        for (int64_t y = 0; y < h; ++y) {
          if (y + halo < h) {
            for (int64_t x = 0; x < w; ++x) count[x] += in[(y + halo) * w + x];
          }
          if (y - halo - 1 >= 0) {
            for (int64_t x = 0; x < w; ++x) count[x] -= in[(y - halo - 1) * w + x];
          }
          for (int64_t x = 0; x < w; ++x) out[y * w + x] = count[x] > 0;
        }
      }
    });
  }
  const uint8_t* act = dilated.const_data_ptr<uint8_t>();
  std::vector<int64_t> offsets(rows + 1, 0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = 0;
      for (int64_t x = 0; x < w; ++x) n += act[r * w + x] != 0;
      offsets[r + 1] = n;
    }
  });
  for (int64_t r = 0; r < rows; ++r) offsets[r + 1] += offsets[r];
  const int64_t total = offsets[rows];
  const int64_t size = capacity < 0 ? total : capacity;
  TORCH_CHECK_VALUE(total <= size, "capacity overflow: the mask has ", total, " active pixels, capacity is ", size);
  at::Tensor index = at::empty({size}, mask.options().dtype(at::kLong));
  at::Tensor inverse = at::empty({with_inverse ? batch : 0, h, w}, mask.options().dtype(at::kLong));
  int64_t* ip = index.data_ptr<int64_t>();
  int64_t* vp = with_inverse ? inverse.data_ptr<int64_t>() : nullptr;
  std::fill(ip + total, ip + size, int64_t(-1));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t next = offsets[r];
      for (int64_t x = 0; x < w; ++x) {
        const bool on = act[r * w + x] != 0;
        if (vp != nullptr) vp[r * w + x] = on ? next : -1;
        if (on) ip[next++] = r * w + x;
      }
    }
  });
  return {index, at::scalar_tensor(total, mask.options().dtype(at::kLong)), inverse};
}

// index (P,) int64 in [-1, n): refuses anything else; with `repeats`, also says whether an index repeats.
void check_pixel_index(const at::Tensor& index, int64_t n, bool* repeats = nullptr) {
  DK_CHECK_CPU(index);
  DK_CHECK_DIM(index, 1);
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  const int64_t* ip = index.const_data_ptr<int64_t>();
  int64_t low = 0, high = -1;
  for (int64_t p = 0; p < index.numel(); ++p) {
    low = std::min(low, ip[p]);
    high = std::max(high, ip[p]);
  }
  TORCH_CHECK_INDEX(low >= -1 && high < n, "index must hold pixels in [-1, B*H*W = ", n, "), got values in [", low,
                    ", ", high, "]");
  if (repeats == nullptr) return;
  std::vector<uint8_t> seen(n, 0);
  *repeats = false;
  for (int64_t p = 0; p < index.numel(); ++p) {
    if (ip[p] < 0) continue;
    *repeats = *repeats || seen[ip[p]] != 0;
    seen[ip[p]] = 1;
  }
}

constexpr int64_t kRowBlock = 64;

at::Tensor gather_pixels_cpu(const at::Tensor& x, const at::Tensor& index) {
  DK_CHECK_CPU(x);
  DK_CHECK_DIM(x, 4);
  const int64_t batch = x.size(0), c = x.size(1), plane = x.size(2) * x.size(3);
  const at::Tensor ic = index.contiguous();
  check_pixel_index(ic, batch * plane);
  const int64_t count = ic.numel();
  const bool nhwc = is_nhwc(x);
  const at::Tensor xc = nhwc ? x : x.contiguous();
  at::Tensor out = at::empty({count, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_pixels_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const int64_t* ip = ic.const_data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (nhwc) {
      at::parallel_for(0, count, kRowBlock, [&](int64_t begin, int64_t end) {
        dynkernels::masked::copy_rows_isa<scalar_t>(xp, ip, c, begin, end, op);
      });
      return;
    }
    const int64_t blocks = (count + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      int64_t base[kRowBlock];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t p0 = blk * kRowBlock, n = std::min(kRowBlock, count - p0);
        for (int64_t q = 0; q < n; ++q) {
          const int64_t i = ip[p0 + q];
          base[q] = i < 0 ? -1 : (i / plane) * c * plane + i % plane;  // x[b, 0, pixel]
        }
        for (int64_t ch = 0; ch < c; ++ch) {
          for (int64_t q = 0; q < n; ++q) {
            op[(p0 + q) * c + ch] = base[q] < 0 ? scalar_t(0) : xp[base[q] + ch * plane];
          }
        }
      }
    });
  });
  return out;
}

at::Tensor scatter_pixels_cpu(const at::Tensor& rows, const at::Tensor& index, const at::Tensor& out, int64_t mode) {
  DK_CHECK_CPU(rows);
  DK_CHECK_CPU(out);
  DK_CHECK_DIM(out, 4);
  DK_CHECK_DIM(rows, 2);
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (set) or 1 (add)");
  const int64_t batch = out.size(0), c = out.size(1), plane = out.size(2) * out.size(3);
  TORCH_CHECK(rows.size(0) == index.numel() && rows.size(1) == c,
              "rows must be (P, C) = (", index.numel(), ", ", c, "), got ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == out.scalar_type(), "rows and out must share a dtype");
  const at::Tensor ic = index.contiguous(), rc = rows.contiguous();
  bool repeats = false;
  check_pixel_index(ic, batch * plane, &repeats);
  TORCH_CHECK_VALUE(!(repeats && mode == 0), "scatter_pixels(mode='set'): an index repeats (which row wins is undefined)");
  const bool nhwc = is_nhwc(out);
  at::Tensor result = out.clone(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t count = ic.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_pixels_cpu", [&] {
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const int64_t* ip = ic.const_data_ptr<int64_t>();
    scalar_t* op = result.data_ptr<scalar_t>();
    // where element (row p, channel ch) lands
    auto target = [&](int64_t i, int64_t ch) {
      return nhwc ? i * c + ch : ((i / plane) * c + ch) * plane + i % plane;
    };
    if (!repeats) {  // each output element receives at most one row: threads over rows
      at::parallel_for(0, count, kRowBlock, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          if (ip[p] < 0) continue;
          for (int64_t ch = 0; ch < c; ++ch) {
            scalar_t& dst = op[target(ip[p], ch)];
            dst = mode == 0 ? rp[p * c + ch] : scalar_t(dst + rp[p * c + ch]);
          }
        }
      });
      return;
    }
    // add with repeats: threads own channels and take the rows in order
    at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = 0; p < count; ++p) {
        if (ip[p] < 0) continue;
        for (int64_t ch = begin; ch < end; ++ch) {
          scalar_t& dst = op[target(ip[p], ch)];
          dst = scalar_t(dst + rp[p * c + ch]);
        }
      }
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("mask_to_index", &mask_to_index_cpu);
  m.impl("gather_pixels", &gather_pixels_cpu);
  m.impl("scatter_pixels", &scatter_pixels_cpu);
}
