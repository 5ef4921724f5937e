"""Every op of hpa_kernels.ops on every available backend against the ``"torch"`` reference.

One table (``test_op_matches_reference``): each case builds one set of inputs, runs the reference
in float64 on exact float64 copies of them (the truth), the reference in the case's own dtype (to
measure the reference's own low-precision error), and the backend under test in the case's dtype
and layout. An output passes when (as flash-attention tests its kernels)::

    max|backend − truth| ≤ 2 · max|reference_lowp − truth| + floor

``floor`` covers what that ratio cannot: where the reference is exact by luck (tiny shapes), a
backend that rounds once differently is off by at most one unit in the last place of the output
dtype (``eps(dtype)·max|truth|``); fp32 sums of n terms in a different order than the reference's
fp64 sums drift by about √n·eps32 relative, allowed with a margin of 8 (scaled by Σ|terms| for the
signed sum ⟨ΔW, W_prev⟩, where cancellation makes max|truth| meaningless).

Triton runs on CPU tensors under ``TRITON_INTERPRET=1``, which triton reads when kernels are
decorated: this module sets it, when there is no GPU, before anything imports
``hpa_kernels.ops.triton``. With a GPU, Triton and CUDA run compiled, under the ``gpu`` marker.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hpa_kernels import functional as F  # noqa: E402
from hpa_kernels import ops  # noqa: E402
from hpa_kernels.ops import torch_ref as reference  # noqa: E402  (the "torch" kernels, called directly)

HAS_GPU = torch.cuda.is_available()
AVAILABLE = ops.available_backends()
TRITON_ON_CPU = "triton" in AVAILABLE and not HAS_GPU
if TRITON_ON_CPU:
    from hpa_kernels.ops import triton as triton_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(1, 1), (3, 5), (17, 33), (257, 1023), (4097, 3), (0, 16), (16, 0)]
SMALL_SHAPES = [(1, 1), (3, 5), (17, 33), (0, 16), (16, 0)]  # the Triton interpreter's
CHANNELS_LAST_SHAPES = [(1, 1, 1, 1), (2, 3, 4, 5), (8, 16, 3, 3)]
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}


def _gpu_skip(backend: str):
    return pytest.mark.skipif(
        not HAS_GPU or backend not in AVAILABLE, reason=f"needs a CUDA GPU and the {backend!r} backend"
    )


# (backend, device, small shapes only)
BACKENDS = []
if "cpu" in AVAILABLE:
    BACKENDS.append(pytest.param("cpu", "cpu", False, id="cpu"))
if TRITON_ON_CPU:
    BACKENDS.append(pytest.param("triton", "cpu", True, id="triton-interp"))
BACKENDS += [
    pytest.param("cuda", "cuda", False, id="cuda", marks=[pytest.mark.gpu, _gpu_skip("cuda")]),
    pytest.param("triton", "cuda", False, id="triton-gpu", marks=[pytest.mark.gpu, _gpu_skip("triton")]),
]


# ---------------------------------------------------------------------------------------------
# Layouts: how the backend's copies of the inputs are laid out in memory


def _strided(x: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view holding x: every other column of a wider matrix."""
    base = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
    view = base[..., ::2]
    view.copy_(x)
    return view


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """x with column-major strides (as a grad that came through a transpose)."""
    return x.t().contiguous().t() if x.dim() == 2 else x


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# Op cases: inputs (float64 master values, exactly representable in the case's dtype), a call, and
# the outputs to compare. ``role`` names which inputs a layout applies to.


def _rand(gen: torch.Generator, shape, dtype: torch.dtype, scale: float = 1.0, positive: bool = False):
    x = (
        torch.rand(shape, generator=gen, dtype=torch.float64)
        if positive
        else torch.randn(shape, generator=gen, dtype=torch.float64)
    )
    return (x * scale).to(dtype).to(torch.float64)  # exact in dtype


def _adamw_inputs(shape, dtype, gen):
    # A second, differently sized tensor in the same call: the multi-tensor path.
    shapes = [shape, (7,)]
    return {
        "params": [_rand(gen, s, dtype) for s in shapes],
        "grads": [_rand(gen, s, dtype) for s in shapes],
        "exp_avgs": [_rand(gen, s, torch.float32, 0.1) for s in shapes],
        "exp_avg_sqs": [_rand(gen, s, torch.float32, 0.01, positive=True) for s in shapes],
        "state_steps": [torch.tensor(4.0, dtype=torch.float64) for _ in shapes],
    }


def _adamw_call(x, backend, dtype):
    ops.adamw_step(
        x["params"], x["grads"], x["exp_avgs"], x["exp_avg_sqs"], x["state_steps"], **HYPER,
        maximize=dtype == torch.float16, grad_scale=x["grad_scale"], backend=backend,
    )  # fmt: skip
    return [*x["params"], *x["exp_avgs"], *x["exp_avg_sqs"], *x["state_steps"]]


def _reduce_inputs(shape, dtype, gen):
    w_prev = _rand(gen, shape, dtype)
    w_new = (w_prev + _rand(gen, shape, torch.float64, 0.1)).to(dtype).to(torch.float64)
    return {"w_prev": w_prev, "w_new": w_new}


def _reduce_call(x, backend, dtype):
    return list(ops.hpa_reduce(x["w_prev"], x["w_new"], backend=backend))


def _apply_inputs(shape, dtype, gen):
    x = _reduce_inputs(shape, dtype, gen)
    x["mask"] = torch.rand(shape[1], generator=gen) < 0.3
    x["out"] = torch.zeros(shape, dtype=torch.float64)
    return x


def _apply_call(x, backend, dtype):
    coef = 0.05 if dtype != torch.bfloat16 else torch.tensor(0.05)  # float and tensor coef
    return [ops.hpa_apply(x["w_prev"], x["w_new"], x["mask"], coef, out=x["out"], backend=backend)]


def _online_inputs(shape, dtype, gen):
    w_prev = _rand(gen, shape, dtype)
    return {
        "param": (w_prev + _rand(gen, shape, torch.float64, 0.05)).to(dtype).to(torch.float64),
        "grad": _rand(gen, shape, dtype),
        "exp_avg": _rand(gen, shape, torch.float32, 0.1),
        "exp_avg_sq": _rand(gen, shape, torch.float32, 0.01, positive=True),
        "state_step": torch.tensor(2.0, dtype=torch.float64),
        "w_prev": w_prev,
        "mask": torch.rand(shape[1], generator=gen) < 0.3,
        "col_energy": _rand(gen, (shape[1],), torch.float32, positive=True),
        "lag_coef": torch.tensor(-0.0390625, dtype=torch.float64),  # c_prev: exact in every storage dtype
    }


def _online_call(x, backend, dtype, mode="exact"):
    projection = ops.OnlineProjection(mode=mode, coef=x["lag_coef"])
    coef = ops.online_step(
        x["param"], x["grad"], x["exp_avg"], x["exp_avg_sq"], x["state_step"], x["w_prev"], x["mask"],
        x["col_energy"], **HYPER, maximize=dtype == torch.float16, grad_scale=x["grad_scale"],
        projection=projection, backend=backend,
    )  # fmt: skip
    return [x["param"], x["exp_avg"], x["exp_avg_sq"], x["state_step"], x["col_energy"], coef]


def _online_lagged_call(x, backend, dtype):
    return _online_call(x, backend, dtype, mode="lagged")


