// Mixture-of-experts dispatch, grouped GEMM and combine, CPU (see
// dynkernels/ops/token_routing_moe.py for the semantics).
//
// * moe_plan: a counting sort of the T*k (token, slot) assignments by expert,
//   slot-major (every first choice before any second choice, tokens in order
//   within a slot: GShard's priority), O(T*k) and single-threaded (8k
//   assignments take microseconds). Dropless: rows = T*k, segment e is
//   offsets[e]..offsets[e+1]. Capacity C >= 0: segment e is rows e*C..(e+1)*C,
//   the first C assignments of e kept, the rest dropped (slot_row -1) and the
//   unused rows padding (source -1).
// * moe_gather / moe_combine: row gathers (a zero row for -1); combine sums a
//   token's k rows weighted, in slot order (deterministic), parallel over
//   tokens. The gather's gradient is a combine with unit weights; the
//   combine's is a write of w * grad to each assignment's own row (rows are
//   unique to one assignment: no accumulation) and one dot per assignment.
// * moe_grouped_mm: one BLAS GEMM per expert segment (torch's CPU BLAS, its
//   own threads); the backward's per-segment GEMMs likewise.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/checks.h"

namespace {

void check_assignments(const at::Tensor& slot_row, const char* name) {
  DK_CHECK_CPU(slot_row);
  DK_CHECK_DIM(slot_row, 2);
  TORCH_CHECK(slot_row.scalar_type() == at::kLong, name, " must be int64, got ", slot_row.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_plan_cpu(const at::Tensor& experts_in,
                                                                         int64_t num_experts, int64_t capacity) {
  check_assignments(experts_in, "experts");
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  const at::Tensor experts = experts_in.contiguous();
  const int64_t tokens = experts.size(0), k = experts.size(1), assignments = tokens * k;
  const int64_t* ex = experts.data_ptr<int64_t>();
  const auto opts = experts.options();
  at::Tensor counts = at::zeros({num_experts}, opts), offsets = at::empty({num_experts + 1}, opts);
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t a = 0; a < assignments; ++a) {
    const int64_t e = ex[a];
    TORCH_CHECK_INDEX(e >= 0 && e < num_experts, "experts must lie in [0, num_experts = ", num_experts, "), got ", e,
                      " at token ", a / k, ", slot ", a % k);
    ++cnt[e];
  }
  const bool dropless = capacity < 0;
  const int64_t rows = dropless ? assignments : num_experts * capacity;
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) off[e + 1] = dropless ? off[e] + cnt[e] : (e + 1) * capacity;
  at::Tensor source = at::full({rows}, -1, opts), slot_row = at::empty({tokens, k}, opts);
  int64_t* src = source.data_ptr<int64_t>();
  int64_t* slot = slot_row.data_ptr<int64_t>();
  std::vector<int64_t> used(num_experts, 0);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t e = ex[t * k + j], rank = used[e]++;
      int64_t row = -1;
      if (dropless || rank < capacity) {
        row = off[e] + rank;
        src[row] = t;
      }
      slot[t * k + j] = row;
    }
  }
  if (!dropless) {
    for (int64_t e = 0; e < num_experts; ++e) cnt[e] = std::min(cnt[e], capacity);
  }
  return {source, slot_row, offsets, counts};
}

// rows of x (N, d) at index (M,) -> (M, d); -1 gives a zero row
template <typename T>
void gather_rows_kernel(const T* x, const int64_t* index, T* out, int64_t m, int64_t d) {
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* dst = out + i * d;
      if (index[i] < 0) {
        std::fill(dst, dst + d, T(0));
      } else {
        std::copy(x + index[i] * d, x + (index[i] + 1) * d, dst);
      }
    }
  });
}

