"""HPA as pure functions on tensors, one per step of HPA_SPEC.md.

Read this module beside ``HPA_SPEC.md``: each function names the step it implements.
The heavy passes over the weight matrices go through :mod:`hpa_kernels.ops` (``backend``
argument); everything else is small vector work in plain PyTorch.

Counting and ties (HPA_SPEC.md Step 2, "Counting and ties"), so that every backend and every
rank selects the same columns:

* a fraction ``f`` of ``c`` columns is ``floor(f·c + 0.5)`` columns (:func:`count_columns`);
* every "top" ranking orders by score, largest first, ties broken by the lower column index
  (:func:`top_columns`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from . import ops
from .config import SELECTION_MODES, HPAConfig

__all__ = [
    "LayerPlan",
    "LayerReport",
    "LayerUpdate",
    "balance_alpha",
    "column_scores",
    "column_scores_from_energy",
    "count_columns",
    "hinv_diagonal",
    "hpa_layer_update",
    "partition_columns",
    "plan_from_scores",
    "plan_layer_update",
    "projection_coef",
    "retention_schedule",
    "select_columns",
    "top_columns",
]


def retention_schedule(num_blocks: int, p_max: float = 0.15, p_min: float = 0.05) -> list[float]:
    """Retain ratio p_l of each block l = 0 … L−1 (HPA_SPEC.md Step 2, inter-layer balance).

    ``p_l = p_max − (l / (L − 1))·(p_max − p_min)``: ``p_max`` at the input side, ``p_min`` at
    the output side, endpoints exact [decision]; ``L = 1`` gives ``[p_max]``.

    Raises:
        ValueError: ``num_blocks < 1``, or not ``0 <= p_min <= p_max <= 1``.
    """
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"retention_schedule needs num_blocks >= 1, got {num_blocks!r}")
    if not 0.0 <= p_min <= p_max <= 1.0:
        raise ValueError(f"retention_schedule needs 0 <= p_min <= p_max <= 1, got p_min={p_min}, p_max={p_max}")
    if num_blocks == 1:
        return [float(p_max)]
    last = num_blocks - 1
    # [decision: endpoints exact] the last block gets p_min itself, not p_max - (p_max - p_min).
    return [
        float(p_max) if block == 0 else float(p_min) if block == last else p_max - (block / last) * (p_max - p_min)
        for block in range(num_blocks)
    ]


def hinv_diagonal(H: Tensor, damping: float = 0.01) -> Tensor:
    """diag((H + λI)⁻¹) with λ = damping · mean(diag H) (HPA_SPEC.md Step 0).

    Computed in float64 through a Cholesky factor ``H + λI = L Lᵀ``: ``diag(H⁻¹)_j = Σᵢ (L⁻¹)ᵢⱼ²``,
    never an explicit inverse of H. [decision: SparseGPT-style damping]. If the factorisation
    fails (H is not positive semi-definite to working precision), λ is multiplied by 10, up to
    five times, before giving up.

    Args:
        H: (c, c) symmetric positive semi-definite matrix, any float dtype.
        damping: relative damping, > 0.

    Returns:
        (c,) float32, every entry finite and > 0.

    Raises:
        ValueError: H not square, non-finite, all-zero diagonal (the layer saw no signal), not
            factorable even with 10⁵× the damping, a damping that is not a finite positive number,
            or an H so small that diag(H⁻¹) overflows float32 (inputs of magnitude ≲ 1e-19).
    """
    chol, eye, mean_diag = damped_cholesky(H, damping, "hinv_diagonal")
    if H.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=H.device)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    hinv = chol_inv.square().sum(dim=0).float()
    if not bool(torch.isfinite(hinv).all() and (hinv > 0).all()):
        raise ValueError(
            f"hinv_diagonal: diag(H⁻¹) is not representable in float32 (mean(diag H) = {mean_diag:.3g}); "
            "rescale the calibration inputs"
        )
    return hinv


def damped_cholesky(H: Tensor, damping: float, caller: str, *, flip: bool = False) -> tuple[Tensor, Tensor, float]:
    """The lower Cholesky factor L of H' + λI, λ = damping · mean(diag H), in float64, where H' is H
    or, with ``flip``, H with rows and columns reversed (λ from H either way). If the factorisation
    fails, λ is multiplied by 10, up to five times (the damping of :func:`hinv_diagonal`).

    Args:
        H: (c, c) symmetric positive semi-definite, any float dtype.
        damping: relative damping, a finite number > 0.
        caller: the name the errors start with.

    Returns:
        ``(L, I, mean(diag H))``: (c, c) float64 on ``H``'s device and the (c, c) identity; for
        c = 0 two empty matrices and 0.0.

    Raises:
        ValueError: H not square, non-finite, with mean(diag H) ≤ 0 (the layer saw no signal), not
            factorable with 10⁵× the damping, or a damping that is not a finite positive number.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{caller} needs a square (c, c) matrix, got shape {tuple(H.shape)}")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise ValueError(f"{caller} needs a finite damping > 0, got {damping!r}")
    c = H.shape[0]
    h = H.double()
    eye = torch.eye(c, dtype=torch.float64, device=H.device)
    if c == 0:
        return h.clone(), eye, 0.0
    if not torch.isfinite(h).all():
        raise ValueError(f"{caller}: H holds NaN or Inf")
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        raise ValueError(f"{caller}: mean(diag H) is not positive; the layer saw no non-zero input")
    factored = h.flip(0, 1) if flip else h
    lam = damping * mean_diag
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(factored + lam * eye)
        if int(info) == 0:
            return chol, eye, mean_diag
        lam *= 10.0
    raise ValueError(f"{caller}: H + λI is not positive definite even with 10⁵× the damping")


