// CPU kernels (csrc/cpu/*.cpp): OpenMP over rows / chunks, vectorisable fp32 inner loops, 64-bit
// indices. Every pointer is a raw address handed over from Python (tensor.data_ptr()).
#pragma once

#include <cstdint>

#include "hpa/common.h"

namespace hpa {
namespace cpu {

// Multi-tensor AdamW over n dense tensors of one storage dtype. params[k], grads[k] (dtype),
// exp_avgs[k], exp_avg_sqs[k] (fp32) share one memory layout of numels[k] elements; steps[k] is an
// fp32 scalar, incremented once. grad_scale / found_inf: fp32 scalars or nullptr; a non-zero
// *found_inf returns before anything is written.
void adamw(int dtype, int64_t n, const uintptr_t* params, const uintptr_t* grads, const uintptr_t* exp_avgs,
           const uintptr_t* exp_avg_sqs, const uintptr_t* steps, const int64_t* numels, const AdamWHyper& hyper,
           const float* grad_scale, const float* found_inf);

// HPA_SPEC.md Step 1 column energies and Step 3 Frobenius sums of (r, c) matrices, one pass, in the
// order of hpa/common.h: col_energy (c,) double, E_j = sum_i dW_ij^2; dot = <dW, W_prev>_F and
// norm_sq = ||W_prev||_F^2, double (the caller rounds them to float once).
void hpa_reduce(int dtype, int64_t r, int64_t c, Mat prev, Mat next, double* col_energy, double* dot,
                double* norm_sq);

// HPA_SPEC.md Step 3 write: out = mask ? prev (raw bits) : next - coef * prev, one pass.
void hpa_apply(int dtype, int64_t r, int64_t c, Mat prev, Mat next, Mat out, const uint8_t* mask, float coef);

// One layer of the online step (hpa_kernels.ops.online_step): contiguous row-major (rows, cols)
// tensors; step is an fp32 scalar; mask (cols,) bytes, nonzero = retained; col_energy (cols,) fp32,
// accumulated in place; lag: the layer's c_prev, applied by the lagged projection only.
struct OnlineLayer {
  int64_t rows;
  int64_t cols;
  uintptr_t param;
  uintptr_t grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* step;
  uintptr_t w_prev;
  const uint8_t* mask;
  float* col_energy;
  double lag;
};

// The online step of n layers of one storage dtype in one OpenMP parallel region, every layer's
// results bit-identical to a call with that layer alone. projection: a ProjectionMode. coefs[l]
// gets layer l's coefficient: c' (exact), c_next (lagged; its lag when skipped) or 0.
void online_step_multi(int dtype, int64_t n, const OnlineLayer* layers, const AdamWHyper& hyper,
                       const float* grad_scale, const float* found_inf, int projection, double* coefs);

// Number of OpenMP threads the kernels use (1 when built without OpenMP).
int num_threads();

}  // namespace cpu
}  // namespace hpa
