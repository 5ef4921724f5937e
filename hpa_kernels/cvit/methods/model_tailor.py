"""Model Tailor: keep a sparse "model patch" of the task update, chosen by salience and sensitivity,
revert the rest to the pre-task weights, and "decorate" the patch with the OBS compensation.

Paper: Didi Zhu, Zhongyi Sun, Zexi Li, Tao Shen, Ke Yan, Shouhong Ding, Kun Kuang, Chao Wu, "Model
Tailor: Mitigating Catastrophic Forgetting in Multi-modal Large Language Models", ICML 2024,
arXiv:2402.12048. Official code: github.com/didizhu-zju/Model-Tailor, ``main_model_tailor.py`` (the
driver: sparsity 0.9, 128 calibration batches of the fine-tuning data, ``blocksize=128``,
``percdamp=0.01``) and ``llava/train/sparsegpt.py`` (``SparseGPT.fasterprune``, the rule it imports).
The paper's body was not readable here (its abstract and summaries were: "a sparse mask to identify
the model patch, based on a fusion strategy that integrates salience and sensitivity analysis",
then "a compensation mechanism ... based on the inverse of the Hessian"); the rule is the code's.

Per linear layer (weights (r, c)), with θ_pre the weights before the task (W_prev), θ_ft those after
(W_new), H the Hessian of the layer's input on the task's data at θ_ft and U the upper Cholesky
factor of (H + λI)⁻¹ (:func:`~.obs.hinv_cholesky`, d_j = U_jj), in blocks of n ≤ B columns, each
once the earlier blocks are done (θ the current weights of the block, compensation included):

* salience:      S_ij = |θ_ft,ij − θ_pre,ij|;
* sensitivity:   E_ij = θ_ij² / d_j²          (the code's: OBS's cost of zeroing the weight, as
  SparseGPT ranks its pruning, not of reverting it to θ_pre);
* fusion:        I = 0.8 · z(S) + 0.2 · z(E),  z standardising each row of the block
  ((x − mean) / std over its n columns, unbiased std);
* patch:         the ⌊p · r·n⌋ entries of largest I in the block (p = 0.1), the model patch;
  every other entry is reverted to θ_pre;
* decorator:     the patch absorbs the reverted entries by the sequential OBS update
  (:func:`~.obs.obs_update`, reference θ_ft, the reverted entries fixed at θ_pre): θ_ft's output on
  the task data is kept as far as the patch allows.

Defaults (the official code's): p = 0.1 ("≤ 10 %" in the paper; ``sparsity_level = 0.9``), the
0.8 / 0.2 fusion of ``llava/train/sparsegpt.py`` (a second copy, ``llava/sparsegpt.py``, has
0.5 / 0.5), B = 128, λ = 0.01 · mean(diag H) (``HPAConfig.damping``'s default, which is used).

Decisions where the code is implicit, departs from its own description, or our protocol differs:

* [decision] Compensation sign. The official ``fasterprune`` adds ``err · U[j, k]`` to the later
  columns (``W1[:, i:] += ...``, ``W[:, i2:] += Err1.matmul(...)``, SparseGPT's ``-=`` left
  commented out), which moves the patch away from the OBS optimum, the opposite of the paper's
  compensation "to counterbalance" the reverted entries. The OBS sign is used here (:mod:`.obs`).
* [decision] Count. The code reverts every entry whose score is ≤ the ⌊0.9 · r·n⌋-th smallest
  (0-based), which keeps ⌈0.1 · r·n⌉ − 1 entries of a block, one fewer than ⌊0.1 · r·n⌋ when
  0.1 · r·n is whole; here ⌊p · r·n⌋ are kept (all ties at the threshold reverted, as in the code).
* [decision] A row whose scores are all equal in a block (std 0, or n = 1) has z = 0 there (the code
  divides by 0).
* [decision] Data. The code collects H layer by layer on 128 training batches passed through the
  already-tailored earlier layers; here H comes from the run's task calibration sample (128 task
  pairs, prompt and answer tokens, padding excluded) on the merged model, for all layers at once,
  in :meth:`ModelTailor.after_merge`.
* [decision] Applied after every task with θ_pre = W_prev, on every managed layer (the code: the
  LLM blocks that were fine-tuned, with the projector reset to the pre-trained one).
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

KEEP_RATIO = 0.1
"""p: the share of each block's entries kept in the model patch (official ``sparsity_level = 0.9``)."""
SALIENCE_WEIGHT = 0.8
"""The weight of the salience z-score in the fusion (the sensitivity's is 1 − this)."""
BLOCK_SIZE = 128
"""B: columns per selection block (the official ``blocksize``)."""


def _standardised(x: Tensor) -> Tensor:
    """(x − mean) / std along each row (unbiased std); 0 where a row's std is 0 or undefined."""
    if x.shape[1] < 2:
        return torch.zeros_like(x)
    std = x.std(dim=1, keepdim=True)
    return torch.where(std > 0, (x - x.mean(dim=1, keepdim=True)) / std, torch.zeros_like(x))


