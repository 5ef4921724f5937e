"""HPAOptimizer in online mode (hpa_kernels.online), on the "online" records of ``helpers.OPTIM_DB``
(see test_optim.py): the column mask and the orthogonal projection inside every step."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from helpers import BACKENDS, DEFAULT_BACKEND, calibrate, optim_info, optims, train
from torch import nn

from hpa_kernels import HPAConfig, HPAOptimizer


@optims("online")
def test_online_mode_keeps_its_invariants_after_every_step(info):
    """Online mode (columns refreshed every 3 steps): after every step the retained columns equal
    W_prev bit for bit and ΔW = W − W_prev is Frobenius-orthogonal to W_prev (the online step's
    two passes); ``end_task`` reports every layer and frees the masks."""
    torch.manual_seed(0)
    width = 20
    model = info.model(width=width)
    optimizer = info.build(model, lr=1e-2)
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 40)))
    w_prev = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
    retained_any = False
    for tokens, labels in info.batches(9, 41):
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
    columns = int(info.hpa.p_max * width + 0.5)  # floor(p_max·width + 0.5) columns in block 0
    assert [int(m.sum()) for m in masks[:3]] == [columns] * 3
    report = optimizer.end_task(calibrate(model, optimizer, info.batches(2, 42)))
    assert set(report) == set(optimizer.hpa_layers)
    assert all("hpa_mask" not in state for state in optimizer.state.values())


@optims("online", backends=[DEFAULT_BACKEND])
def test_online_mode_without_refresh_only_projects(info):
    """refresh_every=0: no column is retained; each step keeps ΔW orthogonal to W_prev, and a plain
    (offline) run of the same steps differs from it."""
    torch.manual_seed(0)
    model = info.model()
    plain = copy.deepcopy(model)
    optimizer = info.build(model, lr=1e-2, hpa=HPAConfig(online=True))
    plain_optimizer = optim_info("hpa", info.backend).build(plain, lr=1e-2)
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 43)))
    plain_optimizer.begin_task(calibrate(plain, plain_optimizer, info.batches(2, 43)))
    batches = info.batches(4, 44)
    train(model, optimizer, batches)
    train(plain, plain_optimizer, batches)
    for name, layer in optimizer.hpa_layers.items():
        weight = layer.module.weight
        delta = weight.detach().double() - optimizer.state[weight]["hpa_prev"].double()
        prev = optimizer.state[weight]["hpa_prev"].double()
        bound = 1e-5 * float(delta.norm()) * float(prev.norm())
        assert abs(float((delta * prev).sum())) <= bound, name
    weight = optimizer.hpa_layers["blocks.0.q"].module.weight
    assert not optimizer.state[weight]["hpa_mask"].any()
    assert not torch.equal(weight, plain_optimizer.hpa_layers["blocks.0.q"].module.weight)


def _lagged(info, model, **overrides):
    """The record's online optimizer with ``online_projection="lagged"``."""
    return info.build(model, lr=1e-2, hpa=dataclasses.replace(info.hpa, online_projection="lagged"), **overrides)


@optims("online")
def test_lagged_online_mode_keeps_its_invariants_after_every_step(info):
    """online_projection="lagged" (columns refreshed every 3 steps): after every step the retained
    columns equal W_prev bit for bit and ⟨ΔW − c_next·W_prev, W_prev⟩ = 0 over the free columns,
    c_next = ``state["hpa_online_coef"]`` (the component the next step removes); a refresh leaves
    no pending coefficient (c_next = 0: ΔW ⟂ W_prev there); ``end_task`` projects the whole
    pending ΔW (its c_l is Step 3's on the weights it edits) and drops the coefficient."""
    torch.manual_seed(0)
    model = info.model(width=20)
    optimizer = _lagged(info, model)
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 40)))
    w_prev = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
    for step, (tokens, labels) in enumerate(info.batches(8, 41), start=1):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        optimizer.step()
        for name, layer in optimizer.hpa_layers.items():
            state = optimizer.state[layer.module.weight]
            weight, mask, coef = layer.module.weight.detach(), state["hpa_mask"], state["hpa_online_coef"]
            assert coef.shape == () and coef.dtype == torch.float32
            assert torch.equal(weight[:, mask], w_prev[name][:, mask]), name
            free_prev = w_prev[name].double()[:, ~mask]
            delta = weight.double()[:, ~mask] - free_prev
            residual = float(((delta - coef.item() * free_prev) * free_prev).sum())
            assert abs(residual) <= 1e-5 * float(delta.norm() * free_prev.norm()), name
            assert (coef.item() == 0.0) == (step % 3 == 0), (name, step)  # refreshed at steps 3 and 6
    expected = {}
    for name, layer in optimizer.hpa_layers.items():
        delta = (layer.module.weight.detach() - w_prev[name]).double()
        expected[name] = float((delta * w_prev[name].double()).sum() / w_prev[name].double().square().sum())
    report = optimizer.end_task(calibrate(model, optimizer, info.batches(2, 42)))
    for name, layer_report in report.items():
        assert layer_report.coef == pytest.approx(expected[name], rel=1e-4, abs=1e-9), name
    assert all("hpa_online_coef" not in state for state in optimizer.state.values())


