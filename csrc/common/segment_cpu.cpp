// The shared segment substrate, CPU (see dynkernels/ops/segment.py).
//
// segment_reduce: src (M, D), offsets (S + 1,), optional perm -> out (S, D),
// out[s] = sum / mean / max of rows perm[offsets[s]] .. perm[offsets[s + 1] - 1]
// (rows offsets[s] .. offsets[s + 1] - 1 of src without perm), taken in that
// order (deterministic); an empty segment gives 0; max propagates NaN.
// scatter_reduce: src (M, D), index (M,) int32/int64 -> out (S, D), the same
// reductions over the rows with index s, taken in row order: equal, bit for
// bit, to a stable sort by index followed by segment_reduce. Rows whose index
// lies outside [0, S) are dropped (the substrate's rule: -1 means "no
// segment"). Accumulates in float for half types, in T otherwise.
//
// Threads: (segment, column block) work items for segment_reduce; column
// blocks for scatter_reduce (each thread owns its columns for every row, so
// the order of the additions is the row order whatever the thread count).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/segment_checks.h"

namespace {

using dynkernels::CpuIsa;
using dynkernels::segment::Reduce;

constexpr int64_t kColumns = 256;  // columns per work item: one accumulator row stays in L1

// max with NaN sticking (the first NaN wins, as torch's amax)
template <typename A>
DK_INLINE A max_nan(A acc, A v) {
  return (v > acc || v != v) && acc == acc ? v : acc;
}

template <typename T, CpuIsa I>
DK_INLINE void reduce_block(const T* src, const int64_t* offsets, const int64_t* perm, int64_t rows, int64_t d,
                            int64_t s_begin, int64_t s_end, int64_t c0, int64_t c1, int reduce, T* out) {
  using acc_t = at::opmath_type<T>;
  acc_t acc[kColumns];
  const int64_t width = c1 - c0;
  const bool is_max = reduce == static_cast<int>(Reduce::kMax);
  for (int64_t s = s_begin; s < s_end; ++s) {
    const int64_t start = offsets[s], stop = offsets[s + 1];
    const acc_t init = is_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
    for (int64_t j = 0; j < width; ++j) acc[j] = init;
    for (int64_t r = start; r < stop; ++r) {
      const T* row = src + (perm == nullptr ? r : perm[r]) * d + c0;
      if (is_max) {
        for (int64_t j = 0; j < width; ++j) acc[j] = max_nan(acc[j], static_cast<acc_t>(row[j]));
      } else {
        for (int64_t j = 0; j < width; ++j) acc[j] += static_cast<acc_t>(row[j]);
      }
    }
    const int64_t n = stop - start;
    acc_t scale = acc_t(1);
    if (n == 0) scale = acc_t(0);
    if (reduce == static_cast<int>(Reduce::kMean) && n > 0) scale = acc_t(1) / static_cast<acc_t>(n);
    T* row_out = out + s * d + c0;
    if (n == 0) {
      for (int64_t j = 0; j < width; ++j) row_out[j] = T(0);
    } else if (scale == acc_t(1)) {
      for (int64_t j = 0; j < width; ++j) row_out[j] = static_cast<T>(acc[j]);
    } else {
      for (int64_t j = 0; j < width; ++j) row_out[j] = static_cast<T>(acc[j] * scale);
    }
  }
}
DK_ISA_DISPATCH(reduce_block)

// Row-order accumulation of columns [c0, c1) into acc (S, D) (for max:
// pre-filled with -inf).
template <typename T, CpuIsa I>
DK_INLINE void scatter_block(const T* src, const int64_t* index, int64_t m, int64_t d, int64_t segments, int64_t c0,
                             int64_t c1, bool is_max, at::opmath_type<T>* acc) {
  using acc_t = at::opmath_type<T>;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t s = index[i];
    if (s < 0 || s >= segments) continue;
    const T* row = src + i * d;
    acc_t* dst = acc + s * d;
    if (is_max) {
      for (int64_t j = c0; j < c1; ++j) dst[j] = max_nan(dst[j], static_cast<acc_t>(row[j]));
    } else {
      for (int64_t j = c0; j < c1; ++j) dst[j] += static_cast<acc_t>(row[j]);
    }
  }
}
DK_ISA_DISPATCH(scatter_block)

