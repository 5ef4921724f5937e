"""HPAOptimizer keeps PyTorch's optimizer contract on every backend — state dicts and resume,
dtypes, parameters without gradients, AdamW options, GradScaler, master weights, memory layouts,
which layers are edited, refused inputs, determinism, torch.compile, copies — and ``end_task``
refuses bad input without losing anything.

Every test runs on each backend of ``hpa_kernels.ops.available_backends()`` (evaluated when the
tests are collected), on the device that backend runs on (CPU for "torch" and "cpu", and for
"triton" under ``TRITON_INTERPRET=1``; CUDA otherwise).
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TinyModel, calibrate, random_batches, run_task, train
from torch import Tensor, nn

from hpa_kernels import HPAConfig, HPAOptimizer, ops
from hpa_kernels.edit import HPAEditError
from hpa_kernels.functional import hpa_layer_update

BACKENDS = ops.available_backends()
each_backend = pytest.mark.parametrize("backend", BACKENDS)
ROOT = Path(__file__).resolve().parent.parent


def _device(backend: str) -> torch.device:
    """The device ``backend`` runs on: CPU when it takes CPU tensors, else CUDA."""
    try:
        ops.resolve_backend(backend, torch.device("cpu"))
    except ValueError:
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------- helpers


def _state_of(optimizer: HPAOptimizer) -> dict[tuple[int, str], Tensor]:
    """Every state tensor, keyed by (parameter index, key), cloned."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        (index, key): value.detach().clone()
        for index, p in enumerate(params)
        for key, value in optimizer.state.get(p, {}).items()
        if isinstance(value, Tensor)
    }


def _assert_bitwise(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _batches(count: int, seed: int, device: torch.device):
    return [(tokens.to(device), labels.to(device)) for tokens, labels in random_batches(count, seed=seed)]


def _run_fixed_grads(optimizer, params, grads_per_step, scheduler=None):
    """Steps with the given gradients, assigned as they are (their strides kept; never written)."""
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g if g is None or g.device == p.device else g.to(p.device)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _plain(value):
    """True when ``value`` holds only tensors and plain Python values (what ``weights_only=True`` loads)."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (Tensor, bool, int, float, str))


# ------------------------------------------------------------------------- resume from a state dict


_RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from helpers import TinyModel, calibrate, train
    from test_optim_contract import _batches, _device
    from hpa_kernels import HPAOptimizer

    checkpoint_path, out_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]))  # the parent's: a thread count changes GEMM bits
    results = {}
    checkpoints = torch.load(checkpoint_path, weights_only=True)
    for backend, checkpoint in checkpoints.items():
        device = _device(backend)
        torch.manual_seed(123)  # a different init: everything must come from the checkpoint
        model = TinyModel().to(device)
        optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optim"])
        assert optimizer.in_task
        train(model, optimizer, _batches(3, 42, device))
        report = optimizer.end_task(calibrate(model, optimizer, _batches(2, 43, device)))
        train(model, optimizer, _batches(2, 44, device))
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
    state and the end-of-task edit equal the uninterrupted run bit for bit, on every backend."""
    checkpoints, expected = {}, {}
    for backend in BACKENDS:
        device = _device(backend)
        torch.manual_seed(0)
        model = TinyModel().to(device)
        optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend)
        optimizer.begin_task(calibrate(model, optimizer, _batches(2, 40, device)))
        train(model, optimizer, _batches(3, 41, device))
        checkpoint = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        assert _plain(checkpoint["optim"]), "the state dict must hold only tensors and plain values"
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised now: later steps must not change the checkpoint
        checkpoints[backend] = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        train(model, optimizer, _batches(3, 42, device))
        report = optimizer.end_task(calibrate(model, optimizer, _batches(2, 43, device)))
        train(model, optimizer, _batches(2, 44, device))
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
    for backend in BACKENDS:
        model_state, optim_state, report = expected[backend]
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


def _open_task_state(dtype: torch.dtype, backend: str):
    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel().to(device=device, dtype=dtype)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend, master_weights=False)
    optimizer.begin_task(calibrate(model, optimizer, _batches(2, 6, device)))
    train(model, optimizer, _batches(2, 7, device))
    return model, optimizer


