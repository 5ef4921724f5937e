// HPA kernels on the CPU: the consolidation reduce and write (HPA_SPEC.md Steps 1 and 3) and the
// online step. Reductions split the (r, c) matrix into row blocks x column blocks; each row block
// keeps its own fp32 column partials, summed in double in a fixed order, so a run is deterministic
// for a given thread count.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "hpa/cpu.h"

namespace hpa {
namespace cpu {
namespace {

constexpr int64_t kSmallWork = int64_t{1} << 15;  // below this many elements: one thread
constexpr int64_t kRowSpan = 2048;                // fp32 row partials span at most this many columns

// Row blocks x column blocks for a reduction over an (r, c) matrix on `threads` threads.
struct Tiling {
  int64_t row_blocks;
  int64_t col_blocks;
};

Tiling tile(int64_t r, int64_t c) {
  int64_t threads = (r * c < kSmallWork) ? 1 : num_threads();
  Tiling t;
  t.row_blocks = std::max<int64_t>(1, std::min<int64_t>(threads, r / 4));
  t.col_blocks = std::max<int64_t>(1, std::min<int64_t>((threads + t.row_blocks - 1) / t.row_blocks, c / 64));
  return t;
}

template <int D>
void reduce_typed(int64_t r, int64_t c, Mat prev, Mat next, const float* hs, const float* ht, float* eps_bar,
                  float* zeta_bar, double* dot_out, double* norm_out) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
  const Raw* P = reinterpret_cast<const Raw*>(prev.ptr);
  const Raw* N = reinterpret_cast<const Raw*>(next.ptr);
  const Tiling t = tile(r, c);
  const int64_t tasks = t.row_blocks * t.col_blocks;
  std::vector<float> partial(static_cast<size_t>(t.row_blocks * c), 0.0f);
  std::vector<double> dots(static_cast<size_t>(tasks), 0.0), norms(static_cast<size_t>(tasks), 0.0);
  const bool unit = prev.stride1 == 1 && next.stride1 == 1;
#pragma omp parallel for schedule(static) if (tasks > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t a = task / t.col_blocks, b = task % t.col_blocks;
    int64_t r0, r1, c0, c1;
    split_range(r, t.row_blocks, a, &r0, &r1);
    split_range(c, t.col_blocks, b, &c0, &c1);
    float* __restrict acc = partial.data() + a * c;
    double dot = 0.0, norm = 0.0;
    for (int64_t i = r0; i < r1; ++i) {
      const Raw* __restrict pr = P + i * prev.stride0;
      const Raw* __restrict nr = N + i * next.stride0;
      for (int64_t j0 = c0; j0 < c1; j0 += kRowSpan) {
        const int64_t j1 = std::min(c1, j0 + kRowSpan);
        float rdot = 0.0f, rnorm = 0.0f;
        if (unit) {
#pragma omp simd reduction(+ : rdot, rnorm)
          for (int64_t j = j0; j < j1; ++j) {
            const float w = S::load(pr[j]);
            const float d = S::load(nr[j]) - w;
            acc[j] += d * d;
            rdot += d * w;
            rnorm += w * w;
          }
        } else {
          for (int64_t j = j0; j < j1; ++j) {
            const float w = S::load(pr[j * prev.stride1]);
            const float d = S::load(nr[j * next.stride1]) - w;
            acc[j] += d * d;
            rdot += d * w;
            rnorm += w * w;
          }
        }
        dot += rdot;
        norm += rnorm;
      }
    }
    dots[static_cast<size_t>(task)] = dot;
    norms[static_cast<size_t>(task)] = norm;
  }
  double dot = 0.0, norm = 0.0;
  for (int64_t q = 0; q < tasks; ++q) {
    dot += dots[static_cast<size_t>(q)];
    norm += norms[static_cast<size_t>(q)];
  }
  *dot_out = dot;
  *norm_out = norm;
#pragma omp parallel for schedule(static) if (c * t.row_blocks > kSmallWork)
  for (int64_t j = 0; j < c; ++j) {
    double e = 0.0;
    for (int64_t a = 0; a < t.row_blocks; ++a) e += partial[static_cast<size_t>(a * c + j)];
    e = r > 0 ? e / static_cast<double>(r) : 0.0;
    eps_bar[j] = static_cast<float>(e / hs[j]);
    zeta_bar[j] = static_cast<float>(e / ht[j]);
  }
}

template <int D>
void apply_typed(int64_t r, int64_t c, Mat prev, Mat next, Mat out, const uint8_t* mask, float coef) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
  const Raw* P = reinterpret_cast<const Raw*>(prev.ptr);
  const Raw* N = reinterpret_cast<const Raw*>(next.ptr);
  Raw* O = reinterpret_cast<Raw*>(out.ptr);
  const bool unit = prev.stride1 == 1 && next.stride1 == 1 && out.stride1 == 1;
#pragma omp parallel for schedule(static) if (r * c > kSmallWork)
  for (int64_t i = 0; i < r; ++i) {
    const Raw* pr = P + i * prev.stride0;
    const Raw* nr = N + i * next.stride0;
    Raw* orow = O + i * out.stride0;
    if (unit) {
      // No __restrict: out may be next itself (in place), element by element.
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const Raw keep = pr[j];
        const Raw moved = S::store(S::load(nr[j]) - coef * S::load(keep));
        orow[j] = mask[j] ? keep : moved;  // retained columns: W_prev's raw bits
      }
    } else {
      for (int64_t j = 0; j < c; ++j) {
        const Raw keep = pr[j * prev.stride1];
        const Raw moved = S::store(S::load(nr[j * next.stride1]) - coef * S::load(keep));
        orow[j * out.stride1] = mask[j] ? keep : moved;
      }
    }
  }
}

