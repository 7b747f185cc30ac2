// The shared segment substrate, CPU (see dynkernels/ops/segment.py).
//
// segment_reduce: src (M, D) rows already sorted into segments by offsets
// (S + 1,) -> out (S, D), out[s] = sum / mean / max of rows
// offsets[s] .. offsets[s + 1] - 1, summed in row order (deterministic);
// an empty segment gives 0; max propagates NaN. Accumulates in float for
// half types, in T otherwise.
// scatter_add: src (M, D), index (M,) int32/int64 -> out (S, D),
// out[index[i]] += src[i] in row order; rows whose index lies outside
// [0, S) add nothing (the substrate's rule: -1 means "no segment").
//
// Threads: (segment, column block) work items for the reduction; column
// blocks for the scatter (each thread owns its columns for every row, so the
// order of the additions is the row order whatever the thread count).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/segment_checks.h"

namespace {

using dynkernels::CpuIsa;
using dynkernels::segment::Reduce;

constexpr int64_t kColumns = 256;  // columns per work item: one accumulator row stays in L1

template <typename T, CpuIsa I>
DK_INLINE void reduce_block(const T* src, const int64_t* offsets, int64_t m, int64_t d, int64_t s_begin,
                            int64_t s_end, int64_t c0, int64_t c1, int reduce, T* out) {
  using acc_t = at::opmath_type<T>;
  acc_t acc[kColumns];
  const int64_t width = c1 - c0;
  for (int64_t s = s_begin; s < s_end; ++s) {
    const int64_t start = std::clamp<int64_t>(offsets[s], 0, m), stop = std::clamp<int64_t>(offsets[s + 1], start, m);
    T* row_out = out + s * d + c0;
    if (reduce == static_cast<int>(Reduce::kMax)) {
      for (int64_t j = 0; j < width; ++j) acc[j] = -std::numeric_limits<acc_t>::infinity();
      for (int64_t r = start; r < stop; ++r) {
        const T* row = src + r * d + c0;
        for (int64_t j = 0; j < width; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          acc[j] = (v > acc[j] || v != v) && acc[j] == acc[j] ? v : acc[j];  // NaN sticks
        }
      }
      for (int64_t j = 0; j < width; ++j) row_out[j] = static_cast<T>(stop > start ? acc[j] : acc_t(0));
      continue;
    }
    for (int64_t j = 0; j < width; ++j) acc[j] = acc_t(0);
    for (int64_t r = start; r < stop; ++r) {
      const T* row = src + r * d + c0;
      for (int64_t j = 0; j < width; ++j) acc[j] += static_cast<acc_t>(row[j]);
    }
    const acc_t scale =
        reduce == static_cast<int>(Reduce::kMean) && stop > start ? acc_t(1) / static_cast<acc_t>(stop - start) : acc_t(1);
    if (scale == acc_t(1)) {
      for (int64_t j = 0; j < width; ++j) row_out[j] = static_cast<T>(acc[j]);
    } else {
      for (int64_t j = 0; j < width; ++j) row_out[j] = static_cast<T>(acc[j] * scale);
    }
  }
}
DK_ISA_DISPATCH(reduce_block)

template <typename T, CpuIsa I>
DK_INLINE void scatter_block(const T* src, const int64_t* index, int64_t m, int64_t d, int64_t segments, int64_t c0,
                             int64_t c1, at::opmath_type<T>* acc) {
  using acc_t = at::opmath_type<T>;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t s = index[i];
    if (s < 0 || s >= segments) continue;
    const T* row = src + i * d;
    acc_t* dst = acc + s * d;
    for (int64_t j = c0; j < c1; ++j) dst[j] += static_cast<acc_t>(row[j]);
  }
}
DK_ISA_DISPATCH(scatter_block)

at::Tensor segment_reduce_cpu(const at::Tensor& src, const at::Tensor& offsets, c10::string_view reduce_name) {
  DK_CHECK_CPU(src);
  const Reduce reduce = dynkernels::segment::check_reduce_args(src, offsets, reduce_name);
  const at::Tensor x = src.contiguous(), off = offsets.contiguous();
  const int64_t m = x.size(0), d = x.size(1), segments = off.size(0) - 1;
  dynkernels::segment::check_offsets_cpu(off, m);
  at::Tensor out = at::empty({segments, d}, x.options());
  if (out.numel() == 0) return out;
  const int64_t blocks = (d + kColumns - 1) / kColumns;
  const int64_t rows_per_segment = std::max<int64_t>(1, m / std::max<int64_t>(segments, 1));
  const int64_t grain = std::max<int64_t>(1, 32768 / (rows_per_segment * std::min(d, kColumns)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_reduce_cpu", [&] {
    const scalar_t* sp = x.const_data_ptr<scalar_t>();
    const int64_t* op = off.const_data_ptr<int64_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, segments * blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end;) {
        // a run of consecutive segments in one column block
        const int64_t block = item % blocks, s0 = item / blocks;
        int64_t s1 = s0 + 1;
        if (blocks == 1) s1 = std::min(segments, s0 + (end - item));
        const int64_t c0 = block * kColumns, c1 = std::min(d, c0 + kColumns);
        reduce_block_isa<scalar_t>(sp, op, m, d, s0, s1, c0, c1, static_cast<int>(reduce), dst);
        item += s1 - s0;
      }
    });
  });
  return out;
}

at::Tensor scatter_add_cpu(const at::Tensor& src, const at::Tensor& index, c10::SymInt num_segments) {
  DK_CHECK_CPU(src);
  const int64_t segments = num_segments.expect_int();
  dynkernels::segment::check_scatter_args(src, index, segments);
  const at::Tensor x = src.contiguous(), idx = index.contiguous().to(at::kLong);
  const int64_t m = x.size(0), d = x.size(1);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor acc = at::zeros({segments, d}, x.options().dtype(acc_type));
  if (acc.numel() == 0 || m == 0) return acc.to(x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = x.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    acc_t* ap = acc.data_ptr<acc_t>();
    // at least 64 columns a thread: narrower blocks would share cache lines
    at::parallel_for(0, d, 64, [&](int64_t c0, int64_t c1) { scatter_block_isa<scalar_t>(sp, ip, m, d, segments, c0, c1, ap); });
  });
  return acc.scalar_type() == x.scalar_type() ? acc : acc.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("segment_reduce", &segment_reduce_cpu);
  m.impl("scatter_add", &scatter_add_cpu);
}
