"""Triton backend (``"triton"``): the GPU fast path; CPU tensors under ``TRITON_INTERPRET=1`` (tests).

Triton reads ``TRITON_INTERPRET`` when this module's kernels are decorated, so it must be set
before this module is first imported. Kernels compute in fp32 with 64-bit offsets
(:func:`_block_offsets`), IEEE division and square root (``div_rn``, ``sqrt_rn``) and no FMA
contraction (every launch passes :data:`LAUNCH_OPTIONS`), so they round as the CPU backend and
torch's own CPU AdamW do. Launches run on the tensors' device (not the current one). AdamW
hyperparameters are fp64 kernel arguments (a CUDA-tensor ``lr`` is read on the device), its
constants (bias corrections) are computed in fp64 on the device from the step count, and
``grad_scale`` / ``found_inf`` / ``coef`` are read on the device, so no op here synchronises with
the host. ``hpa_reduce`` follows the fixed float64 summation order of
``hpa_kernels.ops.hpa_reduce`` in kernels only (row-block trees, block sums in index order, column
trees), so its bits equal the ``"torch"`` reference's on any GPU. The online step's column
reductions write per-program fp32 partials that torch sums in a fixed order (deterministic for a
given GPU; no atomics).

``adamw_step`` launches one kernel per storage dtype over all its tensors, whose addresses it reads
from a device table kept while the tensors stay where they are (:func:`_adamw_table`).
The arguments passed :mod:`hpa_kernels.ops.schema`; this module only stages layouts
(:mod:`hpa_kernels.ops._staging`) and launches. :mod:`hpa_kernels.ops` imports it on the first
call that resolves to ``"triton"`` (importing triton is slow, and ``TRITON_INTERPRET`` must be set
by then); importing it registers the backend.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import schema
from ._staging import Staging
from .schema import ROW_BLOCK, AdamWHyper, AdamWTensors, Kernels, OnlineProjection, OnlineTensors, register

_ADAMW_BLOCK = 1024
_TILE_R = 32
_TILE_C = 64
_REDUCE_COLS = 16  # columns per program of the reduce's first stage (ROW_BLOCK x 16 fp64 tiles)
_GROUP = 128  # values per program of the reduce's column trees (a power of two)


_ONLINE_CHUNK_ROWS = 16 * _TILE_R  # rows per program of the online step's first pass
# Every launch: no a*b+c contraction into FMA (Triton's default changes in 3.10; the CPU build and
# the CUDA build pass -ffp-contract=off / -fmad=false).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device`` (Triton launches on the current CUDA device otherwise)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _block_offsets(block, BLOCK: tl.constexpr):
    """int64 offsets of block ``block`` of size BLOCK (no int32 overflow past 2**31 elements)."""
    return block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``dtype``; bf16 by bit arithmetic (the same on the GPU
    and in the interpreter, whose own fp32 -> bf16 cast truncates), NaN kept quiet as torch does."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _to_f32(x):
    """Stored values to fp32; bf16 by bit arithmetic (exact for subnormals, which the interpreter's
    own bf16 cast flushes to zero)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _adamw_consts(step_ptr, lr_ptr, lr, log_beta1, log_beta2, beta1, beta2, eps, weight_decay, LR_PTR: tl.constexpr):
    """fp32 constants of one step, computed in fp64 from the step count t = *step + 1 (lr read
    from ``lr_ptr`` when LR_PTR, a CUDA-tensor learning rate)."""
    t = tl.load(step_ptr).to(tl.float64) + 1.0
    if LR_PTR:
        lr = tl.load(lr_ptr).to(tl.float64)
    # fp64 division and square root compile to div.rn.f64 / sqrt.rn.f64 (PTX has no approximate ones)
    step_size = (lr / (1.0 - tl.exp(t * log_beta1))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(t * log_beta2)).to(tl.float32)
    decay = tl.cast(1.0 - lr * weight_decay, tl.float32)
    lerp_w = tl.cast(1.0 - beta1, tl.float32)
    one_minus_b2 = tl.cast(1.0 - beta2, tl.float32)
    return step_size, bc2_sqrt, decay, lerp_w, tl.cast(beta2, tl.float32), one_minus_b2, tl.cast(eps, tl.float32)


