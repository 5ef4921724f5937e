"""HPA on safetensors checkpoints, without the model in memory: ``hpa-calibrate`` and ``hpa-adjust``.

The paper's edit is post-hoc (HPA_SPEC.md § Setting): given the checkpoint before a task, the
checkpoint after it and the two calibration statistics, Steps 1–3 need one layer at a time.

* :func:`calibrate_checkpoint` (``hpa-calibrate``): loads a Hugging Face model from a local
  directory, runs it on a JSONL calibration set and writes the ``hinv`` vector of every managed
  layer (HPA_SPEC.md Step 0) to a safetensors file, keyed by the layer's **weight parameter
  name** (``<module name>.weight``: ``model.layers.0.self_attn.q_proj.weight``). A line holds token
  ids or text fields, and may name images (``"image"``: a path relative to the JSONL file, or a
  list of them), read with the model's own processor (``AutoProcessor`` saved with the
  checkpoint), so that the pixel values go through the model's forward and the decoder layers
  count the image tokens. The forwards go through :func:`hpa_kernels.integrations.calibrate`,
  the in-memory path.
* :func:`adjust_checkpoint` (``hpa-adjust``): copies the *after* checkpoint directory and rewrites,
  in the copy, the bytes of every tensor named in the hinv files by its edit Ŵ (Steps 1–3). It
  streams tensor by tensor (``safetensors.safe_open``): one W_prev and one W_new in memory at a
  time (Ŵ is written over W_new), so the peak is about two of the largest managed tensors plus the
  reduce pass's work space. Every other tensor, the safetensors headers and metadata and every
  other file are copied unchanged; sharded checkpoints (``model.safetensors.index.json``) and
  single files both work, and *before* may be sharded differently from *after*. The result
  equals ``HPAOptimizer.end_task`` on the same weights and statistics. The edit is atomic: every
  tensor is checked and planned before anything is written, and the copy is written into a
  temporary folder renamed to ``--out`` only on success.

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

Depth from tensor names (:func:`block_depths`) [decision]: a bare checkpoint has no module tree,
so the block of a tensor is the first dotted component of its (module) name that is a decimal
integer (``model.layers.<i>.…``, ``encoder.layer.<i>.…``, ``transformer.h.<i>.…``), its stack is the
part of the name before it, and the stack's depth L is one more than the largest index of any
tensor in the checkpoint with that stack prefix. p_l then follows ``retention_schedule(L)`` as in
:func:`hpa_kernels.layers.find_hpa_layers`, which gives the same depths for Hugging Face models. A
managed tensor whose name has no integer component takes p_max (as ``HPAConfig.extra_layers``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import ops
from .config import SELECTION_MODES, HPAConfig
from .functional import LayerPlan, LayerReport, plan_layer_update, retention_schedule

__all__ = [
    "adjust_checkpoint",
    "adjust_main",
    "block_depths",
    "calibrate_checkpoint",
    "calibrate_main",
    "checkpoint_files",
    "load_hinv",
    "save_hinv",
]

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
        for name in _header(path)[1]:
            if name in where:
                raise ValueError(f"tensor {name!r} is in both {where[name]} and {path}")
            where[name] = path
    return where


def _header(path: Path) -> tuple[int, dict[str, Any]]:
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


def _images_of(record: Mapping[str, Any], where: str, base: Path) -> list[Path]:
    """The image paths of a JSONL record (``"image"``: a path or a list of them, relative to ``base``)."""
    value = record.get("image")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{where}: 'image' must be a path or a list of paths, got {value!r}")
    paths = [Path(v) if Path(v).is_absolute() else base / v for v in values]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{where}: image {path} does not exist")
    return paths


def _cut(sample: dict[str, Tensor], max_length: int, keep_id: int | None) -> dict[str, Tensor]:
    """``sample`` cut to ``max_length`` positions, but never before its last ``keep_id`` token (an
    image's tokens must all stay, with their pixel values). Cuts every (1, T) tensor along T."""
    ids = sample["input_ids"]
    length = ids.shape[-1]
    keep = max_length
    if keep_id is not None:
        positions = (ids[0] == keep_id).nonzero()
        if positions.numel():
            keep = max(keep, int(positions[-1]) + 1)
    if length <= keep:
        return sample
    return {k: v[..., :keep] if isinstance(v, Tensor) and v.shape == ids.shape else v for k, v in sample.items()}


def _read_jsonl(
    path: Path,
    fields: Sequence[str],
    tokenizer: Any,
    max_length: int,
    max_samples: int | None,
    processor: Any = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[dict[str, Tensor]]:
    """One batch of model inputs per JSONL line (see :func:`calibrate_checkpoint`), lazily."""
    from transformers.image_utils import load_image

    count = 0
    image_token = getattr(processor, "image_token", None)
    image_id = getattr(processor, "image_token_id", None)
    if image_id is None and image_token is not None:
        image_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    with open(path) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            record = json.loads(line)
            images = _images_of(record, where, path.parent)
            if images and processor is None:
                raise ValueError(f"{where}: image samples need the model's processor (AutoProcessor)")
            pictures = [load_image(str(image)) for image in images]
            if "input_ids" in record:
                ids = torch.tensor([record["input_ids"]], dtype=torch.long)
                sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if pictures:  # the ids hold the image tokens already: only the pixel values are read
                    sample.update(processor.image_processor(images=pictures, return_tensors="pt"))
            else:
                missing = [field for field in fields if field not in record]
                if missing and not images:
                    raise ValueError(f"{where}: no field {missing} (and no input_ids)")
                text = "\n".join(str(record[field]) for field in fields if field in record)
                if processor is not None:
                    if images and image_token is not None and image_token not in text:
                        text = image_token * len(images) + "\n" * bool(text) + text  # [decision] images first
                    sample = dict(processor(text=text, images=pictures or None, return_tensors="pt"))
                elif tokenizer is None:
                    raise ValueError(f"{where}: text samples need a tokenizer")
                else:
                    sample = dict(tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt"))
            sample = _cut(sample, max_length, image_id if pictures else None)
            sample = {
                k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in sample.items()
            }
            if sample["input_ids"].numel() == 0:
                continue
            yield sample
            count += 1
            if max_samples is not None and count >= max_samples:
                return


def _model_class(model_dir: Path, auto_class: str | None) -> Any:
    """The class that loads ``model_dir``: ``transformers.<auto_class>``, else the class its
    ``config.json`` names (``architectures``), else ``AutoModelForCausalLM``."""
    import transformers

    if auto_class is not None:
        return getattr(transformers, auto_class)
    config_path = model_dir / "config.json"
    architectures = json.loads(config_path.read_text()).get("architectures") if config_path.is_file() else None
    found = getattr(transformers, architectures[0], None) if architectures else None
    return found if found is not None else transformers.AutoModelForCausalLM


def calibrate_checkpoint(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    fields: Sequence[str] = ("text",),
    max_samples: int | None = None,
    max_length: int = 512,
    auto_class: str | None = None,
    tokenizer_dir: str | Path | None = None,
    config: HPAConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Per-layer ``hinv`` vectors of the model in ``model_dir`` on a JSONL calibration set (HPA_SPEC.md Step 0).

    Each JSONL line is one sample (one forward, no padding):

    * ``{"input_ids": [...]}``: token ids as given;
    * text fields (``fields``), joined by newlines and tokenized by the directory's tokenizer;
    * either of them with ``"image"``: a path (relative to the JSONL file, or absolute) or a list of
      paths. Then every line is read with the model's own processor (``AutoProcessor`` of
      ``tokenizer_dir`` or ``model_dir``), which expands the image tokens and gives the pixel values
      (and whatever else the model takes, e.g. ``image_sizes``). [decision] A text without the
      processor's image token gets one per image in front (``<image>\\n`` + text); a line with
      an image may have no text field. ``input_ids`` lines with an image must hold its tokens
      already (only the pixel values are read). Text-only lines still work in the same file.

    Each sample is cut to ``max_length`` tokens, never inside its image tokens. The forwards run
    through :func:`hpa_kernels.integrations.calibrate` (the in-memory path), so the decoder layers
    count the image tokens and the tower's layers (when managed) count the patches. Layers are
    those of :func:`hpa_kernels.layers.find_hpa_layers`; nothing leaves the machine
    (``local_files_only``).

    Args:
        model_dir: a ``save_pretrained`` directory.
        data: the JSONL file.
        out: where to write the safetensors file (``None``: do not write).
        fields: the text fields of a line (e.g. ``("prompt", "response")``).
        max_samples: use at most this many lines (e.g. ``HPAConfig.safety_samples``).
        max_length: truncate each sample to this many tokens.
        auto_class: the ``transformers`` class that loads the model (``AutoModelForCausalLM``,
            ``AutoModelForSequenceClassification``, …); default: the class named in the
            directory's ``config.json`` (``architectures``), else ``AutoModelForCausalLM``.
        tokenizer_dir: where the tokenizer / processor is (default ``model_dir``; unused for
            ``input_ids`` lines without images).
        config: gives ``damping``, ``include``, ``exclude`` and ``extra_layers``.
        dtype: the model's dtype for the forwards (statistics accumulate in fp32 anyway).

    Returns:
        ``{weight parameter name: (in_features,) float32}``, as written.

    Raises:
        ValueError: an empty calibration set, a line without the fields, a missing image, images
            without a processor, a layer without tokens.
    """
    import transformers

    from .integrations import calibrate
    from .optim import HPAOptimizer

    config = config or HPAConfig()
    model_dir, data = Path(model_dir), Path(data)
    model_cls = _model_class(model_dir, auto_class)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in v5
    model = model_cls.from_pretrained(str(model_dir), local_files_only=True, **{dtype_key: dtype}).eval()
    needs_processor = needs_tokenizer = False
    with open(data) as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                needs_processor = needs_processor or record.get("image") is not None
                needs_tokenizer = needs_tokenizer or "input_ids" not in record
    source = str(tokenizer_dir or model_dir)
    tokenizer = processor = None
    if needs_processor:
        try:
            processor = transformers.AutoProcessor.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{data}: lines with an image need the model's processor, and {source} has none ({error})"
            ) from error
        if not hasattr(processor, "image_processor"):
            raise ValueError(f"{data}: lines with an image need the model's processor, and {source} has none")
    elif needs_tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    samples = _read_jsonl(data, fields, tokenizer, max_length, max_samples, processor, dtype)
    first = next(samples, None)
    if first is None:
        raise ValueError(f"{data}: no calibration sample")
    counted = [0]

    def batches() -> Iterator[dict[str, Tensor]]:
        for sample in itertools.chain([first], samples):
            counted[0] += 1
            yield sample

    # The in-memory path: the same layers as HPAOptimizer.from_model, the same masks and forwards.
    optimizer = HPAOptimizer.from_model(model, hpa=config, master_weights=False)
    hinv = calibrate(model, optimizer, batches())
    if out is not None:
        save_hinv(hinv, out, {"hpa.samples": str(counted[0]), "hpa.damping": str(config.damping)})
    return {f"{name}.weight": vec for name, vec in hinv.items()}


def _skeleton(directory: Path) -> Any:
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


def _loading_names(skeleton: Any, stored: Iterable[str]) -> dict[str, tuple[str, bool]]:
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


def _check_files(files: Mapping[str, Path], what: str) -> dict[str, dict[str, Any]]:
    """``{tensor name: header entry}`` of a checkpoint, checking that every file its index names
    exists and holds the tensors the index puts there.

    Raises:
        ValueError: a missing file, or a tensor the index places in a file that does not hold it.
    """
    headers: dict[Path, dict[str, Any]] = {}
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise ValueError(f"{what}: the index names {path}, which does not exist")
        headers[path] = _header(path)[1]
    for name, path in files.items():
        if name not in headers[path]:
            raise ValueError(f"{what}: the index puts {name!r} in {path.name}, which does not hold it")
    entries: dict[str, dict[str, Any]] = {}
    for header in headers.values():
        entries.update(header)
    return entries


def _resolve_names(
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
    loading = {what: _loading_names(skeleton, names) for what, names in entries.items()}
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


def _stored_transposed(skeleton: Any) -> set[str]:
    """The weight names of the skeleton's layers stored (in_features, out_features) (``Conv1D``)."""
    if skeleton is None:
        return set()
    from torch import nn

    from .layers import is_linear

    return {
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if is_linear(module) and not isinstance(module, nn.Linear)
    }


def adjust_checkpoint(
    before: str | Path,
    after: str | Path,
    safety: str | Path | Mapping[str, Tensor],
    task: str | Path | Mapping[str, Tensor],
    out: str | Path,
    *,
    config: HPAConfig | None = None,
    backend: str = "auto",
    transposed: Iterable[str] = (),
) -> dict[str, LayerReport]:
    """HPA_SPEC.md Steps 1–3 on checkpoint directories, tensor by tensor (see the module doc).

    Atomic: a first pass checks everything (the backend, the indexes against their files, names,
    shapes, dtypes, hinv vectors) and plans every tensor (Steps 1–2 and c_l, which also catches
    NaN / Inf in either checkpoint) with nothing written; a second pass writes the copy into a
    temporary folder beside ``out`` (re-reading each W_prev, W_new once more: twice the reads of
    one pass) that is renamed to ``out`` only when every tensor is written. A failure leaves no
    ``out`` (an empty ``out`` that existed stays as it was) and no temporary folder.

    Names and layouts come from the model of the *after* checkpoint's ``config.json`` (else
    *before*'s), built on the meta device: stored names are mapped to module names by its
    conversion rules, and its ``Conv1D`` weights (stored (in, out)) are planned and edited on
    their (out, in) view, HPA's columns being the input features (module doc).

    Args:
        before: the checkpoint W_prev (before the task).
        after: the checkpoint W_new (after it); ``out`` gets its layout and every file of it.
        safety, task: hinv files of :func:`calibrate_checkpoint` / :func:`save_hinv` (or their
            ``{weight name: (c,)}`` contents), keyed by module weight name or by the name stored
            in a checkpoint; their common keys are the tensors edited.
        out: the new directory (must not exist, or be empty).
        config: HPA knobs (``p_max``, ``p_min``, ``focus_multiplier``, ``alpha_bounds``,
            ``orthogonal``, ``selection``).
        backend: kernels backend of the two passes (CPU tensors).
        transposed: more tensors (hinv keys) stored (in_features, out_features), besides the
            ``Conv1D`` weights of the model of ``config.json``.

    Returns:
        ``{hinv key: LayerReport}``.

    Raises:
        FileExistsError: ``out`` exists and is not empty.
        ValueError: an unknown or unavailable backend, an index naming a missing file or a file
            without the tensor, the two hinv files naming different tensors, a named tensor
            missing from a checkpoint or stored in a converted form, shapes or dtypes that differ
            between the checkpoints, a hinv of the wrong length (c = the input features) or not
            positive, NaN / Inf in a named tensor, or a projection coefficient that overflows (the
            tensor is named); all before anything is written.
        RuntimeError / OSError: while writing (``out`` is then not created).

    Warns:
        UserWarning: a ``config.json`` whose model cannot be built (names taken as stored).
    """
    from safetensors import safe_open

    config = config or HPAConfig()
    backend = ops.resolve_backend(backend, torch.device("cpu"))
    hinv_safety = dict(safety) if isinstance(safety, Mapping) else load_hinv(safety)
    hinv_task = dict(task) if isinstance(task, Mapping) else load_hinv(task)
    if set(hinv_safety) != set(hinv_task):
        raise ValueError(f"safety and task hinv name different tensors: {sorted(set(hinv_safety) ^ set(hinv_task))}")
    before, after = Path(before), Path(after)
    before_files, after_files = checkpoint_files(before), checkpoint_files(after)
    entries = {"before": _check_files(before_files, "before"), "after": _check_files(after_files, "after")}
    skeleton = _skeleton(after)
    if skeleton is None:
        skeleton = _skeleton(before)
    modules, stored, after_modules = _resolve_names(hinv_task, entries, skeleton)
    flipped = _stored_transposed(skeleton) | {modules.get(name, name) for name in transposed}
    del skeleton
    columns: dict[str, int] = {}
    for name in hinv_task:
        kinds = [
            (entries[what][stored[name][what]]["shape"], entries[what][stored[name][what]]["dtype"]) for what in entries
        ]
        if kinds[0] != kinds[1] or len(kinds[1][0]) != 2:
            raise ValueError(f"{name!r}: before {kinds[0]} and after {kinds[1]} must be one 2-D shape and dtype")
        rows_cols = kinds[1][0]
        columns[name] = rows_cols[0] if modules[name] in flipped else rows_cols[1]  # the input features
        layout = "(in, out)" if modules[name] in flipped else "(out, in)"
        for kind, vec in (("safety", hinv_safety[name]), ("task", hinv_task[name])):
            if vec.shape != (columns[name],) or not bool(torch.isfinite(vec).all() and (vec > 0).all()):
                raise ValueError(
                    f"{kind} hinv of {name!r} (stored {layout} {tuple(rows_cols)}) must be ({columns[name]},), "
                    "finite and > 0"
                )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")

    depths = block_depths([modules[name] for name in hinv_task], after_modules)
    ratios = {}
    for name in hinv_task:
        block, count = depths[modules[name]]
        ratios[name] = config.p_max if block is None else retention_schedule(count, config.p_max, config.p_min)[block]

    def view(name: str, tensor: Tensor) -> Tensor:
        """The (out, in) view HPA plans and edits on (HPA_SPEC.md: columns = input features)."""
        return tensor.T if modules[name] in flipped else tensor

    with ExitStack() as stack:
        opened: dict[Path, Any] = {}

        def pair(name: str) -> tuple[Tensor, Tensor]:
            paths = before_files[stored[name]["before"]], after_files[stored[name]["after"]]
            for path in paths:
                if path not in opened:
                    opened[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return (
                opened[paths[0]].get_tensor(stored[name]["before"]),
                opened[paths[1]].get_tensor(stored[name]["after"]),
            )

        plans: dict[str, LayerPlan] = {}
        for name in sorted(hinv_task):  # pass 1: every check and every plan, nothing written
            w_prev, w_new = pair(name)
            try:
                plans[name] = plan_layer_update(
                    view(name, w_prev),
                    view(name, w_new),
                    hinv_safety[name],
                    hinv_task[name],
                    ratios[name],
                    config=config,
                    backend=backend,
                )
            except ValueError as error:
                raise ValueError(f"{name!r}: {error}") from error
            if not math.isfinite(plans[name].coef):
                raise ValueError(f"{name!r}: the projection coefficient overflows")
            del w_prev, w_new

        key_of = {stored[name]["after"]: name for name in plans}
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            shutil.copytree(after, staging, dirs_exist_ok=True)
            for path in sorted(set(after_files.values())):  # pass 2: the writes, into the staging copy
                data_start, header = _header(path)
                edits = sorted((entry["data_offsets"][0], key) for key, entry in header.items() if key in key_of)
                if not edits:
                    continue
                with open(staging / path.relative_to(after), "r+b") as target:
                    for offset, key in edits:
                        name = key_of[key]
                        w_prev, w_new = pair(name)
                        plan = plans[name]
                        # Ŵ over W_new through the (out, in) view: W_new keeps its storage layout.
                        ops.hpa_apply(
                            view(name, w_prev),
                            view(name, w_new),
                            plan.mask,
                            plan.coef,
                            out=view(name, w_new),
                            backend=backend,
                        )
                        del w_prev
                        raw = w_new.contiguous().reshape(-1).view(torch.uint8).numpy()
                        begin, end = header[key]["data_offsets"]
                        if raw.nbytes != end - begin:
                            raise RuntimeError(f"{name!r}: {raw.nbytes} bytes to write into {end - begin}")
                        target.seek(data_start + offset)
                        target.write(memoryview(raw))
                        del w_new, raw
            if out.exists():
                out.rmdir()  # empty (checked above)
            staging.rename(out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return {name: plans[name].report(ratios[name]) for name in hinv_task}


def calibrate_main(argv: Sequence[str] | None = None) -> int:
    """``hpa-calibrate``: per-layer hinv vectors of a local model on a JSONL set → a safetensors file."""
    parser = argparse.ArgumentParser(prog="hpa-calibrate", description=calibrate_main.__doc__)
    parser.add_argument("--model", required=True, help="a save_pretrained directory (local)")
    parser.add_argument(
        "--data",
        required=True,
        help="JSONL: one sample a line, input_ids or text fields, optionally with an 'image' path "
        "(relative to the file) read with the model's processor",
    )
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    parser.add_argument("--field", default="text", help="text field(s), comma-separated, joined by newlines")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--auto-class", default=None, help="transformers class to load with (default: config.json's architectures)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer / processor directory (default: --model)")
    parser.add_argument("--damping", type=float, default=HPAConfig().damping)
    parser.add_argument("--extra-layer", action="append", default=[], help="an nn.Linear outside the blocks")
    parser.add_argument("--include", action="append", default=[], help="fnmatch pattern of more layers to manage")
    parser.add_argument("--exclude", action="append", default=[], help="fnmatch pattern of layers never managed")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    hinv = calibrate_checkpoint(
        args.model,
        args.data,
        args.out,
        fields=[field.strip() for field in args.field.split(",") if field.strip()],
        max_samples=args.max_samples,
        max_length=args.max_length,
        auto_class=args.auto_class,
        tokenizer_dir=args.tokenizer,
        config=HPAConfig(
            damping=args.damping,
            extra_layers=tuple(args.extra_layer),
            include=tuple(args.include),
            exclude=tuple(args.exclude),
        ),
        dtype=getattr(torch, args.dtype),
    )
    print(f"hpa-calibrate: {len(hinv)} layers -> {args.out}")
    return 0


def adjust_main(argv: Sequence[str] | None = None) -> int:
    """``hpa-adjust``: HPA's end-of-task edit on safetensors checkpoints, streaming tensor by tensor."""
    defaults = HPAConfig()
    parser = argparse.ArgumentParser(prog="hpa-adjust", description=adjust_main.__doc__)
    parser.add_argument("--before", required=True, help="checkpoint directory before the task (W_prev)")
    parser.add_argument("--after", required=True, help="checkpoint directory after the task (W_new)")
    parser.add_argument("--safety", required=True, help="hinv file of the safety set on --before")
    parser.add_argument("--task", required=True, help="hinv file of the task set on --after")
    parser.add_argument("--out", required=True, help="new checkpoint directory")
    parser.add_argument("--p-max", type=float, default=defaults.p_max, help="retain ratio of the first block")
    parser.add_argument("--p-min", type=float, default=defaults.p_min, help="retain ratio of the last block")
    parser.add_argument("--focus-multiplier", type=float, default=defaults.focus_multiplier)
    parser.add_argument("--alpha-bounds", type=float, nargs=2, default=list(defaults.alpha_bounds))
    parser.add_argument("--no-orthogonal", action="store_true", help="skip Step 3's projection (ablation)")
    parser.add_argument("--selection", choices=SELECTION_MODES, default=defaults.selection)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    config = HPAConfig(
        p_max=args.p_max,
        p_min=args.p_min,
        focus_multiplier=args.focus_multiplier,
        alpha_bounds=tuple(args.alpha_bounds),
        orthogonal=not args.no_orthogonal,
        selection=args.selection,
    )
    reports = adjust_checkpoint(
        args.before, args.after, args.safety, args.task, args.out, config=config, backend=args.backend
    )
    retained = sum(report.num_retained for report in reports.values())
    columns = sum(report.num_columns for report in reports.values())
    print(f"hpa-adjust: edited {len(reports)} tensors, retained {retained} of {columns} columns -> {args.out}")
    return 0
