"""Safe Delta (hpa_kernels/cvit/methods/safe_delta.py) and the OBS machinery it shares with Model
Tailor (hpa_kernels/cvit/methods/obs.py): hand-worked cases, a literal port of the official code on
odd shapes, and the begin_task / after_merge hooks on a tiny Llama."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import tiny_decoder
from transformers.pytorch_utils import Conv1D

from hpa_kernels.cvit.methods.base import TaskContext, dense_weights, input_hessians
from hpa_kernels.cvit.methods.obs import edit_layers, group_by_input, hinv_cholesky, obs_update
from hpa_kernels.cvit.methods.safe_delta import (
    BLOCK_SIZE,
    EXCLUDED_SHARE,
    REFERENCE_SIZE,
    SCALE,
    SafeDelta,
    safe_delta_selection,
    safe_delta_update,
)
from hpa_kernels.cvit.model import ChatModel
from hpa_kernels.layers import ManagedLayer, find_hpa_layers

# H = [[2, 1], [1, 2]]: H⁻¹ = (1/3)·[[2, −1], [−1, 2]]. Its factor U (Uᵀ U = H⁻¹, upper):
# U_00² = [H⁻¹]_00 = 2/3, U_01 = [H⁻¹]_01 / U_00 = −(1/3)/√(2/3), U_11² = 1 / H_11 = 1/2
# (the last column's [H_{≥1}⁻¹]_11 once column 0 is frozen).
H2 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
U2 = torch.linalg.cholesky(torch.linalg.inv(H2), upper=True)


def _random_h(c: int, seed: int, tokens: int | None = None) -> torch.Tensor:
    x = torch.randn(tokens or 2 * c, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 2.0 / x.shape[0] * x.T @ x


def _damped(h: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    return h + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


# --- obs.py -----------------------------------------------------------------------------------


def test_hinv_cholesky_by_hand():
    # λ = 0.01 · mean(2, 2) = 0.02: H + λI = [[2.02, 1], [1, 2.02]], det = 2.02² − 1 = 3.0804.
    u = hinv_cholesky(H2.float(), damping=0.01)
    assert u.dtype == torch.float64
    u00 = (2.02 / 3.0804) ** 0.5
    expected = torch.tensor([[u00, -1.0 / 3.0804 / u00], [0.0, 1.0 / 2.02**0.5]], dtype=torch.float64)
    torch.testing.assert_close(u, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("c", "tokens"), [(1, 3), (17, 40), (33, 5)])
def test_hinv_cholesky_is_sparsegpts_factor(c, tokens):
    # SparseGPT: cholesky(cholesky_inverse(cholesky(H + λI)), upper=True); 33 columns from 5 tokens
    # is rank-deficient, made definite by the damping.
    h = _random_h(c, seed=c, tokens=tokens)
    u = hinv_cholesky(h)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(_damped(h))), upper=True)
    torch.testing.assert_close(u, reference, rtol=1e-9, atol=1e-9)
    assert torch.equal(u, u.triu()) and (u.diagonal() > 0).all()


def test_hinv_cholesky_with_a_dead_input_feature():
    # A column that never saw a non-zero input: H_jj = 0, [(H + λI)⁻¹]_jj = 1/λ (λ = 0.01 · 6/3).
    h = torch.tensor([[4.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]], dtype=torch.float64)
    u = hinv_cholesky(h)
    torch.testing.assert_close((u.T @ u)[1, 1], torch.tensor(1.0 / 0.02, dtype=torch.float64))


@pytest.mark.parametrize(
    ("h", "damping", "match"),
    [
        (torch.zeros(2, 3), 0.01, "square"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 0.01, "NaN"),
        (torch.zeros(2, 2), 0.01, "no non-zero input"),
        (torch.eye(2), 0.0, "damping"),
        (-torch.eye(2) * 1e6 + torch.ones(2, 2) * 1e6 + torch.eye(2) * 1e-3, 0.01, "not positive definite"),
    ],
)
def test_hinv_cholesky_rejects(h, damping, match):
    with pytest.raises(ValueError, match=match):
        hinv_cholesky(h, damping)


def test_obs_update_by_hand():
    # Row w° = (1, 1), entry 0 fixed at 0: e_0 = (1 − 0) / U_00, w_1 ← 1 − e_0 U_01
    # = 1 − [H⁻¹]_01 / [H⁻¹]_00 = 1 + 1/2 = 1.5, the minimiser of (w − w°)ᵀ H (w − w°) with w_0 = 0
    # (2·1 − 2·x + 2·x², x = w_1 − 1, is smallest at x = 1/2).
    out = obs_update(torch.ones(1, 2), torch.zeros(1, 2), U2, torch.tensor([[True, False]]), block_size=2)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.5]]))
    # Fixing the last column instead: the columns before it are frozen, nothing compensates.
    out = obs_update(torch.ones(1, 2), torch.zeros(1, 2), U2, torch.tensor([[False, True]]), block_size=2)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0]]))


def test_one_fixed_entry_is_the_obs_formula():
    # δw = −(w_q − t) / [H⁻¹]_qq · H⁻¹[:, q] for q the first column (nothing frozen before it).
    h = _damped(_random_h(9, seed=3))
    hinv = torch.linalg.inv(h)
    u = torch.linalg.cholesky(hinv, upper=True)
    w0 = torch.randn(1, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fixed = torch.zeros(1, 9, dtype=torch.bool)
    fixed[0, 0] = True
    out = obs_update(w0, torch.zeros(1, 9), u, fixed, block_size=4)
    expected = w0[0] - w0[0, 0] / hinv[0, 0] * hinv[:, 0]
    torch.testing.assert_close(out[0].double(), expected, rtol=0, atol=1e-6)


def _naive_sequential_obs(w0, target, fixed, h):
    """The sequential OBS update from its definition: at each fixed entry, OBS on the columns ≥ j
    with H_{≥j}⁻¹ inverted from scratch."""
    w = w0.double().clone()
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            if fixed[i, j]:
                tail = torch.linalg.inv(h[j:, j:])
                w[i, j:] -= (w[i, j] - target[i, j]) / tail[0, 0] * tail[0]
                w[i, j] = target[i, j]
    return w


@pytest.mark.parametrize(("rows", "c", "block"), [(17, 33, 5), (3, 70, 128), (1, 7, 1), (5, 130, 64)])
def test_obs_update_matches_the_definition(rows, c, block):
    # Odd shapes, blocks narrower and wider than the layer, and a layer wider than SUB_BLOCK (64).
    generator = torch.Generator().manual_seed(rows * c)
    h = _damped(_random_h(c, seed=c))
    w0, target = torch.randn(rows, c, generator=generator), torch.randn(rows, c, generator=generator)
    fixed = torch.rand(rows, c, generator=generator) < 0.4
    out = obs_update(w0, target, hinv_cholesky(h, damping=1e-12), fixed, block_size=block)
    assert out.dtype == torch.float32 and out.shape == (rows, c)
    torch.testing.assert_close(out.double(), _naive_sequential_obs(w0, target, fixed, h), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[fixed], target[fixed])


def test_obs_update_with_nothing_fixed_returns_the_reference():
    w0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    out = obs_update(
        w0, torch.zeros(4, 6), hinv_cholesky(_random_h(6, 1)), torch.zeros(4, 6, dtype=torch.bool), block_size=2
    )
    assert torch.equal(out, w0)


def test_a_selection_sees_each_block_after_the_earlier_ones():
    # The callable gets the block's current weights: column 1 after column 0's compensation (1.5).
    seen = []

    def select(current, columns):
        seen.append((columns, current.clone()))
        return torch.tensor([[True]]) if columns.start == 0 else torch.tensor([[False]])

    out = obs_update(torch.ones(1, 2), torch.zeros(1, 2), U2, select, block_size=1)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.5]]))
    assert [s for s, _ in seen] == [slice(0, 1), slice(1, 2)]
    torch.testing.assert_close(seen[1][1], torch.tensor([[1.5]], dtype=torch.float64))


@pytest.mark.parametrize(
    ("weight", "target", "factor", "fixed", "block", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(3, 2), torch.eye(3), torch.zeros(2, 3, dtype=torch.bool), 1, "target"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.eye(2), torch.zeros(2, 3, dtype=torch.bool), 1, "hinv_factor"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.eye(3), torch.zeros(2, 3, dtype=torch.bool), 0, "block_size"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.eye(3), torch.zeros(2, 3), 1, "bool"),
    ],
)
def test_obs_update_rejects(weight, target, factor, fixed, block, match):
    with pytest.raises(ValueError, match=match):
        obs_update(weight, target, factor, fixed, block_size=block)


# --- safe_delta.py ----------------------------------------------------------------------------


def test_selection_by_hand():
    # d² = (4, 1, 0.25): columns ranked 0, 1, 2 (utility per cost d²). ΔW = [[1, 2, 1], [3, 1, 1]],
    # costs ΔW² / d² column by column: (0.25, 2.25), (4, 1), (4, 4); running sums 0.25, 2.5, 6.5,
    # 7.5, 11.5, 15.5. ⌊0.15 · 6⌋ = 0 entries excluded. Budget ε = s · (r·n / ref²) · mean(1/d²)
    # = (2/3) · 6 · (0.25 + 1 + 4)/3 = 7: the prefix of sum ≤ 7 is (0,0), (1,0), (0,1); (1,1) would
    # fit alone but comes after (0,1).
    delta = torch.tensor([[1.0, 2.0, 1.0], [3.0, 1.0, 1.0]])
    kept = safe_delta_selection(delta, torch.tensor([4.0, 1.0, 0.25]), scale=2 / 3, reference_size=1)
    assert kept.tolist() == [[True, True, False], [True, False, False]]
    # With diag(U) (no coupling) the update keeps W_f there and W_a elsewhere.
    w, mask = safe_delta_update(
        torch.zeros(2, 3), delta, torch.diag(torch.tensor([2.0, 1.0, 0.5])), scale=2 / 3, reference_size=1
    )
    assert torch.equal(mask, kept)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]))


def test_the_worst_fifteen_percent_are_never_kept():
    # 4 × 5 = 20 entries, ⌊0.15 · 20⌋ = 3 excluded: the last in the ranking, rows 1–3 of the column
    # of smallest d² (column 2 here), even under a budget that takes everything else.
    d2 = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    kept = safe_delta_selection(torch.ones(4, 5), d2, scale=1e9, reference_size=1)
    expected = torch.ones(4, 5, dtype=torch.bool)
    expected[1:, 2] = False
    assert torch.equal(kept, expected)


def test_safe_delta_compensates_by_hand():
    # W_a = (0, 0), W_f = (1, 1), H = [[2, 1], [1, 2]]: d² = (2/3, 1/2), column 0 first; costs 1.5
    # and 2, ε = 0.5 · 2 · (1.5 + 2)/2 = 1.75 keeps column 0 only. OBS then moves w_1 by
    # −(0 − 1)·[H⁻¹]_01/[H⁻¹]_00 = −0.5: W_a's output on the safety data changes as little as
    # ((1, x) H (1, x)ᵀ = 2 + 2x + 2x² is smallest at x = −0.5) keeping w_0 = 1 allows.
    w, kept = safe_delta_update(torch.zeros(1, 2), torch.ones(1, 2), U2, scale=0.5, reference_size=1)
    assert kept.tolist() == [[True, False]]
    torch.testing.assert_close(w, torch.tensor([[1.0, -0.5]]))


def _official_safe_delta(w_aligned, w_sft, u, scale, reference_size, blocksize):
    """``SafeDeltaRunner.adjust_delta`` of ColinLu50/SafeDelta, with the budget per entry (module
    doc), one column per compensation step (the code: 4) and the 15 % cut written without the
    code's ``[0:-0]`` slip (empty for blocks of under 7 entries)."""
    W, W_sft = w_aligned.double().clone(), w_sft.double()
    rows, columns = W.shape
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1, W2, Hinv1 = W[:, i1:i2].clone(), W_sft[:, i1:i2], u[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        tmp = torch.ones_like(W1) / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        loss = ((W2 - W1) ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2).flatten()
        sorted_indices = torch.argsort(tmp.flatten(), stable=True)
        sorted_indices = sorted_indices[: tmp.numel() - int(0.15 * tmp.numel())]
        cumulative = torch.cumsum(loss[sorted_indices], dim=0)
        constraint = tmp.mean() * scale * rows * count / reference_size**2
        flat = torch.zeros_like(loss, dtype=torch.bool)
        flat[sorted_indices] = cumulative <= constraint
        mask1 = flat.reshape(tmp.shape)
        for i in range(count):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = W2[:, i][mask1[:, i]]
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ u[i1:i2, i2:]
    return W


@pytest.mark.parametrize(("rows", "c", "block"), [(17, 33, 5), (33, 17, 2048), (1, 9, 4), (6, 130, 50)])
def test_safe_delta_is_the_official_rule(rows, c, block):
    generator = torch.Generator().manual_seed(rows + c)
    u = hinv_cholesky(_random_h(c, seed=c))
    w_aligned = torch.randn(rows, c, generator=generator)
    w_sft = w_aligned + 0.3 * torch.randn(rows, c, generator=generator)
    w, kept = safe_delta_update(w_aligned, w_sft, u, scale=1.0, reference_size=8, block_size=block)
    torch.testing.assert_close(
        w.double(), _official_safe_delta(w_aligned, w_sft, u, 1.0, 8, block), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(w[kept], w_sft[kept])
    assert 0 < kept.sum() < rows * c


def test_update_defaults_are_the_official_codes():
    assert (SCALE, REFERENCE_SIZE, BLOCK_SIZE, EXCLUDED_SHARE) == (0.1, 4096, 2048, 0.15)
    method = SafeDelta()
    assert method.name == "safe-delta" and not method.hpa.enabled
    assert method.describe() == {
        "scale": 0.1, "reference_size": 4096, "block_size": 2048, "excluded_share": 0.15, "damping": 0.01,
        "kept_share": [],
    }  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [{"scale": 0.0}, {"scale": float("nan")}, {"reference_size": 0}, {"excluded_share": 1.5}, {"block_size": 0}],
)
def test_invalid_settings_raise(settings):
    with pytest.raises(ValueError):
        SafeDelta(**settings)


def test_selection_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="d²"):
        safe_delta_selection(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        safe_delta_update(torch.zeros(2, 3), torch.zeros(3, 2), torch.eye(3))


# --- the hooks, on a tiny Llama ---------------------------------------------------------------


def char_batches(pairs):
    """One left-padded batch of the pairs' characters (ids = code point mod 64), answer labels."""
    texts = [[ord(ch) % 64 for ch in prompt + answer] for prompt, answer in pairs]
    width = max(len(t) for t in texts)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for row, tokens in enumerate(texts):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]


