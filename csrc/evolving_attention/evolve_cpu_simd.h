// Vector helpers, the activations and the finiteness check of the CPU map step.
// Part of the CPU map step (evolve_logits_cpu.cpp includes it after turning FMA
// contraction on; every helper is DK_INLINE so that it compiles into each ISA
// variant of the row workers).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/cpu_isa.h"
#include "evolving_attention/evolving_checks.h"

namespace dynkernels {
namespace evolving {
namespace cpu {

// GCC vector types: 32 bytes (8 floats or 4 doubles) per vector, compiled to
// AVX2 / AVX-512VL registers by the ISA variants. Loads and stores go through
// memcpy (no alignment assumed).
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 32 / sizeof(T);
};

template <typename T>
DK_INLINE typename Simd<T>::V vload(const T* p) {
  typename Simd<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// A vector of x in every lane (x - 0 is exactly x, so this folds to a broadcast).
template <typename T>
DK_INLINE typename Simd<T>::V splat(T x) {
  return x - typename Simd<T>::V{};
}

template <typename T>
DK_INLINE void vstore(T* p, typename Simd<T>::V v) {
  std::memcpy(p, &v, sizeof(v));
}

// Interleaves two vectors: lo = (a0, b0, a1, b1, ...), hi = the upper halves.
template <typename T>
struct Zip;
template <>
struct Zip<float> {
  typedef int32_t M __attribute__((vector_size(32)));
  static DK_INLINE void run(Simd<float>::V a, Simd<float>::V b, float* out) {
    vstore(out, __builtin_shuffle(a, b, M{0, 8, 1, 9, 2, 10, 3, 11}));
    vstore(out + 8, __builtin_shuffle(a, b, M{4, 12, 5, 13, 6, 14, 7, 15}));
  }
};
template <>
struct Zip<double> {
  typedef int64_t M __attribute__((vector_size(32)));
  static DK_INLINE void run(Simd<double>::V a, Simd<double>::V b, double* out) {
    vstore(out, __builtin_shuffle(a, b, M{0, 4, 1, 5}));
    vstore(out + 4, __builtin_shuffle(a, b, M{2, 6, 3, 7}));
  }
};

// Largest kernel size (the row-pointer arrays below are this long).
using dynkernels::evolving::kMaxKernel;

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

enum Activation : int64_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2 };

// NaN propagates as in torch: relu(NaN) = NaN, and its gradient passes
// (torch's threshold_backward zeroes only where the output is <= 0).
template <typename T>
DK_INLINE T activate(T z, int64_t act, T slope) {
  if (act == kRelu) return z < T(0) ? T(0) : z;
  if (act == kLeakyRelu) return z > T(0) ? z : slope * z;
  return z;
}

template <typename T>
DK_INLINE T activate_grad(T z, int64_t act, T slope) {
  if (act == kRelu) return z <= T(0) ? T(0) : T(1);
  if (act == kLeakyRelu) return z > T(0) ? T(1) : slope;
  return T(1);
}

// Whether x[0, n) is all finite: x - x is 0 for finite x and NaN for Inf and
// NaN, summed over explicit lanes so that the loop vectorises.
template <typename T>
DK_INLINE bool all_finite(const T* x, int64_t n) {
  constexpr int64_t kLanes = 16;
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) lane[u] += x[j + u] - x[j + u];
  }
  T total = T(0);
  for (int64_t u = 0; u < kLanes; ++u) total += lane[u];
  for (; j < n; ++j) total += x[j] - x[j];
  return total == T(0);
}

}  // namespace cpu
}  // namespace evolving
}  // namespace dynkernels