@each_backend
@pytest.mark.parametrize("saved,loaded", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_loaded_state_keeps_its_dtypes_and_end_task_works(backend, saved, loaded):
    """State saved over one dtype, loaded over another: moments stay fp32, the snapshot
    keeps its dtype (not promoted or demoted), a bool mask stays bool; steps and the edit work."""
    device = _device(backend)
    model, optimizer = _open_task_state(saved, backend)
    state_dict = optimizer.state_dict()
    mask = torch.tensor([True, False, True], device=device)
    state_dict["state"][0]["hpa_test_mask"] = mask  # any extra state tensor keeps its dtype
    other = copy.deepcopy(model).to(loaded)
    other_optimizer = HPAOptimizer.from_model(other, lr=1e-2, backend=backend, master_weights=False)
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
    train(other, other_optimizer, _batches(2, 8, device))
    report = other_optimizer.end_task(calibrate(other, other_optimizer, _batches(2, 9, device)))
    assert set(report) == set(other_optimizer.hpa_layers)
    assert all(torch.isfinite(p).all() and p.dtype == loaded for p in other.parameters())
    assert all("hpa_prev" not in s for s in other_optimizer.state.values())


@each_backend
def test_torch_adamw_state_over_bf16_params_is_widened_to_fp32(backend):
    """torch.optim.AdamW keeps bf16 moments over bf16 parameters; loaded here they become
    fp32 (the kernels' contract, lossless) and the next step is AdamW's within bf16 rounding."""
    device = _device(backend)
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 7).bfloat16().to(device))
    adamw = torch.optim.AdamW([weight], lr=1e-2)
    weight.grad = torch.randn(5, 7).bfloat16().to(device)
    adamw.step()
    assert adamw.state[weight]["exp_avg"].dtype == torch.bfloat16
    ours_weight = nn.Parameter(weight.detach().clone())
    ours = HPAOptimizer([ours_weight], lr=1e-2, backend=backend, master_weights=False)
    ours.load_state_dict(adamw.state_dict())
    assert ours.state[ours_weight]["exp_avg"].dtype == torch.float32
    assert ours.state[ours_weight]["step"].dtype == torch.float32
    grad = torch.randn(5, 7).bfloat16().to(device)
    weight.grad, ours_weight.grad = grad.clone(), grad.clone()
    adamw.step()
    ours.step()
    torch.testing.assert_close(ours_weight, weight, rtol=1e-2, atol=1e-2)


def test_state_of_another_model_is_refused_and_nothing_loaded():
    """A state dict whose tensors do not fit the parameters raises, naming the parameter."""
    device = torch.device("cpu")
    model, optimizer = _open_task_state(torch.float32, "torch")
    state_dict = optimizer.state_dict()
    wider = TinyModel(width=16)
    wider_optimizer = HPAOptimizer.from_model(wider, lr=1e-2, backend="torch")
    train(wider, wider_optimizer, _batches(1, 1, device))
    before = _state_of(wider_optimizer)
    with pytest.raises(ValueError, match="of .blocks.0.q.weight. has shape"):
        wider_optimizer.load_state_dict(state_dict)
    _assert_bitwise(before, _state_of(wider_optimizer))
    assert not wider_optimizer.in_task


# -------------------------------------------------------------------- parameters without a gradient


@each_backend
def test_param_without_grad_is_not_touched(backend):
    """A parameter with ``grad is None`` this step gets no decay, no state or step-count
    change — as torch.optim.AdamW — while its neighbours in the group are stepped."""
    device = _device(backend)
    torch.manual_seed(0)
    values = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    grads = [[torch.randn(4, 3), torch.randn(5), None]] + [[torch.randn(4, 3), None, None] for _ in range(3)]
    ours = [nn.Parameter(v.clone().to(device)) for v in values]
    theirs = [nn.Parameter(v.clone().to(device)) for v in values]
    optimizer = HPAOptimizer(ours, lr=1e-2, weight_decay=0.5, backend=backend)
    reference = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.5)
    _run_fixed_grads(optimizer, ours, grads[:1])
    _run_fixed_grads(reference, theirs, grads[:1])
    after_first = {key: value for key, value in _state_of(optimizer).items() if key[0] == 1}
    frozen = ours[1].detach().clone()
    _run_fixed_grads(optimizer, ours, grads[1:])
    _run_fixed_grads(reference, theirs, grads[1:])
    assert torch.equal(ours[1], frozen) and torch.equal(ours[2].cpu(), values[2])
    _assert_bitwise(after_first, {key: value for key, value in _state_of(optimizer).items() if key[0] == 1})
    assert ours[2] not in optimizer.state
    assert float(optimizer.state[ours[0]]["step"]) == 4.0 and float(optimizer.state[ours[1]]["step"]) == 1.0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------- AdamW options, closures, schedulers


@each_backend
def test_maximize_matches_torch_adamw(backend):
    """``maximize=True`` ascends exactly as torch.optim.AdamW(maximize=True)."""
    device = _device(backend)
    torch.manual_seed(0)
    values = [torch.randn(6, 5), torch.randn(5)]
    grads = [[torch.randn(6, 5), torch.randn(5)] for _ in range(10)]
    ours = [nn.Parameter(v.clone().to(device)) for v in values]
    theirs = [nn.Parameter(v.clone().to(device)) for v in values]
    _run_fixed_grads(HPAOptimizer(ours, lr=1e-2, weight_decay=0.1, maximize=True, backend=backend), ours, grads)
    _run_fixed_grads(torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, maximize=True), theirs, grads)
    for a, b, v in zip(ours, theirs, values):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a.cpu(), v)