// slot_row is the gradient's map (a combine with unit weights), unused here
at::Tensor moe_gather_cpu(const at::Tensor& x_in, const at::Tensor& source, const at::Tensor& slot_row) {
  DK_CHECK_CPU(x_in);
  check_assignments(slot_row, "slot_row");
  DK_CHECK_CPU(source);
  DK_CHECK_DIM(x_in, 2);
  DK_CHECK_DIM(source, 1);
  TORCH_CHECK(source.scalar_type() == at::kLong, "source must be int64, got ", source.scalar_type());
  const at::Tensor x = x_in.contiguous(), index = source.contiguous();
  const int64_t n = x.size(0), m = index.size(0), d = x.size(1);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK_INDEX(idx[i] >= -1 && idx[i] < n, "source must lie in [-1, ", n, "), got ", idx[i], " at row ", i);
  }
  at::Tensor out = at::empty({m, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_gather", [&] {
    gather_rows_kernel(x.data_ptr<scalar_t>(), idx, out.data_ptr<scalar_t>(), m, d);
  });
  return out;
}

void check_slot_rows(const at::Tensor& slot_row, int64_t rows) {
  const int64_t* slot = slot_row.data_ptr<int64_t>();
  for (int64_t a = 0; a < slot_row.numel(); ++a) {
    TORCH_CHECK_INDEX(slot[a] >= -1 && slot[a] < rows, "slot_row must lie in [-1, ", rows, "), got ", slot[a],
                      " at assignment ", a);
  }
}

void check_combine(const at::Tensor& y, const at::Tensor& slot_row, const at::Tensor& weights) {
  DK_CHECK_CPU(y);
  DK_CHECK_CPU(weights);
  DK_CHECK_DIM(y, 2);
  check_assignments(slot_row, "slot_row");
  TORCH_CHECK(weights.sizes() == slot_row.sizes(), "weights must be (T, k) = ", slot_row.sizes(), ", got ",
              weights.sizes());
  TORCH_CHECK(weights.scalar_type() == y.scalar_type(), "weights and y must share a dtype, got ",
              weights.scalar_type(), " and ", y.scalar_type());
}

// out[t] = sum_j w[t, j] y[slot[t, j]] in slot order, accumulated in opmath
template <typename T>
void combine_kernel(const T* y, const int64_t* slot, const T* w, T* out, int64_t tokens, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = slot[t * k + j];
        if (row < 0) continue;
        const acc_t wt = acc_t(w[t * k + j]);
        const T* src = y + row * d;
        for (int64_t c = 0; c < d; ++c) acc[c] += wt * acc_t(src[c]);
      }
      T* dst = out + t * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = T(acc[c]);
    }
  });
}

at::Tensor moe_combine_cpu(const at::Tensor& y_in, const at::Tensor& slot_in, const at::Tensor& w_in) {
  check_combine(y_in, slot_in, w_in);
  const at::Tensor y = y_in.contiguous(), slot = slot_in.contiguous(), w = w_in.contiguous();
  check_slot_rows(slot, y.size(0));
  const int64_t tokens = slot.size(0), k = slot.size(1), d = y.size(1);
  at::Tensor out = at::empty({tokens, d}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_combine", [&] {
    combine_kernel(y.data_ptr<scalar_t>(), slot.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                   tokens, k, d);
  });
  return out;
}

