// Multi-tensor AdamW on CUDA, laid out as PyTorch's fused Adam (ATen MultiTensorApply.cuh):
//
// * One launch per batch of up to kMaxTensors non-empty tensors of one dtype. Every tensor is cut
//   into chunks of kChunk elements and every chunk is one block; a block finds its tensor by a
//   binary search over the batch's block_start table (kernel arguments, uniform per block) and its
//   chunk as blockIdx.x - block_start[t]. The batch lives in the kernel arguments (under the 4 KB
//   limit, static_assert below), so launches need no device allocation or copy and can be captured
//   in a CUDA graph.
// * Within a chunk all offsets are int32 (kChunk < 2^31); the only 64-bit index arithmetic is the
//   chunk's base offset, once per block. No division per element.
// * Each thread takes kILP = 4 consecutive elements per step. When the four arrays of a tensor are
//   aligned to 4 elements (16 bytes for fp32 arrays, 8 for bf16/fp16), the chunk's first
//   floor(len / 4) * 4 elements go through 16-byte (fp32) / 8-byte (16-bit) vector loads and stores;
//   chunk starts are multiples of kChunk, so they keep the tensor's alignment. The rest of the chunk
//   (all of it when a pointer is misaligned) takes the scalar path, still kILP elements per thread,
//   loaded before any arithmetic.
// * The step counts are read on the device; they are incremented by separate small launches after
//   every AdamW launch of the call, so found_inf, grad_scale and the bias corrections never need a
//   host sync, and every AdamW block reads its tensor's count before any increment.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>

#include "hpa/cuda.h"

namespace hpa {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kILP = 4;
constexpr int kChunk = 65536;  // elements per block
// The most tensors that fit in the 4 KB of kernel arguments at 46 bytes each (five pointers, a
// block_start, a last-chunk length) beside AdamWHyper and two pointers; step pointers 8 bytes each.
constexpr int kMaxTensors = 87;
constexpr int kMaxSteps = 500;
constexpr int kStepThreads = 512;
constexpr int64_t kMaxBlocks = INT_MAX;  // gridDim.x limit; block_start is int32

static_assert(kChunk % (kThreads * kILP) == 0, "a chunk is whole vector steps of the block");
static_assert(kChunk <= 65536, "last_len_minus1 holds a chunk length - 1 in 16 bits");
static_assert(kMaxSteps <= kStepThreads, "one thread per step count");

// Tensor t of a batch: blocks [block_start[t], block_start[t + 1]) (never empty), its last chunk
// last_len_minus1[t] + 1 elements long, every other chunk kChunk; so its numel is
// (block_start[t + 1] - block_start[t] - 1) * kChunk + last_len_minus1[t] + 1.
struct AdamWBatch {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  const float* step[kMaxTensors];
  int32_t block_start[kMaxTensors + 1];
  uint16_t last_len_minus1[kMaxTensors];
  int32_t count;
};

struct StepBatch {
  float* step[kMaxSteps];
  int32_t count;
};

// All of a kernel's arguments count against the 4 KB limit.
static_assert(sizeof(AdamWBatch) + sizeof(AdamWHyper) + 2 * sizeof(const float*) <= 4096,
              "AdamW kernel arguments over the 4 KB limit");
static_assert(sizeof(StepBatch) + sizeof(const float*) <= 4096, "step kernel arguments over the 4 KB limit");

// Branch-free conversions, bit-identical to Storage<D> of hpa/common.h for every input: the hardware
// conversions (exact widening; round-to-nearest-even narrowing with subnormals, overflow to Inf) give
// the same bits on every non-NaN value, and a select writes common.h's bits for NaN (payload kept as
// common.h keeps it, where the hardware would write the canonical NaN).
__device__ __forceinline__ float bf16_bits_to_f32(uint32_t h) { return __uint_as_float(h << 16); }

__device__ __forceinline__ uint32_t f32_to_bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t rn = __bfloat16_as_ushort(__float2bfloat16_rn(f));
  const uint32_t nan = ((u >> 16) | 0x40u) & 0xffffu;
  return (u & 0x7fffffffu) > 0x7f800000u ? nan : rn;
}

