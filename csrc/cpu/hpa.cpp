// HPA kernels on the CPU: the consolidation reduce and write (HPA_SPEC.md Steps 1 and 3) and the
// online step. The reduce follows the fixed summation order of hpa/common.h (kRowBlock): each task
// owns whole columns over all rows, so its bits do not depend on the thread count. The online
// step's reductions split the (r, c) matrix into row blocks x column blocks fixed by its shape
// (tile()); each row block keeps its own fp32 column partials, summed in double in a fixed order,
// so their bits do not depend on the thread count either.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "hpa/cpu.h"
#include "hpa/isa.h"

namespace hpa {
namespace cpu {
namespace {

constexpr int64_t kSmallWork = int64_t{1} << 15;  // below this many elements: one thread
constexpr int64_t kRowSpan = 2048;                // fp32 row partials span at most this many columns

// Row blocks x column blocks of one layer's online pass 1: blocks of at most kTaskRows rows by
// kRowSpan columns, fixed by the layer's shape alone (not the thread count), so every sum of the
// pass (the column energies, <dW, W_prev>, ||W_prev||^2) is taken in one order, with the same bits,
// on any number of threads.
constexpr int64_t kTaskRows = 256;
struct Tiling {
  int64_t row_blocks;
  int64_t col_blocks;
};

Tiling tile(int64_t r, int64_t c) {
  Tiling t;
  t.row_blocks = std::max<int64_t>(1, (r + kTaskRows - 1) / kTaskRows);
  t.col_blocks = std::max<int64_t>(1, (c + kRowSpan - 1) / kRowSpan);
  return t;
}

// ---- Vectorised inner loops, each instantiated for AVX2 and the baseline ISA (hpa/isa.h).

// Reduce: columns [j0, j0 + w) of one row, widened to double (exact): d², d·w, w², each added to
// the matching `add` level (kAdd) or not, into `out`.
constexpr int64_t kReduceSpan = 64;  // columns per reduce task

struct Triple {
  double* e;
  double* p;
  double* q;
};

template <int D, bool kUnit, bool kAdd>
HPA_ALWAYS_INLINE void reduce_terms(const typename Storage<D>::Raw* __restrict pr,
                                    const typename Storage<D>::Raw* __restrict nr, int64_t ps1, int64_t ns1,
                                    int64_t w, Triple add, Triple out) {
  using S = Storage<D>;
  const double* __restrict ae = add.e;
  const double* __restrict ap = add.p;
  const double* __restrict aq = add.q;
  double* __restrict oe = out.e;
  double* __restrict op = out.p;
  double* __restrict oq = out.q;
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    const double p = static_cast<double>(S::load(pr[kUnit ? j : j * ps1]));
    const double d = static_cast<double>(S::load(nr[kUnit ? j : j * ns1])) - p;
    oe[j] = kAdd ? ae[j] + d * d : d * d;
    op[j] = kAdd ? ap[j] + d * p : d * p;
    oq[j] = kAdd ? aq[j] + p * p : p * p;
  }
}

// out = add + x, elementwise over the three quantities (out may be x).
HPA_ALWAYS_INLINE void add_levels(int64_t w, Triple add, Triple x, Triple out) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    out.e[j] = add.e[j] + x.e[j];
    out.p[j] = add.p[j] + x.p[j];
    out.q[j] = add.q[j] + x.q[j];
  }
}