def model_tailor_selection(
    salience: Tensor,
    sensitivity: Tensor,
    *,
    keep_ratio: float = KEEP_RATIO,
    salience_weight: float = SALIENCE_WEIGHT,
) -> Tensor:
    """The model patch of one block (module doc): the ⌊p · r·n⌋ entries of largest fused score
    I = w · z(S) + (1 − w) · z(E), ties at the threshold left out.

    Args:
        salience: (r, n) S = |θ_ft − θ_pre| of the block.
        sensitivity: (r, n) E = θ² / d_j² of the block.
        keep_ratio: p in [0, 1).
        salience_weight: w in [0, 1].

    Returns:
        (r, n) bool, the patch (the kept entries).

    Raises:
        ValueError: shapes that differ, or settings out of range.
    """
    if salience.dim() != 2 or sensitivity.shape != salience.shape:
        raise ValueError(
            f"model_tailor_selection needs two (r, n) scores, got {tuple(salience.shape)} and {tuple(sensitivity.shape)}"
        )
    _check_settings(keep_ratio, salience_weight)
    score = salience_weight * _standardised(salience.double()) + (1.0 - salience_weight) * _standardised(
        sensitivity.double()
    )
    count = math.floor(keep_ratio * score.numel())
    if count == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    threshold = score.flatten().kthvalue(score.numel() - count).values
    return score > threshold


@torch.no_grad()
def model_tailor_update(
    w_pre: Tensor,
    w_ft: Tensor,
    hinv_factor: Tensor,
    *,
    keep_ratio: float = KEEP_RATIO,
    salience_weight: float = SALIENCE_WEIGHT,
    block_size: int = BLOCK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Model Tailor on one layer (Zhu et al. 2024; official ``SparseGPT.fasterprune``): the patch of
    :func:`model_tailor_selection`, block by block, the rest reverted to θ_pre and compensated.

    Args:
        w_pre: (r, c) θ_pre (the weights before the task).
        w_ft: (r, c) θ_ft (after the task), the reference of the compensation.
        hinv_factor: (c, c) U of :func:`~.obs.hinv_cholesky` for the task H at θ_ft.
        keep_ratio, salience_weight: see :func:`model_tailor_selection`.
        block_size: B, columns per selection block, ≥ 1.

    Returns:
        ``(w, kept)``: the new (r, c) float32 weight and the (r, c) bool patch.

    Raises:
        ValueError: shapes that do not match, or settings out of range.
    """
    if w_ft.shape != w_pre.shape:
        raise ValueError(f"model_tailor_update: weights differ in shape, {tuple(w_pre.shape)} and {tuple(w_ft.shape)}")
    _check_settings(keep_ratio, salience_weight)
    target = w_pre.to(device=w_ft.device, dtype=torch.float64)
    salience = (w_ft.double() - target).abs()
    hinv_diag_sq = hinv_factor.diagonal().to(device=w_ft.device, dtype=torch.float64).square()
    kept = torch.zeros(w_ft.shape, dtype=torch.bool, device=w_ft.device)

    def select(current: Tensor, columns: slice) -> Tensor:
        patch = model_tailor_selection(
            salience[:, columns], current.square() / hinv_diag_sq[columns],
            keep_ratio=keep_ratio, salience_weight=salience_weight,
        )  # fmt: skip
        kept[:, columns] = patch
        return ~patch

    return obs_update(w_ft, target, hinv_factor, select, block_size=block_size), kept


def _check_settings(keep_ratio: float, salience_weight: float) -> None:
    if not 0.0 <= keep_ratio < 1.0:
        raise ValueError(f"Model Tailor keep_ratio must be in [0, 1), got {keep_ratio}")
    if not 0.0 <= salience_weight <= 1.0:
        raise ValueError(f"Model Tailor salience_weight must be in [0, 1], got {salience_weight}")


class ModelTailor(Method):
    """Model Tailor (:func:`model_tailor_update`) on every managed layer after every task, with H
    from the task calibration sample on the merged model. No HPA edit.

    Args:
        hpa: the run's :class:`~hpa_kernels.HPAConfig` (layer selection, calibration sizes, the
            damping); HPA's edit is disabled.
        keep_ratio, salience_weight, block_size: see :func:`model_tailor_update`.

    Raises:
        ValueError: settings out of range.
    """

    def __init__(
        self,
        hpa: HPAConfig | None = None,
        keep_ratio: float = KEEP_RATIO,
        salience_weight: float = SALIENCE_WEIGHT,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        _check_settings(keep_ratio, salience_weight)
        if block_size < 1:
            raise ValueError(f"Model Tailor block_size must be >= 1, got {block_size}")
        super().__init__("model-tailor", replace(hpa or HPAConfig(), enabled=False))
        self.keep_ratio = keep_ratio
        self.salience_weight = salience_weight
        self.block_size = block_size
        self.kept_share: list[float] = []

    def describe(self) -> dict:
        """p, the salience weight, B, the damping, and the share of the entries in the patch after
        each task run so far."""
        return {
            "keep_ratio": self.keep_ratio,
            "salience_weight": self.salience_weight,
            "block_size": self.block_size,
            "damping": self.hpa.damping,
            "kept_share": list(self.kept_share),
        }

    @torch.no_grad()
    def after_merge(self, task: TaskContext) -> None:
        """W ← Model Tailor(W_prev, W_new) in place for every managed layer, H on ``task.task_pairs``."""
        groups = group_by_input(task.hessians(task.task_pairs))
        rule = functools.partial(
            model_tailor_update, keep_ratio=self.keep_ratio, salience_weight=self.salience_weight,
            block_size=self.block_size,
        )  # fmt: skip
        self.kept_share.append(edit_layers(task.layers, task.w_prev, task.w_new, groups, self.hpa.damping, rule))
