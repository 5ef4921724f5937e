"""Kernel dispatch: one signature per op, one module per backend (DESIGN.md § Kernels).

Backends:

* ``"torch"``  — :mod:`hpa_kernels.ops.reference`, plain PyTorch, always available; the ground
  truth of every test.

``backend="auto"`` picks the fastest available backend for the tensors' device; the environment
variable ``HPA_KERNELS_BACKEND`` overrides ``"auto"``.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from . import reference

BACKENDS = ("torch",)

_MODULES: dict[str, ModuleType] = {"torch": reference}


def available_backends() -> list[str]:
    """Names of the backends this machine can run, ``"torch"`` first."""
    return [name for name in BACKENDS if name in _MODULES]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` (``"auto"`` allowed) on ``device``.

    Raises:
        ValueError: unknown backend name, or one not available on this machine.
    """
    if backend == "auto":
        backend = os.environ.get("HPA_KERNELS_BACKEND", "auto") or "auto"
    if backend == "auto":
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown HPA kernels backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend not in _MODULES:
        raise ValueError(f"HPA kernels backend {backend!r} is not available here; available: {available_backends()}")
    return backend


def _module(backend: str, device: torch.device) -> ModuleType:
    return _MODULES[resolve_backend(backend, device)]


def adamw_step(
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
    backend: str = "auto",
) -> None:
    """One AdamW step over lists of tensors, in place (the update of ``torch.optim.AdamW``).

    For each parameter ``p`` with gradient ``g`` (``g / grad_scale`` when given, ``-g`` when
    ``maximize``), moments ``m``, ``v`` and step count ``t`` (incremented first)::

        p ← p · (1 − lr·weight_decay)
        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
        p ← p − lr / (1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps)

    Args:
        params: parameters, any shape, fp32 / bf16 / fp16, all on one device.
        grads: gradients, same shapes and dtypes as ``params`` (any strides).
        exp_avgs, exp_avg_sqs: fp32 moments, same shapes as ``params``.
        state_steps: fp32 0-d step counts, one per parameter.
        lr, beta1, beta2, eps, weight_decay, maximize: as in ``torch.optim.AdamW``.
        grad_scale: optional fp32 0-d tensor; gradients are divided by it (AMP unscaling).
        found_inf: optional fp32 0-d tensor; when non-zero nothing changes at all
            (parameters, moments, step counts), as ``torch.amp.GradScaler`` expects.
        backend: ``"auto"`` or one of :func:`available_backends`.

    Math is fp32 whatever the parameter dtype; the result is rounded once to it.
    """
    if not params:
        return
    _module(backend, params[0].device).adamw_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def hpa_reduce(
    w_prev: Tensor, w_new: Tensor, hinv_safety: Tensor, hinv_task: Tensor, *, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """HPA_SPEC.md Step 1 column scores and Step 3 Frobenius sums, in one pass.

    With ΔW = W_new − W_prev of shape (r, c)::

        eps_bar[j]  = (1/r) Σᵢ ΔWᵢⱼ² / hinv_safety[j]
        zeta_bar[j] = (1/r) Σᵢ ΔWᵢⱼ² / hinv_task[j]
        dot         = ⟨ΔW, W_prev⟩_F,     norm_sq = ‖W_prev‖_F²

    Args:
        w_prev, w_new: (r, c) weights (out_features, in_features), same dtype, any strides.
        hinv_safety, hinv_task: (c,) positive diagonals of the damped inverse Hessians.

    Returns:
        ``(eps_bar, zeta_bar, dot, norm_sq)``: float32 (c,), float32 (c,), float32 0-d,
        float32 0-d. Accumulation is fp32 or wider (fp64 in ``"torch"``); r = 0 gives zeros.
    """
    return _module(backend, w_new.device).hpa_reduce(w_prev, w_new, hinv_safety, hinv_task)


def hpa_apply(
    w_prev: Tensor,
    w_new: Tensor,
    mask: Tensor,
    coef: float | Tensor,
    out: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """HPA_SPEC.md Step 3's write, in one pass::

        Ŵ[:, j] = W_prev[:, j]                 if mask[j]
        Ŵ[:, j] = W_new[:, j] − coef·W_prev[:, j]   otherwise   (fp32 math)

    Args:
        w_prev, w_new: (r, c), same dtype.
        mask: (c,) bool, True for retained columns (their result is bit-equal to ``w_prev``).
        coef: the projection scalar c_l (Python float or 0-d tensor).
        out: optional (r, c) destination of ``w_new``'s dtype; may be ``w_new`` itself (in place).

    Returns:
        Ŵ, of ``w_new``'s dtype (``out`` when given).
    """
    return _module(backend, w_new.device).hpa_apply(w_prev, w_new, mask, coef, out)