// One reduce task: columns [j0, j0 + w) over all r rows, in the order of hpa/common.h. Block sums
// by a vectorised binary counter (level l holds a sum of 2^l rows, row i merges its trailing-one
// levels into level ctz(~i)), added in block order.
template <int D, bool kUnit>
void reduce_columns(int64_t r, int64_t j0, int64_t w, Mat prev, Mat next, double* E, double* P, double* Q) {
  using Raw = typename Storage<D>::Raw;
  constexpr int kLevels = 8;  // kRowBlock = 2^7 rows merge into level 7
  alignas(64) double ste[kLevels][kReduceSpan], stp[kLevels][kReduceSpan], stq[kLevels][kReduceSpan];
  alignas(64) double xe[kReduceSpan], xp[kReduceSpan], xq[kReduceSpan];
  alignas(64) double te[kReduceSpan] = {}, tp[kReduceSpan] = {}, tq[kReduceSpan] = {};
  const Triple x{xe, xp, xq};
  auto level = [&](int l) { return Triple{ste[l], stp[l], stq[l]}; };
  const Raw* P0 = reinterpret_cast<const Raw*>(prev.ptr) + j0 * prev.stride1;
  const Raw* N0 = reinterpret_cast<const Raw*>(next.ptr) + j0 * next.stride1;
  for (int64_t b0 = 0; b0 < r; b0 += kRowBlock) {
    const int64_t n = std::min<int64_t>(kRowBlock, r - b0);
    for (int64_t i = 0; i < n; ++i) {
      const Raw* pr = P0 + (b0 + i) * prev.stride0;
      const Raw* nr = N0 + (b0 + i) * next.stride0;
      const int merges = __builtin_ctzll(~static_cast<uint64_t>(i));
      if (merges == 0) {
        reduce_terms<D, kUnit, false>(pr, nr, prev.stride1, next.stride1, w, x, level(0));
        continue;
      }
      reduce_terms<D, kUnit, true>(pr, nr, prev.stride1, next.stride1, w, level(0), merges == 1 ? level(1) : x);
      for (int l = 1; l < merges; ++l) add_levels(w, level(l), x, l + 1 == merges ? level(merges) : x);
    }
    bool any = false;  // the block's tree total: levels of n's set bits, lowest first
    for (int l = 0; l < kLevels; ++l) {
      if (!((n >> l) & 1)) continue;
      if (any) {
        add_levels(w, level(l), x, x);
      } else {
        std::memcpy(xe, ste[l], sizeof(double) * w);
        std::memcpy(xp, stp[l], sizeof(double) * w);
        std::memcpy(xq, stq[l], sizeof(double) * w);
      }
      any = true;
    }
    add_levels(w, Triple{te, tp, tq}, x, Triple{te, tp, tq});
  }
  std::memcpy(E + j0, te, sizeof(double) * w);
  std::memcpy(P + j0, tp, sizeof(double) * w);
  std::memcpy(Q + j0, tq, sizeof(double) * w);
}

template <int D, bool kUnit>
HPA_TARGET_AVX2 void reduce_columns_avx2(int64_t r, int64_t j0, int64_t w, Mat prev, Mat next, double* E, double* P,
                                         double* Q) {
  reduce_columns<D, kUnit>(r, j0, w, prev, next, E, P, Q);
}
template <int D, bool kUnit>
void reduce_columns_base(int64_t r, int64_t j0, int64_t w, Mat prev, Mat next, double* E, double* P, double* Q) {
  reduce_columns<D, kUnit>(r, j0, w, prev, next, E, P, Q);
}
using ReduceColumnsFn = void (*)(int64_t, int64_t, int64_t, Mat, Mat, double*, double*, double*);

// Apply, unit column stride: one row, out = mask ? prev : next - coef * prev. No __restrict: out
// may be next itself (in place), element by element.
template <int D>
HPA_ALWAYS_INLINE void apply_row(const typename Storage<D>::Raw* pr, const typename Storage<D>::Raw* nr,
                                 typename Storage<D>::Raw* orow, const uint8_t* mask, int64_t c, float coef) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    const Raw keep = pr[j];
    const Raw moved = S::store(S::load(nr[j]) - coef * S::load(keep));
    orow[j] = mask[j] ? keep : moved;  // retained columns: W_prev's raw bits
  }
}

template <int D>
using ApplyRowFn = void (*)(const typename Storage<D>::Raw*, const typename Storage<D>::Raw*,
                            typename Storage<D>::Raw*, const uint8_t*, int64_t, float);
template <int D>
HPA_TARGET_AVX2 void apply_row_avx2(const typename Storage<D>::Raw* pr, const typename Storage<D>::Raw* nr,
                                    typename Storage<D>::Raw* orow, const uint8_t* mask, int64_t c, float coef) {
  apply_row<D>(pr, nr, orow, mask, c, coef);
}
template <int D>
void apply_row_base(const typename Storage<D>::Raw* pr, const typename Storage<D>::Raw* nr,
                    typename Storage<D>::Raw* orow, const uint8_t* mask, int64_t c, float coef) {
  apply_row<D>(pr, nr, orow, mask, c, coef);
}

// One block of an online pass 1: rows [r0, r1) x columns [c0, c1) of one layer (tile(): at most
// kRowSpan columns, so each row's fp32 sums span at most that many).
template <int D>
struct OnlineBlock {
  typename Storage<D>::Raw* param;
  const typename Storage<D>::Raw* grad;
  const typename Storage<D>::Raw* w_prev;
  float* exp_avg;
  float* exp_avg_sq;
  const uint32_t* mask;  // the layer's widened mask
  float* acc;            // the block's column partials (cols entries, indexed by column)
  int64_t cols, r0, r1, c0, c1;
};

