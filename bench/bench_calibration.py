"""HessianCollector's overhead per forward pass: a MiniLM-L6 forward (batch 8 × 128 tokens) with
and without the collector's hooks. ``python -m pytest bench -m bench -k calibration``."""

from __future__ import annotations

import functools

import pytest
import torch

from hpa_kernels import HessianCollector

from .workloads import MINILM_L6, build_model

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def encoder():
    model = build_model(MINILM_L6, grads=False)
    tokens = torch.randint(0, 30522, (8, 128), generator=torch.Generator().manual_seed(0))
    return model, tokens


@pytest.mark.parametrize("collector", [False, True], ids=["plain", "collector"])
def test_calibration_forward(benchmark, encoder, collector):
    model, tokens = encoder
    layers = [f"blocks.{i}.{s.name}" for i in range(MINILM_L6.num_blocks) for s in MINILM_L6.linears]
    benchmark.group = "calibration forward minilm-l6 8x128"
    with torch.no_grad():
        if collector:
            with HessianCollector(model, layers):
                benchmark.pedantic(functools.partial(model, tokens), rounds=5, warmup_rounds=1)
        else:
            benchmark.pedantic(functools.partial(model, tokens), rounds=5, warmup_rounds=1)
