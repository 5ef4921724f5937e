"""Finding the managed nn.Linear layers and their block depth."""

import pytest
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