# Per op: inputs, call, the storage dtype of each input (None: keep the float64 master's
# float32/bool), the inputs a "strided" layout applies to, the one a "grad_strides" layout applies to.
OPS = {
    "adamw_step": (_adamw_inputs, _adamw_call, {"params": "dtype", "grads": "dtype"}, ("params", "grads", "exp_avgs", "exp_avg_sqs"), "grads"),
    "hpa_reduce": (_reduce_inputs, _reduce_call, {"w_prev": "dtype", "w_new": "dtype"}, ("w_prev", "w_new"), "w_new"),
    "hpa_apply": (_apply_inputs, _apply_call, {"w_prev": "dtype", "w_new": "dtype", "out": "dtype"}, ("w_prev", "w_new", "out"), "w_new"),
    "online_step": (_online_inputs, _online_call, {"param": "dtype", "grad": "dtype", "w_prev": "dtype"}, ("param", "grad", "exp_avg", "exp_avg_sq", "w_prev"), "grad"),
    "online_step_lagged": (_online_inputs, _online_lagged_call, {"param": "dtype", "grad": "dtype", "w_prev": "dtype"}, ("param", "grad", "exp_avg", "exp_avg_sq", "w_prev"), "grad"),
}  # fmt: skip
ONLINE_OPS = ("online_step", "online_step_lagged")


