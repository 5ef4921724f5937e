"""SPPFT (hpa_kernels/cvit/methods/sppft.py): the cosine-similarity gap, the safety-layer rule on
hand-made gap curves, the last-position states under left padding, and the hooks on a tiny Llama:
the located layers, and frozen blocks that do not move under an optimizer step (LoRA and --full)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from helpers import tiny_decoder
from peft import LoraConfig, get_peft_model

from hpa_kernels import HPAConfig, HPAOptimizer, adapters
from hpa_kernels.cvit.methods.base import RunContext, TaskContext
from hpa_kernels.cvit.methods.sppft import (
    SPPFT,
    freeze_blocks,
    last_position_states,
    safety_layer_range,
    similarity_gap,
)
from hpa_kernels.cvit.model import ChatModel
from hpa_kernels.layers import find_hpa_layers

# ---- safety_layer_range -------------------------------------------------------------------------


def test_safety_layer_range_hand_made_curve():
    # base b = 0 at layer 0, peak 0.56 at layer 7, rise Δ = 0.56: 10% → 0.056, first reached at
    # layer 3 (0.10); 90% → 0.504, first reached at layer 6 (0.55). The fall after the peak is ignored.
    gap = torch.tensor([0.00, 0.01, 0.02, 0.10, 0.30, 0.50, 0.55, 0.56, 0.40, 0.30])
    assert safety_layer_range(gap) == (3, 6)
    assert safety_layer_range(gap, low=0.0, high=1.0) == (0, 7)
    # 50% → 0.28: layer 4 (0.30); 60% → 0.336: layer 5 (0.50).
    assert safety_layer_range(gap, low=0.5, high=0.6) == (4, 5)


def test_safety_layer_range_measures_the_rise_from_the_minimum_before_the_peak():
    # First minimum 0.1 at layer 1, peak 0.6 at layer 4, Δ = 0.5: thresholds 0.15 and 0.55 give
    # layers 3 (0.3) and 4 (0.6). Fractions of the maximum alone (0.06, 0.54) would give (0, 4).
    gap = torch.tensor([0.2, 0.1, 0.1, 0.3, 0.6, 0.5], dtype=torch.float64)
    assert safety_layer_range(gap) == (3, 4)


def test_safety_layer_range_odd_lengths():
    assert safety_layer_range(torch.tensor([0.0, 1.0])) == (1, 1)
    # A jump straight to the peak: both thresholds are first met at the peak.
    assert safety_layer_range(torch.tensor([0.0, 0.0, 0.0, 0.9, 0.1])) == (3, 3)


@pytest.mark.parametrize(
    "gap",
    [
        torch.tensor([0.0, float("nan"), 1.0]),
        torch.zeros(2, 3),
        torch.zeros(0),
    ],
)
def test_safety_layer_range_rejects_malformed_curves(gap):
    with pytest.raises(ValueError):
        safety_layer_range(gap)


@pytest.mark.parametrize(
    "gap",
    [
        torch.tensor([0.5, 0.4, 0.3]),  # only falls: maximum at the first layer
        torch.tensor([0.2, 0.2, 0.2]),  # flat
        torch.tensor([0.3]),  # one layer
    ],
)
def test_safety_layer_range_finds_none_without_a_rise(gap):
    assert safety_layer_range(gap) is None


@pytest.mark.parametrize("low, high", [(0.9, 0.1), (0.5, 0.5), (-0.1, 0.9), (0.1, 1.5)])
def test_safety_layer_range_rejects_bad_fractions(low, high):
    with pytest.raises(ValueError):
        safety_layer_range(torch.tensor([0.0, 1.0]), low, high)


# ---- similarity_gap -----------------------------------------------------------------------------


def test_similarity_gap_hand_computed():
    # Layer 0: normal a = (1,0,0), b = (0,1,0): cos(a,b) = 0; malicious c = (1,1,0): cos(a,c) =
    # cos(b,c) = 1/√2, so c_NN = 0, c_NM = 1/√2, gap = −1/√2.
    # Layer 1: a = (1,0,0), b = (2,0,0) (cosine ignores the scale): c_NN = 1; c = (0,0,3): c_NM = 0;
    # gap = 1.
    normal = torch.tensor([[[1.0, 0, 0], [0, 1, 0]], [[1, 0, 0], [2, 0, 0]]])
    malicious = torch.tensor([[[1.0, 1, 0]], [[0, 0, 3]]])
    gap, c_nn, c_nm = similarity_gap(normal, malicious)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(c_nn, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(c_nm, torch.tensor([r, 0.0]))
    torch.testing.assert_close(gap, torch.tensor([-r, 1.0]))


def test_similarity_gap_averages_distinct_pairs_only():
    # a = b = (1,0), c = (0,1): pairs ab = 1, ac = 0, bc = 0, so c_NN = 1/3 (the self-similarities
    # on the diagonal are left out). Malicious m = (3,4)/5: cos with a, b = 0.6, with c = 0.8, so
    # c_NM = (0.6 + 0.6 + 0.8)/3 = 2/3; with a second copy of m, the same.
    normal = torch.tensor([[[1.0, 0], [1, 0], [0, 1]]])
    malicious = torch.tensor([[[3.0, 4], [6, 8]]])
    gap, c_nn, c_nm = similarity_gap(normal, malicious)
    torch.testing.assert_close(c_nn, torch.tensor([1 / 3]))
    torch.testing.assert_close(c_nm, torch.tensor([2 / 3]))
    torch.testing.assert_close(gap, torch.tensor([-1 / 3]))


def test_similarity_gap_odd_shapes_match_a_loop():
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    malicious = torch.randn(3, 2, 7, generator=generator, dtype=torch.float64)
    gap, c_nn, c_nm = similarity_gap(normal, malicious)
    cos = torch.nn.functional.cosine_similarity
    for layer in range(3):
        pairs = [cos(normal[layer, i], normal[layer, j], dim=0) for i in range(5) for j in range(i + 1, 5)]
        cross = [cos(normal[layer, i], malicious[layer, k], dim=0) for i in range(5) for k in range(2)]
        assert gap.dtype == torch.float32
        assert abs(float(c_nn[layer]) - float(sum(pairs) / len(pairs))) < 1e-6
        assert abs(float(c_nm[layer]) - float(sum(cross) / len(cross))) < 1e-6


@pytest.mark.parametrize(
    "normal, malicious",
    [
        (torch.zeros(2, 1, 3), torch.zeros(2, 1, 3)),  # one normal prompt: no pair
        (torch.zeros(2, 2, 3), torch.zeros(2, 0, 3)),
        (torch.zeros(2, 2, 3), torch.zeros(3, 1, 3)),
        (torch.zeros(2, 2, 3), torch.zeros(2, 1, 4)),
        (torch.zeros(2, 3), torch.zeros(2, 1, 3)),
    ],
)
def test_similarity_gap_rejects_bad_shapes(normal, malicious):
    with pytest.raises(ValueError):
        similarity_gap(normal, malicious)


# ---- the hooks on a tiny Llama ------------------------------------------------------------------


class CharTokenizer:
    """One id per character, no chat template (render_prompt's plain "User: …" fallback)."""

    chat_template = None
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + ord(ch) % 63 for ch in text]}


