"""Typed configuration of HPA (every knob of HPA_SPEC.md, with the paper's defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SELECTION_MODES = ("balanced", "safety_only", "balance_only")
ONLINE_PROJECTIONS = ("exact", "lagged")


@dataclass(frozen=True)
class HPAConfig:
    """Every HPA knob, with the defaults of HPA_SPEC.md § Defaults.

    Attributes:
        enabled: apply the end-of-task edit at all. ``False`` gives plain sequential
            fine-tuning (SeqFT) with the same optimizer.
        p_max, p_min: retain ratio of the first and the last block (HPA_SPEC.md Step 2,
            ``retention_schedule``). ``0 <= p_min <= p_max <= 0.5``.
        focus_multiplier: the focus size k is ``focus_multiplier * p_l`` of the columns
            (Step 1; the paper's k = 2·p_l).
        alpha_bounds: ``(α0, α1)`` bounds of the adaptive balance weight α_l (Step 2.3).
        damping: relative damping λ / mean(diag H) of the calibration Hessians (Step 0).
        orthogonal: apply Step 3's orthogonal adjustment (``False`` is the paper's
            "without orthogonal" ablation).
        selection: ``"balanced"`` (Step 2 in full), ``"safety_only"`` (retain only
            S \\ O, capped to the budget) or ``"balance_only"`` (retain only from O by φ):
            the paper's ablations.
        extra_layers: exact names (as in ``model.named_modules()``) of linear layers
            (``nn.Linear``, ``Conv1D``) that HPA should manage too; outside the repeated
            blocks they take the retain ratio ``p_max`` [decision: outside the block stack
            there is no depth, and the conservative ratio is the larger one].
        include: ``fnmatch`` patterns (``*`` also crosses dots) of ``named_modules()`` names:
            the linear layers they match are managed on request, beyond the default scope
            (the vision tower's blocks, with their own depth schedule: ``"*vision_tower*"``;
            the projector; the heads; frozen layers). Each pattern must match a linear layer.
        exclude: ``fnmatch`` patterns of layers never managed; they win over the default
            scope, ``include`` and ``extra_layers`` (``"*.mlp.*"``: attention only).
            See :mod:`hpa_kernels.layers` for the whole rule.
        online: apply the current column mask and the orthogonal constraint inside
            every training step (:func:`hpa_kernels.ops.online_step`).
        online_projection: with ``online`` and ``orthogonal``, how each step applies Step 3's
            projection (:class:`hpa_kernels.ops.OnlineProjection`): ``"exact"`` removes the step's
            own component c'·W_prev in a second pass, so ΔW ⟂ W_prev after every step;
            ``"lagged"`` applies the previous step's coefficient in the AdamW pass itself (one
            pass over the weights) and leaves the component c_next·W_prev to the next step
            (``end_task``'s edit re-projects exactly).
        refresh_every: with ``online``, recompute the column mask every this many steps
            (0: keep the mask of the task's start, which retains nothing).
        safety_samples, task_samples: calibration set sizes the runners use (8, 128).

    Raises:
        ValueError: on any value outside its range, at construction.
    """

    enabled: bool = True
    p_max: float = 0.15
    p_min: float = 0.05
    focus_multiplier: float = 2.0
    alpha_bounds: tuple[float, float] = (0.4, 0.8)
    damping: float = 0.01
    orthogonal: bool = True
    selection: str = "balanced"
    extra_layers: tuple[str, ...] = field(default_factory=tuple)
    include: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    online: bool = False
    online_projection: str = "exact"
    refresh_every: int = 0
    safety_samples: int = 8
    task_samples: int = 128

    def __post_init__(self) -> None:
        for name in ("p_max", "p_min", "focus_multiplier", "damping"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"HPAConfig.{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.p_min <= self.p_max <= 0.5:
            raise ValueError(f"HPAConfig needs 0 <= p_min <= p_max <= 0.5, got p_min={self.p_min}, p_max={self.p_max}")
        if not 1.0 <= self.focus_multiplier:
            raise ValueError(f"HPAConfig.focus_multiplier must be >= 1, got {self.focus_multiplier}")
        if self.p_max * self.focus_multiplier > 1.0:
            raise ValueError(
                f"HPAConfig: focus size p_max * focus_multiplier = {self.p_max * self.focus_multiplier} exceeds 1"
            )
        a0, a1 = self.alpha_bounds
        if not (math.isfinite(a0) and math.isfinite(a1) and 0.0 <= a0 <= a1):
            raise ValueError(f"HPAConfig.alpha_bounds must satisfy 0 <= a0 <= a1, got {self.alpha_bounds}")
        object.__setattr__(self, "alpha_bounds", (float(a0), float(a1)))
        if self.damping <= 0.0:
            raise ValueError(f"HPAConfig.damping must be > 0, got {self.damping}")
        if self.selection not in SELECTION_MODES:
            raise ValueError(f"HPAConfig.selection must be one of {SELECTION_MODES}, got {self.selection!r}")
        for name in ("extra_layers", "include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"HPAConfig.{name} must be a sequence of module names or patterns, not one string")
            value = tuple(value)
            if not all(isinstance(item, str) and item for item in value):
                raise ValueError(f"HPAConfig.{name} must hold non-empty strings, got {value!r}")
            object.__setattr__(self, name, value)
        if self.online_projection not in ONLINE_PROJECTIONS:
            raise ValueError(
                f"HPAConfig.online_projection must be one of {ONLINE_PROJECTIONS}, got {self.online_projection!r}"
            )
        if not isinstance(self.refresh_every, int) or self.refresh_every < 0:
            raise ValueError(f"HPAConfig.refresh_every must be an int >= 0, got {self.refresh_every!r}")
        for name in ("safety_samples", "task_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"HPAConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