@each_backend
def test_closure_is_reevaluated_with_grad_and_its_loss_returned(backend):
    """``step(closure)`` calls the closure once under enable_grad, steps on the gradients
    it produced and returns its loss — as torch.optim.AdamW."""
    device = _device(backend)
    torch.manual_seed(0)
    x, y = torch.randn(8, 4, device=device), torch.randn(8, 2, device=device)
    ours, theirs = nn.Linear(4, 2).to(device), nn.Linear(4, 2).to(device)
    theirs.load_state_dict(ours.state_dict())
    results = []
    for model, optimizer in (
        (ours, HPAOptimizer(ours.parameters(), lr=1e-2, backend=backend)),
        (theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2)),
    ):
        calls = []

        def closure(model=model, optimizer=optimizer, calls=calls):
            calls.append(torch.is_grad_enabled())
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        with torch.no_grad():
            losses = [optimizer.step(closure) for _ in range(3)]
        assert calls == [True, True, True]
        assert all(isinstance(loss, Tensor) and loss.requires_grad for loss in losses)
        results.append([float(loss.detach()) for loss in losses])
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@each_backend
def test_tensor_lr_follows_a_scheduler_as_torch_adamw(backend):
    """A 0-d tensor ``lr`` changed in place by a scheduler gives AdamW's steps."""
    device = _device(backend)
    torch.manual_seed(0)
    values = [torch.randn(4, 4)]
    grads = [[torch.randn(4, 4)] for _ in range(8)]
    ours, theirs = [nn.Parameter(values[0].clone().to(device))], [nn.Parameter(values[0].clone().to(device))]
    lr_ours, lr_theirs = torch.tensor(1e-2, device=device), torch.tensor(1e-2, device=device)
    optimizer = HPAOptimizer(ours, lr=lr_ours, backend=backend)
    reference = torch.optim.AdamW(theirs, lr=lr_theirs)
    _run_fixed_grads(optimizer, ours, grads, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5))
    _run_fixed_grads(reference, theirs, grads, torch.optim.lr_scheduler.StepLR(reference, step_size=2, gamma=0.5))
    assert optimizer.param_groups[0]["lr"] is lr_ours and float(lr_ours) == pytest.approx(1e-2 / 16)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("key", ["amsgrad", "foreach", "fused", "capturable", "differentiable", "momentum"])
def test_unsupported_adamw_options_are_refused_at_construction(key):
    """An AdamW option HPAOptimizer does not implement is refused, never ignored."""
    with pytest.raises(ValueError, match=f"unknown param group keys.*{key}"):
        HPAOptimizer([{"params": [nn.Parameter(torch.zeros(2))], key: True}])
    with pytest.raises(TypeError):
        HPAOptimizer([nn.Parameter(torch.zeros(2))], **{key: True})


def test_param_groups_given_as_generators_keep_every_parameter():
    """A group whose ``params`` is a generator (``model.parameters()``) loses no parameter."""
    model = TinyModel()
    optimizer = HPAOptimizer([{"params": model.blocks.parameters()}, {"params": model.head.parameters()}])
    assert [len(g["params"]) for g in optimizer.param_groups] == [
        len(list(model.blocks.parameters())),
        len(list(model.head.parameters())),
    ]


# -------------------------------------------------------------------------- GradScaler and autocast


def _amp_setup(backend, seed=0):
    device = _device(backend)
    torch.manual_seed(seed)
    model = TinyModel().to(device)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, eps=1e-3, backend=backend)
    optimizer.begin_task(calibrate(model, optimizer, _batches(2, 50, device)))
    return model, optimizer


def _amp_backward(model, tokens, labels, scaler=None, dtype=torch.bfloat16):
    with torch.autocast(tokens.device.type, dtype=dtype):
        loss = nn.functional.cross_entropy(model(tokens), labels)
    (loss if scaler is None else scaler.scale(loss)).backward()


@each_backend
@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_skip_changes_nothing(backend, bad, unscale_first):
    """Under bf16 autocast with GradScaler, an inf/NaN gradient leaves parameters, moments,
    step counts, snapshots and statistics bitwise unchanged, and the scaler backs off."""
    device = _device(backend)
    model, optimizer = _amp_setup(backend)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16  # fp16 where a GPU exists
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8)
    tokens, labels = _batches(1, 51, device)[0]
    _amp_backward(model, tokens, labels, scaler, dtype)
    scaler.step(optimizer)
    scaler.update()
    weights, state = _weights(model), _state_of(optimizer)
    assert any(key[1] == "hpa_prev" for key in state) and any(key[1] == "hpa_hinv_safety" for key in state)
    optimizer.zero_grad()
    _amp_backward(model, tokens, labels, scaler, dtype)
    model.blocks[1].q.weight.grad[0, 0] = float(bad)
    if unscale_first:
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    _assert_bitwise(weights, _weights(model))
    _assert_bitwise(state, _state_of(optimizer))
    assert scaler.get_scale() == 2.0**7