# Near-identical "normal" prompts and unlike "malicious" ones: even a random model's last-position
# states then separate the two sets more with depth, so the gap rises.
BENIGN = ["aaaaaaaaaa", "aaaaaaaaab", "aaaaaaaaac"]
HARMFUL = [("zqzqzqzqzq", "I can't help with that."), ("xyxyxyxyxy", "No.")]


def run_context(chat: ChatModel) -> RunContext:
    return RunContext(chat, find_hpa_layers(chat.model), None, HARMFUL, BENIGN, lambda pairs: [], argparse.Namespace())


def task_context(chat: ChatModel) -> TaskContext:
    layers = find_hpa_layers(chat.model)
    return TaskContext(chat, layers, 0, None, HARMFUL, BENIGN, [], lambda pairs: [], argparse.Namespace())


def test_last_position_states_are_unchanged_by_left_padding():
    chat = ChatModel(tiny_decoder(), CharTokenizer(), "tiny")
    chat.model.train()
    batch = last_position_states(chat, ["hi", "a much longer prompt than the first"])
    alone = last_position_states(chat, ["hi"])
    assert chat.model.training  # restored
    assert batch.shape == (4, 2, 16) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[:, :1], alone, atol=1e-5, rtol=1e-5)
    ids = torch.tensor([CharTokenizer()("User: hi\nAssistant: ")["input_ids"]])
    with torch.no_grad():
        direct = chat.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(alone[:, 0], torch.stack([h[0, -1] for h in direct[1:]]))


