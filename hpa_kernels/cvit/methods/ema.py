"""Parameter-space EMA: each task ends on the exponential moving average of its training iterates.

Paper: Minseon Kim, Jin Myung Kwak, Lama Alssum, Bernard Ghanem, Philip Torr, David Krueger, Fazl
Barez, Adel Bibi, "Rethinking Safety in LLM Fine-tuning: An Optimization Perspective", COLM 2025,
arXiv:2508.12531. Its claim: safety lost in benign fine-tuning is mostly an optimization effect,
and an exponential moving average of the parameters, started at the aligned model, keeps the
optimization path close to it and with it the model's refusals. No official code was found.

Rule, per task, with W_prev the weights before the task and W_t those after optimizer step t:

    EMA_0 = W_prev,
    EMA_t = β · EMA_{t−1} + (1 − β) · W_t        (t = 1 … T, after every step),
    W ← EMA_T                                    (at the task's end),

so EMA_T = β^T · W_prev + (1 − β) · Σ_t β^{T−t} · W_t: the anchor keeps weight β^T, recent steps the
most. [decision] The average is not fed back into training: the optimizer keeps stepping the raw
iterates W_t (the usual parameter EMA); only the weights the task leaves behind are the average.

Default β = 0.95. [decision] The paper's momentum value could not be read here (only its abstract
and summaries were reachable), so β is chosen for our protocol: 40 steps per task (the runner's
``--steps`` default). The 0.999 usual in long training runs would keep 0.999^40 = 96% of W_prev and
learn almost nothing; β = 0.95 averages over about 1/(1 − β) = 20 steps, half a task, and keeps
0.95^40 ≈ 13% of W_prev. For an update growing linearly over the task (a LoRA from B = 0),
EMA_T − W_prev = (1 − β(1 − β^T) / (T(1 − β))) · (W_T − W_prev) ≈ 0.59 · (W_T − W_prev).

Decisions where our protocol differs from the paper's (full fine-tuning of Llama models):

* [decision] Under LoRA (the default protocol) the weights the model computes are the merged dense
  weights W_t = W_base + s · B_t A_t of the managed layers (q, k, v, o, gate, up, down; under LoRA
  nothing else trains): the EMA is of those dense weights, exactly, not of A and B separately (an
  average of B and of A is not the average of B·A). At the task's end the runner has merged the
  adapter and reset it (B = 0), so writing EMA_T into the base weight makes the model compute EMA_T.
* [decision] Under ``--full`` every parameter that trains (``requires_grad``: the managed layers,
  embeddings, norms, the head; SmolLM2's head is tied to its embedding, one parameter) is averaged,
  in float32.
* [decision] Anchored per task at that task's W_prev (the weights after the previous task's EMA):
  each task's average starts where the model is, as the paper's starts at the aligned model. No
  bias correction: the weight left on W_prev is the point of the method.
* Memory: one float32 copy of the averaged weights (~106M floats for the 210 managed layers of
  SmolLM2 under LoRA); per step, one merged weight per layer (s·BA of rank 16 plus the base).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from ... import HPAConfig, adapters
from ...layers import ManagedLayer
from .base import Method, TaskContext

BETA = 0.95
"""β: the EMA momentum, chosen for 40 steps per task (see the module doc)."""


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"EMA momentum beta must be in [0, 1], got {beta}")


@torch.no_grad()
def ema_update(average: Tensor, weight: Tensor, beta: float) -> Tensor:
    """EMA_t = β · EMA_{t−1} + (1 − β) · W_t, in place in ``average`` (Kim et al. 2025,
    parameter-space EMA).

    Args:
        average: EMA_{t−1}, any shape, a float tensor (float32 here), overwritten with EMA_t.
        weight: W_t, the same shape (cast to ``average``'s dtype and device).
        beta: β in [0, 1]: 0 keeps the last iterate, 1 never moves.

    Returns:
        ``average`` (EMA_t).

    Raises:
        ValueError: β outside [0, 1], or the shapes differ.
    """
    _check_beta(beta)
    if average.shape != weight.shape:
        raise ValueError(f"EMA of shape {tuple(average.shape)} cannot average a weight of shape {tuple(weight.shape)}")
    return average.lerp_(weight.to(dtype=average.dtype, device=average.device), 1.0 - beta)


def _dense_weight(layer: ManagedLayer) -> Tensor:
    """The weight ``layer`` computes with: base + Σ s·BA of its LoRA wrapper, if any."""
    if layer.adapter is None:
        return layer.module.weight.detach()
    return adapters.merged_weight(layer.adapter, layer.module.weight)


class EMA(Method):
    """Parameter-space EMA over each task (:func:`ema_update` after every step, EMA_T written
    in :meth:`after_merge`); no HPA edit.

    Args:
        hpa: the run's :class:`~hpa_kernels.HPAConfig` (its layer selection and calibration sizes);
            HPA's edit is disabled.
        beta: β (default :data:`BETA`).

    Raises:
        ValueError: β outside [0, 1].
    """

    def __init__(self, hpa: HPAConfig | None = None, beta: float = BETA) -> None:
        _check_beta(beta)
        super().__init__("ema", replace(hpa or HPAConfig(), enabled=False))
        self.beta = beta

    def describe(self) -> dict:
        """β."""
        return {"beta": self.beta}

    @torch.no_grad()
    def begin_task(self, task: TaskContext) -> None:
        """EMA_0 = the weights now (W_prev): every trainable parameter under ``--full``, else the
        merged dense weight of every managed layer."""
        tracked: list[tuple[Tensor, Callable[[], Tensor]]]
        if task.args.full:
            tracked = [(p, p.detach) for p in task.chat.model.parameters() if p.requires_grad]
        else:
            tracked = [(layer.module.weight, functools.partial(_dense_weight, layer)) for layer in task.layers.values()]
        task.state["ema"] = [(target, read, read().float().clone()) for target, read in tracked]

    def after_step(self, task: TaskContext) -> None:
        """EMA_t = β · EMA_{t−1} + (1 − β) · W_t."""
        for _, read, average in task.state["ema"]:
            ema_update(average, read(), self.beta)

    @torch.no_grad()
    def after_merge(self, task: TaskContext) -> None:
        """W ← EMA_T (the adapter is merged and reset, so the model computes the written weight)."""
        for target, _, average in task.state.pop("ema"):
            target.copy_(average.to(target.dtype))
