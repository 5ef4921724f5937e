"""The one schema of the ops of :mod:`hpa_kernels.ops`: their argument checks, and the registry the
backend modules fill.

Each op's checks are written once, here, and :mod:`hpa_kernels.ops` runs them once per call,
before dispatch; a backend's kernels take arguments that passed them (they only bring layouts and
devices to what their launch needs). A check failure raises ``ValueError`` (shapes, lengths,
devices) or ``TypeError`` (dtypes) with the op's name in the message, the same on every backend.

Storage dtypes are float32 / bfloat16 / float16. A backend registered with ``float64=True`` (only
``"torch"``, the tests' ground truth) also takes float64 tensors, wherever float32 is asked for too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..config import ONLINE_PROJECTIONS

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROW_BLOCK = 128
"""Rows per block of the HPA reductions' fixed summation order (``hpa_kernels.ops.hpa_reduce``)."""
_FLOAT64_DTYPES = (*STORAGE_DTYPES, torch.float64)
_F32 = (torch.float32,)  # the dtypes of the fp32 state tensors
_F32_FLOAT64 = (torch.float32, torch.float64)  # ... on a float64 backend


class AdamWTensors(NamedTuple):
    """The tensor lists of one ``adamw_step`` call, as the backends take them: built once per call
    by :mod:`hpa_kernels.ops`, each field the argument of that name of ``hpa_kernels.ops.adamw_step``
    (shapes and dtypes documented there); ``zip(*tensors)`` walks it one parameter at a time."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    state_steps: list[Tensor]


class OnlineTensors(NamedTuple):
    """The tensors of one ``online_step`` call (one managed weight), as the backends take them:
    built once per call by :mod:`hpa_kernels.ops`, each field the argument of that name of
    ``hpa_kernels.ops.online_step`` (shapes and dtypes documented there)."""

    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    state_step: Tensor
    w_prev: Tensor
    mask: Tensor
    col_energy: Tensor


@dataclass(frozen=True)
class AdamWHyper:
    """The AdamW hyperparameters of one ``adamw_step`` / ``online_step`` call, as the backends
    take them (built once per call by :mod:`hpa_kernels.ops` from its keyword arguments).

    Attributes:
        lr: learning rate, a float or a one-element tensor (a scheduler's).
        beta1, beta2, eps, weight_decay, maximize: as ``torch.optim.AdamW``.
        grad_scale, found_inf: the AMP ``GradScaler`` one-element fp32 tensors, or ``None``.
    """

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool = False
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


@dataclass(frozen=True)
class OnlineProjection:
    """HPA_SPEC.md Step 3's projection inside one ``online_step`` call (``HPAConfig.orthogonal``,
    ``HPAConfig.online_projection``).

    Attributes:
        orthogonal: project at all (``False``: one pass, no projection, 0 returned).
        mode: ``"exact"`` (a second pass removes this step's c'·W_prev; c' returned) or
            ``"lagged"`` (the AdamW pass applies ``coef`` and measures c_next; c_next returned).
        coef: ``"lagged"`` only: c_prev, the coefficient the previous lagged step returned
            (a float or a one-element tensor on param's device, read there; 0 on a task's first
            step and after a mask refresh).

    Raises:
        ValueError: a ``mode`` outside ``("exact", "lagged")``, at construction.
    """

    orthogonal: bool = True
    mode: str = "exact"
    coef: float | Tensor = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ONLINE_PROJECTIONS:
            raise ValueError(f"OnlineProjection.mode must be one of {ONLINE_PROJECTIONS}, got {self.mode!r}")

    @property
    def lagged(self) -> bool:
        """One pass applying ``coef`` (the orthogonal lagged mode)."""
        return self.orthogonal and self.mode == "lagged"

    @property
    def exact(self) -> bool:
        """Two passes, the second applying this step's c' (the orthogonal exact mode)."""
        return self.orthogonal and self.mode == "exact"


@dataclass(frozen=True)
class Kernels:
    """One backend's implementations of the five ops, called with arguments that passed this
    module's checks. The kernels' signatures (those of :mod:`hpa_kernels.ops` with the tensors of
    ``adamw_step`` / ``online_step`` as one :class:`AdamWTensors` / :class:`OnlineTensors`, their
    AdamW keywords as one :class:`AdamWHyper`, and without ``backend``)::

        adamw_step(tensors, hyper) -> None
        hpa_reduce(w_prev, w_new) -> (col_energy, dot, norm_sq)
        hpa_apply(w_prev, w_new, mask, coef, out) -> Tensor
        online_step(tensors, hyper, projection) -> Tensor
        online_steps(layers, hyper, projections) -> Tensor   # (n,) fp32, one entry per layer
        plan_online_steps(layers, projections) -> step(grads, hyper) -> Tensor, or None

    ``plan_online_steps`` (optional) prepares ``hpa_kernels.ops.OnlineStepsPlan``'s calls: the
    returned ``step`` does what ``online_steps`` does on the layers with ``grads`` in place of
    their gradients (which passed the plan's checks) and also writes each lagged layer's c_next
    into its ``projection.coef`` tensor; ``None`` (or no function) lets the plan call
    ``online_steps``.
    """

    name: str
    adamw_step: Callable[[AdamWTensors, AdamWHyper], None]
    hpa_reduce: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
    hpa_apply: Callable[[Tensor, Tensor, Tensor, float | Tensor, Tensor | None], Tensor]
    online_step: Callable[[OnlineTensors, AdamWHyper, OnlineProjection], Tensor]
    online_steps: Callable[[list[OnlineTensors], AdamWHyper, list[OnlineProjection]], Tensor]
    plan_online_steps: (
        Callable[[list[OnlineTensors], list[OnlineProjection]], Callable[[list[Tensor], AdamWHyper], Tensor] | None]
        | None
    ) = None
    float64: bool = False  # takes float64 tensors too (the "torch" reference only)


def online_steps_by_layer(
    online_step: Callable[[OnlineTensors, AdamWHyper, OnlineProjection], Tensor],
) -> Callable[[list[OnlineTensors], AdamWHyper, list[OnlineProjection]], Tensor]:
    """A backend's ``online_steps`` as one call of its ``online_step`` per layer, in order (each
    layer's results are those of its own call), the coefficients stacked."""

    def online_steps(layers: list[OnlineTensors], hyper: AdamWHyper, projections: list[OnlineProjection]) -> Tensor:
        return torch.stack([online_step(t, hyper, p) for t, p in zip(layers, projections)])

    return online_steps


def empty_online_step(
    state_step: Tensor, hyper: AdamWHyper, projection: OnlineProjection, device: torch.device
) -> Tensor:
    """``online_step`` on an (r, c) weight with r or c 0, as every backend does it: nothing to
    update but the step count (not counted on a GradScaler-skipped step); returns 0 (c', or the
    lagged c_next: no free column) or, on a skipped lagged step, c_prev; fp32 0-d on ``device``
    (param's), without a host sync."""
    zero = torch.zeros((), dtype=torch.float32, device=device)
    if hyper.found_inf is None:
        state_step.add_(1)
        return zero
    skipped = hyper.found_inf.detach().reshape(()).to(device) != 0
    state_step.add_((~skipped).to(device=state_step.device, dtype=state_step.dtype))
    if not projection.lagged:
        return zero
    return torch.where(skipped, torch.as_tensor(projection.coef, dtype=torch.float32, device=device).reshape(()), zero)


REGISTRY: dict[str, Kernels] = {}
"""Backend name → its kernels; each backend module registers itself when imported."""


def register(kernels: Kernels) -> Kernels:
    """Add ``kernels`` to :data:`REGISTRY` under its name (a backend module's last statement)."""
    REGISTRY[kernels.name] = kernels
    return kernels


# ---------------------------------------------------------------------------------------------
# Checks shared by the ops


def _check_storage(t: Tensor, what: str, float64: bool) -> None:
    allowed = _FLOAT64_DTYPES if float64 else STORAGE_DTYPES
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{what}: dtype {t.dtype} is not supported ({names})")


def _is_f32(t: Tensor, float64: bool) -> bool:
    return t.dtype == torch.float32 or (float64 and t.dtype == torch.float64)


def _check_scalar(t: Tensor | None) -> None:
    """``grad_scale`` / ``found_inf``: one element when given."""
    if t is not None and t.numel() != 1:
        raise ValueError(f"expected a one-element tensor, got shape {tuple(t.shape)}")


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


def check_scalars(hyper: AdamWHyper) -> None:
    """``grad_scale`` and ``found_inf``: one element each when given."""
    _check_scalar(hyper.grad_scale)
    _check_scalar(hyper.found_inf)


# ---------------------------------------------------------------------------------------------
# One check per op (the contracts in the docstrings of hpa_kernels.ops)


def check_adamw_step(tensors: AdamWTensors, hyper: AdamWHyper, *, float64: bool = False) -> None:
    """The argument contract of ``hpa_kernels.ops.adamw_step`` (``tensors.params`` not empty)."""
    params = tensors.params
    n = len(params)
    if not all(len(t) == n for t in tensors):
        raise ValueError("adamw_step: params, grads, exp_avgs, exp_avg_sqs and state_steps differ in length")
    device = params[0].device
    for k, (p, g, m, v, s) in enumerate(zip(*tensors)):
        _check_storage(p, f"adamw_step: params[{k}]", float64)
        if p.device != device or g.device != device:
            raise ValueError(f"adamw_step: params[{k}] / grads[{k}] not on {device}")
        if g.shape != p.shape or m.shape != p.shape or v.shape != p.shape:
            raise ValueError(
                f"adamw_step: shapes differ at index {k}: param {tuple(p.shape)}, grad "
                f"{tuple(g.shape)}, exp_avg {tuple(m.shape)}, exp_avg_sq {tuple(v.shape)}"
            )
        if not (_is_f32(m, float64) and _is_f32(v, float64)):
            raise TypeError(f"adamw_step: exp_avgs[{k}] / exp_avg_sqs[{k}] must be float32")
        if s.numel() != 1:
            raise ValueError(f"adamw_step: state_steps[{k}] must be a one-element tensor")
    check_scalars(hyper)


def check_hpa_reduce(w_prev: Tensor, w_new: Tensor, *, float64: bool = False) -> None:
    """The argument contract of ``hpa_kernels.ops.hpa_reduce``."""
    _check_matrix_pair(w_prev, w_new, "hpa_reduce")
    _check_storage(w_new, "hpa_reduce", float64)


def check_hpa_apply(w_prev: Tensor, w_new: Tensor, mask: Tensor, out: Tensor | None, *, float64: bool = False) -> None:
    """The argument contract of ``hpa_kernels.ops.hpa_apply``."""
    _check_matrix_pair(w_prev, w_new, "hpa_apply")
    _check_vector(mask, w_new.shape[1], "mask", "hpa_apply")
    if mask.dtype != torch.bool:
        raise TypeError(f"hpa_apply: mask must be bool, got {mask.dtype}")
    _check_storage(w_new, "hpa_apply", float64)
    if out is not None and (out.shape != w_new.shape or out.dtype != w_new.dtype or out.device != w_new.device):
        raise ValueError("hpa_apply: out must match w_new in shape, dtype and device")


def check_online_step(
    t: OnlineTensors, hyper: AdamWHyper, projection: OnlineProjection, *, float64: bool = False
) -> None:
    """The argument contract of ``hpa_kernels.ops.online_step``."""
    _check_online_tensors(t, float64)
    coef = projection.coef
    if projection.lagged and isinstance(coef, Tensor) and (coef.numel() != 1 or coef.device != t.param.device):
        raise ValueError(f"online_step: the lagged coefficient must be one element on {t.param.device}")
    check_scalars(hyper)


def _check_online_tensors(t: OnlineTensors, float64: bool) -> None:
    """The tensor checks of ``hpa_kernels.ops.online_step``, raising at the first that ``t`` fails;
    each tensor attribute is read once (this runs once per layer of every online step)."""
    param, grad, exp_avg, exp_avg_sq, state_step, w_prev, mask, col_energy = t
    shape, device, dtype = param.shape, param.device, param.dtype
    if dtype not in (_FLOAT64_DTYPES if float64 else STORAGE_DTYPES):
        _check_storage(param, "online_step: param", float64)  # raises its message
    if len(shape) != 2:
        raise ValueError(f"online_step: param must be 2-D (out_features, in_features), got {tuple(shape)}")
    for name, other in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("w_prev", w_prev)):
        if other.shape != shape or other.device != device:
            raise ValueError(f"online_step: {name} must match param's shape {tuple(shape)} and device")
    if grad.dtype != dtype or w_prev.dtype != dtype:
        raise TypeError("online_step: grad and w_prev must have param's dtype")
    f32 = _F32_FLOAT64 if float64 else _F32
    if exp_avg.dtype not in f32 or exp_avg_sq.dtype not in f32:
        raise TypeError("online_step: exp_avg and exp_avg_sq must be float32")
    columns = shape[1:]  # the helpers raise their messages; called on failure only
    if mask.shape != columns:
        _check_vector(mask, shape[1], "mask", "online_step")
    if col_energy.shape != columns:
        _check_vector(col_energy, shape[1], "col_energy", "online_step")
    if mask.dtype != torch.bool or col_energy.dtype not in f32:
        raise TypeError("online_step: mask must be bool and col_energy float32")
    if state_step.numel() != 1:
        raise ValueError("online_step: state_step must be a one-element tensor")


def check_online_steps(
    layers: list[OnlineTensors], hyper: AdamWHyper, projections: list[OnlineProjection], *, float64: bool = False
) -> None:
    """The argument contract of ``hpa_kernels.ops.online_steps`` (``layers`` not empty): as many
    projections as layers, every layer on one device and passing :func:`check_online_step`."""
    if len(projections) != len(layers):
        raise ValueError(f"online_steps: {len(layers)} layers but {len(projections)} projections")
    device = layers[0].param.device
    for k, (t, projection) in enumerate(zip(layers, projections)):
        if t.param.device != device:
            raise ValueError(f"online_steps: layers[{k}] is on {t.param.device}, layers[0] on {device}")
        try:
            check_online_step(t, hyper, projection, float64=float64)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"online_steps: layers[{k}]: {exc}") from None
