// tome_match, CPU: ToMe's bipartite soft matching without the N_a x N_b score
// matrix (see dynkernels/ops/token_routing.py). a (B, N_a, C) and b (B, N_b, C)
// are the row-normalised A and B sets; per task (sample, block of 64 A rows)
// the scores are computed 64 x 512 at a time by a single-threaded GEMM into a
// 128 KB tile (L2) and reduced to each row's max / argmax as they come (a
// vector max per block, then the first position of a new best: ties keep the
// lower index; a NaN wins and stays, as torch.max), so the extra memory is O(N) per thread, not O(N^2). Then per
// sample a stable descending sort of the row maxima (NaN first, as torch.sort)
// splits A into the r merged rows and the kept ones.
#include <ATen/Parallel.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace {

using dynkernels::CpuIsa;

constexpr int64_t kRows = 64, kCols = 512;

#if defined(DK_TARGET_AVX512)
// update_best's lanes in one register each: a compare to a mask and masked moves (GCC's
// if-conversion of the generic loop left it scalar: 33% of the op's time). Returns the first
// column not covered.
DK_TARGET_AVX512 int64_t lanes_avx512(const float* row, int64_t start, int64_t cols, float* lanes, float* check,
                                      int32_t* where) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vchk = _mm512_setzero_ps();
  __m512i vidx = _mm512_set1_epi32(-1);
  __m512i cur = _mm512_add_epi32(_mm512_set1_epi32(int32_t(start)),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i step = _mm512_set1_epi32(16);
  int64_t j = start;
  for (; j + 16 <= cols; j += 16) {
    const __m512 v = _mm512_loadu_ps(row + j);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
    vmax = _mm512_mask_mov_ps(vmax, gt, v);
    vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
    vchk = _mm512_add_ps(vchk, _mm512_sub_ps(v, v));
    cur = _mm512_add_epi32(cur, step);
  }
  _mm512_storeu_ps(lanes, vmax);
  _mm512_storeu_ps(check, vchk);
  _mm512_storeu_si512(where, vidx);
  return j;
}
#endif

// One row of a score tile, columns [start, cols) (global index c0 + j): the running best (m, k)
// updated. 16 independent lanes keep their first max and its position (compare + blend, which
// the compiler vectorises; a NaN check rides along as a lane-wise sum of v - v), then the lanes
// combine: the block's max and its first position. A NaN wins and stays (found by a scan, rare).
template <typename T, CpuIsa I>
DK_INLINE void update_best(const T* row, int64_t start, int64_t cols, int64_t c0, T* best, int64_t* best_idx) {
  using Index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;  // lane width of T
  constexpr int kLanes = 16;
  T lanes[kLanes], check[kLanes];
  Index where[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    lanes[l] = -std::numeric_limits<T>::infinity();
    check[l] = T(0);
    where[l] = Index(-1);
  }
  int64_t j = start;
#if defined(DK_TARGET_AVX512)
  if constexpr (I == CpuIsa::kAvx512 && std::is_same_v<T, float>) j = lanes_avx512(row, start, cols, lanes, check, where);
#endif
  for (; j + kLanes <= cols; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T v = row[j + l];
      const bool gt = v > lanes[l];
      lanes[l] = gt ? v : lanes[l];
      where[l] = gt ? Index(j + l) : where[l];
      check[l] += v - v;  // NaN (or an infinity) makes it NaN
    }
  }
  T block = -std::numeric_limits<T>::infinity(), sum = T(0);
  int64_t first = -1;
  for (int l = 0; l < kLanes; ++l) {
    sum += check[l];
    if (lanes[l] > block || (lanes[l] == block && where[l] >= 0 && where[l] < first)) {
      block = lanes[l];
      first = where[l];
    }
  }
  for (; j < cols; ++j) {  // the tail, in order: strictly greater replaces
    sum += row[j] - row[j];
    if (row[j] > block) {
      block = row[j];
      first = j;
    }
  }
  if (sum != sum) {
    for (j = start; j < cols && row[j] == row[j]; ++j) {
    }
    if (j < cols) {  // a NaN (not an infinity)
      *best = row[j];
      *best_idx = c0 + j;
      return;
    }
  }
  if (first >= 0 && block > *best) {
    *best = block;
    *best_idx = c0 + first;
  }
}
DK_ISA_DISPATCH(update_best)

