"""CUDA C++ backend (``"cuda"``): csrc/cuda through :mod:`hpa_kernels._C_cuda`; CUDA tensors.

Available when :mod:`hpa_kernels._C_cuda` loaded and sees a GPU
(:func:`hpa_kernels.ops._native.cuda_loaded`). The entry points take raw device addresses and,
last, the stream: every call runs on the tensors' device and its current stream, so nothing here
synchronises with the host (a CUDA-tensor ``coef`` is read on the device). The arguments passed
:mod:`hpa_kernels.ops.schema`; this module only stages layouts (:mod:`hpa_kernels.ops._native`)
and launches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _native
from .schema import AdamWHyper, Kernels, register


def _launch(fn: Callable, device: torch.device, *args):
    """``fn(*args, stream)`` on ``device`` and its current stream."""
    with torch.cuda.device(device):
        return fn(*args, torch.cuda.current_stream(device).cuda_stream)


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: AdamWHyper,
) -> None:
    """See ``hpa_kernels.ops.adamw_step`` (one launch per storage dtype)."""
    device = params[0].device
    staging, launches, scale_ptr, inf_ptr = _native.adamw_launches(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper.grad_scale, hyper.found_inf
    )
    scalars = _native.hyper(hyper)
    for code, ptrs, numels in launches:
        _launch(_native.CUDA_LIB.adamw, device, code, *ptrs, numels, *scalars, scale_ptr, inf_ptr)
    staging.finish()


def hpa_reduce(
    w_prev: Tensor, w_new: Tensor, hinv_safety: Tensor, hinv_task: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See ``hpa_kernels.ops.hpa_reduce`` (the sums stay on the device)."""
    r, c = w_new.shape
    device = w_new.device
    f32 = {"dtype": torch.float32, "device": device}
    eps_bar, zeta_bar, call = _native.reduce_outputs(w_prev, w_new, hinv_safety, hinv_task)
    if call is None:
        return eps_bar, zeta_bar, torch.zeros((), **f32), torch.zeros((), **f32)
    args, _keep = call
    dot, norm_sq = torch.empty((), **f32), torch.empty((), **f32)
    workspace = torch.empty(_native.CUDA_LIB.reduce_workspace_bytes(r, c) // 8, dtype=torch.float64, device=device)
    _launch(_native.CUDA_LIB.hpa_reduce, device, *args, dot.data_ptr(), norm_sq.data_ptr(), workspace.data_ptr())
    return eps_bar, zeta_bar, dot, norm_sq


def hpa_apply(w_prev: Tensor, w_new: Tensor, mask: Tensor, coef: float | Tensor, out: Tensor | None = None) -> Tensor:
    """See ``hpa_kernels.ops.hpa_apply``."""
    device = w_new.device
    out, call = _native.apply_args(w_prev, w_new, mask, out)
    if call is None:
        return out
    args, _keep = call
    coef_t, coef_ptr, coef_value = None, 0, 0.0
    if isinstance(coef, Tensor):
        coef_t = coef.detach().reshape(()).to(device=device, dtype=torch.float32)  # read on the device
        coef_ptr = coef_t.data_ptr()
    else:
        coef_value = float(coef)
    _launch(_native.CUDA_LIB.hpa_apply, device, *args, coef_value, coef_ptr)
    return out


def online_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    state_step: Tensor,
    w_prev: Tensor,
    mask: Tensor,
    col_energy: Tensor,
    hyper: AdamWHyper,
    orthogonal: bool,
) -> Tensor:
    """See ``hpa_kernels.ops.online_step`` (c' stays on the device)."""
    device = param.device
    if param.numel() == 0:
        return _native.online_empty(state_step, hyper.found_inf, device)
    r, c = param.shape
    f32 = {"dtype": torch.float32, "device": device}
    staging, args = _native.online_args(
        param, grad, exp_avg, exp_avg_sq, state_step, w_prev, mask, col_energy, hyper, orthogonal
    )
    coef = torch.empty((), **f32)
    workspace = torch.empty(_native.CUDA_LIB.online_workspace_bytes(r, c) // 4, **f32)
    _launch(_native.CUDA_LIB.online_step, device, *args, coef.data_ptr(), workspace.data_ptr())
    staging.finish()
    return coef


register(Kernels("cuda", adamw_step, hpa_reduce, hpa_apply, online_step))
