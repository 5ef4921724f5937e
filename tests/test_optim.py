"""HPAOptimizer keeps PyTorch's optimizer contract, table-driven as torch's ``OptimizerInfo`` tests:
each test runs on the records of ``helpers.OPTIM_DB`` it selects with ``@optims`` (plain AdamW,
master weights, HPA offline, HPA online, HPA disabled, LoRA; on every backend of
``hpa_kernels.ops.available_backends()``, or on one) and builds its optimizer from the record, on
the device that backend runs on. Tests of what the constructor finds or refuses build it directly.

Here: AdamW steps against torch.optim.AdamW, closures, schedulers, refused inputs, GradScaler, low
precision and master weights, memory layouts, determinism, torch.compile, the task lifecycle.
The edit at ``end_task``: test_edit.py; online mode: test_online.py; state dicts, resume, copies:
test_optim_state.py.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import (
    DEFAULT_BACKEND,
    TinyModel,
    assert_bitwise,
    calibrate,
    model_weights,
    optimizer_state,
    optims,
    random_batches,
    run_fixed_grads,
    run_task,
    train,
)
from torch import Tensor, nn

from hpa_kernels import HPAOptimizer
from hpa_kernels.functional import hpa_layer_update

# -------------------------------------------------------------- AdamW steps against torch's AdamW


ADAMW_INPUTS = [
    pytest.param({"lr": 1e-2, "weight_decay": 0.0}, id="no-decay"),
    pytest.param({"lr": 1e-2, "weight_decay": 0.1}, id="decay"),
    pytest.param({"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}, id="betas-eps"),
    pytest.param({"lr": 1e-2, "weight_decay": 0.01, "maximize": True}, id="maximize"),
]


@optims("adamw", backends=[DEFAULT_BACKEND])
@pytest.mark.parametrize("kwargs", ADAMW_INPUTS)
def test_step_matches_torch_adamw(info, kwargs):
    """Same hyperparameters, same data: within 1e-5 relative after 100 steps."""
    torch.manual_seed(0)
    reference = TinyModel()
    ours = copy.deepcopy(reference)
    batches = random_batches(100, seed=1)
    train(reference, torch.optim.AdamW(reference.parameters(), **kwargs), batches)
    train(ours, info.build(ours.parameters(), **kwargs), batches)
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        # Relative to the tensor: 1e-5 of its norm. Elementwise, the compiled kernels order the fp32
        # arithmetic differently from torch (a few ulps a step), hence atol 1e-6 for entries near 0.
        assert float((b - a).norm() / a.norm()) <= 1e-5, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@optims("adamw", backends=[DEFAULT_BACKEND])
def test_param_groups_and_tensor_lr(info):
    """Two param groups (one with its own lr, one without decay) under a 0-d tensor lr: the steps
    of torch.optim.AdamW with a float lr."""
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
    train(ours, info.build(groups(ours), lr=torch.tensor(1e-2)), batches)
    for a, b in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@optims("adamw")
def test_param_without_grad_is_not_touched(info):
    """A parameter with ``grad is None`` this step gets no decay, no state or step-count
    change — as torch.optim.AdamW — while its neighbours in the group are stepped."""
    device = info.device
    torch.manual_seed(0)
    values = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    grads = [[torch.randn(4, 3), torch.randn(5), None]] + [[torch.randn(4, 3), None, None] for _ in range(3)]
    ours = [nn.Parameter(v.clone().to(device)) for v in values]
    theirs = [nn.Parameter(v.clone().to(device)) for v in values]
    optimizer = info.build(ours, lr=1e-2, weight_decay=0.5)
    reference = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.5)
    run_fixed_grads(optimizer, ours, grads[:1])
    run_fixed_grads(reference, theirs, grads[:1])
    after_first = {key: value for key, value in optimizer_state(optimizer).items() if key[0] == 1}
    frozen = ours[1].detach().clone()
    run_fixed_grads(optimizer, ours, grads[1:])
    run_fixed_grads(reference, theirs, grads[1:])
    assert torch.equal(ours[1], frozen) and torch.equal(ours[2].cpu(), values[2])
    assert_bitwise(after_first, {key: value for key, value in optimizer_state(optimizer).items() if key[0] == 1})
    assert ours[2] not in optimizer.state
    assert float(optimizer.state[ours[0]]["step"]) == 4.0 and float(optimizer.state[ours[1]]["step"]) == 1.0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@optims("adamw")
def test_maximize_matches_torch_adamw(info):
    """``maximize=True`` ascends exactly as torch.optim.AdamW(maximize=True)."""
    device = info.device
    torch.manual_seed(0)
    values = [torch.randn(6, 5), torch.randn(5)]
    grads = [[torch.randn(6, 5), torch.randn(5)] for _ in range(10)]
    ours = [nn.Parameter(v.clone().to(device)) for v in values]
    theirs = [nn.Parameter(v.clone().to(device)) for v in values]
    run_fixed_grads(info.build(ours, lr=1e-2, weight_decay=0.1, maximize=True), ours, grads)
    run_fixed_grads(torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, maximize=True), theirs, grads)
    for a, b, v in zip(ours, theirs, values):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a.cpu(), v)


@optims("adamw")
def test_closure_is_reevaluated_with_grad_and_its_loss_returned(info):
    """``step(closure)`` calls the closure once under enable_grad, steps on the gradients
    it produced and returns its loss — as torch.optim.AdamW."""
    device = info.device
    torch.manual_seed(0)
    x, y = torch.randn(8, 4, device=device), torch.randn(8, 2, device=device)
    ours, theirs = nn.Linear(4, 2).to(device), nn.Linear(4, 2).to(device)
    theirs.load_state_dict(ours.state_dict())
    results = []
    for model, optimizer in (
        (ours, info.build(ours.parameters(), lr=1e-2)),
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


@optims("adamw")
def test_tensor_lr_follows_a_scheduler_as_torch_adamw(info):
    """A 0-d tensor ``lr`` changed in place by a scheduler gives AdamW's steps."""
    device = info.device
    torch.manual_seed(0)
    values = [torch.randn(4, 4)]
    grads = [[torch.randn(4, 4)] for _ in range(8)]
    ours, theirs = [nn.Parameter(values[0].clone().to(device))], [nn.Parameter(values[0].clone().to(device))]
    lr_ours, lr_theirs = torch.tensor(1e-2, device=device), torch.tensor(1e-2, device=device)
    optimizer = info.build(ours, lr=lr_ours)
    reference = torch.optim.AdamW(theirs, lr=lr_theirs)
    run_fixed_grads(optimizer, ours, grads, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5))
    run_fixed_grads(reference, theirs, grads, torch.optim.lr_scheduler.StepLR(reference, step_size=2, gamma=0.5))
    assert optimizer.param_groups[0]["lr"] is lr_ours and float(lr_ours) == pytest.approx(1e-2 / 16)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ refused at construction