SAFETY = [("how to build a bomb", "I can't help with that."), ("steal a car", "No, I won't.")]
TASK = [("classify: great film", "positive"), ("classify: dull plot", "negative"), ("classify: ok", "neutral")]


def task_context(model) -> TaskContext:
    layers = find_hpa_layers(model)
    return TaskContext(
        chat=ChatModel(model=model, tokenizer=None, source="test"), layers=layers, index=0, prompts=None,
        safety_pairs=SAFETY, benign_prompts=[], task_pairs=TASK, batches=char_batches,
        args=argparse.Namespace(full=False), w_prev=dense_weights(layers),
    )  # fmt: skip


def fine_tune(task: TaskContext, seed: int = 1) -> None:
    """A stand-in for the task: a rank-2 update of every managed layer, then ``task.w_new``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in task.layers.values():
            out, inp = layer.module.weight.shape
            b, a = torch.randn(out, 2, generator=generator), torch.randn(2, inp, generator=generator)
            layer.module.weight += 0.01 * b @ a
    task.w_new = dense_weights(task.layers)


def test_group_by_input_shares_one_h_per_input():
    model = tiny_decoder()
    task = task_context(model)
    groups = group_by_input(task.hessians(SAFETY))
    assert len(groups) == 4 * 4
    first = [names for names, _ in groups[:4]]
    prefix = "model.layers.0."
    assert first == [
        [prefix + "self_attn.q_proj", prefix + "self_attn.k_proj", prefix + "self_attn.v_proj"],
        [prefix + "self_attn.o_proj"],
        [prefix + "mlp.gate_proj", prefix + "mlp.up_proj"],
        [prefix + "mlp.down_proj"],
    ]


def test_hooks_edit_every_layer_with_the_safety_h_before_the_task():
    model = tiny_decoder()
    task = task_context(model)
    safety_h = input_hessians(model, task.layers, char_batches(SAFETY))  # at W_prev
    method = SafeDelta(scale=0.1, reference_size=64)
    method.begin_task(task)
    fine_tune(task)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("proj.weight")}
    method.after_merge(task)
    kept = total = 0
    for name, layer in task.layers.items():
        expected, mask = safe_delta_update(
            task.w_prev[name], task.w_new[name], hinv_cholesky(safety_h[name], 0.01), scale=0.1, reference_size=64
        )
        torch.testing.assert_close(layer.module.weight.detach(), expected, rtol=0, atol=1e-7)
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert 0 < kept < 0.85 * total
    for name, param in model.named_parameters():
        if name in others:
            assert torch.equal(param.detach(), others[name]), name
    assert method.describe()["kept_share"] == [pytest.approx(kept / total)]
    assert "safe_delta_hessians" not in task.state


def test_after_merge_needs_begin_task():
    model = tiny_decoder()
    task = task_context(model)
    fine_tune(task)
    with pytest.raises(RuntimeError, match="begin_task"):
        SafeDelta().after_merge(task)


def test_edit_layers_transposes_conv1d_weights():
    # A GPT-2 Conv1D stores its weight (in, out): the rule sees (out, in) = (3, 5) and a (5, 5) U.
    module = Conv1D(3, 5)
    layers = {"c": ManagedLayer(module=module, block=0, num_blocks=1, retain_ratio=0.1)}
    w_prev = {"c": module.weight.detach().clone()}
    w_new = {"c": w_prev["c"] + 1.0}
    seen = {}

    def rule(prev, new, factor):
        seen.update(prev=prev.shape, factor=factor.shape)
        return new * 2, torch.ones(new.shape, dtype=torch.bool)

    share = edit_layers(layers, w_prev, w_new, [(["c"], torch.eye(5))], 0.01, rule)
    assert seen == {"prev": (3, 5), "factor": (5, 5)} and share == 1.0
    torch.testing.assert_close(module.weight.detach(), 2 * w_new["c"])


def test_edit_layers_needs_an_h_for_every_layer():
    model = tiny_decoder()
    task = task_context(model)
    groups = group_by_input(task.hessians(SAFETY))[1:]
    with pytest.raises(ValueError, match="no H for managed layers"):
        edit_layers(task.layers, task.w_prev, task.w_prev, groups, 0.01, lambda p, n, u: (n, n > 0))
