"""One optimizer step: torch AdamW (foreach, fused) against HPAOptimizer plain and online, per
backend, on identical parameter sets (bench.workloads). ``python -m pytest bench -m bench -k step``."""

from __future__ import annotations

import pytest

from .workloads import (
    MINILM_L6,
    build_model,
    make_optimizer,
    step_bytes,
    step_variants,
    sweep_spec,
)

pytestmark = pytest.mark.bench

SETS = [sweep_spec(1e5), sweep_spec(1e6), sweep_spec(1e7), MINILM_L6]
VARIANTS = [pytest.param(v, id=v.name) for v in step_variants()]


@pytest.fixture(scope="module", params=SETS, ids=lambda s: s.name)
def model(request):
    return build_model(request.param)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step(benchmark, model, variant):
    opt = make_optimizer(variant, model)
    opt.step()  # the first step allocates the state
    num_bytes = step_bytes(variant, model)
    benchmark.group = f"step {model.spec.name} ({model.spec.num_params:.2e} params)"
    benchmark.extra_info.update(params=model.spec.num_params, bytes=num_bytes)
    benchmark.pedantic(opt.step, rounds=5, warmup_rounds=1)
    benchmark.extra_info["gbps"] = num_bytes / benchmark.stats.stats.median / 1e9
