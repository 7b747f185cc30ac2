// Small CPU math helpers shared by the fused kernels (header-only).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dynkernels {

// exp for softmax rows, branch-free so that loops over it vectorise: Cody-Waite
// range reduction and a degree-6 polynomial, about 1 ulp over [-87, 88]
// (inputs are clamped there; softmax feeds it x - max <= 0). double uses std::exp.
#if defined(__GNUC__)
inline __attribute__((always_inline)) float exp_approx(float x) {
#else
inline float exp_approx(float x) {
#endif
  x = x < -87.0f ? -87.0f : x;  // value selects, not std::min/max references: they vectorise
  x = x > 88.0f ? 88.0f : x;
  // Round to nearest by the 1.5 * 2^23 trick: plain adds, so the loop vectorises.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_approx(double x) { return std::exp(x); }

}  // namespace dynkernels
