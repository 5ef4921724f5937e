"""HPA across data-parallel ranks and sharded parameters.

Everything here rides on PyTorch's own engines: ``torch.distributed`` collectives, DTensor
(what ``torch.distributed.fsdp.fully_shard`` makes of each parameter) and
``torch.distributed.checkpoint``. Nothing runs a collective unless ``torch.distributed`` is
initialised, so single-process code never pays for it.

* Calibration (HPA_SPEC.md Step 0): :class:`hpa_kernels.HessianCollector` sums XᵀX and the token
  count over the data-parallel ranks before it forms H = (2/n)·XᵀX (:func:`resolve_group`,
  :func:`all_reduce_`).
* The edit (Steps 1–3) on DTensor weights sharded by rows (FSDP2 shards dim 0):
  :func:`plan_sharded_layers` reduces each rank's rows to the column energy **sums**
  Σᵢ ΔWᵢⱼ² (sums, not means, so uneven and empty shards add up), ⟨ΔW, W_prev⟩_F and ‖W_prev‖_F²,
  all-reduces those c + 2 numbers per layer in one collective, runs the selection, and takes the
  plan (mask, c_l, α_l) of the mesh's first rank; each rank then writes its own rows
  (:func:`local_tensor`).
* Same columns on every rank, by construction: nothing proves that an all-reduce hands every rank
  the same bits (the reduction order of gloo, NCCL and MPI is theirs), nor that the linear algebra
  after it does, so the last quantities a selection reads are broadcast from the group's first
  rank: diag(H⁻¹) of the calibration (:meth:`HessianCollector.hinv`,
  :func:`broadcast_vectors_from_first`) and the plan of each sharded layer
  (:func:`plan_sharded_layers`), each c + O(1) numbers per layer in one broadcast per call (per
  mesh dimension).
  Replicated (DDP) layers plan locally on those broadcast vectors and on weights that DDP keeps
  equal, with the one summation order of ``ops.hpa_reduce``, so their plans agree too.
* The AdamW step is elementwise: it runs on each rank's local shard (:func:`local_tensor`).

Checkpoints: ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
``set_optimizer_state_dict`` carry ``HPAOptimizer``'s per-parameter state (``exp_avg``,
``exp_avg_sq`` and, inside a task, ``hpa_prev`` are DTensors under FSDP2; ``step`` and
``hpa_hinv_safety`` are replicated plain tensors). To load a checkpoint taken inside a task, open
the task on the fresh optimizer first (``begin_task``), so that the state it loads into has the
task's keys; the lifecycle flag is restored from the presence of ``hpa_prev``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .config import HPAConfig
from .functional import LayerPlan, column_scores_from_energy, plan_from_scores, resolve_config

try:  # DTensor is public from torch 2.5; older builds simply never hand us one.
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "all_reduce_",
    "all_reduce_calibration",
    "broadcast_from_first_",
    "broadcast_vectors_from_first",
    "is_sharded",
    "local_tensor",
    "plan_sharded_layers",
    "resolve_group",
]


def is_sharded(tensor: Tensor) -> bool:
    """True when ``tensor`` is a DTensor (an FSDP2 / tensor-parallel parameter or its state)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the parameter), else ``tensor``."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def resolve_group(all_reduce: bool | None, process_group: Any = None) -> Any | None:
    """The process group to all-reduce calibration statistics over, or ``None`` for none.

    Args:
        all_reduce: ``True``: always (``torch.distributed`` must be initialised); ``False``: never;
            ``None`` (auto): when ``torch.distributed`` is initialised and the group has more
            than one rank.
        process_group: the data-parallel group (``None``: the default group).

    Raises:
        RuntimeError: ``all_reduce=True`` without an initialised ``torch.distributed``.
    """
    if all_reduce is False:
        return None
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if all_reduce:
            raise RuntimeError("all_reduce=True needs torch.distributed to be initialised")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if all_reduce is None and dist.get_world_size(group) == 1:
        return None
    return group