__device__ __forceinline__ float f16_bits_to_f32(uint32_t h) {
  const float f = __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
  const uint32_t nan = ((h & 0x8000u) << 16) | 0x7f800000u | ((h & 0x3ffu) << 13);
  return (h & 0x7fffu) > 0x7c00u ? __uint_as_float(nan) : f;
}

__device__ __forceinline__ uint32_t f32_to_f16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t rn = __half_as_ushort(__float2half_rn(f));
  const uint32_t nan = ((u >> 16) & 0x8000u) | 0x7e00u;
  return (u & 0x7fffffffu) > 0x7f800000u ? nan : rn;
}

// Storage I/O of the param and grad arrays: one element, or kILP = 4 elements through one aligned
// vector access (float4 for fp32, 4 x 16 bits in a uint2 for bf16/fp16, element j in the low half of
// word j / 2 when j is even: little-endian, as memory holds them).
template <int D>
struct Io;

template <>
struct Io<kF32> {
  using Raw = float;
  static __device__ __forceinline__ float load1(const Raw* __restrict__ a) { return *a; }
  static __device__ __forceinline__ void store1(Raw* __restrict__ a, float f) { *a = f; }
  static __device__ __forceinline__ void load4(const Raw* __restrict__ a, float (&out)[kILP]) {
    const float4 q = *reinterpret_cast<const float4*>(a);
    out[0] = q.x;
    out[1] = q.y;
    out[2] = q.z;
    out[3] = q.w;
  }
  static __device__ __forceinline__ void store4(Raw* __restrict__ a, const float (&in)[kILP]) {
    *reinterpret_cast<float4*>(a) = make_float4(in[0], in[1], in[2], in[3]);
  }
};

template <int D>
struct Io16 {
  using Raw = uint16_t;
  static __device__ __forceinline__ float to_f32(uint32_t h) {
    return D == kBF16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
  }
  static __device__ __forceinline__ uint32_t from_f32(float f) {
    return D == kBF16 ? f32_to_bf16_bits(f) : f32_to_f16_bits(f);
  }
  static __device__ __forceinline__ float load1(const Raw* __restrict__ a) { return to_f32(*a); }
  static __device__ __forceinline__ void store1(Raw* __restrict__ a, float f) {
    *a = static_cast<Raw>(from_f32(f));
  }
  static __device__ __forceinline__ void load4(const Raw* __restrict__ a, float (&out)[kILP]) {
    const uint2 q = *reinterpret_cast<const uint2*>(a);
    out[0] = to_f32(q.x & 0xffffu);
    out[1] = to_f32(q.x >> 16);
    out[2] = to_f32(q.y & 0xffffu);
    out[3] = to_f32(q.y >> 16);
  }
  static __device__ __forceinline__ void store4(Raw* __restrict__ a, const float (&in)[kILP]) {
    uint2 q;
    q.x = from_f32(in[0]) | (from_f32(in[1]) << 16);
    q.y = from_f32(in[2]) | (from_f32(in[3]) << 16);
    *reinterpret_cast<uint2*>(a) = q;
  }
};

template <>
struct Io<kBF16> : Io16<kBF16> {};
template <>
struct Io<kF16> : Io16<kF16> {};

__device__ __forceinline__ void load4_f32(const float* __restrict__ a, float (&out)[kILP]) {
  Io<kF32>::load4(a, out);
}
__device__ __forceinline__ void store4_f32(float* __restrict__ a, const float (&in)[kILP]) {
  Io<kF32>::store4(a, in);
}

// One element, in fp32, in the operation order of torch.optim.AdamW's single-tensor path (as
// hpa_kernels.ops.torch_ref.adamw_step and csrc/cpu/adamw.cpp): g = grad; g = g / grad_scale (a
// division, when a scale is given); g = sign * g (sign = -1 under maximize); then adamw_element_t:
// p * (1 - lr wd), m = lerp(m, g, 1 - b1), v = b2 v + (1 - b2) g g,
// p - step_size * (m / (sqrt(v) / sqrt(1 - b2^t) + eps)). The build has no a*b+c contraction
// (-fmad=false), so every product and sum rounds on its own, as on the CPU.
template <bool kScaled, bool kLowWeight>
__device__ __forceinline__ float update(float p, float g, float& m, float& v, const AdamWStepConsts& k, float scale,
                                        float sign) {
  if (kScaled) g = g / scale;
  g = sign * g;
  return adamw_element_t<kLowWeight>(p, g, m, v, k);
}