def test_before_tasks_locates_the_rise_of_the_gap():
    chat = ChatModel(tiny_decoder(), CharTokenizer(), "tiny")
    method = SPPFT()
    method.before_tasks(run_context(chat))
    normal = last_position_states(chat, BENIGN)
    malicious = last_position_states(chat, [p for p, _ in HARMFUL])
    gap = similarity_gap(normal, malicious)[0]
    first, last = safety_layer_range(gap)
    assert gap[-1] > gap[0] and 0 <= first <= last < 4
    settings = method.describe()
    assert method.blocks == range(first, last + 1)
    assert settings["safety_layers"] == list(range(first, last + 1))
    assert settings["gap"] == pytest.approx(gap.tolist())
    assert len(settings["cos_normal_normal"]) == len(settings["cos_normal_malicious"]) == 4
    assert settings["pairs"] == {"normal_normal": 3, "normal_malicious": 6}


def test_the_runs_hpa_config_keeps_its_sizes_without_the_edit():
    method = SPPFT(HPAConfig(safety_samples=5))
    assert method.name == "sppft" and not method.hpa.enabled and method.hpa.safety_samples == 5


def test_begin_task_needs_located_layers():
    chat = ChatModel(tiny_decoder(), CharTokenizer(), "tiny")
    with pytest.raises(RuntimeError):
        SPPFT().begin_task(task_context(chat))


def one_step(model: torch.nn.Module) -> None:
    """One optimizer step built as the runner builds it, after the hooks froze what they freeze."""
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, hpa=HPAConfig(enabled=False))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_frozen_lora_blocks_do_not_move():
    chat = ChatModel(
        get_peft_model(tiny_decoder(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")),
        CharTokenizer(),
        "tiny",
    )
    method = SPPFT()
    method.blocks = range(1, 3)
    task = task_context(chat)
    method.begin_task(task)
    assert len(method.frozen) == 2 * 7  # q, k, v, o, gate, up, down of blocks 1 and 2

    def lora(layer):
        return [*layer.adapter.lora_A.parameters(), *layer.adapter.lora_B.parameters()]

    before = {name: [p.detach().clone() for p in lora(layer)] for name, layer in task.layers.items()}
    one_step(chat.model)
    for name, layer in task.layers.items():
        moved = [not torch.equal(p, old) for p, old in zip(lora(layer), before[name], strict=True)]
        if layer.block in (1, 2):
            assert name in method.frozen and not any(moved)
            assert not any(p.requires_grad for p in lora(layer))
            torch.testing.assert_close(adapters.merged_weight(layer.adapter, layer.module.weight), layer.module.weight)
        else:
            assert any(moved), name  # lora_B leaves 0 on the first step


@pytest.mark.filterwarnings("ignore:HPA skips")  # find_hpa_layers names the frozen layers it leaves out
def test_frozen_dense_blocks_do_not_move_under_full():
    model = tiny_decoder()
    chat = ChatModel(model, CharTokenizer(), "tiny")
    method = SPPFT()
    method.blocks = range(0, 1)
    task = task_context(chat)
    method.begin_task(task)
    before = {n: layer.module.weight.detach().clone() for n, layer in task.layers.items()}
    one_step(model)
    for name, layer in task.layers.items():
        assert torch.equal(layer.module.weight, before[name]) == (layer.block == 0), name
    # A later task sees only the trainable layers; the frozen ones stay frozen and stay counted.
    method.begin_task(task_context(chat))
    assert len(method.frozen) == 7
    assert not any(p.requires_grad for p in model.model.layers[0].self_attn.parameters())
    assert model.model.layers[0].input_layernorm.weight.requires_grad  # the paper freezes attention and MLP only


def test_freeze_blocks_outside_the_range_touches_nothing():
    model = tiny_decoder()
    assert freeze_blocks(find_hpa_layers(model), range(7, 9)) == []
    assert all(p.requires_grad for p in model.parameters())
