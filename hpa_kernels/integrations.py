"""Hugging Face integrations: calibration over batches of model inputs, and the Trainer callback.

:class:`HPACallback` runs the HPA task lifecycle (HPA_SPEC.md Steps 0–3) around each
``Trainer.train()`` call, with :class:`~hpa_kernels.HPAOptimizer` as the Trainer's optimizer::

    optimizer = HPAOptimizer.from_model(model, lr=2e-5)
    callback = HPACallback(optimizer, safety_data=safety_batches)
    for task in tasks:                       # one Trainer (or one train() call) per task
        trainer = Trainer(model=model, args=args, train_dataset=task,
                          optimizers=(optimizer, None), callbacks=[callback])
        trainer.train()                      # calibrate + begin_task, train, calibrate + end_task

A callback fits the Trainer's API better than a subclass: the Trainer already takes the optimizer
(``optimizers=(opt, None)``) and fires ``on_train_begin`` / ``on_train_end`` around each run,
which are exactly HPA's two task boundaries, and a callback composes with any Trainer subclass
(TRL's trainers included). PEFT LoRA models work unchanged (:mod:`hpa_kernels.adapters`).
Under DDP / FSDP2 (``accelerate launch``) each rank calibrates on its own batches and
:class:`~hpa_kernels.HessianCollector` all-reduces the statistics (:mod:`hpa_kernels.distributed`);
with FSDP2 every rank must be given the same number of calibration batches (each forward is collective).

This module imports ``transformers`` (install the ``cvit`` or ``test`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from .calibration import HessianCollector
from .functional import LayerReport
from .optim import HPAOptimizer

__all__ = ["HPACallback", "calibrate", "collect_hessians", "decoder_attention_mask", "take_samples"]

_NOT_INPUTS = ("labels", "label", "label_ids")


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def decoder_attention_mask(labels: Tensor) -> Tensor:
    """The decoder positions that hold a token when the decoder input is ``labels`` shifted right
    (as a seq2seq model's loss derives it): position 0 (the start token) and every t whose
    ``labels[:, t - 1]`` is not ``-100``.

    Args:
        labels: (B, T) integer, ``-100`` where the loss ignores a position.

    Returns:
        (B, T) int64 of 0/1.
    """
    mask = torch.ones_like(labels, dtype=torch.long)
    mask[:, 1:] = (labels[:, :-1] != -100).long()
    return mask


def calibrate(
    model: nn.Module,
    optimizer: HPAOptimizer,
    batches: Iterable[Mapping[str, Any]],
    *,
    forward: Callable[[nn.Module, dict[str, Any]], object] | None = None,
    **collector_kwargs: Any,
) -> dict[str, Tensor]:
    """The ``hinv`` vectors of every managed layer of ``optimizer`` on ``batches`` (HPA_SPEC.md Step 0).

    Runs the batches through :func:`collect_hessians` on ``optimizer.hpa_layers`` and returns
    :meth:`HessianCollector.hinv` with the optimizer's damping (``hpa.damping``).

    Args:
        model: the model whose layers ``optimizer`` manages (a PEFT model included).
        optimizer: gives the layers (``hpa_layers``) and the damping (``hpa.damping``).
        batches, forward, **collector_kwargs: as :func:`collect_hessians`.

    Returns:
        ``{layer name: (in_features,) float32}``, as :meth:`HessianCollector.hinv`.

    Raises:
        ValueError: a managed layer that saw no token (e.g. empty ``batches``).
    """
    collector = collect_hessians(model, optimizer.hpa_layers, batches, forward=forward, **collector_kwargs)
    return collector.hinv(optimizer.hpa.damping)


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    layers: Mapping[str, object] | Iterable[str],
    batches: Iterable[Mapping[str, Any]],
    *,
    forward: Callable[[nn.Module, dict[str, Any]], object] | None = None,
    **collector_kwargs: Any,
) -> HessianCollector:
    """Run ``batches`` through ``model`` under a :class:`HessianCollector` on ``layers``; return it
    (its statistics stay readable: :meth:`~HessianCollector.hessian`, :meth:`~HessianCollector.hinv`).

    Runs ``model(**batch)`` (or ``forward(model, batch)``) in eval mode without gradients (the
    training mode is restored), each batch moved to the model's device and ``labels`` dropped.
    Padding is excluded through the masks the model's own forward calls receive (see
    :class:`HessianCollector`, *Which positions count*): the batch's ``attention_mask`` for a
    decoder-only or encoder-only model and for the text decoder of a multimodal one (image tokens
    count, pixel values go through as given), each stack its own mask for an encoder-decoder.
    An encoder-decoder batch with ``labels`` and no ``decoder_input_ids`` keeps its ``labels`` (the
    model derives its decoder inputs from them, as its loss does) and gets a
    ``decoder_attention_mask`` from them (:func:`decoder_attention_mask`) when it has none.

    Args:
        model: the model the layers belong to (a PEFT model included).
        layers: as :class:`HessianCollector` (e.g. ``optimizer.hpa_layers``).
        batches: mappings of model inputs, e.g. ``{"input_ids": (B, T), "attention_mask": (B, T)}``,
            plus ``pixel_values`` (and ``image_grid_thw``, ...) for a multimodal model.
        forward: how one batch is run, e.g. ``lambda m, b: m.generate(**b, max_new_tokens=16)`` to
            calibrate on the model's own answers (every forward of the generation counts; the
            positions a finished sequence keeps generating count too); default ``model(**batch)``.
        **collector_kwargs: ``all_reduce``, ``process_group`` for :class:`HessianCollector`.

    Raises:
        ValueError: as :class:`HessianCollector` (a name that is not a linear layer of ``model``).
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    try:
        with HessianCollector(model, layers, **collector_kwargs) as collector:
            for batch in batches:
                inputs = {
                    key: value.to(device) if isinstance(value, Tensor) else value
                    for key, value in batch.items()
                    if key not in _NOT_INPUTS
                }
                labels = batch.get("labels")
                if (
                    forward is None
                    and encoder_decoder
                    and isinstance(labels, Tensor)
                    and "decoder_input_ids" not in inputs
                ):
                    inputs["labels"] = labels.to(device)
                    inputs.setdefault("decoder_attention_mask", decoder_attention_mask(inputs["labels"]))
                if forward is None:
                    model(**inputs)
                else:
                    forward(model, inputs)
    finally:
        model.train(was_training)
    return collector