def all_reduce_(tensor: Tensor, group: Any, op: Any = None) -> Tensor:
    """In-place ``torch.distributed.all_reduce`` (default op SUM) over ``group``; returns ``tensor``."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


def broadcast_from_first_(tensor: Tensor, group: Any) -> Tensor:
    """In-place ``torch.distributed.broadcast`` of the group's first rank's ``tensor``
    (``dist.get_global_rank(group, 0)``) to every rank of ``group``; returns ``tensor``. Collective."""
    device = _collective_device(group, tensor.device)
    on_device = tensor.to(device)
    dist.broadcast(on_device, src=dist.get_global_rank(group, 0), group=group)
    return tensor.copy_(on_device) if on_device is not tensor else tensor


def broadcast_vectors_from_first(
    vectors: list[Tensor | None], sizes: list[int], group: Any, device: torch.device
) -> list[Tensor | None]:
    """The group's first rank's float32 vectors on every rank, in one broadcast. Collective.

    Args:
        vectors: this rank's vectors, ``vectors[i]`` of shape ``(sizes[i],)``, or ``None`` where
            this rank has none (its computation failed).
        sizes: the lengths, equal on every rank.
        group: the process group.
        device: where the results are put.

    Returns:
        The first rank's vectors (float32, on ``device``), ``None`` where that rank had none;
        bit-identical on every rank.
    """
    count = len(sizes)
    payload = torch.zeros(count + sum(sizes), dtype=torch.float32, device=_collective_device(group, device))
    offset = count
    for index, (vector, size) in enumerate(zip(vectors, sizes)):
        if vector is not None:
            if vector.shape != (size,):
                raise ValueError(
                    f"broadcast_vectors_from_first: vector {index} has shape {tuple(vector.shape)}, not ({size},)"
                )
            payload[index] = 1.0  # a flag: this vector exists on the sending rank
            payload[offset : offset + size] = vector.to(payload)
        offset += size
    broadcast_from_first_(payload, group)
    agreed: list[Tensor | None] = []
    offset = count
    for index, size in enumerate(sizes):
        present = bool(payload[index] != 0)
        agreed.append(payload[offset : offset + size].to(device=device, copy=True) if present else None)
        offset += size
    return agreed


def _collective_device(group: Any, fallback: torch.device) -> torch.device:
    """Where a tensor must live for ``group``'s backend: CPU for gloo, else the current accelerator."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        return fallback
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def all_reduce_calibration(
    leaders: list[int],
    xtx: Mapping[int, Tensor],
    tokens: Mapping[int, int],
    columns: list[int],
    group: Any,
) -> tuple[list[int], dict[int, Tensor], dict[int, int]]:
    """Sum calibration statistics over ``group`` (HPA_SPEC.md Step 0 across data-parallel ranks). Collective.

    Layers are numbered 0 … n−1 in the same order on every rank; layers that read one input share
    one XᵀX, owned by the lowest-numbered of them (its *leader*). A rank that never ran a layer
    (no batch, or the layer was skipped) holds nothing for it and adopts the other ranks' grouping.

    Args:
        leaders: per layer, the leader's number on this rank, or −1 for a layer this rank did not see.
        xtx: ``{leader: (c, c) float32 XᵀX}`` of this rank; summed **in place**.
        tokens: ``{leader: token count}`` of this rank.
        columns: per layer, c (for the zeros of a rank that saw no input).
        group: the process group.

    Returns:
        ``(leaders, xtx, tokens)`` agreed on by every rank: leaders (−1 where no rank saw the
        layer) and, per leader, the summed XᵀX and token count.
    """
    count = len(leaders)
    device = _collective_device(group, torch.device("cpu"))
    agreed = torch.tensor([lead if lead >= 0 else count for lead in leaders], dtype=torch.int64, device=device)
    all_reduce_(agreed, group, dist.ReduceOp.MIN)
    agreed_list = [int(lead) if lead < count else -1 for lead in agreed.tolist()]
    owners = sorted({lead for lead in agreed_list if lead >= 0})
    counts = torch.tensor([int(tokens.get(lead, 0)) for lead in owners], dtype=torch.int64, device=device)
    all_reduce_(counts, group)
    sums: dict[int, Tensor] = {}
    for lead in owners:
        local = xtx.get(lead)
        if local is None:
            local = torch.zeros(columns[lead], columns[lead], dtype=torch.float32, device=device)
        on_device = local.to(device)
        all_reduce_(on_device, group)
        sums[lead] = local.copy_(on_device) if on_device is not local else local
    return agreed_list, sums, dict(zip(owners, (int(n) for n in counts.tolist())))


