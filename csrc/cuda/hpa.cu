// HPA kernels on CUDA: consolidation reduce and write (HPA_SPEC.md Steps 1 and 3) and the online
// step. The reduce follows the fixed float64 summation order of hpa/common.h (kRowBlock) in four
// kinds of launch (row-block trees, per-column block sums = the column energies, column trees until
// one value is left, the final rounding of the two Frobenius sums), so its bits equal the CPU's and
// the "torch" reference's on any GPU. The
// online step's column reductions use 32 x 8 thread blocks over (column tile, row chunk): each block
// writes fp32 partials to a workspace that a second launch sums in double in a fixed order
// (bitwise reproducible on one GPU, no atomics). Products and sums use the _rn intrinsics and the
// build passes -fmad=false: no contraction into FMA.
#include <cuda_runtime.h>

#include <algorithm>

#include "hpa/cuda.h"

namespace hpa {
namespace cuda {
namespace {

constexpr int kTileX = 32;      // columns per block
constexpr int kTileY = 8;       // row lanes per block
constexpr int kTargetBlocks = 2048;
constexpr int kMaxChunks = 1024;
constexpr int kThreads = 256;
constexpr int kMaxBlocks1d = 4096;

struct Grid2 {
  int64_t tiles;   // column tiles (grid.x)
  int64_t chunks;  // row chunks (grid.y)
};

Grid2 reduce_grid(int64_t r, int64_t c) {
  Grid2 g;
  g.tiles = (c + kTileX - 1) / kTileX;
  const int64_t want = std::max<int64_t>(1, kTargetBlocks / std::max<int64_t>(1, g.tiles));
  g.chunks = std::max<int64_t>(1, std::min<int64_t>({want, (r + kTileY - 1) / kTileY, int64_t{kMaxChunks}}));
  return g;
}

struct Workspace {
  float* col;   // chunks * c column partials
  float* dot;   // tiles * chunks
  float* norm;  // tiles * chunks
};

Workspace carve(uintptr_t base, int64_t c, const Grid2& g) {
  Workspace w;
  w.col = reinterpret_cast<float*>(base);
  w.dot = w.col + g.chunks * c;
  w.norm = w.dot + g.tiles * g.chunks;
  return w;
}

// Fixed-order tree sum of the block's 256 values; the result is valid in thread 0.
__device__ float block_sum(float x, float* shared) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  shared[tid] = x;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) shared[tid] += shared[tid + s];
    __syncthreads();
  }
  return shared[0];
}

// Column partial of this block (sum over its kTileY row lanes, fixed order) into ws.col.
__device__ void store_column_partial(float e, float (*col)[kTileX + 1], float* out, int64_t c, int64_t j) {
  col[threadIdx.y][threadIdx.x] = e;
  __syncthreads();
  if (threadIdx.y == 0 && j < c) {
    float s = 0.0f;
    for (int y = 0; y < kTileY; ++y) s += col[y][threadIdx.x];
    out[static_cast<int64_t>(blockIdx.y) * c + j] = s;
  }
  __syncthreads();
}

constexpr int kGroup = 128;     // values per block of the column trees (a power of two)
constexpr int kBlockRowsY = 8;  // row blocks per thread block of the reduce's first stage

// Stage 1: thread (column j, row block b) sums d², d·w, w² over the block's kRowBlock rows by the
// adjacent-pair tree (rows past r are zeros, which add nothing): a binary counter whose levels the
// full unroll keeps in registers. part[q][b][j], q = 0, 1, 2.
template <int D>
__global__ void reduce_blocks_kernel(int64_t r, int64_t c, int64_t blocks, Mat prev, Mat next, double* part) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  const int64_t b = static_cast<int64_t>(blockIdx.y) * kBlockRowsY + threadIdx.y;
  if (j >= c || b >= blocks) return;
  const Raw* P = reinterpret_cast<const Raw*>(prev.ptr);
  const Raw* N = reinterpret_cast<const Raw*>(next.ptr);
  double se[8], sp[8], sq[8];