def column_scores_from_energy(col_energy: Tensor, rows: int, hinv: Tensor) -> Tensor:
    """Column means of the OBS saliencies from the column energies (HPA_SPEC.md Step 1)::

        score[j] = fl32((col_energy[j] / rows) / hinv[j])

    ε̄ with ``hinv = hinv_safety``, ζ̄ with ``hinv = hinv_task``; col_energy[j] = Σᵢ ΔWᵢⱼ² stands for
    r · mean_i ΔWᵢⱼ². Every column score of the package is this function: the offline edit (from
    :func:`hpa_kernels.ops.hpa_reduce`), sharded weights (from the all-reduced energies of the row
    shards, :func:`hpa_kernels.distributed.plan_sharded_layers`) and the online mask refresh (from
    the accumulator of :func:`hpa_kernels.ops.online_step`, :func:`hpa_kernels.online.refresh_mask`).

    In float64 on ``col_energy``'s device, both operands widened exactly, each division one IEEE
    operation (a tensor divisor: a Python-number divisor is a multiplication by its reciprocal on
    CUDA), rounded once to float32: the same bits on every device for the same inputs.

    Args:
        col_energy: (c,) column energies, float64 (``ops.hpa_reduce``, all-reduced shard sums) or
            float32 (the online accumulator ``hpa_col_energy``).
        rows: r, the number of rows the energies sum over (the layer's out_features); 0 leaves
            the energies undivided (they are 0).
        hinv: (c,) positive diagonal of the damped inverse Hessian (:func:`hinv_diagonal`).

    Returns:
        (c,) float32 scores.

    Raises:
        ValueError: ``col_energy`` not 1-D, or ``hinv`` of another shape.
    """
    if col_energy.dim() != 1 or hinv.shape != col_energy.shape:
        raise ValueError(
            f"col_energy and hinv must be (c,) vectors of one shape, got {tuple(col_energy.shape)} "
            f"and {tuple(hinv.shape)}"
        )
    energy = col_energy.double()
    if rows > 0:
        energy = energy / energy.new_full((), rows)
    return (energy / hinv.to(energy)).float()


