"""Which layers HPA manages in a model, and their block depth (HPA_SPEC.md § Defaults, scope).

The rule, the same for every family:

* A *linear layer* is an ``nn.Linear`` or a GPT-2 style ``transformers.pytorch_utils.Conv1D``
  (weight stored (in_features, out_features)). HPA's columns are always the layer's **input**
  features, whatever the storage layout (:meth:`ManagedLayer.hpa_view`).
* A *block stack* is an ``nn.ModuleList`` whose elements are containers (not themselves linear
  layers) that each hold at least one linear layer: the encoder/decoder layer lists of Hugging
  Face models (``model.layers``, ``encoder.layer``, ``transformer.h``, ``encoder.block``) and any
  hand-written ``nn.ModuleList`` of blocks. [decision] The blocks may be of different classes
  (hybrid models such as Jamba mix attention and Mamba blocks). A stack nested inside a block of
  another stack (a ModuleList of experts) belongs to that block.
* Every stack has a *part*: ``"language"`` (a decoder-only or encoder-only model, or the text
  decoder of a multimodal one), ``"encoder"`` / ``"decoder"`` (the two stacks of an
  encoder-decoder model, ``config.is_encoder_decoder``), or a tower: the sub-model whose config
  is a non-text sub-config of a multimodal config (``vision_config`` gives ``"vision"``,
  ``audio_config`` gives ``"audio"``).
* **Managed by default**: the linear layers inside the stacks of the language parts
  (:data:`LANGUAGE_PARTS`), each stack with its own depth schedule (block l of L,
  ``retention_schedule``), without frozen layers (``requires_grad=False``: their update is zero,
  so their edit would be the identity) — except the ``base_layer`` of a PEFT LoRA wrapper, which
  PEFT freezes and HPA edits after merging the adapter (:mod:`hpa_kernels.adapters`).
* **On request** (``HPAConfig.include``, ``HPAConfig.extra_layers``): any other linear layer, the
  vision tower's blocks (with their stack's own depth), the projector, the heads, frozen layers.
  ``HPAConfig.exclude`` removes layers; it wins over every other rule.
* Never managed: the adapters' own ``lora_A`` / ``lora_B``, embeddings, norms, and weights that are
  not linear layers (3-D fused expert weights of MoE blocks, routers, convolutions); when the
  language model's blocks hold such weights, :func:`find_hpa_layers` warns and names them.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from .adapters import is_adapter_wrapper
from .config import HPAConfig
from .functional import retention_schedule

__all__ = [
    "LANGUAGE_PARTS",
    "ManagedLayer",
    "find_block_stacks",
    "find_hpa_layers",
    "in_features",
    "is_linear",
    "stack_parts",
]

LANGUAGE_PARTS = ("language", "encoder", "decoder")
"""Stack parts whose linear layers HPA manages by default."""

_SHOWN = 4  # names quoted in a warning, per kind of skipped layer


def _conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` when transformers is installed, else ``None``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


_CONV1D = _conv1d_type()


def is_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` or a ``transformers`` ``Conv1D`` (the layers HPA can edit)."""
    return isinstance(module, nn.Linear) or (_CONV1D is not None and isinstance(module, _CONV1D))


def in_features(module: nn.Module) -> int:
    """c, the input features of a linear layer (``Conv1D`` stores its weight as (c, r))."""
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


@dataclass(frozen=True)
class ManagedLayer:
    """One layer HPA edits.

    Attributes:
        module: the ``nn.Linear`` (``weight`` (out_features, in_features)) or ``Conv1D``
            (``weight`` (in_features, out_features)).
        block: index l of its block in its stack (0 at the input side), ``None`` for a named layer
            outside every block stack.
        num_blocks: L, the length of its stack (1 outside a stack).
        retain_ratio: p_l from :func:`hpa_kernels.functional.retention_schedule` (p_max outside a
            stack [decision: outside the block stack there is no depth, and the conservative ratio
            is the larger one]).
        adapter: the PEFT LoRA wrapper whose ``base_layer`` is ``module`` (its adapters are merged
            before the edit, :mod:`hpa_kernels.adapters`), else ``None``.
        part: the part of its stack (``"language"``, ``"encoder"``, ``"decoder"``, ``"vision"``, ...;
            ``"other"`` outside every stack), see :func:`stack_parts`.
    """

    module: nn.Module
    block: int | None
    num_blocks: int
    retain_ratio: float
    adapter: nn.Module | None = None
    part: str = "language"

    @property
    def transposed(self) -> bool:
        """True when ``module.weight`` is stored (in_features, out_features) (``Conv1D``)."""
        return not isinstance(self.module, nn.Linear)

    @property
    def in_features(self) -> int:
        """c: HPA's columns, the layer's input features."""
        return in_features(self.module)

    def hpa_view(self, tensor: Tensor) -> Tensor:
        """The (out_features, in_features) view of ``tensor``, laid out as ``module.weight``.

        HPA_SPEC.md writes W as (r, c), columns = input features; for a ``Conv1D`` this is the
        transpose of the stored weight (a view: writing into it writes the tensor).
        """
        return tensor.T if self.transposed else tensor