@triton.jit
def _adamw_math(p, g, m, v, step_size, bc2_sqrt, decay, lerp_w, b2, one_minus_b2, eps):
    """torch.optim.AdamW's element update in fp32 (ATen's two-branch lerp), IEEE division and
    square root; returns (p, m, v)."""
    m = tl.where(lerp_w < 0.5, m + lerp_w * (g - m), g - (g - m) * (1.0 - lerp_w))
    v = v * b2 + one_minus_b2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    return p * decay - step_size * tl.div_rn(m, denom), m, v


@triton.jit
def _load_grad(g_ptr, offs, mask, scale_ptr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    g = _to_f32(tl.load(g_ptr + offs, mask=mask, other=0.0))
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr))
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _adamw_kernel(
    table_ptr, num_tensors, lr_ptr, scale_ptr, inf_ptr,
    lr: tl.float64, log_beta1: tl.float64, log_beta2: tl.float64, beta1: tl.float64, beta2: tl.float64,
    eps: tl.float64, weight_decay: tl.float64,
    DTYPE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr, LR_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """AdamW over the tensors of one :func:`_adamw_table` (one storage dtype), BLOCK elements per
    program. The program finds its tensor by a binary search over the table's first-block column
    (SEARCH_STEPS = ceil(log2(num_tensors + 1)) halvings), then reads its addresses."""
    block = tl.program_id(0)
    first = table_ptr + 6 * num_tensors  # num_tensors + 1 first-block indices, the last = the grid size
    lo = 0
    hi = num_tensors
    for _ in tl.static_range(SEARCH_STEPS):  # invariant: first[lo] <= block < first[hi]
        mid = (lo + hi) // 2
        below = tl.load(first + mid) <= block
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    t = lo
    p_ptr = tl.load(table_ptr + t).to(tl.pointer_type(DTYPE), bitcast=True)
    g_ptr = tl.load(table_ptr + num_tensors + t).to(tl.pointer_type(DTYPE), bitcast=True)
    m_ptr = tl.load(table_ptr + 2 * num_tensors + t).to(tl.pointer_type(tl.float32), bitcast=True)
    v_ptr = tl.load(table_ptr + 3 * num_tensors + t).to(tl.pointer_type(tl.float32), bitcast=True)
    step_ptr = tl.load(table_ptr + 4 * num_tensors + t).to(tl.pointer_type(tl.float32), bitcast=True)
    n = tl.load(table_ptr + 5 * num_tensors + t)
    if HAS_INF:
        n = tl.where(tl.load(inf_ptr) == 0.0, n, 0)  # GradScaler skip: nothing is read or written
    offs = _block_offsets(block - tl.load(first + t), BLOCK)
    mask = offs < n
    step_size, bc2_sqrt, decay, lerp_w, b2, one_minus_b2, eps = _adamw_consts(
        step_ptr, lr_ptr, lr, log_beta1, log_beta2, beta1, beta2, eps, weight_decay, LR_PTR
    )
    g = _load_grad(g_ptr, offs, mask, scale_ptr, HAS_SCALE, MAXIMIZE)
    p = _to_f32(tl.load(p_ptr + offs, mask=mask, other=0.0))
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p, m, v = _adamw_math(p, g, m, v, step_size, bc2_sqrt, decay, lerp_w, b2, one_minus_b2, eps)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, _round_to(p, DTYPE), mask=mask)


@triton.jit
def _pairwise(x, N: tl.constexpr, W: tl.constexpr):
    """(N, W) -> (W,): the adjacent-pair tree along axis 0, level by level x[2t] + x[2t + 1]
    (N a power of two >= 2); each step a sum of two values, so the bits are defined."""
    for level in tl.static_range(N.bit_length() - 2):
        x = tl.sum(tl.reshape(x, [N >> (level + 1), 2, W]), axis=1)
    return tl.sum(x, axis=0)


