"""HPA on safetensors checkpoints, without the model in memory: ``hpa-calibrate`` and ``hpa-adjust``.

The paper's edit is post-hoc (HPA_SPEC.md § Setting): given the checkpoint before a task, the
checkpoint after it and the two calibration statistics, Steps 1–3 need one layer at a time.

* :func:`calibrate_checkpoint` (``hpa-calibrate``): loads a Hugging Face model from a local
  directory, runs it on a JSONL calibration set and writes the ``hinv`` vector of every managed
  layer (HPA_SPEC.md Step 0) to a safetensors file, keyed by the layer's **weight tensor name**
  (``model.layers.0.self_attn.q_proj.weight``), the name it has in the checkpoint.
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

Depth from tensor names (:func:`block_depths`) [decision]: a bare checkpoint has no module tree,
so the block of a tensor is the first dotted component of its name that is a decimal integer
(``model.layers.<i>.…``, ``encoder.layer.<i>.…``, ``transformer.h.<i>.…``), its stack is the part of
the name before it, and the stack's depth L is one more than the largest index of any tensor in
the checkpoint with that stack prefix. p_l then follows ``retention_schedule(L)`` as in
:func:`hpa_kernels.layers.find_hpa_layers`, which gives the same depths for Hugging Face models. A
managed tensor whose name has no integer component takes p_max (as ``HPAConfig.extra_layers``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import ops
from .config import SELECTION_MODES, HPAConfig
from .functional import LayerPlan, plan_layer_update, retention_schedule
from .optim import LayerReport

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


def _read_jsonl(path: Path, fields: Sequence[str], tokenizer: Any, max_length: int, max_samples: int | None):
    samples = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "input_ids" in record:
                ids = torch.tensor(record["input_ids"], dtype=torch.long)[:max_length]
            else:
                missing = [field for field in fields if field not in record]
                if missing:
                    raise ValueError(f"{path}:{line_number}: no field {missing} (and no input_ids)")
                if tokenizer is None:
                    raise ValueError(f"{path}:{line_number}: text samples need a tokenizer")
                text = "\n".join(str(record[field]) for field in fields)
                ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"][0]
            if ids.numel() > 0:
                samples.append(ids.unsqueeze(0))
            if max_samples is not None and len(samples) >= max_samples:
                break
    if not samples:
        raise ValueError(f"{path}: no calibration sample")
    return samples


def calibrate_checkpoint(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    fields: Sequence[str] = ("text",),
    max_samples: int | None = None,
    max_length: int = 512,
    auto_class: str = "AutoModelForCausalLM",
    tokenizer_dir: str | Path | None = None,
    config: HPAConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Per-layer ``hinv`` vectors of the model in ``model_dir`` on a JSONL calibration set (HPA_SPEC.md Step 0).

    Each JSONL line is one sample: ``{"input_ids": [...]}``, or text fields joined by newlines and
    tokenized by the directory's tokenizer. One sample per forward (no padding). Layers are those
    of :func:`hpa_kernels.layers.find_hpa_layers`; nothing leaves the machine (``local_files_only``).

    Args:
        model_dir: a ``save_pretrained`` directory.
        data: the JSONL file.
        out: where to write the safetensors file (``None``: do not write).
        fields: the text fields of a line (e.g. ``("prompt", "response")``).
        max_samples: use at most this many lines (e.g. ``HPAConfig.safety_samples``).
        max_length: truncate each sample to this many tokens.
        auto_class: the ``transformers`` auto class that loads the model, so that module names
            match the checkpoint's tensor names (``AutoModelForCausalLM``,
            ``AutoModelForSequenceClassification``, …).
        tokenizer_dir: where the tokenizer is (default ``model_dir``; unused for ``input_ids`` lines).
        config: gives ``damping`` and ``extra_layers``.
        dtype: the model's dtype for the forwards (statistics accumulate in fp32 anyway).

    Returns:
        ``{weight tensor name: (in_features,) float32}``, as written.

    Raises:
        ValueError: an empty calibration set, a line without the fields, a layer without tokens.
    """
    import transformers

    from .calibration import HessianCollector
    from .layers import find_hpa_layers

    config = config or HPAConfig()
    model_cls = getattr(transformers, auto_class)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in v5
    model = model_cls.from_pretrained(str(model_dir), local_files_only=True, **{dtype_key: dtype}).eval()
    tokenizer = None
    with open(data) as handle:
        needs_tokenizer = any(line.strip() and "input_ids" not in json.loads(line) for line in handle)
    if needs_tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir), local_files_only=True)
    samples = _read_jsonl(Path(data), fields, tokenizer, max_length, max_samples)
    layers = find_hpa_layers(model, config)
    with torch.no_grad(), HessianCollector(model, layers) as collector:
        for ids in samples:
            model(input_ids=ids)
    hinv = collector.hinv(config.damping)
    if out is not None:
        save_hinv(hinv, out, {"hpa.samples": str(len(samples)), "hpa.damping": str(config.damping)})
    return {f"{name}.weight": vec for name, vec in hinv.items()}


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


