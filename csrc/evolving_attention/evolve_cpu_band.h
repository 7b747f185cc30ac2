// The CPU map step's row layout (direct / Winograd), the ring of M rows (Band) and the backward's ring of dZ rows (DzRing).
// Part of the CPU map step (evolve_logits_cpu.cpp includes it after turning FMA
// contraction on; every helper is DK_INLINE so that it compiles into each ISA
// variant of the row workers).
#pragma once

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "evolving_attention/evolve_cpu_simd.h"

namespace dynkernels {
namespace evolving {
namespace cpu {

struct Shape {
  int64_t b, h, n, k, r;
};

// Two convolutions over the rows of the (query, key) plane:
//
// Direct (any odd K): z[j] = sum_{hi, di, dj} w[ho, hi, di, dj] row(hi, di)[j + dj],
//   register-blocked as kHeads output heads x kVecs vectors of positions
//   (4 x 24 floats: 12 accumulators, 3 source vectors, one broadcast weight).
//
// Winograd F(2, 3) along the keys (K = 3): each pair of outputs (2t, 2t + 1)
//   costs 4 multiplies per (hi, di) instead of 6. With d_0..3 = row[2t .. 2t + 3]
//   (the band holds the key axis shifted by r = 1) and g = w[ho, hi, di, :]:
//     V = (d0 - d2, d1 + d2, d2 - d1, d1 - d3)        (input transform, per row)
//     U = (g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2)   (per weight)
//     m_c = sum_{hi, di} U_c V_c;  z[2t] = m0 + m1 + m2, z[2t + 1] = m1 - m2 - m3.
//   The band keeps each row's four transformed arrays next to the raw row, so a
//   row is transformed once, however many query rows and heads use it.
//   Register block: kWinoHeads heads x VB vectors of pairs x 4 components
//   (VB = 2 with AVX-512's 32 registers, 1 with AVX2's 16).
constexpr int64_t kHeads = 4;
constexpr int64_t kVecs = 3;
constexpr int64_t kWinoHeads = 2;

template <typename T>
struct Layout {
  bool wino;
  int64_t pairs;  // Winograd: pairs of outputs per row, whole vectors (plus one spare vector)
  int64_t zlen;   // conv outputs per row (>= N; whole blocks)
  int64_t width;  // raw band row stride (>= zlen + 2r + 2, zero past N)
  int64_t group;  // output heads per register block (the z buffer is padded to whole groups)

  explicit Layout(const Shape& s) {
    constexpr int64_t L = Simd<T>::kLanes;
    wino = s.k == 3;
    pairs = round_up((s.n + 1) / 2, L) + L;
    zlen = wino ? 2 * pairs : round_up(s.n, kVecs * L);
    width = zlen + 2 * s.r + 2;
    group = wino ? kWinoHeads : kHeads;
  }
};

inline int64_t groups_of(int64_t h, int64_t size) { return (h + size - 1) / size; }

// The Winograd input transform of one raw band row (see Layout): four arrays
// of `pairs` entries at raw + width.
template <typename T>
DK_INLINE void winograd_input(T* raw, const Layout<T>& lay) {
  T* v = raw + lay.width;
  const int64_t np = lay.pairs;
  for (int64_t t = 0; t < np; ++t) {
    const T d0 = raw[2 * t], d1 = raw[2 * t + 1], d2 = raw[2 * t + 2], d3 = raw[2 * t + 3];
    v[t] = d0 - d2;
    v[np + t] = d1 + d2;
    v[2 * np + t] = d2 - d1;
    v[3 * np + t] = d1 - d3;
  }
}

// A ring of K rows per head of a (B, H, N, N) map m (mixed with prev when
// given), zero-padded by r on both sides of the key axis; rows outside the map
// are zeros. A worker walks its rows in order, so moving to the next query row
// fills one new row per head instead of K. With the Winograd layout each slot
// also holds the row's four transformed arrays (4 x pairs).
template <typename T>
class Band {
 public:
  Band(const Shape& s, const Layout<T>& lay)
      : s_(s),
        lay_(lay),
        slot_size_(lay.width + (lay.wino ? 4 * lay.pairs : 0)),
        data_(s.h * s.k * slot_size_, T(0)),
        held_(s.k, -1),
        finite_(s.k, 1) {}

