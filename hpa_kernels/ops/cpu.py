"""C++ backend (``"cpu"``): csrc/cpu (OpenMP) through :mod:`hpa_kernels._C`; CPU tensors.

Available when :mod:`hpa_kernels._C` loaded (:func:`hpa_kernels.ops._native.cpu_loaded`). The
arguments passed :mod:`hpa_kernels.ops.schema`; this module only stages layouts
(:mod:`hpa_kernels.ops._native`) and calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native
from ._staging import Staging
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
    """See ``hpa_kernels.ops.online_step`` (every pass in one call: :func:`online_steps` of one layer)."""
    return online_steps([tensors], hyper, [projection])[0]


def online_steps(layers: list[OnlineTensors], hyper: AdamWHyper, projections: list[OnlineProjection]) -> Tensor:
    """See ``hpa_kernels.ops.online_steps``: one native call per (storage dtype, projection mode)
    of the layers, every pass of all its layers in one OpenMP region; each layer's results are
    bit-identical to a call with it alone (csrc/cpu/hpa.cpp ``online_step_multi``)."""
    device = layers[0].param.device
    coefs = [0.0] * len(layers)  # r or c = 0: c' = 0
    staging = Staging()
    calls: dict[tuple[int, int], tuple[list[int], list[tuple]]] = {}  # (dtype, mode) -> (layer indices, rows)
    for k, (t, projection) in enumerate(zip(layers, projections)):
        r, c = t.param.shape
        if r == 0 or c == 0:
            _native.online_empty(t.state_step, hyper.found_inf, device)
            continue
        indices, rows = calls.setdefault((_native.DTYPE_CODES[t.param.dtype], _native.mode_code(projection)), ([], []))
        indices.append(k)
        lag = float(projection.coef) if projection.lagged else 0.0
        rows.append((r, c, *_native.online_addresses(staging, t), lag))
    scalars = (staging.scalar_ptr(hyper.grad_scale, device), staging.scalar_ptr(hyper.found_inf, device))
    for (code, mode), (indices, rows) in calls.items():
        # one list per argument of the binding: rows, cols, the 8 tensors' addresses, lags
        out = _native.CPU_LIB.online_steps(code, *zip(*rows), *_native.hyper(hyper), *scalars, mode)
        for k, value in zip(indices, out):
            coefs[k] = value
    staging.finish()
    return torch.tensor(coefs, dtype=torch.float32, device=device)


register(Kernels("cpu", adamw_step, hpa_reduce, hpa_apply, online_step, online_steps))
