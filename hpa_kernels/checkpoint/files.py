"""The safetensors side of :mod:`hpa_kernels.checkpoint`: a checkpoint directory's files and
headers, the hinv files, and each tensor's block depth.

Depth from tensor names (:func:`block_depths`) [decision]: a bare checkpoint has no module tree,
so the block of a tensor is the first dotted component of its (module) name that is a decimal
integer (``model.layers.<i>.…``, ``encoder.layer.<i>.…``, ``transformer.h.<i>.…``), its stack is the
part of the name before it, and the stack's depth L is one more than the largest index of any
tensor in the checkpoint with that stack prefix. p_l then follows ``retention_schedule(L)`` as in
:func:`hpa_kernels.layers.find_hpa_layers`, which gives the same depths for Hugging Face models. A
managed tensor whose name has no integer component takes p_max (as ``HPAConfig.extra_layers``).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

_INDEX = "model.safetensors.index.json"
_BLOCK = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def block_depths(names: Iterable[str], tensor_names: Iterable[str] | None = None) -> dict[str, tuple[int | None, int]]:
    """``{name: (block l, stack depth L)}`` from tensor names alone (see the module doc).

    Args:
        names: the managed tensor names.
        tensor_names: every tensor name of the checkpoint (default: ``names``), for L.

    Returns:
        ``(l, L)`` per name; ``(None, 1)`` for a name without an integer component.
    """
    names = list(names)
    deepest: dict[str, int] = {}
    for tensor_name in names if tensor_names is None else tensor_names:
        match = _BLOCK.search(tensor_name)
        if match:
            stack = tensor_name[: match.start()]
            deepest[stack] = max(deepest.get(stack, -1), int(match.group(1)))
    depths: dict[str, tuple[int | None, int]] = {}
    for name in names:
        match = _BLOCK.search(name)
        depths[name] = (int(match.group(1)), deepest[name[: match.start()]] + 1) if match else (None, 1)
    return depths


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a checkpoint directory.

    Reads ``model.safetensors.index.json`` when there is one, else every ``*.safetensors`` file.

    Raises:
        FileNotFoundError: no safetensors file in ``directory``.
        ValueError: a tensor name in two files.
    """
    directory = Path(directory)
    index = directory / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors checkpoint in {directory}")
    where: dict[str, Path] = {}
    for path in files:
        for name in read_header(path)[1]:
            if name in where:
                raise ValueError(f"tensor {name!r} is in both {where[name]} and {path}")
            where[name] = path
    return where


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The safetensors header: (byte offset of the data section, ``{name: entry}`` without ``__metadata__``)."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def save_hinv(hinv: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``{layer name: hinv}`` (as :meth:`HessianCollector.hinv` returns it) to a safetensors
    file keyed by weight tensor name (``<layer name>.weight``), the form ``hpa-adjust`` reads."""
    from safetensors.torch import save_file

    # Layers that share an input share one hinv tensor; safetensors wants one copy per name.
    tensors = {f"{name}.weight": vec.detach().float().cpu().clone() for name, vec in hinv.items()}
    save_file(tensors, str(path), metadata=dict(metadata or {}))


def load_hinv(path: str | Path) -> dict[str, Tensor]:
    """``{weight tensor name: (c,) float32 hinv}`` of a file written by :func:`save_hinv`."""
    from safetensors.torch import load_file

    return {name: vec.float() for name, vec in load_file(str(path)).items()}
