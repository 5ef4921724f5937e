"""HessianCollector: (2/n)·XᵀX per distinct input, padding excluded (the forward call's own masks), clear errors."""

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


class _PoolThenHead(nn.Module):
    """``first`` reads (B, T, c) tokens, ``second`` the pooled (B, c'): a (B, T) mask fits only
    the first, so a masked pass fails half-way through."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
        h = self.first(x)
        if fail:
            raise RuntimeError("simulated failure inside the forward")
        return self.second(h.mean(dim=1))


@pytest.mark.parametrize("failure", ["mask", "exception"])
def test_a_failing_forward_counts_for_no_layer(failure):
    """Nothing half-counted: a forward that raises after some layers saw their input (a mask that
    fits one layer and not the next, or any exception) leaves every layer's statistics as they
    were; the following passes count whole."""
    torch.manual_seed(0)
    model = _PoolThenHead()
    x = torch.randn(2, 5, 3)
    with HessianCollector(model, ["first", "second"]) as collector:
        model(x)
        before = {name: (collector.num_tokens(name), collector.hessian(name).clone()) for name in ("first", "second")}
        if failure == "mask":
            collector.set_attention_mask(torch.ones(2, 5))
            with pytest.raises(ValueError, match="'second'"):
                model(x)
            collector.set_attention_mask(None)
        else:
            with pytest.raises(RuntimeError, match="simulated"):
                model(x, fail=True)
        for name, (tokens, hessian) in before.items():
            assert collector.num_tokens(name) == tokens and torch.equal(collector.hessian(name), hessian), name
        model(x)
    assert collector.num_tokens("first") == 20 and collector.num_tokens("second") == 4
    # The same input twice: the same H, up to the fp32 rounding of accumulating into the sum (the
    # GEMM adds the second pass's products to the first's).
    torch.testing.assert_close(collector.hessian("first"), before["first"][1], rtol=1e-6, atol=1e-7)


def test_layer_called_outside_a_model_forward_still_counts():
    model = _PoolThenHead()
    with HessianCollector(model, ["first"]) as collector:
        model.first(torch.randn(2, 5, 3))
    assert collector.num_tokens("first") == 10


@pytest.mark.parametrize(
    "mask_shape,input_shape",
    [((2, 6), (2, 5, 3)), ((5,), (2, 5, 3)), ((5, 2), (2, 5, 3)), ((2, 5), (9, 3))],
    ids=["long", "1-d", "transposed", "flat-mismatch"],
)
def test_mask_of_the_wrong_shape_names_the_layer_and_shapes(mask_shape, input_shape):
    model = nn.Sequential(nn.Linear(3, 2))
    with HessianCollector(model, ["0"]) as collector:
        collector.set_attention_mask(torch.ones(mask_shape))
        with pytest.raises(ValueError, match=r"mask of shape .* input of '0'"):
            model(torch.randn(input_shape))
    assert collector.num_tokens("0") == 0


def test_flattened_inputs_match_the_flattened_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(6, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with HessianCollector(model, ["0"]) as collector:
        collector.set_attention_mask(mask)
        model(x)
    rows = x[mask.reshape(-1).bool()]
    assert collector.num_tokens("0") == 3
    torch.testing.assert_close(collector.hessian("0"), 2.0 / 3 * rows.T @ rows)


def test_layer_skipped_by_the_forward_is_named():
    """A layer the forward never reached (a branch not taken) saw no tokens: a clear error."""
    model = _PoolThenHead()
    with HessianCollector(model, ["first", "second"]) as collector:
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 5, 3), fail=True)
    with pytest.raises(ValueError, match="'first' saw no tokens"):
        collector.hinv()


@pytest.mark.parametrize(
    "scale,message",
    [(0.0, "no non-zero input"), (float("inf"), "NaN or Inf"), (1e-21, "not representable in float32")],
    ids=["dead", "inf", "tiny"],
)
def test_inputs_without_usable_signal_are_a_clear_error_never_nan(scale, message):
    model = nn.Sequential(nn.Linear(4, 2))
    with HessianCollector(model, ["0"]) as collector:
        model(torch.ones(3, 4) * scale)
    with pytest.raises(ValueError, match=f"layer '0'.*{message}"):
        collector.hinv()


def test_rank_deficient_h_falls_back_to_the_documented_damping():
    """Two tokens, 32 columns, one column never active: H is singular; the damping λ = 0.01·mean(diag H)
    keeps diag((H + λI)⁻¹) finite and positive, and the dead column gets exactly 1/λ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 4))
    x = torch.randn(2, 32)
    x[:, 7] = 0.0
    with HessianCollector(model, ["0"]) as collector:
        model(x)
    hinv = collector.hinv()["0"]
    lam = 0.01 * float(collector.hessian("0").double().diagonal().mean())
    assert torch.isfinite(hinv).all() and (hinv > 0).all()
    assert float(hinv[7]) == pytest.approx(1.0 / lam, rel=1e-6)


