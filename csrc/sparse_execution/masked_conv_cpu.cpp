// masked_conv2d, CPU: a dense kh x kw convolution (groups 1) evaluated at the
// active output pixels only (see dynkernels/ops/sparse_execution.py):
//   out[r, :] = bias + sum_{taps (i, j)} rows[inverse[n, y_ij, x_ij], :] @ W[:, :, i, j]^T
// with the same tables and zero rules as masked_depthwise_cpu.cpp.
//
// Forward: blocks of R output rows (R * taps * Cin about 2^17 elements, in
// L2); each block's im2col matrix (R, taps * Cin) is built by copying the
// tap's input row (Cin contiguous values) or zeros, then one single-threaded
// GEMM with the (taps * Cin, Cout) weight writes the block's output rows
// (threads over blocks). No dense image is ever formed.
// Backward, d rows: the same gather-GEMM in the transposed direction -- per
// block of input rows, the output rows whose tap reads each one (through an
// output inverse table), times the (taps * Cout, Cin) weight: no races, no
// atomics. d weight, d bias: fixed chunks of blocks (set by the shape, not the
// thread count), each summing col^T @ grad, then the chunks in order.
// Deterministic and thread-count independent.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "sparse_execution/masked_geometry.h"

namespace {

using dynkernels::masked::Geometry;

Geometry check(const at::Tensor& rows, const at::Tensor& inverse, const at::Tensor& out_index,
               const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  DK_CHECK_DIM(weight, 4);
  TORCH_CHECK(rows.dim() == 2 && weight.size(1) == rows.size(1),
              "weight must be (Cout, Cin, kh, kw) with Cin = rows' channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == rows.scalar_type(), "rows and weight must share a dtype");
  return dynkernels::masked::check_tables(rows, inverse, out_index, weight.size(2), weight.size(3), stride, padding,
                                          dilation);
}

// Rows per block: the block's im2col matrix about 2^17 elements, a multiple of 16 in [16, 512].
int64_t block_rows(int64_t depth) { return std::clamp<int64_t>((int64_t(1) << 17) / depth / 16 * 16, 16, 512); }

// col (r1 - r0, taps * width): row r's taps are src's rows source(r, table) writes, or zeros.
template <typename T, typename Source>
void fill_block(const T* src, int64_t width, int64_t taps, int64_t r0, int64_t r1, const Source& source,
                std::vector<int64_t>& table, T* col) {
  table.resize((r1 - r0) * taps);
  for (int64_t r = r0; r < r1; ++r) source(r, table.data() + (r - r0) * taps);
  dynkernels::masked::copy_rows_isa<T>(src, table.data(), width, 0, (r1 - r0) * taps, col);
}

// out (count, cols) = gather(src through source) @ weight (taps * width, cols), by blocks of rows.
template <typename T, typename Source>
void gather_gemm(const at::Tensor& src, int64_t taps, int64_t count, const Source& source, const at::Tensor& weight,
                 at::Tensor& out) {
  const int64_t width = src.size(1), depth = taps * width, rows = block_rows(depth);
  const int64_t blocks = (count + rows - 1) / rows;
  const T* sp = src.const_data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({rows, depth}, src.options());
    std::vector<int64_t> table;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * rows, r1 = std::min(count, r0 + rows);
      fill_block<T>(sp, width, taps, r0, r1, source, table, buffer.data_ptr<T>());
      at::Tensor dst = out.narrow(0, r0, r1 - r0);
      at::mm_out(dst, buffer.narrow(0, 0, r1 - r0), weight);
    }
  });
}