// Elements [0, len) of one chunk (len <= kChunk); [0, vec_end) by vector accesses (vec_end a multiple
// of kILP, the arrays aligned for them), [vec_end, len) by scalar ones. Element i of the chunk is
// written only by the thread that read it, so the in-place update has no hazard between threads.
template <int D, bool kScaled, bool kLowWeight>
__device__ __forceinline__ void adamw_chunk(typename Io<D>::Raw* __restrict__ p,
                                            const typename Io<D>::Raw* __restrict__ g, float* __restrict__ m,
                                            float* __restrict__ v, int len, int vec_end, const AdamWStepConsts& k,
                                            float scale, float sign) {
  for (int i = threadIdx.x * kILP; i < vec_end; i += kThreads * kILP) {
    float pr[kILP], gr[kILP], mr[kILP], vr[kILP];
    Io<D>::load4(p + i, pr);
    Io<D>::load4(g + i, gr);
    load4_f32(m + i, mr);
    load4_f32(v + i, vr);
#pragma unroll
    for (int j = 0; j < kILP; ++j) pr[j] = update<kScaled, kLowWeight>(pr[j], gr[j], mr[j], vr[j], k, scale, sign);
    store4_f32(m + i, mr);
    store4_f32(v + i, vr);
    Io<D>::store4(p + i, pr);
  }
  // Scalar path: thread x takes elements base + j * kThreads, j < kILP (coalesced across the block).
  for (int base = vec_end + static_cast<int>(threadIdx.x); base < len; base += kThreads * kILP) {
    float pr[kILP], gr[kILP], mr[kILP], vr[kILP];
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      const int i = base + j * kThreads;
      if (i < len) {
        pr[j] = Io<D>::load1(p + i);
        gr[j] = Io<D>::load1(g + i);
        mr[j] = m[i];
        vr[j] = v[i];
      }
    }
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      const int i = base + j * kThreads;
      if (i < len) {
        const float pn = update<kScaled, kLowWeight>(pr[j], gr[j], mr[j], vr[j], k, scale, sign);
        m[i] = mr[j];
        v[i] = vr[j];
        Io<D>::store1(p + i, pn);
      }
    }
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(AdamWBatch batch, AdamWHyper hyper, const float* __restrict__ grad_scale,
                 const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  using Raw = typename Io<D>::Raw;
  // The tensor t with block_start[t] <= blockIdx.x < block_start[t + 1] (block_start increasing).
  const int b = static_cast<int>(blockIdx.x);
  int lo = 0, hi = batch.count;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (batch.block_start[mid] <= b) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int t = lo;
  const int len = b + 1 == batch.block_start[t + 1] ? static_cast<int>(batch.last_len_minus1[t]) + 1 : kChunk;
  const int64_t base = static_cast<int64_t>(b - batch.block_start[t]) * kChunk;
  Raw* __restrict__ p = static_cast<Raw*>(batch.param[t]) + base;
  const Raw* __restrict__ g = static_cast<const Raw*>(batch.grad[t]) + base;
  float* __restrict__ m = batch.exp_avg[t] + base;
  float* __restrict__ v = batch.exp_avg_sq[t] + base;

  const AdamWStepConsts k = adamw_consts(hyper, static_cast<double>(*batch.step[t] + 1.0f));
  const bool scaled = grad_scale != nullptr;
  const float scale = scaled ? *grad_scale : 1.0f;
  const float sign = hyper.maximize ? -1.0f : 1.0f;
  const uintptr_t pg = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g);
  const uintptr_t mv = reinterpret_cast<uintptr_t>(m) | reinterpret_cast<uintptr_t>(v);
  const bool aligned = pg % (kILP * sizeof(Raw)) == 0 && mv % (kILP * sizeof(float)) == 0;
  const int vec_end = aligned ? len / kILP * kILP : 0;
  // The lerp branch and the scaling are uniform: one specialised loop each, as the CPU kernel's.
  if (k.lerp_weight < 0.5f) {
    if (scaled) {
      adamw_chunk<D, true, true>(p, g, m, v, len, vec_end, k, scale, sign);
    } else {
      adamw_chunk<D, false, true>(p, g, m, v, len, vec_end, k, scale, sign);
    }
  } else {
    if (scaled) {
      adamw_chunk<D, true, false>(p, g, m, v, len, vec_end, k, scale, sign);
    } else {
      adamw_chunk<D, false, false>(p, g, m, v, len, vec_end, k, scale, sign);
    }
  }
}

