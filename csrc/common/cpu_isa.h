// Runtime ISA dispatch for the CPU kernels (header-only).
//
// GCC's target_clones("avx2", ...) does not enable FMA (a separate ISA flag),
// and a clone list cannot name a feature set, so kernels whose cost is
// multiply-adds dispatch by hand: DK_ISA_DISPATCH(worker) defines
// worker_isa<T>(args...), which runs the always-inline template
// worker<T, CpuIsa> (the ISA lets it pick its register blocking),
// compiled for AVX-512 (VL, 32 vector registers) + FMA, AVX2 + FMA, or the
// baseline, picked once from the running CPU.
#pragma once

// Helpers of dispatched workers must inline into them: a helper left out of
// line is compiled for the baseline only, and its vector code runs narrow.
#if defined(__GNUC__)
#define DK_INLINE inline __attribute__((always_inline))
#else
#define DK_INLINE inline
#endif

namespace dynkernels {

enum class CpuIsa { kBase, kAvx2, kAvx512 };

inline CpuIsa cpu_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return CpuIsa::kAvx512;
    return avx2 ? CpuIsa::kAvx2 : CpuIsa::kBase;
  }();
  return isa;
#else
  return CpuIsa::kBase;
#endif
}

}  // namespace dynkernels

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DK_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vl")))
#define DK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DK_ISA_DISPATCH(worker)                                                         \
  template <typename T, typename... A>                                                  \
  DK_TARGET_AVX512 void worker##_avx512(A... a) {                                       \
    worker<T, dynkernels::CpuIsa::kAvx512>(a...);                                       \
  }                                                                                     \
  template <typename T, typename... A>                                                  \
  DK_TARGET_AVX2 void worker##_avx2(A... a) {                                           \
    worker<T, dynkernels::CpuIsa::kAvx2>(a...);                                         \
  }                                                                                     \
  template <typename T, typename... A>                                                  \
  void worker##_isa(A... a) {                                                           \
    switch (dynkernels::cpu_isa()) {                                                    \
      case dynkernels::CpuIsa::kAvx512: return worker##_avx512<T>(a...);                \
      case dynkernels::CpuIsa::kAvx2: return worker##_avx2<T>(a...);                    \
      default: return worker<T, dynkernels::CpuIsa::kBase>(a...);                       \
    }                                                                                   \
  }
#else
#define DK_ISA_DISPATCH(worker)                                                         \
  template <typename T, typename... A>                                                  \
  void worker##_isa(A... a) {                                                           \
    worker<T, dynkernels::CpuIsa::kBase>(a...);                                         \
  }
#endif