def find_block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The block stacks of ``model`` (outermost only), as ``(name, ModuleList)`` in module order."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in stacks):
            continue
        if any(is_linear(block) for block in module):
            continue
        if all(any(is_linear(m) for m in block.modules()) for block in module):
            stacks.append((name, module))
    return stacks


def _within(name: str, root: str) -> bool:
    return root == "" or name == root or name.startswith(root + ".")


def stack_parts(model: nn.Module, stack_names: Iterable[str] | None = None) -> dict[str, str]:
    """The part of each block stack of ``model`` (see the module doc), ``{stack name: part}``.

    Towers are found through the model's own configs: a submodule whose ``config`` is a
    non-text sub-config (``config.sub_configs``, e.g. ``vision_config``) of an enclosing model's
    config is the root of a tower named by that key. Encoder-decoder stacks are told apart by the
    model's ``get_encoder()``.

    Args:
        model: any ``nn.Module``.
        stack_names: the stacks to classify (default: :func:`find_block_stacks`).
    """
    names = [n for n, _ in find_block_stacks(model)] if stack_names is None else list(stack_names)
    towers: dict[int, str] = {}
    encoders: list[tuple[str, str]] = []  # (encoder-decoder model name, its encoder's name)
    modules = list(model.named_modules())
    name_of = {id(module): name for name, module in modules}
    for name, module in modules:
        config = getattr(module, "config", None)
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if key != "text_config" and sub is not None:
                towers.setdefault(id(sub), key.removesuffix("_config"))
        get_encoder = getattr(module, "get_encoder", None)
        if getattr(config, "is_encoder_decoder", False) and callable(get_encoder):
            encoder = get_encoder()
            if id(encoder) in name_of:
                encoders.append((name, name_of[id(encoder)]))
    tower_roots = [
        (name, towers[id(module.config)])
        for name, module in modules
        if id(getattr(module, "config", None)) in towers and name
    ]
    parts: dict[str, str] = {}
    for stack in names:
        tower = next((part for root, part in tower_roots if _within(stack, root)), None)
        owner = next(((model_name, enc) for model_name, enc in encoders if _within(stack, model_name)), None)
        if tower is not None:
            parts[stack] = tower
        elif owner is not None:
            parts[stack] = "encoder" if _within(stack, owner[1]) else "decoder"
        else:
            parts[stack] = "language"
    return parts


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", … ({len(names)} in all)" if len(names) > _SHOWN else "")


