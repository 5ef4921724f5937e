"""HPA under DDP and FSDP2 (``fully_shard``): gloo on CPU, 2 and 3 processes spawned by the test.

Each worker runs the whole lifecycle (calibrate on its share of the batches, begin_task, train,
calibrate, end_task) under DDP and under FSDP2, and compares the edited weights with a
single-process run on all the data (done by every worker itself, ``all_reduce=False``). The
model has layers of 7 and 2 output rows: uneven shards on 2 and 3 ranks, and an empty shard on
rank 2 of 3. The optimizer state is saved in the middle of the task with
``torch.distributed.checkpoint`` and loaded into a fresh model and optimizer, whose edit must
match too. Workers are forked (no re-import of torch) and rendezvous through a file.
"""

from __future__ import annotations

import copy
import faulthandler

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from hpa_kernels import HessianCollector, HPAOptimizer
from hpa_kernels.distributed import is_sharded

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

    reports = optimizer.end_task(task_hinv)
    restored_optimizer.end_task(task_hinv)
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