def take_samples(batches: Iterable[Mapping[str, Any]], samples: int) -> list[Mapping[str, Any]]:
    """The leading batches of ``batches`` that hold ``samples`` examples (the last one cut to fit).

    The batch size is the first dimension of the first tensor of each batch.
    """
    taken: list[Mapping[str, Any]] = []
    remaining = samples
    for batch in batches:
        if remaining <= 0:
            break
        size = next((v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0), remaining)
        keep = min(size, remaining)
        taken.append({k: v[:keep] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()})
        remaining -= keep
    return taken


class HPACallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that wraps each ``Trainer.train()`` in one HPA task.

    * ``on_train_begin``: safety calibration on the model as it is (W_prev, HPA_SPEC.md Step 0),
      then ``optimizer.begin_task``. Skipped when the optimizer is already inside a task (a
      Trainer resuming from a checkpoint restores it mid-task).
    * ``on_train_end``: task calibration on the trained model (W_new), then ``optimizer.end_task``
      (Steps 1–3); its per-layer reports are appended to :attr:`reports`.

    Args:
        optimizer: the :class:`HPAOptimizer` given to the Trainer as ``optimizers=(optimizer, None)``.
        safety_data: batches of model inputs of the safety set D_s (reused for every task).
        task_data: batches of the current task's calibration set D_t; ``None`` (default) takes the
            first ``optimizer.hpa.task_samples`` examples of the Trainer's training dataloader
            (labels dropped). Assign :attr:`task_data` between tasks to change it.

    Attributes:
        reports: one ``{layer name: LayerReport}`` per completed task.
    """

    def __init__(
        self,
        optimizer: HPAOptimizer,
        safety_data: Iterable[Mapping[str, Any]],
        task_data: Iterable[Mapping[str, Any]] | None = None,
    ) -> None:
        if not isinstance(optimizer, HPAOptimizer):
            raise TypeError(f"HPACallback needs an HPAOptimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.safety_data = safety_data
        self.task_data = task_data
        self.reports: list[dict[str, LayerReport]] = []

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.optimizer.in_task:
            return
        self.optimizer.begin_task(calibrate(_required(model), self.optimizer, self.safety_data))

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        data = self.task_data
        if data is None:
            loader = kwargs.get("train_dataloader")
            if loader is None:
                raise RuntimeError("HPACallback: no task_data and no training dataloader to calibrate on")
            data = take_samples(loader, self.optimizer.hpa.task_samples)
        self.reports.append(self.optimizer.end_task(calibrate(_required(model), self.optimizer, data)))


def _required(model: nn.Module | None) -> nn.Module:
    if model is None:
        raise RuntimeError("HPACallback: the Trainer passed no model to the callback")
    return model
