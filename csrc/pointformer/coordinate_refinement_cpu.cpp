// coordinate_refinement and its backward, CPU (Pointformer, Eq. 5-6).
//
// Args:    attn (B, M, H, R, S) attention probabilities, grouped_xyz (B, 3, M, S)
//          in attn's dtype, row_index (B, M) int64 in [-1, R).
// Forward: w[s] = (1/H) sum_h attn[b, m, h, r, s] for r = row_index[b, m], or
//          the mean of that over all R rows when r == -1;
//          out[b, m, c] = sum_s w[s] * grouped_xyz[b, c, m, s]   -> (B, M, 3).
// Backward: grad_xyz[b, c, m, s] = w[s] * g[b, m, c];
//          grad_attn[b, m, h, r', s] = (sum_c g[b, m, c] xyz[b, c, m, s]) / H on
//          the picked row (/ (H R) on every row for the mean), zero elsewhere.
// Accumulation in fp32 for half types. Threads: parallel over B*M groups.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "pointformer/pointformer_checks.h"

namespace {

// w (S) in acc_t for one group; attn points at the group's (H, R, S) block.
template <typename scalar_t, typename acc_t>
void group_weights(const scalar_t* attn, int64_t heads, int64_t rows, int64_t s, int64_t row, acc_t* w) {
  std::fill(w, w + s, acc_t(0));
  const int64_t r0 = row < 0 ? 0 : row, r1 = row < 0 ? rows : row + 1;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* a = attn + (h * rows + r) * s;
      for (int64_t j = 0; j < s; ++j) w[j] += static_cast<acc_t>(a[j]);
    }
  }
  const acc_t scale = acc_t(1) / static_cast<acc_t>(heads * (r1 - r0));
  for (int64_t j = 0; j < s; ++j) w[j] *= scale;
}

void check_rows(const int64_t* row, int64_t count, int64_t rows) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_INDEX(row[i] >= -1 && row[i] < rows, "row_index must be in [-1, ", rows, "), got ", row[i]);
  }
}

at::Tensor coordinate_refinement_cpu(const at::Tensor& attn, const at::Tensor& grouped_xyz,
                                     const at::Tensor& row_index) {
  DK_CHECK_CPU(attn);
  dynkernels::pointformer::check_refinement_args(attn, grouped_xyz, row_index);
  const int64_t batch = attn.size(0), m = attn.size(1), heads = attn.size(2), rows = attn.size(3), s = attn.size(4);
  at::Tensor out = at::empty({batch, m, 3}, grouped_xyz.options());
  if (out.numel() == 0) return out;
  at::Tensor a = attn.contiguous(), xyz = grouped_xyz.contiguous(), ri = row_index.contiguous();
  const int64_t* row = ri.const_data_ptr<int64_t>();
  check_rows(row, batch * m, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "coordinate_refinement_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* xp = xyz.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * m, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> w(s);
      for (int64_t g = begin; g < end; ++g) {
        const int64_t b = g / m, mm = g % m;
        group_weights(ap + g * heads * rows * s, heads, rows, s, row[g], w.data());
        for (int64_t c = 0; c < 3; ++c) {
          const scalar_t* x = xp + ((b * 3 + c) * m + mm) * s;
          acc_t acc = 0;
          for (int64_t j = 0; j < s; ++j) acc += w[j] * static_cast<acc_t>(x[j]);
          op[g * 3 + c] = static_cast<scalar_t>(acc);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> coordinate_refinement_backward_cpu(const at::Tensor& grad_out,
                                                                      const at::Tensor& attn,
                                                                      const at::Tensor& grouped_xyz,
                                                                      const at::Tensor& row_index) {
  DK_CHECK_CPU(attn);
  dynkernels::pointformer::check_refinement_args(attn, grouped_xyz, row_index);
  const int64_t batch = attn.size(0), m = attn.size(1), heads = attn.size(2), rows = attn.size(3), s = attn.size(4);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({batch, m, 3}), "grad_out must be (B, M, 3), got ", grad_out.sizes());
  at::Tensor grad_attn = at::zeros_like(attn, at::MemoryFormat::Contiguous);
  at::Tensor grad_xyz = at::empty_like(grouped_xyz, at::MemoryFormat::Contiguous);
  if (grad_xyz.numel() == 0) return {grad_attn, grad_xyz};
  at::Tensor a = attn.contiguous(), xyz = grouped_xyz.contiguous(), ri = row_index.contiguous();
  at::Tensor g = grad_out.to(attn.scalar_type()).contiguous();
  const int64_t* row = ri.const_data_ptr<int64_t>();
  check_rows(row, batch * m, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "coordinate_refinement_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* xp = xyz.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* ga = grad_attn.data_ptr<scalar_t>();
    scalar_t* gx = grad_xyz.data_ptr<scalar_t>();
    at::parallel_for(0, batch * m, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> w(s), gw(s);
      for (int64_t grp = begin; grp < end; ++grp) {
        const int64_t b = grp / m, mm = grp % m;
        group_weights(ap + grp * heads * rows * s, heads, rows, s, row[grp], w.data());
        std::fill(gw.begin(), gw.end(), acc_t(0));
        for (int64_t c = 0; c < 3; ++c) {
          const int64_t off = ((b * 3 + c) * m + mm) * s;
          const acc_t gc = static_cast<acc_t>(gp[grp * 3 + c]);
          for (int64_t j = 0; j < s; ++j) {
            gx[off + j] = static_cast<scalar_t>(w[j] * gc);
            gw[j] += gc * static_cast<acc_t>(xp[off + j]);
          }
        }
        const int64_t r0 = row[grp] < 0 ? 0 : row[grp], r1 = row[grp] < 0 ? rows : row[grp] + 1;
        const acc_t scale = acc_t(1) / static_cast<acc_t>(heads * (r1 - r0));
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t r = r0; r < r1; ++r) {
            scalar_t* dst = ga + ((grp * heads + h) * rows + r) * s;
            for (int64_t j = 0; j < s; ++j) dst[j] = static_cast<scalar_t>(gw[j] * scale);
          }
        }
      }
    });
  });
  return {grad_attn, grad_xyz};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("coordinate_refinement", &coordinate_refinement_cpu);
  m.impl("coordinate_refinement_backward", &coordinate_refinement_backward_cpu);
}