@dataclasses.dataclass(frozen=True)
class ErrorInput:
    """Constructor keywords HPAOptimizer refuses (as torch's ``ErrorOptimizerInput``): passed as
    keywords, or as keys of the one param group when ``in_group``."""

    kwargs: dict
    error: type[Exception]
    match: str | None = None
    in_group: bool = False


UNSUPPORTED_ADAMW_OPTIONS = ("amsgrad", "foreach", "fused", "capturable", "differentiable", "momentum")
ERROR_INPUTS = [
    pytest.param(ErrorInput({"lr": -1.0}, ValueError, "learning rate"), id="lr"),
    pytest.param(ErrorInput({"betas": (1.0, 0.9)}, ValueError, "betas"), id="betas"),
    pytest.param(ErrorInput({"eps": -1e-8}, ValueError, "eps"), id="eps"),
    pytest.param(ErrorInput({"weight_decay": -0.1}, ValueError, "weight_decay"), id="weight_decay"),
    pytest.param(ErrorInput({"backend": "nope"}, ValueError, "backend"), id="backend"),
    *(
        pytest.param(ErrorInput({key: True}, ValueError, f"unknown param group keys.*{key}", True), id=f"group-{key}")
        for key in UNSUPPORTED_ADAMW_OPTIONS
    ),
    *(pytest.param(ErrorInput({key: True}, TypeError), id=f"keyword-{key}") for key in UNSUPPORTED_ADAMW_OPTIONS),
]