#pragma unroll
  for (int i = 0; i < kRowBlock; ++i) {
    const int64_t row = b * kRowBlock + i;
    double w = 0.0, d = 0.0;
    if (row < r) {
      w = static_cast<double>(S::load(P[offset2d(row, j, prev.stride0, prev.stride1)]));
      d = __dsub_rn(static_cast<double>(S::load(N[offset2d(row, j, next.stride0, next.stride1)])), w);
    }
    double xe = __dmul_rn(d, d), xp = __dmul_rn(d, w), xq = __dmul_rn(w, w);
    int l = 0;
#pragma unroll
    for (; l < 7 && ((i >> l) & 1); ++l) {
      xe = __dadd_rn(se[l], xe);
      xp = __dadd_rn(sp[l], xp);
      xq = __dadd_rn(sq[l], xq);
    }
    se[l] = xe;
    sp[l] = xp;
    sq[l] = xq;
  }
  const int64_t plane = blocks * c;
  part[b * c + j] = se[7];
  part[plane + b * c + j] = sp[7];
  part[2 * plane + b * c + j] = sq[7];
}

// The adjacent-pair tree over the kGroup values of sh (level by level sh[t] += sh[t + s]); the
// result is valid in sh[0] after the call. All kGroup threads of the block call it.
__device__ void group_tree(double* sh) {
  const int t = threadIdx.x;
  __syncthreads();
  for (int s = 1; s < kGroup; s <<= 1) {
    if ((t & (2 * s - 1)) == 0) sh[t] = __dadd_rn(sh[t], sh[t + s]);
    __syncthreads();
  }
}

// Stage 2: thread = column: block sums in index order -> col_energy; the tree over the block's
// kGroup columns of the d·w and w² totals -> sums[0 / 1][group].
__global__ void reduce_columns_kernel(int64_t c, int64_t blocks, const double* part, double* col_energy,
                                      double* sums) {
  __shared__ double sp[kGroup];
  __shared__ double sq[kGroup];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kGroup + threadIdx.x;
  const int64_t plane = blocks * c;
  double e = 0.0, p = 0.0, q = 0.0;
  if (j < c) {
    for (int64_t b = 0; b < blocks; ++b) {
      e = __dadd_rn(e, part[b * c + j]);
      p = __dadd_rn(p, part[plane + b * c + j]);
      q = __dadd_rn(q, part[2 * plane + b * c + j]);
    }
    col_energy[j] = e;
  }
  sp[threadIdx.x] = p;
  sq[threadIdx.x] = q;
  group_tree(sp);
  group_tree(sq);
  if (threadIdx.x == 0) {
    sums[blockIdx.x] = sp[0];
    sums[gridDim.x + blockIdx.x] = sq[0];
  }
}

// Stage 3: the tree over each kGroup consecutive values of src[0 / 1][:n] -> dst[0 / 1][group].
__global__ void pairwise_groups_kernel(int64_t n, const double* src, double* dst) {
  __shared__ double sh[kGroup];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kGroup + threadIdx.x;
  for (int row = 0; row < 2; ++row) {
    sh[threadIdx.x] = k < n ? src[row * n + k] : 0.0;
    group_tree(sh);
    if (threadIdx.x == 0) dst[row * gridDim.x + blockIdx.x] = sh[0];
    __syncthreads();
  }
}

__global__ void round_sums_kernel(const double* sums, float* dot, float* norm_sq) {
  *dot = __double2float_rn(sums[0]);
  *norm_sq = __double2float_rn(sums[1]);
}

int64_t row_blocks(int64_t r) { return (r + kRowBlock - 1) / kRowBlock; }
int64_t groups_of(int64_t n) { return (n + kGroup - 1) / kGroup; }