// Online step pass 1 on the block's columns of the row starting at element `at`: AdamW, retained
// columns reset to W_prev, column energies, and the row's <dW, W_prev> and ||W_prev (1 - M)||^2
// terms of the values written. kLagged: the free columns get round(W_a - lag W_prev) (the previous
// step's coefficient, applied in this pass), else round(W_a). The mask comes widened to 32 bits
// (one word per column, nonzero = retained): every stream of the loop is then 32 bits wide and it
// vectorises at the full width.
template <int D, bool kScaled, bool kLowWeight, bool kLagged>
HPA_ALWAYS_INLINE void online_seg(const OnlineBlock<D>& b, int64_t at, const AdamWStepConsts& kc, float scale,
                                  float sign, float lag, float* dot_out, float* norm_out) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
  Raw* __restrict pr = b.param + at;
  const Raw* __restrict gr = b.grad + at;
  const Raw* __restrict wr = b.w_prev + at;
  float* __restrict mr = b.exp_avg + at;
  float* __restrict vr = b.exp_avg_sq + at;
  const uint32_t* __restrict mask = b.mask;
  float* __restrict acc = b.acc;
  const int64_t j0 = b.c0, j1 = b.c1;
  const AdamWStepConsts k = kc;
  float rdot = 0.0f, rnorm = 0.0f;
#pragma omp simd reduction(+ : rdot, rnorm)
  for (int64_t j = j0; j < j1; ++j) {
    float g = S::load(gr[j]);
    if (kScaled) g = g / scale;
    g = sign * g;
    float m = mr[j], v = vr[j];
    const float before = S::load(pr[j]);
    const float after = adamw_element_t<kLowWeight>(before, g, m, v, k);
    mr[j] = m;
    vr[j] = v;
    const float u = after - before;
    acc[j] += u * u;
    const Raw keep = wr[j];
    const float w = S::load(keep);
    const Raw moved = S::store(kLagged ? after - lag * w : after);
    const bool retained = mask[j] != 0;
    pr[j] = retained ? keep : moved;
    const float d = retained ? 0.0f : S::load(moved) - w;
    rdot += d * w;
    rnorm += retained ? 0.0f : w * w;
  }
  *dot_out = rdot;
  *norm_out = rnorm;
}

// Pass 1 on a block: online_seg on each row, each row's fp32 sums added to the block's double sums
// in order.
template <int D, bool kScaled, bool kLowWeight, bool kLagged>
HPA_ALWAYS_INLINE void online_block(const OnlineBlock<D>& b, const AdamWStepConsts& k, float scale, float sign,
                                    float lag, double* dot_out, double* norm_out) {
  double dot = 0.0, norm = 0.0;
  for (int64_t i = b.r0; i < b.r1; ++i) {
    float rdot = 0.0f, rnorm = 0.0f;
    online_seg<D, kScaled, kLowWeight, kLagged>(b, i * b.cols, k, scale, sign, lag, &rdot, &rnorm);
    dot += rdot;
    norm += rnorm;
  }
  *dot_out = dot;
  *norm_out = norm;
}

