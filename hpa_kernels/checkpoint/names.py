"""Tensor names and storage layout of a checkpoint, for :func:`hpa_kernels.checkpoint.adjust_checkpoint`.

Tensor names and storage layout, from the model's own definition [decision]: when a checkpoint
directory has a ``config.json`` naming a ``transformers`` architecture, ``hpa-adjust`` builds that
model on the meta device (no weights) and takes from it

* the map between the names the tensors have in the checkpoint and the module names, by the
  rules ``from_pretrained`` applies on loading (the installed transformers' checkpoint conversion
  mapping, ``transformers.conversion_mapping``; a class's ``_checkpoint_conversion_mapping`` in
  older versions). A LLaVA checkpoint stores ``language_model.model.layers.…`` (the original
  format ``save_pretrained`` writes) or ``model.language_model.layers.…``
  (``save_original_format=False``); either maps to the module ``model.language_model.layers.…``,
  and *before* and *after* may use different layouts. A hinv file may name a tensor by its module
  name or by its name in the checkpoint. A tensor stored in a converted form (fused or split by
  the conversion rules) is refused: it cannot be edited as stored;
* the layers stored (in_features, out_features): GPT-2's ``Conv1D``. HPA's columns are the input
  features (:meth:`hpa_kernels.layers.ManagedLayer.hpa_view`): such a tensor is planned and edited
  on its (out, in) view and written back in its storage layout, so its edit equals the edit of the
  equivalent ``nn.Linear``. ``adjust_checkpoint(transposed=…)`` names more such tensors (a
  checkpoint without a ``config.json``).

Without a usable ``config.json`` the names are the stored ones and every tensor is (out, in).

"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .files import read_header


def meta_model(directory: Path) -> Any:
    """The model of ``directory/config.json`` (its ``architectures`` class) on the meta device, or
    ``None`` when there is no ``config.json`` (a bare checkpoint).

    Warns:
        UserWarning: a ``config.json`` whose model cannot be built (the names are then taken as
            stored and every tensor as (out, in)).
    """
    if not (directory / "config.json").is_file():
        return None
    try:
        import transformers

        model_config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        architectures = getattr(model_config, "architectures", None) or []
        model_cls = getattr(transformers, architectures[0], None) if architectures else None
        if model_cls is None:
            raise ValueError(f"architectures {architectures} names no transformers class")
        with torch.device("meta"):
            return model_cls._from_config(model_config)
    except Exception as error:  # any failure falls back to the stored names, with a warning
        warnings.warn(
            f"hpa-adjust: cannot build the model of {directory / 'config.json'} ({error}); tensor names are "
            "taken as stored and every tensor as stored (out_features, in_features)",
            UserWarning,
            stacklevel=3,
        )
        return None


def loading_names(skeleton: Any, stored: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """``{stored name: (module name, converted)}``: what ``from_pretrained`` renames each stored
    tensor to, by the model's checkpoint conversion rules; ``converted`` when a converter (not a
    plain renaming) produces it (fused, split or reshaped on loading)."""
    stored = list(stored)
    if skeleton is None:
        return {name: (name, False) for name in stored}
    meta = skeleton.state_dict()
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    try:  # transformers >= 5: the WeightRenaming / WeightConverter rules from_pretrained applies
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # older: a class attribute of regex renamings
        rules = getattr(skeleton, "_checkpoint_conversion_mapping", None) or {}
        names: dict[str, tuple[str, bool]] = {}
        for key in stored:
            name = key
            for pattern, replacement in rules.items():
                name, replaced = re.subn(pattern, replacement, name)
                if replaced:
                    break
            if name not in meta and prefix:
                if f"{prefix}.{name}" in meta:
                    name = f"{prefix}.{name}"
                elif name.startswith(f"{prefix}.") and name[len(prefix) + 1 :] in meta:
                    name = name[len(prefix) + 1 :]
            names[key] = (name, False)
        return names
    rules = get_model_conversion_mapping(skeleton)
    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if isinstance(rule, WeightConverter)]
    names = {}
    for key in stored:  # as transformers' convert_and_load_state_dict_in_model
        name, converter = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:
            name, converter = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        names[key] = (name, converter is not None)
    return names


def check_files(files: Mapping[str, Path], what: str) -> dict[str, dict[str, Any]]:
    """``{tensor name: header entry}`` of a checkpoint, checking that every file its index names
    exists and holds the tensors the index puts there.

    Raises:
        ValueError: a missing file, or a tensor the index places in a file that does not hold it.
    """
    headers: dict[Path, dict[str, Any]] = {}
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise ValueError(f"{what}: the index names {path}, which does not exist")
        headers[path] = read_header(path)[1]
    for name, path in files.items():
        if name not in headers[path]:
            raise ValueError(f"{what}: the index puts {name!r} in {path.name}, which does not hold it")
    entries: dict[str, dict[str, Any]] = {}
    for header in headers.values():
        entries.update(header)
    return entries


def resolve_names(
    keys: Iterable[str],
    entries: Mapping[str, Mapping[str, dict[str, Any]]],
    skeleton: Any,
) -> tuple[dict[str, str], dict[str, dict[str, str]], list[str]]:
    """Each hinv key's module name, and its stored name in each checkpoint (see the module doc).

    Args:
        keys: the hinv keys (module names or names as stored in either checkpoint).
        entries: ``{"before": {stored name: entry}, "after": {...}}``.
        skeleton: the meta model (or ``None``).

    Returns:
        ``({key: module name}, {key: {"before": stored name, "after": stored name}}, every module
        name of the *after* checkpoint)``.

    Raises:
        ValueError: a key that is not in both checkpoints, stored in a converted form, or two keys
            naming one tensor.
    """
    loading = {what: loading_names(skeleton, names) for what, names in entries.items()}
    module_of = {key: module for names in loading.values() for key, (module, _) in names.items()}
    stored_of = {what: {module: key for key, (module, _) in names.items()} for what, names in loading.items()}
    modules: dict[str, str] = {}
    stored: dict[str, dict[str, str]] = {}
    owner: dict[str, str] = {}
    for key in keys:
        known = any(key in by_module for by_module in stored_of.values())
        module = key if known else module_of.get(key, key)
        if owner.setdefault(module, key) != key:
            raise ValueError(f"hinv keys {owner[module]!r} and {key!r} name one tensor ({module!r})")
        modules[key] = module
        stored[key] = {}
        for what in entries:
            name = stored_of[what].get(module)
            if name is None:
                raise ValueError(f"{key!r} is not in both checkpoints (not in {what})")
            if loading[what][name][1]:
                raise ValueError(
                    f"{key!r}: {what} stores it as {name!r} in a form the model's conversion rules convert on "
                    "loading (fused / split / reshaped), which cannot be edited as stored"
                )
            stored[key][what] = name
    return modules, stored, [module for module, _ in loading["after"].values()]


def stored_transposed(skeleton: Any) -> set[str]:
    """The weight names of the skeleton's layers stored (in_features, out_features) (``Conv1D``)."""
    if skeleton is None:
        return set()
    from torch import nn

    from ..layers import is_linear

    return {
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if is_linear(module) and not isinstance(module, nn.Linear)
    }
