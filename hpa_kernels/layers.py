"""Finding the ``nn.Linear`` layers HPA manages in a model, and their block depth.

Scope (HPA_SPEC.md § Defaults): every ``nn.Linear`` inside the model's repeated blocks.
A *block stack* is an ``nn.ModuleList`` whose elements all have one class, are containers
(not themselves ``nn.Linear``) and hold at least one ``nn.Linear``: the encoder/decoder layer
lists of Hugging Face models (``encoder.layer``, ``model.layers``, ``transformer.h``) and any
hand-written ``nn.ModuleList`` of blocks. [decision] A model with several stacks (an encoder
and a decoder, a vision tower and a language model) gives each stack its own depth schedule;
a stack nested inside a block of another stack belongs to that block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapters import is_adapter_wrapper
from .config import HPAConfig
from .functional import retention_schedule


@dataclass(frozen=True)
class ManagedLayer:
    """One layer HPA edits.

    Attributes:
        module: the ``nn.Linear``; its ``weight`` is (out_features, in_features).
        block: index l of its block in its stack (0 at the input side), ``None`` for a layer
            named in ``HPAConfig.extra_layers``.
        num_blocks: L, the length of its stack (1 for an extra layer).
        retain_ratio: p_l from :func:`hpa_kernels.functional.retention_schedule`.
        adapter: the PEFT LoRA wrapper whose ``base_layer`` is ``module`` (its adapters are merged
            before the edit, :mod:`hpa_kernels.adapters`), else ``None``.
    """

    module: nn.Linear
    block: int | None
    num_blocks: int
    retain_ratio: float
    adapter: nn.Module | None = None


def find_block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The block stacks of ``model`` (outermost only), as ``(name, ModuleList)`` in module order."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in stacks):
            continue
        kinds = {type(block) for block in module}
        if len(kinds) != 1 or isinstance(module[0], nn.Linear):
            continue
        if all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            stacks.append((name, module))
    return stacks


def find_hpa_layers(model: nn.Module, config: HPAConfig | None = None) -> dict[str, ManagedLayer]:
    """Every ``nn.Linear`` HPA manages in ``model``, keyed by its ``named_modules()`` name.

    Args:
        model: any ``nn.Module``.
        config: gives ``p_max``, ``p_min`` and ``extra_layers`` (default ``HPAConfig()``).

    Returns:
        ``{name: ManagedLayer}`` in module order.

    Raises:
        ValueError: an ``extra_layers`` name that is not an ``nn.Linear`` of the model, or two
            managed layers that share one weight tensor (tied weights cannot be edited twice).
    """
    config = config or HPAConfig()
    modules = dict(model.named_modules())
    layers: dict[str, ManagedLayer] = {}
    for stack_name, stack in find_block_stacks(model):
        ratios = retention_schedule(len(stack), config.p_max, config.p_min)
        for index, block in enumerate(stack):
            prefix = f"{stack_name}.{index}" if stack_name else str(index)
            # PEFT: inside an adapter wrapper only its base_layer is managed (hpa_kernels.adapters).
            wrappers = {n: m for n, m in block.named_modules() if n and is_adapter_wrapper(m)}
            for sub_name, sub in block.named_modules():
                if isinstance(sub, nn.Linear):
                    owner = max((w for w in wrappers if sub_name.startswith(w + ".")), key=len, default=None)
                    if owner is not None and sub_name != owner + ".base_layer":
                        continue
                    name = f"{prefix}.{sub_name}" if sub_name else prefix
                    adapter = wrappers[owner] if owner is not None else None
                    layers[name] = ManagedLayer(sub, index, len(stack), ratios[index], adapter)
    for name in config.extra_layers:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"HPAConfig.extra_layers names {name!r}, which is not an nn.Linear of the model")
        # [decision] a layer outside the block stack has no depth: it takes the larger ratio, p_max.
        layers.setdefault(name, ManagedLayer(module, None, 1, config.p_max))
    seen: dict[int, str] = {}
    for name, layer in layers.items():
        other = seen.setdefault(id(layer.module.weight), name)
        if other != name:
            raise ValueError(f"managed layers {other!r} and {name!r} share one weight tensor (tied weights)")
    return layers