@optims("online", backends=[DEFAULT_BACKEND])
def test_lagged_coefficient_is_saved_and_a_resume_continues_bit_for_bit(info):
    """The pending coefficient is part of the state dict: a copy of the model and optimizer loaded
    mid-task takes the same next steps, bit for bit; a coefficient of another shape is refused."""
    torch.manual_seed(0)
    model = info.model()
    optimizer = _lagged(info, model)
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 45)))
    train(model, optimizer, info.batches(2, 46))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    coefs = [state["hpa_online_coef"] for state in saved["optim"]["state"].values() if "hpa_online_coef" in state]
    assert len(coefs) == len(optimizer.hpa_layers) and any(c.item() != 0.0 for c in coefs)
    resumed_model = info.model()
    resumed_model.load_state_dict(saved["model"])
    resumed = _lagged(info, resumed_model)
    resumed.load_state_dict(saved["optim"])
    batches = info.batches(2, 47)  # steps 3 (a refresh) and 4
    train(model, optimizer, batches)
    train(resumed_model, resumed, batches)
    for (name, weight), other in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(weight, other), name
    bad = copy.deepcopy(saved["optim"])
    next(s for s in bad["state"].values() if "hpa_online_coef" in s)["hpa_online_coef"] = torch.zeros(2)
    with pytest.raises(ValueError, match="'hpa_online_coef' of .* expected one element"):
        resumed.load_state_dict(bad)


@optims("online")
@pytest.mark.parametrize("projection", ["exact", "lagged"])
@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
def test_one_planned_call_per_step_equals_one_call_per_layer(info, projection, master, monkeypatch):
    """The online step of all managed weights is planned once per task (one param group, one
    device: one ops.OnlineStepsPlan) and stepped by one plan call per step, and its results
    (weights, master copies, moments, masks, energies, the lagged coefficient, across a refresh)
    are bit for bit those of one ops.online_step call per layer."""
    from hpa_kernels import ops

    class PerLayer:
        """ops.OnlineStepsPlan as one ops.online_step call per layer."""

        def __init__(self, layers, projections, *, backend):
            self.layers, self.projections, self.backend = layers, projections, backend

        def stale(self):
            return False

        def step(self, grads, *, check=True, **kwargs):
            coefs = []
            for t, p, g in zip(self.layers, self.projections, grads):
                coefs.append(ops.online_step(*t._replace(grad=g), projection=p, backend=self.backend, **kwargs))
                if p.lagged:
                    p.coef.copy_(coefs[-1])
            return torch.stack(coefs)

    planned = ops.OnlineStepsPlan
    plans, calls = [], []

    class Counted(planned):
        def __init__(self, layers, projections, **kwargs):
            plans.append(len(layers))
            super().__init__(layers, projections, **kwargs)

        def step(self, grads, **kwargs):
            calls.append(len(grads))
            return super().step(grads, **kwargs)

    runs = []
    for implementation in (Counted, PerLayer):
        monkeypatch.setattr(ops, "OnlineStepsPlan", implementation)
        torch.manual_seed(0)
        model = info.model(width=20)
        if master:
            model = model.to(torch.bfloat16)
        hpa = dataclasses.replace(info.hpa, online_projection=projection)
        optimizer = info.build(model, lr=1e-2, hpa=hpa, master_weights=master)
        optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 48)))
        train(model, optimizer, info.batches(4, 49))  # a refresh at step 3
        runs.append((model, optimizer))
    assert plans == [len(runs[0][1].hpa_layers)]
    assert calls == [len(runs[0][1].hpa_layers)] * 4
    (model, optimizer), (other_model, other) = runs
    for (name, weight), other_weight in zip(model.state_dict().items(), other_model.state_dict().values()):
        assert torch.equal(weight, other_weight), name
    for p, q in zip(model.parameters(), other_model.parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, other.state[q][key]), key


