"""HessianCollector: (2/n)·XᵀX per distinct input, padding excluded, clear errors."""

import pytest
import torch
from helpers import TinyModel
from torch import nn

from hpa_kernels import HessianCollector
from hpa_kernels.functional import hinv_diagonal


def test_hessian_is_two_over_n_xtx_of_unpadded_tokens():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    model = nn.Sequential(layer)
    x1, x2 = torch.randn(2, 4, 5), torch.randn(1, 4, 5)
    mask1 = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with HessianCollector(model, ["0"]) as collector:
        collector.set_attention_mask(mask1)
        model(x1)
        collector.set_attention_mask(None)
        model(x2)
    rows = torch.cat([x1[mask1.bool()], x2.reshape(-1, 5)]).double()
    assert collector.num_tokens("0") == 5 + 4
    torch.testing.assert_close(collector.hessian("0").double(), 2.0 / 9 * rows.T @ rows, rtol=1e-5, atol=1e-6)
    hinv = collector.hinv()
    assert list(hinv) == ["0"] and hinv["0"].shape == (5,) and hinv["0"].dtype == torch.float32
    torch.testing.assert_close(hinv["0"], hinv_diagonal(collector.hessian("0")))


def test_layers_reading_one_input_share_one_hessian():
    torch.manual_seed(0)
    model = TinyModel()
    names = ["blocks.0.q", "blocks.0.k", "blocks.0.o", "blocks.1.q"]
    with torch.no_grad(), HessianCollector(model, names) as collector:
        model(torch.randint(0, 50, (3, 6)))
        model(torch.randint(0, 50, (3, 6)))
    hinv = collector.hinv()
    assert hinv["blocks.0.q"] is hinv["blocks.0.k"]  # q and k read the same tensor: one Hessian
    assert hinv["blocks.0.o"] is not hinv["blocks.0.q"]
    assert collector.num_tokens("blocks.0.k") == collector.num_tokens("blocks.0.o") == 36


def test_same_input_tensor_in_two_forwards_counts_twice():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    with HessianCollector(model, ["0"]) as collector:
        model(x)
        model(x)
    assert collector.num_tokens("0") == 8


def test_hooks_are_removed_on_exit():
    model = nn.Sequential(nn.Linear(3, 2))
    with HessianCollector(model, ["0"]) as collector:
        model(torch.randn(2, 3))
    model(torch.randn(2, 3))
    assert collector.num_tokens("0") == 2
    assert not model[0]._forward_pre_hooks


def test_no_tokens_is_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with HessianCollector(model, ["0", "1"]) as collector:
        collector.set_attention_mask(torch.zeros(1, 4))
        model(torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="'0' saw no tokens"):
        collector.hinv()


def test_wrong_mask_shape_is_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 2))
    with HessianCollector(model, ["0"]) as collector:
        collector.set_attention_mask(torch.ones(2, 5))
        with pytest.raises(ValueError, match="attention mask of shape"):
            model(torch.randn(2, 4, 3))


def test_rank_deficient_input_gives_finite_hinv():
    """One token, 64 input features: H has rank 1; damping keeps diag(H⁻¹) finite and positive."""
    model = nn.Sequential(nn.Linear(64, 4))
    with HessianCollector(model, ["0"]) as collector:
        model(torch.randn(1, 64))
    hinv = collector.hinv()["0"]
    assert torch.isfinite(hinv).all() and (hinv > 0).all()


def test_unknown_or_non_linear_layer_is_refused():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    with pytest.raises(ValueError, match="not an nn.Linear"):
        HessianCollector(model, ["1"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        HessianCollector(model, ["missing"])
