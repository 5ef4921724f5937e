"""LoX: Low-Rank Extrapolation of the safety alignment, once, before the first task.

Paper: Gabriel J. Perin, Runjin Chen, Xuxi Chen, Nina S. T. Hirata, Zhangyang Wang, Junyuan Hong,
"LoX: Low-Rank Extrapolation Robustifies LLM Safety Against Fine-tuning", COLM 2025,
arXiv:2506.15606. Official code: github.com/VITA-Group/LoX, ``safety/LoX.py`` (the rule),
``safety/effective_rank.py`` (the choice of k), ``safety/R_metrics.py`` (R_align).

Rule, for every weight matrix W (r, c), with the alignment update and its thin SVD

    ΔW_align = W_aligned − W_base = U S Vᵀ,
    Proj_k(ΔW_align) = U_{:k} U_{:k}ᵀ ΔW_align = U_{:k} S_{:k} V_{:k}ᵀ  (its rank-k truncation),
    W_LoX = W_aligned + α · Proj_k(ΔW_align).

The column space of U_{:k} is the paper's *safety subspace*; moving further along it than the
alignment did puts the model in a flatter region of the safety landscape, so that later
fine-tuning erodes less of it. LoX is training-free and applied once, on the aligned model; the
tasks are then tuned from W_LoX. The paper's retention measure of that subspace,

    R_align = ‖Proj_k(ΔW_align)‖_F / ‖ΔW_align‖_F = sqrt(Σ_{i≤k} s_i² / Σ_i s_i²),

is reported per run (mean and minimum over the layers) in :meth:`LoX.describe`.

Defaults: k = 6, α = 1.25, the setting reported for the paper's LLaMA-2-7B aligned by DPO on
HH-RLHF (65.6k samples in the guide below). [source] The paper's body was not readable here (only its abstract and
summaries were); the values are as a public replication guide of the paper quotes them
(andrewtran117/Lox-II, ``Replicate_LoX_Study.md``: ``LoX.py --k 6 --coef 1.25``, "effective rank
from paper"). The official script's own command-line defaults are k = 0 (extrapolate the full
ΔW_align) and α = 1.

Decisions where our protocol differs from the paper's:

* [decision] k. The paper takes k as the *effective rank* of safety: the smallest k at which the
  low-rank alignment W_base + Proj_k(ΔW_align) is already as safe (attack success rate on AdvBench
  prompts, judged by gpt-4o-mini in the official script) as the aligned model (``effective_rank.py`` sweeps k ∈ {8, 6, 4, 3,
  2, 1, 0}). That search is not run here: it needs answers to harmful prompts generated and judged
  for each k, beyond the calibration budget every method shares (8 safety pairs), and the held-out
  evaluation prompts may not choose a method's settings. We keep the paper's k = 6 for the 135M
  model: the safety update's rank is set by the alignment data (our stage 0 teaches refusals drawn
  from 8 fixed sentences, with self-distilled benign answers: a narrower target than HH-RLHF), not
  by the width, and k = 6 already
  covers a larger share of each SmolLM2 matrix (6 of min(r, c) ≥ 192 directions) than of a 7B
  one's (6 of 4096). R_align in ``results.json`` shows how much of each ΔW_align that is.
* [decision] α = 1.25, the paper's: the extrapolation adds 1.25 × the top-k alignment update,
  whatever the model size (it is relative to ΔW_align, which is already scaled to this model).
* [decision] Layers: the managed layers (q, k, v, o, gate, up, down of the 30 decoder blocks), the
  layers whose base weights the runner keeps (:attr:`RunContext.base_weights`). The official script
  extrapolates every 2-D tensor of the state dict, embeddings and LM head included; SmolLM2's
  embedding is tied to its head and is left as aligned, as are norms and biases (1-D, left as
  aligned by the official script too).
* [decision] The SVD is computed in float32 (the official script casts the bf16 difference to
  float32) with ``torch.linalg.svd``, exact, on the weight's device; k ≥ min(r, c) extrapolates the
  whole ΔW_align without an SVD.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ... import HPAConfig
from .base import Method, RunContext

RANK = 6
"""k: the paper's effective rank for its LLaMA-2-7B (see the module doc)."""
ALPHA = 1.25
"""α: the paper's extrapolation factor."""


