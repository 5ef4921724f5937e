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

// The online step's projection: a ProjectionMode and, lagged, the coefficient c_prev it applies.
struct Projection {
  int mode;
  double lag;
};

// The online step (hpa_kernels.ops.online_step) on contiguous row-major (r, c) tensors. Returns the
// projection coefficient: c' (exact), c_next (lagged; c_prev when skipped) or 0. col_energy (c,)
// fp32 is accumulated in place.
double online_step(int dtype, int64_t r, int64_t c, uintptr_t param, uintptr_t grad, float* exp_avg,
                   float* exp_avg_sq, float* step, uintptr_t w_prev, const uint8_t* mask, float* col_energy,
                   const AdamWHyper& hyper, const float* grad_scale, const float* found_inf,
                   const Projection& projection);

// Number of OpenMP threads the kernels use (1 when built without OpenMP).
int num_threads();

}  // namespace cpu
}  // namespace hpa