def column_scores(
    w_prev: Tensor, w_new: Tensor, hinv_safety: Tensor, hinv_task: Tensor, *, backend: str = "torch"
) -> tuple[Tensor, Tensor]:
    """Column means of the OBS saliencies of the update (HPA_SPEC.md Step 1).

    ``ε̄_j = mean_i ΔWᵢⱼ² / hinv_safety[j]``, ``ζ̄_j = mean_i ΔWᵢⱼ² / hinv_task[j]``, ΔW = W_new − W_prev:
    :func:`column_scores_from_energy` of the column energies of :func:`hpa_kernels.ops.hpa_reduce`.

    Args:
        w_prev, w_new: (r, c) weights, same dtype.
        hinv_safety, hinv_task: (c,) positive.

    Returns:
        ``(eps_bar, zeta_bar)``, each (c,) float32.
    """
    col_energy, _, _ = ops.hpa_reduce(w_prev, w_new, backend=backend)
    eps_bar = column_scores_from_energy(col_energy, w_new.shape[0], hinv_safety)
    zeta_bar = column_scores_from_energy(col_energy, w_new.shape[0], hinv_task)
    return eps_bar, zeta_bar


def projection_coef(dot: float | Tensor, norm_sq: float | Tensor) -> float:
    """c_l = ⟨ΔW, W_prev⟩_F / ‖W_prev‖_F², and 0 when ‖W_prev‖ = 0 (HPA_SPEC.md Step 3)."""
    norm_sq = float(norm_sq)
    return float(dot) / norm_sq if norm_sq > 0.0 else 0.0


def count_columns(fraction: float, num_columns: int) -> int:
    """``floor(fraction·c + 0.5)``, capped to ``[0, c]`` (HPA_SPEC.md Step 2, counting)."""
    return max(0, min(num_columns, math.floor(fraction * num_columns + 0.5)))


def top_columns(scores: Tensor, k: int, candidates: Tensor | None = None) -> Tensor:
    """Indices of the ``k`` largest ``scores``, largest first, ties to the lower index.

    Args:
        scores: (c,) float.
        k: how many (capped to the number of candidates).
        candidates: optional (c,) bool; only these columns compete.

    Returns:
        (min(k, n),) int64 column indices, in rank order.
    """
    index = torch.arange(scores.numel(), device=scores.device)
    if candidates is not None:
        index = index[candidates]
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    order = torch.sort(scores.double()[index], descending=True, stable=True).indices
    return index[order[: max(0, k)]]


