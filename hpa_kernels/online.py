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
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import ops
from .config import HPAConfig
from .functional import column_scores_from_energy, count_columns, projection_coef, top_columns
from .optim_state import adamw_hyperparameters


def online_layers_step(
    layers: Sequence[tuple[Tensor, Tensor, MutableMapping[str, Tensor], Tensor]],
    group: Mapping[str, Any],
    *,
    config: HPAConfig,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
) -> None:
    """One online step of managed weights of one param group and device, in place, in one
    :func:`hpa_kernels.ops.online_steps` call (each weight's result that of its own
    :func:`hpa_kernels.ops.online_step`): AdamW, the retained columns back to W_prev, ΔW made
    orthogonal to W_prev (exact), or the previous step's component removed and the next one
    stored in ``state["hpa_online_coef"]`` (lagged), and the attempted update's column energies
    accumulated into ``state["hpa_col_energy"]``.

    Args:
        layers: per weight ``(working, grad, state, prev)``: the (r, c) tensor the step updates
            (the fp32 master copy, or the weight), its gradient in ``working``'s dtype, the
            weight's optimizer state (``exp_avg``, ``exp_avg_sq``, ``step``, ``hpa_mask``,
            ``hpa_col_energy``, ``hpa_online_coef``: fp32 0-d, c_prev of the lagged projection)
            and W_prev in ``working``'s dtype.
        group: the weights' param group (``lr``, ``betas``, ``eps``, ``weight_decay``, ``maximize``).
        config: ``orthogonal`` (HPA_SPEC.md Step 3) and ``online_projection``.
        grad_scale, found_inf: the AMP ``GradScaler`` tensors, or ``None``.
        backend: kernels backend name (``"auto"`` allowed).
    """
    if not layers:
        return
    tensors = [
        ops.OnlineTensors(
            working,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            prev,
            state["hpa_mask"],
            state["hpa_col_energy"],
        )
        for working, grad, state, prev in layers
    ]
    coefs = [state["hpa_online_coef"] for _, _, state, _ in layers]
    projections = [ops.OnlineProjection(config.orthogonal, config.online_projection, coef) for coef in coefs]
    next_coefs = ops.online_steps(
        tensors,
        **adamw_hyperparameters(group),
        grad_scale=grad_scale,
        found_inf=found_inf,
        projections=projections,
        backend=backend,
    )
    if projections[0].lagged:
        torch._foreach_copy_(coefs, list(next_coefs.unbind()))


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
