// pybind11 bindings of the CUDA kernels as hpa_kernels._C_cuda. Compiled by the host compiler and
// linked with the nvcc-built objects and a static cudart, so the module imports on a machine with no
// GPU (device_count() is then 0). Launches go on the stream handle the caller passes
// (torch.cuda.current_stream().cuda_stream); nothing here synchronises with the host.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "hpa/cuda.h"

namespace py = pybind11;
using hpa::Mat;

namespace {

void check(const char* err) {
  if (err != nullptr) throw std::runtime_error(std::string("hpa_kernels CUDA launch failed: ") + err);
}

void adamw(int dtype, const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
           const std::vector<uintptr_t>& exp_avgs, const std::vector<uintptr_t>& exp_avg_sqs,
           const std::vector<uintptr_t>& steps, const std::vector<int64_t>& numels, double lr, double beta1,
           double beta2, double eps, double weight_decay, bool maximize, uintptr_t grad_scale, uintptr_t found_inf,
           uintptr_t stream) {
  const size_t n = params.size();
  if (grads.size() != n || exp_avgs.size() != n || exp_avg_sqs.size() != n || steps.size() != n ||
      numels.size() != n) {
    throw std::invalid_argument("adamw: tensor lists differ in length");
  }
  const hpa::AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay, maximize};
  check(hpa::cuda::adamw(dtype, static_cast<int64_t>(n), params.data(), grads.data(), exp_avgs.data(),
                         exp_avg_sqs.data(), steps.data(), numels.data(), hyper, grad_scale, found_inf, stream));
}

void hpa_reduce(int dtype, int64_t r, int64_t c, uintptr_t prev, int64_t ps0, int64_t ps1, uintptr_t next,
                int64_t ns0, int64_t ns1, uintptr_t col_energy, uintptr_t dot, uintptr_t norm_sq, uintptr_t workspace,
                uintptr_t stream) {
  check(hpa::cuda::hpa_reduce(dtype, r, c, Mat{prev, ps0, ps1}, Mat{next, ns0, ns1}, col_energy, dot, norm_sq,
                              workspace, stream));
}

void hpa_apply(int dtype, int64_t r, int64_t c, uintptr_t prev, int64_t ps0, int64_t ps1, uintptr_t next, int64_t ns0,
               int64_t ns1, uintptr_t out, int64_t os0, int64_t os1, uintptr_t mask, double coef, uintptr_t coef_ptr,
               uintptr_t stream) {
  check(hpa::cuda::hpa_apply(dtype, r, c, Mat{prev, ps0, ps1}, Mat{next, ns0, ns1}, Mat{out, os0, os1}, mask,
                             static_cast<float>(coef), coef_ptr, stream));
}

void online_step(int dtype, int64_t r, int64_t c, uintptr_t param, uintptr_t grad, uintptr_t exp_avg,
                 uintptr_t exp_avg_sq, uintptr_t step, uintptr_t w_prev, uintptr_t mask, uintptr_t col_energy, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bool maximize, uintptr_t grad_scale,
                 uintptr_t found_inf, int projection, uintptr_t lag_coef, uintptr_t coef_out, uintptr_t workspace,
                 uintptr_t stream) {
  const hpa::AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay, maximize};
  check(hpa::cuda::online_step(dtype, r, c, param, grad, exp_avg, exp_avg_sq, step, w_prev, mask, col_energy, hyper,
                               grad_scale, found_inf, projection, lag_coef, coef_out, workspace, stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "hpa-kernels CUDA kernels (csrc/cuda), called by hpa_kernels.ops.cuda with raw device pointers";
  m.def("device_count", &hpa::cuda::device_count, "CUDA devices visible to the static cudart (0 without a GPU)");
  m.def("adamw", &adamw, "Multi-tensor AdamW over dense device tensors of one storage dtype");
  m.def("reduce_workspace_bytes", &hpa::cuda::reduce_workspace_bytes, "Workspace bytes of hpa_reduce");
  m.def("online_workspace_bytes", &hpa::cuda::online_workspace_bytes, "Workspace bytes of online_step");
  m.def("hpa_reduce", &hpa_reduce, "HPA column energies and Frobenius sums into device tensors");
  m.def("hpa_apply", &hpa_apply, "HPA masked, projected write");
  m.def("online_step", &online_step, "Online HPA step; the coefficient goes to a device scalar");
}