def partition_columns(eps_bar: Tensor, zeta_bar: Tensor, focus_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Focusing-based partition (HPA_SPEC.md Step 1): S, T and O = S ∩ T as (c,) bool masks.

    S is the top ``focus_ratio`` of columns by ε̄ (safety-focused), T by ζ̄ (task-focused).
    """
    c = eps_bar.numel()
    k = count_columns(focus_ratio, c)
    safety = torch.zeros(c, dtype=torch.bool, device=eps_bar.device)
    task = torch.zeros_like(safety)
    safety[top_columns(eps_bar, k)] = True
    task[top_columns(zeta_bar, k)] = True
    return safety, task, safety & task


def balance_alpha(eps_bar: Tensor, zeta_bar: Tensor, alpha_bounds: tuple[float, float] = (0.4, 0.8)) -> float:
    """Adaptive balance weight α_l (HPA_SPEC.md Step 2.3).

    ``μ = mean_j log(ε̄_j / ζ̄_j)`` over columns with a non-zero update;
    ``α = α0 + (α1 − α0)·(1 + tanh μ)/2`` [decision]; every column zero → ``(α0 + α1)/2``.
    """
    a0, a1 = alpha_bounds
    live = (eps_bar > 0) & (zeta_bar > 0)
    if not bool(live.any()):
        return (a0 + a1) / 2.0
    mu = float(torch.log(eps_bar.double()[live] / zeta_bar.double()[live]).mean())
    return a0 + (a1 - a0) * (1.0 + math.tanh(mu)) / 2.0


@dataclass(frozen=True)
class Selection:
    """Step 2's outcome for one layer: the retained-column mask and how it was reached."""

    mask: Tensor
    alpha: float
    num_safety: int
    num_task: int
    num_shared: int


def _select(
    eps_bar: Tensor,
    zeta_bar: Tensor,
    retain_ratio: float,
    alpha_bounds: tuple[float, float],
    focus_multiplier: float,
    mode: str,
) -> Selection:
    if mode not in SELECTION_MODES:
        raise ValueError(f"selection mode must be one of {SELECTION_MODES}, got {mode!r}")
    if eps_bar.shape != zeta_bar.shape or eps_bar.dim() != 1:
        raise ValueError(
            f"eps_bar and zeta_bar must be (c,) vectors of one shape, got {tuple(eps_bar.shape)} "
            f"and {tuple(zeta_bar.shape)}"
        )
    if not (torch.isfinite(eps_bar).all() and torch.isfinite(zeta_bar).all()):
        raise ValueError("column scores hold NaN or Inf")
    c = eps_bar.numel()
    budget = count_columns(retain_ratio, c)
    safety, task, shared = partition_columns(eps_bar, zeta_bar, focus_multiplier * retain_ratio)
    alpha = balance_alpha(eps_bar, zeta_bar, alpha_bounds)
    mask = torch.zeros(c, dtype=torch.bool, device=eps_bar.device)
    if mode in ("balanced", "safety_only"):
        # Step 2.1: R = S \ O; if |R| > B keep the B with the largest ε̄ [decision].
        mask[top_columns(eps_bar, budget, safety & ~shared)] = True
    if mode in ("balanced", "balance_only"):
        # Step 2.2: fill the remaining slots from O by φ = ε̄ − α·ζ̄, largest first.
        phi = eps_bar.double() - alpha * zeta_bar.double()
        mask[top_columns(phi, budget - int(mask.sum()), shared)] = True
    return Selection(mask, alpha, int(safety.sum()), int(task.sum()), int(shared.sum()))


def select_columns(
    eps_bar: Tensor,
    zeta_bar: Tensor,
    retain_ratio: float,
    *,
    alpha_bounds: tuple[float, float] = (0.4, 0.8),
    focus_multiplier: float = 2.0,
    mode: str = "balanced",
) -> tuple[Tensor, float]:
    """Harmoniously balanced selection (HPA_SPEC.md Steps 1–2): which input columns to retain.

    Args:
        eps_bar, zeta_bar: (c,) finite, non-negative column scores (:func:`column_scores`).
        retain_ratio: p_l; the budget is ``B = floor(p_l·c + 0.5)`` columns.
        alpha_bounds: (α0, α1).
        focus_multiplier: focus size k = focus_multiplier · p_l.
        mode: ``"balanced"`` (the paper), ``"safety_only"`` (only S \\ O) or ``"balance_only"``
            (only O by φ): the paper's ablations.

    Returns:
        ``(mask, alpha)``: (c,) bool, True for retained columns (at most B of them), and α_l.

    Raises:
        ValueError: mismatched shapes, non-finite scores or an unknown mode.
    """
    selection = _select(eps_bar, zeta_bar, retain_ratio, alpha_bounds, focus_multiplier, mode)
    return selection.mask, selection.alpha


@dataclass(frozen=True)
class LayerReport:
    """What the edit did to one layer (HPA_SPEC.md Steps 1–3), as ``end_task`` and
    ``adjust_checkpoint`` return it.

    Attributes:
        retain_ratio: p_l.
        alpha: α_l.
        num_safety, num_task, num_shared: |S|, |T|, |O| (columns).
        num_retained: columns reverted to W_prev (at most ``floor(p_l·c + 0.5)``).
        num_columns: c, the layer's in_features.
        coef: c_l, the projection scalar removed along W_prev.
    """

    retain_ratio: float
    alpha: float
    num_safety: int
    num_task: int
    num_shared: int
    num_retained: int
    num_columns: int
    coef: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class LayerPlan:
    """Steps 1–2 and Step 3's scalar for one layer: everything of the edit but the write.

    Attributes:
        mask: (c,) bool, retained columns.
        alpha: α_l.
        coef: c_l, the projection scalar (0.0 with ``orthogonal=False``).
        num_safety, num_task, num_shared: |S|, |T|, |O|.
    """

    mask: Tensor
    alpha: float
    coef: float
    num_safety: int
    num_task: int
    num_shared: int

    @property
    def num_retained(self) -> int:
        return int(self.mask.sum())

    def report(self, retain_ratio: float) -> LayerReport:
        """The :class:`LayerReport` of this plan, written with retain ratio p_l = ``retain_ratio``."""
        return LayerReport(
            retain_ratio=retain_ratio,
            alpha=self.alpha,
            num_safety=self.num_safety,
            num_task=self.num_task,
            num_shared=self.num_shared,
            num_retained=self.num_retained,
            num_columns=self.mask.numel(),
            coef=self.coef,
        )


@dataclass(frozen=True)
class LayerUpdate(LayerPlan):
    """Result of :func:`hpa_layer_update`: a :class:`LayerPlan` plus ``weight``, the (r, c) Ŵ
    in the dtype of ``w_new``."""

    weight: Tensor


_CONFIG_KEYWORDS = {
    "alpha_bounds": "alpha_bounds",
    "focus_multiplier": "focus_multiplier",
    "orthogonal": "orthogonal",
    "mode": "selection",
}


def resolve_config(config: HPAConfig | None, loose: Mapping[str, Any], caller: str) -> HPAConfig:
    """``config`` (default :class:`HPAConfig`), updated with the loose keyword arguments that
    ``caller`` took before it took a config: ``alpha_bounds``, ``focus_multiplier``,
    ``orthogonal`` and ``mode`` (``HPAConfig.selection``), each with a ``DeprecationWarning``.

    Raises:
        TypeError: an unknown keyword argument.
        ValueError: a value :class:`HPAConfig` rejects.
    """
    config = HPAConfig() if config is None else config
    if not loose:
        return config
    unknown = sorted(set(loose) - set(_CONFIG_KEYWORDS))
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    warnings.warn(
        f"{caller}({', '.join(f'{k}=' for k in loose)}) is deprecated: pass config=HPAConfig(...) "
        "(these keywords are removed in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    return replace(config, **{_CONFIG_KEYWORDS[k]: v for k, v in loose.items()})


def _check_layer_inputs(w_prev: Tensor, w_new: Tensor, hinv_safety: Tensor, hinv_task: Tensor) -> None:
    if w_prev.dim() != 2 or w_prev.shape != w_new.shape:
        raise ValueError(
            f"w_prev and w_new must be (r, c) of one shape, got {tuple(w_prev.shape)} and {tuple(w_new.shape)}"
        )
    if w_prev.dtype != w_new.dtype:
        raise ValueError(f"w_prev and w_new must share a dtype, got {w_prev.dtype} and {w_new.dtype}")
    c = w_new.shape[1]
    for name, vec in (("hinv_safety", hinv_safety), ("hinv_task", hinv_task)):
        if vec.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(vec.shape)}")
        if not (torch.isfinite(vec).all() and (vec > 0).all()):
            raise ValueError(f"{name} must be finite and > 0")
    # NaN / Inf in the weights is caught on the reduce's outputs (c + 2 numbers), not by extra
    # full passes over both matrices: see plan_layer_update.


def plan_layer_update(
    w_prev: Tensor,
    w_new: Tensor,
    hinv_safety: Tensor,
    hinv_task: Tensor,
    retain_ratio: float,
    *,
    config: HPAConfig | None = None,
    backend: str = "torch",
    **deprecated: Any,
) -> LayerPlan:
    """HPA_SPEC.md Steps 1–2 and Step 3's c_l for one layer, without writing any weight.

    One reduce pass over the two matrices (column energies, ⟨ΔW, W_prev⟩, ‖W_prev‖²), the scores ε̄,
    ζ̄ from the energies (:func:`column_scores_from_energy`), then the selection on c-length vectors.
    Arguments and errors as :func:`hpa_layer_update`.
    """
    config = resolve_config(config, deprecated, "plan_layer_update")
    _check_layer_inputs(w_prev, w_new, hinv_safety, hinv_task)
    col_energy, dot, norm_sq = ops.hpa_reduce(w_prev, w_new, backend=backend)
    eps_bar = column_scores_from_energy(col_energy, w_new.shape[0], hinv_safety)
    zeta_bar = column_scores_from_energy(col_energy, w_new.shape[0], hinv_task)
    # A NaN / Inf anywhere in w_prev or w_new reaches ΔW², hence ε̄ and ζ̄ (and the two sums).
    if not bool(torch.isfinite(torch.cat([eps_bar, zeta_bar, dot.reshape(1), norm_sq.reshape(1)])).all()):
        raise ValueError("w_prev or w_new holds NaN or Inf (or values whose squares overflow float32)")
    return plan_from_scores(eps_bar, zeta_bar, dot, norm_sq, retain_ratio, config=config)


def plan_from_scores(
    eps_bar: Tensor,
    zeta_bar: Tensor,
    dot: float | Tensor,
    norm_sq: float | Tensor,
    retain_ratio: float,
    *,
    config: HPAConfig | None = None,
    **deprecated: Any,
) -> LayerPlan:
    """HPA_SPEC.md Steps 1–2 and Step 3's c_l from an already reduced layer (no weight read).

    The second half of :func:`plan_layer_update`, for callers that reduce elsewhere (sharded
    weights: :mod:`hpa_kernels.distributed`; checkpoints: :mod:`hpa_kernels.checkpoint`).

    Args:
        eps_bar, zeta_bar: (c,) float32 column scores ε̄, ζ̄ (:func:`column_scores_from_energy`).
        dot, norm_sq: ⟨ΔW, W_prev⟩_F and ‖W_prev‖_F².
        retain_ratio, config: as :func:`hpa_layer_update`.

    Raises:
        ValueError: mismatched shapes, non-finite scores or an unknown mode.
    """
    config = resolve_config(config, deprecated, "plan_from_scores")
    selection = _select(eps_bar, zeta_bar, retain_ratio, config.alpha_bounds, config.focus_multiplier, config.selection)
    coef = projection_coef(dot, norm_sq) if config.orthogonal else 0.0
    return LayerPlan(
        selection.mask, selection.alpha, coef, selection.num_safety, selection.num_task, selection.num_shared
    )


def hpa_layer_update(
    w_prev: Tensor,
    w_new: Tensor,
    hinv_safety: Tensor,
    hinv_task: Tensor,
    retain_ratio: float,
    *,
    config: HPAConfig | None = None,
    out: Tensor | None = None,
    backend: str = "torch",
    **deprecated: Any,
) -> LayerUpdate:
    """The whole HPA edit of one linear layer (HPA_SPEC.md Steps 1–3).

    :func:`plan_layer_update`, then one write pass ``Ŵ = M ⊙ W_prev + (1 − M) ⊙ (W_new − c_l·W_prev)``.

    Args:
        w_prev, w_new: (r, c) weights before and after the task, same dtype and device.
        hinv_safety, hinv_task: (c,) positive, finite (:func:`hinv_diagonal`).
        retain_ratio: p_l of the layer's block (:func:`retention_schedule`).
        config: the knobs read here: ``alpha_bounds``, ``focus_multiplier``, ``selection`` (see
            :func:`select_columns`) and ``orthogonal`` (Step 3's projection; False: c_l = 0,
            the paper's ablation). Default: :class:`HPAConfig` ().
        out: optional destination (e.g. the parameter itself, for an in-place edit).
        backend: kernels backend for the two passes.

    Returns:
        :class:`LayerUpdate` (``weight``, ``mask``, ``alpha``, ``coef``, |S|, |T|, |O|).

    Raises:
        ValueError: shape or dtype mismatch, non-finite weights or statistics, non-positive hinv.
        TypeError: an unknown keyword argument (the loose ``alpha_bounds``, ``focus_multiplier``,
            ``orthogonal`` and ``mode`` still work, with a ``DeprecationWarning``).
    """
    config = resolve_config(config, deprecated, "hpa_layer_update")
    plan = plan_layer_update(w_prev, w_new, hinv_safety, hinv_task, retain_ratio, config=config, backend=backend)
    weight = ops.hpa_apply(w_prev, w_new, plan.mask, plan.coef, out, backend=backend)
    return LayerUpdate(plan.mask, plan.alpha, plan.coef, plan.num_safety, plan.num_task, plan.num_shared, weight)
