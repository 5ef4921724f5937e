"""C++ backend (``"cpu"``): csrc/cpu (OpenMP) through :mod:`hpa_kernels._C`; CPU tensors.

Available when :mod:`hpa_kernels._C` loaded (:func:`hpa_kernels.ops._native.cpu_loaded`). The
arguments passed :mod:`hpa_kernels.ops.schema`; this module only stages layouts
(:mod:`hpa_kernels.ops._native`) and calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native
from .schema import AdamWHyper, AdamWTensors, Kernels, OnlineProjection, OnlineTensors, register


def adamw_step(tensors: AdamWTensors, hyper: AdamWHyper) -> None:
    """See ``hpa_kernels.ops.adamw_step`` (one call per storage dtype)."""
    staging, launches, scale_ptr, inf_ptr = _native.adamw_launches(tensors, hyper)
    scalars = _native.hyper(hyper)
    for code, ptrs, numels in launches:
        _native.CPU_LIB.adamw(code, *ptrs, numels, *scalars, scale_ptr, inf_ptr)
    staging.finish()


def hpa_reduce(w_prev: Tensor, w_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """See ``hpa_kernels.ops.hpa_reduce`` (dot and norm_sq come back as doubles, rounded here once)."""
    f32 = {"dtype": torch.float32, "device": w_new.device}
    col_energy, call = _native.reduce_outputs(w_prev, w_new)
    if call is None:
        return col_energy, torch.zeros((), **f32), torch.zeros((), **f32)
    args, _keep = call
    dot, norm_sq = _native.CPU_LIB.hpa_reduce(*args)
    return col_energy, torch.tensor(dot, **f32), torch.tensor(norm_sq, **f32)


def hpa_apply(w_prev: Tensor, w_new: Tensor, mask: Tensor, coef: float | Tensor, out: Tensor | None = None) -> Tensor:
    """See ``hpa_kernels.ops.hpa_apply``."""
    out, call = _native.apply_args(w_prev, w_new, mask, out)
    if call is not None:
        args, _keep = call
        _native.CPU_LIB.hpa_apply(*args, float(coef))
    return out


def online_step(tensors: OnlineTensors, hyper: AdamWHyper, projection: OnlineProjection) -> Tensor:
    """See ``hpa_kernels.ops.online_step`` (every pass in one call)."""
    param = tensors.param
    if param.numel() == 0:
        return _native.online_empty(tensors.state_step, hyper.found_inf, param.device)
    staging, args = _native.online_args(tensors, hyper, projection)
    lag = float(projection.coef) if projection.lagged else 0.0
    coef = torch.tensor(_native.CPU_LIB.online_step(*args, lag), dtype=torch.float32, device=param.device)
    staging.finish()
    return coef


register(Kernels("cpu", adamw_step, hpa_reduce, hpa_apply, online_step))
