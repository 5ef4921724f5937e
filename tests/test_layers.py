"""Finding the managed linear layers (nn.Linear, Conv1D), their block depth, include / exclude, warnings."""

import pytest
import torch
from helpers import TinyModel
from torch import nn

from hpa_kernels import HPAConfig
from hpa_kernels.layers import find_block_stacks, find_hpa_layers


def test_tiny_model_stack():
    model = TinyModel(depth=4)
    assert [name for name, _ in find_block_stacks(model)] == ["blocks"]
    layers = find_hpa_layers(model)
    assert len(layers) == 12
    assert [layers[f"blocks.{b}.o"].block for b in range(4)] == [0, 1, 2, 3]
    assert layers["blocks.3.o"].retain_ratio == 0.05 and layers["blocks.0.o"].num_blocks == 4


def test_hugging_face_bert_encoder_layers():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24
    )
    model = transformers.BertModel(config)
    layers = find_hpa_layers(model)
    assert len(layers) == 3 * 6  # q, k, v, attention output, intermediate, output
    assert "encoder.layer.0.attention.self.query" in layers
    assert "pooler.dense" not in layers
    assert layers["encoder.layer.2.output.dense"].retain_ratio == 0.05


def test_module_list_of_heads_is_not_a_block_stack():
    model = nn.Module()
    model.heads = nn.ModuleList([nn.Linear(3, 2), nn.Linear(3, 4)])
    assert find_block_stacks(model) == []
    assert find_hpa_layers(model) == {}


def test_nested_stacks_belong_to_the_outer_block():
    inner = nn.Module()
    inner.experts = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)) for _ in range(3)])
    model = nn.Module()
    model.layers = nn.ModuleList([inner])
    layers = find_hpa_layers(model)
    assert list(layers) == [f"layers.0.experts.{e}.0" for e in range(3)]
    assert all(layer.block == 0 for layer in layers.values())


def test_extra_layers_and_errors():
    model = TinyModel()
    layers = find_hpa_layers(model, HPAConfig(extra_layers=("head",)))
    assert layers["head"].block is None and layers["head"].retain_ratio == 0.15
    with pytest.raises(ValueError, match="not an nn.Linear"):
        find_hpa_layers(model, HPAConfig(extra_layers=("embed",)))


def test_tied_weights_are_refused():
    model = TinyModel()
    model.blocks[1].k.weight = model.blocks[1].q.weight
    with pytest.raises(ValueError, match="share one weight"):
        find_hpa_layers(model)


def test_hybrid_stack_of_mixed_block_classes():
    """[decision] Blocks of different classes (Jamba's attention and Mamba blocks) form one stack."""

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_proj = nn.Linear(4, 4)

    model = nn.Module()
    model.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)), Mixer(), nn.Sequential(nn.Linear(4, 4))])
    layers = find_hpa_layers(model)
    assert list(layers) == ["layers.0.0", "layers.1.in_proj", "layers.2.0"]
    assert [layer.block for layer in layers.values()] == [0, 1, 2]


def test_include_and_exclude_patterns():
    model = TinyModel(depth=3)
    attention_only = find_hpa_layers(model, HPAConfig(exclude=("*.o",)))
    assert sorted(attention_only) == sorted(f"blocks.{b}.{n}" for b in range(3) for n in ("q", "k"))
    with_head = find_hpa_layers(model, HPAConfig(include=("he*",)))
    assert with_head["head"].block is None and with_head["head"].part == "other"
    assert with_head["head"].retain_ratio == 0.15
    excluded_wins = find_hpa_layers(model, HPAConfig(include=("head",), exclude=("head",)))
    assert "head" not in excluded_wins
    with pytest.raises(ValueError, match=r"include pattern 'embed' matches no nn.Linear"):
        find_hpa_layers(model, HPAConfig(include=("embed",)))


def test_frozen_layers_are_skipped_with_a_warning_unless_named():
    model = TinyModel(depth=2)
    model.blocks[0].q.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"skips 1 frozen layer.*blocks\.0\.q"):
        layers = find_hpa_layers(model)
    assert "blocks.0.q" not in layers and "blocks.1.q" in layers
    named = find_hpa_layers(model, HPAConfig(include=("blocks.0.q",)))
    assert named["blocks.0.q"].block == 0


def test_non_linear_weights_in_the_blocks_are_named_in_a_warning():
    """A fused 3-D expert weight inside a block is no linear layer: never edited, never silent."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 6, 3))

    model = TinyModel(depth=2, width=3)
    for block in model.blocks:
        block.experts = Experts()
    with pytest.warns(UserWarning, match=r"Experts\.gate_up_proj \(4, 6, 3\): blocks\.0\.experts\.gate_up_proj"):
        layers = find_hpa_layers(model)
    assert len(layers) == 6


def test_nothing_managed_says_why():
    with pytest.warns(UserWarning, match="has no block stack"):
        assert find_hpa_layers(nn.Sequential(nn.Linear(3, 3))) == {}
    model = TinyModel(depth=2)
    with pytest.warns(UserWarning, match="frozen or excluded"):
        assert find_hpa_layers(model, HPAConfig(exclude=("blocks.*",))) == {}


def test_conv1d_is_a_linear_layer_with_input_feature_columns():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Sequential(Conv1D(7, 5)) for _ in range(2)])  # weight (5, 7): in 5, out 7
    layers = find_hpa_layers(model)
    layer = layers["blocks.1.0"]
    assert layer.transposed and layer.in_features == 5 and layer.block == 1
    assert layer.hpa_view(layer.module.weight).shape == (7, 5)
    assert layer.hpa_view(layer.module.weight).data_ptr() == layer.module.weight.data_ptr()  # a view
    assert find_hpa_layers(model, HPAConfig(extra_layers=("blocks.0.0",)))["blocks.0.0"].block == 0
