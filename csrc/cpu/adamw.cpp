// Multi-tensor AdamW on the CPU: one call per storage dtype, the tensors cut into fixed chunks
// that OpenMP threads share statically (a huge tensor and many small ones balance alike).
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "hpa/cpu.h"

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

template <int D>
void adamw_chunk(const Chunk& ch, const uintptr_t* params, const uintptr_t* grads, const uintptr_t* exp_avgs,
                 const uintptr_t* exp_avg_sqs, const AdamWStepConsts& k, float scale, bool has_scale,
                 bool maximize) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
  Raw* __restrict p = reinterpret_cast<Raw*>(params[ch.tensor]);
  const Raw* __restrict g = reinterpret_cast<const Raw*>(grads[ch.tensor]);
  float* __restrict m = reinterpret_cast<float*>(exp_avgs[ch.tensor]);
  float* __restrict v = reinterpret_cast<float*>(exp_avg_sqs[ch.tensor]);
  const float sign = maximize ? -1.0f : 1.0f;
#pragma omp simd
  for (int64_t i = ch.begin; i < ch.end; ++i) {
    float gi = S::load(g[i]);
    if (has_scale) gi = gi / scale;
    gi = sign * gi;
    float mi = m[i], vi = v[i];
    const float pi = adamw_element(S::load(p[i]), gi, mi, vi, k);
    m[i] = mi;
    v[i] = vi;
    p[i] = S::store(pi);
  }
}

template <int D>
void adamw_typed(int64_t n, const uintptr_t* params, const uintptr_t* grads, const uintptr_t* exp_avgs,
                 const uintptr_t* exp_avg_sqs, const uintptr_t* steps, const int64_t* numels, const AdamWHyper& h,
                 const float* grad_scale) {
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
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t q = 0; q < nchunks; ++q) {
    const Chunk& ch = chunks[static_cast<size_t>(q)];
    adamw_chunk<D>(ch, params, grads, exp_avgs, exp_avg_sqs, consts[static_cast<size_t>(ch.tensor)], scale,
                   has_scale, h.maximize);
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