__global__ void __launch_bounds__(kStepThreads)
    step_increment_kernel(StepBatch batch, const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int t = static_cast<int>(threadIdx.x);
  if (t < batch.count) *batch.step[t] += 1.0f;
}

template <int D>
const char* launch_adamw(const AdamWBatch& batch, int32_t blocks, const AdamWHyper& hyper, const float* grad_scale,
                         const float* found_inf, cudaStream_t stream) {
  adamw_kernel<D><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch, hyper, grad_scale, found_inf);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* launch_adamw(int dtype, const AdamWBatch& batch, int32_t blocks, const AdamWHyper& hyper,
                         const float* grad_scale, const float* found_inf, cudaStream_t stream) {
  switch (dtype) {
    case kF32:
      return launch_adamw<kF32>(batch, blocks, hyper, grad_scale, found_inf, stream);
    case kBF16:
      return launch_adamw<kBF16>(batch, blocks, hyper, grad_scale, found_inf, stream);
    default:
      return launch_adamw<kF16>(batch, blocks, hyper, grad_scale, found_inf, stream);
  }
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

  // The AdamW launches: the non-empty tensors in order, a batch closed when it holds kMaxTensors
  // tensors or the next tensor's chunks would take it past kMaxBlocks blocks.
  AdamWBatch batch{};
  int64_t blocks = 0;
  for (int64_t q = 0; q < n; ++q) {
    const int64_t numel = numels[q];
    if (numel <= 0) continue;
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    if (chunks > kMaxBlocks) return "hpa adamw: tensor too large (over 2^31 - 1 chunks of 65536 elements)";
    if (batch.count == kMaxTensors || blocks + chunks > kMaxBlocks) {
      if (const char* err = launch_adamw(dtype, batch, static_cast<int32_t>(blocks), hyper, scale, inf, s)) return err;
      batch = AdamWBatch{};
      blocks = 0;
    }
    const int c = batch.count++;
    batch.param[c] = reinterpret_cast<void*>(params[q]);
    batch.grad[c] = reinterpret_cast<const void*>(grads[q]);
    batch.exp_avg[c] = reinterpret_cast<float*>(exp_avgs[q]);
    batch.exp_avg_sq[c] = reinterpret_cast<float*>(exp_avg_sqs[q]);
    batch.step[c] = reinterpret_cast<const float*>(steps[q]);
    batch.block_start[c] = static_cast<int32_t>(blocks);
    batch.last_len_minus1[c] = static_cast<uint16_t>(numel - (chunks - 1) * kChunk - 1);
    blocks += chunks;
    batch.block_start[c + 1] = static_cast<int32_t>(blocks);
  }
  if (batch.count > 0) {
    if (const char* err = launch_adamw(dtype, batch, static_cast<int32_t>(blocks), hyper, scale, inf, s)) return err;
  }

  // The step increments of every tensor (empty ones too), after all AdamW launches on the stream.
  for (int64_t first = 0; first < n; first += kMaxSteps) {
    StepBatch sb{};
    sb.count = static_cast<int32_t>(std::min<int64_t>(kMaxSteps, n - first));
    for (int q = 0; q < sb.count; ++q) sb.step[q] = reinterpret_cast<float*>(steps[first + q]);
    step_increment_kernel<<<1, kStepThreads, 0, s>>>(sb, inf);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace hpa