// Online step: column sums over the row chunks (double, fixed order), += col_energy.
__global__ void finish_columns_kernel(int64_t c, int64_t chunks, const float* col, float* col_energy,
                                      const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < c;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double e = 0.0;
    for (int64_t q = 0; q < chunks; ++q) e += col[q * c + j];
    col_energy[j] = static_cast<float>(static_cast<double>(col_energy[j]) + e);
  }
}

// Online step, one block: dot and norm over all block partials (double, fixed order), the
// coefficient c' (exact) or c_next (lagged) = dot / norm (0 when norm is 0 or without projection;
// *lag, c_prev, when skipped) and the step-count increment.
__global__ void finish_scalars_kernel(int64_t blocks, const float* dots, const float* norms, float* coef_out,
                                      float* step, bool orthogonal, const float* lag, const float* found_inf) {
  __shared__ double sd[kThreads];
  __shared__ double sn[kThreads];
  const bool skip = found_inf != nullptr && *found_inf != 0.0f;
  double d = 0.0, n = 0.0;
  for (int64_t q = threadIdx.x; q < blocks; q += kThreads) {
    d += dots[q];
    n += norms[q];
  }
  sd[threadIdx.x] = d;
  sn[threadIdx.x] = n;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sd[threadIdx.x] += sd[threadIdx.x + s];
      sn[threadIdx.x] += sn[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  if (skip) {
    *coef_out = lag != nullptr ? *lag : 0.0f;
    return;
  }
  *coef_out = (!orthogonal || sn[0] <= 0.0) ? 0.0f : static_cast<float>(sd[0] / sn[0]);
  *step += 1.0f;
}

constexpr int kApplyRowsY = 8;       // thread rows of an apply block (kTileX x kApplyRowsY threads)
constexpr int kApplyRowsBlock = 64;  // rows per apply block (each thread kApplyRowsBlock / kApplyRowsY)
constexpr int64_t kMaxGridY = 65535;

// (kTileX columns) x (kApplyRowsBlock rows) tiles, rows grid-strided past gridDim.y: a thread owns
// column j (its mask bit read once) and steps down rows, so no element index is divided. A retained
// column copies W_prev's bits and never reads W_new.
template <int D>
__global__ void apply_kernel(int64_t r, int64_t c, Mat prev, Mat next, Mat out, const uint8_t* __restrict__ mask,
                             float coef, const float* __restrict__ coef_ptr) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
  const Raw* __restrict__ P = reinterpret_cast<const Raw*>(prev.ptr);
  const Raw* __restrict__ N = reinterpret_cast<const Raw*>(next.ptr);
  Raw* __restrict__ O = reinterpret_cast<Raw*>(out.ptr);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  if (j >= c) return;
  const float cf = coef_ptr != nullptr ? *coef_ptr : coef;
  const bool retained = mask[j] != 0;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * kApplyRowsBlock;
  for (int64_t base = static_cast<int64_t>(blockIdx.y) * kApplyRowsBlock; base < r; base += row_step) {
    const int64_t end = base + kApplyRowsBlock < r ? base + kApplyRowsBlock : r;
    for (int64_t i = base + threadIdx.y; i < end; i += kApplyRowsY) {
      const Raw keep = P[offset2d(i, j, prev.stride0, prev.stride1)];
      O[offset2d(i, j, out.stride0, out.stride1)] =
          retained ? keep : S::store(S::load(N[offset2d(i, j, next.stride0, next.stride1)]) - cf * S::load(keep));
    }
  }
}

struct OnlineArgs {
  uintptr_t param, grad, exp_avg, exp_avg_sq, step, w_prev, mask;
};