// grad_y[slot[t, j]] = w[t, j] grad[t] (rows no assignment owns stay zero);
// grad_w[t, j] = <grad[t], y[slot[t, j]]> (0 for a dropped assignment)
template <typename T>
void combine_backward_kernel(const T* g, const T* y, const int64_t* slot, const T* w, T* gy, T* gw, int64_t tokens,
                             int64_t k, int64_t d) {
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* grow = g + t * d;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t a = t * k + j, row = slot[a];
        if (gw != nullptr) {
          acc_t dot = 0;
          if (row >= 0) {
            const T* yrow = y + row * d;
            for (int64_t c = 0; c < d; ++c) dot += acc_t(grow[c]) * acc_t(yrow[c]);
          }
          gw[a] = T(dot);
        }
        if (gy != nullptr && row >= 0) {
          const acc_t wt = acc_t(w[a]);
          T* dst = gy + row * d;
          for (int64_t c = 0; c < d; ++c) dst[c] = T(wt * acc_t(grow[c]));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward_cpu(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                            const at::Tensor& slot_in, const at::Tensor& w_in,
                                                            bool need_y, bool need_weights) {
  check_combine(y_in, slot_in, w_in);
  DK_CHECK_CPU(grad_in);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == slot_in.size(0) && grad_in.size(1) == y_in.size(1),
              "grad must be (T, d) = (", slot_in.size(0), ", ", y_in.size(1), "), got ", grad_in.sizes());
  const at::Tensor g = grad_in.contiguous().to(y_in.scalar_type()), y = y_in.contiguous(), slot = slot_in.contiguous(),
                   w = w_in.contiguous();
  check_slot_rows(slot, y.size(0));
  const int64_t tokens = slot.size(0), k = slot.size(1), d = y.size(1), rows = y.size(0);
  // every row owned by an assignment (dropless, or a full capacity buffer) is written: no zero fill
  const bool covered = slot.ge(0).sum().item<int64_t>() == rows;
  at::Tensor gy = need_y ? (covered ? at::empty({rows, d}, y.options()) : at::zeros({rows, d}, y.options()))
                         : at::Tensor();
  at::Tensor gw = need_weights ? at::empty({tokens, k}, y.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_combine_backward", [&] {
    combine_backward_kernel(g.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), slot.data_ptr<int64_t>(),
                            w.data_ptr<scalar_t>(), need_y ? gy.data_ptr<scalar_t>() : nullptr,
                            need_weights ? gw.data_ptr<scalar_t>() : nullptr, tokens, k, d);
  });
  return {gy, gw};
}

// offsets (E + 1,) int64: 0, non-decreasing, ending at rows
std::vector<int64_t> read_offsets(const at::Tensor& offsets, int64_t experts, int64_t rows) {
  DK_CHECK_CPU(offsets);
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.size(0) == experts + 1,
              "offsets must be (E + 1,) = (", experts + 1, ",) int64, got ", offsets.scalar_type(), " ",
              offsets.sizes());
  const at::Tensor o = offsets.contiguous();
  std::vector<int64_t> out(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + experts + 1);
  TORCH_CHECK_VALUE(out[0] == 0 && out[experts] == rows, "offsets must start at 0 and end at the row count ", rows,
                    ", got ", out[0], " and ", out[experts]);
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK_VALUE(out[e + 1] >= out[e], "offsets must be non-decreasing, got ", out[e], " then ", out[e + 1],
                      " at expert ", e);
  }
  return out;
}

void check_grouped(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  DK_CHECK_CPU(x);
  DK_CHECK_CPU(w);
  DK_CHECK_DIM(x, 2);
  DK_CHECK_DIM(w, 3);
  TORCH_CHECK(w.size(1) == x.size(1), "w must be (E, d_in = ", x.size(1), ", d_out), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "x and w must share a dtype, got ", x.scalar_type(), " and ",
              w.scalar_type());
  if (bias.has_value()) {
    DK_CHECK_CPU(*bias);
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == w.size(0) && bias->size(1) == w.size(2),
                "bias must be (E, d_out) = (", w.size(0), ", ", w.size(2), "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type());
  }
}

