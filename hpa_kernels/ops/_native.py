"""What the compiled backends ``"cpu"`` (:mod:`hpa_kernels.ops.cpu`) and ``"cuda"``
(:mod:`hpa_kernels.ops.cuda`) share: loading their modules, and the arguments of their calls.

The compiled modules take raw addresses (``tensor.data_ptr()``), sizes and strides, so they do not
depend on the torch C++ ABI. A compiled module that is missing or fails to load leaves its backend
out of :func:`hpa_kernels.ops.available_backends` with one warning (``"auto"`` then falls back to
``"torch"``); importing this module never raises for that reason.

Layouts the kernels take directly: ``adamw_step`` any dense tensor (contiguous, channels_last)
whose gradient and moments share its layout; ``hpa_reduce`` / ``hpa_apply`` any 2-D strides;
``online_step`` contiguous row-major. Anything else goes through a contiguous copy and is written
back (:class:`hpa_kernels.ops._staging.Staging`), so results equal those on contiguous copies.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch
from torch import Tensor

from ._staging import Staging
from .schema import AdamWHyper, AdamWTensors, OnlineProjection, OnlineTensors

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/include/hpa/common.h DType
PROJECTION_CODES = {"none": 0, "exact": 1, "lagged": 2}  # csrc/include/hpa/common.h ProjectionMode
ONLINE_COLUMNS = 12  # python/bind_cpu.cpp OnlineColumn: rows, cols, 8 addresses, coefficient cell, out index
ONLINE_GRAD_COLUMN = 3  # the grad address's column in that table


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # a broken .so raises ImportError, OSError or anything its init throws
        return None, f"{name}: {type(exc).__name__}: {exc}"


CPU_LIB, _CPU_ERROR = _load("hpa_kernels._C")
CUDA_LIB, _CUDA_ERROR = _load("hpa_kernels._C_cuda")


def _warn_once() -> None:
    problems = [_CPU_ERROR] if _CPU_ERROR else []
    if _CUDA_ERROR and torch.cuda.is_available():  # without a GPU a missing CUDA module loses nothing
        problems.append(_CUDA_ERROR)
    if problems:
        warnings.warn(
            "hpa_kernels: compiled kernels not loaded, falling back to the 'torch' backend where they are "
            "missing (" + "; ".join(problems) + "). Rebuild with `pip install -e .` or `pip wheel .`.",
            RuntimeWarning,
            stacklevel=3,
        )


_warn_once()


def cpu_loaded() -> bool:
    """Whether :mod:`hpa_kernels._C` loaded."""
    return CPU_LIB is not None


def cuda_loaded() -> bool:
    """Whether :mod:`hpa_kernels._C_cuda` loaded and sees a GPU that torch can use too."""
    return CUDA_LIB is not None and torch.cuda.is_available() and CUDA_LIB.device_count() > 0


# ---------------------------------------------------------------------------------------------
# Call arguments (of arguments that passed hpa_kernels.ops.schema)


def hyper(h: AdamWHyper) -> tuple[float, float, float, float, float, bool]:
    """AdamW's hyperparameters as the compiled entry points take them."""
    return float(h.lr), float(h.beta1), float(h.beta2), float(h.eps), float(h.weight_decay), bool(h.maximize)