def _materialise(master: dict, op: str, dtype: torch.dtype, device: str, layout: str) -> dict:
    """Copies of the master inputs: storage dtypes for ``dtype`` (float64 → truth), on device, in layout."""
    _, _, stored, strided_roles, grad_role = OPS[op]

    def convert(name, t):
        if t.dtype == torch.bool:
            return t.to(device, copy=True)
        # copy=True: the master stays untouched by the in-place ops (truth, reference, backend alike)
        if dtype == torch.float64:
            t = t.to(device, torch.float64, copy=True)
        else:
            t = t.to(device, dtype if stored.get(name) == "dtype" else torch.float32, copy=True)
        if layout == "strided" and name in strided_roles and t.dim() >= 1 and t.shape[-1] > 0:
            t = _strided(t)
        elif layout == "grad_strides" and name == grad_role:
            t = _transposed(t)
        elif layout == "channels_last" and name in ("params", "exp_avgs", "exp_avg_sqs") and t.dim() == 4:
            t = _channels_last(t)
        return t

    out = {}
    for name, value in master.items():
        out[name] = [convert(name, t) for t in value] if isinstance(value, list) else convert(name, value)
    scale = torch.tensor(2.0, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    out["grad_scale"] = scale if op in ("adamw_step", *ONLINE_OPS) else None
    return out


def _floor(op: str, index: int, truth: torch.Tensor, master: dict, dtype: torch.dtype) -> float:
    """The absolute floor of the tolerance of output ``index`` of ``op`` (see the module docstring)."""
    scale = truth.abs().max().item() if truth.numel() else 0.0
    eps32 = torch.finfo(torch.float32).eps
    if op == "hpa_reduce":  # (col_energy, dot, norm_sq)
        w = master["w_prev"]
        n = max(1, w.shape[0]) if index == 0 else max(1, w.numel())
        if index == 1:  # ⟨ΔW, W_prev⟩: signed, scale by Σ|terms|
            scale = ((master["w_new"] - w).abs() * w.abs()).sum().item()
        return 8 * math.sqrt(n) * eps32 * scale
    if op in ONLINE_OPS and index == 4:  # col_energy: fp32 sums over r rows
        return 8 * math.sqrt(max(1, master["param"].shape[0])) * eps32 * scale
    if op in ONLINE_OPS and index == 5:  # c' / c_next: a ratio of sums over the matrix, of rounded values
        p = master["w_prev"]
        return 8 * math.sqrt(max(1, p.numel())) * torch.finfo(dtype).eps * max(scale, 1e-3)
    out_dtype = torch.float32
    if (op == "adamw_step" and index < 2) or op == "hpa_apply" or (op in ONLINE_OPS and index == 0):
        out_dtype = dtype
    return torch.finfo(out_dtype).eps * scale  # one unit in the last place at the largest |value|


def _cases():
    for op in OPS:
        for dtype_name in DTYPES:
            shapes = [(s, "contiguous") for s in SHAPES]
            shapes += [(s, "strided") for s in SHAPES] + [(s, "grad_strides") for s in SHAPES]
            if op == "adamw_step":
                shapes += [(s, "channels_last") for s in CHANNELS_LAST_SHAPES]
            for shape, layout in shapes:
                yield op, dtype_name, shape, layout


CASES = [pytest.param(*c, id=f"{c[0]}-{c[1]}-{'x'.join(map(str, c[2]))}-{c[3]}") for c in _cases()]


def _table():
    """Cases x backends; the Triton interpreter gets the small shapes only (the same kernels run every
    shape compiled on a GPU)."""
    for backend in BACKENDS:
        name, device, small_only = backend.values
        for case in CASES:
            shape = case.values[2]
            if small_only and shape not in SMALL_SHAPES and shape not in CHANNELS_LAST_SHAPES[:2]:
                continue
            yield pytest.param(*case.values, name, device, id=f"{backend.id}-{case.id}", marks=backend.marks)


@pytest.mark.parametrize("op,dtype_name,shape,layout,backend,device", list(_table()))
def test_op_matches_reference(op, dtype_name, shape, layout, backend, device):
    dtype = DTYPES[dtype_name]
    make, call, *_ = OPS[op]
    master = make(shape, dtype, torch.Generator().manual_seed(zlib.crc32(f"{op}{dtype_name}{shape}".encode())))
    truth = call(_materialise(master, op, torch.float64, "cpu", "contiguous"), "torch", torch.float64)
    ref_lowp = call(_materialise(master, op, dtype, "cpu", "contiguous"), "torch", dtype)
    got = call(_materialise(master, op, dtype, device, layout), backend, dtype)
    assert len(got) == len(truth)
    for index, (t, r, g) in enumerate(zip(truth, ref_lowp, got)):
        assert g.shape == t.shape, f"output {index}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert g.dtype == r.dtype, f"output {index}: dtype {g.dtype} != reference's {r.dtype}"
        if t.numel() == 0:
            continue
        g64, r64 = g.detach().cpu().double(), r.double()
        assert torch.isfinite(g64).all(), f"output {index} has non-finite values"
        ref_err = (r64 - t).abs().max().item()
        err = (g64 - t).abs().max().item()
        tol = 2 * ref_err + _floor(op, index, t, master, dtype)
        assert err <= tol, f"output {index}: error {err:.3e} > tol {tol:.3e} (reference's own error {ref_err:.3e})"


# ---------------------------------------------------------------------------------------------
# Contracts beyond "matches the reference"


ALL_BACKENDS = [pytest.param("torch", "cpu", id="torch")] + [
    pytest.param(*p.values[:2], id=p.id, marks=p.marks) for p in BACKENDS
]


def _amp_inputs(device, dtype=torch.float16):
    gen = torch.Generator().manual_seed(7)
    shape = (17, 33)
    t = {
        "param": torch.randn(shape, generator=gen).to(device, dtype),
        "grad": torch.randn(shape, generator=gen).to(device, dtype),
        "exp_avg": torch.randn(shape, generator=gen).to(device),
        "exp_avg_sq": torch.rand(shape, generator=gen).to(device),
        "state_step": torch.tensor(3.0, device=device),
        "w_prev": torch.randn(shape, generator=gen).to(device, dtype),
        "mask": (torch.rand(shape[1], generator=gen) < 0.3).to(device),
        "col_energy": torch.rand(shape[1], generator=gen).to(device),
    }
    return t


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_found_inf_leaves_everything_bitwise_unchanged(backend, device):
    """GradScaler's skipped step (``found_inf`` non-zero): no parameter, moment, step count or statistic moves."""
    x = _amp_inputs(device)
    before = {k: v.clone() for k, v in x.items()}
    found_inf = torch.tensor(1.0, device=device)
    scale = torch.tensor(1024.0, device=device)
    ops.adamw_step(
        [x["param"]], [x["grad"]], [x["exp_avg"]], [x["exp_avg_sq"]], [x["state_step"]], **HYPER,
        grad_scale=scale, found_inf=found_inf, backend=backend,
    )  # fmt: skip
    coef = ops.online_step(
        x["param"], x["grad"], x["exp_avg"], x["exp_avg_sq"], x["state_step"], x["w_prev"], x["mask"],
        x["col_energy"], **HYPER, grad_scale=scale, found_inf=found_inf, backend=backend,
    )  # fmt: skip
    for k, v in x.items():
        assert torch.equal(_bits(v), _bits(before[k])), k
    assert coef.item() == 0.0
    # The same call with found_inf = 0 does move everything: the check above can fail.
    found_inf.zero_()
    ops.adamw_step(
        [x["param"]], [x["grad"]], [x["exp_avg"]], [x["exp_avg_sq"]], [x["state_step"]], **HYPER,
        grad_scale=scale, found_inf=found_inf, backend=backend,
    )  # fmt: skip
    assert not torch.equal(x["param"], before["param"]) and x["state_step"].item() == 4.0


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of t (bitwise comparison, NaN and -0.0 included)."""
    return t.detach().reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t


def _online_run(backend, device, dtype, shape, steps, seed=3, orthogonal=True, mode="exact"):
    """``steps`` online steps from W = W_prev; lagged, each step applies the coefficient the
    previous one returned (``state["coef"]``, what HPAOptimizer keeps as ``hpa_online_coef``)."""
    gen = torch.Generator().manual_seed(seed)
    w_prev = torch.randn(shape, generator=gen).to(device, dtype)
    state = {
        "param": w_prev.clone(),
        "exp_avg": torch.zeros(shape, device=device),
        "exp_avg_sq": torch.zeros(shape, device=device),
        "state_step": torch.tensor(0.0, device=device),
        "col_energy": torch.zeros(shape[1], device=device),
        "coef": torch.zeros((), device=device),
    }
    mask = (torch.rand(shape[1], generator=gen) < 0.15).to(device)
    for _ in range(steps):
        grad = torch.randn(shape, generator=gen).to(device, dtype)
        state["coef"] = ops.online_step(
            state["param"], grad, state["exp_avg"], state["exp_avg_sq"], state["state_step"], w_prev, mask,
            state["col_energy"], **HYPER, projection=ops.OnlineProjection(orthogonal, mode, state["coef"]),
            backend=backend,
        )  # fmt: skip
        yield state, w_prev, mask


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_online_step_invariants(backend, device, dtype_name):
    """The invariants of ops.online_step after every step: retained columns bit-equal to W_prev, and
    ΔW Frobenius-orthogonal to W_prev (1e-5 relative in fp32; the rounding bound in bf16 / fp16)."""
    dtype = DTYPES[dtype_name]
    shape = (64, 48) if backend != "triton" or HAS_GPU else (32, 24)
    unit = torch.finfo(dtype).eps / 2
    for state, w_prev, mask in _online_run(backend, device, dtype, shape, steps=5):
        w = state["param"]
        assert torch.equal(_bits(w[:, mask].contiguous()), _bits(w_prev[:, mask].contiguous()))
        delta = w.double() - w_prev.double()
        dot = (delta * w_prev.double()).sum().abs().item()
        assert delta[:, ~mask].abs().max() > 0  # the step moved the free columns
        if dtype == torch.float32:
            assert dot <= 1e-5 * delta.norm().item() * w_prev.double().norm().item()
        else:
            assert dot <= 2 * unit * w.double().norm().item() * w_prev.double().norm().item()
    # Without the projection ΔW is not orthogonal: the check above can fail.
    state, w_prev, mask = list(_online_run(backend, device, torch.float32, shape, steps=2, orthogonal=False))[-1]
    delta = state["param"].double() - w_prev.double()
    assert (delta * w_prev.double()).sum().abs() > 1e-3 * delta.norm() * w_prev.double().norm()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_lagged_online_step_invariants(backend, device, dtype_name):
    """The lagged projection's invariants after every step: retained columns bit-equal to W_prev,
    and ⟨ΔW − c_next·W_prev, W_prev⟩ = 0 over the free columns (c_next the coefficient returned),
    to the fp32 accumulation error of the sums (Σ|terms| relative): ΔW is orthogonal to W_prev but
    for the component the next step removes. Without applying c_prev the pending part grows."""
    dtype = DTYPES[dtype_name]
    shape = (64, 48) if backend != "triton" or HAS_GPU else (32, 24)
    for state, w_prev, mask in _online_run(backend, device, dtype, shape, steps=5, mode="lagged"):
        w = state["param"]
        assert torch.equal(_bits(w[:, mask].contiguous()), _bits(w_prev[:, mask].contiguous()))
        free_prev = w_prev.double()[:, ~mask]
        delta = w.double()[:, ~mask] - free_prev
        assert delta.abs().max() > 0  # the step moved the free columns
        c_next = state["coef"].item()
        assert c_next != 0.0
        residual = ((delta - c_next * free_prev) * free_prev).sum().abs().item()
        terms = (delta.abs() * free_prev.abs()).sum().item() + abs(c_next) * free_prev.square().sum().item()
        assert residual <= 64 * math.sqrt(free_prev.numel()) * torch.finfo(torch.float32).eps * terms
    # The component pending after 5 lagged steps is one step's, not 5 steps' (unprojected, it adds up).
    unprojected = list(_online_run(backend, device, dtype, shape, steps=5, orthogonal=False))[-1]
    delta = unprojected[0]["param"].double() - unprojected[1].double()
    free = ~unprojected[2]
    pending = (delta[:, free] * unprojected[1].double()[:, free]).sum().abs().item()
    assert abs(c_next) * free_prev.square().sum().item() < 0.5 * pending


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_lagged_step_with_zero_coefficient_is_pass_one_of_the_exact_step(backend, device):
    """c_prev = 0: the lagged step writes the exact step's pass 1 (the unprojected step, bit for
    bit: parameter, moments, energies) and returns the exact step's c'."""
    shape = (17, 33)
    lagged, _, _ = list(_online_run(backend, device, torch.bfloat16, shape, steps=1, mode="lagged"))[-1]
    exact, _, _ = list(_online_run(backend, device, torch.bfloat16, shape, steps=1))[-1]
    unprojected, _, _ = list(_online_run(backend, device, torch.bfloat16, shape, steps=1, orthogonal=False))[-1]
    for key in ("param", "exp_avg", "exp_avg_sq", "state_step", "col_energy"):
        assert torch.equal(_bits(lagged[key]), _bits(unprojected[key])), key
    assert lagged["coef"].item() == exact["coef"].item() != 0.0
    assert unprojected["coef"].item() == 0.0


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_skipped_lagged_step_keeps_its_coefficient(backend, device):
    """A GradScaler skip (found_inf ≠ 0) in lagged mode changes nothing and returns c_prev, so the
    pending coefficient survives the skipped step."""
    x = _amp_inputs(device)
    before = {k: v.clone() for k, v in x.items()}
    c_prev = torch.tensor(0.125, device=device)
    coef = ops.online_step(
        x["param"], x["grad"], x["exp_avg"], x["exp_avg_sq"], x["state_step"], x["w_prev"], x["mask"],
        x["col_energy"], **HYPER, grad_scale=torch.tensor(1024.0, device=device),
        found_inf=torch.tensor(1.0, device=device), projection=ops.OnlineProjection(mode="lagged", coef=c_prev),
        backend=backend,
    )  # fmt: skip
    for k, v in x.items():
        assert torch.equal(_bits(v), _bits(before[k])), k
    assert coef.item() == 0.125 and coef.shape == () and coef.dtype == torch.float32


# Layers of one online_steps call: odd shapes (r or c = 1, empty, one above the CPU kernel's
# single-thread size), every storage dtype, an all-retained and a no-retained mask, unequal step
# counts and lagged coefficients.
MULTI_LAYERS = [
    ((1, 1), torch.float32, "random"),
    ((1, 37), torch.bfloat16, "all"),
    ((29, 1), torch.float16, "none"),
    ((17, 33), torch.float32, "none"),
    ((0, 5), torch.float32, "random"),
    ((9, 64), torch.bfloat16, "random"),
    ((23, 45), torch.float32, "all"),
    ((130, 260), torch.float32, "random"),  # 33800 elements: several threads on "cpu"
]


def _multi_layers(device, small, seed=5):
    gen = torch.Generator().manual_seed(seed)
    layers, coefs = [], []
    for k, (shape, dtype, kind) in enumerate(MULTI_LAYERS):
        if small and shape[0] * shape[1] > 4096:
            shape = (11, 13)
        w_prev = torch.randn(shape, generator=gen)
        mask = {"all": torch.ones(shape[1], dtype=torch.bool), "none": torch.zeros(shape[1], dtype=torch.bool)}.get(
            kind, torch.rand(shape[1], generator=gen) < 0.3
        )
        tensors = ops.OnlineTensors(
            param=(w_prev + 0.05 * torch.randn(shape, generator=gen)).to(device, dtype),
            grad=torch.randn(shape, generator=gen).to(device, dtype),
            exp_avg=(0.1 * torch.randn(shape, generator=gen)).to(device),
            exp_avg_sq=(0.01 * torch.rand(shape, generator=gen)).to(device),
            state_step=torch.tensor(float(k + 1), device=device),
            w_prev=w_prev.to(device, dtype),
            mask=mask.to(device),
            col_energy=torch.rand(shape[1], generator=gen).to(device),
        )
        layers.append(tensors)
        coefs.append(torch.tensor(0.0078125 * (k - 3), device=device))  # exact in every dtype
    return layers, coefs


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "lagged", "none"])
@pytest.mark.parametrize("amp", [None, 0.0, 1.0], ids=["plain", "scaled", "skipped"])
def test_online_steps_equal_one_call_per_layer(backend, device, mode, amp):
    """ops.online_steps over layers of odd shapes and dtypes returns, and writes, bit for bit what
    one ops.online_step call per layer does (parameter, moments, step count, energies, coefficient),
    plain, under a GradScaler and on a skipped step."""
    small = backend == "triton" and not HAS_GPU
    scaler = (
        {}
        if amp is None
        else {"grad_scale": torch.tensor(8.0, device=device), "found_inf": torch.tensor(amp, device=device)}
    )
    orthogonal = mode != "none"
    runs = []
    for multi in (True, False):
        layers, coefs = _multi_layers(device, small)
        projections = [ops.OnlineProjection(orthogonal, "exact" if mode == "none" else mode, c) for c in coefs]
        if multi:
            out = ops.online_steps(layers, **HYPER, **scaler, projections=projections, backend=backend)
            assert out.shape == (len(layers),) and out.dtype == torch.float32 and out.device.type == device
            out = list(out.unbind())
        else:
            out = [
                ops.online_step(*t, **HYPER, **scaler, projection=p, backend=backend)
                for t, p in zip(layers, projections)
            ]
        runs.append((layers, out))
    (multi_layers, multi_out), (single_layers, single_out) = runs
    for k, (a, b) in enumerate(zip(multi_layers, single_layers)):
        for name, x, y in zip(ops.OnlineTensors._fields, a, b):
            assert torch.equal(_bits(x), _bits(y)), (k, name)
        assert torch.equal(_bits(multi_out[k]), _bits(single_out[k].reshape(()))), k
    if amp != 1.0 and orthogonal:
        assert any(c.item() != 0.0 for c in multi_out)


def test_online_steps_checks_each_layer():
    """online_steps runs online_step's checks on every layer (naming it), and takes one projection
    per layer and one device; no layers: an empty result."""
    layers, coefs = _multi_layers("cpu", small=True)
    bad = layers[3]._replace(grad=layers[3].grad.double())
    with pytest.raises(TypeError, match=r"online_steps: layers\[3\]: online_step: grad and w_prev"):
        ops.online_steps([*layers[:3], bad], **HYPER, backend="torch")
    with pytest.raises(ValueError, match="2 layers but 1 projections"):
        ops.online_steps(layers[:2], **HYPER, projections=[ops.OnlineProjection()], backend="torch")
    assert ops.online_steps([], **HYPER).shape == (0,)


def _grads(layers, step, gen_seed=11):
    """Step ``step``'s gradients of ``layers``: fresh values each step, odd ones transposed views."""
    gen = torch.Generator().manual_seed(gen_seed + step)
    grads = []
    for k, t in enumerate(layers):
        r, c = t.param.shape
        g = torch.randn((r, c), generator=gen).to(t.param.device, t.param.dtype)
        grads.append(g.t().contiguous().t() if k % 2 else g)  # (r, c), column-major when k is odd
    return grads


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "lagged", "none"])
@pytest.mark.parametrize("amp", [None, 1.0], ids=["plain", "skipped"])
def test_online_steps_plan_equals_online_steps(backend, device, mode, amp):
    """Three steps of one ops.OnlineStepsPlan write and return, bit for bit, what ops.online_steps
    does with the same gradients (odd shapes and dtypes, an empty layer, strided gradients), and
    each lagged step writes its c_next into the layer's coefficient tensor, which the next step
    applies (and a skipped step leaves as it was)."""
    small = backend == "triton" and not HAS_GPU
    scaler = (
        {}
        if amp is None
        else {"grad_scale": torch.tensor(8.0, device=device), "found_inf": torch.tensor(amp, device=device)}
    )
    orthogonal = mode != "none"
    planned_layers, planned_coefs = _multi_layers(device, small)
    called_layers, called_coefs = _multi_layers(device, small)
    projection = functools.partial(ops.OnlineProjection, orthogonal, "exact" if mode == "none" else mode)
    plan = ops.OnlineStepsPlan(planned_layers, [projection(c) for c in planned_coefs], backend=backend)
    assert len(plan) == len(planned_layers)
    for step in range(3):
        grads = _grads(planned_layers, step)
        out = plan.step(grads, **HYPER, **scaler)
        expected = ops.online_steps(
            [t._replace(grad=g) for t, g in zip(called_layers, _grads(called_layers, step))],
            **HYPER, **scaler, projections=[projection(c) for c in called_coefs], backend=backend,
        )  # fmt: skip
        if mode == "lagged":  # the caller of online_steps carries c_next to the next step itself
            for c, value in zip(called_coefs, expected.unbind()):
                c.copy_(value)
        assert torch.equal(_bits(out), _bits(expected)), step
        for k, (a, b) in enumerate(zip(planned_layers, called_layers)):
            for name, x, y in zip(ops.OnlineTensors._fields, a, b):
                if name != "grad":
                    assert torch.equal(_bits(x), _bits(y)), (step, k, name)
        for k, (a, b) in enumerate(zip(planned_coefs, called_coefs)):
            assert torch.equal(_bits(a), _bits(b)), (step, k)
    if amp == 1.0:
        assert torch.equal(torch.stack(planned_coefs), torch.stack(_multi_layers(device, small)[1]))


