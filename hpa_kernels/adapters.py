"""PEFT LoRA under HPA: the paper's protocol, fine-tune with LoRA, merge, then edit (HPA_SPEC.md § Setting).

A PEFT LoRA wrapper (``peft.tuners.lora.Linear``) holds the dense ``nn.Linear`` as ``base_layer``
and the adapters as ``lora_A[name]`` (r_a × c), ``lora_B[name]`` (r × r_a) with a ``scaling[name]``.
:func:`hpa_kernels.layers.find_hpa_layers` manages the ``base_layer`` (named
``<wrapper>.base_layer``, as in ``named_modules()``) and records the wrapper as
``ManagedLayer.adapter``; the adapters' own ``nn.Linear`` are never managed. Then:

* ``begin_task`` snapshots the merged weight W_prev = W + Σ scale·BA (:func:`merged_weight`),
  without changing the model;
* ``end_task`` plans the edit on W_new = W + Σ scale·BA computed out of place
  (:func:`merged_weight`), so a failed check (a NaN in an adapter) leaves base weights and
  adapters as they were; only when writing does it store Ŵ (the merge is part of Ŵ) into the base
  weight and reset the adapters to a fresh LoRA (peft's own ``reset_lora_parameters(name, True)``:
  A Kaiming-uniform, B = 0) (:func:`reset_adapters`).
  [decision] The AdamW moments of the reset adapter parameters are dropped with them: the next
  task starts its adapters as a new LoRA run would.

Only plain LoRA is merged: DoRA and LoRA bias are refused when the optimizer is built
(:func:`check_adapter`). peft itself is not imported: the wrapper is used through its public
methods (``get_delta_weight``, ``reset_lora_parameters``, ``active_adapters``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["active_adapters", "check_adapter", "is_adapter_wrapper", "merged_weight", "reset_adapters"]


def is_adapter_wrapper(module: nn.Module) -> bool:
    """True for a PEFT tuner layer wrapping a base module (it has a ``base_layer`` submodule)."""
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def active_adapters(wrapper: nn.Module) -> list[str]:
    """The LoRA adapters of ``wrapper`` that its forward adds (active, not merged, not disabled)."""
    if getattr(wrapper, "disable_adapters", False):
        return []
    merged = set(getattr(wrapper, "merged_adapters", ()))
    lora_a = getattr(wrapper, "lora_A", {})
    return [name for name in getattr(wrapper, "active_adapters", ()) if name in lora_a and name not in merged]


def check_adapter(wrapper: nn.Module, name: str) -> None:
    """Refuse a wrapper HPA cannot merge exactly.

    Raises:
        ValueError: not a PEFT LoRA ``Linear`` (no ``lora_A`` / ``get_delta_weight``), or an active
            adapter with DoRA or a LoRA bias (their merge is not W + scale·BA).
    """
    if not (hasattr(wrapper, "lora_A") and callable(getattr(wrapper, "get_delta_weight", None))):
        raise ValueError(
            f"{name!r} is wrapped by {type(wrapper).__name__}, not a PEFT LoRA Linear; HPA cannot merge it"
        )
    for adapter in active_adapters(wrapper):
        if getattr(wrapper, "use_dora", {}).get(adapter, False):
            raise ValueError(f"{name!r}: adapter {adapter!r} uses DoRA; HPA merges plain LoRA only")
        if getattr(wrapper, "lora_bias", {}).get(adapter, False):
            raise ValueError(f"{name!r}: adapter {adapter!r} has a LoRA bias; HPA merges plain LoRA only")


def _delta(wrapper: nn.Module, weight: Tensor) -> Tensor | None:
    names = active_adapters(wrapper)
    if not names:
        return None
    delta = torch.zeros_like(weight, dtype=torch.float32)
    for adapter in names:
        delta += wrapper.get_delta_weight(adapter).float()
    return delta


@torch.no_grad()
def merged_weight(wrapper: nn.Module, weight: Tensor) -> Tensor:
    """W + Σ_adapters scale·BA, a new (r, c) tensor of ``weight``'s dtype (``weight`` is the base's).

    fp32 sum, rounded once to the weight dtype (as peft's own merge does for fp32 weights).
    """
    delta = _delta(wrapper, weight)
    if delta is None:
        return weight.detach().clone(memory_format=torch.contiguous_format)
    return (weight.detach().float() + delta).to(weight.dtype)


@torch.no_grad()
def reset_adapters(wrapper: nn.Module) -> list[nn.Parameter]:
    """Reset the active adapters of ``wrapper`` to a fresh LoRA (A Kaiming-uniform, B = 0).

    The caller has already stored their merge in the base weight (``end_task`` writes Ŵ, which
    contains it), so the model's function is that of the edited merged weight.

    Returns:
        The reset adapter parameters (their optimizer state is stale).
    """
    reset: list[nn.Parameter] = []
    for adapter in active_adapters(wrapper):
        wrapper.reset_lora_parameters(adapter, True)
        reset.extend(wrapper.lora_A[adapter].parameters())
        reset.extend(wrapper.lora_B[adapter].parameters())
    return reset