def adamw_launches(
    tensors: AdamWTensors, h: AdamWHyper
) -> tuple[Staging, list[tuple[int, list[list[int]], list[int]]], int, int]:
    """The tensors of one AdamW call staged in the kernels' layouts and grouped by storage dtype.

    Returns:
        ``(staging, launches, scale_ptr, inf_ptr)``: one launch ``(dtype code, [addresses of the
        params, grads, exp_avgs, exp_avg_sqs, steps], numels)`` per storage dtype, and the
        addresses of ``grad_scale`` / ``found_inf`` (0 for ``None``); ``staging.finish()`` after
        the launches writes the copies back.
    """
    device = tensors.params[0].device
    staging = Staging()
    groups: dict[int, list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]] = {}
    for p, g, m, v, s in zip(*tensors):
        groups.setdefault(DTYPE_CODES[p.dtype], []).append(staging.adamw(p, g, m, v, s))
    scale_ptr = staging.scalar_ptr(h.grad_scale, device)
    inf_ptr = staging.scalar_ptr(h.found_inf, device)
    launches = [
        (code, [[t.data_ptr() for t in column] for column in zip(*entries)], [e[0].numel() for e in entries])
        for code, entries in groups.items()
    ]
    return staging, launches, scale_ptr, inf_ptr


def reduce_outputs(w_prev: Tensor, w_new: Tensor) -> tuple[Tensor, tuple | None]:
    """``hpa_reduce``'s zeroed float64 (c,) output ``col_energy`` and the arguments of the call
    that fills it (``None`` when r or c is 0: nothing to call)."""
    r, c = w_new.shape
    if w_prev.dtype != w_new.dtype:
        w_prev = w_prev.to(w_new.dtype)
    col_energy = torch.zeros(c, dtype=torch.float64, device=w_new.device)
    if r == 0 or c == 0:
        return col_energy, None
    mats = (w_prev.data_ptr(), *w_prev.stride(), w_new.data_ptr(), *w_new.stride())
    return col_energy, ((DTYPE_CODES[w_new.dtype], r, c, *mats, col_energy.data_ptr()), (w_prev,))


def apply_args(w_prev: Tensor, w_new: Tensor, mask: Tensor, out: Tensor | None) -> tuple[Tensor, tuple | None]:
    """``hpa_apply``'s output (``out``, or a new tensor) and the arguments of the call that writes
    it, up to the coefficient (``None`` when r or c is 0: nothing to call)."""
    r, c = w_new.shape
    device = w_new.device
    code = DTYPE_CODES[w_new.dtype]
    if w_prev.dtype != w_new.dtype:
        w_prev = w_prev.to(w_new.dtype)  # as the reference: retained columns are W_prev in w_new's dtype
    if out is None:
        out = torch.empty(r, c, dtype=w_new.dtype, device=device)
    if r == 0 or c == 0:
        return out, None
    mask_u8 = mask.to(device).contiguous().view(torch.uint8)
    mats = (w_prev.data_ptr(), *w_prev.stride(), w_new.data_ptr(), *w_new.stride(), out.data_ptr(), *out.stride())
    return out, ((code, r, c, *mats, mask_u8.data_ptr()), (w_prev, mask_u8))


def online_addresses(staging: Staging, t: OnlineTensors) -> list[int]:
    """The addresses of ``t``'s tensors (r and c > 0) in the online-step kernels' layout
    (:meth:`Staging.online`), in :class:`OnlineTensors` order."""
    return [x.data_ptr() for x in staging.online(t)]


def online_args(t: OnlineTensors, h: AdamWHyper, projection: OnlineProjection) -> tuple[Staging, tuple]:
    """The tensors of one online step staged (r and c > 0, :func:`online_addresses`) and the
    arguments of its call up to the projection's mode code (:data:`PROJECTION_CODES`), before the
    backend's own last ones (c_prev first); ``staging.finish()`` after the call writes back."""
    device = t.param.device
    r, c = t.param.shape
    staging = Staging()
    addresses = online_addresses(staging, t)
    scalars = (staging.scalar_ptr(h.grad_scale, device), staging.scalar_ptr(h.found_inf, device), mode_code(projection))
    args = (DTYPE_CODES[t.param.dtype], r, c, *addresses, *hyper(h), *scalars)
    return staging, args


def mode_code(projection: OnlineProjection) -> int:
    """The kernels' code of ``projection``'s mode (:data:`PROJECTION_CODES`)."""
    return PROJECTION_CODES[projection.mode if projection.orthogonal else "none"]