at::Tensor segment_reduce_cpu(const at::Tensor& src, const at::Tensor& offsets, const std::optional<at::Tensor>& perm,
                              c10::string_view reduce_name) {
  DK_CHECK_CPU(src);
  const Reduce reduce = dynkernels::segment::check_reduce_args(src, offsets, perm, reduce_name);
  const at::Tensor x = src.contiguous(), off = offsets.contiguous();
  const at::Tensor order = perm.has_value() ? perm->contiguous() : at::Tensor();
  const int64_t m = x.size(0), d = x.size(1), segments = off.size(0) - 1;
  dynkernels::segment::check_offsets_cpu(off, order.defined() ? order.size(0) : m);
  if (order.defined()) dynkernels::segment::check_perm_cpu(order, off, m);
  at::Tensor out = at::empty({segments, d}, x.options());
  if (out.numel() == 0) return out;
  const int64_t blocks = (d + kColumns - 1) / kColumns;
  const int64_t rows_per_segment = std::max<int64_t>(1, m / std::max<int64_t>(segments, 1));
  const int64_t grain = std::max<int64_t>(1, 32768 / (rows_per_segment * std::min(d, kColumns)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_reduce_cpu", [&] {
    const scalar_t* sp = x.const_data_ptr<scalar_t>();
    const int64_t* op = off.const_data_ptr<int64_t>();
    const int64_t* pp = order.defined() ? order.const_data_ptr<int64_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, segments * blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end;) {
        // a run of consecutive segments in one column block
        const int64_t block = item % blocks, s0 = item / blocks;
        const int64_t s1 = blocks == 1 ? std::min(segments, s0 + (end - item)) : s0 + 1;
        const int64_t c0 = block * kColumns, c1 = std::min(d, c0 + kColumns);
        reduce_block_isa<scalar_t>(sp, op, pp, m, d, s0, s1, c0, c1, static_cast<int>(reduce), dst);
        item += s1 - s0;
      }
    });
  });
  return out;
}

at::Tensor scatter_reduce_cpu(const at::Tensor& src, const at::Tensor& index, c10::SymInt num_segments,
                              c10::string_view reduce_name) {
  DK_CHECK_CPU(src);
  const auto args = dynkernels::segment::check_scatter_args(src, index, num_segments, reduce_name);
  const int64_t segments = args.segments;  // (a structured binding could not be captured below in C++17)
  const Reduce reduce = args.reduce;
  const at::Tensor x = src.contiguous(), idx = index.contiguous().to(at::kLong);
  const int64_t m = x.size(0), d = x.size(1);
  const bool is_max = reduce == Reduce::kMax;
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor acc = is_max ? at::full({segments, d}, -std::numeric_limits<double>::infinity(), x.options().dtype(acc_type))
                          : at::zeros({segments, d}, x.options().dtype(acc_type));
  if (acc.numel() > 0 && m > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_reduce_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* sp = x.const_data_ptr<scalar_t>();
      const int64_t* ip = idx.const_data_ptr<int64_t>();
      acc_t* ap = acc.data_ptr<acc_t>();
      // at least 64 columns a thread: narrower blocks would share cache lines
      at::parallel_for(0, d, 64, [&](int64_t c0, int64_t c1) {
        scatter_block_isa<scalar_t>(sp, ip, m, d, segments, c0, c1, is_max, ap);
      });
    });
  }
  if (reduce != Reduce::kSum) {
    // empty segments give 0; mean divides by the count (the sorted form's rounding: sum * (1 / n))
    std::vector<int64_t> count(segments, 0);
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < m; ++i) {
      if (ip[i] >= 0 && ip[i] < segments) ++count[ip[i]];
    }
    const at::Tensor n = at::tensor(count).to(acc_type).unsqueeze(1);
    if (reduce == Reduce::kMean) {
      acc.mul_(at::where(n > 0, n.reciprocal(), at::zeros_like(n)));
    } else {
      acc.masked_fill_(n == 0, 0);
    }
  }
  return acc.scalar_type() == x.scalar_type() ? acc : acc.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("segment_reduce", &segment_reduce_cpu);
  m.impl("scatter_reduce", &scatter_reduce_cpu);
}