def find_hpa_layers(model: nn.Module, config: HPAConfig | None = None) -> dict[str, ManagedLayer]:
    """Every linear layer HPA manages in ``model`` (the rule of the module doc), keyed by its
    ``named_modules()`` name, in module order.

    Args:
        model: any ``nn.Module`` (a PEFT model included).
        config: gives ``p_max``, ``p_min``, ``include``, ``exclude`` and ``extra_layers``
            (default ``HPAConfig()``).

    Returns:
        ``{name: ManagedLayer}``.

    Raises:
        ValueError: an ``extra_layers`` name that is not a linear layer of the model, an
            ``include`` pattern that matches no linear layer, or two managed layers that share one
            weight tensor (tied weights cannot be edited twice).

    Warns:
        UserWarning: when nothing is managed (with the reason), when the language model's blocks
            hold weights that are not linear layers (fused 3-D MoE experts, routers, convolutions:
            named, never edited), and when frozen block layers are skipped in a model without
            PEFT adapters.
    """
    config = config or HPAConfig()
    modules = dict(model.named_modules())
    for name in config.extra_layers:
        if name not in modules or not is_linear(modules[name]):
            raise ValueError(f"HPAConfig.extra_layers names {name!r}, which is not an nn.Linear of the model")
    stacks = find_block_stacks(model)
    parts = stack_parts(model, [name for name, _ in stacks])
    ratios = {name: retention_schedule(len(stack), config.p_max, config.p_min) for name, stack in stacks}
    wrappers = [name for name, module in modules.items() if name and is_adapter_wrapper(module)]

    def named(name: str) -> bool:
        return name in config.extra_layers or _matches(name, config.include)

    layers: dict[str, ManagedLayer] = {}
    frozen: list[str] = []
    matched: set[str] = set()
    for name, module in modules.items():
        if not is_linear(module):
            continue
        owner = max((w for w in wrappers if name.startswith(w + ".")), key=len, default=None)
        if owner is not None and name != owner + ".base_layer":
            continue  # the adapters' own layers
        adapter = modules[owner] if owner is not None else None
        stack = next(((s, blocks) for s, blocks in stacks if _within(name, s)), None)
        if named(name):
            matched.add(name)
        if _matches(name, config.exclude):
            continue
        if stack is None:
            if named(name):
                layers[name] = ManagedLayer(module, None, 1, config.p_max, adapter, "other")
            continue
        stack_name, blocks = stack
        if not (parts[stack_name] in LANGUAGE_PARTS or named(name)):
            continue
        if not module.weight.requires_grad and adapter is None and not named(name):
            frozen.append(name)
            continue
        index = int(name[len(stack_name) + 1 if stack_name else 0 :].split(".")[0])
        layers[name] = ManagedLayer(module, index, len(blocks), ratios[stack_name][index], adapter, parts[stack_name])
    for pattern in config.include:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in matched):
            raise ValueError(f"HPAConfig.include pattern {pattern!r} matches no nn.Linear / Conv1D of the model")
    seen: dict[int, str] = {}
    for name, layer in layers.items():
        other = seen.setdefault(id(layer.module.weight), name)
        if other != name:
            raise ValueError(f"managed layers {other!r} and {name!r} share one weight tensor (tied weights)")
    _warn_skipped(model, stacks, parts, layers, [] if wrappers else frozen)  # PEFT freezes by design
    return layers


def _warn_skipped(
    model: nn.Module,
    stacks: list[tuple[str, nn.ModuleList]],
    parts: dict[str, str],
    layers: dict[str, ManagedLayer],
    frozen: list[str],
) -> None:
    """The warnings of :func:`find_hpa_layers`: nothing managed, weights of the language model's
    blocks that are not linear layers, frozen layers skipped."""
    language = [name for name, _ in stacks if parts[name] in LANGUAGE_PARTS]
    unmanageable: dict[str, list[str]] = {}
    for stack_name, stack in stacks:
        if stack_name not in language:
            continue
        prefix = f"{stack_name}." if stack_name else ""
        for index, block in enumerate(stack):
            for sub_name, sub in block.named_modules():
                if is_linear(sub) or isinstance(sub, nn.Embedding):
                    continue
                for param_name, param in sub.named_parameters(recurse=False):
                    if param.dim() >= 2:
                        full = (
                            f"{prefix}{index}.{sub_name}.{param_name}" if sub_name else f"{prefix}{index}.{param_name}"
                        )
                        kind = f"{type(sub).__name__}.{param_name} {tuple(param.shape)}"
                        unmanageable.setdefault(kind, []).append(full)
    if unmanageable:
        summary = "; ".join(f"{kind}: {_listing(names)}" for kind, names in unmanageable.items())
        warnings.warn(
            "HPA does not manage these weights of the language model's blocks, which are not nn.Linear / "
            "Conv1D layers (fused 3-D MoE expert weights are not split per expert; routers and convolutions "
            f"are not linear layers): {summary}. They get plain AdamW steps and are never edited.",
            UserWarning,
            stacklevel=3,
        )
    if frozen:
        warnings.warn(
            f"HPA skips {len(frozen)} frozen layer(s) of the language model's blocks (no gradient, so the edit "
            f"would leave them unchanged; name them in HPAConfig.include to manage them): {_listing(frozen)}",
            UserWarning,
            stacklevel=3,
        )
    if not layers:
        if not stacks:
            reason = "it has no block stack (an nn.ModuleList of repeated blocks holding nn.Linear / Conv1D layers)"
        elif not language:
            reason = (
                f"its only block stacks belong to a tower ({', '.join(f'{n} ({parts[n]})' for n, _ in stacks)}); "
                "name them in HPAConfig.include"
            )
        else:
            reason = "every linear layer of its language model's blocks is frozen or excluded (HPAConfig.exclude)"
        warnings.warn(
            f"HPA manages no layer of {type(model).__name__}: {reason}. An HPAOptimizer over it edits nothing (a plain AdamW).",
            UserWarning,
            stacklevel=3,
        )
