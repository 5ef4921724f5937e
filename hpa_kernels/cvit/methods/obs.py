"""Optimal Brain Surgeon (OBS) updates of a linear layer, shared by the post-hoc methods that
revert part of a task's update and compensate the rest (:mod:`.safe_delta`, :mod:`.model_tailor`).

Sources: B. Hassibi, D. G. Stork, "Second order derivatives for network pruning: Optimal Brain
Surgeon", NeurIPS 1992 (the update); E. Frantar, D. Alistarh, "SparseGPT: Massive Language Models
Can Be Accurately Pruned in One-Shot", ICML 2023, arXiv:2301.00774, Algorithm 1 (its sequential,
column-by-column form through the Cholesky factor of H⁻¹, which both methods' official code adapts:
ColinLu50/SafeDelta ``llama2/safedelta/safedelta_runner.py``, didizhu-zju/Model-Tailor
``llava/train/sparsegpt.py``).

Layer-wise quadratic model. A linear layer whose rows w (c,) read inputs x with H = (2/n)·Σ xxᵀ
(:meth:`~.base.TaskContext.hessians`) changes its output on those inputs, about a reference row
w°, by the loss L(w) = ½ (w − w°)ᵀ H (w − w°). Constraining one entry q to a value t with every other
entry free is OBS's update

    δw = −(w_q − t) / [H⁻¹]_qq · H⁻¹[:, q],        ΔL = (w_q − t)² / (2 [H⁻¹]_qq).

Sequential form (SparseGPT): with U upper triangular, Uᵀ U = (H + λI)⁻¹, the columns are visited in
order j = 0 … c − 1; at column j the columns < j are frozen, so [H_{≥j}⁻¹]_jk = U_jj U_jk, and an
entry of the fixed set F (one set per row) is moved to its target while the later columns absorb it:

    e_j = [j ∈ F] · (w_j − t_j) / U_jj,    w_k ← w_k − e_j U_jk  (k > j),    w_j ← t_j  (j ∈ F).

Entries outside F keep their reference value plus what earlier fixed entries of their row sent
them. λ = damping · mean(diag H), the damping of :func:`hpa_kernels.functional.hinv_diagonal`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...functional import damped_cholesky
from ...layers import ManagedLayer

SUB_BLOCK = 64
"""Columns updated by rank-1 steps before the rest of the layer gets one matrix product (SparseGPT's
lazy batch); a speed setting, the result is the same for any width."""

Selection = Callable[[Tensor, slice], Tensor]
"""``select(w_block, columns) -> fixed``: the fixed set of a block of columns, chosen from the block's
current weights ``w_block`` (r, n) float64, read-only (what earlier blocks' fixed entries sent them
included)."""


def hinv_cholesky(H: Tensor, damping: float = 0.01) -> Tensor:
    """U, upper triangular with positive diagonal, Uᵀ U = (H + λI)⁻¹, λ = damping · mean(diag H).

    The factor SparseGPT computes as ``cholesky(cholesky_inverse(cholesky(H + λI)), upper=True)``,
    here with one Cholesky factorisation and one triangular inverse: with P the reversal of the
    columns, P (H + λI) P = L Lᵀ gives H + λI = R Rᵀ with R = P L P upper, so U = R⁻¹ = P L⁻¹ P.
    Damping and its retries are those of :func:`hpa_kernels.functional.hinv_diagonal`: if the
    factorisation fails, λ is multiplied by 10, up to five times. ``U[j, j]²`` is [H_{≥j}⁻¹]_jj, the
    OBS denominator of column j once the columns before it are frozen.

    Args:
        H: (c, c) symmetric positive semi-definite, any float dtype.
        damping: relative damping, a finite number > 0.

    Returns:
        (c, c) float64 on ``H``'s device.

    Raises:
        ValueError: H not square, non-finite, with mean(diag H) ≤ 0 (the layer saw no signal), not
            factorable with 10⁵× the damping, or a damping that is not a finite positive number.
    """
    chol, eye, _ = damped_cholesky(H, damping, "hinv_cholesky", flip=True)
    if H.shape[0] == 0:
        return chol
    return torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)


@torch.no_grad()
def obs_update(
    weight: Tensor, target: Tensor, hinv_factor: Tensor, fixed: Tensor | Selection, *, block_size: int
) -> Tensor:
    """The sequential OBS update (module doc): the fixed entries moved to ``target``, the others
    compensated, column by column.

    The columns are taken in blocks of ``block_size``; the fixed set of a block is either read from
    a mask or chosen by ``fixed(w_block, columns)`` once every earlier block is done, from the
    block's current weights (both official codes choose their mask this way, block by block).
    Columns without a fixed entry are skipped (their e_j is 0).

    Args:
        weight: (r, c) the reference weight w° (its rows are the rows w of the module doc).
        target: (r, c) the values the fixed entries take.
        hinv_factor: (c, c) U of :func:`hinv_cholesky` for the layer's H.
        fixed: (r, c) bool mask of the fixed entries, or a :data:`Selection` returning the (r, n)
            bool mask of each block.
        block_size: columns per block, ≥ 1.

    Returns:
        (r, c) float32 on ``weight``'s device; the fixed entries equal ``target`` exactly (in float32).

    Raises:
        ValueError: shapes that do not match, ``block_size < 1``, or a mask that is not bool of the
            block's shape.
    """
    if weight.dim() != 2 or target.shape != weight.shape:
        raise ValueError(
            f"obs_update needs a 2-D weight and a target of its shape, got {tuple(weight.shape)} and "
            f"{tuple(target.shape)}"
        )
    rows, columns = weight.shape
    if hinv_factor.shape != (columns, columns):
        raise ValueError(f"obs_update: hinv_factor must be ({columns}, {columns}), got {tuple(hinv_factor.shape)}")
    if block_size < 1:
        raise ValueError(f"obs_update needs block_size >= 1, got {block_size}")
    device = weight.device
    # Columns as rows (c, r): each column step touches contiguous memory.
    w = weight.to(torch.float64).T.contiguous()
    t = target.to(device=device, dtype=torch.float64).T.contiguous()
    u = hinv_factor.to(device=device, dtype=torch.float64)
    inv_diag = 1.0 / u.diagonal()
    for b1 in range(0, columns, block_size):
        b2 = min(b1 + block_size, columns)
        block = fixed(w[b1:b2].T, slice(b1, b2)) if callable(fixed) else fixed[:, b1:b2]
        if block.dtype != torch.bool or tuple(block.shape) != (rows, b2 - b1):
            raise ValueError(
                f"obs_update: the fixed mask of columns {b1}:{b2} must be bool of shape {(rows, b2 - b1)}, "
                f"got {block.dtype} {tuple(block.shape)}"
            )
        mask = block.to(device).T.contiguous()
        for a1 in range(b1, b2, SUB_BLOCK):
            a2 = min(a1 + SUB_BLOCK, b2)
            active = mask[a1 - b1 : a2 - b1].any(dim=1).nonzero().flatten().tolist()
            if not active:
                continue
            err = torch.zeros(a2 - a1, rows, dtype=torch.float64, device=device)
            for j in active:
                col = a1 + j
                e = err[j]
                torch.sub(w[col], t[col], out=e)
                e.mul_(mask[col - b1]).mul_(inv_diag[col])
                if col + 1 < a2:
                    w[col + 1 : a2].addr_(u[col, col + 1 : a2], e, alpha=-1.0)
            if a2 < columns:
                w[a2:].addmm_(u[a1:a2, a2:].T, err, alpha=-1.0)
        w[b1:b2] = torch.where(mask, t[b1:b2], w[b1:b2])
    return w.T.to(torch.float32)


def group_by_input(hessians: dict[str, Tensor]) -> list[tuple[list[str], Tensor]]:
    """The layers of ``hessians`` grouped by equal H, one tensor kept per group.

    Layers that read one input (q, k, v; gate, up) get bitwise-equal H from the
    :class:`~hpa_kernels.HessianCollector`; keeping one copy each (and one factor later) saves the
    memory and the factorisations of the duplicates.

    Args:
        hessians: ``{layer name: (c, c) H}`` in the layers' order.

    Returns:
        ``[(names, H)]``, groups in order of their first layer, names in the given order.
    """
    groups: list[tuple[list[str], Tensor]] = []
    for name, hessian in hessians.items():
        for names, shared in groups:
            if (
                shared.shape == hessian.shape
                and torch.equal(shared.diagonal(), hessian.diagonal())
                and torch.equal(shared, hessian)
            ):
                names.append(name)
                break
        else:
            groups.append(([name], hessian))
    return groups


Rule = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``rule(w_prev, w_new, U) -> (w, kept)``: one layer's edit, weights (out, in), U of its H."""