template <int D>
using OnlineBlockFn = void (*)(const OnlineBlock<D>&, const AdamWStepConsts&, float, float, float, double*, double*);
template <int D, bool kScaled, bool kLowWeight, bool kLagged>
HPA_TARGET_AVX2 void online_block_avx2(const OnlineBlock<D>& b, const AdamWStepConsts& k, float scale, float sign,
                                       float lag, double* dot, double* norm) {
  online_block<D, kScaled, kLowWeight, kLagged>(b, k, scale, sign, lag, dot, norm);
}
template <int D, bool kScaled, bool kLowWeight, bool kLagged>
HPA_TARGET_AVX512 void online_block_avx512(const OnlineBlock<D>& b, const AdamWStepConsts& k, float scale, float sign,
                                           float lag, double* dot, double* norm) {
  online_block<D, kScaled, kLowWeight, kLagged>(b, k, scale, sign, lag, dot, norm);
}
template <int D, bool kScaled, bool kLowWeight, bool kLagged>
void online_block_base(const OnlineBlock<D>& b, const AdamWStepConsts& k, float scale, float sign, float lag,
                       double* dot, double* norm) {
  online_block<D, kScaled, kLowWeight, kLagged>(b, k, scale, sign, lag, dot, norm);
}
template <int D, bool kScaled, bool kLowWeight, bool kLagged>
OnlineBlockFn<D> pick_online4() {
  return by_isa<OnlineBlockFn<D>>(&online_block_avx512<D, kScaled, kLowWeight, kLagged>,
                                  &online_block_avx2<D, kScaled, kLowWeight, kLagged>,
                                  &online_block_base<D, kScaled, kLowWeight, kLagged>);
}
template <int D, bool kScaled, bool kLowWeight>
OnlineBlockFn<D> pick_online3(bool lagged) {
  return lagged ? pick_online4<D, kScaled, kLowWeight, true>() : pick_online4<D, kScaled, kLowWeight, false>();
}
template <int D>
OnlineBlockFn<D> pick_online(bool scaled, bool low_weight, bool lagged) {
  if (scaled) return low_weight ? pick_online3<D, true, true>(lagged) : pick_online3<D, true, false>(lagged);
  return low_weight ? pick_online3<D, false, true>(lagged) : pick_online3<D, false, false>(lagged);
}

// Online step pass 2 on one row: W <- W - c' W_prev on the non-retained columns.
template <int D>
HPA_ALWAYS_INLINE void project_row(typename Storage<D>::Raw* __restrict pr, const typename Storage<D>::Raw* __restrict wr,
                                   const uint8_t* __restrict mask, int64_t c, float cf) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    const Raw cur = pr[j];
    const Raw moved = S::store(S::load(cur) - cf * S::load(wr[j]));
    pr[j] = mask[j] ? cur : moved;
  }
}

template <int D>
using ProjectRowFn = void (*)(typename Storage<D>::Raw*, const typename Storage<D>::Raw*, const uint8_t*, int64_t,
                              float);
template <int D>
HPA_TARGET_AVX2 void project_row_avx2(typename Storage<D>::Raw* pr, const typename Storage<D>::Raw* wr,
                                      const uint8_t* mask, int64_t c, float cf) {
  project_row<D>(pr, wr, mask, c, cf);
}
template <int D>
void project_row_base(typename Storage<D>::Raw* pr, const typename Storage<D>::Raw* wr, const uint8_t* mask, int64_t c,
                      float cf) {
  project_row<D>(pr, wr, mask, c, cf);
}

// HPA_SPEC.md Steps 1 and 3 sums in the order of hpa/common.h: col_energy[j] = E_j (not rounded),
// dot and norm the column trees of D_j and N_j.
template <int D>
void reduce_typed(int64_t r, int64_t c, Mat prev, Mat next, double* col_energy, double* dot_out, double* norm_out) {
  const bool unit = prev.stride1 == 1 && next.stride1 == 1;
  const bool avx2 = use_avx2();
  const ReduceColumnsFn task_fn = unit ? (avx2 ? &reduce_columns_avx2<D, true> : &reduce_columns_base<D, true>)
                                       : (avx2 ? &reduce_columns_avx2<D, false> : &reduce_columns_base<D, false>);
  std::vector<double> P(static_cast<size_t>(c)), Q(static_cast<size_t>(c));
  const int64_t tasks = (c + kReduceSpan - 1) / kReduceSpan;
#pragma omp parallel for schedule(dynamic, 1) if (tasks > 1 && r * c > kSmallWork)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t j0 = task * kReduceSpan;
    task_fn(r, j0, std::min(kReduceSpan, c - j0), prev, next, col_energy, P.data(), Q.data());
  }
  PairwiseSum dot, norm;
  for (int64_t j = 0; j < c; ++j) {
    dot.push(P[static_cast<size_t>(j)]);
    norm.push(Q[static_cast<size_t>(j)]);
  }
  *dot_out = dot.total();
  *norm_out = norm.total();
}

template <int D>
void apply_typed(int64_t r, int64_t c, Mat prev, Mat next, Mat out, const uint8_t* mask, float coef) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
  const Raw* P = reinterpret_cast<const Raw*>(prev.ptr);
  const Raw* N = reinterpret_cast<const Raw*>(next.ptr);
  Raw* O = reinterpret_cast<Raw*>(out.ptr);
  const bool unit = prev.stride1 == 1 && next.stride1 == 1 && out.stride1 == 1;
  const ApplyRowFn<D> row = use_avx2() ? &apply_row_avx2<D> : &apply_row_base<D>;
