"""HPAOptimizer's state dict and copies, on the records of ``helpers.OPTIM_DB`` (see test_optim.py):
a resume in a fresh process, state loaded across dtypes and from torch.optim.AdamW or another model,
scheduler group keys, ``copy.deepcopy`` and ``pickle``."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_bitwise,
    calibrate,
    is_plain,
    optimizer_state,
    optims,
    run_fixed_grads,
    select,
    train,
)
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

_RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from helpers import calibrate, optim_info, train

    checkpoint_path, out_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]))  # the parent's: a thread count changes GEMM bits
    results = {}
    checkpoints = torch.load(checkpoint_path, weights_only=True)
    for backend, checkpoint in checkpoints.items():
        info = optim_info("hpa", backend)
        torch.manual_seed(123)  # a different init: everything must come from the checkpoint
        model = info.model()
        optimizer = info.build(model, lr=1e-2)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optim"])
        assert optimizer.in_task
        train(model, optimizer, info.batches(3, 42))
        report = optimizer.end_task(calibrate(model, optimizer, info.batches(2, 43)))
        train(model, optimizer, info.batches(2, 44))
        results[backend] = {
            "model": model.state_dict(),
            "optim": optimizer.state_dict(),
            "report": {name: r.as_dict() for name, r in report.items()},
        }
    torch.save(results, out_path)
    """
)


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    """Save mid-task, load with weights_only=True in a new process, continue: weights,
    state and the end-of-task edit equal the uninterrupted run bit for bit, on every backend
    (the "hpa" records, in one process)."""
    checkpoints, expected = {}, {}
    for info in select("hpa"):
        backend = info.backend
        torch.manual_seed(0)
        model = info.model()
        optimizer = info.build(model, lr=1e-2)
        optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 40)))
        train(model, optimizer, info.batches(3, 41))
        checkpoint = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        assert is_plain(checkpoint["optim"]), "the state dict must hold only tensors and plain values"
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised now: later steps must not change the checkpoint
        checkpoints[backend] = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        train(model, optimizer, info.batches(3, 42))
        report = optimizer.end_task(calibrate(model, optimizer, info.batches(2, 43)))
        train(model, optimizer, info.batches(2, 44))
        expected[backend] = (model.state_dict(), optimizer.state_dict(), {n: r.as_dict() for n, r in report.items()})
    torch.save(checkpoints, tmp_path / "checkpoint.pt")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    subprocess.run(
        [
            sys.executable,
            "-c",
            _RESUME_SCRIPT,
            str(tmp_path / "checkpoint.pt"),
            str(tmp_path / "resumed.pt"),
            str(torch.get_num_threads()),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for backend, (model_state, optim_state, report) in expected.items():
        got = resumed[backend]
        assert got["report"] == report, backend
        for key, value in model_state.items():
            assert torch.equal(got["model"][key], value), (backend, key)
        assert got["optim"]["hpa"] == optim_state["hpa"]
        assert got["optim"]["param_groups"] == optim_state["param_groups"]
        assert got["optim"]["state"].keys() == optim_state["state"].keys()
        for index, state in optim_state["state"].items():
            for key, value in state.items():
                assert torch.equal(got["optim"]["state"][index][key], value), (backend, index, key)


# ------------------------------------------------------------- state dicts across dtypes and models


def _open_task_state(info, dtype: torch.dtype):
    torch.manual_seed(0)
    model = info.model().to(dtype)
    optimizer = info.build(model, lr=1e-2)
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 6)))
    train(model, optimizer, info.batches(2, 7))
    return model, optimizer