@pytest.mark.parametrize("case", ERROR_INPUTS)
def test_bad_constructor_input_is_refused(case):
    """A hyperparameter out of range or an unknown backend raises ValueError; an AdamW option
    HPAOptimizer does not implement is refused, never ignored: as a group key a ValueError naming
    it, as a keyword a TypeError."""
    param = nn.Parameter(torch.zeros(2))
    with pytest.raises(case.error, match=case.match):
        if case.in_group:
            HPAOptimizer([{"params": [param], **case.kwargs}])
        else:
            HPAOptimizer([param], **case.kwargs)


def test_param_groups_given_as_generators_keep_every_parameter():
    """A group whose ``params`` is a generator (``model.parameters()``) loses no parameter."""
    model = TinyModel()
    optimizer = HPAOptimizer([{"params": model.blocks.parameters()}, {"params": model.head.parameters()}])
    assert [len(g["params"]) for g in optimizer.param_groups] == [
        len(list(model.blocks.parameters())),
        len(list(model.head.parameters())),
    ]


def test_a_tensor_listed_twice_is_refused_by_name():
    """The same tensor listed twice (tied embeddings and heads) would be stepped twice: it is
    refused, naming it, in a plain list and in (name, parameter) pairs."""
    weight = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="listed twice"):
        HPAOptimizer([weight, nn.Parameter(torch.zeros(2)), weight])
    with pytest.raises(ValueError, match="'head.weight' is listed twice"):
        HPAOptimizer([("embed.weight", weight), ("head.weight", weight)])


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


# -------------------------------------------------------------------------- GradScaler and autocast


def _amp_setup(info):
    torch.manual_seed(0)
    model = info.model()
    optimizer = info.build(model, lr=1e-2, eps=1e-3)
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 50)))
    return model, optimizer


def _amp_backward(model, tokens, labels, scaler=None, dtype=torch.bfloat16):
    with torch.autocast(tokens.device.type, dtype=dtype):
        loss = nn.functional.cross_entropy(model(tokens), labels)
    (loss if scaler is None else scaler.scale(loss)).backward()


@optims("hpa")
@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_skip_changes_nothing(info, bad, unscale_first):
    """Under bf16 autocast with GradScaler, an inf/NaN gradient leaves parameters, moments,
    step counts, snapshots and statistics bitwise unchanged, and the scaler backs off."""
    device = info.device
    model, optimizer = _amp_setup(info)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16  # fp16 where a GPU exists
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8)
    tokens, labels = info.batches(1, 51)[0]
    _amp_backward(model, tokens, labels, scaler, dtype)
    scaler.step(optimizer)
    scaler.update()
    weights, state = model_weights(model), optimizer_state(optimizer)
    assert any(key[1] == "hpa_prev" for key in state) and any(key[1] == "hpa_hinv_safety" for key in state)
    optimizer.zero_grad()
    _amp_backward(model, tokens, labels, scaler, dtype)
    model.blocks[1].q.weight.grad[0, 0] = float(bad)
    if unscale_first:
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert_bitwise(weights, model_weights(model))
    assert_bitwise(state, optimizer_state(optimizer))
    assert scaler.get_scale() == 2.0**7


@optims("hpa")
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_unscales_exactly_once(info, unscale_first):
    """A scaled step (with or without a prior ``scaler.unscale_``) equals the unscaled one:
    the power-of-two scale is divided out once — not zero times, not twice. A large ε makes the
    AdamW update depend on the gradient's scale."""
    scaled_model, scaled = _amp_setup(info)
    plain_model, plain = _amp_setup(info)
    scaler = torch.amp.GradScaler(info.device.type, init_scale=2.0**12)
    for tokens, labels in info.batches(3, 52):
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
    for key, value in optimizer_state(plain).items():
        torch.testing.assert_close(optimizer_state(scaled)[key], value, rtol=1e-6, atol=0, msg=str(key))
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


