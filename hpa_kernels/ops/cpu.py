"""C++ backend (``"cpu"``): csrc/cpu (OpenMP) through :mod:`hpa_kernels._C`; CPU tensors.

Available when :mod:`hpa_kernels._C` loaded (:func:`hpa_kernels.ops._native.cpu_loaded`). The
arguments passed :mod:`hpa_kernels.ops.schema`; this module only stages layouts
(:mod:`hpa_kernels.ops._native`) and calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _native
from ._staging import Staging
from .schema import AdamWHyper, AdamWTensors, Kernels, OnlineProjection, OnlineTensors, empty_online_step, register


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
    bit-identical to a call with it alone (csrc/cpu/hpa.cpp ``online_step_multi``). The lagged
    c_prev are copied to cells of this call's own (the kernel writes c_next there), so the
    callers' coefficients are not written."""
    device = layers[0].param.device
    staging = Staging()
    lags = torch.tensor([float(p.coef) if p.lagged else 0.0 for p in projections], dtype=torch.float32)
    cells = lags.data_ptr()
    calls: dict[tuple[int, int], list[list[int]]] = {}  # (dtype, mode) -> table rows
    coefs_empty: dict[int, Tensor] = {}
    for k, (t, projection) in enumerate(zip(layers, projections)):
        r, c = t.param.shape
        if r == 0 or c == 0:
            coefs_empty[k] = empty_online_step(t.state_step, hyper, projection, device)
            continue
        cell = cells + 4 * k if projection.lagged else 0
        row = [r, c, *_native.online_addresses(staging, t), cell, k]
        calls.setdefault((_native.DTYPE_CODES[t.param.dtype], _native.mode_code(projection)), []).append(row)
    coefs = torch.zeros(len(layers), dtype=torch.float32, device=device)
    for k, coef in coefs_empty.items():
        coefs[k] = coef
    tables = [(code, mode, torch.tensor(rows, dtype=torch.int64)) for (code, mode), rows in calls.items()]
    _run_tables(tables, hyper, coefs, staging)
    staging.finish()
    return coefs


def _run_tables(tables: list[tuple[int, int, Tensor]], hyper: AdamWHyper, coefs: Tensor, staging: Staging) -> None:
    """One native ``online_steps`` call per ``(dtype code, mode code, int64 table)``, the layers'
    coefficients into ``coefs`` (fp32, indexed by the tables' out-index column)."""
    device = coefs.device
    scalars = (staging.scalar_ptr(hyper.grad_scale, device), staging.scalar_ptr(hyper.found_inf, device))
    for code, mode, table in tables:
        _native.CPU_LIB.online_steps(
            code, table.shape[0], table.data_ptr(), *_native.hyper(hyper), *scalars, mode, coefs.data_ptr()
        )


def plan_online_steps(
    layers: list[OnlineTensors], projections: list[OnlineProjection]
) -> Callable[[list[Tensor], AdamWHyper], Tensor] | None:
    """See ``hpa_kernels.ops.OnlineStepsPlan``: the tables of :func:`online_steps` built once, the
    lagged layers' cells their own coefficient tensors (c_prev read, c_next written in place);
    each step writes only the gradients' addresses into them (a non-contiguous gradient through a
    contiguous copy). ``None`` when a held tensor is not already in the kernels' layout
    (:meth:`Staging.online` would stage it: the plan would hold a copy)."""
    device = layers[0].param.device
    calls: dict[tuple[int, int], tuple[list[int], list[list[int]]]] = {}
    empties = []
    for k, (t, projection) in enumerate(zip(layers, projections)):
        r, c = t.param.shape
        if r == 0 or c == 0:
            empties.append((k, t.state_step, projection))
            continue
        if not Staging.online_ready(t._replace(grad=t.param)):  # the gradient comes with each step
            return None
        cell = projection.coef.data_ptr() if projection.lagged else 0
        indices, rows = calls.setdefault((_native.DTYPE_CODES[t.param.dtype], _native.mode_code(projection)), ([], []))
        indices.append(k)
        rows.append([r, c, *(0 if x is t.grad else x.data_ptr() for x in t), cell, k])
    tables = [
        (code, mode, torch.tensor(rows, dtype=torch.int64), indices) for (code, mode), (indices, rows) in calls.items()
    ]
    grad_columns = [table.numpy()[:, _native.ONLINE_GRAD_COLUMN] for _, _, table, _ in tables]
    n = len(layers)

    def step(grads: list[Tensor], hyper: AdamWHyper) -> Tensor:
        coefs = torch.zeros(n, dtype=torch.float32, device=device)
        for k, state_step, projection in empties:
            coefs[k] = empty_online_step(state_step, hyper, projection, device)
            if projection.lagged:
                projection.coef.copy_(coefs[k])
        staging = Staging()
        for column, (_, _, _, indices) in zip(grad_columns, tables):
            column[:] = [staging.contiguous(grads[k]).data_ptr() for k in indices]
        _run_tables([(code, mode, table) for code, mode, table, _ in tables], hyper, coefs, staging)
        return coefs

    return step


register(Kernels("cpu", adamw_step, hpa_reduce, hpa_apply, online_step, online_steps, plan_online_steps))