def adjust_checkpoint(
    before: str | Path,
    after: str | Path,
    safety: str | Path | Mapping[str, Tensor],
    task: str | Path | Mapping[str, Tensor],
    out: str | Path,
    *,
    config: HPAConfig | None = None,
    backend: str = "auto",
) -> dict[str, LayerReport]:
    """HPA_SPEC.md Steps 1–3 on checkpoint directories, tensor by tensor (see the module doc).

    Atomic: a first pass checks everything (the backend, the indexes against their files, names,
    shapes, dtypes, hinv vectors) and plans every tensor (Steps 1–2 and c_l, which also catches
    NaN / Inf in either checkpoint) with nothing written; a second pass writes the copy into a
    temporary folder beside ``out`` (re-reading each W_prev, W_new once more: twice the reads of
    one pass) that is renamed to ``out`` only when every tensor is written. A failure leaves no
    ``out`` (an empty ``out`` that existed stays as it was) and no temporary folder.

    Args:
        before: the checkpoint W_prev (before the task).
        after: the checkpoint W_new (after it); ``out`` gets its layout and every file of it.
        safety, task: hinv files of :func:`calibrate_checkpoint` / :func:`save_hinv` (or their
            ``{weight tensor name: (c,)}`` contents); their common keys are the tensors edited.
        out: the new directory (must not exist, or be empty).
        config: HPA knobs (``p_max``, ``p_min``, ``focus_multiplier``, ``alpha_bounds``,
            ``orthogonal``, ``selection``).
        backend: kernels backend of the two passes (CPU tensors).

    Returns:
        ``{weight tensor name: LayerReport}``.

    Raises:
        FileExistsError: ``out`` exists and is not empty.
        ValueError: an unknown or unavailable backend, an index naming a missing file or a file
            without the tensor, the two hinv files naming different tensors, a named tensor
            missing from a checkpoint, shapes or dtypes that differ between the checkpoints, a hinv
            of the wrong length or not positive, NaN / Inf in a named tensor, or a projection
            coefficient that overflows (the tensor is named); all before anything is written.
        RuntimeError / OSError: while writing (``out`` is then not created).
    """
    from safetensors import safe_open

    config = config or HPAConfig()
    backend = ops.resolve_backend(backend, torch.device("cpu"))
    hinv_safety = dict(safety) if isinstance(safety, Mapping) else load_hinv(safety)
    hinv_task = dict(task) if isinstance(task, Mapping) else load_hinv(task)
    if set(hinv_safety) != set(hinv_task):
        raise ValueError(f"safety and task hinv name different tensors: {sorted(set(hinv_safety) ^ set(hinv_task))}")
    before_files, after_files = checkpoint_files(before), checkpoint_files(after)
    before_entries, after_entries = _check_files(before_files, "before"), _check_files(after_files, "after")
    for name in hinv_task:
        if name not in after_entries or name not in before_entries:
            raise ValueError(f"{name!r} is not in both checkpoints")
        kinds = [(entry["shape"], entry["dtype"]) for entry in (before_entries[name], after_entries[name])]
        if kinds[0] != kinds[1] or len(kinds[1][0]) != 2:
            raise ValueError(f"{name!r}: before {kinds[0]} and after {kinds[1]} must be one 2-D shape and dtype")
        columns = kinds[1][0][1]
        for kind, vec in (("safety", hinv_safety[name]), ("task", hinv_task[name])):
            if vec.shape != (columns,) or not bool(torch.isfinite(vec).all() and (vec > 0).all()):
                raise ValueError(f"{kind} hinv of {name!r} must be ({columns},), finite and > 0")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")

    depths = block_depths(hinv_task, after_files)
    ratios = {
        name: config.p_max if block is None else retention_schedule(count, config.p_max, config.p_min)[block]
        for name, (block, count) in depths.items()
    }
    with ExitStack() as stack:
        opened: dict[Path, Any] = {}

        def pair(name: str) -> tuple[Tensor, Tensor]:
            for path in (before_files[name], after_files[name]):
                if path not in opened:
                    opened[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return opened[before_files[name]].get_tensor(name), opened[after_files[name]].get_tensor(name)

        plans: dict[str, LayerPlan] = {}
        for name in sorted(hinv_task):  # pass 1: every check and every plan, nothing written
            w_prev, w_new = pair(name)
            try:
                plans[name] = plan_layer_update(
                    w_prev,
                    w_new,
                    hinv_safety[name],
                    hinv_task[name],
                    ratios[name],
                    alpha_bounds=config.alpha_bounds,
                    focus_multiplier=config.focus_multiplier,
                    orthogonal=config.orthogonal,
                    mode=config.selection,
                    backend=backend,
                )
            except ValueError as error:
                raise ValueError(f"{name!r}: {error}") from error
            if not math.isfinite(plans[name].coef):
                raise ValueError(f"{name!r}: the projection coefficient overflows")
            del w_prev, w_new

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            shutil.copytree(after, staging, dirs_exist_ok=True)
            for path in sorted(set(after_files.values())):  # pass 2: the writes, into the staging copy
                data_start, header = _header(path)
                edits = sorted((entry["data_offsets"][0], name) for name, entry in header.items() if name in plans)
                if not edits:
                    continue
                with open(staging / path.relative_to(after), "r+b") as target:
                    for offset, name in edits:
                        w_prev, w_new = pair(name)
                        plan = plans[name]
                        edited = ops.hpa_apply(w_prev, w_new, plan.mask, plan.coef, out=w_new, backend=backend)
                        del w_prev
                        raw = edited.contiguous().reshape(-1).view(torch.uint8).numpy()
                        begin, end = header[name]["data_offsets"]
                        if raw.nbytes != end - begin:
                            raise RuntimeError(f"{name!r}: {raw.nbytes} bytes to write into {end - begin}")
                        target.seek(data_start + offset)
                        target.write(memoryview(raw))
                        del edited, w_new, raw
            if out.exists():
                out.rmdir()  # empty (checked above)
            staging.rename(out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return {
        name: LayerReport(
            retain_ratio=ratios[name],
            alpha=plans[name].alpha,
            num_safety=plans[name].num_safety,
            num_task=plans[name].num_task,
            num_shared=plans[name].num_shared,
            num_retained=plans[name].num_retained,
            num_columns=after_entries[name]["shape"][1],
            coef=plans[name].coef,
        )
        for name in hinv_task
    }


def calibrate_main(argv: Sequence[str] | None = None) -> int:
    """``hpa-calibrate``: per-layer hinv vectors of a local model on a JSONL set → a safetensors file."""
    parser = argparse.ArgumentParser(prog="hpa-calibrate", description=calibrate_main.__doc__)
    parser.add_argument("--model", required=True, help="a save_pretrained directory (local)")
    parser.add_argument("--data", required=True, help="JSONL: one sample a line, input_ids or text fields")
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    parser.add_argument("--field", default="text", help="text field(s), comma-separated, joined by newlines")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--auto-class", default="AutoModelForCausalLM", help="transformers auto class to load with")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    parser.add_argument("--damping", type=float, default=HPAConfig().damping)
    parser.add_argument("--extra-layer", action="append", default=[], help="an nn.Linear outside the blocks")
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
        config=HPAConfig(damping=args.damping, extra_layers=tuple(args.extra_layer)),
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