class _Decoder(nn.Module):
    """A stack that reads ``inputs_embeds`` and an ``attention_mask`` keyword, as Hugging Face models do;
    with ``routed``, the second block's layer reads only the first three token rows (an MoE expert)."""

    def __init__(self, routed: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(3, 3)) for _ in range(2)])
        self.routed = routed

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.layers[0](inputs_embeds)
        if self.routed:
            return self.layers[1](x.reshape(-1, 3)[:3])
        return self.layers[1](x)


def test_the_forward_calls_mask_wins_over_the_set_one():
    """The mask the model's forward receives is the one applied (set_attention_mask only where the
    call gives none), and a call with attention_mask=None counts every position."""
    model = _Decoder()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    with torch.no_grad(), HessianCollector(model, ["layers.0.0", "layers.1.0"]) as collector:
        collector.set_attention_mask(torch.zeros(2, 4))
        model(inputs_embeds=torch.randn(2, 4, 3), attention_mask=mask)
        assert collector.num_tokens("layers.1.0") == 5
        model(inputs_embeds=torch.randn(2, 4, 3), attention_mask=None)
    assert collector.num_tokens("layers.0.0") == 5 + 8


def test_decoding_with_a_cache_uses_the_last_mask_positions():
    """generate with a KV cache feeds one new position while the mask covers every past one."""
    model = _Decoder()
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad(), HessianCollector(model, ["layers.0.0"]) as collector:
        model(inputs_embeds=torch.randn(2, 1, 3), attention_mask=mask)
    assert collector.num_tokens("layers.0.0") == 1


def test_tokens_routed_to_an_expert_count_whole():
    """[decision] 2-D inputs that are not the B·T positions (tokens routed to an expert) keep every row."""
    model = _Decoder(routed=True)
    with torch.no_grad(), HessianCollector(model, ["layers.1.0"]) as collector:
        model(inputs_embeds=torch.randn(2, 4, 3), attention_mask=torch.ones(2, 4))
    assert collector.num_tokens("layers.1.0") == 3


def test_conv1d_layers_are_collected_on_their_input_features():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(2, 5))  # weight (5, 2): 5 input features
    x = torch.randn(4, 5)
    with HessianCollector(model, ["0"]) as collector:
        model(x)
    torch.testing.assert_close(collector.hessian("0"), 2.0 / 4 * x.T @ x)
    assert collector.hinv()["0"].shape == (5,)


class _Prefixed(nn.Module):
    """Prepends one learned position to the sequence and the mask (as PEFT prompt tuning does)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Decoder()
        self.prefix = nn.Parameter(torch.ones(1, 1, 3))

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = inputs_embeds.shape[0]
        embeds = torch.cat([self.prefix.expand(batch, 1, 3), inputs_embeds], dim=1)
        return self.inner(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(batch, 1), attention_mask], 1))


def test_the_stack_takes_the_innermost_calls_mask():
    """The mask of the call nearest the stack: the one that matches the sequence its blocks read."""
    model = _Prefixed()
    with torch.no_grad(), HessianCollector(model, ["inner.layers.0.0"]) as collector:
        model(inputs_embeds=torch.randn(2, 4, 3), attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert collector.num_tokens("inner.layers.0.0") == 2 + 6
