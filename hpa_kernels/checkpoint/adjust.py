"""``hpa-adjust``'s core: :func:`adjust_checkpoint`, HPA_SPEC.md Steps 1–3 streamed over the
safetensors files of the checkpoints before and after a task, written atomically."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..config import HPAConfig
from ..functional import LayerPlan, LayerReport, plan_layer_update, retention_schedule
from .files import block_depths, checkpoint_files, load_hinv, read_header
from .names import check_files, meta_model, resolve_names, stored_transposed


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
    entries = {"before": check_files(before_files, "before"), "after": check_files(after_files, "after")}
    skeleton = meta_model(after)
    if skeleton is None:
        skeleton = meta_model(before)
    modules, stored, after_modules = resolve_names(hinv_task, entries, skeleton)
    flipped = stored_transposed(skeleton) | {modules.get(name, name) for name in transposed}
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
                data_start, header = read_header(path)
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
