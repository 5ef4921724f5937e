// Multi-tensor AdamW on the CPU: one call per storage dtype, the tensors cut into fixed chunks
// that OpenMP threads share statically (a huge tensor and many small ones balance alike).
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

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per work item

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

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
void adamw_run_base(typename Storage<D>::Raw* p, const typename Storage<D>::Raw* g, float* m, float* v, int64_t n,
                    const AdamWStepConsts& k, float scale, float sign) {
  adamw_run<D, kScaled, kLowWeight>(p, g, m, v, n, k, scale, sign);
}

template <int D, bool kScaled, bool kLowWeight>
AdamWRunFn<D> pick_run3() {
  return use_avx2() ? &adamw_run_avx2<D, kScaled, kLowWeight> : &adamw_run_base<D, kScaled, kLowWeight>;
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
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < n; ++t) {
    float* step = reinterpret_cast<float*>(steps[t]);
    *step += 1.0f;  // fp32 step count, as torch's state_steps
    consts[static_cast<size_t>(t)] = adamw_consts(h, static_cast<double>(*step));
    for (int64_t b = 0; b < numels[t]; b += kChunk) chunks.push_back({t, b, std::min(numels[t], b + kChunk)});
  }
  const bool has_scale = grad_scale != nullptr;
  const float scale = has_scale ? *grad_scale : 1.0f;
  const float sign = h.maximize ? -1.0f : 1.0f;
  // lerp_weight = fp32(1 - beta1) is the same for every tensor of the call.
  const bool low_weight = n > 0 && consts[0].lerp_weight < 0.5f;
  const AdamWRunFn<D> run = pick_run<D>(has_scale, low_weight);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t q = 0; q < nchunks; ++q) {
    const Chunk& ch = chunks[static_cast<size_t>(q)];
    const size_t t = static_cast<size_t>(ch.tensor);
    run(reinterpret_cast<Raw*>(params[t]) + ch.begin, reinterpret_cast<const Raw*>(grads[t]) + ch.begin,
        reinterpret_cast<float*>(exp_avgs[t]) + ch.begin, reinterpret_cast<float*>(exp_avg_sqs[t]) + ch.begin,
        ch.end - ch.begin, consts[t], scale, sign);
  }
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
