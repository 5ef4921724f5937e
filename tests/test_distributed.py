"""HPA under DDP and FSDP2 (``fully_shard``): gloo on CPU, 2 and 3 processes spawned by the test.

Each worker runs the whole lifecycle (calibrate on its share of the batches, begin_task, train,
calibrate, end_task) under DDP and under FSDP2, and compares the edited weights with a
single-process run on all the data (done by every worker itself, ``all_reduce=False``). The
model has layers of 7 and 2 output rows: uneven shards on 2 and 3 ranks, and an empty shard on
rank 2 of 3. The optimizer state is saved in the middle of the task with
``torch.distributed.checkpoint`` and loaded into a fresh model and optimizer, whose edit must
match too. Every rank's hinv vectors, masks and projection scalars are gathered and must be
bit-equal; a second test feeds rank 1 deliberately perturbed all-reduce results and checks that
every rank still takes rank 0's. Workers are forked (no re-import of torch) and rendezvous
through a file.
"""

from __future__ import annotations

import copy
import faulthandler
import math

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from hpa_kernels import HessianCollector, HPAOptimizer, calibration, distributed
from hpa_kernels import optim as hpa_optim
from hpa_kernels.distributed import is_sharded, plan_sharded_layers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

VOCAB, WIDTH, DEPTH, CLASSES, GLOBAL_BATCH = 50, 12, 3, 3, 6


class UnevenBlock(nn.Module):
    """``up`` (7 rows) and ``gate`` (2 rows) read one input (one shared Hessian); ``down`` another."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 7)
        self.gate = nn.Linear(WIDTH, 2)
        self.down = nn.Linear(7, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.gate(x)).mean(dim=-1, keepdim=True)
        return self.norm(x + scale * self.down(torch.tanh(self.up(x))))


class UnevenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([UnevenBlock() for _ in range(DEPTH)])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def _batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, VOCAB, (GLOBAL_BATCH, 5), generator=generator),
            torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(count)
    ]


def _calibration_set(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tokens, attention_mask)`` batches with random padding; rows 2 and 5 are all padding,
    so that rank 2 of 3 counts no token at all (it still runs every forward, as FSDP needs)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for tokens, _ in _batches(count, seed):
        lengths = torch.randint(1, tokens.shape[1] + 1, (GLOBAL_BATCH, 1), generator=generator)
        mask = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths
        mask[2::3] = False
        batches.append((tokens, mask))
    return batches


def _calibrate(model, optimizer, batches, rows=slice(None), **collector_kwargs):
    with torch.no_grad(), HessianCollector(model, optimizer.hpa_layers, **collector_kwargs) as collector:
        for tokens, mask in batches:
            collector.set_attention_mask(mask[rows])
            model(tokens[rows])
    return collector.hinv()


def _train(model, optimizer, batches) -> None:
    for tokens, labels in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        optimizer.step()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if is_sharded(tensor) else tensor.detach()


def _edited(model: nn.Module, optimizer: HPAOptimizer) -> dict[str, torch.Tensor]:
    return {name.removeprefix("module."): _full(layer.module.weight) for name, layer in optimizer.hpa_layers.items()}


def _same_on_every_rank(value: object, what: str) -> list[object]:
    """Gather ``value`` from every rank and assert each equals rank 0's; returns the gathered list."""
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    for rank, other in enumerate(gathered):
        assert other == gathered[0], f"{what}: rank {rank} differs from rank 0"
    return gathered


def _vector_bits(vectors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: vec.detach().cpu().contiguous().numpy().tobytes() for name, vec in vectors.items()}


def _plan_bits(plans) -> dict[str, tuple]:
    """A plan as exact bits: the mask, c_l and α_l (float.hex) and the set sizes."""
    return {
        name: (
            plan.mask.cpu().tolist(),
            float(plan.coef).hex(),
            float(plan.alpha).hex(),
            plan.num_safety,
            plan.num_task,
            plan.num_shared,
        )
        for name, plan in plans.items()
    }


def _recording_plans(optimizer: HPAOptimizer) -> dict:
    """The plans ``optimizer.end_task`` writes, recorded as it writes them (``optim.write_edits``
    wrapped in this worker process only)."""
    plans: dict = {}
    write = hpa_optim.write_edits

    def record(new_plans, *args, **kwargs):
        if kwargs["optimizer_state"] is optimizer.state:
            plans.update(new_plans)
        return write(new_plans, *args, **kwargs)

    hpa_optim.write_edits = record
    return plans


def _single_process(base, safety, train_batches, task) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2)
    optimizer.begin_task(_calibrate(model, optimizer, safety, all_reduce=False))
    _train(model, optimizer, train_batches)
    optimizer.end_task(_calibrate(model, optimizer, task, all_reduce=False))
    return _edited(model, optimizer)


