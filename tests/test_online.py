"""HPAOptimizer in online mode (hpa_kernels.online), on the "online" records of ``helpers.OPTIM_DB``
(see test_optim.py): the column mask and the orthogonal projection inside every step."""

from __future__ import annotations

import copy

import torch
from helpers import DEFAULT_BACKEND, calibrate, optim_info, optims, train
from torch import nn

from hpa_kernels import HPAConfig


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
    weight = optimizer.hpa_layers["blocks.0.q"].module.weight
    assert not optimizer.state[weight]["hpa_mask"].any()
    assert not torch.equal(weight, plain_optimizer.hpa_layers["blocks.0.q"].module.weight)