template <typename T>
void best_matches(const at::Tensor& a, const at::Tensor& b, bool class_token, bool distill_token, T* best,
                  int64_t* best_idx) {
  const int64_t batch = a.size(0), na = a.size(1), nb = b.size(1);
  const int64_t blocks = (na + kRows - 1) / kRows;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({kRows, kCols}, a.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / blocks, r0 = task % blocks * kRows, rows = std::min(kRows, na - r0);
      T* mx = best + s * na + r0;
      int64_t* ix = best_idx + s * na + r0;
      std::fill(mx, mx + rows, -std::numeric_limits<T>::infinity());
      std::fill(ix, ix + rows, int64_t(0));
      const at::Tensor a_blk = a[s].narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < nb; c0 += kCols) {
        const int64_t cols = std::min(kCols, nb - c0);
        at::Tensor t = tile.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(t, a_blk, b[s].narrow(0, c0, cols).t());
        const T* tp = tile.const_data_ptr<T>();
        // the distillation token's column (B's token 0) and the class token's row (A's 0) are -inf
        const int64_t start = distill_token && c0 == 0 ? 1 : 0;
        for (int64_t i = 0; i < rows; ++i) {
          if ((class_token && r0 + i == 0) || std::isnan(mx[i]) || start >= cols) continue;
          update_best_isa<T>(tp + i * kCols, start, cols, c0, mx + i, ix + i);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tome_match_cpu(const at::Tensor& a, const at::Tensor& b, int64_t r,
                                                              bool class_token, bool distill_token) {
  DK_CHECK_CPU(a);
  DK_CHECK_CPU(b);
  DK_CHECK_DIM(a, 3);
  DK_CHECK_DIM(b, 3);
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2) && a.scalar_type() == b.scalar_type(),
              "a and b must be (B, N_a, C) and (B, N_b, C) of one dtype, got ", a.sizes(), " and ", b.sizes());
  const int64_t batch = a.size(0), na = a.size(1), nb = b.size(1);
  TORCH_CHECK(r >= 0 && r <= na && (r == 0 || nb > 0), "r must be in [0, N_a = ", na, "], got ", r);
  const at::Tensor ac = a.detach().contiguous(), bc = b.detach().contiguous();  // GEMMs on the pool's threads
  at::Tensor node_max = at::empty({batch, na}, a.options());
  at::Tensor node_idx = at::empty({batch, na}, a.options().dtype(at::kLong));
  at::Tensor src = at::empty({batch, r}, node_idx.options());
  at::Tensor dst = at::empty({batch, r}, node_idx.options());
  at::Tensor unm = at::empty({batch, na - r}, node_idx.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tome_match_cpu", [&] {
    scalar_t* mp = node_max.data_ptr<scalar_t>();
    int64_t* ip = node_idx.data_ptr<int64_t>();
    if (nb > 0) best_matches<scalar_t>(ac, bc, class_token, distill_token, mp, ip);
    int64_t* sp = src.data_ptr<int64_t>();
    int64_t* dp = dst.data_ptr<int64_t>();
    int64_t* up = unm.data_ptr<int64_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(na);
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* m = mp + s * na;
        std::iota(order.begin(), order.end(), int64_t(0));
        std::stable_sort(order.begin(), order.end(), [m](int64_t x, int64_t y) {
          const bool nx = std::isnan(m[x]), ny = std::isnan(m[y]);
          if (nx || ny) return nx && !ny;  // NaN first, as torch's descending sort
          return m[x] > m[y];
        });
        for (int64_t k = 0; k < r; ++k) {
          sp[s * r + k] = order[k];
          dp[s * r + k] = ip[s * na + order[k]];
        }
        std::copy(order.begin() + r, order.end(), up + s * (na - r));
        if (class_token) std::sort(up + s * (na - r), up + (s + 1) * (na - r));
      }
    });
  });
  return {src, dst, unm};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) { m.impl("tome_match", &tome_match_cpu); }
