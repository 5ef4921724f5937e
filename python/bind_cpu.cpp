// pybind11 bindings of the CPU kernels as hpa_kernels._C. Tensors arrive as raw addresses
// (tensor.data_ptr()) with sizes and strides; hpa_kernels/ops/schema.py checks dtypes, shapes and
// devices before calling, and these functions only check what a wrong call would corrupt memory with.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "hpa/cpu.h"

namespace py = pybind11;
using hpa::Mat;

namespace {

template <typename T>
const T* ptr_or_null(uintptr_t address) {
  return address == 0 ? nullptr : reinterpret_cast<const T*>(address);
}

void adamw(int dtype, const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
           const std::vector<uintptr_t>& exp_avgs, const std::vector<uintptr_t>& exp_avg_sqs,
           const std::vector<uintptr_t>& steps, const std::vector<int64_t>& numels, double lr, double beta1,
           double beta2, double eps, double weight_decay, bool maximize, uintptr_t grad_scale, uintptr_t found_inf) {
  const size_t n = params.size();
  if (grads.size() != n || exp_avgs.size() != n || exp_avg_sqs.size() != n || steps.size() != n ||
      numels.size() != n) {
    throw std::invalid_argument("adamw: tensor lists differ in length");
  }
  const hpa::AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay, maximize};
  py::gil_scoped_release release;
  hpa::cpu::adamw(dtype, static_cast<int64_t>(n), params.data(), grads.data(), exp_avgs.data(), exp_avg_sqs.data(),
                  steps.data(), numels.data(), hyper, ptr_or_null<float>(grad_scale), ptr_or_null<float>(found_inf));
}

py::tuple hpa_reduce(int dtype, int64_t r, int64_t c, uintptr_t prev, int64_t ps0, int64_t ps1, uintptr_t next,
                     int64_t ns0, int64_t ns1, uintptr_t col_energy) {
  double dot = 0.0, norm_sq = 0.0;
  {
    py::gil_scoped_release release;
    hpa::cpu::hpa_reduce(dtype, r, c, Mat{prev, ps0, ps1}, Mat{next, ns0, ns1}, reinterpret_cast<double*>(col_energy),
                         &dot, &norm_sq);
  }
  return py::make_tuple(dot, norm_sq);
}

void hpa_apply(int dtype, int64_t r, int64_t c, uintptr_t prev, int64_t ps0, int64_t ps1, uintptr_t next, int64_t ns0,
               int64_t ns1, uintptr_t out, int64_t os0, int64_t os1, uintptr_t mask, double coef) {
  py::gil_scoped_release release;
  hpa::cpu::hpa_apply(dtype, r, c, Mat{prev, ps0, ps1}, Mat{next, ns0, ns1}, Mat{out, os0, os1},
                      reinterpret_cast<const uint8_t*>(mask), static_cast<float>(coef));
}

// Columns of online_steps' table, one int64 row per layer (hpa_kernels/ops/_native.py ONLINE_COLUMNS).
enum OnlineColumn : int64_t {
  kRows, kCols, kParam, kGrad, kExpAvg, kExpAvgSq, kStep, kWPrev, kMask, kColEnergy, kCoefCell, kOutIndex,
  kOnlineColumns
};

// One online step of n layers of one storage dtype (hpa::cpu::online_step_multi) from a table of
// n x kOnlineColumns int64: each layer's sizes and tensor addresses, the address of its fp32
// coefficient cell (0: none) and its index in coefs_out (fp32). The lagged projection reads c_prev
// from the cell and writes c_next back into it; every layer's coefficient (c', c_next or 0),
// rounded to fp32, goes to coefs_out[index].
void online_steps(int dtype, int64_t n, uintptr_t table, double lr, double beta1, double beta2, double eps,
                  double weight_decay, bool maximize, uintptr_t grad_scale, uintptr_t found_inf, int projection,
                  uintptr_t coefs_out) {
  if (n < 0 || (n > 0 && (table == 0 || coefs_out == 0)))
    throw std::invalid_argument("online_steps: no table or output for the layers");
  const int64_t* rows = reinterpret_cast<const int64_t*>(table);
  const bool lagged = projection == hpa::kProjectLagged;
  std::vector<hpa::cpu::OnlineLayer> layers(static_cast<size_t>(n));
  for (int64_t l = 0; l < n; ++l) {
    const int64_t* row = rows + l * kOnlineColumns;
    float* cell = reinterpret_cast<float*>(row[kCoefCell]);
    layers[static_cast<size_t>(l)] = hpa::cpu::OnlineLayer{row[kRows],
                                                           row[kCols],
                                                           static_cast<uintptr_t>(row[kParam]),
                                                           static_cast<uintptr_t>(row[kGrad]),
                                                           reinterpret_cast<float*>(row[kExpAvg]),
                                                           reinterpret_cast<float*>(row[kExpAvgSq]),
                                                           reinterpret_cast<float*>(row[kStep]),
                                                           static_cast<uintptr_t>(row[kWPrev]),
                                                           reinterpret_cast<const uint8_t*>(row[kMask]),
                                                           reinterpret_cast<float*>(row[kColEnergy]),
                                                           lagged && cell != nullptr ? *cell : 0.0};
  }
  const hpa::AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay, maximize};
  std::vector<double> coefs(static_cast<size_t>(n), 0.0);
  py::gil_scoped_release release;
  hpa::cpu::online_step_multi(dtype, n, layers.data(), hyper, ptr_or_null<float>(grad_scale),
                              ptr_or_null<float>(found_inf), projection, coefs.data());
  float* out = reinterpret_cast<float*>(coefs_out);
  for (int64_t l = 0; l < n; ++l) {
    const int64_t* row = rows + l * kOnlineColumns;
    const float coef = static_cast<float>(coefs[static_cast<size_t>(l)]);
    out[row[kOutIndex]] = coef;
    if (lagged && row[kCoefCell] != 0) *reinterpret_cast<float*>(row[kCoefCell]) = coef;
  }
}

py::tuple split_range(int64_t n, int64_t parts, int64_t k) {
  int64_t begin = 0, end = 0;
  hpa::split_range(n, parts, k, &begin, &end);
  return py::make_tuple(begin, end);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hpa-kernels CPU kernels (csrc/cpu), called by hpa_kernels.ops.cpu with raw pointers";
  m.def("adamw", &adamw, "Multi-tensor AdamW over dense tensors of one storage dtype");
  m.def("hpa_reduce", &hpa_reduce, "HPA column energies (into col_energy) and Frobenius sums; returns (dot, norm_sq)");
  m.def("hpa_apply", &hpa_apply, "HPA masked, projected write");
  m.def("online_steps", &online_steps, "Online HPA step of the layers of one table (one storage dtype); coefficients into coefs_out");
  m.def("offset2d", &hpa::offset2d, "64-bit element offset i*stride0 + j*stride1 (index helper, for tests)");
  m.def("split_range", &split_range, "[begin, end) of part k of n items in `parts` parts (for tests)");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