@torch.no_grad()
def low_rank_extrapolation(w_aligned: Tensor, w_base: Tensor, rank: int, alpha: float) -> tuple[Tensor, float]:
    """W_LoX = W_aligned + α · Proj_k(W_aligned − W_base) (Perin et al. 2025, LoX; official
    ``safety/LoX.py``), and the paper's R_align of that subspace.

    Args:
        w_aligned: (r, c) the aligned weight, any float dtype.
        w_base: (r, c) the same weight before alignment (moved to ``w_aligned``'s device).
        rank: k ≥ 1, the number of top singular directions of ΔW_align extrapolated;
            k ≥ min(r, c) extrapolates the whole ΔW_align.
        alpha: α, the extrapolation factor (finite).

    Returns:
        ``(w_lox, r_align)``: W_LoX, a new (r, c) float32 tensor on ``w_aligned``'s device, and
        R_align = ‖Proj_k(ΔW_align)‖_F / ‖ΔW_align‖_F in [0, 1] (1.0 when ΔW_align = 0, which lies
        in every subspace).

    Raises:
        ValueError: the weights are not 2-D or differ in shape, k < 1, or α is not finite.
    """
    if w_aligned.dim() != 2 or w_aligned.shape != w_base.shape:
        raise ValueError(
            f"LoX needs two 2-D weights of one shape, got {tuple(w_aligned.shape)} and {tuple(w_base.shape)}"
        )
    if rank < 1:
        raise ValueError(f"LoX rank k must be >= 1, got {rank}")
    if not math.isfinite(alpha):
        raise ValueError(f"LoX alpha must be finite, got {alpha}")
    aligned = w_aligned.float()
    delta = aligned - w_base.to(device=aligned.device, dtype=torch.float32)
    if rank >= min(delta.shape):
        return aligned + alpha * delta, 1.0
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    energy = s.square().sum()
    r_align = 1.0 if energy == 0 else min(1.0, math.sqrt(float(s[:rank].square().sum() / energy)))
    return aligned + alpha * ((u[:, :rank] * s[:rank]) @ vh[:rank]), r_align


class LoX(Method):
    """LoX (:func:`low_rank_extrapolation`) on every managed layer of the aligned model, once in
    :meth:`before_tasks`; the tasks are then SeqFT (no HPA edit).

    Args:
        hpa: the run's :class:`~hpa_kernels.HPAConfig` (its layer selection and calibration sizes);
            HPA's edit is disabled.
        rank: k (default :data:`RANK`).
        alpha: α (default :data:`ALPHA`).

    Raises:
        ValueError: k < 1 or α not finite.
    """

    needs_base_weights = True

    def __init__(self, hpa: HPAConfig | None = None, rank: int = RANK, alpha: float = ALPHA) -> None:
        if rank < 1:
            raise ValueError(f"LoX rank k must be >= 1, got {rank}")
        if not math.isfinite(alpha):
            raise ValueError(f"LoX alpha must be finite, got {alpha}")
        super().__init__("lox", replace(hpa or HPAConfig(), enabled=False))
        self.rank = rank
        self.alpha = alpha
        self.r_align: dict[str, float] = {}

    def describe(self) -> dict:
        """k, α, and R_align over the extrapolated layers (mean, min) once :meth:`before_tasks` ran."""
        settings: dict = {"rank": self.rank, "alpha": self.alpha}
        if self.r_align:
            values = list(self.r_align.values())
            settings["r_align"] = {"mean": sum(values) / len(values), "min": min(values), "layers": len(values)}
        return settings

    @torch.no_grad()
    def before_tasks(self, run: RunContext) -> None:
        """W ← W_LoX in place for every layer of ``run.layers``.

        Raises:
            ValueError: ``run.base_weights`` is ``None`` or lacks a managed layer.
        """
        if run.base_weights is None:
            raise ValueError("LoX needs the base model's weights (RunContext.base_weights is None)")
        missing = [name for name in run.layers if name not in run.base_weights]
        if missing:
            raise ValueError(f"LoX: no base weight for {len(missing)} managed layer(s), e.g. {missing[0]!r}")
        self.r_align = {}
        for name, layer in run.layers.items():
            weight = layer.module.weight
            w_lox, self.r_align[name] = low_rank_extrapolation(weight, run.base_weights[name], self.rank, self.alpha)
            weight.copy_(w_lox.to(weight.dtype))
