"""Safe Delta: keep the task-update entries of best utility per safety cost under a safety budget,
revert the others to the pre-task weights, and compensate them on the safety data.

Paper: Ning Lu, Shengcai Liu, Jiahao Wu, Weiyu Chen, Zhirui Zhang, Yew-Soon Ong, Qi Wang, Ke Tang,
"Safe Delta: Consistently Preserving Safety when Fine-Tuning LLMs on Diverse Datasets", ICML 2025,
arXiv:2505.12038. Official code: github.com/ColinLu50/SafeDelta, ``llama2/safedelta/safedelta_runner.py``
(``SafeDeltaRunner.adjust_delta``: the rule) and ``llama2/run_safedelta.py`` (the driver, the
defaults). The paper's body was not readable here (its abstract and summaries were); the rule below
is the official code's.

Per linear layer (weights (r, c)), with W_a the aligned weights (here W_prev, the weights before the
task), W_f the fine-tuned ones (W_new), ΔW = W_f − W_a, H the Hessian of the layer's input on the
safety calibration data at W_a, and U the upper Cholesky factor of (H + λI)⁻¹
(:func:`~.obs.hinv_cholesky`; d_j = U_jj, d_j² = [H_{≥j}⁻¹]_jj), in blocks of n ≤ B columns:

* safety cost of keeping entry (i, j):        c_ij = ΔW_ij² / d_j²   (the OBS loss, without its ½);
* utility per cost:                           d_j² (the code ranks by 1/d_j² alone: the ratio
  for a utility ∝ ΔW_ij²), so the entries are ranked column by column, largest d_j² first;
* the last ⌊0.15 · r·n⌋ entries of that ranking are never kept (none when that is 0: the code's
  slice ``[0:-k]`` would then drop every entry of a block of under 7);
* budget:                                      ε = s · (r · n / 4096²) · mean_j(1 / d_j²);
* kept set K: the longest prefix of the ranking with Σ_K c_ij ≤ ε;
* W ← W_a with the entries of K set to W_f, the others compensated by the sequential OBS update
  (:func:`~.obs.obs_update`): W_a's output on the safety data is kept as far as the kept entries allow.

Defaults (the official code's): s = 0.1 (``run_safedelta.py``'s ``scale``; its example scripts use 0.1
on SAMSum and 0.11 on PureBad), B = 2048 columns, the 15 % exclusion, λ = 0.01 · mean(diag H)
(``percdamp``, also ``HPAConfig.damping``'s default, which is used).

Decisions where the code is implicit or our protocol differs:

* [decision] Budget. The code sets ε = mean(1/d²) · (s / 2) · (r / 4096) per block, its comment
  "2 = 4096 / blocksize=2048": the budget of a 4096 × 4096 matrix split over its two blocks. We take
  it per entry, ε = s · (r·n / 4096²) · mean(1/d²), the same for every full 2048-column block of
  LLaMA-2-7B, and for a narrower block (all of SmolLM2's: c ≤ 1536 < 2048, one block per layer) the
  share of its entries. 4096 (LLaMA-2-7B's width, ``reference_size``) is kept as an absolute scale,
  as in the code: the budget is the cost of an update of size √s / 4096 ≈ 7.7·10⁻⁵ on every entry,
  whatever the model's width.
* [decision] Ties. The code's ``argsort`` of 1/d² (per column) leaves the order of the rows within a
  column, and of columns with equal d², to the sort; here columns are ranked by a stable sort (lower
  column first on ties) and the rows of a column top to bottom.
* [decision] Compensation is the exact sequential OBS update; the code updates 4 columns at once
  (``sub_block_size = 4``), so that within such 4 columns the later ones miss the earlier ones'
  compensation.
* [decision] Data. The paper's H comes from 128 self-generated (harmful prompt, refusal) pairs on the
  aligned model, one row per token; here from the run's 8 safety calibration pairs (prompt and answer
  tokens, padding excluded), the budget every method shares, computed in :meth:`SafeDelta.begin_task`
  on the model before the task (W_prev, fresh adapters).
* [decision] Applied after every task, with W_prev as the aligned reference, on every managed layer
  (the code: every linear layer of the decoder blocks of one fine-tuned model).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch
from torch import Tensor

from ... import HPAConfig
from .base import Method, TaskContext
from .obs import edit_layers, group_by_input, obs_update

SCALE = 0.1
"""s: the safety budget scale (the official ``run_safedelta.py`` default)."""
REFERENCE_SIZE = 4096
"""The width the official budget is written for (LLaMA-2-7B's 4096)."""
BLOCK_SIZE = 2048
"""B: columns per selection block (the official ``blocksize``)."""
EXCLUDED_SHARE = 0.15
"""Share of each block's entries, those of worst utility per cost, never kept (the official code)."""

_STATE = "safe_delta_hessians"


def safe_delta_selection(
    delta: Tensor,
    hinv_diag_sq: Tensor,
    *,
    scale: float = SCALE,
    reference_size: int = REFERENCE_SIZE,
    excluded_share: float = EXCLUDED_SHARE,
) -> Tensor:
    """The entries of one block that Safe Delta keeps (module doc): a greedy prefix, by utility per
    safety cost d_j², of the block's entries whose cost ΔW_ij² / d_j² stays within the budget.

    Args:
        delta: (r, n) ΔW of the block, W_f minus the current (compensated) W_a, any float dtype.
        hinv_diag_sq: (n,) d_j² = U_jj² of the block's columns, > 0.
        scale: s > 0.
        reference_size: the width the budget is written for (4096), ≥ 1.
        excluded_share: share of the entries never kept, in [0, 1].

    Returns:
        (r, n) bool, the kept entries.

    Raises:
        ValueError: shapes that do not match, or settings out of range.
    """
    if delta.dim() != 2 or hinv_diag_sq.shape != (delta.shape[1],):
        raise ValueError(
            f"safe_delta_selection needs delta (r, n) and d² (n,), got {tuple(delta.shape)} and "
            f"{tuple(hinv_diag_sq.shape)}"
        )
    _check_settings(scale, reference_size, excluded_share)
    rows, columns = delta.shape
    total = rows * columns
    if total == 0:
        return torch.zeros(rows, columns, dtype=torch.bool, device=delta.device)
    inv = 1.0 / hinv_diag_sq.to(device=delta.device, dtype=torch.float64)
    order = torch.sort(inv, stable=True).indices
    cost = delta.to(torch.float64)[:, order].square() * inv[order]
    budget = scale * total / reference_size**2 * float(inv.mean())
    within = cost.T.reshape(-1).cumsum(0) <= budget
    within[total - int(excluded_share * total) :] = False
    kept = torch.empty(rows, columns, dtype=torch.bool, device=delta.device)
    kept[:, order] = within.reshape(columns, rows).T
    return kept


@torch.no_grad()
def safe_delta_update(
    w_aligned: Tensor,
    w_finetuned: Tensor,
    hinv_factor: Tensor,
    *,
    scale: float = SCALE,
    reference_size: int = REFERENCE_SIZE,
    block_size: int = BLOCK_SIZE,
    excluded_share: float = EXCLUDED_SHARE,
) -> tuple[Tensor, Tensor]:
    """Safe Delta on one layer (Lu et al. 2025; official ``SafeDeltaRunner.adjust_delta``): the kept
    entries of :func:`safe_delta_selection`, block by block, set to W_f, the others compensated.

    Args:
        w_aligned: (r, c) W_a, the reference (the weights before the task).
        w_finetuned: (r, c) W_f (after the task).
        hinv_factor: (c, c) U of :func:`~.obs.hinv_cholesky` for the safety H at W_a.
        scale, reference_size, excluded_share: see :func:`safe_delta_selection`.
        block_size: B, columns per selection block, ≥ 1.

    Returns:
        ``(w, kept)``: the new (r, c) float32 weight and the (r, c) bool kept entries.

    Raises:
        ValueError: shapes that do not match, or settings out of range.
    """
    if w_finetuned.shape != w_aligned.shape:
        raise ValueError(
            f"safe_delta_update: weights differ in shape, {tuple(w_aligned.shape)} and {tuple(w_finetuned.shape)}"
        )
    _check_settings(scale, reference_size, excluded_share)
    target = w_finetuned.to(device=w_aligned.device, dtype=torch.float64)
    hinv_diag_sq = hinv_factor.diagonal().to(device=w_aligned.device, dtype=torch.float64).square()
    kept = torch.zeros(w_aligned.shape, dtype=torch.bool, device=w_aligned.device)

    def select(current: Tensor, columns: slice) -> Tensor:
        block = safe_delta_selection(
            target[:, columns] - current, hinv_diag_sq[columns],
            scale=scale, reference_size=reference_size, excluded_share=excluded_share,
        )  # fmt: skip
        kept[:, columns] = block
        return block

    return obs_update(w_aligned, target, hinv_factor, select, block_size=block_size), kept


def _check_settings(scale: float, reference_size: int, excluded_share: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"Safe Delta scale s must be a finite number > 0, got {scale}")
    if not (isinstance(reference_size, int) and reference_size >= 1):
        raise ValueError(f"Safe Delta reference_size must be an int >= 1, got {reference_size!r}")
    if not 0.0 <= excluded_share <= 1.0:
        raise ValueError(f"Safe Delta excluded_share must be in [0, 1], got {excluded_share}")


class SafeDelta(Method):
    """Safe Delta (:func:`safe_delta_update`) on every managed layer after every task.

    :meth:`begin_task` computes the safety H on the model before the task; :meth:`after_merge`
    edits the merged weights with it. No HPA edit.

    Args:
        hpa: the run's :class:`~hpa_kernels.HPAConfig` (layer selection, calibration sizes, the
            damping); HPA's edit is disabled.
        scale, reference_size, block_size, excluded_share: see :func:`safe_delta_update`.

    Raises:
        ValueError: settings out of range.
    """

    def __init__(
        self,
        hpa: HPAConfig | None = None,
        scale: float = SCALE,
        reference_size: int = REFERENCE_SIZE,
        block_size: int = BLOCK_SIZE,
        excluded_share: float = EXCLUDED_SHARE,
    ) -> None:
        _check_settings(scale, reference_size, excluded_share)
        if block_size < 1:
            raise ValueError(f"Safe Delta block_size must be >= 1, got {block_size}")
        super().__init__("safe-delta", replace(hpa or HPAConfig(), enabled=False))
        self.scale = scale
        self.reference_size = reference_size
        self.block_size = block_size
        self.excluded_share = excluded_share
        self.kept_share: list[float] = []

    def describe(self) -> dict:
        """s, the reference width, B, the excluded share, the damping, and the share of the task
        update kept after each task run so far."""
        return {
            "scale": self.scale,
            "reference_size": self.reference_size,
            "block_size": self.block_size,
            "excluded_share": self.excluded_share,
            "damping": self.hpa.damping,
            "kept_share": list(self.kept_share),
        }

    def begin_task(self, task: TaskContext) -> None:
        """The safety H of every managed layer on the model before the task (W_prev), one per input."""
        task.state[_STATE] = group_by_input(task.hessians(task.safety_pairs))

    @torch.no_grad()
    def after_merge(self, task: TaskContext) -> None:
        """W ← Safe Delta(W_prev, W_new) in place for every managed layer.

        Raises:
            RuntimeError: :meth:`begin_task` did not run for this task.
        """
        groups = task.state.pop(_STATE, None)
        if groups is None:
            raise RuntimeError("SafeDelta.after_merge needs the safety Hessians of begin_task for this task")
        rule = functools.partial(
            safe_delta_update, scale=self.scale, reference_size=self.reference_size,
            block_size=self.block_size, excluded_share=self.excluded_share,
        )  # fmt: skip
        self.kept_share.append(edit_layers(task.layers, task.w_prev, task.w_new, groups, self.hpa.damping, rule))
