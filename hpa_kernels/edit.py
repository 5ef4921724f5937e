"""The task lifecycle's work on the managed layers: ``begin_task``'s snapshot (HPA_SPEC.md Step 0)
and ``end_task``'s edit: every layer planned before the first write (Steps 1–2), then each layer's
Ŵ computed aside and copied in whole (Step 3), so that a failure leaves every layer either fully
edited or untouched; and what the edit did."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from . import adapters, distributed, ops
from .config import HPAConfig
from .functional import LayerPlan, LayerReport, plan_layer_update
from .layers import ManagedLayer


class HPAEditError(RuntimeError):
    """``end_task`` failed while writing; ``edited`` layers hold Ŵ, ``untouched`` layers W_new."""

    def __init__(self, message: str, edited: list[str], untouched: list[str]) -> None:
        super().__init__(f"{message}; edited layers: {edited}; untouched layers: {untouched}")
        self.edited = edited
        self.untouched = untouched


def check_statistics(
    kind: str, vectors: Mapping[str, Tensor] | None, layers: Mapping[str, ManagedLayer]
) -> dict[str, Tensor]:
    """The per-layer statistics ``{name: diag(H⁻¹)}`` checked against the managed layers.

    Args:
        kind: the argument's name, for the messages (``"hinv_safety"``, ``"hinv_task"``).
        vectors: ``{name: (in_features,) tensor}`` (``HessianCollector.hinv()``).
        layers: the managed layers.

    Returns:
        ``{name: vector}`` for every managed layer (extra entries are ignored).

    Raises:
        ValueError: ``vectors`` is None, a layer has no entry, a wrong shape, NaN/Inf or an entry
            ≤ 0, naming the layer.
    """
    if vectors is None:
        raise ValueError(f"HPAOptimizer: {kind} is required while HPA is enabled")
    checked: dict[str, Tensor] = {}
    for name, layer in layers.items():
        if name not in vectors:
            raise ValueError(f"HPAOptimizer: {kind} has no entry for managed layer {name!r}")
        vec = vectors[name]
        columns = layer.in_features
        if not isinstance(vec, Tensor) or vec.shape != (columns,):
            shape = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
            raise ValueError(f"HPAOptimizer: {kind}[{name!r}] must be a ({columns},) tensor, got {shape}")
        if not bool(torch.isfinite(vec).all()):
            raise ValueError(f"HPAOptimizer: {kind}[{name!r}] holds NaN or Inf")
        if not bool((vec > 0).all()):
            raise ValueError(f"HPAOptimizer: {kind}[{name!r}] must be > 0 (a diagonal of an inverse Hessian)")
        checked[name] = vec
    return checked


def check_weights_finite(layers: Mapping[str, ManagedLayer]) -> None:
    """Raises ValueError, naming the layer, when a managed weight holds NaN or Inf."""
    for name, layer in layers.items():
        if not bool(torch.isfinite(layer.module.weight).all()):
            raise ValueError(f"HPAOptimizer: the weight of managed layer {name!r} holds NaN or Inf")


def check_task_support(layers: Mapping[str, ManagedLayer], *, online: bool) -> None:
    """Refuse, at ``begin_task``, a layer the edit cannot handle: a sharded (DTensor) transposed
    (GPT-2 ``Conv1D``) layer, whose storage rows are HPA's columns; and in online mode a LoRA,
    sharded or transposed layer.

    Raises:
        ValueError: naming the layer and the way out.
    """
    for name, layer in layers.items():
        if layer.transposed and distributed.is_sharded(layer.module.weight):
            raise ValueError(
                f"HPAOptimizer.begin_task: {name!r} is a sharded (DTensor) {type(layer.module).__name__} "
                "(weight stored (in_features, out_features)); sharding it by storage rows splits HPA's "
                "columns (its input features), which the sharded edit does not support"
            )
        if not online:
            continue
        if layer.adapter is not None or distributed.is_sharded(layer.module.weight):
            raise ValueError(
                f"HPAOptimizer.begin_task: online mode supports neither LoRA adapters nor sharded (DTensor) "
                f"weights, and {name!r} is one; use HPAConfig(online=False)"
            )
        if layer.transposed:
            raise ValueError(
                f"HPAOptimizer.begin_task: online mode does not support {name!r}, a "
                f"{type(layer.module).__name__} whose weight is stored (in_features, out_features) "
                "(GPT-2 Conv1D); use HPAConfig(online=False), whose end_task edits it"
            )


def snapshot_layers(
    layers: Mapping[str, ManagedLayer],
    optimizer_state: MutableMapping[Tensor, Any],
    hinv_safety: Mapping[str, Tensor],
    *,
    working_of: Callable[[Tensor], Tensor],
    online: bool,
) -> None:
    """``begin_task``'s state of every managed layer (HPA_SPEC.md Step 0), on checked inputs.

    ``hpa_prev``: W_prev, a contiguous copy of the working tensor (the fp32 master copy, or the
    weight), or for a PEFT LoRA layer the merged weight; ``hpa_hinv_safety``: an fp32 copy of
    its safety diag(H⁻¹) on the weight's device; in online mode ``hpa_mask`` (bool (c,), nothing
    retained until the first refresh), ``hpa_col_energy`` (fp32 (c,) zeros) and
    ``hpa_online_coef`` (fp32 0-d zero: no lagged component pending).
    """
    for name, layer in layers.items():
        weight = layer.module.weight
        state = optimizer_state[weight]
        if layer.adapter is not None:
            state["hpa_prev"] = adapters.merged_weight(layer.adapter, weight)
        else:
            state["hpa_prev"] = working_of(weight).clone(memory_format=torch.contiguous_format)
        state["hpa_hinv_safety"] = hinv_safety[name].detach().to(device=weight.device, dtype=torch.float32).clone()
        if online:
            columns = layer.in_features
            state["hpa_mask"] = torch.zeros(columns, dtype=torch.bool, device=weight.device)
            state["hpa_col_energy"] = torch.zeros(columns, dtype=torch.float32, device=weight.device)
            state["hpa_online_coef"] = torch.zeros((), dtype=torch.float32, device=weight.device)


def plan_edits(
    layers: Mapping[str, ManagedLayer],
    *,
    prev_of: Callable[[Tensor], Tensor],
    new_weights: Mapping[str, Tensor],
    hinv_safety: Mapping[str, Tensor],
    hinv_task: Mapping[str, Tensor],
    config: HPAConfig,
    backend: str,
) -> dict[str, LayerPlan]:
    """Every layer's plan (HPA_SPEC.md Steps 1–2: scores, partition, retained columns, c_l), on
    its (out, in) view, before anything is written. Sharded (FSDP2 / DTensor) weights are planned
    together with one all-reduce of their column sums (:func:`distributed.plan_sharded_layers`).

    Args:
        layers: ``{name: ManagedLayer}`` to plan.
        prev_of: weight → W_prev in the working dtype.
        new_weights: ``{name: W_new}``.
        hinv_safety, hinv_task: ``{name: diag(H⁻¹)}``, (in_features,) positive vectors.
        config: the :class:`HPAConfig` (α bounds, focus multiplier, orthogonal, selection).
        backend: kernels backend name.

    Raises:
        ValueError: a layer's inputs are invalid (non-finite weights, wrong shapes) or its
            projection coefficient overflows, naming the layer.
    """
    sharded = {
        name: (
            layer.hpa_view(prev_of(layer.module.weight)),
            layer.hpa_view(new_weights[name]),
            hinv_safety[name],
            hinv_task[name],
            layer.retain_ratio,
        )
        for name, layer in layers.items()
        if distributed.is_sharded(layer.module.weight)
    }
    plans: dict[str, LayerPlan] = {}
    if sharded:
        plans.update(distributed.plan_sharded_layers(sharded, config=config, backend=backend))
    for name, layer in layers.items():
        if name in sharded:
            continue
        weight = layer.module.weight
        try:
            plans[name] = plan_layer_update(
                layer.hpa_view(prev_of(weight)),
                layer.hpa_view(new_weights[name]),
                hinv_safety[name],
                hinv_task[name].to(device=weight.device, dtype=torch.float32),
                layer.retain_ratio,
                config=config,
                backend=backend,
            )
        except ValueError as error:
            raise ValueError(f"HPAOptimizer.end_task: managed layer {name!r}: {error}") from error
    for name, plan in plans.items():
        if not math.isfinite(plan.coef):
            raise ValueError(f"HPAOptimizer.end_task: managed layer {name!r}: the projection coefficient overflows")
    return {name: plans[name] for name in layers}


def write_edits(
    plans: Mapping[str, LayerPlan],
    layers: Mapping[str, ManagedLayer],
    *,
    prev_of: Callable[[Tensor], Tensor],
    new_weights: Mapping[str, Tensor],
    working_of: Callable[[Tensor], Tensor],
    optimizer_state: MutableMapping[Tensor, Any],
    edited: MutableMapping[str, LayerReport],
    backend: str,
) -> None:
    """Write Ŵ = HPA-apply(W_prev, W_new, mask, coef) into every planned layer, one at a time.

    Each layer's Ŵ is computed aside in the (out, in) view (columns = input features) and copied
    in whole into the working tensor (the fp32 master copy or the weight) and, with master
    weights, its rounding into the parameter. A PEFT LoRA layer's adapters are reset (and their
    optimizer state dropped) once its base weight holds Ŵ, which contains their merge. Each
    written layer is recorded in ``edited`` at once, so a retry never edits it twice.

    Args:
        plans: ``{name: LayerPlan}`` of the layers to write.
        layers: every managed layer (for the error's edited / untouched lists).
        prev_of: weight → W_prev in the working dtype.
        new_weights: ``{name: W_new}`` (the working weight, or a LoRA layer's merged weight).
        working_of: weight → the tensor steps update.
        optimizer_state: the optimizer's ``state`` (adapter entries are dropped from it).
        edited: ``{name: LayerReport}``, filled as layers are written.
        backend: kernels backend name.

    Raises:
        HPAEditError: a failure while writing a layer, saying which layers hold Ŵ and which W_new.
    """
    for name, plan in plans.items():
        layer = layers[name]
        param = layer.module.weight
        working = working_of(param)
        try:
            edited_weight = ops.hpa_apply(
                layer.hpa_view(distributed.local_tensor(prev_of(param))),
                layer.hpa_view(distributed.local_tensor(new_weights[name])),  # a rank's own rows
                plan.mask,
                plan.coef,
                backend=backend,
            )
            rounded = None if working.dtype == param.dtype else edited_weight.to(param.dtype)
            layer.hpa_view(distributed.local_tensor(working)).copy_(edited_weight)
            if rounded is not None:  # master weights: the parameter is the rounding of Ŵ
                layer.hpa_view(distributed.local_tensor(param.detach())).copy_(rounded)
            if layer.adapter is not None:  # PEFT LoRA: fresh adapters, their moments dropped
                for adapter_param in adapters.reset_adapters(layer.adapter):
                    optimizer_state.pop(adapter_param, None)
        except Exception as error:
            raise HPAEditError(
                f"HPAOptimizer.end_task failed writing {name!r}: {error}; the task stays open, call "
                "end_task again with the same statistics to edit the untouched layers",
                [n for n in layers if n in edited],
                [n for n in layers if n not in edited],
            ) from error
        edited[name] = plan.report(layer.retain_ratio)
