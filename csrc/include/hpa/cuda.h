// Host entry points of the CUDA kernels (csrc/cuda/*.cu), callable from plain C++ (the pybind11
// module is compiled by the host compiler, so no CUDA header is needed here). Every launch goes on
// the caller's stream, given as the integer handle torch.cuda.current_stream().cuda_stream. Each
// function returns nullptr on success or a static error string (the launch's cudaGetErrorString).
// Nothing here synchronises with the host: grad_scale, found_inf, step counts and coefficients are
// read on the device.
#pragma once

#include <cstdint>

#include "hpa/common.h"

namespace hpa {
namespace cuda {

// Number of CUDA devices (0 when there is no driver or no GPU; never fails).
int device_count();

// Multi-tensor AdamW; same contract as hpa::cpu::adamw, pointers are device addresses and the
// pointer arrays are host arrays. One launch per 87 tensors (kMaxTensors in csrc/cuda/adamw.cu: the
// kernel-argument batch that fits 4 KB), tensors cut into 65536-element chunks of one block each.
const char* adamw(int dtype, int64_t n, const uintptr_t* params, const uintptr_t* grads, const uintptr_t* exp_avgs,
                  const uintptr_t* exp_avg_sqs, const uintptr_t* steps, const int64_t* numels,
                  const AdamWHyper& hyper, uintptr_t grad_scale, uintptr_t found_inf, uintptr_t stream);

// Bytes of device workspace hpa_reduce needs for an (r, c) matrix (r, c > 0): the float64 row-block
// sums (3 x ceil(r / kRowBlock) x c) and the column trees' levels.
int64_t reduce_workspace_bytes(int64_t r, int64_t c);

// Bytes of device workspace online_step needs for an (r, c) matrix (r, c > 0).
int64_t online_workspace_bytes(int64_t r, int64_t c);

// HPA_SPEC.md Step 1 column energies and Step 3 Frobenius sums on the device: col_energy (c,) double,
// dot and norm_sq (0-d) fp32, in the fixed float64 order of hpa/common.h (kRowBlock): the bits of
// every other backend.
const char* hpa_reduce(int dtype, int64_t r, int64_t c, Mat prev, Mat next, uintptr_t col_energy, uintptr_t dot,
                       uintptr_t norm_sq, uintptr_t workspace, uintptr_t stream);

// HPA_SPEC.md Step 3 write. coef_ptr (a device fp32 scalar) wins over coef when non-zero.
const char* hpa_apply(int dtype, int64_t r, int64_t c, Mat prev, Mat next, Mat out, uintptr_t mask, float coef,
                      uintptr_t coef_ptr, uintptr_t stream);

// The online step on contiguous row-major (r, c) tensors; writes the projection coefficient (c'
// exact, c_next lagged, else 0) into the device fp32 scalar coef_out. projection: a ProjectionMode;
// lag_coef: the device fp32 scalar c_prev of the lagged projection (read on the device). Launches:
// the fused pass, the fixed-order sums, and the exact projection's second pass.
const char* online_step(int dtype, int64_t r, int64_t c, uintptr_t param, uintptr_t grad, uintptr_t exp_avg,
                        uintptr_t exp_avg_sq, uintptr_t step, uintptr_t w_prev, uintptr_t mask, uintptr_t col_energy,
                        const AdamWHyper& hyper, uintptr_t grad_scale, uintptr_t found_inf, int projection,
                        uintptr_t lag_coef, uintptr_t coef_out, uintptr_t workspace, uintptr_t stream);

}  // namespace cuda
}  // namespace hpa
