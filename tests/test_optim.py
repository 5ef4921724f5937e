"""HPAOptimizer: the AdamW step against torch.optim.AdamW on a model, and the HPA task lifecycle.

The optimizer contract on every backend (state dicts, closures, GradScaler, refusals, a failed
write, ...) is in test_optim_contract.py; each test lives in one of the two files.
"""

import copy

import pytest
import torch
from helpers import TinyModel, calibrate, random_batches, run_task, train
from torch import nn

from hpa_kernels import HPAConfig, HPAOptimizer, ops
from hpa_kernels.functional import hpa_layer_update

ADAMW_CASES = [
    {"lr": 1e-2, "weight_decay": 0.0},
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05},
    {"lr": 1e-2, "weight_decay": 0.01, "maximize": True},
]


@pytest.mark.parametrize("kwargs", ADAMW_CASES)
def test_step_matches_torch_adamw(kwargs):
    """Same hyperparameters, same data: within 1e-5 relative after 100 steps."""
    torch.manual_seed(0)
    reference = TinyModel()
    ours = copy.deepcopy(reference)
    batches = random_batches(100, seed=1)
    train(reference, torch.optim.AdamW(reference.parameters(), **kwargs), batches)
    train(ours, HPAOptimizer(ours.parameters(), **kwargs), batches)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        # Relative to the tensor: 1e-5 of its norm. Elementwise, the compiled kernels order the fp32
        # arithmetic differently from torch (a few ulps a step), hence atol 1e-6 for entries near 0.
        assert float((b - a).norm() / a.norm()) <= 1e-5, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_param_groups_and_tensor_lr():
    torch.manual_seed(0)
    reference = TinyModel()
    ours = copy.deepcopy(reference)

    def groups(model):
        return [
            {"params": list(model.blocks.parameters()), "lr": 5e-3},
            {"params": list(model.embed.parameters()) + list(model.head.parameters()), "weight_decay": 0.0},
        ]

    batches = random_batches(20, seed=2)
    train(reference, torch.optim.AdamW(groups(reference), lr=1e-2), batches)
    train(ours, HPAOptimizer(groups(ours), lr=torch.tensor(1e-2)), batches)
    for a, b in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -1.0}, "learning rate"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"backend": "nope"}, "backend"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HPAOptimizer([nn.Parameter(torch.zeros(2))], **kwargs)


def test_from_model_finds_block_linears_with_depth():
    model = TinyModel(depth=3)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2)
    assert list(optimizer.hpa_layers) == [f"blocks.{b}.{n}" for b in range(3) for n in ("q", "k", "o")]
    assert [optimizer.hpa_layers[f"blocks.{b}.q"].retain_ratio for b in range(3)] == [0.15, 0.1, 0.05]
    assert "head" not in optimizer.hpa_layers
    with_head = HPAOptimizer.from_model(model, hpa=HPAConfig(extra_layers=("head",)))
    assert with_head.hpa_layers["head"].retain_ratio == 0.15


def test_end_task_equals_functional_edit_of_each_layer():
    torch.manual_seed(0)
    model = TinyModel(width=24)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2)
    safety = calibrate(model, optimizer, random_batches(2, seed=10))
    optimizer.begin_task(safety)
    w_prev = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
    train(model, optimizer, random_batches(15, seed=11))
    w_new = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
    task = calibrate(model, optimizer, random_batches(3, seed=12))
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


def test_disabled_hpa_is_plain_sequential_finetuning():
    model = TinyModel()
    optimizer = HPAOptimizer.from_model(model, hpa=HPAConfig(enabled=False))
    optimizer.begin_task(None)
    train(model, optimizer, random_batches(3, seed=4))
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer.end_task(None) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lifecycle_misuse_raises():
    model = TinyModel()
    optimizer = HPAOptimizer.from_model(model)
    with pytest.raises(RuntimeError, match="begin_task"):
        optimizer.end_task({})
    hinv = calibrate(model, optimizer, random_batches(1, seed=5))
    optimizer.begin_task(hinv)
    with pytest.raises(RuntimeError, match="already open"):
        optimizer.begin_task(hinv)


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