@optims("adamw")
def test_bf16_updates_below_resolution_are_lost_without_master_weights(info):
    """Documented behaviour: without master weights (the default) a bf16 update smaller than half
    an ulp is rounded away — the parameter does not move — and the constructor warns about it."""
    value, grads = _small_update_setup()
    value = value.to(info.device)
    param = nn.Parameter(value.clone())
    with pytest.warns(UserWarning, match="master_weights=True"):
        optimizer = info.build([param], lr=1e-5, weight_decay=0.0, master_weights=None)
    run_fixed_grads(optimizer, [param], grads)
    assert torch.equal(param, value)


@optims("master")
def test_bf16_master_weights_accumulate_small_updates(info):
    """With master weights the fp32 copy follows fp32 AdamW on the same gradients, and
    the bf16 parameter is its rounding, so the small updates are kept."""
    value, grads = _small_update_setup()
    value = value.to(info.device)
    param = nn.Parameter(value.clone())
    optimizer = info.build([param], lr=1e-5, weight_decay=0.01)
    reference_param = nn.Parameter(value.float())
    reference = torch.optim.AdamW([reference_param], lr=1e-5, weight_decay=0.01)
    run_fixed_grads(optimizer, [param], grads)
    run_fixed_grads(reference, [reference_param], [[g.float() for g in step] for step in grads])
    master = optimizer.state[param]["master_param"]
    assert master.dtype == torch.float32 and param.dtype == torch.bfloat16
    torch.testing.assert_close(master, reference_param.detach(), rtol=1e-6, atol=1e-9)
    assert torch.equal(param, master.to(torch.bfloat16))
    assert not torch.equal(param, value)


@optims("hpa-master")
def test_master_weights_hpa_edit_acts_on_the_fp32_copy(info):
    """With master weights, W_prev and W_new are the fp32 copies, the edit writes Ŵ into
    the copy and round(Ŵ) into the bf16 parameter; retained columns return to the task's start."""
    torch.manual_seed(0)
    model = info.model(width=16).to(torch.bfloat16)
    optimizer = info.build(model, lr=1e-2)
    run_task(model, optimizer, 60, info.device)  # a first task creates the master copies
    train(model, optimizer, info.batches(1, 64))
    optimizer.begin_task(calibrate(model, optimizer, info.batches(2, 65)))
    layers = optimizer.hpa_layers
    w_prev = {n: optimizer.state[layer.module.weight]["master_param"].clone() for n, layer in layers.items()}
    start = {n: layer.module.weight.detach().clone() for n, layer in layers.items()}
    train(model, optimizer, info.batches(4, 66))
    w_new = {n: optimizer.state[layer.module.weight]["master_param"].clone() for n, layer in layers.items()}
    safety = {n: optimizer.state[layer.module.weight]["hpa_hinv_safety"].clone() for n, layer in layers.items()}
    task = calibrate(model, optimizer, info.batches(2, 67))
    optimizer.end_task(task)
    for name, layer in layers.items():
        expected = hpa_layer_update(
            w_prev[name], w_new[name], safety[name], task[name], layer.retain_ratio, backend=info.backend
        )
        master = optimizer.state[layer.module.weight]["master_param"]
        assert torch.equal(master, expected.weight), name
        assert torch.equal(layer.module.weight, master.to(torch.bfloat16)), name
        assert torch.equal(layer.module.weight[:, expected.mask], start[name][:, expected.mask]), name


@optims("adamw", "master")
def test_fp16_with_eps_1e_8_stays_finite(info):
    """fp16 parameters with eps=1e-8 (which underflows in fp16), with or without master weights:
    zero, tiny and huge gradients give no NaN and no Inf — the math is fp32."""
    device = info.device
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(3, 16).half().to(device))
    initial = param.detach().clone()
    optimizer = info.build([param], lr=1e-3, eps=1e-8)
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


