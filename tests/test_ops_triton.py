"""The ``"triton"`` backend's multi-tensor AdamW: one launch per storage dtype over a device table
of addresses (hpa_kernels/ops/triton.py ``_adamw_kernel`` / ``_adamw_table``).

Runs compiled on a GPU, else on CPU tensors under ``TRITON_INTERPRET=1`` (set here before the
backend is imported, as tests/test_ops.py does).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hpa_kernels import ops  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in ops.available_backends(), reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
# Odd sizes around the 1024-element block, an empty tensor, two dtypes interleaved (two launches).
CASES = [(3000, torch.float32), (0, torch.bfloat16), (1, torch.float32), (1025, torch.bfloat16), (70, torch.float16)]
CASES += [(1024, torch.float32), (2047, torch.float16), (5, torch.bfloat16)]


def _state(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(DEVICE, dtype) for n, dtype in CASES]
    grads = [torch.randn(n, generator=gen).to(DEVICE, dtype) for n, dtype in CASES]
    exp_avgs = [(0.1 * torch.randn(n, generator=gen)).to(DEVICE) for n, _ in CASES]
    exp_avg_sqs = [(0.01 * torch.rand(n, generator=gen)).to(DEVICE) for n, _ in CASES]
    steps = [torch.tensor(float(k), device=DEVICE) for k in range(len(CASES))]
    return params, grads, exp_avgs, exp_avg_sqs, steps


def _assert_equal(got, want):
    for name, g_list, w_list in zip(("param", "grad", "exp_avg", "exp_avg_sq", "step"), got, want):
        for k, (g, w) in enumerate(zip(g_list, w_list)):
            assert torch.equal(g, w), f"{name}[{k}] (size {CASES[k][0]}, {CASES[k][1]}) differs"


def test_one_launch_per_dtype_equals_one_call_per_tensor(monkeypatch):
    """A call over tensors of three dtypes launches three kernels and gives the bits of one call
    per tensor (each element's update depends on its own inputs only)."""
    from hpa_kernels.ops import triton as tk

    launches = []
    kernel = tk._adamw_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    together, apart = _state(1), _state(1)
    monkeypatch.setattr(tk, "_adamw_kernel", Counting())
    ops.adamw_step(*together, **HYPER, backend="triton")
    assert len(launches) == 3
    for tensors in zip(*apart):
        ops.adamw_step(*([t] for t in tensors), **HYPER, backend="triton")
    _assert_equal(together, apart)


def test_matches_the_reference():
    """Every element of every tensor is stepped once, as the ``"torch"`` reference steps it."""
    got, want = _state(2), _state(2)
    ops.adamw_step(*got, **HYPER, maximize=True, backend="triton")
    ops.adamw_step(*want, **HYPER, maximize=True, backend="torch")
    for k, (g, w) in enumerate(zip(got[0] + got[2] + got[3], want[0] + want[2] + want[3])):
        torch.testing.assert_close(g, w, rtol=1e-2 if g.dtype != torch.float32 else 1e-6, atol=1e-6, msg=f"tensor {k}")
    assert [s.item() for s in got[4]] == [s.item() for s in want[4]]


def test_address_table_is_reused_and_never_stale():
    """The same tensors step again on the table already on the device; a gradient in new memory
    gets a table of its own, and the result is that of fresh tensors."""
    from hpa_kernels.ops import triton as tk

    tk._TABLES.clear()
    state = _state(3)
    ops.adamw_step(*state, **HYPER, backend="triton")
    tables = dict(tk._TABLES)
    ops.adamw_step(*state, **HYPER, backend="triton")
    assert tk._TABLES.keys() == tables.keys() and all(tk._TABLES[k] is t for k, t in tables.items())

    moved, fresh = _state(4), _state(4)
    moved[1][0] = moved[1][0].clone()  # new memory for one gradient
    ops.adamw_step(*moved, **HYPER, backend="triton")
    tk._TABLES.clear()
    ops.adamw_step(*fresh, **HYPER, backend="triton")
    _assert_equal(moved, fresh)


def test_found_inf_skips_every_tensor_and_step():
    """A non-zero ``found_inf`` leaves every tensor and step count as it was."""
    state = _state(5)
    before = [[t.clone() for t in column] for column in state]
    ops.adamw_step(*state, **HYPER, found_inf=torch.ones((), device=DEVICE), backend="triton")
    _assert_equal(state, before)