// Pass 1 of the online step: AdamW, retained columns reset to W_prev, column energies of the
// unconstrained update, and the non-retained <dW, W_prev>, ||W_prev||^2 partials of the values
// written. lag (lagged projection, else nullptr): the free columns get round(W_a - *lag W_prev).
template <int D>
__global__ void online_pass1_kernel(int64_t r, int64_t c, OnlineArgs a, AdamWHyper hyper, const float* grad_scale,
                                    const float* found_inf, const float* lag, Workspace ws) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  using S = Storage<D>;
  using Raw = typename S::Raw;
  __shared__ float col[kTileY][kTileX + 1];
  __shared__ float red[kThreads];
  Raw* Pm = reinterpret_cast<Raw*>(a.param);
  const Raw* G = reinterpret_cast<const Raw*>(a.grad);
  const Raw* W0 = reinterpret_cast<const Raw*>(a.w_prev);
  float* M = reinterpret_cast<float*>(a.exp_avg);
  float* V = reinterpret_cast<float*>(a.exp_avg_sq);
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(a.mask);
  const AdamWStepConsts k = adamw_consts(hyper, static_cast<double>(*reinterpret_cast<float*>(a.step) + 1.0f));
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  const float sign = hyper.maximize ? -1.0f : 1.0f;
  const float lc = lag != nullptr ? *lag : 0.0f;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  int64_t r0, r1;
  split_range(r, gridDim.y, blockIdx.y, &r0, &r1);
  float e = 0.0f, dot = 0.0f, norm = 0.0f;
  if (j < c) {
    const bool retained = mask[j] != 0;
    for (int64_t i = r0 + threadIdx.y; i < r1; i += kTileY) {
      const int64_t idx = offset2d(i, j, c, 1);
      float g = S::load(G[idx]);
      if (grad_scale != nullptr) g = g / scale;
      g = sign * g;
      float m = M[idx], v = V[idx];
      const float before = S::load(Pm[idx]);
      const float after = adamw_element(before, g, m, v, k);
      M[idx] = m;
      V[idx] = v;
      const float u = after - before;
      e += u * u;
      const Raw keep = W0[idx];
      if (retained) {
        Pm[idx] = keep;
      } else {
        const float w = S::load(keep);
        const Raw moved = S::store(lag != nullptr ? after - lc * w : after);
        Pm[idx] = moved;
        dot += (S::load(moved) - w) * w;
        norm += w * w;
      }
    }
  }
  store_column_partial(e, col, ws.col, c, j);
  const int64_t b = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const float bd = block_sum(dot, red);
  if (threadIdx.x == 0 && threadIdx.y == 0) ws.dot[b] = bd;
  __syncthreads();
  const float bn = block_sum(norm, red);
  if (threadIdx.x == 0 && threadIdx.y == 0) ws.norm[b] = bn;
}

// Pass 2 of the online step: W <- W - c' W_prev on the non-retained columns (c' read on the device),
// in apply_kernel's tiles: a thread owns column j (its mask bit read once) and steps down rows, so no
// element index is divided; a retained column is not touched.
template <int D>
__global__ void online_pass2_kernel(int64_t r, int64_t c, uintptr_t param, uintptr_t w_prev,
                                    const uint8_t* __restrict__ mask, const float* __restrict__ coef) {
  const float cf = *coef;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  if (cf == 0.0f || j >= c || mask[j]) return;
  using S = Storage<D>;
  using Raw = typename S::Raw;
  Raw* __restrict__ Pm = reinterpret_cast<Raw*>(param);
  const Raw* __restrict__ W0 = reinterpret_cast<const Raw*>(w_prev);
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * kApplyRowsBlock;
  for (int64_t base = static_cast<int64_t>(blockIdx.y) * kApplyRowsBlock; base < r; base += row_step) {
    const int64_t end = base + kApplyRowsBlock < r ? base + kApplyRowsBlock : r;
    for (int64_t i = base + threadIdx.y; i < end; i += kApplyRowsY) {
      const int64_t idx = offset2d(i, j, c, 1);
      Pm[idx] = S::store(S::load(Pm[idx]) - cf * S::load(W0[idx]));
    }
  }
}

