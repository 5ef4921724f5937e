// Runtime ISA dispatch for the CPU kernels (csrc/cpu/*.cpp), portable across gcc and clang.
//
// Each hot inner loop is written once as an HPA_ALWAYS_INLINE template and instantiated twice:
// inside an HPA_TARGET_AVX2 function (256-bit vectors) and inside a plain one (the baseline ISA of
// the build, SSE2 on x86-64). The kernel picks one per call with use_avx2(), so a wheel built for
// the baseline still runs on CPUs without AVX2. FMA is deliberately not enabled: the AVX2 and
// baseline paths then round every element-wise result identically (no contraction; the build also
// passes -ffp-contract=off). The OpenMP parallel regions stay in baseline code; only the
// vectorised loops they call are dispatched.
//
// HPA_CPU_ISA=baseline in the environment forces the baseline path (tests, A/B timing).
#pragma once

#include <cstdlib>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(HPA_NO_ISA_DISPATCH)
#define HPA_ISA_DISPATCH 1
#define HPA_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define HPA_ISA_DISPATCH 0
#define HPA_TARGET_AVX2
#endif

#if defined(__GNUC__) || defined(__clang__)
#define HPA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HPA_ALWAYS_INLINE inline
#endif

namespace hpa {
namespace cpu {

// True when the AVX2 instantiations may run (checked once per process).
inline bool use_avx2() {
#if HPA_ISA_DISPATCH
  static const bool ok = [] {
    const char* env = std::getenv("HPA_CPU_ISA");
    if (env != nullptr && (std::strcmp(env, "baseline") == 0 || std::strcmp(env, "default") == 0)) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace hpa
