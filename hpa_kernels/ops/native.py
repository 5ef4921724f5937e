"""Compiled backends: ``"cpu"`` (:mod:`hpa_kernels._C`, csrc/cpu) and ``"cuda"`` (:mod:`hpa_kernels._C_cuda`,
csrc/cuda).

The compiled modules take raw addresses (``tensor.data_ptr()``), sizes and strides, so they do not
depend on the torch C++ ABI. This module checks shapes, dtypes and devices, brings odd layouts to
ones the kernels handle (with a write-back, so the caller's tensors are updated in place), and
launches. A compiled module that is missing or fails to load leaves its backend out of
:func:`hpa_kernels.ops.available_backends` with one warning (``"auto"`` then falls back to
``"torch"``); importing this module never raises for that reason.

Layouts the kernels take directly: ``adamw_step`` any dense tensor (contiguous, channels_last)
whose gradient and moments share its layout; ``hpa_reduce`` / ``hpa_apply`` any 2-D strides;
``online_step`` contiguous row-major. Anything else goes through a contiguous copy and is written
back, so results equal those on contiguous copies.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/include/hpa/common.h DType


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # a broken .so raises ImportError, OSError or anything its init throws
        return None, f"{name}: {type(exc).__name__}: {exc}"


_C, _C_ERROR = _load("hpa_kernels._C")
_C_CUDA, _C_CUDA_ERROR = _load("hpa_kernels._C_cuda")


def _warn_once() -> None:
    problems = [_C_ERROR] if _C_ERROR else []
    if _C_CUDA_ERROR and torch.cuda.is_available():  # without a GPU a missing CUDA module loses nothing
        problems.append(_C_CUDA_ERROR)
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
    return _C is not None


def cuda_loaded() -> bool:
    """Whether :mod:`hpa_kernels._C_cuda` loaded and sees a GPU that torch can use too."""
    return _C_CUDA is not None and torch.cuda.is_available() and _C_CUDA.device_count() > 0


# ---------------------------------------------------------------------------------------------
# Layout helpers


def _layout(t: Tensor) -> str | None:
    """The dense memory format of ``t`` (``None`` when it is not dense in a standard format)."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return None