// Grid of apply_kernel / online_pass2_kernel: a column tile per block.x, a kApplyRowsBlock-row tile
// per block.y (rows past 65535 tiles grid-strided by the kernels).
dim3 apply_grid(int64_t r, int64_t c) {
  const int64_t row_blocks = (r + kApplyRowsBlock - 1) / kApplyRowsBlock;
  return dim3(static_cast<unsigned>((c + kTileX - 1) / kTileX),
              static_cast<unsigned>(row_blocks < kMaxGridY ? row_blocks : kMaxGridY));
}

unsigned blocks_1d(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks1d)));
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <int D>
void reduce_launch(int64_t r, int64_t c, Mat prev, Mat next, double* part, cudaStream_t s) {
  const int64_t blocks = row_blocks(r);
  const dim3 grid(static_cast<unsigned>((c + kTileX - 1) / kTileX),
                  static_cast<unsigned>((blocks + kBlockRowsY - 1) / kBlockRowsY));
  reduce_blocks_kernel<D><<<grid, dim3(kTileX, kBlockRowsY), 0, s>>>(r, c, blocks, prev, next, part);
}

template <int D>
void apply_launch(int64_t r, int64_t c, Mat prev, Mat next, Mat out, const uint8_t* mask, float coef,
                  const float* coef_ptr, cudaStream_t s) {
  apply_kernel<D><<<apply_grid(r, c), dim3(kTileX, kApplyRowsY), 0, s>>>(r, c, prev, next, out, mask, coef,
                                                                        coef_ptr);
}

// The online step's launches: pass 1, the fixed-order sums, and pass 2 for the exact projection only
// (the lagged projection is pass 1 alone, lag its c_prev).
template <int D>
void online_launch(int64_t r, int64_t c, const OnlineArgs& a, const AdamWHyper& h, const float* scale,
                   const float* inf, const Grid2& g, const Workspace& ws, float* col_energy, int projection,
                   const float* lag, float* coef_out, cudaStream_t s) {
  const float* applied = projection == kProjectLagged ? lag : nullptr;
  online_pass1_kernel<D><<<dim3(static_cast<unsigned>(g.tiles), static_cast<unsigned>(g.chunks)),
                           dim3(kTileX, kTileY), 0, s>>>(r, c, a, h, scale, inf, applied, ws);
  finish_columns_kernel<<<blocks_1d(c), kThreads, 0, s>>>(c, g.chunks, ws.col, col_energy, inf);
  finish_scalars_kernel<<<1, kThreads, 0, s>>>(g.tiles * g.chunks, ws.dot, ws.norm, coef_out,
                                               reinterpret_cast<float*>(a.step), projection != kProjectNone,
                                               applied, inf);
  if (projection != kProjectExact) return;
  online_pass2_kernel<D><<<apply_grid(r, c), dim3(kTileX, kApplyRowsY), 0, s>>>(
      r, c, a.param, a.w_prev, reinterpret_cast<const uint8_t*>(a.mask), coef_out);
}

}  // namespace

int64_t reduce_workspace_bytes(int64_t r, int64_t c) {
  const int64_t groups = groups_of(c);
  return static_cast<int64_t>(sizeof(double)) * (3 * row_blocks(r) * c + 2 * groups + 2 * groups_of(groups));
}

int64_t online_workspace_bytes(int64_t r, int64_t c) {
  const Grid2 g = reduce_grid(r, c);
  return static_cast<int64_t>(sizeof(float)) * (g.chunks * c + 2 * g.tiles * g.chunks);
}

