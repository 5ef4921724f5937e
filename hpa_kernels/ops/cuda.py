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

from . import _native, schema
from .schema import AdamWHyper, AdamWTensors, Kernels, OnlineProjection, OnlineTensors, register


def _launch(fn: Callable, device: torch.device, *args):
    """``fn(*args, stream)`` on ``device`` and its current stream."""
    with torch.cuda.device(device):
        return fn(*args, torch.cuda.current_stream(device).cuda_stream)


def adamw_step(tensors: AdamWTensors, hyper: AdamWHyper) -> None:
    """See ``hpa_kernels.ops.adamw_step`` (one launch per storage dtype)."""
    device = tensors.params[0].device
    staging, launches, scale_ptr, inf_ptr = _native.adamw_launches(tensors, hyper)
    scalars = _native.hyper(hyper)
    for code, ptrs, numels in launches:
        _launch(_native.CUDA_LIB.adamw, device, code, *ptrs, numels, *scalars, scale_ptr, inf_ptr)
    staging.finish()


def hpa_reduce(w_prev: Tensor, w_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """See ``hpa_kernels.ops.hpa_reduce`` (the sums stay on the device)."""
    r, c = w_new.shape
    device = w_new.device
    f32 = {"dtype": torch.float32, "device": device}
    col_energy, call = _native.reduce_outputs(w_prev, w_new)
    if call is None:
        return col_energy, torch.zeros((), **f32), torch.zeros((), **f32)
    args, _keep = call
    dot, norm_sq = torch.empty((), **f32), torch.empty((), **f32)
    workspace = torch.empty(_native.CUDA_LIB.reduce_workspace_bytes(r, c) // 8, dtype=torch.float64, device=device)
    _launch(_native.CUDA_LIB.hpa_reduce, device, *args, dot.data_ptr(), norm_sq.data_ptr(), workspace.data_ptr())
    return col_energy, dot, norm_sq


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


def online_step(tensors: OnlineTensors, hyper: AdamWHyper, projection: OnlineProjection) -> Tensor:
    """See ``hpa_kernels.ops.online_step`` (c_prev is read and the coefficient stays on the device)."""
    device = tensors.param.device
    if tensors.param.numel() == 0:
        return schema.empty_online_step(tensors.state_step, hyper, projection, device)
    r, c = tensors.param.shape
    f32 = {"dtype": torch.float32, "device": device}
    staging, args = _native.online_args(tensors, hyper, projection)
    lag_ptr = staging.scalar_ptr(torch.as_tensor(projection.coef), device) if projection.lagged else 0
    coef = torch.empty((), **f32)
    workspace = torch.empty(_native.CUDA_LIB.online_workspace_bytes(r, c) // 4, **f32)
    _launch(_native.CUDA_LIB.online_step, device, *args, lag_ptr, coef.data_ptr(), workspace.data_ptr())
    staging.finish()
    return coef


register(Kernels("cuda", adamw_step, hpa_reduce, hpa_apply, online_step, schema.online_steps_by_layer(online_step)))
