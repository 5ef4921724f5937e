"""What a method of ``hpa-cvit`` is: the hooks the runner calls around each task.

Every method follows the same protocol (:mod:`hpa_kernels.cvit.experiment`): the same aligned
model, the same LoRA adapters on every linear layer of the decoder blocks (``--full``: the dense
weights), the same training steps, data order and learning rate, the adapter merged into the dense
weights at the task's end, and the same evaluation. A method differs only through these hooks, each
a no-op here; the runner calls them in this order:

1. :meth:`Method.before_tasks` once, on the aligned dense model, before the first task.
2. For each task: :meth:`Method.training_pairs` (the task's training data), :meth:`Method.begin_task`
   (before the optimizer is built: a method may freeze parameters here), then per step
   :meth:`Method.after_step`; after the last step the adapter is merged (or HPA's ``end_task``
   edits the merged weights, for the methods whose :attr:`Method.hpa` is enabled), then
   :meth:`Method.after_merge` edits the merged dense weights.

The calibration budget is shared: the safety calibration set (the aligned model's own refusals
to ``HPAConfig.safety_samples`` harmful training prompts) and ``HPAConfig.task_samples`` task
samples, both in :class:`TaskContext`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ... import HPAConfig, adapters
from ...integrations import collect_hessians
from ...layers import ManagedLayer
from ..model import ChatModel
from ..prompts import TaskPrompts

Pairs = list[tuple[str, str]]


@dataclass
class RunContext:
    """What a method sees once, before the first task.

    Attributes:
        chat: the aligned chat model (dense: no adapter yet), edited in place.
        layers: its managed layers (:func:`hpa_kernels.layers.find_hpa_layers`), by module name.
        base_weights: ``{layer name: weight}`` of the same layers in the base model before stage-0
            alignment (float32, CPU), only when :attr:`Method.needs_base_weights`; else ``None``.
        safety_pairs: the safety calibration set, ``(harmful prompt, aligned model's refusal)``.
        benign_prompts: benign training prompts (as many as ``safety_pairs``), never evaluated.
        batches: tokenises ``(prompt, answer)`` pairs into model input batches (answer-token
            ``labels``, padding masked), as the runner's calibration does.
        args: the parsed ``hpa-cvit`` arguments.
    """

    chat: ChatModel
    layers: dict[str, ManagedLayer]
    base_weights: dict[str, Tensor] | None
    safety_pairs: Pairs
    benign_prompts: list[str]
    batches: Callable[[Pairs], list[dict]]
    args: argparse.Namespace


@dataclass
class TaskContext:
    """What a method sees of one task.

    Attributes:
        chat: the model being tuned (a PEFT model under LoRA).
        layers: its managed layers by module name; ``layer.adapter`` is the LoRA wrapper, if any.
        index: the task's position in the sequence (0 for the first).
        prompts: the task's instruction renderer.
        safety_pairs, benign_prompts, batches, args: as in :class:`RunContext`.
        task_pairs: the task calibration sample (``HPAConfig.task_samples`` training pairs,
            seeded), the same HPA calibrates on after the task.
        w_prev: each managed layer's dense weight before the task (base + adapter), float32;
            filled by the runner before :meth:`Method.begin_task`.
        w_new: the same after the last step, before any edit; filled before :meth:`Method.after_merge`.
        state: scratch space a method keeps across the hooks of this task.
    """

    chat: ChatModel
    layers: dict[str, ManagedLayer]
    index: int
    prompts: TaskPrompts
    safety_pairs: Pairs
    benign_prompts: list[str]
    task_pairs: Pairs
    batches: Callable[[Pairs], list[dict]]
    args: argparse.Namespace
    w_prev: dict[str, Tensor] = field(default_factory=dict)
    w_new: dict[str, Tensor] = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    def hessians(self, pairs: Pairs) -> dict[str, Tensor]:
        """H = (2/n)·XᵀX of every managed layer's input on ``pairs`` (prompt and answer tokens,
        padding excluded), with the model as it is now: ``{name: (c, c) float32}``."""
        return input_hessians(self.chat.model, self.layers, self.batches(pairs))


class Method:
    """A method compared in ``hpa-cvit``: SeqFT when no hook is overridden.

    Attributes:
        name: the ``--methods`` name.
        hpa: the :class:`~hpa_kernels.HPAConfig` of the run's ``HPAOptimizer``; enabled only for
            HPA and its ablations, whose edit ``end_task`` applies.
        needs_base_weights: :meth:`before_tasks` reads the base model's weights (LoX).
    """

    needs_base_weights: bool = False

    def __init__(self, name: str, hpa: HPAConfig | None = None) -> None:
        self.name = name
        self.hpa = hpa if hpa is not None else HPAConfig(enabled=False)

    def describe(self) -> dict:
        """The method's settings, for ``results.json``."""
        return {}

    def before_tasks(self, run: RunContext) -> None:
        """Once, on the aligned dense model, before the first task."""

    def training_pairs(self, pairs: Pairs, prompts: TaskPrompts) -> Pairs:
        """The ``(prompt, answer)`` pairs the task is trained on (default: ``pairs`` as given)."""
        return pairs

    def begin_task(self, task: TaskContext) -> None:
        """Before the optimizer of the task is built (``task.w_prev`` is filled)."""

    def after_step(self, task: TaskContext) -> None:
        """After every optimizer step of the task."""

    def after_merge(self, task: TaskContext) -> None:
        """After the adapter is merged into the dense weights (``task.w_new`` holds them as the
        training left them): edit ``layer.module.weight`` of ``task.layers`` in place."""


def input_hessians(model: nn.Module, layers: dict[str, ManagedLayer], batches: list[dict]) -> dict[str, Tensor]:
    """H = (2/n)·XᵀX of each layer's input over ``batches``
    (:func:`hpa_kernels.integrations.collect_hessians`: eval mode, padding excluded).
    Returns ``{name: (c, c) float32}``."""
    collector = collect_hessians(model, layers, batches)
    return {name: collector.hessian(name) for name in layers}


@torch.no_grad()
def dense_weights(layers: dict[str, ManagedLayer]) -> dict[str, Tensor]:
    """Each managed layer's dense weight as the model computes it (base + LoRA), float32 copies."""
    return {
        name: (
            adapters.merged_weight(layer.adapter, layer.module.weight)
            if layer.adapter is not None
            else layer.module.weight.detach().clone()
        ).float()
        for name, layer in layers.items()
    }