def _row_groups(weight: Tensor, name: str) -> list[Any]:
    """The process groups that shard ``weight``'s rows (one per mesh dimension with Shard(0))."""
    groups = []
    for mesh_dim, placement in enumerate(weight.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            groups.append(weight.device_mesh.get_group(mesh_dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"HPA on sharded parameters needs rows sharded (Shard(0)) or replicated; {name!r} has "
                f"placements {weight.placements} (column sharding would split the selection's c-vectors)"
            )
    return groups


_PLAN_HEADER = 6  # a broadcast plan: [succeeded, alpha, coef, |S|, |T|, |O|], then the c mask entries


def plan_sharded_layers(
    layers: Mapping[str, tuple[Tensor, Tensor, Tensor, Tensor, float]],
    *,
    config: HPAConfig | None = None,
    backend: str = "auto",
    **deprecated: Any,
) -> dict[str, LayerPlan]:
    """HPA_SPEC.md Steps 1–2 and Step 3's c_l for DTensor weights sharded by rows. Collective.

    Each rank reduces its local rows with ``ops.hpa_reduce`` (the float64 column energies
    Σᵢ ΔWᵢⱼ² of its rows, ⟨ΔW, W_prev⟩_F and ‖W_prev‖_F²), then one float64 all-reduce per
    sharding group carries, for every layer, those c + 2 sums. With r the global row count, the
    scores are :func:`hpa_kernels.functional.column_scores_from_energy` of the summed energies::

        ε̄_j = (Σᵢ ΔWᵢⱼ² / r) / hinv_s[j],   ζ̄_j = (Σᵢ ΔWᵢⱼ² / r) / hinv_t[j]

    as :func:`hpa_kernels.functional.plan_layer_update` computes them on the whole matrix (the
    same bits when one rank holds every row).

    All ranks retain the same columns by construction: every rank runs the selection on its
    all-reduced sums, then the plan of the mesh's first rank (coordinate 0 on every mesh
    dimension) is broadcast over each mesh dimension in turn, packed per layer as c + 6 float64
    (mask, α_l, c_l, |S|, |T|, |O|, and whether the selection succeeded), exact for all of them,
    and every rank builds its :class:`LayerPlan` from those bits. [decision] The plan, not the
    c + 2 sums it is computed from, is what is broadcast: it costs the same (c + O(1) numbers per
    layer, one collective per mesh dimension for all the layers of a mesh) and makes the masks and
    c_l equal whatever the ranks' hinv vectors or arithmetic, which broadcasting the sums would
    leave to the hinv vectors being bit-identical. A rank whose own selection failed while the
    first rank's succeeded takes the first rank's plan; where the first rank's failed, every rank
    raises.

    Every rank must call this with the same layer names in the same order.

    Args:
        layers: ``{name: (w_prev, w_new, hinv_safety, hinv_task, retain_ratio)}``; the weights are
            DTensors of global shape (r, c), placements ``Shard(0)`` or ``Replicate()`` on each
            mesh dimension (an empty local shard is fine); the hinv vectors plain (c,) float
            tensors (the first rank's decide the plan).
        config, backend: as :func:`hpa_kernels.functional.plan_layer_update` (the loose
            ``alpha_bounds``, ``focus_multiplier``, ``orthogonal`` and ``mode`` still work, with a
            ``DeprecationWarning``).

    Returns:
        ``{name: LayerPlan}`` in the order of ``layers``; bit-identical on every rank of the mesh.

    Raises:
        ValueError: a weight sharded along columns or partial, mismatched shapes, or a selection
            that failed on the mesh's first rank (non-finite statistics), naming the layer.
    """
    config = resolve_config(config, deprecated, "plan_sharded_layers")
    buckets: dict[tuple[int, ...], list[str]] = {}
    groups_of: dict[tuple[int, ...], list[Any]] = {}
    sums: dict[str, Tensor] = {}
    for name, (w_prev, w_new, hinv_safety, hinv_task, _) in layers.items():
        if w_prev.shape != w_new.shape or len(w_new.shape) != 2:
            raise ValueError(f"{name!r}: w_prev and w_new must be (r, c) of one shape")
        if tuple(w_prev.placements) != tuple(w_new.placements):
            raise ValueError(f"{name!r}: w_prev and w_new are sharded differently")
        columns = w_new.shape[1]
        if hinv_safety.shape != (columns,) or hinv_task.shape != (columns,):
            raise ValueError(f"{name!r}: the hinv vectors must have shape ({columns},)")
        groups = _row_groups(w_new, name)
        prev, new = local_tensor(w_prev), local_tensor(w_new)
        rows = new.shape[0]
        packed = torch.zeros(columns + 2, dtype=torch.float64, device=new.device)
        if rows > 0:
            col_energy, dot, norm_sq = ops.hpa_reduce(prev, new, backend=backend)
            packed[:columns] = col_energy
            packed[columns] = dot.double()
            packed[columns + 1] = norm_sq.double()
        sums[name] = packed
        key = tuple(id(group) for group in groups)
        buckets.setdefault(key, []).append(name)
        groups_of[key] = groups
    for key, names in buckets.items():
        if not groups_of[key]:
            continue  # replicated on every mesh dimension: the local sums are the global ones
        flat = torch.cat([sums[name] for name in names])
        for group in groups_of[key]:
            all_reduce_(flat, group)
        for name, part in zip(names, flat.split([sums[name].numel() for name in names])):
            sums[name] = part
    payloads: dict[str, Tensor] = {}
    failures: dict[str, ValueError] = {}
    meshes: dict[tuple[int, ...], Any] = {}
    mesh_buckets: dict[tuple[int, ...], list[str]] = {}
    for name, (_, w_new, hinv_safety, hinv_task, retain_ratio) in layers.items():
        columns, rows = w_new.shape[1], w_new.shape[0]
        packed = sums[name]
        payload = torch.zeros(_PLAN_HEADER + columns, dtype=torch.float64, device=packed.device)
        try:
            plan = plan_from_scores(
                column_scores_from_energy(packed[:columns], rows, hinv_safety),
                column_scores_from_energy(packed[:columns], rows, hinv_task),
                float(packed[columns]),
                float(packed[columns + 1]),
                retain_ratio,
                config=config,
            )
        except ValueError as error:
            failures[name] = error  # payload[0] stays 0: no plan
        else:
            payload[:_PLAN_HEADER] = torch.tensor(
                [1.0, plan.alpha, plan.coef, plan.num_safety, plan.num_task, plan.num_shared], dtype=torch.float64
            )
            payload[_PLAN_HEADER:] = plan.mask.to(payload)
        payloads[name] = payload
        mesh = w_new.device_mesh
        key = tuple(id(mesh.get_group(dim)) for dim in range(mesh.ndim))
        meshes[key] = mesh
        mesh_buckets.setdefault(key, []).append(name)
    for key, names in mesh_buckets.items():  # every bucket on every rank, before any raise
        flat = _broadcast_over_mesh_(torch.cat([payloads[name] for name in names]), meshes[key])
        for name, part in zip(names, flat.split([payloads[name].numel() for name in names])):
            payloads[name] = part
    plans: dict[str, LayerPlan] = {}
    for name, payload in payloads.items():
        if not bool(payload[0] != 0):
            local = failures.get(name)
            reason = str(local) if local is not None else "the selection failed on the mesh's first rank"
            raise ValueError(f"plan_sharded_layers: {name!r}: {reason}") from local
        head = payload[:_PLAN_HEADER].tolist()
        plans[name] = LayerPlan(payload[_PLAN_HEADER:] != 0, head[1], head[2], int(head[3]), int(head[4]), int(head[5]))
    return plans


def _broadcast_over_mesh_(tensor: Tensor, mesh: Any) -> Tensor:
    """Every rank of ``mesh`` gets the ``tensor`` of the rank at coordinate 0 on every dimension:
    one broadcast per dimension of more than one rank, each from the line's rank at coordinate 0
    of that dimension. After dimension d, ``tensor`` no longer depends on coordinate d, so after
    the last it is one value. (The source is taken from the mesh, not as the group's first rank:
    a mesh may number its ranks in any order, and a line's lowest rank need not sit at
    coordinate 0.) In place; returns ``tensor``. Collective over the mesh."""
    coordinate = mesh.get_coordinate()
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        if dist.get_world_size(group) == 1:
            continue
        index = list(coordinate)
        index[dim] = 0
        source = int(mesh.mesh[tuple(index)])
        on_device = tensor.to(_collective_device(group, tensor.device))
        dist.broadcast(on_device, src=source, group=group)
        if on_device is not tensor:
            tensor.copy_(on_device)
    return tensor
