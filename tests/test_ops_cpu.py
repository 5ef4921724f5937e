"""The ``"cpu"`` backend's multi-tensor AdamW: how one call shares its tensors among threads.

The call lays its tensors end to end and cuts that range into one share per thread (csrc/cpu/adamw.cpp),
so shares start and end inside tensors, and a call too small for a second thread runs on one. Neither
may change a single bit: every element's update depends on its own inputs only.
"""

from __future__ import annotations

import pytest
import torch

from hpa_kernels import ops

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="needs hpa_kernels._C")

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
# Odd sizes, an empty tensor and a 1-element one; 2.3e5 elements in all, so every thread gets a share
# that starts or ends inside a tensor (shares are at least 2**15 elements, aligned to 64).
SIZES = [70001, 0, 1, 33, 65537, 4097, 90000, 63, 257]


def _state(sizes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    exp_avgs = [0.1 * torch.randn(n, generator=gen) for n in sizes]
    exp_avg_sqs = [0.01 * torch.rand(n, generator=gen) for n in sizes]
    steps = [torch.tensor(float(k), dtype=torch.float32) for k in range(len(sizes))]
    return params, grads, exp_avgs, exp_avg_sqs, steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_call_equals_one_call_per_tensor(dtype, threads):
    """A call over all tensors gives the bits of one call per tensor, whatever the thread count."""
    together = _state(SIZES, dtype, seed=3)
    apart = _state(SIZES, dtype, seed=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernels' OpenMP runtime is torch's
    try:
        ops.adamw_step(*together, **HYPER, backend="cpu")
        for tensors in zip(*apart):
            ops.adamw_step(*([t] for t in tensors), **HYPER, backend="cpu")
    finally:
        torch.set_num_threads(previous)
    for name, got, want in zip(("param", "grad", "exp_avg", "exp_avg_sq", "step"), together, apart):
        for k, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"{name}[{k}] (size {SIZES[k]}) differs"


def test_matches_reference_across_shares():
    """Every element of every tensor is stepped once: the result is the ``"torch"`` reference's."""
    got = _state(SIZES, torch.float32, seed=5)
    want = _state(SIZES, torch.float32, seed=5)
    ops.adamw_step(*got, **HYPER, backend="cpu")
    ops.adamw_step(*want, **HYPER, backend="torch")
    for k, (g, w) in enumerate(zip(got[0] + got[2] + got[3], want[0] + want[2] + want[3])):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=f"tensor {k}")
    assert [s.item() for s in got[4]] == [s.item() for s in want[4]]