template <int D>
double online_typed(int64_t r, int64_t c, uintptr_t param, uintptr_t grad, float* exp_avg, float* exp_avg_sq,
                    float* step, uintptr_t w_prev, const uint8_t* mask, float* col_energy, const AdamWHyper& h,
                    const float* grad_scale, bool orthogonal) {
  using S = Storage<D>;
  using Raw = typename S::Raw;
  Raw* Pm = reinterpret_cast<Raw*>(param);
  const Raw* G = reinterpret_cast<const Raw*>(grad);
  const Raw* W0 = reinterpret_cast<const Raw*>(w_prev);
  *step += 1.0f;
  const AdamWStepConsts k = adamw_consts(h, static_cast<double>(*step));
  const bool has_scale = grad_scale != nullptr;
  const float scale = has_scale ? *grad_scale : 1.0f;
  const float sign = h.maximize ? -1.0f : 1.0f;

  // Pass 1: AdamW, retained columns reset to W_prev, column energies of the unconstrained update,
  // and <dW, W_prev>, ||W_prev (1 - M)||^2 over the non-retained columns of the stored result.
  const Tiling t = tile(r, c);
  const int64_t tasks = t.row_blocks * t.col_blocks;
  std::vector<float> partial(static_cast<size_t>(t.row_blocks * c), 0.0f);
  std::vector<double> dots(static_cast<size_t>(tasks), 0.0), norms(static_cast<size_t>(tasks), 0.0);
#pragma omp parallel for schedule(static) if (tasks > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t a = task / t.col_blocks, b = task % t.col_blocks;
    int64_t r0, r1, c0, c1;
    split_range(r, t.row_blocks, a, &r0, &r1);
    split_range(c, t.col_blocks, b, &c0, &c1);
    float* __restrict acc = partial.data() + a * c;
    double dot = 0.0, norm = 0.0;
    for (int64_t i = r0; i < r1; ++i) {
      Raw* __restrict pr = Pm + i * c;
      const Raw* __restrict gr = G + i * c;
      const Raw* __restrict wr = W0 + i * c;
      float* __restrict mr = exp_avg + i * c;
      float* __restrict vr = exp_avg_sq + i * c;
      for (int64_t j0 = c0; j0 < c1; j0 += kRowSpan) {
        const int64_t j1 = std::min(c1, j0 + kRowSpan);
        float rdot = 0.0f, rnorm = 0.0f;
#pragma omp simd reduction(+ : rdot, rnorm)
        for (int64_t j = j0; j < j1; ++j) {
          float g = S::load(gr[j]);
          if (has_scale) g = g / scale;
          g = sign * g;
          float m = mr[j], v = vr[j];
          const float before = S::load(pr[j]);
          const float after = adamw_element(before, g, m, v, k);
          mr[j] = m;
          vr[j] = v;
          const float u = after - before;
          acc[j] += u * u;
          const Raw keep = wr[j];
          const float w = S::load(keep);
          const Raw moved = S::store(after);
          const bool retained = mask[j] != 0;
          pr[j] = retained ? keep : moved;
          const float d = retained ? 0.0f : S::load(moved) - w;
          rdot += d * w;
          rnorm += retained ? 0.0f : w * w;
        }
        dot += rdot;
        norm += rnorm;
      }
    }
    dots[static_cast<size_t>(task)] = dot;
    norms[static_cast<size_t>(task)] = norm;
  }
  double dot = 0.0, norm = 0.0;
  for (int64_t q = 0; q < tasks; ++q) {
    dot += dots[static_cast<size_t>(q)];
    norm += norms[static_cast<size_t>(q)];
  }