@optims("adamw")
@pytest.mark.parametrize("make", [_bmm_weight, _column_slice, _channels_last_conv, _zero_element_mix])
def test_layouts_give_the_result_of_contiguous_copies(info, make):
    """Odd gradient strides, non-contiguous gradients, channels_last weights and
    zero-element parameters in one group: bit-equal to contiguous copies, AdamW's result, and the
    parameters keep their layout."""
    pairs = make(info.device)
    params = [p for p, _ in pairs]
    grads = [g.detach() for _, g in pairs]
    strides = [p.stride() for p in params]
    copies = [nn.Parameter(p.detach().contiguous().clone()) for p in params]
    theirs = [nn.Parameter(p.detach().clone()) for p in params]
    steps = [[g for g in grads]] * 3
    run_fixed_grads(info.build(params, lr=1e-2, weight_decay=0.1), params, steps)
    run_fixed_grads(info.build(copies, lr=1e-2, weight_decay=0.1), copies, [[g.contiguous() for g in grads]] * 3)
    run_fixed_grads(torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1), theirs, steps)
    for p, c, t, stride in zip(params, copies, theirs, strides):
        assert p.stride() == stride
        assert torch.equal(p.contiguous(), c)
        torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- gradients and dtypes refused


@optims("adamw")
def test_sparse_gradient_on_a_first_step_is_refused_before_any_state_exists(info):
    """A sparse gradient (of a sparse ``nn.Embedding``) on the first step raises TypeError; nothing
    is stepped, in any group, and no state is created."""
    device = info.device
    dense = nn.Parameter(torch.ones(4, device=device))
    embedding = nn.Embedding(5, 2, sparse=True).to(device)
    optimizer = info.build([dense, *embedding.parameters()])
    (dense.sum() + embedding(torch.tensor([1, 2], device=device)).sum()).backward()
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()
    assert len(optimizer.state) == 0 and torch.equal(dense.cpu(), torch.ones(4))


@optims("hpa")
def test_sparse_gradient_is_refused_by_name_before_any_state_change(info):
    """A sparse gradient on a later step raises TypeError naming the parameter; no parameter and
    no state changes."""
    torch.manual_seed(0)
    model = info.model()
    optimizer = info.build(model, lr=1e-2)
    train(model, optimizer, info.batches(1, 90))
    weights, state = model_weights(model), optimizer_state(optimizer)
    tokens, labels = info.batches(1, 91)[0]
    nn.functional.cross_entropy(model(tokens), labels).backward()
    grad = model.head.weight.grad
    model.head.weight.grad = grad.to_sparse()
    with pytest.raises(TypeError, match="'head.weight'.*sparse|sparse.*'head.weight'"):
        optimizer.step()
    assert_bitwise(weights, model_weights(model))
    assert_bitwise(state, optimizer_state(optimizer))


@optims("adamw")
def test_float64_parameter_is_stepped_or_refused_before_any_state_change(info):
    """A float64 parameter is stepped as torch.optim.AdamW where the backend steps float64 (the
    "torch" reference), else refused with a TypeError naming it, before any parameter or state
    changes."""
    device = info.device
    torch.manual_seed(0)
    first = nn.Parameter(torch.randn(3, device=device))
    double = nn.Parameter(torch.randn(3, dtype=torch.float64, device=device))
    optimizer = info.build([{"params": [first]}, {"params": [double]}], lr=1e-2)
    first.grad, double.grad = torch.randn(3, device=device), torch.randn(3, dtype=torch.float64, device=device)
    before = (first.detach().clone(), double.detach().clone())
    if torch.float64 in info.dtypes:
        optimizer.step()
        reference = nn.Parameter(before[1].clone())
        reference.grad = double.grad.clone()
        torch.optim.AdamW([reference], lr=1e-2).step()
        torch.testing.assert_close(double, reference)
        return
    with pytest.raises(TypeError, match="parameter 0 of param group 1.*float64"):
        optimizer.step()
    assert torch.equal(first, before[0]) and torch.equal(double, before[1]) and len(optimizer.state) == 0


# ----------------------------------------------------------------- determinism and torch.compile


