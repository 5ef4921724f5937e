// Multi-tensor AdamW on the CPU: one call per storage dtype. The tensors are laid end to end and
// that element range is cut into one contiguous share per thread (a huge tensor and many small ones
// balance alike); a call too small to pay for a fork/join runs on the calling thread alone.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "hpa/cpu.h"
#include "hpa/isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hpa {
namespace cpu {

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace {

// Fewest elements worth a thread of their own (below it the fork/join costs more than it saves).
constexpr int64_t kMinPerThread = int64_t{1} << 15;
// Shares start on multiples of this many elements: two threads never write one 64-byte line of m, v.
constexpr int64_t kShareAlign = 64;

// One contiguous run [0, n) of a tensor. kScaled / kLowWeight are the call's loop-invariant choices
// (grad_scale given; lerp branch), hoisted out of the loop so that it has no control flow left and
// vectorises. Dividing by the scale is kept (not a multiply by 1/scale): bit-identical to torch.
template <int D, bool kScaled, bool kLowWeight>
HPA_ALWAYS_INLINE void adamw_run(typename Storage<D>::Raw* __restrict p, const typename Storage<D>::Raw* __restrict g,
                                 float* __restrict m, float* __restrict v, int64_t n, const AdamWStepConsts& kc,
                                 float scale, float sign) {
  using S = Storage<D>;
  const AdamWStepConsts k = kc;  // local copy: no aliasing with the arrays
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float gi = S::load(g[i]);
    if (kScaled) gi = gi / scale;
    gi = sign * gi;
    float mi = m[i], vi = v[i];
    const float pi = adamw_element_t<kLowWeight>(S::load(p[i]), gi, mi, vi, k);
    m[i] = mi;
    v[i] = vi;
    p[i] = S::store(pi);
  }
}

template <int D>
using AdamWRunFn = void (*)(typename Storage<D>::Raw*, const typename Storage<D>::Raw*, float*, float*, int64_t,
                            const AdamWStepConsts&, float, float);

template <int D, bool kScaled, bool kLowWeight>
HPA_TARGET_AVX2 void adamw_run_avx2(typename Storage<D>::Raw* p, const typename Storage<D>::Raw* g, float* m,
                                    float* v, int64_t n, const AdamWStepConsts& k, float scale, float sign) {
  adamw_run<D, kScaled, kLowWeight>(p, g, m, v, n, k, scale, sign);
}

template <int D, bool kScaled, bool kLowWeight>
HPA_TARGET_AVX512 void adamw_run_avx512(typename Storage<D>::Raw* p, const typename Storage<D>::Raw* g, float* m,
                                        float* v, int64_t n, const AdamWStepConsts& k, float scale, float sign) {
  adamw_run<D, kScaled, kLowWeight>(p, g, m, v, n, k, scale, sign);
}

template <int D, bool kScaled, bool kLowWeight>
void adamw_run_base(typename Storage<D>::Raw* p, const typename Storage<D>::Raw* g, float* m, float* v, int64_t n,
                    const AdamWStepConsts& k, float scale, float sign) {
  adamw_run<D, kScaled, kLowWeight>(p, g, m, v, n, k, scale, sign);
}

template <int D, bool kScaled, bool kLowWeight>
AdamWRunFn<D> pick_run3() {
  return by_isa<AdamWRunFn<D>>(&adamw_run_avx512<D, kScaled, kLowWeight>, &adamw_run_avx2<D, kScaled, kLowWeight>,
                               &adamw_run_base<D, kScaled, kLowWeight>);
}

template <int D>
AdamWRunFn<D> pick_run(bool scaled, bool low_weight) {
  if (scaled) return low_weight ? pick_run3<D, true, true>() : pick_run3<D, true, false>();
  return low_weight ? pick_run3<D, false, true>() : pick_run3<D, false, false>();
}

template <int D>
void adamw_typed(int64_t n, const uintptr_t* params, const uintptr_t* grads, const uintptr_t* exp_avgs,
                 const uintptr_t* exp_avg_sqs, const uintptr_t* steps, const int64_t* numels, const AdamWHyper& h,
                 const float* grad_scale) {
  using Raw = typename Storage<D>::Raw;
  std::vector<AdamWStepConsts> consts(static_cast<size_t>(n));
  std::vector<int64_t> offsets(static_cast<size_t>(n) + 1, 0);  // tensor t is [offsets[t], offsets[t+1])
  for (int64_t t = 0; t < n; ++t) {
    float* step = reinterpret_cast<float*>(steps[t]);
    *step += 1.0f;  // fp32 step count, as torch's state_steps
    consts[static_cast<size_t>(t)] = adamw_consts(h, static_cast<double>(*step));
    offsets[static_cast<size_t>(t) + 1] = offsets[static_cast<size_t>(t)] + numels[t];
  }
  const int64_t total = offsets[static_cast<size_t>(n)];
  const bool has_scale = grad_scale != nullptr;
  const float scale = has_scale ? *grad_scale : 1.0f;
  const float sign = h.maximize ? -1.0f : 1.0f;
  // lerp_weight = fp32(1 - beta1) is the same for every tensor of the call.
  const bool low_weight = n > 0 && consts[0].lerp_weight < 0.5f;
  const AdamWRunFn<D> run = pick_run<D>(has_scale, low_weight);
  // Elements [lo, hi) of the concatenation: each tensor's overlap with it, in order.
  auto run_range = [&](int64_t lo, int64_t hi) {
    size_t t = static_cast<size_t>(std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin()) - 1;
    for (; lo < hi; ++t) {
      const int64_t begin = lo - offsets[t];
      const int64_t end = std::min(hi, offsets[t + 1]) - offsets[t];
      if (end > begin) {
        run(reinterpret_cast<Raw*>(params[t]) + begin, reinterpret_cast<const Raw*>(grads[t]) + begin,
            reinterpret_cast<float*>(exp_avgs[t]) + begin, reinterpret_cast<float*>(exp_avg_sqs[t]) + begin,
            end - begin, consts[t], scale, sign);
      }
      lo = offsets[t] + end;
    }
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads(), total / kMinPerThread));
  if (threads == 1) {
    run_range(0, total);
    return;
  }
  // Thread k's share: [bound(k), bound(k + 1)), bounds rounded to kShareAlign within a tensor.
  auto bound = [&](int64_t k) {
    if (k >= threads) return total;
    const int64_t cut = total / threads * k;
    const size_t t = static_cast<size_t>(std::upper_bound(offsets.begin(), offsets.end(), cut) - offsets.begin()) - 1;
    const int64_t aligned = offsets[t] + (cut - offsets[t]) / kShareAlign * kShareAlign;
    return aligned;
  };
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(threads))
  for (int64_t k = 0; k < threads; ++k) run_range(bound(k), bound(k + 1));
}

}  // namespace

void adamw(int dtype, int64_t n, const uintptr_t* params, const uintptr_t* grads, const uintptr_t* exp_avgs,
           const uintptr_t* exp_avg_sqs, const uintptr_t* steps, const int64_t* numels, const AdamWHyper& hyper,
           const float* grad_scale, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler skip: nothing written
  switch (dtype) {
    case kF32:
      return adamw_typed<kF32>(n, params, grads, exp_avgs, exp_avg_sqs, steps, numels, hyper, grad_scale);
    case kBF16:
      return adamw_typed<kBF16>(n, params, grads, exp_avgs, exp_avg_sqs, steps, numels, hyper, grad_scale);
    case kF16:
      return adamw_typed<kF16>(n, params, grads, exp_avgs, exp_avg_sqs, steps, numels, hyper, grad_scale);
    default:
      throw std::invalid_argument("hpa adamw: unknown storage dtype code");
  }
}

}  // namespace cpu
}  // namespace hpa