class _Staging:
    """Temporaries standing in for the caller's tensors, written back by :meth:`finish`."""

    def __init__(self) -> None:
        self._writebacks: list[tuple[Tensor, Tensor]] = []
        self.keep: list[Tensor] = []  # temporaries whose addresses a kernel reads

    def scalar_tensor(self, t: Tensor | None, device: torch.device) -> Tensor:
        """``t`` as an fp32 one-element tensor on ``device`` (a zero placeholder for ``None``); read-only."""
        if t is None:
            return torch.zeros(1, dtype=torch.float32, device=device)
        if t.numel() != 1:
            raise ValueError(f"expected a one-element tensor, got shape {tuple(t.shape)}")
        tmp = t.detach().reshape(()).to(device=device, dtype=torch.float32).contiguous()
        self.keep.append(tmp)
        return tmp

    def scalar_ptr(self, t: Tensor | None, device: torch.device) -> int:
        """Address of ``t`` as an fp32 scalar on ``device`` (0 for ``None``); read-only."""
        return 0 if t is None else self.scalar_tensor(t, device).data_ptr()

    def like(self, t: Tensor, ref: Tensor, *, dtype: torch.dtype | None = None, write_back: bool = False) -> Tensor:
        """``t`` itself when it has ``ref``'s dense layout, dtype and device, else a copy in that layout."""
        dtype = dtype or t.dtype
        if t.dtype == dtype and t.device == ref.device and _layout(t) is not None and _layout(t) == _layout(ref):
            if t.stride() == ref.stride() or t.numel() == 0:
                return t
        tmp = torch.empty_like(ref, dtype=dtype).copy_(t)  # empty_like keeps ref's dense strides
        if write_back:
            self._writebacks.append((t, tmp))
        return tmp

    def dense(self, t: Tensor, *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
        """``t`` when dense (and of ``dtype`` / on ``device``), else a contiguous copy written back later."""
        dtype, device = dtype or t.dtype, device or t.device
        if _layout(t) is not None and t.dtype == dtype and t.device == device:
            return t
        tmp = t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        self._writebacks.append((t, tmp))
        return tmp

    def contiguous(self, t: Tensor, *, write_back: bool) -> Tensor:
        if t.is_contiguous():
            return t
        tmp = t.contiguous()
        if write_back:
            self._writebacks.append((t, tmp))
        return tmp

    def finish(self) -> None:
        for original, tmp in self._writebacks:
            original.copy_(tmp)


def _dtype_code(t: Tensor, what: str) -> int:
    try:
        return _DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{what}: dtype {t.dtype} is not supported (float32, bfloat16, float16)") from None


def _check_matrix_pair(w_prev: Tensor, w_new: Tensor, op: str) -> None:
    if w_prev.dim() != 2 or w_prev.shape != w_new.shape:
        raise ValueError(
            f"{op}: w_prev and w_new must be 2-D of one shape, got {tuple(w_prev.shape)}, {tuple(w_new.shape)}"
        )
    if w_prev.device != w_new.device:
        raise ValueError(f"{op}: w_prev and w_new are on {w_prev.device} and {w_new.device}")


def _check_vector(v: Tensor, c: int, name: str, op: str) -> None:
    if v.shape != (c,):
        raise ValueError(f"{op}: {name} must have shape ({c},), got {tuple(v.shape)}")


def _check_online_args(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    state_step: Tensor,
    w_prev: Tensor,
    mask: Tensor,
    col_energy: Tensor,
) -> None:
    """The argument contract of ``hpa_kernels.ops.online_step`` (ValueError / TypeError)."""
    _dtype_code(param, "online_step: param")
    if param.dim() != 2:
        raise ValueError(f"online_step: param must be 2-D (out_features, in_features), got {tuple(param.shape)}")
    c = param.shape[1]
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("w_prev", w_prev)):
        if t.shape != param.shape or t.device != param.device:
            raise ValueError(f"online_step: {name} must match param's shape {tuple(param.shape)} and device")
    if grad.dtype != param.dtype or w_prev.dtype != param.dtype:
        raise TypeError("online_step: grad and w_prev must have param's dtype")
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise TypeError("online_step: exp_avg and exp_avg_sq must be float32")
    _check_vector(mask, c, "mask", "online_step")
    _check_vector(col_energy, c, "col_energy", "online_step")
    if mask.dtype != torch.bool or col_energy.dtype != torch.float32:
        raise TypeError("online_step: mask must be bool and col_energy float32")
    if state_step.numel() != 1:
        raise ValueError("online_step: state_step must be a one-element tensor")


# ---------------------------------------------------------------------------------------------
# The two backends share the Python side; they differ in the module and the launch arguments.