@each_backend
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_unscales_exactly_once(backend, unscale_first):
    """A scaled step (with or without a prior ``scaler.unscale_``) equals the unscaled one:
    the power-of-two scale is divided out once — not zero times, not twice. A large ε makes the
    AdamW update depend on the gradient's scale."""
    device = _device(backend)
    scaled_model, scaled = _amp_setup(backend)
    plain_model, plain = _amp_setup(backend)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    for tokens, labels in _batches(3, 52, device):
        scaled.zero_grad()
        plain.zero_grad()
        _amp_backward(scaled_model, tokens, labels, scaler)
        _amp_backward(plain_model, tokens, labels)
        if unscale_first:
            scaler.unscale_(scaled)
        scaler.step(scaled)
        scaler.update()
        plain.step()
    assert scaler.get_scale() == 2.0**12  # no skipped step
    for key, value in _state_of(plain).items():
        torch.testing.assert_close(_state_of(scaled)[key], value, rtol=1e-6, atol=0, msg=str(key))
    for a, b in zip(scaled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# ------------------------------------------------------ low-precision parameters and master weights


def _small_update_setup(dtype=torch.bfloat16):
    torch.manual_seed(0)
    # Magnitudes in [2^-7, 2^-6): a bf16 ulp is 2^-14 ≈ 6.1e-5, so an lr of 1e-5 is below half of it.
    value = (0.0080 + 0.007 * torch.rand(4, 8)).to(dtype)
    sign = torch.randn(4, 8).sign()
    grads = [[(sign * (0.5 + torch.rand(4, 8))).to(dtype)] for _ in range(12)]
    return value, grads


@each_backend
def test_bf16_updates_below_resolution_are_lost_without_master_weights(backend):
    """Documented behaviour: without master weights a bf16 update smaller than half an
    ulp is rounded away — the parameter does not move — and the constructor warns about it."""
    device = _device(backend)
    value, grads = _small_update_setup()
    value = value.to(device)
    param = nn.Parameter(value.clone())
    with pytest.warns(UserWarning, match="master_weights=True"):
        optimizer = HPAOptimizer([param], lr=1e-5, weight_decay=0.0, backend=backend)
    _run_fixed_grads(optimizer, [param], grads)
    assert torch.equal(param, value)


@each_backend
def test_bf16_master_weights_accumulate_small_updates(backend):
    """With master weights the fp32 copy follows fp32 AdamW on the same gradients, and
    the bf16 parameter is its rounding, so the small updates are kept."""
    device = _device(backend)
    value, grads = _small_update_setup()
    value = value.to(device)
    param = nn.Parameter(value.clone())
    optimizer = HPAOptimizer([param], lr=1e-5, weight_decay=0.01, backend=backend, master_weights=True)
    reference_param = nn.Parameter(value.float())
    reference = torch.optim.AdamW([reference_param], lr=1e-5, weight_decay=0.01)
    _run_fixed_grads(optimizer, [param], grads)
    _run_fixed_grads(reference, [reference_param], [[g.float() for g in step] for step in grads])
    master = optimizer.state[param]["master_param"]
    assert master.dtype == torch.float32 and param.dtype == torch.bfloat16
    torch.testing.assert_close(master, reference_param.detach(), rtol=1e-6, atol=1e-9)
    assert torch.equal(param, master.to(torch.bfloat16))
    assert not torch.equal(param, value)


@each_backend
def test_master_weights_hpa_edit_acts_on_the_fp32_copy(backend):
    """With master weights, W_prev and W_new are the fp32 copies, the edit writes Ŵ into
    the copy and round(Ŵ) into the bf16 parameter; retained columns return to the task's start."""
    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel(width=16).to(device=device, dtype=torch.bfloat16)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend, master_weights=True)
    run_task(model, optimizer, 60, device)  # a first task creates the master copies
    train(model, optimizer, _batches(1, 64, device))
    optimizer.begin_task(calibrate(model, optimizer, _batches(2, 65, device)))
    layers = optimizer.hpa_layers
    w_prev = {n: optimizer.state[layer.module.weight]["master_param"].clone() for n, layer in layers.items()}
    start = {n: layer.module.weight.detach().clone() for n, layer in layers.items()}
    train(model, optimizer, _batches(4, 66, device))
    w_new = {n: optimizer.state[layer.module.weight]["master_param"].clone() for n, layer in layers.items()}
    safety = {n: optimizer.state[layer.module.weight]["hpa_hinv_safety"].clone() for n, layer in layers.items()}
    task = calibrate(model, optimizer, _batches(2, 67, device))
    optimizer.end_task(task)
    for name, layer in layers.items():
        expected = hpa_layer_update(
            w_prev[name], w_new[name], safety[name], task[name], layer.retain_ratio, backend=backend
        )
        master = optimizer.state[layer.module.weight]["master_param"]
        assert torch.equal(master, expected.weight), name
        assert torch.equal(layer.module.weight, master.to(torch.bfloat16)), name
        assert torch.equal(layer.module.weight[:, expected.mask], start[name][:, expected.mask]), name


