"""The edit at ``HPAOptimizer.end_task`` (hpa_kernels.edit), on the records of ``helpers.OPTIM_DB``
(see test_optim.py): which layers are edited, the edit equal to ``hpa_layer_update`` of each layer,
statistics, weights and state checked before anything is written, a failed write retried, LoRA
adapters merged only once the plan is checked."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import (
    DEFAULT_BACKEND,
    TinyModel,
    assert_bitwise,
    calibrate,
    is_plain,
    model_weights,
    optim_info,
    optims,
    train,
)
from torch import Tensor, nn

from hpa_kernels import HPAConfig, HPAOptimizer, ops
from hpa_kernels.edit import HPAEditError
from hpa_kernels.functional import hpa_layer_update

# -------------------------------------------------------------------------- which layers are edited


def test_from_model_finds_block_linears_with_depth():
    """``from_model`` manages the Linears of the repeated blocks, with retain ratios from p_max down
    to p_min by depth, and not the head unless named (it then takes p_max)."""
    model = TinyModel(depth=3)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2)
    assert list(optimizer.hpa_layers) == [f"blocks.{b}.{n}" for b in range(3) for n in ("q", "k", "o")]
    assert [optimizer.hpa_layers[f"blocks.{b}.q"].retain_ratio for b in range(3)] == [0.15, 0.1, 0.05]
    assert "head" not in optimizer.hpa_layers
    with_head = HPAOptimizer.from_model(model, hpa=HPAConfig(extra_layers=("head",)))
    assert with_head.hpa_layers["head"].retain_ratio == 0.15


class _ConvBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.conv = nn.Conv1d(width, width, 1)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.conv(torch.tanh(self.proj(x)).transpose(1, 2)).transpose(1, 2))


class _MixedModel(nn.Module):
    """Embedding, blocks with a Linear, a Conv1d and a LayerNorm, a 0-d temperature, a head."""

    def __init__(self, width: int = 8, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([_ConvBlock(width) for _ in range(2)])
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1)) / self.temperature


@optims("hpa")
def test_only_managed_linears_are_edited(info):
    """1-D and 0-D parameters, conv weights, embeddings and the head get plain AdamW steps
    (as with HPA disabled) and are never edited; the managed block Linears are."""
    device = info.device
    runs = {}
    for config in (info, optim_info("seqft", info.backend)):
        enabled = config.hpa.enabled
        torch.manual_seed(0)
        model = _MixedModel().to(device)
        optimizer = config.build(model, lr=1e-2)
        assert list(optimizer.hpa_layers) == ["blocks.0.proj", "blocks.1.proj"]
        hinv = calibrate(model, optimizer, info.batches(2, 70)) if enabled else None
        optimizer.begin_task(hinv)
        train(model, optimizer, info.batches(4, 71))
        before_edit = model_weights(model)
        task = calibrate(model, optimizer, info.batches(2, 72)) if enabled else None
        optimizer.end_task(task)
        runs[enabled] = (before_edit, model_weights(model))
    (hpa_before, hpa_after), (plain_before, _) = runs[True], runs[False]
    assert_bitwise(plain_before, hpa_before)  # the steps are plain AdamW either way
    for name in hpa_after:
        if name in ("blocks.0.proj.weight", "blocks.1.proj.weight"):
            assert not torch.equal(hpa_after[name], hpa_before[name]), name
        else:
            assert torch.equal(hpa_after[name], hpa_before[name]), name


def test_naming_a_non_linear_layer_is_refused():
    """An embedding or conv is edited only if named, and naming it is refused (not Linear)."""
    for name in ("embed", "blocks.0.conv"):
        with pytest.raises(ValueError, match=name):
            HPAOptimizer.from_model(_MixedModel(), hpa=HPAConfig(extra_layers=(name,)))


@optims("hpa")
def test_zero_w_prev_gives_coef_zero_and_untrained_layer_is_unchanged(info):
    """A managed layer whose W_prev is all zeros gets coef 0 (not NaN); a managed layer that
    received no gradient during the task is left exactly as it was."""
    torch.manual_seed(0)
    model = info.model()
    with torch.no_grad():
        model.blocks[0].o.weight.zero_()
    optimizer = info.build(model, lr=1e-2)
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 80)))
    frozen = model.blocks[2].k.weight
    before = frozen.detach().clone()
    for tokens, labels in info.batches(4, 81):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        frozen.grad = None  # a frozen branch this task
        optimizer.step()
    report = optimizer.end_task(calibrate(model, optimizer, info.batches(2, 82)))
    assert report["blocks.0.o"].coef == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(frozen, before) and report["blocks.2.k"].coef == 0.0


# ----------------------------------------------------------------------- the edit and its checks


@optims("hpa", backends=[DEFAULT_BACKEND])
def test_end_task_equals_functional_edit_of_each_layer(info):
    """``end_task`` writes, for every managed layer, ``hpa_layer_update`` of its W_prev, W_new and
    statistics bit for bit, and reports its retained columns, coef and alpha; the task is closed."""
    torch.manual_seed(0)
    model = info.model(width=24)
    optimizer = info.build(model, lr=1e-2)
    safety = calibrate(model, optimizer, info.batches(2, 10))
    optimizer.begin_task(safety)
    w_prev = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
    train(model, optimizer, info.batches(15, 11))
    w_new = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
    task = calibrate(model, optimizer, info.batches(3, 12))
    report = optimizer.end_task(task)
    assert set(report) == set(optimizer.hpa_layers)
    for name, layer in optimizer.hpa_layers.items():
        backend = ops.resolve_backend(optimizer.backend, w_new[name].device)  # the same kernels: bit-equal
        expected = hpa_layer_update(
            w_prev[name], w_new[name], safety[name], task[name], layer.retain_ratio, backend=backend
        )
        assert torch.equal(layer.module.weight, expected.weight), name
        assert report[name].num_retained == expected.num_retained
        assert report[name].coef == expected.coef and report[name].alpha == expected.alpha
        assert not torch.equal(w_new[name], w_prev[name])  # the task did move the weights
    assert optimizer.tasks_completed == 1 and not optimizer.in_task


def _bad_statistics(hinv, case):
    bad = dict(hinv)
    name = "blocks.1.k"
    if case == "missing":
        del bad[name]
    elif case == "length":
        bad[name] = bad[name][:-1]
    elif case == "nan":
        bad[name] = bad[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    elif case == "inf":
        bad[name] = bad[name].clone().index_fill_(0, torch.tensor([0]), float("inf"))
    elif case == "negative":
        bad[name] = -bad[name]
    return bad


@optims("hpa", backends=[DEFAULT_BACKEND])
@pytest.mark.parametrize("case", ["missing", "length", "nan", "inf", "negative"])
def test_bad_statistics_change_no_weight(info, case):
    """Missing, short, NaN, Inf or negative statistics of one layer raise naming it: at
    ``begin_task`` no task opens and no snapshot is kept; at ``end_task`` no weight changes and the
    task stays open."""
    torch.manual_seed(0)
    model = info.model()
    optimizer = info.build(model, lr=1e-2)
    hinv = calibrate(model, optimizer, info.batches(2, 6))
    with pytest.raises(ValueError, match="blocks.1.k"):
        optimizer.begin_task(_bad_statistics(hinv, case))
    assert not optimizer.in_task and all("hpa_prev" not in s for s in optimizer.state.values())
    optimizer.begin_task(hinv)
    train(model, optimizer, info.batches(5, 7))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="blocks.1.k"):
        optimizer.end_task(_bad_statistics(calibrate(model, optimizer, info.batches(2, 8)), case))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.in_task  # the task stays open: fix the statistics and call end_task again


@optims("hpa", backends=[DEFAULT_BACKEND])
def test_non_finite_weight_changes_no_weight(info):
    """A NaN in a managed weight makes ``end_task`` raise naming the layer; no other weight changes."""
    model = info.model()
    optimizer = info.build(model)
    hinv = calibrate(model, optimizer, info.batches(2, 6))
    optimizer.begin_task(hinv)
    with torch.no_grad():
        model.blocks[2].o.weight[0, 0] = float("nan")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="blocks.2.o"):
        optimizer.end_task(hinv)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "blocks.2.o.weight")


def _open_task(info, seed=110):
    torch.manual_seed(0)
    model = info.model()
    optimizer = info.build(model, lr=1e-2)
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, seed)))
    train(model, optimizer, info.batches(4, seed + 1))
    return model, optimizer, calibrate(model, optimizer, info.batches(2, seed + 2))


@optims("hpa")
@pytest.mark.parametrize("case", ["snapshot-shape", "snapshot-nan", "lost-statistics", "statistics-list"])
def test_end_task_refuses_bad_state_and_changes_no_weight(info, case):
    """end_task checks everything before writing: a corrupted or lost snapshot, lost statistics or
    statistics of the wrong type raise, naming the layer, and no weight changes."""
    model, optimizer, task = _open_task(info)
    state = optimizer.state[model.blocks[1].k.weight]
    if case == "snapshot-shape":
        state["hpa_prev"] = state["hpa_prev"][:, :-1].clone()
    elif case == "snapshot-nan":
        state["hpa_prev"][0, 0] = float("nan")
    elif case == "lost-statistics":
        del state["hpa_hinv_safety"]
    else:
        task = {**task, "blocks.1.k": task["blocks.1.k"].tolist()}
    weights = model_weights(model)
    with pytest.raises((ValueError, RuntimeError), match="blocks.1.k"):
        optimizer.end_task(task)
    assert_bitwise(weights, model_weights(model))
    assert optimizer.in_task


@optims("hpa")
@pytest.mark.parametrize("resume", [False, True])
def test_retry_after_a_failed_write_completes_the_edit_exactly_once(info, resume, monkeypatch):
    """A failure while writing leaves each layer fully edited or untouched (the error says which);
    calling end_task again — also after saving and loading the state — edits only the untouched
    layers, and the result is the uninterrupted edit bit for bit."""
    model, optimizer, task = _open_task(info)
    reference_model = copy.deepcopy(model)
    reference = info.build(reference_model, lr=1e-2)
    reference.load_state_dict(optimizer.state_dict())
    expected_report = reference.end_task(task)
    w_new = {n: layer.module.weight.detach().clone() for n, layer in optimizer.hpa_layers.items()}

    real_apply, calls = ops.hpa_apply, []

    def failing_apply(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated kernel failure")
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(ops, "hpa_apply", failing_apply)
    with pytest.raises(HPAEditError, match="simulated kernel failure") as error:
        optimizer.end_task(task)
    names = list(optimizer.hpa_layers)
    assert error.value.edited == names[:3] and error.value.untouched == names[3:]
    for name in names:
        edited = not torch.equal(optimizer.hpa_layers[name].module.weight, w_new[name])
        assert edited == (name in names[:3]), name
    assert optimizer.in_task
    monkeypatch.setattr(ops, "hpa_apply", real_apply)
    if resume:
        buffer = io.BytesIO()
        saved = optimizer.state_dict()
        assert is_plain(saved) and list(saved["hpa"]["edited"]) == names[:3]
        torch.save({"model": model.state_dict(), "optim": saved}, buffer)
        checkpoint = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        model = info.model()
        model.load_state_dict(checkpoint["model"])
        optimizer = info.build(model, lr=1e-2)
        optimizer.load_state_dict(checkpoint["optim"])
    report = optimizer.end_task(task)
    assert report == expected_report and not optimizer.in_task and optimizer.tasks_completed == 1
    assert_bitwise(model_weights(reference_model), model_weights(model))


@optims("lora", backends=["torch"])
def test_nan_in_a_lora_adapter_leaves_every_weight_as_it_was(info):
    """``end_task`` on a PEFT model checks the plan before it merges and resets the adapters: with
    a NaN in one adapter it raises with every base weight and adapter bitwise as it was, and
    succeeds once fixed."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    model = info.model()
    optimizer = info.build(model, lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 32, (2, 6), generator=generator) for _ in range(3)]

    def hinv():
        return {name: torch.rand(layer.module.in_features, generator=generator) + 0.5
                for name, layer in optimizer.hpa_layers.items()}  # fmt: skip

    optimizer.begin_task(hinv())
    for ids in data:
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    wrapper = next(layer.adapter for layer in optimizer.hpa_layers.values())
    lora_b = wrapper.lora_B["default"].weight
    saved_b = lora_b.detach().clone()
    with torch.no_grad():
        lora_b[0, 0] = float("nan")
    before = model_weights(model)
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        optimizer.end_task(hinv())
    after = model_weights(model)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value.isnan(), after[key].isnan()), key
        assert torch.equal(value.nan_to_num(), after[key].nan_to_num()), key
    with torch.no_grad():
        lora_b.copy_(saved_b)
    assert optimizer.end_task(hinv())
    assert not lora_b.any()