def test_online_steps_plan_refuses_what_online_steps_refuses():
    """A plan runs online_steps' checks at construction and on each step's gradients (their
    messages), wants a float32 tensor as each lagged coefficient, and refuses to step once a held
    tensor's storage was replaced (StalePlanError), writing nothing."""
    layers, coefs = _multi_layers("cpu", small=True)
    with pytest.raises(TypeError, match=r"online_steps: layers\[3\]: online_step: grad and w_prev"):
        ops.OnlineStepsPlan([*layers[:3], layers[3]._replace(grad=layers[3].grad.double())], backend="cpu")
    with pytest.raises(ValueError, match=r"layers\[0\]: a lagged coef must be a float32"):
        ops.OnlineStepsPlan(layers[:1], [ops.OnlineProjection(mode="lagged", coef=0.5)], backend="cpu")
    with pytest.raises(ValueError, match="no layers"):
        ops.OnlineStepsPlan([], backend="cpu")
    plan = ops.OnlineStepsPlan(layers, [ops.OnlineProjection(mode="lagged", coef=c) for c in coefs], backend="cpu")
    grads = _grads(layers, 0)
    with pytest.raises(ValueError, match=r"layers\[2\]: online_step: grad must match param's shape"):
        plan.step([*grads[:2], grads[2][:, :-1], *grads[3:]], **HYPER)
    with pytest.raises(TypeError, match=r"layers\[1\]: online_step: grad and w_prev"):
        plan.step([grads[0], grads[1].double(), *grads[2:]], **HYPER)
    with pytest.raises(ValueError, match="8 layers but 7 grads"):
        plan.step(grads[:-1], **HYPER)
    before = [t.clone() for layer in layers for t in layer]
    layers[5].param.data = layers[5].param.data.clone()
    assert plan.stale()
    with pytest.raises(ops.StalePlanError, match="build a new plan"):
        plan.step(grads, **HYPER)
    assert all(torch.equal(a, b) for a, b in zip(before, (t for layer in layers for t in layer)))
    moved = layers[5].param.clone()
    plan.step(grads, **HYPER, check=False)  # unchecked: the step writes the storage it was built on
    assert torch.equal(layers[5].param, moved)  # not followed
    assert not torch.equal(layers[3].param, before[3 * len(layers[3])])  # the other layers stepped
    square = layers[0]._replace(
        **{name: torch.zeros(5, 5) for name in ("param", "grad", "exp_avg", "exp_avg_sq", "w_prev")},
        mask=torch.zeros(5, dtype=torch.bool),
        col_energy=torch.zeros(5),
    )
    plan = ops.OnlineStepsPlan([square], backend="cpu")
    square.exp_avg.data = square.exp_avg.data.t()  # the same address, other strides
    with pytest.raises(ops.StalePlanError):
        plan.step([torch.zeros(5, 5)], **HYPER)