@optims("online")
@pytest.mark.parametrize("projection", ["exact", "lagged"])
def test_online_step_follows_replaced_storage_and_frozen_layers(info, projection):
    """The online step's plan follows the model: weights whose storage is replaced mid-task
    (``weight.data = ...``) and a managed layer that stops getting gradients are stepped from
    then on exactly as by an optimizer that never saw them otherwise (bit for bit)."""
    runs = []
    for change in (False, True):
        torch.manual_seed(0)
        model = info.model(width=20)
        hpa = dataclasses.replace(info.hpa, online_projection=projection)
        optimizer = info.build(model, lr=1e-2, hpa=hpa)
        optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 48)))
        batches = info.batches(5, 49)
        train(model, optimizer, batches[:2])
        layers = list(optimizer.hpa_layers.values())
        if change:
            for layer in layers:
                layer.module.weight.data = layer.module.weight.data.clone()
        train(model, optimizer, batches[2:3])
        layers[0].module.weight.requires_grad_(False)
        layers[0].module.weight.grad = None
        train(model, optimizer, batches[3:])
        runs.append(model)
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), name


def _rebind(key, make):
    def mutate(optimizer, weight):
        optimizer.state[weight][key] = make(optimizer.state[weight][key])

    return mutate


def _set_master_weights(optimizer, weight):
    for group in optimizer.param_groups:
        group["master_weights"] = True


# What a user may swap mid-task without telling the optimizer: each must be used from the next step.
REPLACEMENTS = {
    "exp_avg": _rebind("exp_avg", torch.zeros_like),
    "step": _rebind("step", lambda step: torch.zeros_like(step)),
    "mask": _rebind("hpa_mask", lambda mask: torch.arange(mask.numel()) < mask.numel() // 2),
    "prev": _rebind("hpa_prev", lambda prev: prev + 0.01),
    "group dict": lambda optimizer, weight: optimizer.param_groups.__setitem__(
        0, dict(optimizer.param_groups[0], lr=0.1)
    ),
    "config": lambda optimizer, weight: setattr(optimizer, "hpa", dataclasses.replace(optimizer.hpa, orthogonal=False)),
    "projection": lambda optimizer, weight: setattr(
        optimizer, "hpa", dataclasses.replace(optimizer.hpa, online_projection="lagged")
    ),
    "master_weights": _set_master_weights,
    "transposed data": lambda optimizer, weight: setattr(weight, "data", weight.data.t()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projection", ["exact", "lagged"])
@pytest.mark.parametrize("replacement", list(REPLACEMENTS))
def test_online_plan_follows_replaced_state_groups_and_config(replacement, projection, backend):
    """The online step's plan is rebuilt whenever something it captured is replaced mid-task (a
    state tensor, a param group dict or its master_weights, the HPAConfig, a weight's data with
    the same address but other strides): the weights and state equal, bit for bit, those of an
    optimizer planning afresh at every step."""
    runs = []
    for fresh in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8))
        if replacement == "master_weights":
            model = model.to(torch.bfloat16)
        hpa = HPAConfig(online=True, refresh_every=3, include=("*",), online_projection=projection)
        optimizer = HPAOptimizer.from_model(model, lr=1e-2, hpa=hpa, master_weights=False, backend=backend)
        optimizer.begin_task({name: torch.ones(layer.in_features) for name, layer in optimizer.hpa_layers.items()})
        weight = model[0].weight
        gen = torch.Generator().manual_seed(1)
        for step in range(8):
            if step == 3:
                REPLACEMENTS[replacement](optimizer, weight)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            if fresh:
                optimizer._online_cache = None
            optimizer.step()
        runs.append((weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}))
    (weight, state), (fresh_weight, fresh_state) = runs
    assert torch.equal(weight, fresh_weight)
    assert state.keys() == fresh_state.keys()
    for key in state:
        assert torch.equal(state[key], fresh_state[key]), key