@optims("hpa")
@pytest.mark.parametrize("saved,loaded", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_loaded_state_keeps_its_dtypes_and_end_task_works(info, saved, loaded):
    """State saved over one dtype, loaded over another: moments stay fp32, the snapshot
    keeps its dtype (not promoted or demoted), a bool mask stays bool; steps and the edit work."""
    device = info.device
    model, optimizer = _open_task_state(info, saved)
    state_dict = optimizer.state_dict()
    mask = torch.tensor([True, False, True], device=device)
    state_dict["state"][0]["hpa_test_mask"] = mask  # any extra state tensor keeps its dtype
    other = copy.deepcopy(model).to(loaded)
    other_optimizer = info.build(other, lr=1e-2)
    other_optimizer.load_state_dict(state_dict)
    params = [p for group in other_optimizer.param_groups for p in group["params"]]
    for index, saved_state in state_dict["state"].items():
        for key, value in saved_state.items():
            got = other_optimizer.state[params[index]][key]
            assert got.dtype == value.dtype and got.device == params[index].device, (index, key)
            assert torch.equal(got, value) and got.data_ptr() != value.data_ptr(), (index, key)  # a copy
    weight = other.blocks[0].q.weight
    assert other_optimizer.state[weight]["exp_avg"].dtype == torch.float32
    assert other_optimizer.state[weight]["hpa_prev"].dtype == saved
    train(other, other_optimizer, info.batches(2, 8))
    report = other_optimizer.end_task(calibrate(other, other_optimizer, info.batches(2, 9)))
    assert set(report) == set(other_optimizer.hpa_layers)
    assert all(torch.isfinite(p).all() and p.dtype == loaded for p in other.parameters())
    assert all("hpa_prev" not in s for s in other_optimizer.state.values())


@optims("adamw")
def test_torch_adamw_state_over_bf16_params_is_widened_to_fp32(info):
    """torch.optim.AdamW keeps bf16 moments over bf16 parameters; loaded here they become
    fp32 (the kernels' contract, lossless) and the next step is AdamW's within bf16 rounding."""
    device = info.device
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 7).bfloat16().to(device))
    adamw = torch.optim.AdamW([weight], lr=1e-2)
    weight.grad = torch.randn(5, 7).bfloat16().to(device)
    adamw.step()
    assert adamw.state[weight]["exp_avg"].dtype == torch.bfloat16
    ours_weight = nn.Parameter(weight.detach().clone())
    ours = info.build([ours_weight], lr=1e-2)
    ours.load_state_dict(adamw.state_dict())
    assert ours.state[ours_weight]["exp_avg"].dtype == torch.float32
    assert ours.state[ours_weight]["step"].dtype == torch.float32
    grad = torch.randn(5, 7).bfloat16().to(device)
    weight.grad, ours_weight.grad = grad.clone(), grad.clone()
    adamw.step()
    ours.step()
    torch.testing.assert_close(ours_weight, weight, rtol=1e-2, atol=1e-2)


@optims("hpa", backends=["torch"])
def test_state_of_another_model_is_refused_and_nothing_loaded(info):
    """A state dict whose tensors do not fit the parameters raises, naming the parameter."""
    _, optimizer = _open_task_state(info, torch.float32)
    state_dict = optimizer.state_dict()
    wider = info.model(width=16)
    wider_optimizer = info.build(wider, lr=1e-2)
    train(wider, wider_optimizer, info.batches(1, 1))
    before = optimizer_state(wider_optimizer)
    with pytest.raises(ValueError, match="of .blocks.0.q.weight. has shape"):
        wider_optimizer.load_state_dict(state_dict)
    assert_bitwise(before, optimizer_state(wider_optimizer))
    assert not wider_optimizer.in_task