@torch.no_grad()
def edit_layers(
    layers: dict[str, ManagedLayer],
    w_prev: dict[str, Tensor],
    w_new: dict[str, Tensor],
    groups: list[tuple[list[str], Tensor]],
    damping: float,
    rule: Rule,
) -> float:
    """Apply ``rule`` to every managed layer, one :func:`hinv_cholesky` factor per group of
    :func:`group_by_input`, and write the result into ``layer.module.weight`` in place.

    Weights stored (in, out) (``Conv1D``) are transposed to (out, in) for the rule and back.

    Args:
        layers: the task's managed layers, by name.
        w_prev, w_new: each layer's dense weight before and after the task, as stored by the module.
        groups: :func:`group_by_input` of the H the rule needs, covering exactly ``layers``.
        damping: λ / mean(diag H) of :func:`hinv_cholesky`.
        rule: the method's per-layer edit.

    Returns:
        The share of all entries the rule kept (its ``kept`` masks summed over the layers).

    Raises:
        ValueError: ``groups`` does not name exactly the managed layers, or a layer's H cannot be
            factored (the layer is named).
    """
    grouped = [name for names, _ in groups for name in names]
    if sorted(grouped) != sorted(layers):
        missing, extra = sorted(set(layers) - set(grouped)), sorted(set(grouped) - set(layers))
        raise ValueError(f"edit_layers: no H for managed layers {missing}, H for unknown layers {extra}")
    kept = total = 0
    for names, hessian in groups:
        try:
            factor = hinv_cholesky(hessian, damping)
        except ValueError as error:
            raise ValueError(f"layer {names[0]!r}: {error}") from error
        for name in names:
            layer = layers[name]
            prev, new = w_prev[name].to(factor.device), w_new[name].to(factor.device)
            if layer.transposed:
                prev, new = prev.T, new.T
            edited, mask = rule(prev, new, factor)
            weight = layer.module.weight
            weight.copy_(edited.T if layer.transposed else edited)
            kept += int(mask.sum())
            total += mask.numel()
    return kept / total if total else 0.0