class _Backend:
    """One compiled backend (the ops of :mod:`hpa_kernels.ops` on one compiled module)."""

    def __init__(self, name: str, lib: ModuleType | None, device_type: str) -> None:
        self.name = name
        self._lib = lib
        self._device_type = device_type

    # The CUDA entry points take the stream as a last argument and run on the tensors' device.
    def _call(self, fn: Callable, device: torch.device, *args):
        if device.type != self._device_type:
            raise ValueError(f"the {self.name!r} backend runs on {self._device_type} tensors, got {device}")
        if self._device_type == "cpu":
            return fn(*args)
        with torch.cuda.device(device):
            return fn(*args, torch.cuda.current_stream(device).cuda_stream)

    def adamw_step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        *,
        lr: float | Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        maximize: bool = False,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> None:
        n = len(params)
        if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n):
            raise ValueError("adamw_step: params, grads, exp_avgs, exp_avg_sqs and state_steps differ in length")
        if n == 0:
            return
        device = params[0].device
        staging = _Staging()
        groups: dict[int, list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]] = {}
        for k, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
            code = _dtype_code(p, f"adamw_step: params[{k}]")
            if p.device != device or g.device != device:
                raise ValueError(f"adamw_step: params[{k}] / grads[{k}] not on {device}")
            if g.shape != p.shape or m.shape != p.shape or v.shape != p.shape:
                raise ValueError(
                    f"adamw_step: shapes differ at index {k}: param {tuple(p.shape)}, grad "
                    f"{tuple(g.shape)}, exp_avg {tuple(m.shape)}, exp_avg_sq {tuple(v.shape)}"
                )
            if m.dtype != torch.float32 or v.dtype != torch.float32:
                raise TypeError(f"adamw_step: exp_avgs[{k}] / exp_avg_sqs[{k}] must be float32")
            if s.numel() != 1:
                raise ValueError(f"adamw_step: state_steps[{k}] must be a one-element tensor")
            p_ = staging.dense(p)
            entry = (
                p_,
                staging.like(g, p_, dtype=p.dtype),
                staging.like(m, p_, write_back=True),
                staging.like(v, p_, write_back=True),
                staging.dense(s.reshape(()), dtype=torch.float32, device=device),
            )
            groups.setdefault(code, []).append(entry)
        scale_ptr = staging.scalar_ptr(grad_scale, device)
        inf_ptr = staging.scalar_ptr(found_inf, device)
        hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize))
        for code, entries in groups.items():
            ptrs = [[t.data_ptr() for t in column] for column in zip(*entries)]
            numels = [e[0].numel() for e in entries]
            self._call(self._lib.adamw, device, code, *ptrs, numels, *hyper, scale_ptr, inf_ptr)
        staging.finish()

    def hpa_reduce(
        self, w_prev: Tensor, w_new: Tensor, hinv_safety: Tensor, hinv_task: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _check_matrix_pair(w_prev, w_new, "hpa_reduce")
        r, c = w_new.shape
        _check_vector(hinv_safety, c, "hinv_safety", "hpa_reduce")
        _check_vector(hinv_task, c, "hinv_task", "hpa_reduce")
        device = w_new.device
        if w_prev.dtype != w_new.dtype:
            w_prev = w_prev.to(w_new.dtype)
        code = _dtype_code(w_new, "hpa_reduce")
        f32 = {"dtype": torch.float32, "device": device}
        hs = hinv_safety.to(**f32).contiguous()
        ht = hinv_task.to(**f32).contiguous()
        eps_bar, zeta_bar = torch.zeros(c, **f32), torch.zeros(c, **f32)
        if r == 0 or c == 0:
            return eps_bar, zeta_bar, torch.zeros((), **f32), torch.zeros((), **f32)
        mats = (w_prev.data_ptr(), *w_prev.stride(), w_new.data_ptr(), *w_new.stride())
        if self._device_type == "cpu":
            dot, norm_sq = self._call(
                self._lib.hpa_reduce,
                device,
                code,
                r,
                c,
                *mats,
                hs.data_ptr(),
                ht.data_ptr(),
                eps_bar.data_ptr(),
                zeta_bar.data_ptr(),
            )
            return eps_bar, zeta_bar, torch.tensor(dot, **f32), torch.tensor(norm_sq, **f32)
        dot, norm_sq = torch.empty((), **f32), torch.empty((), **f32)
        workspace = torch.empty(self._lib.reduce_workspace_bytes(r, c) // 8, dtype=torch.float64, device=device)
        self._call(
            self._lib.hpa_reduce,
            device,
            code,
            r,
            c,
            *mats,
            hs.data_ptr(),
            ht.data_ptr(),
            eps_bar.data_ptr(),
            zeta_bar.data_ptr(),
            dot.data_ptr(),
            norm_sq.data_ptr(),
            workspace.data_ptr(),
        )
        return eps_bar, zeta_bar, dot, norm_sq

    def hpa_apply(
        self, w_prev: Tensor, w_new: Tensor, mask: Tensor, coef: float | Tensor, out: Tensor | None = None
    ) -> Tensor:
        _check_matrix_pair(w_prev, w_new, "hpa_apply")
        r, c = w_new.shape
        _check_vector(mask, c, "mask", "hpa_apply")
        if mask.dtype != torch.bool:
            raise TypeError(f"hpa_apply: mask must be bool, got {mask.dtype}")
        device = w_new.device
        code = _dtype_code(w_new, "hpa_apply")
        if w_prev.dtype != w_new.dtype:
            w_prev = w_prev.to(w_new.dtype)  # as the reference: retained columns are W_prev in w_new's dtype
        if out is None:
            out = torch.empty(r, c, dtype=w_new.dtype, device=device)
        elif out.shape != w_new.shape or out.dtype != w_new.dtype or out.device != device:
            raise ValueError("hpa_apply: out must match w_new in shape, dtype and device")
        if r == 0 or c == 0:
            return out
        mask_u8 = mask.to(device).contiguous().view(torch.uint8)
        coef_ptr, coef_value = 0, 0.0
        if isinstance(coef, Tensor) and self._device_type == "cuda":
            coef_t = coef.detach().reshape(()).to(device=device, dtype=torch.float32)  # read on the device
            coef_ptr = coef_t.data_ptr()
        else:
            coef_value = float(coef)
        mats = (w_prev.data_ptr(), *w_prev.stride(), w_new.data_ptr(), *w_new.stride(), out.data_ptr(), *out.stride())
        if self._device_type == "cpu":
            self._call(self._lib.hpa_apply, device, code, r, c, *mats, mask_u8.data_ptr(), coef_value)
        else:
            self._call(self._lib.hpa_apply, device, code, r, c, *mats, mask_u8.data_ptr(), coef_value, coef_ptr)
        return out

    def online_step(
        self,
        param: Tensor,
        grad: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        state_step: Tensor,
        w_prev: Tensor,
        mask: Tensor,
        col_energy: Tensor,
        *,
        lr: float | Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        maximize: bool = False,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        orthogonal: bool = True,
    ) -> Tensor:
        _check_online_args(param, grad, exp_avg, exp_avg_sq, state_step, w_prev, mask, col_energy)
        device = param.device
        code = _dtype_code(param, "online_step: param")
        r, c = param.shape
        f32 = {"dtype": torch.float32, "device": device}
        if r == 0 or c == 0:
            # Nothing to update but the step count (kept in step with the other backends).
            if found_inf is None:
                state_step.add_(1)
            else:
                state_step.add_((found_inf.reshape(()) == 0).to(device=state_step.device, dtype=state_step.dtype))
            return torch.zeros((), **f32)
        staging = _Staging()
        p_ = staging.contiguous(param, write_back=True)
        m_ = staging.contiguous(exp_avg, write_back=True)
        v_ = staging.contiguous(exp_avg_sq, write_back=True)
        e_ = staging.contiguous(col_energy, write_back=True)
        s_ = staging.dense(state_step.reshape(()), dtype=torch.float32, device=device)
        g_ = staging.contiguous(grad, write_back=False)
        w_ = staging.contiguous(w_prev, write_back=False)
        mask_u8 = mask.to(device).contiguous().view(torch.uint8)
        ptrs = (p_, g_, m_, v_, s_, w_, mask_u8, e_)
        hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize))
        scalars = (staging.scalar_ptr(grad_scale, device), staging.scalar_ptr(found_inf, device), bool(orthogonal))
        args = (code, r, c, *(t.data_ptr() for t in ptrs), *hyper, *scalars)
        if self._device_type == "cpu":
            coef = torch.tensor(self._call(self._lib.online_step, device, *args), **f32)
        else:
            coef = torch.empty((), **f32)
            workspace = torch.empty(self._lib.online_workspace_bytes(r, c) // 4, **f32)
            self._call(self._lib.online_step, device, *args, coef.data_ptr(), workspace.data_ptr())
        staging.finish()
        return coef


cpu = _Backend("cpu", _C, "cpu")
cuda = _Backend("cuda", _C_CUDA, "cuda")