@pytest.mark.parametrize("case", ["missing", "length", "nan", "inf", "negative"])
def test_bad_statistics_change_no_weight(case):
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = HPAOptimizer.from_model(model, lr=1e-2)
    hinv = calibrate(model, optimizer, random_batches(2, seed=6))
    with pytest.raises(ValueError, match="blocks.1.k"):
        optimizer.begin_task(_bad_statistics(hinv, case))
    assert not optimizer.in_task and all("hpa_prev" not in s for s in optimizer.state.values())
    optimizer.begin_task(hinv)
    train(model, optimizer, random_batches(5, seed=7))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="blocks.1.k"):
        optimizer.end_task(_bad_statistics(calibrate(model, optimizer, random_batches(2, seed=8)), case))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.in_task  # the task stays open: fix the statistics and call end_task again


def test_non_finite_weight_changes_no_weight():
    model = TinyModel()
    optimizer = HPAOptimizer.from_model(model)
    hinv = calibrate(model, optimizer, random_batches(2, seed=6))
    optimizer.begin_task(hinv)
    with torch.no_grad():
        model.blocks[2].o.weight[0, 0] = float("nan")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="blocks.2.o"):
        optimizer.end_task(hinv)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "blocks.2.o.weight")


def test_two_tasks_in_a_row():
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = HPAOptimizer.from_model(model, lr=1e-2)
    for task in range(2):
        report = run_task(model, optimizer, seed=30 + 10 * task, steps=15, task_batches=3)
        assert all(r.num_retained <= round(r.retain_ratio * r.num_columns + 0.5) for r in report.values())
    assert optimizer.tasks_completed == 2
    assert all("hpa_prev" not in state for state in optimizer.state.values())  # snapshots freed


@pytest.mark.parametrize("backend", ops.available_backends())
def test_online_mode_keeps_its_invariants_after_every_step(backend):
    """HPAConfig(online=True): after every step the retained columns equal W_prev bit for bit and
    ΔW = W − W_prev is Frobenius-orthogonal to W_prev (the online step's two passes)."""
    torch.manual_seed(0)
    model = TinyModel(width=20)
    hpa = HPAConfig(online=True, refresh_every=3, p_max=0.3, p_min=0.2)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, hpa=hpa, backend=backend)
    optimizer.begin_task(calibrate(model, optimizer, random_batches(2, seed=40)))
    w_prev = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
    retained_any = False
    for tokens, labels in random_batches(9, seed=41):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        optimizer.step()
        for name, layer in optimizer.hpa_layers.items():
            weight, mask = layer.module.weight.detach(), optimizer.state[layer.module.weight]["hpa_mask"]
            assert torch.equal(weight[:, mask], w_prev[name][:, mask]), name
            delta = (weight - w_prev[name]).double()
            dot = float((delta * w_prev[name].double()).sum())
            assert abs(dot) <= 1e-5 * float(delta.norm() * w_prev[name].double().norm()), name
            retained_any |= bool(mask.any())
    assert retained_any  # the refreshes did retain columns
    masks = [optimizer.state[layer.module.weight]["hpa_mask"] for layer in optimizer.hpa_layers.values()]
    assert [int(m.sum()) for m in masks[:3]] == [6] * 3  # floor(0.3·20 + 0.5) columns in block 0
    report = optimizer.end_task(calibrate(model, optimizer, random_batches(2, seed=42)))
    assert set(report) == set(optimizer.hpa_layers)
    assert all("hpa_mask" not in state for state in optimizer.state.values())


def test_online_mode_without_refresh_only_projects():
    """refresh_every=0: no column is retained; each step keeps ΔW orthogonal to W_prev, and a plain
    (offline) run of the same steps differs from it."""
    torch.manual_seed(0)
    model = TinyModel()
    plain = copy.deepcopy(model)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, hpa=HPAConfig(online=True))
    plain_optimizer = HPAOptimizer.from_model(plain, lr=1e-2)
    optimizer.begin_task(calibrate(model, optimizer, random_batches(2, seed=43)))
    plain_optimizer.begin_task(calibrate(plain, plain_optimizer, random_batches(2, seed=43)))
    batches = random_batches(4, seed=44)
    train(model, optimizer, batches)
    train(plain, plain_optimizer, batches)
    weight = optimizer.hpa_layers["blocks.0.q"].module.weight
    assert not optimizer.state[weight]["hpa_mask"].any()
    assert not torch.equal(weight, plain_optimizer.hpa_layers["blocks.0.q"].module.weight)