const char* hpa_reduce(int dtype, int64_t r, int64_t c, Mat prev, Mat next, uintptr_t col_energy, uintptr_t dot,
                       uintptr_t norm_sq, uintptr_t workspace, uintptr_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t blocks = row_blocks(r);
  double* part = reinterpret_cast<double*>(workspace);
  int64_t groups = groups_of(c);
  double* sums[2] = {part + 3 * blocks * c, part + 3 * blocks * c + 2 * groups};  // ping-pong, largest first
  if ((blocks + kBlockRowsY - 1) / kBlockRowsY > 65535) return "hpa_reduce: more rows than grid.y allows (67M)";
  switch (dtype) {
    case kF32:
      reduce_launch<kF32>(r, c, prev, next, part, s);
      break;
    case kBF16:
      reduce_launch<kBF16>(r, c, prev, next, part, s);
      break;
    case kF16:
      reduce_launch<kF16>(r, c, prev, next, part, s);
      break;
    default:
      return "hpa_reduce: unknown storage dtype code";
  }
  reduce_columns_kernel<<<static_cast<unsigned>(groups), kGroup, 0, s>>>(c, blocks, part,
                                                                         reinterpret_cast<double*>(col_energy), sums[0]);
  int cur = 0;
  while (groups > 1) {
    const int64_t n = groups;
    groups = groups_of(n);
    pairwise_groups_kernel<<<static_cast<unsigned>(groups), kGroup, 0, s>>>(n, sums[cur], sums[1 - cur]);
    cur = 1 - cur;
  }
  round_sums_kernel<<<1, 1, 0, s>>>(sums[cur], reinterpret_cast<float*>(dot), reinterpret_cast<float*>(norm_sq));
  return last_error();
}

const char* hpa_apply(int dtype, int64_t r, int64_t c, Mat prev, Mat next, Mat out, uintptr_t mask, float coef,
                      uintptr_t coef_ptr, uintptr_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask);
  const float* cp = reinterpret_cast<const float*>(coef_ptr);
  switch (dtype) {
    case kF32:
      apply_launch<kF32>(r, c, prev, next, out, m, coef, cp, s);
      break;
    case kBF16:
      apply_launch<kBF16>(r, c, prev, next, out, m, coef, cp, s);
      break;
    case kF16:
      apply_launch<kF16>(r, c, prev, next, out, m, coef, cp, s);
      break;
    default:
      return "hpa_apply: unknown storage dtype code";
  }
  return last_error();
}

const char* online_step(int dtype, int64_t r, int64_t c, uintptr_t param, uintptr_t grad, uintptr_t exp_avg,
                        uintptr_t exp_avg_sq, uintptr_t step, uintptr_t w_prev, uintptr_t mask, uintptr_t col_energy,
                        const AdamWHyper& hyper, uintptr_t grad_scale, uintptr_t found_inf, int projection,
                        uintptr_t lag_coef, uintptr_t coef_out, uintptr_t workspace, uintptr_t stream) {
  if (projection < kProjectNone || projection > kProjectLagged) return "online_step: unknown projection mode code";
  if (projection == kProjectLagged && lag_coef == 0) return "online_step: the lagged projection needs c_prev";
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const float* lag = reinterpret_cast<const float*>(lag_coef);
  const Grid2 g = reduce_grid(r, c);
  const Workspace ws = carve(workspace, c, g);
  const OnlineArgs a{param, grad, exp_avg, exp_avg_sq, step, w_prev, mask};
  const float* scale = reinterpret_cast<const float*>(grad_scale);
  const float* inf = reinterpret_cast<const float*>(found_inf);
  float* energy = reinterpret_cast<float*>(col_energy);
  float* coef = reinterpret_cast<float*>(coef_out);
  switch (dtype) {
    case kF32:
      online_launch<kF32>(r, c, a, hyper, scale, inf, g, ws, energy, projection, lag, coef, s);
      break;
    case kBF16:
      online_launch<kBF16>(r, c, a, hyper, scale, inf, g, ws, energy, projection, lag, coef, s);
      break;
    case kF16:
      online_launch<kF16>(r, c, a, hyper, scale, inf, g, ws, energy, projection, lag, coef, s);
      break;
    default:
      return "online_step: unknown storage dtype code";
  }
  return last_error();
}

}  // namespace cuda
}  // namespace hpa
