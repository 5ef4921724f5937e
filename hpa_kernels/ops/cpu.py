"""C++ backend (``"cpu"``): csrc/cpu (OpenMP) through :mod:`hpa_kernels._C`; CPU tensors.

Available when :mod:`hpa_kernels._C` loaded (:func:`hpa_kernels.ops._native.cpu_loaded`). The
arguments passed :mod:`hpa_kernels.ops.schema`; this module only stages layouts
(:mod:`hpa_kernels.ops._native`) and calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native
from .schema import AdamWHyper, Kernels, register


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: AdamWHyper,
) -> None:
    """See ``hpa_kernels.ops.adamw_step`` (one call per storage dtype)."""
    staging, launches, scale_ptr, inf_ptr = _native.adamw_launches(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper.grad_scale, hyper.found_inf
    )
    scalars = _native.hyper(hyper)
    for code, ptrs, numels in launches:
        _native.CPU_LIB.adamw(code, *ptrs, numels, *scalars, scale_ptr, inf_ptr)
    staging.finish()


def hpa_reduce(
    w_prev: Tensor, w_new: Tensor, hinv_safety: Tensor, hinv_task: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See ``hpa_kernels.ops.hpa_reduce``."""
    f32 = {"dtype": torch.float32, "device": w_new.device}
    eps_bar, zeta_bar, call = _native.reduce_outputs(w_prev, w_new, hinv_safety, hinv_task)
    if call is None:
        return eps_bar, zeta_bar, torch.zeros((), **f32), torch.zeros((), **f32)
    args, _keep = call
    dot, norm_sq = _native.CPU_LIB.hpa_reduce(*args)
    return eps_bar, zeta_bar, torch.tensor(dot, **f32), torch.tensor(norm_sq, **f32)


def hpa_apply(w_prev: Tensor, w_new: Tensor, mask: Tensor, coef: float | Tensor, out: Tensor | None = None) -> Tensor:
    """See ``hpa_kernels.ops.hpa_apply``."""
    out, call = _native.apply_args(w_prev, w_new, mask, out)
    if call is not None:
        args, _keep = call
        _native.CPU_LIB.hpa_apply(*args, float(coef))
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
    """See ``hpa_kernels.ops.online_step`` (both passes in one call)."""
    if param.numel() == 0:
        return _native.online_empty(state_step, hyper.found_inf, param.device)
    staging, args = _native.online_args(
        param, grad, exp_avg, exp_avg_sq, state_step, w_prev, mask, col_energy, hyper, orthogonal
    )
    coef = torch.tensor(_native.CPU_LIB.online_step(*args), dtype=torch.float32, device=param.device)
    staging.finish()
    return coef


register(Kernels("cpu", adamw_step, hpa_reduce, hpa_apply, online_step))
