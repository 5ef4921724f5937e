// Runtime ISA dispatch for the CPU kernels (csrc/cpu/*.cpp), portable across gcc and clang.
//
// Each hot inner loop is written once as an HPA_ALWAYS_INLINE template and instantiated three
// times: inside an HPA_TARGET_AVX512 function (512-bit vectors), an HPA_TARGET_AVX2 one (256-bit)
// and a plain one (the baseline ISA of the build, SSE2 on x86-64). The kernel picks one per call
// with pick_isa(), so a wheel built for the baseline still runs on any x86-64 CPU. FMA is
// deliberately not used: every path then rounds every element-wise result identically (no
// contraction; the build also passes -ffp-contract=off), so the AdamW update, W <- W_prev on
// retained columns and the column energies have the same bits on every ISA; only sums over lanes
// (the online step's <dW, W_prev> and ||W_prev||^2) may differ in their last bits. The OpenMP
// parallel regions stay in baseline code; only the vectorised loops they call are dispatched.
//
// HPA_CPU_ISA=baseline (or default) / avx2 in the environment caps the ISA (tests, A/B timing).
#pragma once

#include <cstdlib>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(HPA_NO_ISA_DISPATCH)
#define HPA_ISA_DISPATCH 1
#define HPA_TARGET_AVX2 __attribute__((target("avx2")))
#define HPA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,prefer-vector-width=512")))
#else
#define HPA_ISA_DISPATCH 0
#define HPA_TARGET_AVX2
#define HPA_TARGET_AVX512
#endif

#if defined(__GNUC__) || defined(__clang__)
#define HPA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HPA_ALWAYS_INLINE inline
#endif

namespace hpa {
namespace cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest instantiation this CPU runs, capped by HPA_CPU_ISA (checked once per process).
inline Isa pick_isa() {
#if HPA_ISA_DISPATCH
  static const Isa isa = [] {
    const char* env = std::getenv("HPA_CPU_ISA");
    const bool baseline = env != nullptr && (std::strcmp(env, "baseline") == 0 || std::strcmp(env, "default") == 0);
    const bool avx2_cap = env != nullptr && std::strcmp(env, "avx2") == 0;
    if (baseline) return Isa::kBaseline;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2")) return Isa::kBaseline;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    return avx512 && !avx2_cap ? Isa::kAvx512 : Isa::kAvx2;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

// True when the AVX2 (or wider) instantiations may run.
inline bool use_avx2() { return pick_isa() != Isa::kBaseline; }

// One of three instantiations of a kernel loop, by pick_isa().
template <typename Fn>
Fn by_isa(Fn avx512, Fn avx2, Fn baseline) {
  switch (pick_isa()) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    default:
      return baseline;
  }
}

}  // namespace cpu
}  // namespace hpa