#pragma omp parallel for schedule(static) if (c * t.row_blocks > kSmallWork)
  for (int64_t j = 0; j < c; ++j) {
    double e = 0.0;
    for (int64_t a = 0; a < t.row_blocks; ++a) e += partial[static_cast<size_t>(a * c + j)];
    col_energy[j] = static_cast<float>(static_cast<double>(col_energy[j]) + e);
  }
  if (!orthogonal || norm <= 0.0 || dot == 0.0) return 0.0;

  // Pass 2: W <- W - c' W_prev on the non-retained columns, c' = <dW, W_prev> / ||W_prev (1 - M)||^2.
  const double coef = dot / norm;
  const float cf = static_cast<float>(coef);
#pragma omp parallel for schedule(static) if (r * c > kSmallWork)
  for (int64_t i = 0; i < r; ++i) {
    Raw* __restrict pr = Pm + i * c;
    const Raw* __restrict wr = W0 + i * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const Raw cur = pr[j];
      const Raw moved = S::store(S::load(cur) - cf * S::load(wr[j]));
      pr[j] = mask[j] ? cur : moved;
    }
  }
  return coef;
}

}  // namespace

void hpa_reduce(int dtype, int64_t r, int64_t c, Mat prev, Mat next, const float* hinv_safety,
                const float* hinv_task, float* eps_bar, float* zeta_bar, double* dot, double* norm_sq) {
  switch (dtype) {
    case kF32:
      return reduce_typed<kF32>(r, c, prev, next, hinv_safety, hinv_task, eps_bar, zeta_bar, dot, norm_sq);
    case kBF16:
      return reduce_typed<kBF16>(r, c, prev, next, hinv_safety, hinv_task, eps_bar, zeta_bar, dot, norm_sq);
    case kF16:
      return reduce_typed<kF16>(r, c, prev, next, hinv_safety, hinv_task, eps_bar, zeta_bar, dot, norm_sq);
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

double online_step(int dtype, int64_t r, int64_t c, uintptr_t param, uintptr_t grad, float* exp_avg,
                   float* exp_avg_sq, float* step, uintptr_t w_prev, const uint8_t* mask, float* col_energy,
                   const AdamWHyper& hyper, const float* grad_scale, const float* found_inf, bool orthogonal) {
  if (found_inf != nullptr && *found_inf != 0.0f) return 0.0;  // GradScaler skip: nothing written
  switch (dtype) {
    case kF32:
      return online_typed<kF32>(r, c, param, grad, exp_avg, exp_avg_sq, step, w_prev, mask, col_energy, hyper,
                                grad_scale, orthogonal);
    case kBF16:
      return online_typed<kBF16>(r, c, param, grad, exp_avg, exp_avg_sq, step, w_prev, mask, col_energy, hyper,
                                 grad_scale, orthogonal);
    case kF16:
      return online_typed<kF16>(r, c, param, grad, exp_avg, exp_avg_sq, step, w_prev, mask, col_energy, hyper,
                                grad_scale, orthogonal);
    default:
      throw std::invalid_argument("online_step: unknown storage dtype code");
  }
}

}  // namespace cpu
}  // namespace hpa