@each_backend
@pytest.mark.parametrize("master_weights", [False, True])
def test_fp16_with_eps_1e_8_stays_finite(backend, master_weights):
    """fp16 parameters with eps=1e-8 (which underflows in fp16): zero, tiny and huge
    gradients give no NaN and no Inf — the math is fp32."""
    device = _device(backend)
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(3, 16).half().to(device))
    initial = param.detach().clone()
    optimizer = HPAOptimizer([param], lr=1e-3, eps=1e-8, backend=backend, master_weights=master_weights)
    grads = torch.zeros(3, 16)
    grads[1] = 6e-8  # fp16 subnormals
    grads[2] = 6e4
    grads[2, ::2] = -6e4
    for step in range(4):
        param.grad = (grads if step % 2 == 0 else torch.zeros(3, 16)).half().to(device)
        optimizer.step()
    assert torch.isfinite(param).all()
    assert all(torch.isfinite(v).all() for v in optimizer.state[param].values() if isinstance(v, Tensor))
    assert not torch.equal(param[2], initial[2])


# ----------------------------------------------------------------------------------- memory layouts


def _bmm_weight(device):
    """A (2, 1, 100) weight used through a transpose and bmm: its gradient's strides differ."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(2, 1, 100, device=device))
    torch.bmm(torch.randn(2, 3, 100, device=device), weight.transpose(1, 2)).square().sum().backward()
    assert weight.grad.stride() != weight.stride()
    return [(weight, weight.grad)]


def _column_slice(device):
    torch.manual_seed(1)
    big = torch.randn(6, 10, device=device)
    return [(nn.Parameter(torch.randn(6, 4, device=device)), big[:, 3:7])]


def _channels_last_conv(device):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3).to(device=device, memory_format=torch.channels_last)
    conv(torch.randn(2, 3, 6, 6, device=device).to(memory_format=torch.channels_last)).square().sum().backward()
    contiguous_grad = torch.randn(5, 3, 3, 3, device=device)  # a channels_last weight, a contiguous gradient
    other = nn.Parameter(torch.randn(5, 3, 3, 3, device=device).contiguous(memory_format=torch.channels_last))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    return [(conv.weight, conv.weight.grad), (conv.bias, conv.bias.grad), (other, contiguous_grad)]


def _zero_element_mix(device):
    torch.manual_seed(3)
    shapes = [(1,), (1,), (0,), (1,), (0,)]
    return [(nn.Parameter(torch.randn(s, device=device)), torch.randn(s, device=device)) for s in shapes]


@each_backend
@pytest.mark.parametrize("make", [_bmm_weight, _column_slice, _channels_last_conv, _zero_element_mix])
def test_layouts_give_the_result_of_contiguous_copies(backend, make):
    """Odd gradient strides, non-contiguous gradients, channels_last weights and
    zero-element parameters in one group: bit-equal to contiguous copies, AdamW's result, and the
    parameters keep their layout."""
    device = _device(backend)
    pairs = make(device)
    params = [p for p, _ in pairs]
    grads = [g.detach() for _, g in pairs]
    strides = [p.stride() for p in params]
    copies = [nn.Parameter(p.detach().contiguous().clone()) for p in params]
    theirs = [nn.Parameter(p.detach().clone()) for p in params]
    steps = [[g for g in grads]] * 3
    _run_fixed_grads(HPAOptimizer(params, lr=1e-2, weight_decay=0.1, backend=backend), params, steps)
    _run_fixed_grads(
        HPAOptimizer(copies, lr=1e-2, weight_decay=0.1, backend=backend), copies, [[g.contiguous() for g in grads]] * 3
    )
    _run_fixed_grads(torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1), theirs, steps)
    for p, c, t, stride in zip(params, copies, theirs, strides):
        assert p.stride() == stride
        assert torch.equal(p.contiguous(), c)
        torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------- which layers are edited


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


@each_backend
def test_only_managed_linears_are_edited(backend):
    """1-D and 0-D parameters, conv weights, embeddings and the head get plain AdamW steps
    (as with HPA disabled) and are never edited; the managed block Linears are."""
    device = _device(backend)
    runs = {}
    for enabled in (True, False):
        torch.manual_seed(0)
        model = _MixedModel().to(device)
        optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend, hpa=HPAConfig(enabled=enabled))
        assert list(optimizer.hpa_layers) == ["blocks.0.proj", "blocks.1.proj"]
        hinv = calibrate(model, optimizer, _batches(2, 70, device)) if enabled else None
        optimizer.begin_task(hinv)
        train(model, optimizer, _batches(4, 71, device))
        before_edit = _weights(model)
        task = calibrate(model, optimizer, _batches(2, 72, device)) if enabled else None
        optimizer.end_task(task)
        runs[enabled] = (before_edit, _weights(model))
    (hpa_before, hpa_after), (plain_before, _) = runs[True], runs[False]
    _assert_bitwise(plain_before, hpa_before)  # the steps are plain AdamW either way
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


@each_backend
def test_zero_w_prev_gives_coef_zero_and_untrained_layer_is_unchanged(backend):
    """A managed layer whose W_prev is all zeros gets coef 0 (not NaN); a managed layer that
    received no gradient during the task is left exactly as it was."""
    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel().to(device)
    with torch.no_grad():
        model.blocks[0].o.weight.zero_()
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend)
    optimizer.begin_task(calibrate(model, optimizer, _batches(2, 80, device)))
    frozen = model.blocks[2].k.weight
    before = frozen.detach().clone()
    for tokens, labels in _batches(4, 81, device):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        frozen.grad = None  # a frozen branch this task
        optimizer.step()
    report = optimizer.end_task(calibrate(model, optimizer, _batches(2, 82, device)))
    assert report["blocks.0.o"].coef == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(frozen, before) and report["blocks.2.k"].coef == 0.0


# ----------------------------------------------------------------- parameters and gradients refused


class _ComplexModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])
        self.rotation = nn.Parameter(torch.ones(4, dtype=torch.complex64))


def test_complex_parameters_are_refused_by_name():
    """A complex parameter is refused at construction, named, before any state exists."""
    with pytest.raises(ValueError, match="'rotation'.*complex"):
        HPAOptimizer.from_model(_ComplexModel())
    with pytest.raises(ValueError, match="'phase'.*complex"):
        HPAOptimizer([("w", nn.Parameter(torch.ones(2))), ("phase", nn.Parameter(torch.ones(2, dtype=torch.cfloat)))])
    with pytest.raises(ValueError, match="complex"):
        HPAOptimizer([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    optimizer = HPAOptimizer([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="complex"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2, dtype=torch.complex128))]})
    assert len(optimizer.param_groups) == 1


@each_backend
def test_sparse_gradient_is_refused_by_name_before_any_state_change(backend):
    """A sparse gradient raises TypeError naming the parameter; nothing is stepped, in any
    group, and no state is created — on a first step (a sparse ``nn.Embedding``) as on a later one."""
    device = _device(backend)
    dense = nn.Parameter(torch.ones(4, device=device))
    embedding = nn.Embedding(5, 2, sparse=True).to(device)
    first = HPAOptimizer([dense, *embedding.parameters()], backend=backend)
    (dense.sum() + embedding(torch.tensor([1, 2], device=device)).sum()).backward()
    with pytest.raises(TypeError, match="sparse"):
        first.step()
    assert len(first.state) == 0 and torch.equal(dense.cpu(), torch.ones(4))
    torch.manual_seed(0)
    model = TinyModel().to(device)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend)
    train(model, optimizer, _batches(1, 90, device))
    weights, state = _weights(model), _state_of(optimizer)
    tokens, labels = _batches(1, 91, device)[0]
    nn.functional.cross_entropy(model(tokens), labels).backward()
    grad = model.head.weight.grad
    model.head.weight.grad = grad.to_sparse()
    with pytest.raises(TypeError, match="'head.weight'.*sparse|sparse.*'head.weight'"):
        optimizer.step()
    _assert_bitwise(weights, _weights(model))
    _assert_bitwise(state, _state_of(optimizer))


@each_backend
def test_float64_parameter_is_stepped_or_refused_before_any_state_change(backend):
    """A parameter dtype the backend cannot step (float64 outside the "torch"
    reference) is refused with a TypeError naming it, before any parameter or state changes."""
    device = _device(backend)
    torch.manual_seed(0)
    first = nn.Parameter(torch.randn(3, device=device))
    double = nn.Parameter(torch.randn(3, dtype=torch.float64, device=device))
    optimizer = HPAOptimizer([{"params": [first]}, {"params": [double]}], lr=1e-2, backend=backend)
    first.grad, double.grad = torch.randn(3, device=device), torch.randn(3, dtype=torch.float64, device=device)
    before = (first.detach().clone(), double.detach().clone())
    if ops.resolve_backend(backend, double.device) == "torch":
        optimizer.step()
        reference = nn.Parameter(before[1].clone())
        reference.grad = double.grad.clone()
        torch.optim.AdamW([reference], lr=1e-2).step()
        torch.testing.assert_close(double, reference)
        return
    with pytest.raises(TypeError, match="parameter 0 of param group 1.*float64"):
        optimizer.step()
    assert torch.equal(first, before[0]) and torch.equal(double, before[1]) and len(optimizer.state) == 0


# -------------------------------------------------------------------------------------- determinism


@each_backend
def test_same_seed_gives_bit_identical_weights_and_edits(backend):
    """Two runs from the same seed and inputs: bit-identical weights, state and reports."""
    device = _device(backend)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyModel().to(device)
        optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend)
        reports = [run_task(model, optimizer, 100 + 10 * t, device) for t in range(2)]
        results.append((_weights(model), _state_of(optimizer), reports))
    _assert_bitwise(results[0][0], results[1][0])
    _assert_bitwise(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]


# ------------------------------------------------------------------------------------ torch.compile


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


@each_backend
def test_compiled_training_step_matches_eager_without_recompiles(backend):
    """A training step compiled with torch.compile — the optimizer step inside the compiled
    function, or outside it with the model compiled — gives eager's weights within fp32 tolerance,
    and a 20-step learning-rate schedule (on a tensor lr, and on a float lr) causes no recompilation.
    HPAOptimizer.step is deliberately not traced (``torch._disable_dynamo``): a graph break."""
    device = _device(backend)
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    data = [
        (torch.randn(5, 6, generator=torch.Generator().manual_seed(s)).to(device), torch.randint(0, 3, (5,)).to(device))
        for s in range(20)
    ]

    def run(mode):
        model = _mlp().to(device)
        lr = 1e-2 if mode == "inside-float-lr" else torch.tensor(1e-2, device=device)
        optimizer = HPAOptimizer(model.parameters(), lr=lr, backend=backend)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
        forward = torch.compile(model, backend="aot_eager") if mode == "outside" else model

        def train_step(x, y):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            return loss

        step = torch.compile(train_step, backend="aot_eager") if mode.startswith("inside") else train_step
        graphs = []
        for x, y in data:
            step(x, y)
            scheduler.step()
            graphs.append(counters["stats"]["unique_graphs"])
        return model, graphs

    eager, _ = run("eager")
    for mode in ("inside", "inside-float-lr", "outside"):
        torch._dynamo.reset()  # each mode compiles afresh
        counters.clear()
        compiled, graphs = run(mode)
        assert graphs[0] > 0 and graphs[-1] == graphs[1], (mode, graphs)  # nothing compiled after warm-up
        for a, b in zip(compiled.parameters(), eager.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ------------------------------------------------------------------ bad input and nothing lost


def _open_task(backend, seed=110):
    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel().to(device)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend)
    optimizer.begin_task(calibrate(model, optimizer, _batches(2, seed, device)))
    train(model, optimizer, _batches(4, seed + 1, device))
    return model, optimizer, calibrate(model, optimizer, _batches(2, seed + 2, device))


@each_backend
@pytest.mark.parametrize("case", ["snapshot-shape", "snapshot-nan", "lost-statistics", "statistics-list"])
def test_end_task_refuses_bad_state_and_changes_no_weight(backend, case):
    """end_task checks everything before writing: a corrupted or lost snapshot, lost statistics or
    statistics of the wrong type raise, naming the layer, and no weight changes."""
    model, optimizer, task = _open_task(backend)
    state = optimizer.state[model.blocks[1].k.weight]
    if case == "snapshot-shape":
        state["hpa_prev"] = state["hpa_prev"][:, :-1].clone()
    elif case == "snapshot-nan":
        state["hpa_prev"][0, 0] = float("nan")
    elif case == "lost-statistics":
        del state["hpa_hinv_safety"]
    else:
        task = {**task, "blocks.1.k": task["blocks.1.k"].tolist()}
    weights = _weights(model)
    with pytest.raises((ValueError, RuntimeError), match="blocks.1.k"):
        optimizer.end_task(task)
    _assert_bitwise(weights, _weights(model))
    assert optimizer.in_task


@each_backend
@pytest.mark.parametrize("resume", [False, True])
def test_retry_after_a_failed_write_completes_the_edit_exactly_once(backend, resume, monkeypatch):
    """A failure while writing leaves each layer fully edited or untouched (the error says which);
    calling end_task again — also after saving and loading the state — edits only the untouched
    layers, and the result is the uninterrupted edit bit for bit."""
    device = _device(backend)
    model, optimizer, task = _open_task(backend)
    reference_model = copy.deepcopy(model)
    reference = HPAOptimizer.from_model(reference_model, lr=1e-2, backend=backend)
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
        assert _plain(saved) and list(saved["hpa"]["edited"]) == names[:3]
        torch.save({"model": model.state_dict(), "optim": saved}, buffer)
        checkpoint = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        model = TinyModel().to(device)
        model.load_state_dict(checkpoint["model"])
        optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend)
        optimizer.load_state_dict(checkpoint["optim"])
    report = optimizer.end_task(task)
    assert report == expected_report and not optimizer.in_task and optimizer.tasks_completed == 1
    _assert_bitwise(_weights(reference_model), _weights(model))


# ----------------------------------------------- copies, scheduler state, tied parameters, adapters


@each_backend
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_works_and_matches_the_original(backend, how):
    """``copy.deepcopy`` / ``pickle`` of an HPAOptimizer mid-task keeps its HPA attributes (the
    backend, the managed layers, the open task): a copy of (model, optimizer) steps and ends the
    task bit-identically to the original, and the optimizer copied alone steps."""
    import pickle

    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel().to(device)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend=backend)
    optimizer.begin_task(calibrate(model, optimizer, _batches(2, 1, device)))
    train(model, optimizer, _batches(2, 2, device))
    pair = (model, optimizer)
    copied_model, copied = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert copied.in_task and copied.backend == backend and set(copied.hpa_layers) == set(optimizer.hpa_layers)
    for name, layer in copied.hpa_layers.items():
        assert layer.module.weight is dict(copied_model.named_parameters())[f"{name}.weight"]
    reports = []
    for net, opt in ((model, optimizer), (copied_model, copied)):
        train(net, opt, _batches(2, 3, device))
        reports.append(opt.end_task(calibrate(net, opt, _batches(2, 4, device))))
    assert reports[0] == reports[1]
    for (name, a), b in zip(model.state_dict().items(), copied_model.state_dict().values()):
        assert torch.equal(a, b), name
    _assert_bitwise(_state_of(optimizer), _state_of(copied))
    lone = copy.deepcopy(optimizer)  # the optimizer alone: its own copies of the parameters
    for p in (p for group in lone.param_groups for p in group["params"]):
        p.grad = torch.ones_like(p)
    lone.step()


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "SWALR"])
def test_state_dicts_with_scheduler_group_keys_load_as_into_adamw(scheduler):
    """A state dict saved after OneCycleLR (``base_momentum``, ``max_momentum``, ``initial_lr``,
    ``max_lr``, ``min_lr``) or SWALR (``swa_lr``) loads, as into torch.optim.AdamW: the keys are
    kept, so the scheduler resumes, and steps then match torch's."""
    from torch.optim.swa_utils import SWALR

    def make(opt):
        if scheduler == "OneCycleLR":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8)
        return SWALR(opt, swa_lr=5e-3, anneal_epochs=3)

    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(4)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(6)]
    states = {}
    for cls in (torch.optim.AdamW, HPAOptimizer):
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = cls(params, lr=1e-3, **({"backend": "torch"} if cls is HPAOptimizer else {}))
        sched = make(opt)
        _run_fixed_grads(opt, params, grads[:3], sched)
        states[cls] = (opt.state_dict(), sched.state_dict())
    ours_saved, _ = states[HPAOptimizer]
    theirs_saved, sched_saved = states[torch.optim.AdamW]
    assert {"swa_lr"} <= set(theirs_saved["param_groups"][0]) or {"max_lr", "base_momentum"} <= set(
        theirs_saved["param_groups"][0]
    )
    results = []
    for cls, saved in ((torch.optim.AdamW, theirs_saved), (HPAOptimizer, theirs_saved), (HPAOptimizer, ours_saved)):
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = cls(params, lr=1e-3, **({"backend": "torch"} if cls is HPAOptimizer else {}))
        sched = make(opt)
        opt.load_state_dict(copy.deepcopy(saved))
        sched.load_state_dict(sched_saved)
        for key in set(theirs_saved["param_groups"][0]) - {"params", "foreach", "fused", "amsgrad", "capturable",
                                                           "differentiable", "decoupled_weight_decay"}:  # fmt: skip
            assert key in opt.param_groups[0], key
        _run_fixed_grads(opt, params, grads[3:], sched)
        results.append(params)
    for ours in results[1:]:
        for a, b in zip(results[0], ours):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_tensor_listed_twice_is_refused_by_name():
    """The same tensor listed twice (tied embeddings and heads) would be stepped twice: it is
    refused, naming it, in a plain list and in (name, parameter) pairs."""
    weight = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="listed twice"):
        HPAOptimizer([weight, nn.Parameter(torch.zeros(2)), weight])
    with pytest.raises(ValueError, match="'head.weight' is listed twice"):
        HPAOptimizer([("embed.weight", weight), ("head.weight", weight)])