#pragma omp parallel for schedule(static) if (r * c > kSmallWork)
  for (int64_t i = 0; i < r; ++i) {
    const Raw* pr = P + i * prev.stride0;
    const Raw* nr = N + i * next.stride0;
    Raw* orow = O + i * out.stride0;
    if (unit) {
      row(pr, nr, orow, mask, c, coef);
    } else {
      for (int64_t j = 0; j < c; ++j) {
        const Raw keep = pr[j * prev.stride1];
        const Raw moved = S::store(S::load(nr[j * next.stride1]) - coef * S::load(keep));
        orow[j * out.stride1] = mask[j] ? keep : moved;
      }
    }
  }
}

// The online step over n layers in one OpenMP parallel region: pass 1 of every layer (each layer
// cut into the same row x column tasks as a single-layer call, so every result is bit-identical to
// n separate calls), then each layer's sums and coefficient, then (exact projection only) pass 2 of
// every layer. The lagged projection is pass 1 alone: it applies each layer's lag and returns its
// c_next. Pass-1 tasks are handed out largest first (whole layers of different sizes balance by
// elements); the order tasks run in changes no result, each writing only its own slots.
template <int D>
void online_typed(int64_t n, const OnlineLayer* layers, const AdamWHyper& h, const float* grad_scale, int mode,
                  double* coefs) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
  const bool has_scale = grad_scale != nullptr;
  const float scale = has_scale ? *grad_scale : 1.0f;
  const float sign = h.maximize ? -1.0f : 1.0f;
  std::vector<AdamWStepConsts> consts(static_cast<size_t>(n));
  std::vector<Tiling> tiles(static_cast<size_t>(n));
  std::vector<int64_t> task0(static_cast<size_t>(n) + 1, 0);  // first pass-1 task of each layer
  std::vector<int64_t> part0(static_cast<size_t>(n) + 1, 0);  // first fp32 column partial of each layer
  int64_t total = 0;
  for (int64_t l = 0; l < n; ++l) {
    const OnlineLayer& L = layers[l];
    *L.step += 1.0f;
    consts[static_cast<size_t>(l)] = adamw_consts(h, static_cast<double>(*L.step));
    const Tiling t = tile(L.rows, L.cols);
    tiles[static_cast<size_t>(l)] = t;
    task0[static_cast<size_t>(l) + 1] = task0[static_cast<size_t>(l)] + t.row_blocks * t.col_blocks;
    part0[static_cast<size_t>(l) + 1] = part0[static_cast<size_t>(l)] + t.row_blocks * L.cols;
    total += L.rows * L.cols;
    coefs[l] = 0.0;
  }
  const int64_t ntasks = task0[static_cast<size_t>(n)];
  std::vector<int64_t> task_layer(static_cast<size_t>(ntasks));
  std::vector<int64_t> task_size(static_cast<size_t>(ntasks));  // a layer's elements / its task count
  for (int64_t l = 0; l < n; ++l) {
    const int64_t count = task0[static_cast<size_t>(l) + 1] - task0[static_cast<size_t>(l)];
    for (int64_t q = task0[static_cast<size_t>(l)]; q < task0[static_cast<size_t>(l) + 1]; ++q) {
      task_layer[static_cast<size_t>(q)] = l;
      task_size[static_cast<size_t>(q)] = layers[l].rows * layers[l].cols / count;
    }
  }
  std::vector<int64_t> order(static_cast<size_t>(ntasks));
  for (int64_t q = 0; q < ntasks; ++q) order[static_cast<size_t>(q)] = q;
  if (n > 1)
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
      return task_size[static_cast<size_t>(x)] > task_size[static_cast<size_t>(y)];
    });
  // Pass-2 items: (layer, row block) of ~kRowItem elements; skipped at run time when c' = 0.
  constexpr int64_t kRowItem = int64_t{1} << 16;
  const bool exact = mode == kProjectExact;
  std::vector<int64_t> item_layer, item_row;
  if (exact) {
    for (int64_t l = 0; l < n; ++l) {
      const int64_t r = layers[l].rows, c = layers[l].cols;
      const int64_t rows_per = std::max<int64_t>(1, kRowItem / std::max<int64_t>(1, c));
      for (int64_t i = 0; i < r; i += rows_per) {
        item_layer.push_back(l);
        item_row.push_back(i);
      }
    }
  }
  const int64_t nitems = static_cast<int64_t>(item_layer.size());
  // Each layer's mask widened to one 32-bit word per column (see online_seg).
  std::vector<int64_t> mask0(static_cast<size_t>(n) + 1, 0);  // first wide-mask word of each layer
  for (int64_t l = 0; l < n; ++l) mask0[static_cast<size_t>(l) + 1] = mask0[static_cast<size_t>(l)] + layers[l].cols;
  std::vector<uint32_t> wide_mask(static_cast<size_t>(mask0[static_cast<size_t>(n)]));
  for (int64_t l = 0; l < n; ++l)
    for (int64_t j = 0; j < layers[l].cols; ++j)
      wide_mask[static_cast<size_t>(mask0[static_cast<size_t>(l)] + j)] = layers[l].mask[j] != 0 ? 1u : 0u;
  std::vector<float> partial(static_cast<size_t>(part0[static_cast<size_t>(n)]), 0.0f);
  std::vector<double> dots(static_cast<size_t>(ntasks), 0.0), norms(static_cast<size_t>(ntasks), 0.0);
  const OnlineBlockFn<D> seg =
      pick_online<D>(has_scale, n > 0 && consts[0].lerp_weight < 0.5f, mode == kProjectLagged);
  const ProjectRowFn<D> project = use_avx2() ? &project_row_avx2<D> : &project_row_base<D>;
  std::vector<float> cfs(static_cast<size_t>(n), 0.0f);
  std::vector<unsigned char> project_layer(static_cast<size_t>(n), 0);

  // Tasks of each layer still running: the thread that finishes a layer's last pass-1 task sums
  // that layer (in task order, so the result does not depend on which thread it is), so that the
  // whole step has one fork, one barrier (only when projecting) and one join.
  std::unique_ptr<std::atomic<int64_t>[]> remaining(new std::atomic<int64_t>[static_cast<size_t>(n)]);
  for (int64_t l = 0; l < n; ++l)
    remaining[static_cast<size_t>(l)].store(task0[static_cast<size_t>(l) + 1] - task0[static_cast<size_t>(l)],
                                            std::memory_order_relaxed);
  auto finish_layer = [&](int64_t l) {
    const OnlineLayer& L = layers[l];
    const int64_t c = L.cols, row_blocks = tiles[static_cast<size_t>(l)].row_blocks;
    double dot = 0.0, norm = 0.0;
    for (int64_t q = task0[static_cast<size_t>(l)]; q < task0[static_cast<size_t>(l) + 1]; ++q) {
      dot += dots[static_cast<size_t>(q)];
      norm += norms[static_cast<size_t>(q)];
    }
    const float* part = partial.data() + part0[static_cast<size_t>(l)];
    for (int64_t j = 0; j < c; ++j) {
      double e = 0.0;
      for (int64_t a = 0; a < row_blocks; ++a) e += part[static_cast<size_t>(a * c + j)];
      L.col_energy[j] = static_cast<float>(static_cast<double>(L.col_energy[j]) + e);
    }
    if (mode == kProjectLagged && norm > 0.0) coefs[l] = dot / norm;  // c_next, for the next step
    if (exact && !(norm <= 0.0 || dot == 0.0)) {
      coefs[l] = dot / norm;
      cfs[static_cast<size_t>(l)] = static_cast<float>(coefs[l]);
      project_layer[static_cast<size_t>(l)] = 1;
    }
  };