@optims("hpa", backends=["torch"])
def test_state_dict_keeps_the_config_and_a_load_under_another_warns(info):
    """``state_dict()["hpa"]["config"]`` is the HPAConfig as plain values (``weights_only``
    loadable); loading it into an optimizer with another config warns, naming each changed field,
    and the optimizer keeps its own config; under the same config no warning."""
    import warnings

    from hpa_kernels import HPAConfig

    _, optimizer = _open_task_state(info, torch.float32)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert saved["hpa"]["config"]["p_max"] == optimizer.hpa.p_max
    assert saved["hpa"]["config"]["alpha_bounds"] == list(optimizer.hpa.alpha_bounds)

    same = info.build(info.model(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(saved)
    other_config = HPAConfig(p_max=0.3, alpha_bounds=(0.2, 0.9))
    other = info.build(info.model(), lr=1e-2, hpa=other_config)
    with pytest.warns(UserWarning, match=r"p_max: 0\.15 -> 0\.3; alpha_bounds: \[0\.4, 0\.8\] -> \[0\.2, 0\.9\]"):
        other.load_state_dict(saved)
    assert other.hpa == other_config and other.in_task


@optims("adamw", backends=["torch"])
@pytest.mark.parametrize("scheduler", ["OneCycleLR", "SWALR"])
def test_state_dicts_with_scheduler_group_keys_load_as_into_adamw(info, scheduler):
    """A state dict saved after OneCycleLR (``base_momentum``, ``max_momentum``, ``initial_lr``,
    ``max_lr``, ``min_lr``) or SWALR (``swa_lr``) loads, as into torch.optim.AdamW: the keys are
    kept, so the scheduler resumes, and steps then match torch's."""
    from torch.optim.swa_utils import SWALR

    def make(opt):
        if scheduler == "OneCycleLR":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8)
        return SWALR(opt, swa_lr=5e-3, anneal_epochs=3)

    builders = {
        "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
        "ours": lambda params: info.build(params, lr=1e-3),
    }
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(4)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(6)]
    states = {}
    for name, build in builders.items():
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = build(params)
        sched = make(opt)
        run_fixed_grads(opt, params, grads[:3], sched)
        states[name] = (opt.state_dict(), sched.state_dict())
    ours_saved, _ = states["ours"]
    theirs_saved, sched_saved = states["adamw"]
    assert {"swa_lr"} <= set(theirs_saved["param_groups"][0]) or {"max_lr", "base_momentum"} <= set(
        theirs_saved["param_groups"][0]
    )
    results = []
    for name, saved in (("adamw", theirs_saved), ("ours", theirs_saved), ("ours", ours_saved)):
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = builders[name](params)
        sched = make(opt)
        opt.load_state_dict(copy.deepcopy(saved))
        sched.load_state_dict(sched_saved)
        for key in set(theirs_saved["param_groups"][0]) - {"params", "foreach", "fused", "amsgrad", "capturable",
                                                           "differentiable", "decoupled_weight_decay"}:  # fmt: skip
            assert key in opt.param_groups[0], key
        run_fixed_grads(opt, params, grads[3:], sched)
        results.append(params)
    for ours in results[1:]:
        for a, b in zip(results[0], ours):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ copies


@optims("hpa")
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_works_and_matches_the_original(info, how):
    """``copy.deepcopy`` / ``pickle`` of an HPAOptimizer mid-task keeps its HPA attributes (the
    backend, the managed layers, the open task): a copy of (model, optimizer) steps and ends the
    task bit-identically to the original, and the optimizer copied alone steps."""
    torch.manual_seed(0)
    model = info.model()
    optimizer = info.build(model, lr=1e-2)
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 1)))
    train(model, optimizer, info.batches(2, 2))
    pair = (model, optimizer)
    copied_model, copied = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert copied.in_task and copied.backend == info.backend and set(copied.hpa_layers) == set(optimizer.hpa_layers)
    for name, layer in copied.hpa_layers.items():
        assert layer.module.weight is dict(copied_model.named_parameters())[f"{name}.weight"]
    reports = []
    for net, opt in ((model, optimizer), (copied_model, copied)):
        train(net, opt, info.batches(2, 3))
        reports.append(opt.end_task(calibrate(net, opt, info.batches(2, 4))))
    assert reports[0] == reports[1]
    for (name, a), b in zip(model.state_dict().items(), copied_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert_bitwise(optimizer_state(optimizer), optimizer_state(copied))
    lone = copy.deepcopy(optimizer)  # the optimizer alone: its own copies of the parameters
    for p in (p for group in lone.param_groups for p in group["params"]):
        p.grad = torch.ones_like(p)
    lone.step()
