// Multi-tensor AdamW on CUDA: one launch per batch of up to kMaxTensors tensors of one dtype,
// blockIdx.y picking the tensor and a grid-stride loop over its elements (64-bit indices). The step
// counts are read on the device and incremented by a second tiny launch, so found_inf, grad_scale
// and the bias corrections never need a host sync.
#include <cuda_runtime.h>

#include <algorithm>

#include "hpa/cuda.h"

namespace hpa {
namespace cuda {
namespace {

constexpr int kMaxTensors = 24;
constexpr int kThreads = 256;
constexpr int kMaxBlocksX = 1024;

struct AdamWBatch {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  float* step[kMaxTensors];
  int64_t numel[kMaxTensors];
  int count;
};

template <int D>
__global__ void adamw_kernel(AdamWBatch batch, AdamWHyper hyper, const float* grad_scale, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  using S = Storage<D>;
  using Raw = typename S::Raw;
  const int t = blockIdx.y;
  const int64_t n = batch.numel[t];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (start >= n) return;
  const AdamWStepConsts k = adamw_consts(hyper, static_cast<double>(*batch.step[t] + 1.0f));
  Raw* __restrict__ p = static_cast<Raw*>(batch.param[t]);
  const Raw* __restrict__ g = static_cast<const Raw*>(batch.grad[t]);
  float* __restrict__ m = batch.exp_avg[t];
  float* __restrict__ v = batch.exp_avg_sq[t];
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  const float sign = hyper.maximize ? -1.0f : 1.0f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = start; i < n; i += stride) {
    float gi = S::load(g[i]);
    if (grad_scale != nullptr) gi = gi / scale;
    gi = sign * gi;
    float mi = m[i], vi = v[i];
    const float pi = adamw_element(S::load(p[i]), gi, mi, vi, k);
    m[i] = mi;
    v[i] = vi;
    p[i] = S::store(pi);
  }
}

__global__ void step_increment_kernel(AdamWBatch batch, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int t = threadIdx.x;
  if (t < batch.count) *batch.step[t] += 1.0f;
}

template <int D>
const char* launch(const AdamWBatch& batch, int64_t max_numel, const AdamWHyper& hyper, const float* grad_scale,
                   const float* found_inf, cudaStream_t stream) {
  if (max_numel > 0) {
    const int64_t want = (max_numel + kThreads - 1) / kThreads;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(want, kMaxBlocksX)), static_cast<unsigned>(batch.count));
    adamw_kernel<D><<<grid, kThreads, 0, stream>>>(batch, hyper, grad_scale, found_inf);
  }
  step_increment_kernel<<<1, kMaxTensors, 0, stream>>>(batch, found_inf);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

const char* adamw(int dtype, int64_t n, const uintptr_t* params, const uintptr_t* grads, const uintptr_t* exp_avgs,
                  const uintptr_t* exp_avg_sqs, const uintptr_t* steps, const int64_t* numels,
                  const AdamWHyper& hyper, uintptr_t grad_scale, uintptr_t found_inf, uintptr_t stream) {
  if (dtype != kF32 && dtype != kBF16 && dtype != kF16) return "hpa adamw: unknown storage dtype code";
  const float* scale = reinterpret_cast<const float*>(grad_scale);
  const float* inf = reinterpret_cast<const float*>(found_inf);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  for (int64_t first = 0; first < n; first += kMaxTensors) {
    AdamWBatch batch{};
    batch.count = static_cast<int>(std::min<int64_t>(kMaxTensors, n - first));
    int64_t max_numel = 0;
    for (int q = 0; q < batch.count; ++q) {
      const int64_t k = first + q;
      batch.param[q] = reinterpret_cast<void*>(params[k]);
      batch.grad[q] = reinterpret_cast<const void*>(grads[k]);
      batch.exp_avg[q] = reinterpret_cast<float*>(exp_avgs[k]);
      batch.exp_avg_sq[q] = reinterpret_cast<float*>(exp_avg_sqs[k]);
      batch.step[q] = reinterpret_cast<float*>(steps[k]);
      batch.numel[q] = numels[k];
      max_numel = std::max(max_numel, numels[k]);
    }
    const char* err = nullptr;
    switch (dtype) {
      case kF32:
        err = launch<kF32>(batch, max_numel, hyper, scale, inf, s);
        break;
      case kBF16:
        err = launch<kBF16>(batch, max_numel, hyper, scale, inf, s);
        break;
      default:
        err = launch<kF16>(batch, max_numel, hyper, scale, inf, s);
        break;
    }
    if (err != nullptr) return err;
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace hpa
