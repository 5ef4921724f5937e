"""LoX (hpa_kernels/cvit/methods/lox.py): the extrapolation rule on hand-worked and odd-shaped
weights, and the before_tasks hook on a tiny Llama."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from helpers import tiny_decoder

from hpa_kernels.cvit.methods.base import RunContext
from hpa_kernels.cvit.methods.lox import ALPHA, RANK, LoX, low_rank_extrapolation
from hpa_kernels.cvit.model import ChatModel
from hpa_kernels.layers import find_hpa_layers

# ΔW_align = 3·u1·v1ᵀ + 1·u2·v2ᵀ with u1 = (0.6, 0.8, 0), v1 = (0.6, 0.8), u2 = (0.8, −0.6, 0),
# v2 = (−0.8, 0.6): [[0.44, 1.92], [1.92, 1.56], [0, 0]], singular values 3 and 1 (its 2×2 block
# has trace 2, determinant −3: eigenvalues 3 and −1).
W_BASE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]])
DELTA = torch.tensor([[0.44, 1.92], [1.92, 1.56], [0.0, 0.0]])


def test_rank_one_of_a_rank_two_update_by_hand():
    # Proj_1(ΔW) = 3·u1·v1ᵀ = [[1.08, 1.44], [1.44, 1.92], [0, 0]],
    # × α = 1.25: [[1.35, 1.8], [1.8, 2.4], [0, 0]], added to
    # W_aligned = W_base + ΔW = [[1.44, 1.92], [1.92, 2.56], [2, −1]].
    w_lox, r_align = low_rank_extrapolation(W_BASE + DELTA, W_BASE, rank=1, alpha=1.25)
    expected = torch.tensor([[2.79, 3.72], [3.72, 4.96], [2.0, -1.0]])
    torch.testing.assert_close(w_lox, expected, atol=1e-5, rtol=0)
    # R_align = ‖Proj_1 ΔW‖_F / ‖ΔW‖_F = 3 / √(3² + 1²)
    assert r_align == pytest.approx(3 / math.sqrt(10), abs=1e-6)


def test_full_rank_extrapolates_the_whole_update():
    # k = 2 = min(r, c): W_aligned + α·ΔW (the official script's k = 0), R_align = 1.
    w_lox, r_align = low_rank_extrapolation(W_BASE + DELTA, W_BASE, rank=2, alpha=0.5)
    torch.testing.assert_close(w_lox, W_BASE + 1.5 * DELTA)
    assert r_align == 1.0


def test_no_alignment_update_leaves_the_weight():
    weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    w_lox, r_align = low_rank_extrapolation(weight, weight.clone(), rank=2, alpha=1.25)
    torch.testing.assert_close(w_lox, weight)
    assert r_align == 1.0


@pytest.mark.parametrize("shape", [(17, 33), (33, 17), (1, 7)])
def test_odd_shapes_extrapolate_the_best_rank_k_approximation(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(*shape, generator=generator)
    aligned = base + torch.randn(*shape, generator=generator)
    delta = (aligned - base).double()
    rank, alpha = 3, 0.7
    w_lox, r_align = low_rank_extrapolation(aligned, base, rank, alpha)
    assert w_lox.shape == shape and w_lox.dtype == torch.float32
    added = (w_lox - aligned).double() / alpha
    singular = torch.linalg.svdvals(delta)
    k = min(rank, len(singular))
    # Eckart–Young: the residual of the best rank-k approximation carries exactly the tail energy.
    assert torch.linalg.matrix_rank(added, atol=1e-3).item() == k
    assert (delta - added).square().sum().item() == pytest.approx(
        singular[k:].square().sum().item(), rel=1e-4, abs=1e-6
    )
    assert r_align == pytest.approx(math.sqrt(singular[:k].square().sum() / singular.square().sum()), abs=1e-5)


def test_bf16_weights_are_extrapolated_in_float32():
    w_lox, _ = low_rank_extrapolation((W_BASE + DELTA).bfloat16(), W_BASE.bfloat16(), rank=1, alpha=1.25)
    assert w_lox.dtype == torch.float32


@pytest.mark.parametrize(
    ("aligned", "base", "rank", "alpha", "match"),
    [
        (torch.zeros(3, 2), torch.zeros(2, 3), 1, 1.0, "one shape"),
        (torch.zeros(3), torch.zeros(3), 1, 1.0, "2-D"),
        (torch.zeros(3, 2), torch.zeros(3, 2), 0, 1.0, "rank"),
        (torch.zeros(3, 2), torch.zeros(3, 2), 1, float("nan"), "alpha"),
    ],
)
def test_invalid_arguments_raise(aligned, base, rank, alpha, match):
    with pytest.raises(ValueError, match=match):
        low_rank_extrapolation(aligned, base, rank, alpha)


def _run(model, base_weights) -> RunContext:
    return RunContext(
        chat=ChatModel(model=model, tokenizer=None, source="test"),
        layers=find_hpa_layers(model),
        base_weights=base_weights,
        safety_pairs=[],
        benign_prompts=[],
        batches=lambda pairs: [],
        args=argparse.Namespace(full=False),
    )


def test_before_tasks_extrapolates_every_managed_layer_and_nothing_else():
    model = tiny_decoder()
    layers = find_hpa_layers(model)
    assert len(layers) == 4 * 7
    generator = torch.Generator().manual_seed(1)
    aligned = {name: layer.module.weight.detach().clone() for name, layer in layers.items()}
    base = {name: w - 0.1 * torch.randn(w.shape, generator=generator) for name, w in aligned.items()}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("proj.weight")}
    method = LoX(rank=2, alpha=0.5)
    assert method.needs_base_weights and not method.hpa.enabled
    method.before_tasks(_run(model, base))
    for name, layer in layers.items():
        expected, _ = low_rank_extrapolation(aligned[name], base[name], 2, 0.5)
        torch.testing.assert_close(layer.module.weight.detach(), expected)
        assert not torch.equal(layer.module.weight.detach(), aligned[name])
    for name, param in model.named_parameters():
        if name in others:
            assert torch.equal(param.detach(), others[name]), name
    settings = method.describe()
    assert settings["rank"] == 2 and settings["alpha"] == 0.5
    assert settings["r_align"]["layers"] == len(layers)
    assert 0 < settings["r_align"]["min"] <= settings["r_align"]["mean"] < 1


def test_defaults_are_the_papers():
    method = LoX()
    assert (method.rank, method.alpha) == (RANK, ALPHA) == (6, 1.25)
    assert method.name == "lox" and method.describe() == {"rank": 6, "alpha": 1.25}


def test_before_tasks_needs_every_base_weight():
    model = tiny_decoder()
    with pytest.raises(ValueError, match="base model's weights"):
        LoX().before_tasks(_run(model, None))
    layers = find_hpa_layers(model)
    partial = {name: layer.module.weight.detach().clone() for name, layer in list(layers.items())[1:]}
    with pytest.raises(ValueError, match="no base weight for 1 managed layer"):
        LoX().before_tasks(_run(model, partial))


@pytest.mark.parametrize(("rank", "alpha"), [(0, 1.0), (2, float("inf"))])
def test_invalid_settings_raise(rank, alpha):
    with pytest.raises(ValueError):
        LoX(rank=rank, alpha=alpha)