@optims("hpa")
def test_same_seed_gives_bit_identical_weights_and_edits(info):
    """Two runs from the same seed and inputs: bit-identical weights, state and reports."""
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = info.model()
        optimizer = info.build(model, lr=1e-2)
        reports = [run_task(model, optimizer, 100 + 10 * t, info.device) for t in range(2)]
        results.append((model_weights(model), optimizer_state(optimizer), reports))
    assert_bitwise(results[0][0], results[1][0])
    assert_bitwise(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


@optims("adamw")
def test_compiled_training_step_matches_eager_without_recompiles(info):
    """A training step compiled with torch.compile — the optimizer step inside the compiled
    function, or outside it with the model compiled — gives eager's weights within fp32 tolerance,
    and a 20-step learning-rate schedule (on a tensor lr, and on a float lr) causes no recompilation.
    HPAOptimizer.step is deliberately not traced (``torch._disable_dynamo``): a graph break."""
    device = info.device
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
        optimizer = info.build(model.parameters(), lr=lr)
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


# ---------------------------------------------------------------------------- the task lifecycle


@optims("seqft", backends=[DEFAULT_BACKEND])
def test_disabled_hpa_is_plain_sequential_finetuning(info):
    """With HPA disabled, ``end_task`` reports nothing and changes no weight."""
    model = info.model()
    optimizer = info.build(model)
    optimizer.begin_task(None)
    train(model, optimizer, info.batches(3, 4))
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer.end_task(None) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@optims("hpa", backends=[DEFAULT_BACKEND])
def test_lifecycle_misuse_raises(info):
    """``end_task`` without an open task and a second ``begin_task`` raise RuntimeError."""
    model = info.model()
    optimizer = info.build(model)
    with pytest.raises(RuntimeError, match="begin_task"):
        optimizer.end_task({})
    hinv = calibrate(model, optimizer, info.batches(1, 5))
    optimizer.begin_task(hinv)
    with pytest.raises(RuntimeError, match="already open"):
        optimizer.begin_task(hinv)


@optims("adamw", backends=[DEFAULT_BACKEND])
def test_a_task_without_managed_layers_warns(info):
    """``begin_task`` on an optimizer that manages no layer (built on bare parameters) warns that
    the task will not be edited; ``end_task`` then edits nothing."""
    model = info.model()
    optimizer = info.build(model.parameters())
    with pytest.warns(UserWarning, match="no layer is managed"):
        optimizer.begin_task({})
    assert optimizer.end_task({}) == {}


@optims("hpa", backends=[DEFAULT_BACKEND])
def test_two_tasks_in_a_row(info):
    """Two tasks one after the other: each retains at most its budget of columns, both count, and
    the snapshots are freed."""
    torch.manual_seed(0)
    model = info.model()
    optimizer = info.build(model, lr=1e-2)
    for task in range(2):
        report = run_task(model, optimizer, seed=30 + 10 * task, device=info.device, steps=15, task_batches=3)
        assert all(r.num_retained <= round(r.retain_ratio * r.num_columns + 0.5) for r in report.values())
    assert optimizer.tasks_completed == 2
    assert all("hpa_prev" not in state for state in optimizer.state.values())  # snapshots freed


@optims("hpa", backends=["torch"])
def test_former_statistics_keywords_still_work_with_a_deprecation_warning(info):
    """``begin_task(safety_hessians=)`` / ``end_task(task_hessians=)`` (the former names of
    ``hinv_safety`` / ``hinv_task``) give the same edit, with a DeprecationWarning; both names at
    once is a TypeError and leaves the optimizer as it was."""
    weights = {}
    for former in (False, True):
        torch.manual_seed(0)
        model = info.model()
        optimizer = info.build(model, lr=1e-2)
        safety = calibrate(model, optimizer, info.batches(2, 70))
        if former:
            with pytest.raises(TypeError, match="pass hinv_safety only"):
                optimizer.begin_task(safety, safety_hessians=safety)
            assert not optimizer.in_task
            with pytest.warns(DeprecationWarning, match=r"begin_task\(safety_hessians=...\) is deprecated"):
                optimizer.begin_task(safety_hessians=safety)
        else:
            optimizer.begin_task(hinv_safety=safety)
        train(model, optimizer, info.batches(2, 71))
        task = calibrate(model, optimizer, info.batches(2, 72))
        if former:
            with pytest.warns(DeprecationWarning, match=r"end_task\(task_hessians=...\) is deprecated"):
                optimizer.end_task(task_hessians=task)
        else:
            optimizer.end_task(hinv_task=task)
        weights[former] = model.state_dict()
    for key, value in weights[False].items():
        assert torch.equal(weights[True][key], value), key
