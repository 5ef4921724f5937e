"""The end-of-task edit (reduce + select + write) per layer and over a whole model, and its two
passes alone, on every backend; the ``torch`` backend is the tests' reference
(``hpa_kernels.ops.torch_ref``). ``python -m pytest bench -m bench -k edit``."""

from __future__ import annotations

import pytest

from .workloads import MINILM_L6, LayerEdit, ModelEdit, build_model, device_backends, edit_bytes

pytestmark = pytest.mark.bench

BACKENDS = device_backends("cpu")
# (out_features, in_features): MiniLM attention and FFN, Llama-1B's q, a weird shape.
LAYERS = [(384, 384), (1536, 384), (2048, 2048), (4097, 3)]


@pytest.fixture(scope="module", params=LAYERS, ids=lambda s: f"{s[0]}x{s[1]}")
def layer(request):
    return LayerEdit(*request.param)


@pytest.mark.parametrize("part", ["edit", "reduce", "apply"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_edit(benchmark, layer, part, backend):
    rows, cols = layer.w_new.shape
    benchmark.group = f"{part} {rows}x{cols}"
    if part == "edit":
        benchmark.extra_info["bytes"] = edit_bytes(rows, cols)
    benchmark.pedantic(getattr(layer, part)(backend), rounds=10, warmup_rounds=2)


@pytest.fixture(scope="module")
def minilm():
    return build_model(MINILM_L6, grads=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_edit(benchmark, minilm, backend):
    case = ModelEdit(minilm, backend)
    benchmark.group = f"end_task {MINILM_L6.name}"
    benchmark.pedantic(case.run, setup=case.setup, rounds=5, warmup_rounds=1)