ONLINE_REFUSALS = {
    "param dtype": ({"param": torch.int32}, TypeError, "online_step: param: dtype"),
    "param 1-D": ({"param": (6,)}, ValueError, "param must be 2-D"),
    "grad shape": ({"grad": (4, 5)}, ValueError, "grad must match param's shape"),
    "exp_avg shape": ({"exp_avg": (3, 6)}, ValueError, "exp_avg must match"),
    "w_prev shape": ({"w_prev": (4, 7)}, ValueError, "w_prev must match"),
    "grad dtype": ({"grad": torch.float16}, TypeError, "grad and w_prev must have param's dtype"),
    "w_prev dtype": ({"w_prev": torch.bfloat16}, TypeError, "grad and w_prev must have param's dtype"),
    "exp_avg_sq dtype": ({"exp_avg_sq": torch.float16}, TypeError, "exp_avg and exp_avg_sq must be float32"),
    "mask shape": ({"mask": (5,)}, ValueError, r"mask must have shape \(6,\)"),
    "col_energy shape": ({"col_energy": (6, 1)}, ValueError, r"col_energy must have shape \(6,\)"),
    "mask dtype": ({"mask": torch.uint8}, TypeError, "mask must be bool and col_energy float32"),
    "col_energy dtype": ({"col_energy": torch.float16}, TypeError, "mask must be bool and col_energy float32"),
    "state_step": ({"state_step": (2,)}, ValueError, "state_step must be a one-element tensor"),
}


@pytest.mark.parametrize("case", list(ONLINE_REFUSALS))
def test_online_step_refuses_each_mismatch(case):
    """Each of online_step's tensor checks refuses its mismatch with its message."""
    change, error, message = ONLINE_REFUSALS[case]
    shapes = {"param": (4, 6), "grad": (4, 6), "exp_avg": (4, 6), "exp_avg_sq": (4, 6), "state_step": ()}
    shapes |= {"w_prev": (4, 6), "mask": (6,), "col_energy": (6,)}
    dtypes = dict.fromkeys(shapes, torch.float32) | {"mask": torch.bool}
    for name, value in change.items():
        (dtypes if isinstance(value, torch.dtype) else shapes)[name] = value
    tensors = ops.OnlineTensors(**{name: torch.zeros(shapes[name], dtype=dtypes[name]) for name in shapes})
    with pytest.raises(error, match=message):
        ops.online_step(*tensors, **HYPER, backend="torch")


def test_online_projection_refuses_unknown_modes():
    with pytest.raises(ValueError, match="OnlineProjection.mode must be one of"):
        ops.OnlineProjection(mode="delayed")