def _wrap(base: nn.Module, engine: str) -> nn.Module:
    model = copy.deepcopy(base)
    if engine == "ddp":
        return DistributedDataParallel(model)
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def _run_engine(engine, base, rank, world, safety, train_batches, task, checkpoint_dir, expected) -> None:
    mine = slice(rank, None, world)  # this rank's rows of each global batch (equal sizes: DDP/FSDP mean = global mean)
    model = _wrap(base, engine)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2)
    safety_hinv = _calibrate(model, optimizer, safety, mine)
    optimizer.begin_task(safety_hinv)
    _train(model, optimizer, [(tokens[mine], labels[mine]) for tokens, labels in train_batches])
    task_hinv = _calibrate(model, optimizer, task, mine)

    # Save in the middle of the task (W_prev and hinv_s in the state), load into a fresh copy.
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint_dir)
    restored = _wrap(base, engine)
    restored_optimizer = HPAOptimizer.from_model(restored, lr=1e-2)
    get_state_dict(restored, restored_optimizer)  # torch creates the AdamW moments (a zero step)...
    restored_optimizer.begin_task(safety_hinv)  # ...and an open task the W_prev and hinv_s keys to load into
    model_state, optim_state = get_state_dict(restored, restored_optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=checkpoint_dir)
    set_state_dict(restored, restored_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert restored_optimizer.in_task

    _same_on_every_rank((_vector_bits(safety_hinv), _vector_bits(task_hinv)), f"{engine} hinv")
    plans, restored_plans = _recording_plans(optimizer), _recording_plans(restored_optimizer)
    reports = optimizer.end_task(task_hinv)
    restored_optimizer.end_task(task_hinv)
    assert plans and set(plans) == set(restored_plans)
    _same_on_every_rank(_plan_bits(plans), f"{engine} plans")
    assert _plan_bits(restored_plans) == _plan_bits(plans), f"{engine}: the restored run planned otherwise"
    for name, weight in _edited(model, optimizer).items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=f"{engine} {name}")
    for name, weight in _edited(restored, restored_optimizer).items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=f"{engine} restored {name}")
    assert sum(report.num_retained for report in reports.values()) > 0
    if engine == "fsdp":
        weight = optimizer.hpa_layers["blocks.0.gate"].module.weight
        assert weight.to_local().shape[0] == (0 if rank == 2 else 1)  # the empty shard took part