// Experts' GEMMs scheduled over the threads: a segment larger than a fair
// share of the rows still to place (rows / threads) runs alone on BLAS's own
// threads; the rest run one GEMM per thread (BLAS is single-threaded inside a
// parallel region), placed largest first on the least loaded thread (LPT).
// Measured: per-thread GEMMs beat 2-thread BLAS on 128-1024-row segments.
// `run(e)` does expert e's work; each expert runs exactly once.
template <typename F>
void for_each_expert(const std::vector<int64_t>& off, F run) {
  const int64_t experts = int64_t(off.size()) - 1, threads = at::get_num_threads();
  auto size = [&](int64_t e) { return off[e + 1] - off[e]; };
  std::vector<int64_t> order(experts);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return size(a) > size(b); });
  int64_t remaining = off[experts], first = 0;
  while (first < experts && (threads == 1 || size(order[first]) * threads > remaining)) {
    remaining -= size(order[first]);
    run(order[first++]);
  }
  if (first == experts) return;
  std::vector<std::vector<int64_t>> lists(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t i = first; i < experts; ++i) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    lists[t].push_back(order[i]);
    load[t] += size(order[i]);
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (const int64_t e : lists[t]) run(e);
    }
  });
}

at::Tensor moe_grouped_mm_cpu(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& bias) {
  check_grouped(x_in, w, bias);
  const int64_t experts = w.size(0), rows = x_in.size(0);
  const std::vector<int64_t> off = read_offsets(offsets, experts, rows);
  const at::Tensor x = x_in.detach().contiguous();
  at::Tensor y = at::empty({rows, w.size(2)}, x.options());
  const at::Tensor wd = w.detach(), bd = bias.has_value() ? bias->detach() : at::Tensor();
  for_each_expert(off, [&](int64_t e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) return;
    at::Tensor ye = y.narrow(0, off[e], n);
    if (bd.defined()) {
      at::addmm_out(ye, bd[e], x.narrow(0, off[e], n), wd[e]);
    } else {
      at::mm_out(ye, x.narrow(0, off[e], n), wd[e]);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_grouped_mm_backward_cpu(const at::Tensor& grad_in,
                                                                           const at::Tensor& x_in, const at::Tensor& w,
                                                                           const at::Tensor& offsets, bool need_x,
                                                                           bool need_w, bool need_bias) {
  check_grouped(x_in, w, std::nullopt);
  DK_CHECK_CPU(grad_in);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == x_in.size(0) && grad_in.size(1) == w.size(2),
              "grad must be (R, d_out) = (", x_in.size(0), ", ", w.size(2), "), got ", grad_in.sizes());
  const int64_t experts = w.size(0), rows = x_in.size(0);
  const std::vector<int64_t> off = read_offsets(offsets, experts, rows);
  const at::Tensor g = grad_in.detach().contiguous().to(x_in.scalar_type()), x = x_in.detach().contiguous(),
                   wd = w.detach();
  at::Tensor gx = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor gw = need_w ? at::empty(w.sizes(), w.options()) : at::Tensor();
  at::Tensor gb = need_bias ? at::empty({experts, w.size(2)}, w.options()) : at::Tensor();
  for_each_expert(off, [&](int64_t e) {
    const int64_t n = off[e + 1] - off[e];
    const at::Tensor ge = g.narrow(0, off[e], n);
    if (n == 0) {
      if (need_w) gw[e].zero_();
      if (need_bias) gb[e].zero_();
      return;
    }
    if (need_x) {
      at::Tensor gxe = gx.narrow(0, off[e], n);
      at::mm_out(gxe, ge, wd[e].t());
    }
    if (need_w) {
      at::Tensor gwe = gw[e];
      at::mm_out(gwe, x.narrow(0, off[e], n).t(), ge);
    }
    if (need_bias) {
      at::Tensor gbe = gb[e];
      at::sum_out(gbe, ge, {0});
    }
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("moe_plan", &moe_plan_cpu);
  m.impl("moe_gather", &moe_gather_cpu);
  m.impl("moe_combine", &moe_combine_cpu);
  m.impl("moe_combine_backward", &moe_combine_backward_cpu);
  m.impl("moe_grouped_mm", &moe_grouped_mm_cpu);
  m.impl("moe_grouped_mm_backward", &moe_grouped_mm_backward_cpu);
}