  // Makes rows i - r .. i + r of image b present; rows[di] is the slot of
  // kernel row di for head 0 (head hi's is at rows[di] + hi * head_stride()):
  // the raw row, then (Winograd) its transformed arrays at + width. Returns
  // whether every value in those rows is finite.
  bool load(const T* m, const T* prev, T w_prev, int64_t b, int64_t i, const T** rows) {
    bool finite = true;
    for (int64_t di = 0; di < s_.k; ++di) {
      const int64_t row = i + di - s_.r, slot = (row + s_.k) % s_.k, key = b * (s_.n + 2 * s_.k) + row + s_.k;
      if (held_[slot] != key) {
        finite_[slot] = fill(m, prev, w_prev, b, row, slot);
        held_[slot] = key;
      }
      finite = finite && finite_[slot];
      rows[di] = data_.data() + slot * slot_size_;
    }
    prefetch(m, b, i + s_.r + kAhead);
    if (prev != nullptr) prefetch(prev, b, i + s_.r + kAhead);
    return finite;
  }
  int64_t head_stride() const { return s_.k * slot_size_; }

 private:
  // Fills one slot for every head; returns whether it is all finite.
  bool fill(const T* m, const T* prev, T w_prev, int64_t b, int64_t row, int64_t slot) {
    bool finite = true;
    for (int64_t hi = 0; hi < s_.h; ++hi) {
      T* raw = data_.data() + (hi * s_.k + slot) * slot_size_;
      T* dst = raw + s_.r;
      if (row < 0 || row >= s_.n) {
        std::fill(dst, dst + s_.n, T(0));
      } else {
        const int64_t off = ((b * s_.h + hi) * s_.n + row) * s_.n;
        const T* src = m + off;
        if (prev == nullptr) {
          std::copy(src, src + s_.n, dst);
        } else {
          const T* pv = prev + off;
          const T keep = T(1) - w_prev, take = w_prev;
          for (int64_t j = 0; j < s_.n; ++j) dst[j] = keep * src[j] + take * pv[j];
        }
        finite = finite && all_finite(dst, s_.n);
      }
      if (lay_.wino) winograd_input(raw, lay_);
    }
    return finite;
  }
  static constexpr int64_t kAhead = 2;
  // Asks for the row that the query row kAhead on will fill: H short rows N * N
  // apart are too short for the hardware prefetcher to pick up alone.
  void prefetch(const T* m, int64_t b, int64_t row) const {
    if (row >= s_.n) return;
    constexpr int64_t kLine = 64 / sizeof(T);
    for (int64_t hi = 0; hi < s_.h; ++hi) {
      const T* src = m + ((b * s_.h + hi) * s_.n + row) * s_.n;
      for (int64_t j = 0; j < s_.n; j += kLine) __builtin_prefetch(src + j);
      __builtin_prefetch(src + s_.n - 1);
    }
  }
  Shape s_;
  Layout<T> lay_;
  int64_t slot_size_;
  std::vector<T> data_;
  std::vector<int64_t> held_;  // which (image, row) each slot holds
  std::vector<char> finite_;   // whether that row is all finite
};

// The backward's ring of computed dZ rows, in the band layout (zero-padded by
// r, Winograd arrays alongside), keyed by the flat row index u = b * N + i so
// that K consecutive rows never share a slot, even across images; one more
// slot stays zero for rows outside the map.
template <typename T>
class DzRing {
 public:
  DzRing(const Shape& s, const Layout<T>& lay)
      : s_(s),
        lay_(lay),
        slot_size_(lay.width + (lay.wino ? 4 * lay.pairs : 0)),
        data_(groups_of(s.h, kHeads) * kHeads * (s.k + 1) * slot_size_, T(0)),
        held_(s.k, -1) {}

  // Head 0's dZ row u (head hi's at + hi * head_stride()), entries [0, N):
  // write them, then call finish(u).
  T* row(int64_t u) {
    held_[u % s_.k] = u;
    return data_.data() + (u % s_.k) * slot_size_ + s_.r;
  }
  void finish(int64_t u) {
    if (!lay_.wino) return;
    for (int64_t hi = 0; hi < s_.h; ++hi) winograd_input(data_.data() + (hi * (s_.k + 1) + u % s_.k) * slot_size_, lay_);
  }
  // Rows i - r .. i + r of image b, as Band::load gives them.
  void rows_for(int64_t b, int64_t i, const T** rows) const {
    for (int64_t di = 0; di < s_.k; ++di) {
      const int64_t row = i + di - s_.r, u = b * s_.n + row;
      const bool inside = row >= 0 && row < s_.n;
      TORCH_INTERNAL_ASSERT(!inside || held_[u % s_.k] == u, "dZ ring: row ", u, " is not held");
      rows[di] = data_.data() + (inside ? u % s_.k : s_.k) * slot_size_;
    }
  }
  int64_t head_stride() const { return (s_.k + 1) * slot_size_; }

 private:
  Shape s_;
  Layout<T> lay_;
  int64_t slot_size_;
  // (H rounded up to whole kHeads groups, K + 1 slots, slot_size): slot K and
  // the padding heads stay zero (the weight gradient reads whole groups).
  std::vector<T> data_;
  std::vector<int64_t> held_;
};

}  // namespace cpu
}  // namespace evolving
}  // namespace dynkernels
