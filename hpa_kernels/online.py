"""Online HPA (``HPAConfig(online=True)``): the per-step edit of a managed weight and the refresh
of its retained-column mask, on the state HPAOptimizer keeps for it.

Invariants after every online step and every refresh, for a managed weight W (r, c) with
snapshot W_prev and mask M (the retained columns): W[:, M] == W_prev[:, M], and with
``orthogonal=True`` (HPA_SPEC.md Step 3 on the free columns, up to rounding):

* ``online_projection="exact"``: the free part of ΔW = W − W_prev is orthogonal to W_prev[:, ~M]
  (⟨ΔW[:, ~M], W_prev[:, ~M]⟩ = 0);
* ``online_projection="lagged"``: ⟨ΔW[:, ~M] − c_next·W_prev[:, ~M], W_prev[:, ~M]⟩ = 0 with
  c_next = ``state["hpa_online_coef"]``, the component the next step removes (each step applies the
  previous step's coefficient in its AdamW pass, :func:`hpa_kernels.ops.online_step`); after a
  refresh c_next = 0, so the exact invariant holds there, and ``end_task``'s edit re-projects
  exactly, so a task's final weights satisfy Step 3's invariant in full.

HPAOptimizer plans the step once per task (:func:`plan_online_batches`) and plans it again when
the weights with a gradient change or anything the plan captured is replaced: a state tensor, a
param group dict or its ``master_weights``, the HPAConfig, a weight's data (``w.data = ...``). A
state tensor given another storage in place (``state["exp_avg"].data = ...``) is not followed.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import ops
from .config import HPAConfig
from .functional import column_scores_from_energy, count_columns, projection_coef, top_columns
from .optim_state import adamw_hyperparameters


class OnlineBatch(NamedTuple):
    """The online step of the managed weights of one param group and device, prepared once (at a
    task's first step, and again when the weights with gradients or the optimizer state change):
    one :class:`hpa_kernels.ops.OnlineStepsPlan` over their working tensors and state."""

    group: Mapping[str, Any]
    weights: list[Tensor]  # the parameters, in the plan's order
    working_dtypes: list[torch.dtype]  # the gradient each layer steps with is cast to it (master weights)
    masters: list[tuple[Tensor, Tensor]]  # (parameter, fp32 master copy): the parameter gets its rounding
    plan: ops.OnlineStepsPlan


def plan_online_batches(
    layers: Sequence[tuple[Tensor, Mapping[str, Any], MutableMapping[str, Tensor], Tensor, Tensor]],
    *,
    config: HPAConfig,
    backend: str,
) -> list[OnlineBatch]:
    """One :class:`OnlineBatch` per (param group, device) of ``layers``.

    Args:
        layers: per managed weight with a gradient ``(weight, group, state, working, prev)``: the
            parameter, its param group (``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``maximize``, read at every step), its optimizer state (``exp_avg``, ``exp_avg_sq``,
            ``step``, ``hpa_mask``, ``hpa_col_energy``, ``hpa_online_coef``: fp32 0-d, c_prev of
            the lagged projection), the (r, c) tensor the step updates (the fp32 master copy, or
            the weight) and W_prev in ``working``'s dtype.
        config: ``orthogonal`` (HPA_SPEC.md Step 3) and ``online_projection``.
        backend: kernels backend name (``"auto"`` allowed).

    Raises:
        ValueError / TypeError: what :class:`hpa_kernels.ops.OnlineStepsPlan` raises.
    """
    batches: dict[tuple[int, torch.device], list] = {}
    for entry in layers:
        batches.setdefault((id(entry[1]), entry[3].device), []).append(entry)
    planned = []
    for entries in batches.values():
        tensors = [
            ops.OnlineTensors(
                working,
                _grad(weight, working.dtype),
                state["exp_avg"],
                state["exp_avg_sq"],
                state["step"],
                prev,
                state["hpa_mask"],
                state["hpa_col_energy"],
            )
            for weight, _, state, working, prev in entries
        ]
        projections = [
            ops.OnlineProjection(config.orthogonal, config.online_projection, state["hpa_online_coef"])
            for _, _, state, _, _ in entries
        ]
        masters = [(weight.detach(), working) for weight, _, state, working, _ in entries if "master_param" in state]
        planned.append(
            OnlineBatch(
                group=entries[0][1],
                weights=[entry[0] for entry in entries],
                working_dtypes=[entry[3].dtype for entry in entries],
                masters=masters,
                plan=ops.OnlineStepsPlan(tensors, projections, backend=backend),
            )
        )
    return planned


def online_batches_step(batches: Sequence[OnlineBatch], *, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """One online step of every batch, in place (each weight's result that of its own
    :func:`hpa_kernels.ops.online_step`): AdamW, the retained columns back to W_prev, ΔW made
    orthogonal to W_prev (exact), or the previous step's component removed and the next one
    stored in ``state["hpa_online_coef"]`` (lagged), and the attempted update's column energies
    accumulated into ``state["hpa_col_energy"]``; then master weights' parameters rounded.

    The plans' own address checks are skipped (``OnlineStepsPlan.step(check=False)``): reading
    every state tensor's address and strides costs about 0.4 µs a tensor when they are out of
    cache, as after a forward and backward pass. The caller checks what may move instead, as
    ``HPAOptimizer``'s fingerprint does (the plans hold detached views of the weights, so the
    weights themselves are the caller's to check too).

    Args:
        batches: from :func:`plan_online_batches`.
        grad_scale, found_inf: the AMP ``GradScaler`` tensors, or ``None``.
    """
    for batch in batches:
        grads = [_grad(weight, dtype) for weight, dtype in zip(batch.weights, batch.working_dtypes)]
        hyper = adamw_hyperparameters(batch.group)
        batch.plan.step(grads, **hyper, grad_scale=grad_scale, found_inf=found_inf, check=False)
        for weight, working in batch.masters:
            weight.copy_(working)  # master weights: the parameter is the rounding


def _grad(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight``'s gradient in the working tensor's dtype (fp32 under master weights)."""
    grad = weight.grad
    return grad if grad.dtype == dtype else grad.to(dtype)


def refresh_mask(
    state: Mapping[str, Tensor], prev: Tensor, working: Tensor, retain_ratio: float, *, orthogonal: bool, backend: str
) -> None:
    """A new retained-column mask for one managed weight, in place.

    [decision] Mid-task only the safety statistics exist (the task Hessian is collected after the
    task), so the refresh retains the top ``floor(p_l·c + 0.5)`` columns by
    ε̄_j = (E_j / r) / hinv_s[j] (HPA_SPEC.md Step 1 with E_j, the energy of the attempted
    (unconstrained) updates of column j since the last refresh, for the update's squared column
    norm: :func:`hpa_kernels.functional.column_scores_from_energy` of the fp32 accumulator, the
    offline scores' arithmetic); E is then reset. Newly retained columns return to W_prev at once
    and ΔW is re-projected over the free columns (coefficient in fp64), so the module's invariants
    hold from here on, not only after the next step; the lagged projection's pending coefficient
    ``hpa_online_coef`` is then 0.

    Args:
        state: the weight's optimizer state (``hpa_mask`` bool (c,), ``hpa_col_energy`` fp32 (c,),
            ``hpa_hinv_safety`` fp32 (c,), ``hpa_online_coef`` fp32 0-d); the mask, energies and
            coefficient are updated in place.
        prev: (r, c) W_prev in ``working``'s dtype.
        working: (r, c) the tensor steps update; rewritten in place.
        retain_ratio: p_l.
        orthogonal: re-project the free part of ΔW (HPA_SPEC.md Step 3).
        backend: kernels backend name.
    """
    rows, columns = working.shape
    eps_bar = column_scores_from_energy(state["hpa_col_energy"], rows, state["hpa_hinv_safety"])
    mask = torch.zeros(columns, dtype=torch.bool, device=eps_bar.device)
    mask[top_columns(eps_bar, count_columns(retain_ratio, columns))] = True
    state["hpa_mask"].copy_(mask)
    state["hpa_col_energy"].zero_()
    state["hpa_online_coef"].zero_()
    free_prev = prev.double()[:, ~mask]
    norm_sq = float(free_prev.square().sum())
    dot = float(((working.double()[:, ~mask] - free_prev) * free_prev).sum())
    coef = projection_coef(dot, norm_sq) if orthogonal else 0.0
    working.copy_(ops.hpa_apply(prev, working, mask, coef, backend=backend))