#pragma omp parallel if (total >= kSmallWork && (ntasks > 1 || nitems > 1))
  {
    // Pass 1: AdamW (lagged: minus lag W_prev), retained columns reset to W_prev, column energies of
    // the unconstrained update, and <dW, W_prev>, ||W_prev (1 - M)||^2 over the non-retained columns
    // of the stored result.
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t q = 0; q < ntasks; ++q) {
      const int64_t task = order[static_cast<size_t>(q)];
      const int64_t l = task_layer[static_cast<size_t>(task)];
      const OnlineLayer& L = layers[l];
      const Tiling t = tiles[static_cast<size_t>(l)];
      const int64_t r = L.rows, c = L.cols, local = task - task0[static_cast<size_t>(l)];
      const int64_t a = local / t.col_blocks, b = local % t.col_blocks;
      int64_t r0, r1, c0, c1;
      split_range(r, t.row_blocks, a, &r0, &r1);
      split_range(c, t.col_blocks, b, &c0, &c1);
      const OnlineBlock<D> block{reinterpret_cast<Raw*>(L.param),
                                 reinterpret_cast<const Raw*>(L.grad),
                                 reinterpret_cast<const Raw*>(L.w_prev),
                                 L.exp_avg,
                                 L.exp_avg_sq,
                                 wide_mask.data() + mask0[static_cast<size_t>(l)],
                                 partial.data() + part0[static_cast<size_t>(l)] + a * c,
                                 c,
                                 r0,
                                 r1,
                                 c0,
                                 c1};
      double dot = 0.0, norm = 0.0;
      seg(block, consts[static_cast<size_t>(l)], scale, sign, static_cast<float>(L.lag), &dot, &norm);
      dots[static_cast<size_t>(task)] = dot;
      norms[static_cast<size_t>(task)] = norm;
      if (remaining[static_cast<size_t>(l)].fetch_sub(1, std::memory_order_acq_rel) == 1) finish_layer(l);
    }
    if (exact) {
#pragma omp barrier
    }
    // Pass 2: W <- W - c' W_prev on the non-retained columns, c' = <dW, W_prev> / ||W_prev (1 - M)||^2.
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < nitems; ++it) {
      const int64_t l = item_layer[static_cast<size_t>(it)];
      if (!project_layer[static_cast<size_t>(l)]) continue;
      const OnlineLayer& L = layers[l];
      const int64_t r = L.rows, c = L.cols;
      const int64_t rows_per = std::max<int64_t>(1, kRowItem / std::max<int64_t>(1, c));
      const int64_t i0 = item_row[static_cast<size_t>(it)], i1 = std::min(r, i0 + rows_per);
      Raw* Pm = reinterpret_cast<Raw*>(L.param);
      const Raw* W0 = reinterpret_cast<const Raw*>(L.w_prev);
      for (int64_t i = i0; i < i1; ++i) project(Pm + i * c, W0 + i * c, L.mask, c, cfs[static_cast<size_t>(l)]);
    }
  }
}

}  // namespace