def _worker(rank: int, world: int, tmp: str) -> None:
    faulthandler.dump_traceback_later(100, exit=True)  # a collective mismatch fails, not hangs
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        base = UnevenNet()
        safety, train_batches, task = _calibration_set(2, seed=1), _batches(4, seed=2), _calibration_set(3, seed=3)
        expected = _single_process(base, safety, train_batches, task)
        for engine in ("ddp", "fsdp"):
            _run_engine(engine, base, rank, world, safety, train_batches, task, f"{tmp}/{engine}", expected)
            dist.barrier()
        # A rank that ran no forward at all (a short data shard, no FSDP) adopts the others' grouping.
        plain = copy.deepcopy(base)
        optimizer = HPAOptimizer.from_model(plain)
        summed = _calibrate(plain, optimizer, safety if rank == 0 else [])
        for name, vec in _calibrate(plain, optimizer, safety, all_reduce=False).items():
            torch.testing.assert_close(summed[name], vec, rtol=1e-6, atol=0, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_and_fsdp2_match_single_process(world: int, tmp_path, monkeypatch) -> None:
    """The edit under DDP and FSDP2 (uneven and empty shards) equals one process within 1e-6,
    and survives a torch.distributed.checkpoint save/load in the middle of the task."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker, args=(world, str(tmp_path)), nprocs=world, start_method="fork")


def _nudging_all_reduce(nudge, real=distributed.all_reduce_):
    """``real`` (the unpatched ``distributed.all_reduce_``) followed, for floating tensors, by
    ``nudge`` of the result."""

    def all_reduce_(tensor, group, op=None):
        real(tensor, group, op)
        if tensor.is_floating_point():
            nudge(tensor)
        return tensor

    return all_reduce_


def _one_ulp_up(tensor: torch.Tensor) -> None:
    tensor.copy_(torch.nextafter(tensor, torch.full_like(tensor, math.inf)))


def _calibration_hinv(model, layers, batches) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(hinv, H) of ``layers`` all-reduced over the ranks, each rank calibrating on its ``batches``."""
    with torch.no_grad(), HessianCollector(model, layers, all_reduce=True) as collector:
        for tokens, mask in batches:
            collector.set_attention_mask(mask)
            model(tokens)
    return collector.hinv(), {name: collector.hessian(name) for name in layers}


def _tied_layer(mesh) -> dict[str, tuple]:
    """One (4, 8) layer sharded by rows over ``mesh`` whose columns 0 and 1 tie exactly for the one
    retained column (ε̄ = 1 for both, 1/16 elsewhere; ζ̄ puts neither in T): the lower index wins.
    ⟨ΔW, W_prev⟩ = 7 and ‖W_prev‖² = 8, so c_l = 0.875 exactly."""
    w_prev = torch.full((4, 8), 0.5)
    delta = torch.full((4, 8), 0.25)
    delta[:, :2] = 1.0
    hinv_task = torch.ones(8)
    hinv_task[:2] = 100.0
    return {
        "tied": (
            distribute_tensor(w_prev, mesh, [Shard(0)]),
            distribute_tensor(w_prev + delta, mesh, [Shard(0)]),
            torch.ones(8),
            hinv_task,
            0.125,
        )
    }


def _nudge_tie(flat: torch.Tensor) -> None:
    """Rank 1's view of the tied layer's sums: column 1's energy one float32 ulp up (it now wins
    the tie) and ⟨ΔW, W_prev⟩ one float64 ulp up (c_l changes in its last bit)."""
    flat[1] = float(torch.nextafter(flat[1].float(), torch.tensor(math.inf)))
    flat[8] = float(torch.nextafter(flat[8], torch.tensor(math.inf, dtype=torch.float64)))


def _perturbed_worker(rank: int, world: int, tmp: str) -> None:
    faulthandler.dump_traceback_later(100, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    real_all_reduce, real_mesh_broadcast = distributed.all_reduce_, distributed._broadcast_over_mesh_
    real_vectors = calibration.broadcast_vectors_from_first
    try:
        torch.manual_seed(0)
        model = UnevenNet()
        layers = list(HPAOptimizer.from_model(model).hpa_layers)
        mine = slice(rank, None, world)
        batches = [(tokens[mine], mask[mine]) for tokens, mask in _calibration_set(2, seed=1)]

        # Calibration: rank 1's XᵀX one ulp off after the all-reduce; hinv is still rank 0's.
        if rank == 1:
            distributed.all_reduce_ = _nudging_all_reduce(_one_ulp_up)
        hinv, hessians = _calibration_hinv(model, layers, batches)
        gathered_h = [None] * world
        dist.all_gather_object(gathered_h, _vector_bits({k: h.flatten() for k, h in hessians.items()}))
        assert gathered_h[0] != gathered_h[1], "the perturbation did not reach rank 1's XᵀX"
        _same_on_every_rank(_vector_bits(hinv), "hinv with rank 1 perturbed")
        # ...which takes the broadcast: without it the ranks' hinv differ.
        calibration.broadcast_vectors_from_first = lambda vectors, sizes, group, device: list(vectors)
        unshared, _ = _calibration_hinv(model, layers, batches)
        calibration.broadcast_vectors_from_first = real_vectors
        gathered = [None] * world
        dist.all_gather_object(gathered, _vector_bits(unshared))
        assert gathered[0] != gathered[1], "without the broadcast the ranks' hinv should differ"

        # Sharded edit: an exact tie, and rank 1's all-reduced sums nudged towards the other column.
        mesh = init_device_mesh("cpu", (world,))
        distributed.all_reduce_ = _nudging_all_reduce(_nudge_tie) if rank == 1 else real_all_reduce
        plans = _plan_bits(plan_sharded_layers(_tied_layer(mesh), backend="torch"))
        _same_on_every_rank(plans, "sharded plans with rank 1 perturbed")
        mask, coef = plans["tied"][0], plans["tied"][1]
        assert mask == [True] + [False] * 7, mask  # rank 0's: the tie to the lower index
        assert coef == (0.875).hex(), coef
        # ...which takes the broadcast: without it rank 1 keeps column 1 and another c_l.
        distributed._broadcast_over_mesh_ = lambda tensor, mesh: tensor
        alone = _plan_bits(plan_sharded_layers(_tied_layer(mesh), backend="torch"))
        distributed._broadcast_over_mesh_ = real_mesh_broadcast
        gathered = [None] * world
        dist.all_gather_object(gathered, alone)
        assert gathered[0] == plans
        assert gathered[1]["tied"][0] == [False, True] + [False] * 6 and gathered[1]["tied"][1] != coef

        # A selection that fails on rank 0 (non-finite statistics) fails on every rank, no hang.
        distributed.all_reduce_ = real_all_reduce
        broken = _tied_layer(mesh)
        if rank == 0:
            w_prev, w_new, hinv_s, hinv_t, ratio = broken["tied"]
            broken["tied"] = (w_prev, w_new, torch.full((8,), math.nan), hinv_t, ratio)
        try:
            plan_sharded_layers(broken, backend="torch")
        except ValueError as error:
            assert "'tied'" in str(error)
        else:
            raise AssertionError("rank 0's failed selection must fail on every rank")
    finally:
        distributed.all_reduce_, distributed._broadcast_over_mesh_ = real_all_reduce, real_mesh_broadcast
        calibration.broadcast_vectors_from_first = real_vectors
        dist.destroy_process_group()


def test_every_rank_takes_rank_0s_statistics(tmp_path, monkeypatch) -> None:
    """hinv, masks and c_l are bit-equal on every rank by construction: rank 1 fed a one-ulp
    perturbed all-reduce result (XᵀX; an exact tie between two columns) still gets rank 0's, and
    the same run without the broadcasts shows the ranks would have differed."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_perturbed_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
