"""Model Tailor (hpa_kernels/cvit/methods/model_tailor.py): the patch selection and the decorator on
hand-worked cases, a port of the official code on odd shapes, and the after_merge hook on a tiny
Llama (the OBS machinery itself is tested in test_cvit_methods_safe_delta.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_decoder
from test_cvit_methods_safe_delta import TASK, U2, _random_h, char_batches, fine_tune, task_context

from hpa_kernels.cvit.methods.base import input_hessians
from hpa_kernels.cvit.methods.model_tailor import (
    BLOCK_SIZE,
    KEEP_RATIO,
    SALIENCE_WEIGHT,
    ModelTailor,
    model_tailor_selection,
    model_tailor_update,
)
from hpa_kernels.cvit.methods.obs import hinv_cholesky

# One row, four entries: θ_pre = (−2, 3, 0, 0), θ_ft = (0.5, 3.1, 0.2, 0.1).
# Entry 0 moved most (S = |Δθ| = 2.5), entry 1 is the largest weight (E = θ² = 9.61, d² = 1).
# z(S) = (1.499, −0.528, −0.443, −0.528) (mean 0.725, std 1.184),
# z(E) = (−0.468, 1.500, −0.513, −0.519) (mean 2.4775, std 4.756).
# Fused 0.8·z(S) + 0.2·z(E) = (1.105, −0.122, −0.457, −0.526): entry 0 leads; z(E) alone: entry 1.
PRE = torch.tensor([[-2.0, 3.0, 0.0, 0.0]])
FT = torch.tensor([[0.5, 3.1, 0.2, 0.1]])


def test_patch_by_hand():
    salience, sensitivity = (FT - PRE).abs(), FT.square()
    # p = 0.25 of 4 entries: a patch of 1.
    assert model_tailor_selection(salience, sensitivity, keep_ratio=0.25).tolist() == [[True, False, False, False]]
    assert model_tailor_selection(salience, sensitivity, keep_ratio=0.25, salience_weight=0.0).tolist() == [
        [False, True, False, False]
    ]
    # With U = I there is no coupling: the patch keeps θ_ft, the rest is θ_pre.
    w, kept = model_tailor_update(PRE, FT, torch.eye(4), keep_ratio=0.25)
    assert kept.tolist() == [[True, False, False, False]]
    torch.testing.assert_close(w, torch.tensor([[0.5, 3.0, 0.0, 0.0]]))
    w, _ = model_tailor_update(PRE, FT, torch.eye(4), keep_ratio=0.25, salience_weight=0.0)
    torch.testing.assert_close(w, torch.tensor([[-2.0, 3.1, 0.0, 0.0]]))


def test_decorator_by_hand():
    # θ_pre = (0, 0), θ_ft = (1, 1), H = [[2, 1], [1, 2]]: d² = (2/3, 1/2). Equal saliences (std 0:
    # z = 0), E = (1.5, 2): the patch (⌊0.5 · 2⌋ = 1 entry) is entry 1; entry 0 reverts to 0 and the
    # patch absorbs it: w_1 = 1 − (1 − 0)·[H⁻¹]_01/[H⁻¹]_00 = 1.5, the point nearest θ_ft's outputs
    # ((−1, x) H (−1, x)ᵀ = 2 − 2x + 2x² is smallest at x = 0.5).
    w, kept = model_tailor_update(torch.zeros(1, 2), torch.ones(1, 2), U2, keep_ratio=0.5)
    assert kept.tolist() == [[False, True]]
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.5]]))


def test_patch_size_is_the_floor_of_p_times_the_block():
    # 7 × 13 = 91 entries per block: ⌊0.1 · 91⌋ = 9 (the official index ⌊0.9 · 91⌋ = 81 keeps 9 too;
    # of 90 entries it would keep 8, here 9);
    # a last block of 7 × 3 = 21 entries keeps 2; a block under 10 entries keeps none.
    generator = torch.Generator().manual_seed(0)
    w_pre, w_ft = torch.randn(7, 16, generator=generator), torch.randn(7, 16, generator=generator)
    _, kept = model_tailor_update(w_pre, w_ft, hinv_cholesky(_random_h(16, 1)), block_size=13)
    assert kept[:, :13].sum() == 9 and kept[:, 13:].sum() == 2
    _, kept = model_tailor_update(w_pre[:3, :3], w_ft[:3, :3], torch.eye(3))
    assert kept.sum() == 0


def _official_fasterprune(w_ft, w_pre, u, keep_ratio, weight, blocksize):
    """``SparseGPT.fasterprune`` of didizhu-zju/Model-Tailor (``llava/train/sparsegpt.py``) with the
    module's decisions: the OBS sign (``-=``, the code ``+=``), the threshold at index
    n − ⌊p·n⌋ − 1 (the code ⌊0.9·n⌋), z = 0 for a row of std 0 or a single column."""

    def z(x):
        if x.shape[1] < 2:
            return torch.zeros_like(x)
        std = x.std(dim=1, keepdim=True)
        return torch.where(std > 0, (x - x.mean(dim=1, keepdim=True)) / std, torch.zeros_like(x))

    W, pretrain = w_ft.double().clone(), w_pre.double()
    param_changes = torch.abs(W - pretrain)
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), u[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        importance = weight * z(param_changes[:, i1:i2]) + (1 - weight) * z(tmp)
        n = importance.numel()
        thresh = torch.sort(importance.flatten())[0][n - int(keep_ratio * n) - 1]
        mask1 = importance <= thresh
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = pretrain[:, i1 + i][mask1[:, i]]
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ u[i1:i2, i2:]
    return W


@pytest.mark.parametrize(("rows", "c", "block"), [(17, 33, 5), (33, 17, 128), (2, 130, 64), (40, 9, 4)])
def test_model_tailor_is_the_official_rule(rows, c, block):
    generator = torch.Generator().manual_seed(rows * c)
    u = hinv_cholesky(_random_h(c, seed=c))
    w_pre = torch.randn(rows, c, generator=generator)
    w_ft = w_pre + 0.3 * torch.randn(rows, c, generator=generator)
    w, kept = model_tailor_update(w_pre, w_ft, u, block_size=block)
    torch.testing.assert_close(w.double(), _official_fasterprune(w_ft, w_pre, u, 0.1, 0.8, block), rtol=1e-5, atol=1e-5)
    assert torch.equal(w[~kept], w_pre[~kept])
    assert 0 < kept.sum() <= 0.1 * rows * c
    assert not torch.equal(w[kept], w_ft[kept])  # the decorator moved the patch


def test_defaults_are_the_official_codes():
    assert (KEEP_RATIO, SALIENCE_WEIGHT, BLOCK_SIZE) == (0.1, 0.8, 128)
    method = ModelTailor()
    assert method.name == "model-tailor" and not method.hpa.enabled
    assert method.describe() == {
        "keep_ratio": 0.1, "salience_weight": 0.8, "block_size": 128, "damping": 0.01, "kept_share": [],
    }  # fmt: skip


@pytest.mark.parametrize(
    "settings", [{"keep_ratio": 1.0}, {"keep_ratio": -0.1}, {"salience_weight": 1.5}, {"block_size": 0}]
)
def test_invalid_settings_raise(settings):
    with pytest.raises(ValueError):
        ModelTailor(**settings)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="scores"):
        model_tailor_selection(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="shape"):
        model_tailor_update(torch.zeros(2, 3), torch.zeros(3, 2), torch.eye(3))


def test_after_merge_edits_every_layer_with_the_task_h_after_the_task():
    model = tiny_decoder()
    task = task_context(model)
    fine_tune(task)
    task_h = input_hessians(model, task.layers, char_batches(TASK))  # on the merged weights
    method = ModelTailor()
    method.after_merge(task)
    kept = total = 0
    for name, layer in task.layers.items():
        expected, mask = model_tailor_update(task.w_prev[name], task.w_new[name], hinv_cholesky(task_h[name], 0.01))
        weight = layer.module.weight.detach()
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-7)
        assert torch.equal(weight[~mask], task.w_prev[name][~mask])
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert 0.09 * total < kept <= 0.1 * total
    assert method.describe()["kept_share"] == [pytest.approx(kept / total)]