@triton.jit
def _hpa_reduce_blocks_kernel(
    prev_ptr, new_ptr, part_ptr, r, c, ps0, ps1, ns0, ns1, tiles, blocks,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Stage 1: the tree sums over one row block of d², d·w, w² (float64) for BLOCK_C columns,
    into part[q, block, col] (q = 0, 1, 2)."""
    pid = tl.program_id(0)
    block = (pid // tiles).to(tl.int64)
    cols = _block_offsets(pid % tiles, BLOCK_C)
    rows = block * ROWS + tl.arange(0, ROWS)
    mask = (rows < r)[:, None] & (cols < c)[None, :]
    w = _to_f32(tl.load(prev_ptr + rows[:, None] * ps0 + cols[None, :] * ps1, mask=mask, other=0.0))
    x = _to_f32(tl.load(new_ptr + rows[:, None] * ns0 + cols[None, :] * ns1, mask=mask, other=0.0))
    w = w.to(tl.float64)
    d = x.to(tl.float64) - w
    out = part_ptr + block * c + cols
    plane = blocks * c
    tl.store(out, _pairwise(d * d, ROWS, BLOCK_C), mask=cols < c)
    tl.store(out + plane, _pairwise(d * w, ROWS, BLOCK_C), mask=cols < c)
    tl.store(out + 2 * plane, _pairwise(w * w, ROWS, BLOCK_C), mask=cols < c)


@triton.jit
def _hpa_reduce_columns_kernel(part_ptr, energy_ptr, sums_ptr, c, blocks, GROUP: tl.constexpr):
    """Stage 2: per column, the block sums in index order (float64) -> col_energy; the tree over
    this program's GROUP columns of the d·w and w² totals -> sums[0 / 1, program]."""
    pid = tl.program_id(0)
    cols = _block_offsets(pid, GROUP)
    live = cols < c
    plane = blocks * c
    e = tl.zeros([GROUP], dtype=tl.float64)
    p = tl.zeros([GROUP], dtype=tl.float64)
    q = tl.zeros([GROUP], dtype=tl.float64)
    for block in range(blocks):
        at = part_ptr + block * c + cols
        e += tl.load(at, mask=live, other=0.0)
        p += tl.load(at + plane, mask=live, other=0.0)
        q += tl.load(at + 2 * plane, mask=live, other=0.0)
    tl.store(energy_ptr + cols, e, mask=live)
    at = sums_ptr + pid + tl.arange(0, 1)
    tl.store(at, _pairwise(tl.reshape(p, [GROUP, 1]), GROUP, 1))
    tl.store(at + tl.num_programs(0), _pairwise(tl.reshape(q, [GROUP, 1]), GROUP, 1))


@triton.jit
def _pairwise_groups_kernel(src_ptr, dst_ptr, n, GROUP: tl.constexpr):
    """Stage 3: the tree over each GROUP consecutive values of the two float64 rows src[0 / 1, :n]
    -> dst[0 / 1, program] (zero-padded; applied until one value is left)."""
    pid = tl.program_id(0)
    offs = _block_offsets(pid, GROUP)
    at = dst_ptr + pid + tl.arange(0, 1)
    for row in tl.static_range(2):
        x = tl.load(src_ptr + row * n + offs, mask=offs < n, other=0.0)
        tl.store(at + row * tl.num_programs(0), _pairwise(tl.reshape(x, [GROUP, 1]), GROUP, 1))


@triton.jit
def _hpa_apply_kernel(
    prev_ptr, new_ptr, out_ptr, mask_ptr, coef_ptr, coef: tl.float32, r, c, ps0, ps1, ns0, ns1, os0, os1,
    COEF_PTR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = _block_offsets(tl.program_id(0), BLOCK_R)
    cols = _block_offsets(tl.program_id(1), BLOCK_C)
    inside = (rows < r)[:, None] & (cols < c)[None, :]
    keep = tl.load(mask_ptr + cols, mask=cols < c, other=0) != 0
    if COEF_PTR:
        coef = tl.load(coef_ptr)
    w = tl.load(prev_ptr + rows[:, None] * ps0 + cols[None, :] * ps1, mask=inside, other=0.0)
    x = tl.load(new_ptr + rows[:, None] * ns0 + cols[None, :] * ns1, mask=inside, other=0.0)
    moved = _round_to(_to_f32(x) - coef * _to_f32(w), out_ptr.dtype.element_ty)
    result = tl.where(keep[None, :], w, moved)  # retained columns: W_prev's own bits
    tl.store(out_ptr + rows[:, None] * os0 + cols[None, :] * os1, result, mask=inside)


@triton.jit
def _online_pass1_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, mask_ptr, step_ptr, lr_ptr, scale_ptr, inf_ptr, lag_ptr,
    col_ptr, dot_ptr, norm_ptr, r, c, rows_per_chunk,
    lr: tl.float64, log_beta1: tl.float64, log_beta2: tl.float64, beta1: tl.float64, beta2: tl.float64,
    eps: tl.float64, weight_decay: tl.float64,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr, LR_PTR: tl.constexpr,
    LAGGED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """AdamW, retained columns reset to W_prev, column energies of the unconstrained update, and the
    free columns' ⟨ΔW, W_prev⟩, ‖W_prev‖² partials of the values written; LAGGED: the free columns
    get round(W_a − c_prev·W_prev), c_prev read from ``lag_ptr``."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = _block_offsets(pid_c, BLOCK_C)
    c_live = c
    if HAS_INF:
        c_live = tl.where(tl.load(inf_ptr) == 0.0, c, 0)  # GradScaler skip: nothing is written
    cmask = cols < c_live
    keep = (tl.load(mask_ptr + cols, mask=cols < c, other=0) != 0)[None, :]
    step_size, bc2_sqrt, decay, lerp_w, b2, one_minus_b2, eps = _adamw_consts(
        step_ptr, lr_ptr, lr, log_beta1, log_beta2, beta1, beta2, eps, weight_decay, LR_PTR
    )
    r0 = pid_r.to(tl.int64) * rows_per_chunk
    r1 = tl.minimum(r0 + rows_per_chunk, r)
    lag = 0.0
    if LAGGED:
        lag = tl.load(lag_ptr)
    energy = tl.zeros([BLOCK_C], dtype=tl.float32)
    dot = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    norm = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(r0, r1, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < r1)[:, None] & cmask[None, :]
        offs = rows[:, None] * c + cols[None, :]
        g = _load_grad(g_ptr, offs, mask, scale_ptr, HAS_SCALE, MAXIMIZE)
        before = _to_f32(tl.load(p_ptr + offs, mask=mask, other=0.0))
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        after, m, v = _adamw_math(before, g, m, v, step_size, bc2_sqrt, decay, lerp_w, b2, one_minus_b2, eps)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        u = tl.where(mask, after - before, 0.0)
        energy += tl.sum(u * u, axis=0)
        w_raw = tl.load(w_ptr + offs, mask=mask, other=0.0)
        w = _to_f32(w_raw)
        if LAGGED:
            after = after - lag * w
        moved = _round_to(after, p_ptr.dtype.element_ty)
        tl.store(p_ptr + offs, tl.where(keep, w_raw, moved), mask=mask)
        free = mask & (keep == 0)
        dot += tl.where(free, (_to_f32(moved) - w) * w, 0.0)
        norm += tl.where(free, w * w, 0.0)
    tl.store(col_ptr + pid_r.to(tl.int64) * c + cols, energy, mask=cols < c)
    pid = pid_r * tl.num_programs(0) + pid_c
    tl.store(dot_ptr + pid, tl.sum(tl.sum(dot, axis=1), axis=0))
    tl.store(norm_ptr + pid, tl.sum(tl.sum(norm, axis=1), axis=0))


@triton.jit
def _online_pass2_kernel(
    p_ptr, w_ptr, mask_ptr, coef_ptr, r, c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):  # fmt: skip
    rows = _block_offsets(tl.program_id(0), BLOCK_R)
    cols = _block_offsets(tl.program_id(1), BLOCK_C)
    free = tl.load(mask_ptr + cols, mask=cols < c, other=1) == 0
    inside = (rows < r)[:, None] & ((cols < c) & free)[None, :]
    coef = tl.load(coef_ptr)
    if coef != 0.0:  # c' = 0: nothing to write (as the other backends)
        offs = rows[:, None] * c + cols[None, :]
        p = tl.load(p_ptr + offs, mask=inside, other=0.0)
        w = _to_f32(tl.load(w_ptr + offs, mask=inside, other=0.0))
        tl.store(p_ptr + offs, _round_to(_to_f32(p) - coef * w, p_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------
# Host launchers (the ops of hpa_kernels.ops for this backend)


def _hyper(hyper: AdamWHyper, device: torch.device) -> tuple[Tensor | None, dict[str, Any]]:
    """The AdamW kernels' hyperparameter arguments: Python floats (fp64 kernel arguments, no
    device tensor is built per call) and, for a CUDA-tensor ``lr``, that tensor (read on the
    device, no host sync)."""
    lr, beta1, beta2 = hyper.lr, hyper.beta1, hyper.beta2
    lr_tensor = lr if isinstance(lr, Tensor) and lr.device.type == "cuda" else None
    args = {
        "lr": 0.0 if lr_tensor is not None else float(lr),
        "log_beta1": math.log(beta1) if beta1 > 0 else -math.inf,
        "log_beta2": math.log(beta2) if beta2 > 0 else -math.inf,
        "beta1": float(beta1),
        "beta2": float(beta2),
        "eps": float(hyper.eps),
        "weight_decay": float(hyper.weight_decay),
        "LR_PTR": lr_tensor is not None,
    }
    if lr_tensor is not None:
        lr_tensor = lr_tensor.detach().reshape(()).to(device=device, dtype=torch.float32)
    return lr_tensor, args


def _skip_flag(found_inf: Tensor | None, device: torch.device) -> Tensor | None:
    return None if found_inf is None else found_inf.detach().reshape(()).to(device) != 0


def adamw_step(tensors: AdamWTensors, hyper: AdamWHyper) -> None:
    """See ``hpa_kernels.ops.adamw_step``."""
    device = tensors.params[0].device
    with _on(device):
        _adamw_launch(tensors, device, hyper)


def _adamw_launch(tensors: AdamWTensors, device: torch.device, hyper: AdamWHyper) -> None:
    """The body of :func:`adamw_step`, on the tensors' device: one launch per storage dtype, then
    one ``torch._foreach_add_`` of the step counts (after the launches, which read them)."""
    staging = Staging()
    grad_scale, found_inf = hyper.grad_scale, hyper.found_inf
    lr_tensor, scalars = _hyper(hyper, device)
    scale_ptr = staging.scalar_tensor(grad_scale, device)
    inf_ptr = staging.scalar_tensor(found_inf, device)
    skip = _skip_flag(found_inf, device)
    groups: dict[torch.dtype, list[tuple[Tensor, ...]]] = {}
    steps = []
    for p, g, m, v, s in zip(*tensors):
        entry = staging.adamw(p, g, m, v, s)
        steps.append(entry[4])
        if p.numel() > 0:
            groups.setdefault(p.dtype, []).append(entry)
    for dtype, entries in groups.items():
        table, num_blocks = _adamw_table(entries, device)
        _adamw_kernel[(num_blocks,)](
            table, len(entries), entries[0][4] if lr_tensor is None else lr_tensor, scale_ptr, inf_ptr, **scalars,
            DTYPE=_TL_DTYPES[dtype], SEARCH_STEPS=max(1, math.ceil(math.log2(len(entries) + 1))),
            HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None, MAXIMIZE=bool(hyper.maximize),
            BLOCK=_ADAMW_BLOCK, **LAUNCH_OPTIONS,
        )  # fmt: skip
    torch._foreach_add_(steps, 1.0 if skip is None else (~skip).to(torch.float32))
    staging.finish()


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TABLES: dict[tuple, tuple[Tensor, int]] = {}  # the last few (device table, grid size), by the addresses held
_MAX_TABLES = 8


def _adamw_table(entries: list[tuple[Tensor, ...]], device: torch.device) -> tuple[Tensor, int]:
    """The device table one :func:`_adamw_kernel` launch reads, and its grid size: int64
    ``[p addresses, g, m, v, step addresses, numels, first blocks (n + 1)]`` of the n tensors.

    Kept by the addresses and sizes it holds, so a training loop whose tensors stay where they are
    (parameters, moments, step counts; the caching allocator's gradients) copies it to the device
    once, not every step; a new table goes through pinned memory without a host sync.
    """
    numels = [e[0].numel() for e in entries]
    addresses = [t.data_ptr() for column in zip(*entries) for t in column]
    key = (device, *addresses, *numels)
    cached = _TABLES.get(key)
    if cached is None:
        first = [0, *itertools.accumulate(triton.cdiv(n, _ADAMW_BLOCK) for n in numels)]
        host = torch.empty(len(addresses) + len(numels) + len(first), dtype=torch.int64)
        host.numpy()[:] = addresses + numels + first
        table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        cached = _TABLES[key] = (table, first[-1])
    return cached


def hpa_reduce(w_prev: Tensor, w_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """See ``hpa_kernels.ops.hpa_reduce`` (its fixed order, in four kinds of launch: block trees,
    column sums, column trees until one value is left, the final rounding)."""
    r, c = w_new.shape
    device = w_new.device
    f64 = {"dtype": torch.float64, "device": device}
    if r == 0 or c == 0:
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return torch.zeros(c, **f64), zero, zero.clone()
    if w_prev.dtype != w_new.dtype:
        w_prev = w_prev.to(w_new.dtype)
    with _on(device):
        blocks, tiles = triton.cdiv(r, ROW_BLOCK), triton.cdiv(c, _REDUCE_COLS)
        partials = torch.empty(3, blocks, c, **f64)
        _hpa_reduce_blocks_kernel[(tiles * blocks,)](
            w_prev, w_new, partials, r, c, *w_prev.stride(), *w_new.stride(), tiles, blocks,
            ROWS=ROW_BLOCK, BLOCK_C=_REDUCE_COLS, **LAUNCH_OPTIONS,
        )  # fmt: skip
        col_energy = torch.empty(c, **f64)
        groups = triton.cdiv(c, _GROUP)
        sums = torch.empty(2, groups, **f64)
        _hpa_reduce_columns_kernel[(groups,)](partials, col_energy, sums, c, blocks, GROUP=_GROUP, **LAUNCH_OPTIONS)
        while groups > 1:
            n, groups = groups, triton.cdiv(groups, _GROUP)
            src, sums = sums, torch.empty(2, groups, **f64)
            _pairwise_groups_kernel[(groups,)](src, sums, n, GROUP=_GROUP, **LAUNCH_OPTIONS)
        totals = sums.reshape(2).to(torch.float32)
    return col_energy, totals[0], totals[1]


def hpa_apply(w_prev: Tensor, w_new: Tensor, mask: Tensor, coef: float | Tensor, out: Tensor | None = None) -> Tensor:
    """See ``hpa_kernels.ops.hpa_apply``."""
    r, c = w_new.shape
    device = w_new.device
    if w_prev.dtype != w_new.dtype:
        w_prev = w_prev.to(w_new.dtype)
    if out is None:
        out = torch.empty(r, c, dtype=w_new.dtype, device=device)
    if r == 0 or c == 0:
        return out
    with _on(device):
        coef_t = coef.detach().reshape(()).to(device=device, dtype=torch.float32) if isinstance(coef, Tensor) else None
        mask_u8 = mask.to(device).contiguous().view(torch.uint8)
        grid = (triton.cdiv(r, _TILE_R), triton.cdiv(c, _TILE_C))
        _hpa_apply_kernel[grid](
            w_prev, w_new, out, mask_u8, out if coef_t is None else coef_t, 0.0 if coef_t is not None else float(coef),
            r, c, *w_prev.stride(), *w_new.stride(), *out.stride(),
            COEF_PTR=coef_t is not None, BLOCK_R=_TILE_R, BLOCK_C=_TILE_C, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return out


def online_step(tensors: OnlineTensors, hyper: AdamWHyper, projection: OnlineProjection) -> Tensor:
    """See ``hpa_kernels.ops.online_step``."""
    device = tensors.param.device
    r, c = tensors.param.shape
    skip = _skip_flag(hyper.found_inf, device)
    if r == 0 or c == 0:
        return schema.empty_online_step(tensors.state_step, hyper, projection, device)
    with _on(device):
        return _online_launch(tensors, device, skip, hyper, projection)


def _online_launch(
    tensors: OnlineTensors, device: torch.device, skip: Tensor | None, hyper: AdamWHyper, projection: OnlineProjection
) -> Tensor:
    """The body of :func:`online_step`, on the tensors' device: pass 1, the sums, and the exact
    projection's pass 2."""
    r, c = tensors.param.shape
    f32 = {"dtype": torch.float32, "device": device}
    staging = Staging()
    p_, g_, m_, v_, s_, w_, mask_u8, col_energy = staging.online(tensors)
    chunks, tiles = triton.cdiv(r, _ONLINE_CHUNK_ROWS), triton.cdiv(c, _TILE_C)
    cols = torch.empty(chunks, c, **f32)
    dots, norms = torch.empty(chunks * tiles, **f32), torch.empty(chunks * tiles, **f32)
    grad_scale, found_inf = hyper.grad_scale, hyper.found_inf
    lr_tensor, scalars = _hyper(hyper, device)
    lag = staging.scalar_tensor(torch.as_tensor(projection.coef) if projection.lagged else None, device)
    _online_pass1_kernel[(tiles, chunks)](
        p_, g_, m_, v_, w_, mask_u8, s_, s_ if lr_tensor is None else lr_tensor,
        staging.scalar_tensor(grad_scale, device), staging.scalar_tensor(found_inf, device), lag,
        cols, dots, norms, r, c, _ONLINE_CHUNK_ROWS, **scalars,
        HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None, MAXIMIZE=bool(hyper.maximize),
        LAGGED=projection.lagged, BLOCK_R=_TILE_R, BLOCK_C=_TILE_C, **LAUNCH_OPTIONS,
    )  # fmt: skip
    energy = (col_energy.double() + cols.double().sum(dim=0)).float()
    dot, norm_sq = dots.double().sum(), norms.double().sum()
    coef = torch.where(norm_sq > 0, dot / norm_sq.clamp_min(torch.finfo(torch.float64).tiny), 0.0).float()
    if not projection.orthogonal:
        coef = torch.zeros((), **f32)
    if skip is not None:
        energy = torch.where(skip, col_energy, energy)
        coef = torch.where(skip, lag.reshape(()), coef)  # lag: c_prev (lagged), else 0
    col_energy.copy_(energy)
    s_.add_(1.0 if skip is None else (~skip).to(torch.float32))
    if projection.exact:
        grid = (triton.cdiv(r, _TILE_R), triton.cdiv(c, _TILE_C))
        _online_pass2_kernel[grid](p_, w_, mask_u8, coef, r, c, BLOCK_R=_TILE_R, BLOCK_C=_TILE_C, **LAUNCH_OPTIONS)
    staging.finish()
    return coef


register(Kernels("triton", adamw_step, hpa_reduce, hpa_apply, online_step, schema.online_steps_by_layer(online_step)))