at::Tensor masked_conv_cpu(const at::Tensor& rows, const at::Tensor& inverse, const at::Tensor& out_index,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check(rows, inverse, out_index, weight, stride, padding, dilation);
  const int64_t cout = weight.size(0), taps = g.kh * g.kw, count = out_index.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cout && bias->scalar_type() == rows.scalar_type(),
                "bias must be (Cout,) of rows' dtype, got ", bias->sizes());
  }
  // detached: the GEMMs run on the pool's threads, where no grad-mode guard reaches
  const at::Tensor rc = rows.detach().contiguous(), ic = inverse.contiguous(), oc = out_index.contiguous();
  const at::Tensor wm = weight.detach().permute({2, 3, 1, 0}).contiguous().view({taps * g.c, cout});
  const at::Tensor bc = bias.has_value() ? bias->detach().contiguous() : at::Tensor();
  at::Tensor out = at::empty({count, cout}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "masked_conv_cpu", [&] {
    const int64_t* ip = ic.const_data_ptr<int64_t>();
    const int64_t* op = oc.const_data_ptr<int64_t>();
    const auto source = [&](int64_t r, int64_t* taps) { dynkernels::masked::input_rows(g, ip, op[r], taps); };
    gather_gemm<scalar_t>(rc, taps, count, source, wm, out);
    // the bias on the output rows; padding rows (out_index -1) zero
    scalar_t* yp = out.data_ptr<scalar_t>();
    const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* y = yp + r * cout;
        if (op[r] < 0) {
          std::fill(y, y + cout, scalar_t(0));
        } else if (bp != nullptr) {
          for (int64_t o = 0; o < cout; ++o) y[o] += bp[o];
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& inverse, const at::Tensor& out_index,
    const at::Tensor& weight, bool with_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const Geometry g = check(rows, inverse, out_index, weight, stride, padding, dilation);
  const int64_t cout = weight.size(0), taps = g.kh * g.kw, count = out_index.size(0), rows_in = rows.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == count && grad.size(1) == cout &&
                  grad.scalar_type() == rows.scalar_type(),
              "grad must be (P_out, Cout) of rows' dtype, got ", grad.sizes());
  const at::Tensor gc = grad.detach().contiguous(), rc = rows.detach().contiguous(), ic = inverse.contiguous(),
                   oc = out_index.contiguous();
  std::vector<int64_t> in_pixel, out_row;
  dynkernels::masked::invert_tables(g, ic.const_data_ptr<int64_t>(), oc.const_data_ptr<int64_t>(), rows_in, count,
                                    in_pixel, out_row);
  // (taps * Cout, Cin): W'[(t, co), ci] = W[co, ci, t]
  const at::Tensor wt = weight.detach().permute({2, 3, 0, 1}).contiguous().view({taps * cout, g.c});
  at::Tensor g_rows = at::empty({rows_in, g.c}, rows.options());
  const int64_t depth = taps * g.c, rows_per = block_rows(depth);
  const int64_t blocks = (count + rows_per - 1) / rows_per, per_chunk = 8;
  const int64_t chunks = std::max<int64_t>((blocks + per_chunk - 1) / per_chunk, 1);
  at::Tensor parts = at::zeros({chunks, depth + 1, cout}, rows.options());  // the last row: d bias
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "masked_conv_backward_cpu", [&] {
    const int64_t* ip = ic.const_data_ptr<int64_t>();
    const int64_t* op = oc.const_data_ptr<int64_t>();
    const auto reader = [&](int64_t q, int64_t* taps) {
      dynkernels::masked::output_rows(g, out_row.data(), in_pixel[q], taps);
    };
    gather_gemm<scalar_t>(gc, taps, rows_in, reader, wt, g_rows);
    const auto source = [&](int64_t r, int64_t* taps) { dynkernels::masked::input_rows(g, ip, op[r], taps); };
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = at::empty({rows_per, depth}, rows.options());
      std::vector<int64_t> table;
      for (int64_t k = begin; k < end; ++k) {
        at::Tensor part = parts[k].narrow(0, 0, depth);
        scalar_t* bias_sum = parts[k][depth].data_ptr<scalar_t>();
        for (int64_t blk = k * per_chunk; blk < std::min(blocks, (k + 1) * per_chunk); ++blk) {
          const int64_t r0 = blk * rows_per, r1 = std::min(count, r0 + rows_per);
          fill_block<scalar_t>(rp, g.c, taps, r0, r1, source, table, buffer.data_ptr<scalar_t>());
          part.addmm_(buffer.narrow(0, 0, r1 - r0).t(), gc.narrow(0, r0, r1 - r0));
          for (int64_t r = r0; r < r1; ++r) {
            if (op[r] < 0) continue;  // a padding row: no output, no gradient
            for (int64_t o = 0; o < cout; ++o) bias_sum[o] += gp[r * cout + o];
          }
        }
      }
    });
  });
  at::Tensor total = parts[0].clone();
  for (int64_t k = 1; k < chunks; ++k) total.add_(parts[k]);  // in chunk order
  at::Tensor g_weight = total.narrow(0, 0, depth).view({g.kh, g.kw, g.c, cout}).permute({3, 2, 0, 1}).contiguous();
  at::Tensor g_bias = with_bias ? total[depth].clone() : at::empty({0}, rows.options());
  return {g_rows, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("masked_conv2d", &masked_conv_cpu);
  m.impl("masked_conv2d_backward", &masked_conv_backward_cpu);
}