@pytest.mark.parametrize("orthogonal", [True, False])
def test_online_step_former_orthogonal_keyword_still_works(orthogonal):
    """``online_step(orthogonal=)`` (the keyword before ``projection=``) gives the bits of
    ``projection=OnlineProjection(orthogonal=...)``, with a DeprecationWarning; both is a TypeError."""
    results = []
    for keywords in ({"orthogonal": orthogonal}, {"projection": ops.OnlineProjection(orthogonal=orthogonal)}):
        t = _amp_inputs("cpu", torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            coef = ops.online_step(*t.values(), **HYPER, **keywords, backend="torch")
        assert any(issubclass(w.category, DeprecationWarning) for w in caught) == ("orthogonal" in keywords)
        results.append([coef, t["param"], t["exp_avg"], t["col_energy"]])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(TypeError, match="projection only"):
        ops.online_step(
            *_amp_inputs("cpu", torch.float32).values(), **HYPER, orthogonal=True,
            projection=ops.OnlineProjection(), backend="torch",
        )  # fmt: skip


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_online_step_energy_counts_retained_columns(backend, device):
    """col_energy accumulates the unconstrained update on every column, retained ones included."""
    state, _, mask = list(_online_run(backend, device, torch.float32, (16, 12), steps=3))[-1]
    assert (state["col_energy"] > 0).all()
    assert state["state_step"].item() == 3.0


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_runs_are_bitwise_deterministic(backend, device):
    """Same inputs, same bits: fixed-order reductions, no atomics."""
    shape = (257, 1023) if backend != "triton" or HAS_GPU else (33, 65)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(11)
        w_prev = torch.randn(shape, generator=gen).to(device)
        w_new = w_prev + 0.1 * torch.randn(shape, generator=gen).to(device)
        red = ops.hpa_reduce(w_prev, w_new, backend=backend)
        online = list(_online_run(backend, device, torch.float32, shape, steps=2))[-1][0]
        runs.append([*red, online["param"], online["col_energy"]])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_storage_round_trip_is_exact(backend, device, dtype):
    """Every finite 16-bit pattern survives load → fp32 → store (our own conversion helpers)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    values = values[torch.isfinite(values.float())].reshape(-1, 256)  # 248 / 255 full rows
    zeros = torch.zeros_like(values)
    out = ops.hpa_apply(
        zeros.to(device),
        values.to(device),
        torch.zeros(values.shape[1], dtype=torch.bool, device=device),
        0.0,
        backend=backend,
    )
    assert torch.equal(out.cpu().view(torch.int16), values.view(torch.int16))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS[1:])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rounding_matches_torch(backend, device, dtype):
    """fp32 → bf16 / fp16 rounds to nearest even as torch's casts do (a truncating helper fails here,
    where the 2x-reference tolerance of the table cannot tell half an ulp from one)."""
    gen = torch.Generator().manual_seed(5)
    a, b = (torch.randn(64, 256, generator=gen).to(dtype) for _ in range(2))
    mask = torch.zeros(256, dtype=torch.bool)
    want = reference.hpa_apply(a, b, mask, 0.37)
    got = ops.hpa_apply(a.to(device), b.to(device), mask.to(device), 0.37, backend=backend).cpu()
    mismatch = got.view(torch.int16) != want.view(torch.int16)
    if device == "cpu":
        assert not mismatch.any()
    else:  # a GPU compiler may fuse b - coef*a into one FMA: a rare one-ulp difference
        assert mismatch.float().mean() < 1e-3


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="hpa_kernels._C not built")
def test_cpu_index_helpers_are_64_bit():
    """The kernels' index arithmetic (csrc/include/hpa/common.h) past 2**31 and 2**32, cheaply."""
    from hpa_kernels import _C

    big = 2**31 + 12345
    assert _C.offset2d(big, 7, 3 * 2**20, 1) == big * 3 * 2**20 + 7
    assert _C.offset2d(3, big, 1, 2**31) == 3 + big * 2**31
    n, parts = 5 * 2**32 + 3, 7
    bounds = [_C.split_range(n, parts, k) for k in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(b[1] == nxt[0] for b, nxt in zip(bounds, bounds[1:]))
    assert max(e - b for b, e in bounds) - min(e - b for b, e in bounds) <= 1


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs the Triton interpreter (no GPU)")
def test_triton_offsets_are_64_bit():
    """_block_offsets gives int64 offsets past 2**32 (block index × block size overflows int32)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, base, BLOCK: tl.constexpr):
        offs = triton_kernels._block_offsets(tl.program_id(0) + base, BLOCK)
        tl.store(out_ptr + tl.arange(0, BLOCK), offs)

    out = torch.empty(1024, dtype=torch.int64)
    base = 2**22 + 5
    probe[(1,)](out, base, BLOCK=1024)
    assert torch.equal(out, torch.arange(1024, dtype=torch.int64) + base * 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_adamw_past_2_31_elements(backend):
    """A bf16 tensor past 2**31 elements is updated whole (its last elements move)."""
    if not HAS_GPU or backend not in AVAILABLE:
        pytest.skip(f"needs a CUDA GPU and the {backend!r} backend")
    n = 2**31 + 1025
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 30 GiB of GPU memory")
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    m = torch.zeros(n, device="cuda")
    v = torch.zeros(n, device="cuda")
    ops.adamw_step([p], [g], [m], [v], [torch.tensor(0.0, device="cuda")], **HYPER, backend=backend)
    assert p[-4:].float().lt(1.0).all() and p[:4].float().lt(1.0).all()
    assert m[-1].item() == pytest.approx(0.1) and v[-1].item() == pytest.approx(0.001)


def test_resolve_backend_and_available():
    assert AVAILABLE[0] == "torch"
    expected_cpu = "cpu" if "cpu" in AVAILABLE else "torch"
    assert ops.resolve_backend("auto", torch.device("cpu")) == expected_cpu
    assert ops.resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown"):
        ops.resolve_backend("nope", torch.device("cpu"))
    if "cpu" in AVAILABLE:
        with pytest.raises(ValueError, match="cannot run"):
            ops.resolve_backend("cpu", torch.device("meta"))
        with pytest.raises(ValueError, match="cannot run on cuda:1 tensors"):  # the device in full
            ops.resolve_backend("cpu", torch.device("cuda", 1))
        with pytest.raises(ValueError, match="cannot run"):  # refusals are not cached
            ops.resolve_backend("cpu", torch.device("meta"))


def test_every_backend_registers_its_kernels():
    """Each backend module registers the four ops under its name when imported ("triton" on the first
    call that resolves to it)."""
    from hpa_kernels.ops import schema

    for name in ("torch", "cpu", "cuda") + (("triton",) if "triton" in AVAILABLE else ()):
        if name == "triton":
            ops.resolve_backend("triton")
            ops._kernels("triton", torch.device("cuda" if HAS_GPU else "cpu"))
        kernels = schema.REGISTRY[name]
        assert kernels.name == name and kernels.float64 == (name == "torch")
        for op in ("adamw_step", "hpa_reduce", "hpa_apply", "online_step"):
            assert callable(getattr(kernels, op)), (name, op)


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("HPA_KERNELS_BACKEND", "torch")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("HPA_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown"):
        ops.resolve_backend("auto", torch.device("cpu"))


def test_missing_compiled_module_falls_back_with_one_warning(tmp_path):
    """A broken hpa_kernels._C gives one RuntimeWarning and the 'torch' backend, never ImportError."""
    import subprocess
    import sys

    code = (
        "import sys, warnings, importlib.abc\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name in ('hpa_kernels._C', 'hpa_kernels._C_cuda'):\n"
        "            raise ImportError('simulated broken build')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch\n"
        "    from hpa_kernels import ops\n"
        "    print(ops.available_backends(), ops.resolve_backend('auto', torch.device('cpu')))\n"
        "    print(sum('compiled kernels not loaded' in str(x.message) for x in w))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].endswith("torch") and "'cpu'" not in lines[0]
    assert lines[1] == "1"


def _bad_calls(device):
    """Calls that break each op's contract, each refused before any kernel runs."""
    w, h = torch.zeros(3, 4, device=device), torch.ones(4, device=device)
    mask, energy, step = torch.zeros(4, dtype=torch.bool, device=device), torch.zeros(4, device=device), torch.zeros(())
    f16 = w.half()
    online = (w.clone(), w.clone(), w.clone(), w.clone(), step, w.clone(), mask, energy)
    return {
        "reduce-shapes": lambda b: ops.hpa_reduce(w, torch.zeros(4, 3, device=device), backend=b),
        "reduce-1d": lambda b: ops.hpa_reduce(h, h, backend=b),
        "apply-mask-dtype": lambda b: ops.hpa_apply(w, w, torch.zeros(4, device=device), 0.0, backend=b),
        "apply-mask-shape": lambda b: ops.hpa_apply(w, w, mask[:3], 0.0, backend=b),
        "apply-out": lambda b: ops.hpa_apply(w, w, mask, 0.0, out=f16, backend=b),
        "adamw-lengths": lambda b: ops.adamw_step([w], [w], [w], [w], [], **HYPER, backend=b),
        "adamw-shapes": lambda b: ops.adamw_step([w], [w.t()], [w], [w], [step], **HYPER, backend=b),
        "adamw-moments": lambda b: ops.adamw_step([f16], [f16], [f16], [f16], [step], **HYPER, backend=b),
        "adamw-step": lambda b: ops.adamw_step([w], [w], [w], [w], [torch.zeros(2)], **HYPER, backend=b),
        "adamw-scale": lambda b: ops.adamw_step([w], [w], [w], [w], [step], **HYPER, grad_scale=h, backend=b),
        "online-1d": lambda b: ops.online_step(h, *online[1:], **HYPER, backend=b),
        "online-grad-dtype": lambda b: ops.online_step(online[0], f16, *online[2:], **HYPER, backend=b),
        "online-mask": lambda b: ops.online_step(*online[:6], energy, energy, **HYPER, backend=b),
        "online-energy": lambda b: ops.online_step(*online[:7], energy[:2], **HYPER, backend=b),
    }


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_bad_arguments_are_refused(backend, device):
    """Every backend refuses a broken contract with the "torch" backend's error and message (one
    schema, hpa_kernels.ops.schema, checked before dispatch); only "torch" takes float64."""
    w = torch.zeros(3, 4, device=device)
    for name, call in _bad_calls(device).items():
        with pytest.raises((ValueError, TypeError)) as want:
            call("torch")
        with pytest.raises(want.type) as got:
            call(backend)
        assert str(got.value) == str(want.value), name
    if backend == "torch":
        ops.hpa_reduce(w.double(), w.double(), backend=backend)  # the tests' float64 ground truth
    else:
        with pytest.raises(TypeError, match=r"hpa_reduce: dtype torch.float64 is not supported \(float32, bfloat16"):
            ops.hpa_reduce(w.double(), w.double(), backend=backend)


# ---------------------------------------------------------------------------------------------
# One summation order for hpa_reduce on every backend (the bits of the reference)


def _reduce_pair(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w_prev = torch.randn(shape, generator=gen).to(dtype)
    w_new = (w_prev.float() + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    hinv = [torch.rand(shape[1], generator=gen) + 0.5 for _ in range(2)]
    return w_prev, w_new, *hinv


@pytest.mark.parametrize("backend,device,small", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_reduce_gives_the_reference_bits(backend, device, small, dtype, layout):
    """Every backend's column energies, ⟨ΔW, W_prev⟩, ‖W_prev‖², and the ε̄, ζ̄ computed from
    those energies on the backend's device, are the bits of the "torch" reference (row blocks of
    128 summed by a pairwise tree, blocks in index order, column tree, float64, the sums and the
    scores rounded once): independent of threads, tiles and SM count, which no backend's own split
    enters. Shapes cross the 128-row block and 128-column group edges, and the 128² column groups
    of the final tree."""
    shapes = [(1, 1), (17, 33), (129, 65), (3, 300)] if small else [(1, 1), (17, 33), (257, 1023), (4097, 3)]
    if not small or (layout, dtype) == ("contiguous", torch.float32):
        shapes.append((2, 16500))  # > 128² columns: two levels of column trees
    make = {"contiguous": lambda x: x, "transposed": _transposed, "strided": _strided}[layout]
    for shape in shapes:
        w_prev, w_new, hinv_s, hinv_t = _reduce_pair(shape, dtype)
        want = list(reference.hpa_reduce(w_prev, w_new))
        got = list(ops.hpa_reduce(make(w_prev.to(device)), make(w_new.to(device)), backend=backend))
        for out in (want, got):  # ε̄, ζ̄ from the energies, on the energies' device
            out += [F.column_scores_from_energy(out[0], shape[0], h.to(out[0].device)) for h in (hinv_s, hinv_t)]
        for name, a, b in zip(("col_energy", "dot", "norm_sq", "eps_bar", "zeta_bar"), want, got):
            assert a.dtype == b.dtype and torch.equal(a, b.cpu()), (shape, name)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_permuted_duplicate_columns_tie_exactly_and_the_lower_index_wins(backend, device):
    """A column equal to another up to a row permutation has the same ε̄ in exact arithmetic: the
    pair gets the same bits (fp64 sums rounded once; fp32 partial sums in thread- and
    tile-dependent order would split such ties), and the lower index wins the tie."""
    from hpa_kernels.functional import top_columns

    gen = torch.Generator().manual_seed(13)
    rows, pairs = 300, 40
    w_prev = torch.randn(rows, pairs, generator=gen)
    w_new = w_prev + 0.1 * torch.randn(rows, pairs, generator=gen)
    perm = torch.randperm(rows, generator=gen)
    w_prev, w_new = torch.cat([w_prev, w_prev[perm]], dim=1), torch.cat([w_new, w_new[perm]], dim=1)
    hinv = (torch.rand(pairs, generator=gen) + 0.5).repeat(2)
    eps_bar, zeta_bar = F.column_scores(
        w_prev.to(device), w_new.to(device), hinv.to(device), hinv.to(device), backend=backend
    )
    eps_bar, zeta_bar = eps_bar.cpu(), zeta_bar.cpu()
    assert torch.equal(eps_bar[:pairs], eps_bar[pairs:]) and torch.equal(zeta_bar[:pairs], zeta_bar[pairs:])
    rank = torch.empty(2 * pairs, dtype=torch.long)
    rank[top_columns(eps_bar, 2 * pairs)] = torch.arange(2 * pairs)
    assert bool((rank[:pairs] + 1 == rank[pairs:]).all())  # each pair adjacent, the lower index first
    assert torch.equal(eps_bar, F.column_scores_from_energy(reference.hpa_reduce(w_prev, w_new)[0], rows, hinv))


_THREADS_SCRIPT = """
import sys, torch
from hpa_kernels import ops
gen = torch.Generator().manual_seed(21)
w_prev = torch.randn(1000, 700, generator=gen)
w_new = w_prev + 0.1 * torch.randn(1000, 700, generator=gen)
torch.save(ops.hpa_reduce(w_prev, w_new, backend="cpu"), sys.argv[1])
"""


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="hpa_kernels._C not built")
def test_cpu_reduce_bits_do_not_depend_on_the_thread_count(tmp_path):
    """The ``cpu`` reduce under OMP_NUM_THREADS=1 and =2 gives the same bits, the reference's."""
    import subprocess
    import sys

    results = []
    for threads in (1, 2):
        out = tmp_path / f"threads{threads}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(out)], env=env, check=True)
        results.append(torch.load(out))
    gen = torch.Generator().manual_seed(21)
    w_prev = torch.randn(1000, 700, generator=gen)
    w_new = w_prev + 0.1 * torch.randn(1000, 700, generator=gen)
    want = reference.hpa_reduce(w_prev, w_new)
    for got in results:
        assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_tall_layer_reduce_is_within_one_ulp_of_the_exact_sum(backend, device):
    """On a (200000, 3) layer (a vocabulary-sized head), where fp32 running sums drift by 1e-3
    relative, float64 block sums keep every output within one float32 ulp of the exactly rounded
    mean (math.fsum)."""
    gen = torch.Generator().manual_seed(3)
    rows = 200_000
    w_prev = torch.randn(rows, 3, generator=gen) + 3.0
    w_new = w_prev + 0.01 * torch.randn(rows, 3, generator=gen)
    col_energy, dot, norm_sq = ops.hpa_reduce(w_prev.to(device), w_new.to(device), backend=backend)
    eps_bar = F.column_scores_from_energy(col_energy, rows, torch.ones(3, device=device))
    delta, prev = (w_new.double() - w_prev.double()).numpy(), w_prev.double().numpy()
    exact = [math.fsum((delta[:, j] ** 2).tolist()) / rows for j in range(3)]
    exact_dot = math.fsum((delta * prev).ravel().tolist())
    exact_norm = math.fsum((prev * prev).ravel().tolist())
    for got, want in [*zip(eps_bar.cpu().tolist(), exact), (dot.item(), exact_dot), (norm_sq.item(), exact_norm)]:
        assert abs(got - want) <= 2.0**-23 * abs(want), (got, want)


_PTX_SCRIPT = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from hpa_kernels.ops import triton as tk

def ptx(fn, signature, constexprs):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=tk.LAUNCH_OPTIONS).asm["ptx"]

hyper = {k: "fp64" for k in ("lr", "log_beta1", "log_beta2", "beta1", "beta2", "eps", "weight_decay")}
flags = {"HAS_SCALE": True, "HAS_INF": True, "MAXIMIZE": False, "LR_PTR": True}
f32 = "*fp32"
adamw = {"table_ptr": "*i64", "num_tensors": "i32", "lr_ptr": f32, "scale_ptr": f32, "inf_ptr": f32, **hyper}
online = {"p_ptr": "*bf16", "g_ptr": "*bf16", "m_ptr": f32, "v_ptr": f32, "w_ptr": "*bf16", "mask_ptr": "*u8",
          "step_ptr": f32, "lr_ptr": f32, "scale_ptr": f32, "inf_ptr": f32, "lag_ptr": f32, "col_ptr": f32, "dot_ptr": f32,
          "norm_ptr": f32, "r": "i64", "c": "i64", "rows_per_chunk": "i64", **hyper}
with open(sys.argv[1], "w") as out:
    out.write(ptx(tk._adamw_kernel, adamw, {**flags, "DTYPE": tk.tl.bfloat16, "SEARCH_STEPS": 3, "BLOCK": 1024}))
    for lagged in (False, True):
        out.write(ptx(tk._online_pass1_kernel, online, {**flags, "LAGGED": lagged, "BLOCK_R": 32, "BLOCK_C": 64}))
"""


@pytest.mark.skipif("triton" not in AVAILABLE, reason="needs triton")
def test_triton_adamw_ptx_rounds_correctly(tmp_path):
    """The PTX (compiled here for sm_90, no GPU needed) of the AdamW and online-step kernels, with
    the launch options every launch uses, has IEEE ``div.rn`` / ``sqrt.rn`` only (no
    ``div.full.f32`` / ``sqrt.approx.ftz.f32``) and no fp32 FMA contraction, whose default changes
    in Triton 3.10 (the fp64 FMAs left are inside libdevice's ``exp`` of the bias corrections).
    The interpreter computes exactly, so only the PTX shows this."""
    import re
    import subprocess
    import sys

    out = tmp_path / "kernels.ptx"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _PTX_SCRIPT, str(out)], env=env, check=True)
    code = out.read_text()
    for approximate in ("div.full", "div.approx", "sqrt.approx", "rcp.approx", "ex2.approx.f32", "fma.rn.f32"):
        assert approximate not in code, approximate
    assert "div.rn.f32" in code and "sqrt.rn.f32" in code
    assert set(re.findall(r"\bfma\.[a-z0-9.]+", code)) <= {"fma.rn.f64"}


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs the Triton interpreter (no GPU)")
@pytest.mark.parametrize("lr", [1e-2, torch.tensor(1e-2)], ids=["float", "cpu-tensor"])
def test_triton_step_builds_no_device_tensor_from_host_values(monkeypatch, lr):
    """Triton AdamW / online steps pass their hyperparameters as kernel arguments, never as a
    device tensor built per step (``torch.tensor([...], device=...)``: a host-to-device copy, a
    sync from pageable memory): a step calls ``torch.tensor`` not once."""
    shape = (17, 33)
    gen = torch.Generator().manual_seed(2)
    p, g, w = (torch.randn(shape, generator=gen) for _ in range(3))
    m, v = torch.zeros(shape), torch.zeros(shape)
    step, mask, energy = torch.zeros(()), torch.zeros(shape[1], dtype=torch.bool), torch.zeros(shape[1])

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called inside a step")

    monkeypatch.setattr(torch, "tensor", refuse)
    hyper = dict(HYPER, lr=lr)
    ops.adamw_step([p], [g], [m], [v], [step], **hyper, backend="triton")
    ops.online_step(p, g, m, v, step, w, mask, energy, **hyper, backend="triton")
    assert step.item() == 2.0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or "triton" not in AVAILABLE, reason="needs two GPUs and triton")
def test_triton_launches_on_the_tensors_device():
    """Triton launches run on the tensors' device, not the current one: parameters on cuda:1
    while cuda:0 is current are stepped, reduced and written on cuda:1, as on cuda:0."""
    results = []
    for device in ("cuda:0", "cuda:1"):
        w_prev, w_new, _, _ = (t.to(device) for t in _reduce_pair((65, 33), torch.float32))
        with torch.cuda.device(0):
            reduced = ops.hpa_reduce(w_prev, w_new, backend="triton")
            written = ops.hpa_apply(w_prev, w_new, torch.zeros(33, dtype=torch.bool, device=device), 0.5,
                                    backend="triton")  # fmt: skip
            state = [w_new.clone(), torch.ones_like(w_new), torch.zeros_like(w_new), torch.zeros_like(w_new)]
            step = torch.zeros((), device=device)
            ops.adamw_step([state[0]], [state[1]], [state[2]], [state[3]], [step], **HYPER, backend="triton")
        results.append([t.cpu() for t in (*reduced, written, *state, step)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.skipif(not TRITON_ON_CPU, reason="needs the Triton interpreter")),
        pytest.param("cuda", marks=[pytest.mark.gpu, _gpu_skip("triton")]),
    ],
)
def test_triton_bits_do_not_depend_on_the_sm_count(monkeypatch, device):
    """Triton's reduction split does not depend on the GPU's SM count (else an H100 PCIe, an H100
    SXM and a MIG slice would give different bits): with the SM count patched to 7 and to 132 the
    reduce and the online step give the same bits (on CPU the interpreter path must not read it
    at all)."""
    from types import SimpleNamespace

    real = torch.cuda.get_device_properties
    runs = []
    for sms in (7, 132):

        def fake(*args, sms=sms, **kwargs):
            props = real(*args, **kwargs) if device == "cuda" else None
            return SimpleNamespace(multi_processor_count=sms, **({"name": props.name} if props else {}))

        monkeypatch.setattr(torch.cuda, "get_device_properties", fake)
        w_prev, w_new, _, _ = (t.to(device) for t in _reduce_pair((300, 70), torch.float32))
        reduced = ops.hpa_reduce(w_prev, w_new, backend="triton")
        online = list(_online_run("triton", device, torch.float32, (600, 70), steps=2))[-1][0]
        runs.append([*reduced, online["param"], online["col_energy"]])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
