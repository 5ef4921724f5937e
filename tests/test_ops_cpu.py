"""The ``"cpu"`` backend's own choices, none of which may change an element-wise bit: how one
multi-tensor AdamW call shares its tensors among threads, and which vector ISA runs its loops.

The call lays its tensors end to end and cuts that range into one share per thread (csrc/cpu/adamw.cpp),
so shares start and end inside tensors, and a call too small for a second thread runs on one. The
loops run as AVX-512, AVX2 or baseline code, whichever the CPU has (csrc/include/hpa/isa.h).
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


_ISA_SCRIPT = """
import sys, torch
from hpa_kernels import ops
out = {}
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    ps = [torch.randn(n, generator=gen).to(dtype) for n in (70001, 33, 4097)]
    gs = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
    ms = [torch.zeros(p.shape) for p in ps]
    vs = [torch.zeros(p.shape) for p in ps]
    ss = [torch.zeros(()) for p in ps]
    ops.adamw_step(ps, gs, ms, vs, ss, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, backend="cpu")
    out[f"adamw {dtype}"] = [*ps, *ms, *vs]
for mode in ("lagged", "exact"):
    for dtype, shape in ((torch.float32, (130, 261)), (torch.bfloat16, (64, 77)), (torch.float16, (9, 1000))):
        prev = torch.randn(shape, generator=gen).to(dtype)
        t = ops.OnlineTensors(
            (prev.float() + 0.05 * torch.randn(shape, generator=gen)).to(dtype), torch.randn(shape, generator=gen).to(dtype),
            torch.zeros(shape), torch.zeros(shape), torch.zeros(()), prev, torch.rand(shape[1], generator=gen) < 0.2,
            torch.zeros(shape[1]),
        )
        coef = torch.tensor(-0.0390625)
        c = ops.online_step(*t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                            projection=ops.OnlineProjection(mode=mode, coef=coef), backend="cpu")
        out[f"online {mode} {dtype}"] = [t.param, t.exp_avg, t.exp_avg_sq, t.col_energy, c]
torch.save(out, sys.argv[1])
"""


def test_every_isa_gives_the_same_elementwise_bits(tmp_path):
    """The AVX-512, AVX2 and baseline instantiations (HPA_CPU_ISA caps the one picked) give the
    same bits for every element-wise result — AdamW in each storage dtype, the online step's
    moments and column energies, its lagged weights — and online coefficients (sums over vector
    lanes) within fp32 rounding; the exact mode's weights follow its coefficient."""
    import os
    import subprocess
    import sys

    results = {}
    for isa in ("baseline", "avx2", ""):
        path = tmp_path / f"{isa or 'widest'}.pt"
        env = {**os.environ, "HPA_CPU_ISA": isa}
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env)
        results[isa or "widest"] = torch.load(path)
    reference = results.pop("baseline")
    for isa, result in results.items():
        for key, tensors in reference.items():
            exact_mode = key.startswith("online exact")
            for k, (a, b) in enumerate(zip(tensors, result[key])):
                coefficient = key.startswith("online") and k == 4
                if coefficient or (exact_mode and k == 0):
                    torch.testing.assert_close(b.float(), a.float(), rtol=1e-5, atol=1e-6, msg=f"{isa} {key} {k}")
                else:
                    assert torch.equal(a, b), (isa, key, k)


def _online_layers(seed):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for shape in ((300, 257), (1000, 40), (7, 3000), (513, 2100)):  # row and column blocks of every size
        prev = torch.randn(shape, generator=gen)
        layers.append(
            ops.OnlineTensors(
                prev + 0.05 * torch.randn(shape, generator=gen),
                torch.randn(shape, generator=gen),
                torch.zeros(shape),
                torch.zeros(shape),
                torch.zeros(()),
                prev,
                torch.rand(shape[1], generator=gen) < 0.2,
                torch.rand(shape[1], generator=gen),
            )
        )
    return layers


@pytest.mark.parametrize("mode", ["exact", "lagged"])
def test_online_step_bits_do_not_depend_on_the_thread_count(mode):
    """The online step's sums (column energies, the projection coefficient) and so every tensor it
    writes have the same bits on 1, 2 or 3 threads: its tiling is fixed by the layers' shapes."""
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)  # the kernels' OpenMP runtime is torch's
            layers = _online_layers(seed=4)
            projections = [ops.OnlineProjection(mode=mode, coef=torch.tensor(0.01)) for _ in layers]
            coefs = ops.online_steps(layers, **HYPER, projections=projections, backend="cpu")
            runs.append((layers, coefs))
    finally:
        torch.set_num_threads(previous)
    (layers, coefs), *others = runs
    assert bool((coefs != 0).all())
    for other_layers, other_coefs in others:
        assert torch.equal(coefs, other_coefs)
        for a, b in zip(layers, other_layers):
            for name, x, y in zip(ops.OnlineTensors._fields, a, b):
                assert torch.equal(x, y), name
