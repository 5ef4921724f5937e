// Shared by the CPU (g++) and CUDA (nvcc) kernels: storage dtypes, our own fp32 <-> bf16 / fp16
// conversions (bit exact, round-to-nearest-even, no vendor headers), and 64-bit index helpers.
// No Python and no torch headers: kernels see raw pointers, sizes and strides only.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define HPA_HD __host__ __device__ __forceinline__
#else
#define HPA_HD inline
#endif

namespace hpa {

// Storage dtype codes shared with the Python side (hpa_kernels/ops/_native.py::DTYPE_CODES).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// HPA_SPEC.md Step 3's projection inside the online step (hpa_kernels.ops.OnlineProjection; the
// codes of hpa_kernels.ops._native.PROJECTION_CODES): none (orthogonal=False, one pass), exact (a
// second pass removes this step's c' W_prev) or lagged (one pass applying the previous step's
// coefficient, returning the next one).
enum ProjectionMode : int { kProjectNone = 0, kProjectExact = 1, kProjectLagged = 2 };

HPA_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

HPA_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// bfloat16: the upper 16 bits of an fp32. Rounding as torch's c10::BFloat16 (RNE, NaN kept quiet).
HPA_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

HPA_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16 (F. Giesen's branch-light conversions; subnormals, Inf and NaN handled; RNE).
HPA_HD float f16_to_f32(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // Inf / NaN
  } else if (exp == 0) {
    o += 1u << 23;  // zero / subnormal: renormalise
    o = f32_bits(bits_f32(o) - bits_f32(113u << 23));
  }
  return bits_f32(o | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

HPA_HD uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= ((127u + 16u) << 23)) {
    o = (u > 0x7f800000u) ? 0x7e00u : 0x7c00u;  // NaN -> quiet NaN, overflow -> Inf
  } else if (u < (113u << 23)) {
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;  // aligns 10 mantissa bits
    o = f32_bits(bits_f32(u) + bits_f32(magic)) - magic;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd;
    o = u >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

// Storage traits: Raw is the stored bit pattern, load/store convert to and from fp32 math.
template <int D>
struct Storage;

template <>
struct Storage<kF32> {
  using Raw = float;
  static HPA_HD float load(Raw r) { return r; }
  static HPA_HD Raw store(float f) { return f; }
};

template <>
struct Storage<kBF16> {
  using Raw = uint16_t;
  static HPA_HD float load(Raw r) { return bf16_to_f32(r); }
  static HPA_HD Raw store(float f) { return f32_to_bf16(f); }
};

template <>
struct Storage<kF16> {
  using Raw = uint16_t;
  static HPA_HD float load(Raw r) { return f16_to_f32(r); }
  static HPA_HD Raw store(float f) { return f32_to_f16(f); }
};

// 64-bit element offset of (i, j) in a strided 2-D matrix. All index arithmetic in the kernels is
// int64, so a tensor past 2^31 elements is updated whole; tests check it with huge sizes.
HPA_HD int64_t offset2d(int64_t i, int64_t j, int64_t stride0, int64_t stride1) {
  return i * stride0 + j * stride1;
}

// A strided 2-D matrix of a call's storage dtype: element (i, j) at ptr + i*stride0 + j*stride1
// (in elements).
struct Mat {
  uintptr_t ptr;
  int64_t stride0;
  int64_t stride1;
};

// [begin, end) of part `k` of `parts` near-equal parts of n items (static schedule, int64).
HPA_HD void split_range(int64_t n, int64_t parts, int64_t k, int64_t* begin, int64_t* end) {
  const int64_t base = n / parts, rem = n % parts;
  *begin = k * base + (k < rem ? k : rem);
  *end = *begin + base + (k < rem ? 1 : 0);
}

// The fixed summation order of the HPA reductions (hpa_kernels.ops.hpa_reduce), the same on every
// backend, thread count, tile size and GPU: rows in blocks of kRowBlock; within a block, the
// adjacent-pair binary tree over the block's rows (zero-padded); block sums added in index order
// (the column energies, returned in double); the per-column totals of the two Frobenius sums added
// across columns by the same tree, rounded to float once. All in double, each product and sum one
// IEEE operation (no contraction).
constexpr int64_t kRowBlock = 128;

// The adjacent-pair tree sum of a stream of values pushed in order: a binary counter whose level l
// holds the sum of 2^l values not yet merged. total() equals the tree over the stream zero-padded
// to a power of two, level by level x[2t] + x[2t+1] (hpa_kernels.ops.torch_ref.pairwise_sum).
struct PairwiseSum {
  double level[64];
  int64_t count = 0;

  HPA_HD void push(double x) {
    int l = 0;
    for (int64_t i = count; i & 1; i >>= 1, ++l) x = level[l] + x;
    level[l] = x;
    ++count;
  }

  HPA_HD double total() const {
    double acc = 0.0;
    bool any = false;
    for (int l = 0; l < 64; ++l) {
      if ((count >> l) & 1) {
        acc = any ? level[l] + acc : level[l];
        any = true;
      }
    }
    return acc;
  }
};

// AdamW hyper-parameters of one call, as Python floats (double), like torch.optim.AdamW's.
struct AdamWHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool maximize;
};

// fp32 constants of one tensor's step, from its step count t after the increment; computed in
// double and rounded once, as torch turns its Python-float scalars into fp32 operands.
struct AdamWStepConsts {
  float lerp_weight;      // 1 - beta1
  float beta2;            // beta2
  float one_minus_beta2;  // 1 - beta2
  float eps;              // eps
  float step_size;        // lr / (1 - beta1^t)
  float bias_corr2_sqrt;  // sqrt(1 - beta2^t)
  float decay;            // 1 - lr * weight_decay
};

HPA_HD AdamWStepConsts adamw_consts(const AdamWHyper& h, double t) {
  AdamWStepConsts k;
  k.lerp_weight = static_cast<float>(1.0 - h.beta1);
  k.beta2 = static_cast<float>(h.beta2);
  k.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  k.eps = static_cast<float>(h.eps);
  k.step_size = static_cast<float>(h.lr / (1.0 - pow(h.beta1, t)));
  k.bias_corr2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, t)));
  k.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  return k;
}

// The AdamW element update of torch.optim.AdamW (single-tensor path), fp32:
//   p <- p (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
//   p <- p - step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// Returns the new p; m and v are updated in place. lerp follows ATen's two-branch formula.
// kLowWeight: which lerp branch, (1 - beta1) < 0.5; a template argument so that CPU loops hoist the
// (loop-invariant) choice out of their vectorised bodies. Same arithmetic, same rounding.
template <bool kLowWeight>
HPA_HD float adamw_element_t(float p, float g, float& m, float& v, const AdamWStepConsts& k) {
  const float w = k.lerp_weight;
  m = kLowWeight ? m + w * (g - m) : g - (g - m) * (1.0f - w);
  v = v * k.beta2 + k.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / k.bias_corr2_sqrt + k.eps;
  return p * k.decay - k.step_size * (m / denom);
}

HPA_HD float adamw_element(float p, float g, float& m, float& v, const AdamWStepConsts& k) {
  return (k.lerp_weight < 0.5f) ? adamw_element_t<true>(p, g, m, v, k) : adamw_element_t<false>(p, g, m, v, k);
}

}  // namespace hpa
