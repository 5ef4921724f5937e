"""Plain PyTorch backend (``"torch"``): the ground truth every other backend is tested against.

Written as simple loops: clear, not fast. Math is fp32 whatever the storage dtype (AdamW) and
fp64 for the HPA reductions, rounded once at the end. Given float64 tensors, every op computes in
float64: the tests' ground truth is this module on float64 copies (registered with
``float64=True``, so :mod:`hpa_kernels.ops.schema` lets float64 through for this backend only).
Runs on any device. The arguments passed :mod:`hpa_kernels.ops.schema`.

Named ``torch_ref``, not ``torch``: a submodule ``torch`` would rebind the name ``torch`` in
:mod:`hpa_kernels.ops` (the import system sets each submodule as an attribute of its package).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import schema
from .schema import ROW_BLOCK, AdamWHyper, AdamWTensors, Kernels, OnlineProjection, OnlineTensors, register


def _math_dtype(t: Tensor) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 storage, fp64 for fp64 (the tests' ground truth)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def adamw_step(tensors: AdamWTensors, hyper: AdamWHyper) -> None:
    """AdamW (Loshchilov & Hutter), the update of ``torch.optim.AdamW``, one tensor at a time.

    See ``hpa_kernels.ops.adamw_step`` for the contract.
    """
    if hyper.found_inf is not None and bool(hyper.found_inf.item()):
        return
    lr_value, beta1, beta2 = float(hyper.lr), hyper.beta1, hyper.beta2
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(*tensors):
        if param.numel() == 0:
            step_t += 1
            continue
        math_dtype = _math_dtype(param)
        g = grad.to(math_dtype)
        if hyper.grad_scale is not None:
            g = g / hyper.grad_scale.to(math_dtype)
        if hyper.maximize:
            g = -g
        p = param.to(math_dtype)
        step_t += 1
        step = float(step_t.item())
        p.mul_(1.0 - lr_value * hyper.weight_decay)
        exp_avg.lerp_(g, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        step_size = lr_value / bias_correction1
        denom = (exp_avg_sq.sqrt() / (bias_correction2**0.5)).add_(hyper.eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
        param.copy_(p)


_CHUNK_BLOCKS = 64  # row blocks the reference widens to float64 at a time (bounds its memory)


def pairwise_sum(x: Tensor, dim: int) -> Tensor:
    """Sum along ``dim`` by the adjacent-pair binary tree, ``x`` zero-padded to a power of two.

    Level by level, element ``t`` of the next level is ``x[2t] + x[2t + 1]``: each addition is one
    IEEE operation between two values, so the result is defined bit for bit (zero padding adds
    nothing). The order of ``hpa_kernels.ops.hpa_reduce`` within a row block and across columns.
    """
    n = x.shape[dim]
    size = 1 << max(0, (n - 1).bit_length())
    if size != n:
        pad = list(x.shape)
        pad[dim] = size - n
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    while x.shape[dim] > 1:
        pairs = x.unflatten(dim, (-1, 2))
        x = pairs.select(dim + 1, 0) + pairs.select(dim + 1, 1)
    return x.squeeze(dim)


def hpa_reduce(w_prev: Tensor, w_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """HPA_SPEC.md Step 1's column energies and Step 3's Frobenius sums, in the fixed float64 order
    of ``hpa_kernels.ops.hpa_reduce`` (every backend gives these bits).

    See ``hpa_kernels.ops.hpa_reduce`` for the contract.
    """
    rows, columns = w_prev.shape
    totals = torch.zeros(3, columns, dtype=torch.float64, device=w_prev.device)
    chunk = ROW_BLOCK * _CHUNK_BLOCKS
    for start in range(0, rows, chunk):
        prev = w_prev[start : start + chunk].double()
        delta = w_new[start : start + chunk].double() - prev
        terms = torch.stack([delta * delta, delta * prev, prev * prev])  # (3, rows of the chunk, c)
        blocks = -(-terms.shape[1] // ROW_BLOCK)
        padded = terms.new_zeros(3, blocks * ROW_BLOCK, columns)
        padded[:, : terms.shape[1]] = terms
        partials = pairwise_sum(padded.view(3, blocks, ROW_BLOCK, columns), dim=2)  # (3, blocks, c)
        for block in range(blocks):  # block partials in index order
            totals = totals + partials[:, block]
    dot = pairwise_sum(totals[1], dim=0)
    norm_sq = pairwise_sum(totals[2], dim=0)
    return totals[0].clone(), dot.float(), norm_sq.float()


def hpa_apply(w_prev: Tensor, w_new: Tensor, mask: Tensor, coef: float | Tensor, out: Tensor | None = None) -> Tensor:
    """HPA_SPEC.md Step 3's write, Ŵ = M ⊙ W_prev + (1 − M) ⊙ (W_new − coef·W_prev).

    See ``hpa_kernels.ops.hpa_apply`` for the contract.
    """
    coef_value = float(coef)
    compute = _math_dtype(w_new)
    adjusted = (w_new.to(compute) - coef_value * w_prev.to(compute)).to(w_new.dtype)
    result = torch.where(mask.view(1, -1), w_prev.to(w_new.dtype), adjusted)
    if out is None:
        return result
    out.copy_(result)
    return out


def online_step(t: OnlineTensors, hyper: AdamWHyper, projection: OnlineProjection) -> Tensor:
    """The online HPA step, written as its passes (see ``hpa_kernels.ops.online_step``).

    The first pass stores the AdamW result rounded to the parameter's dtype (lagged: of
    W_a − c_prev·W_prev; W_prev on retained columns) and sums ⟨ΔW, W_prev⟩, ‖W_prev‖² over the
    free columns of what it stored; the exact mode's second pass subtracts c'·W_prev from the
    free columns of that stored result.
    """
    param, col_energy = t.param, t.col_energy
    f32 = {"dtype": torch.float32, "device": param.device}
    lag = float(projection.coef) if projection.lagged else 0.0
    if hyper.found_inf is not None and bool(hyper.found_inf.item()):
        return torch.tensor(lag, **f32)
    math_dtype = _math_dtype(param)
    before = param.to(math_dtype, copy=True)
    after = before.clone()
    adamw_step(AdamWTensors([after], [t.grad], [t.exp_avg], [t.exp_avg_sq], [t.state_step]), hyper)
    if param.numel() == 0:
        return torch.zeros((), **f32)
    col_energy += (after - before).square().sum(dim=0).to(col_energy.dtype)
    keep = t.mask.view(1, -1)
    prev = t.w_prev.to(param.dtype)
    if projection.lagged:
        after = after - lag * prev.to(math_dtype)
    stored = torch.where(keep, prev, after.to(param.dtype))
    coef = 0.0
    if projection.orthogonal:
        w = prev.double()
        free = (~keep).double()
        norm_sq = (w.square() * free).sum().item()
        dot = ((stored.double() - w) * w * free).sum().item()
        coef = dot / norm_sq if norm_sq > 0.0 else 0.0
    if projection.exact and coef != 0.0:
        projected = (stored.to(math_dtype) - coef * prev.to(math_dtype)).to(param.dtype)
        stored = torch.where(keep, stored, projected)
    param.copy_(stored)
    return torch.tensor(coef, **f32)


register(
    Kernels(
        "torch", adamw_step, hpa_reduce, hpa_apply, online_step, schema.online_steps_by_layer(online_step), float64=True
    )
)
