"""Parameter-space EMA (hpa_kernels/cvit/methods/ema.py): the update on hand-worked numbers, and
the hooks on a tiny Llama, under LoRA (the EMA of the merged dense weights) and under --full."""

from __future__ import annotations

import argparse

import peft
import pytest
import torch
from helpers import tiny_decoder

from hpa_kernels import adapters
from hpa_kernels.cvit.methods.base import TaskContext, dense_weights
from hpa_kernels.cvit.methods.ema import BETA, EMA, ema_update
from hpa_kernels.cvit.model import ChatModel
from hpa_kernels.layers import find_hpa_layers


def test_three_steps_by_hand():
    # β = 0.75, EMA_0 = (0, 8); W_1 = (4, 0), W_2 = (8, 0), W_3 = (0, 16):
    # EMA_1 = 0.75·(0, 8) + 0.25·(4, 0) = (1, 6), EMA_2 = (0.75 + 2, 4.5) = (2.75, 4.5),
    # EMA_3 = (2.0625, 3.375 + 4) = (2.0625, 7.375)
    # = β³·EMA_0 + (1 − β)(β²·W_1 + β·W_2 + W_3) = (0, 3.375) + 0.25·(2.25 + 6, 16).
    average = torch.tensor([0.0, 8.0])
    expected = [[1.0, 6.0], [2.75, 4.5], [2.0625, 7.375]]
    for weight, after in zip([[4.0, 0.0], [8.0, 0.0], [0.0, 16.0]], expected, strict=True):
        result = ema_update(average, torch.tensor(weight), 0.75)
        assert result is average
        torch.testing.assert_close(average, torch.tensor(after))


@pytest.mark.parametrize("shape", [(17, 33), (1,), (3, 1, 5)])
def test_closed_form_on_odd_shapes(shape):
    generator = torch.Generator().manual_seed(len(shape))
    start = torch.randn(shape, generator=generator)
    weights = [torch.randn(shape, generator=generator) for _ in range(7)]
    beta = 0.9
    average = start.clone()
    for weight in weights:
        ema_update(average, weight, beta)
    closed = beta**7 * start + (1 - beta) * sum(beta ** (7 - t) * w for t, w in enumerate(weights, start=1))
    torch.testing.assert_close(average, closed)


def test_extreme_momenta():
    start, weight = torch.tensor([1.0, -2.0]), torch.tensor([5.0, 7.0])
    torch.testing.assert_close(ema_update(start.clone(), weight, 0.0), weight)  # β = 0: the last iterate
    torch.testing.assert_close(ema_update(start.clone(), weight, 1.0), start)  # β = 1: never moves


def test_a_lower_precision_weight_is_averaged_into_float32():
    average = torch.zeros(3)
    ema_update(average, torch.ones(3, dtype=torch.bfloat16), 0.75)
    assert average.dtype == torch.float32
    torch.testing.assert_close(average, torch.full((3,), 0.25))


@pytest.mark.parametrize(("shape", "beta", "match"), [((2,), 1.5, "beta"), ((2,), -0.1, "beta"), ((3,), 0.5, "shape")])
def test_invalid_arguments_raise(shape, beta, match):
    with pytest.raises(ValueError, match=match):
        ema_update(torch.zeros(2), torch.zeros(shape), beta)
    if match == "beta":
        with pytest.raises(ValueError, match=match):
            EMA(beta=beta)


def test_defaults():
    method = EMA()
    assert method.beta == BETA == 0.95
    assert method.name == "ema" and not method.hpa.enabled and not method.needs_base_weights
    assert method.describe() == {"beta": 0.95}


def _task(model, full: bool) -> TaskContext:
    layers = find_hpa_layers(model)
    task = TaskContext(
        chat=ChatModel(model=model, tokenizer=None, source="test"),
        layers=layers,
        index=0,
        prompts=None,
        safety_pairs=[],
        benign_prompts=[],
        task_pairs=[],
        batches=lambda pairs: [],
        args=argparse.Namespace(full=full),
    )
    task.w_prev = dense_weights(layers)
    return task


def _train(task: TaskContext, method: EMA, steps: int, snapshot) -> list[dict[str, torch.Tensor]]:
    """AdamW steps on random tokens, ``method.after_step`` after each; returns ``snapshot()`` after each."""
    model = task.chat.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    generator = torch.Generator().manual_seed(3)
    seen = []
    model.train()
    for _ in range(steps):
        input_ids = torch.randint(0, 64, (2, 6), generator=generator)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(task)
        seen.append(snapshot())
    return seen


def _expected(start: dict, seen: list[dict], beta: float) -> dict[str, torch.Tensor]:
    # EMA_3 = β³·W_prev + (1 − β)(β²·W_1 + β·W_2 + W_3)
    return {
        name: beta**3 * w0 + (1 - beta) * (beta**2 * seen[0][name] + beta * seen[1][name] + seen[2][name])
        for name, w0 in start.items()
    }


def test_lora_hooks_leave_the_ema_of_the_merged_dense_weights():
    model = peft.get_peft_model(tiny_decoder(), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    task = _task(model, full=False)
    layers = task.layers
    assert len(layers) == 4 * 7 and all(layer.adapter is not None for layer in layers.values())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and "proj" not in n}
    method = EMA(beta=0.8)
    method.begin_task(task)
    seen = _train(task, method, 3, lambda: dense_weights(layers))
    expected = _expected(task.w_prev, seen, 0.8)
    for name in layers:  # the training moved every dense weight (B ≠ 0 after the first step)
        assert not torch.allclose(seen[-1][name], task.w_prev[name])
    task.w_new = dense_weights(layers)
    for layer in layers.values():  # the runner's merge (HPA disabled): base ← base + s·BA, B ← 0
        layer.module.weight.data.copy_(adapters.merged_weight(layer.adapter, layer.module.weight))
        adapters.reset_adapters(layer.adapter)
    method.after_merge(task)
    assert "ema" not in task.state
    now = dense_weights(layers)  # what the model computes: the adapters are reset, so the base weight
    for name, layer in layers.items():
        torch.testing.assert_close(now[name], expected[name])
        torch.testing.assert_close(layer.module.weight.detach(), expected[name])
        assert not torch.allclose(now[name], task.w_new[name])
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param.detach(), frozen[name]), name


def test_full_hooks_average_every_trained_parameter():
    model = tiny_decoder()
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= trained.keys()
    frozen = model.model.layers[0].input_layernorm.weight.detach().clone()
    task = _task(model, full=True)
    start = {n: p.detach().clone() for n, p in trained.items()}
    method = EMA(beta=0.75)
    method.begin_task(task)
    seen = _train(task, method, 3, lambda: {n: p.detach().clone() for n, p in trained.items()})
    method.after_merge(task)
    expected = _expected(start, seen, 0.75)
    for name, param in trained.items():
        torch.testing.assert_close(param.detach(), expected[name])
        assert not torch.allclose(param.detach(), seen[-1][name]), name
    assert torch.equal(model.model.layers[0].input_layernorm.weight.detach(), frozen)