void hpa_reduce(int dtype, int64_t r, int64_t c, Mat prev, Mat next, double* col_energy, double* dot,
                double* norm_sq) {
  switch (dtype) {
    case kF32:
      return reduce_typed<kF32>(r, c, prev, next, col_energy, dot, norm_sq);
    case kBF16:
      return reduce_typed<kBF16>(r, c, prev, next, col_energy, dot, norm_sq);
    case kF16:
      return reduce_typed<kF16>(r, c, prev, next, col_energy, dot, norm_sq);
    default:
      throw std::invalid_argument("hpa_reduce: unknown storage dtype code");
  }
}

void hpa_apply(int dtype, int64_t r, int64_t c, Mat prev, Mat next, Mat out, const uint8_t* mask, float coef) {
  switch (dtype) {
    case kF32:
      return apply_typed<kF32>(r, c, prev, next, out, mask, coef);
    case kBF16:
      return apply_typed<kBF16>(r, c, prev, next, out, mask, coef);
    case kF16:
      return apply_typed<kF16>(r, c, prev, next, out, mask, coef);
    default:
      throw std::invalid_argument("hpa_apply: unknown storage dtype code");
  }
}

// online_typed behind the mode check, the GradScaler skip and the dtype switch.
void online_step_multi(int dtype, int64_t n, const OnlineLayer* layers, const AdamWHyper& hyper,
                       const float* grad_scale, const float* found_inf, int projection, double* coefs) {
  if (projection < kProjectNone || projection > kProjectLagged)
    throw std::invalid_argument("online_step: unknown projection mode code");
  if (found_inf != nullptr && *found_inf != 0.0f) {  // GradScaler skip: nothing written, c_prev kept
    for (int64_t l = 0; l < n; ++l) coefs[l] = projection == kProjectLagged ? layers[l].lag : 0.0;
    return;
  }
  switch (dtype) {
    case kF32:
      return online_typed<kF32>(n, layers, hyper, grad_scale, projection, coefs);
    case kBF16:
      return online_typed<kBF16>(n, layers, hyper, grad_scale, projection, coefs);
    case kF16:
      return online_typed<kF16>(n, layers, hyper, grad_scale, projection, coefs);
    default:
      throw std::invalid_argument("online_step: unknown storage dtype code");
  }
}

}  // namespace cpu
}  // namespace hpa