def test_nan_in_a_lora_adapter_leaves_every_weight_as_it_was():
    """``end_task`` on a PEFT model checks the plan before it merges and resets the adapters: with
    a NaN in one adapter it raises with every base weight and adapter bitwise as it was, and
    succeeds once fixed."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from helpers import tiny_llama

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_llama(32, seed=0), config)
    optimizer = HPAOptimizer.from_model(model, lr=2e-2, backend="torch")
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
    before = _weights(model)
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        optimizer.end_task(hinv())
    after = _weights(model)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value.isnan(), after[key].isnan()), key
        assert torch.equal(value.nan_to_num(), after[key].nan_to_num()), key
    with torch.no_grad():
        lora_b.copy_(saved_b)
    assert optimizer.end_task(hinv())
    assert not lora_b.any()


def test_former_statistics_keywords_still_work_with_a_deprecation_warning():
    """``begin_task(safety_hessians=)`` / ``end_task(task_hessians=)`` (the former names of
    ``hinv_safety`` / ``hinv_task``) give the same edit, with a DeprecationWarning; both names at
    once is a TypeError and leaves the optimizer as it was."""
    weights = {}
    for former in (False, True):
        torch.manual_seed(0)
        model = TinyModel()
        optimizer = HPAOptimizer.from_model(model, lr=1e-2, backend="torch")
        safety = calibrate(model, optimizer, _batches(2, 70, "cpu"))
        if former:
            with pytest.raises(TypeError, match="pass hinv_safety only"):
                optimizer.begin_task(safety, safety_hessians=safety)
            assert not optimizer.in_task
            with pytest.warns(DeprecationWarning, match=r"begin_task\(safety_hessians=...\) is deprecated"):
                optimizer.begin_task(safety_hessians=safety)
        else:
            optimizer.begin_task(hinv_safety=safety)
        train(model, optimizer, _batches(2, 71, "cpu"))
        task = calibrate(model, optimizer, _batches(2, 72, "cpu"))
        if former:
            with pytest.warns(DeprecationWarning, match=r"end_task\(task_hessians=...\) is deprecated"):
                optimizer.end_task(task_hessians=task)
        else:
            optimizer.end_task(hinv_task=task)
        weights[former] = model.state_dict()
    for key, value in weights[False].items():
        assert torch.equal(weights[True][key], value), key
