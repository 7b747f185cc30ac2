// The CPU map step's head-mixing convolutions: weight packing, the register-blocked direct convolution and Winograd F(2, 3).
// Part of the CPU map step (evolve_logits_cpu.cpp includes it after turning FMA
// contraction on; every helper is DK_INLINE so that it compiles into each ISA
// variant of the row workers).
#pragma once

#include <vector>

#include "common/cpu_isa.h"
#include "evolving_attention/evolve_cpu_band.h"

namespace dynkernels {
namespace evolving {
namespace cpu {

// Weights regrouped for the register blocks, zero for heads past H.
// Direct: packed[((g * taps + t) * kHeads) + q] = weight[g * kHeads + q, t]
//   (t = (hi * K + di) * K + dj).
// Winograd: packed[(((g * H + hi) * 3 + di) * 4 + c) * kWinoHeads + q] = U_c of
//   weight[g * kWinoHeads + q, hi, di, :].
template <typename T>
std::vector<T> pack_weights(const T* weight, const Shape& s, const Layout<T>& lay) {
  const int64_t taps = s.h * s.k * s.k, groups = groups_of(s.h, lay.group);
  std::vector<T> packed(groups * taps * lay.group + groups * s.h * 3 * 4 * lay.group, T(0));
  for (int64_t ho = 0; ho < s.h; ++ho) {
    const int64_t g = ho / lay.group, q = ho % lay.group;
    if (!lay.wino) {
      for (int64_t t = 0; t < taps; ++t) packed[(g * taps + t) * kHeads + q] = weight[ho * taps + t];
      continue;
    }
    for (int64_t hd = 0; hd < s.h * 3; ++hd) {  // (hi, di)
      const T* w = weight + ho * taps + hd * 3;
      const T u[4] = {w[0], (w[0] + w[1] + w[2]) / T(2), (w[0] - w[1] + w[2]) / T(2), w[2]};
      for (int64_t c = 0; c < 4; ++c) packed[((g * s.h * 3 + hd) * 4 + c) * kWinoHeads + q] = u[c];
    }
  }
  return packed;
}

// The bias, or zeros, padded to whole head groups.
template <typename T>
std::vector<T> padded_bias(const T* bias, const Shape& s) {
  std::vector<T> out(groups_of(s.h, kHeads) * kHeads, T(0));
  if (bias != nullptr) std::copy(bias, bias + s.h, out.begin());
  return out;
}

// Direct convolution of one head group: z[q * zlen + j], j < zlen.
template <typename T>
DK_INLINE void conv_direct(const T* const* rows, int64_t head_stride, const T* packed, const T* bias, const Shape& s,
                           const Layout<T>& lay, T* z) {
  typedef typename Simd<T>::V V;
  constexpr int64_t L = Simd<T>::kLanes;
  for (int64_t j0 = 0; j0 < lay.zlen; j0 += kVecs * L) {
    V acc[kHeads][kVecs];
    for (int64_t q = 0; q < kHeads; ++q) {
      for (int64_t v = 0; v < kVecs; ++v) acc[q][v] = splat(bias[q]);
    }
    const T* w = packed;
    for (int64_t hi = 0; hi < s.h; ++hi) {
      for (int64_t di = 0; di < s.k; ++di) {
        const T* src = rows[di] + hi * head_stride + j0;
        for (int64_t dj = 0; dj < s.k; ++dj, w += kHeads) {
          V x[kVecs];
          for (int64_t v = 0; v < kVecs; ++v) x[v] = vload(src + dj + v * L);
          for (int64_t q = 0; q < kHeads; ++q) {
            const V wq = splat(w[q]);
            for (int64_t v = 0; v < kVecs; ++v) acc[q][v] += wq * x[v];
          }
        }
      }
    }
    for (int64_t q = 0; q < kHeads; ++q) {
      for (int64_t v = 0; v < kVecs; ++v) vstore(z + q * lay.zlen + j0 + v * L, acc[q][v]);
    }
  }
}

// Winograd pairs [t0, t0 + VB * L) of one head group (see Layout).
template <typename T, int64_t VB>
DK_INLINE void wino_block(const T* const* rows, int64_t head_stride, const T* packed, const T* bias, const Shape& s,
                          const Layout<T>& lay, int64_t t0, T* z) {
  typedef typename Simd<T>::V V;
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t np = lay.pairs;
  V m[4][kWinoHeads][VB];
  for (int64_t c = 0; c < 4; ++c) {
    for (int64_t q = 0; q < kWinoHeads; ++q) {
      for (int64_t v = 0; v < VB; ++v) m[c][q][v] = V{};
    }
  }
  const T* u = packed;
  for (int64_t hi = 0; hi < s.h; ++hi) {
    for (int64_t di = 0; di < 3; ++di, u += 4 * kWinoHeads) {
      const T* src = rows[di] + hi * head_stride + lay.width + t0;
      V x[4][VB];
      for (int64_t c = 0; c < 4; ++c) {
        for (int64_t v = 0; v < VB; ++v) x[c][v] = vload(src + c * np + v * L);
      }
      for (int64_t q = 0; q < kWinoHeads; ++q) {
        for (int64_t c = 0; c < 4; ++c) {
          const V uc = splat(u[c * kWinoHeads + q]);
          for (int64_t v = 0; v < VB; ++v) m[c][q][v] += uc * x[c][v];
        }
      }
    }
  }
  for (int64_t q = 0; q < kWinoHeads; ++q) {
    const V bq = splat(bias[q]);
    for (int64_t v = 0; v < VB; ++v) {
      const V even = m[0][q][v] + m[1][q][v] + m[2][q][v] + bq;
      const V odd = m[1][q][v] - m[2][q][v] - m[3][q][v] + bq;
      Zip<T>::run(even, odd, z + q * lay.zlen + 2 * (t0 + v * L));
    }
  }
}

// Winograd convolution of every head group, block of pairs by block of pairs:
// a block's transformed inputs (H x 3 x 4 x VB vectors) stay in L1 while
// all head groups use them, instead of each group streaming the whole band.
template <typename T, dynkernels::CpuIsa kIsa>
DK_INLINE void conv_wino(const T* const* rows, int64_t head_stride, const T* packed, const T* bias, const Shape& s,
                         const Layout<T>& lay, T* z) {
  constexpr int64_t L = Simd<T>::kLanes;
  constexpr int64_t VB = kIsa == dynkernels::CpuIsa::kAvx512 ? 2 : 1;
  const int64_t used = round_up((s.n + 1) / 2, L);  // pairs that hold outputs
  const int64_t groups = groups_of(s.h, kWinoHeads), group_weights = s.h * 3 * 4 * kWinoHeads;
  int64_t t0 = 0;
  for (; t0 + VB * L <= used; t0 += VB * L) {
    for (int64_t g = 0; g < groups; ++g) {
      wino_block<T, VB>(rows, head_stride, packed + g * group_weights, bias + g * kWinoHeads, s, lay, t0,
                        z + g * kWinoHeads * lay.zlen);
    }
  }
  for (; t0 < used; t0 += L) {
    for (int64_t g = 0; g < groups; ++g) {
      wino_block<T, 1>(rows, head_stride, packed + g * group_weights, bias + g * kWinoHeads, s, lay, t0,
                       z + g * kWinoHeads * lay.zlen);
    }
  }
}

}  // namespace cpu
}  // namespace evolving
}  // namespace dynkernels
