"""hpa_kernels.functional against hand-computed cases of HPA_SPEC.md."""

import math

import pytest
import torch

from hpa_kernels import functional as F
from hpa_kernels import ops
from hpa_kernels.config import HPAConfig


def test_retention_schedule_endpoints_and_linearity():
    assert F.retention_schedule(1) == [0.15]
    ratios = F.retention_schedule(6, 0.15, 0.05)
    assert ratios[0] == 0.15 and ratios[-1] == 0.05  # [decision: endpoints exact]
    steps = [a - b for a, b in zip(ratios, ratios[1:])]
    assert all(abs(s - 0.02) < 1e-12 for s in steps)
    assert F.retention_schedule(2, 0.3, 0.1) == [0.3, 0.1]


@pytest.mark.parametrize("args", [(0,), (3, 0.05, 0.15), (3, 0.2, -0.1)])
def test_retention_schedule_rejects_bad_input(args):
    with pytest.raises(ValueError):
        F.retention_schedule(*args)


def test_hinv_diagonal_matches_explicit_inverse():
    torch.manual_seed(0)
    x = torch.randn(50, 7, dtype=torch.float64)
    h = 2.0 / 50 * x.T @ x
    lam = 0.01 * h.diagonal().mean()
    expected = torch.linalg.inv(h + lam * torch.eye(7, dtype=torch.float64)).diagonal()
    got = F.hinv_diagonal(h.float(), 0.01)
    assert got.dtype == torch.float32 and got.shape == (7,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_hinv_diagonal_rank_deficient_is_finite():
    """Few tokens, many columns: H has rank 3 of 64; damping keeps it positive definite."""
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    got = F.hinv_diagonal(2.0 / 3 * x.T @ x)
    assert torch.isfinite(got).all() and (got > 0).all()


@pytest.mark.parametrize(
    "h",
    [torch.zeros(4, 4), torch.ones(3, 4), torch.full((2, 2), float("nan"))],
    ids=["zero", "not-square", "nan"],
)
def test_hinv_diagonal_rejects_bad_input(h):
    with pytest.raises(ValueError):
        F.hinv_diagonal(h)


def test_column_scores_hand_case():
    w_prev = torch.zeros(2, 3)
    w_new = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    eps_bar, zeta_bar = F.column_scores(w_prev, w_new, torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 1.0, 1.0]))
    # column energies mean_i ΔW² = [5, 2, 0]
    assert eps_bar.tolist() == [5.0, 1.0, 0.0]
    assert zeta_bar.tolist() == [10.0, 2.0, 0.0]


def _scores_fp64_reference(energies: list[float], rows: int, hinv: torch.Tensor) -> torch.Tensor:
    """fl32((E_j / r) / hinv[j]) with Python floats (IEEE float64, one operation each), one rounding."""
    quotients = [(e / rows if rows > 0 else e) / float(h) for e, h in zip(energies, hinv.tolist())]
    return torch.tensor(quotients, dtype=torch.float64).float()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64-sums", "fp32-accumulator"])
def test_column_scores_from_energy_rounds_the_float64_quotients_once(dtype):
    """The bits of fl32((E / r) / h) computed in float64, float64 sums and the fp32 online
    accumulator alike (fp32 arithmetic differs in the last bit of some columns); a float64
    quotient past float32's range is Inf, below it 0."""
    gen = torch.Generator().manual_seed(12)
    rows = 3 * 7 * 11  # not a power of two: E / r rounds
    energy = (torch.rand(4000, generator=gen, dtype=torch.float64) * 50).to(dtype)
    hinv = torch.rand(4000, generator=gen) * 3 + 1e-3
    tiny, huge = (1e-300, 1e300) if dtype == torch.float64 else (1e-44, 3e38)
    energy[:3] = torch.tensor([0.0, tiny, huge], dtype=torch.float64)
    hinv[:3] = torch.tensor([1.0, 1.0, 1e-3])
    got = F.column_scores_from_energy(energy, rows, hinv)
    want = _scores_fp64_reference(energy.tolist(), rows, hinv)
    assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert got[:2].tolist() == [0.0, 0.0] and torch.isinf(got[2])  # float32's range: 0 below, Inf above
    fp32_math = energy.float() / (rows * hinv)  # fp32 arithmetic rounds differently in some columns
    assert not torch.equal(fp32_math, want)
    assert torch.equal(F.column_scores_from_energy(torch.zeros(3, dtype=dtype), 0, torch.ones(3)), torch.zeros(3))
    with pytest.raises(ValueError, match="one shape"):
        F.column_scores_from_energy(energy, rows, hinv[:5])


@pytest.mark.parametrize("backend", ops.available_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_layer_scores_are_the_float64_reference_bits(backend, dtype):
    """ε̄, ζ̄ of the offline edit on every backend (``ops.hpa_reduce``'s energies, then
    ``column_scores_from_energy``), and the plan from them, are those of the spec written in
    Python floats: weights on a grid of 1/16 (every ΔW² and sum exact in float64, in any order),
    r = 150 (two 128-row blocks, not a power of two), random float32 hinv."""
    gen = torch.Generator().manual_seed(7)
    rows, columns = 150, 37
    w_prev = (torch.randint(-64, 64, (rows, columns), generator=gen) / 16).to(dtype)
    w_new = (w_prev.double() + torch.randint(-8, 9, (rows, columns), generator=gen) / 16).to(dtype)
    hinv_s, hinv_t = torch.rand(columns, generator=gen) + 0.01, torch.rand(columns, generator=gen) * 5 + 0.01
    delta = (w_new.double() - w_prev.double()).tolist()
    energies = [sum(delta[i][j] ** 2 for i in range(rows)) for j in range(columns)]
    eps_bar, zeta_bar = F.column_scores(w_prev, w_new, hinv_s, hinv_t, backend=backend)
    assert torch.equal(eps_bar, _scores_fp64_reference(energies, rows, hinv_s))
    assert torch.equal(zeta_bar, _scores_fp64_reference(energies, rows, hinv_t))
    prev = w_prev.double().tolist()
    dot = sum(delta[i][j] * prev[i][j] for i in range(rows) for j in range(columns))
    norm_sq = sum(prev[i][j] ** 2 for i in range(rows) for j in range(columns))
    sums = torch.tensor([dot, norm_sq], dtype=torch.float64).float()  # the op's float32 sums
    want = F.plan_from_scores(eps_bar, zeta_bar, sums[0], sums[1], 0.15)
    plan = F.plan_layer_update(w_prev, w_new, hinv_s, hinv_t, 0.15, backend=backend)
    assert torch.equal(plan.mask, want.mask) and (plan.alpha, plan.coef) == (want.alpha, want.coef)


@pytest.mark.parametrize(
    "fraction,columns,expected", [(0.15, 10, 2), (0.25, 2, 1), (0.05, 10, 1), (0.05, 8, 0), (0.3, 5, 2), (1.0, 3, 3)]
)
def test_count_columns_rounds_half_up(fraction, columns, expected):
    assert F.count_columns(fraction, columns) == expected


def test_top_columns_breaks_ties_by_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert F.top_columns(scores, 2).tolist() == [1, 2]
    assert F.top_columns(scores, 4).tolist() == [1, 2, 4, 3]
    candidates = torch.tensor([True, False, True, True, True])
    assert F.top_columns(scores, 2, candidates).tolist() == [2, 4]
    assert F.top_columns(scores, 9, candidates).tolist() == [2, 4, 3, 0]


# c = 10, retain ratio 0.2: budget B = 2 columns, focus k = 4 columns.
EPS = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
ZETA = torch.tensor([8.0, 9.0, 1.0, 6.5, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def _expected_alpha():
    live = [(9, 8), (8, 9), (7, 1), (6, 6.5)]  # columns 4..9 have a zero score and are skipped
    mu = sum(math.log(e / z) for e, z in live) / len(live)
    return 0.4 + 0.4 * (1 + math.tanh(mu)) / 2


def test_partition_hand_case():
    safety, task, shared = F.partition_columns(EPS, ZETA, 0.4)
    assert safety.nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert task.nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert shared.nonzero().flatten().tolist() == [0, 1, 3]


def test_select_columns_balanced_hand_case():
    mask, alpha = F.select_columns(EPS, ZETA, 0.2)
    assert alpha == pytest.approx(_expected_alpha(), abs=1e-12)
    # R = S \ O = {2} is kept; one slot left, filled from O = {0, 1, 3} by φ = ε̄ − α·ζ̄:
    # φ0 = 9 − 8α ≈ 3.50 beats φ1 = 8 − 9α ≈ 1.82 and φ3 = 6 − 6.5α ≈ 1.53.
    assert mask.nonzero().flatten().tolist() == [0, 2]


def test_select_columns_caps_safety_only_columns_to_budget():
    zeta = torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0, 8.0, 7.0, 6.0, 0.0, 0.0])
    mask, _ = F.select_columns(EPS, zeta, 0.2)
    # O is empty, R = S = {0, 1, 2, 3} exceeds B = 2: keep the two with the largest ε̄ [decision]
    assert mask.nonzero().flatten().tolist() == [0, 1]


def test_select_columns_ablations():
    safety_only, _ = F.select_columns(EPS, ZETA, 0.2, mode="safety_only")
    assert safety_only.nonzero().flatten().tolist() == [2]
    balance_only, _ = F.select_columns(EPS, ZETA, 0.2, mode="balance_only")
    assert balance_only.nonzero().flatten().tolist() == [0, 1]


def test_balance_alpha_all_zero_columns_is_midpoint():
    zeros = torch.zeros(5)
    assert F.balance_alpha(zeros, zeros, (0.4, 0.8)) == pytest.approx(0.6)


def test_select_columns_rejects_bad_input():
    with pytest.raises(ValueError):
        F.select_columns(EPS, ZETA[:5], 0.2)
    with pytest.raises(ValueError):
        F.select_columns(EPS, torch.full((10,), float("nan")), 0.2)
    with pytest.raises(ValueError):
        F.select_columns(EPS, ZETA, 0.2, mode="nope")


def _loop_reference(w_prev, w_new, hs, ht, ratio):
    """The spec written as plain loops in float64, independent of hpa_kernels.ops."""
    r, c = w_prev.shape
    d = (w_new.double() - w_prev.double()).tolist()
    p = w_prev.double().tolist()
    energy = [sum(d[i][j] ** 2 for i in range(r)) / r for j in range(c)]
    eps = torch.tensor([energy[j] / float(hs[j]) for j in range(c)]).float()
    zeta = torch.tensor([energy[j] / float(ht[j]) for j in range(c)]).float()
    dot = sum(d[i][j] * p[i][j] for i in range(r) for j in range(c))
    norm = sum(p[i][j] ** 2 for i in range(r) for j in range(c))
    mask, _ = F.select_columns(eps, zeta, ratio)
    coef = dot / norm
    out = [[p[i][j] if mask[j] else p[i][j] + d[i][j] - coef * p[i][j] for j in range(c)] for i in range(r)]
    return torch.tensor(out), mask, coef


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 33)])
def test_hpa_layer_update_matches_loop_reference(shape):
    torch.manual_seed(sum(shape))
    w_prev = torch.randn(shape)
    w_new = w_prev + 0.1 * torch.randn(shape)
    hs, ht = torch.rand(shape[1]) + 0.1, torch.rand(shape[1]) + 0.1
    update = F.hpa_layer_update(w_prev, w_new, hs, ht, 0.15)
    expected, mask, coef = _loop_reference(w_prev, w_new, hs, ht, 0.15)
    assert torch.equal(update.mask, mask)
    assert update.coef == pytest.approx(coef, rel=1e-5, abs=1e-9)
    torch.testing.assert_close(update.weight, expected.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(update.weight[:, mask], w_prev[:, mask])  # retained columns bit-equal to W_prev
    assert update.weight.dtype == w_new.dtype


def test_hpa_layer_update_orthogonal_step():
    torch.manual_seed(3)
    w_prev = torch.randn(40, 30, dtype=torch.float64)
    w_new = 1.3 * w_prev + 0.2 * torch.randn(40, 30, dtype=torch.float64)
    ones = torch.ones(30, dtype=torch.float64)
    update = F.hpa_layer_update(w_prev, w_new, ones, ones, 0.0)  # retain nothing: Ŵ = W̃
    assert update.num_retained == 0
    delta = update.weight - w_prev
    assert abs(float((delta * w_prev).sum())) <= 1e-5 * float(delta.norm() * w_prev.norm())
    assert update.coef == pytest.approx(float(((w_new - w_prev) * w_prev).sum() / w_prev.square().sum()), rel=1e-5)
    no_orth = F.hpa_layer_update(w_prev, w_new, ones, ones, 0.0, config=HPAConfig(orthogonal=False))
    assert no_orth.coef == 0.0 and torch.equal(no_orth.weight, w_new)


def test_loose_config_keywords_still_work_with_a_deprecation_warning():
    """``alpha_bounds`` / ``focus_multiplier`` / ``orthogonal`` / ``mode`` as keywords give the
    same plan as the equal HPAConfig, with a DeprecationWarning; an unknown keyword is a TypeError."""
    torch.manual_seed(5)
    w_prev, hs, ht = torch.randn(16, 40), torch.rand(40) + 0.1, torch.rand(40) + 0.1
    w_new = w_prev + 0.05 * torch.randn(16, 40)
    config = HPAConfig(alpha_bounds=(0.1, 0.3), focus_multiplier=3.0, orthogonal=False, selection="safety_only")
    expected = F.plan_layer_update(w_prev, w_new, hs, ht, 0.15, config=config)
    with pytest.warns(DeprecationWarning, match="pass config=HPAConfig"):
        loose = F.plan_layer_update(
            w_prev,
            w_new,
            hs,
            ht,
            0.15,
            alpha_bounds=(0.1, 0.3),
            focus_multiplier=3.0,
            orthogonal=False,
            mode="safety_only",
        )
    assert torch.equal(loose.mask, expected.mask) and (loose.alpha, loose.coef) == (expected.alpha, expected.coef)
    assert expected.coef == 0.0 and expected.num_retained > 0
    with pytest.raises(TypeError, match="unexpected keyword argument 'selection'"):
        F.hpa_layer_update(w_prev, w_new, hs, ht, 0.15, selection="safety_only")


def test_plan_report_holds_the_plan_and_the_layer():
    mask = torch.tensor([True, False, False, True, False])
    plan = F.LayerPlan(mask, alpha=0.5, coef=-0.25, num_safety=2, num_task=3, num_shared=1)
    assert plan.report(0.1).as_dict() == {
        "retain_ratio": 0.1,
        "alpha": 0.5,
        "num_safety": 2,
        "num_task": 3,
        "num_shared": 1,
        "num_retained": 2,
        "num_columns": 5,
        "coef": -0.25,
    }


def test_hpa_layer_update_zero_prev_gives_zero_coef():
    w_new = torch.randn(4, 6)
    update = F.hpa_layer_update(torch.zeros(4, 6), w_new, torch.ones(6), torch.ones(6), 0.15)
    assert update.coef == 0.0 and torch.isfinite(update.weight).all()


def test_hpa_layer_update_is_deterministic():
    torch.manual_seed(4)
    w_prev, hs, ht = torch.randn(64, 96), torch.rand(96) + 0.1, torch.rand(96) + 0.1
    w_new = w_prev + torch.randn(64, 96) * 0.01
    a = F.hpa_layer_update(w_prev, w_new, hs, ht, 0.1)
    b = F.hpa_layer_update(w_prev.clone(), w_new.clone(), hs.clone(), ht.clone(), 0.1)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight) and a.coef == b.coef


@pytest.mark.parametrize(
    "kwargs",
    [
        {"w_new": torch.zeros(3, 4)},
        {"w_new": torch.full((3, 5), float("inf"))},
        {"hinv_task": torch.ones(4)},
        {"hinv_safety": torch.zeros(5)},
        {"w_new": torch.zeros(3, 5, dtype=torch.float64)},
    ],
    ids=["shape", "inf-weight", "hinv-length", "hinv-zero", "dtype"],
)
def test_hpa_layer_update_rejects_bad_input(kwargs):
    args = {
        "w_prev": torch.zeros(3, 5),
        "w_new": torch.ones(3, 5),
        "hinv_safety": torch.ones(5),
        "hinv_task": torch.ones(5),
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        F.hpa_layer_update(**args, retain_ratio=0.15)


@pytest.mark.parametrize("damping", [0.0, -0.1, float("nan"), float("inf")])
def test_hinv_diagonal_rejects_damping_that_is_not_finite_positive(damping):
    """A NaN damping used to pass the ``damping <= 0`` check and return NaN."""
    with pytest.raises(ValueError, match="finite damping > 0"):
        F.hinv_diagonal(torch.eye(3), damping)


def test_hinv_diagonal_refuses_what_float32_cannot_hold():
    """Inputs of magnitude 1e-20: H ≈ 1e-40 is fine in float64, but diag(H⁻¹) ≈ 1e42 overflows
    float32; a clear error, never an Inf that later checks would have to catch."""
    with pytest.raises(ValueError, match="not representable in float32"):
        F.hinv_diagonal(torch.eye(3, dtype=torch.float64) * 1e-40)


def test_hpa_layer_update_overflowing_update_is_an_error_not_nan():
    """An update whose squares overflow float32 scores: ValueError before any write, never NaN."""
    w_prev = torch.zeros(3, 5)
    w_new = torch.full((3, 5), 1e30)
    out = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.hpa_layer_update(w_prev, w_new, torch.ones(5), torch.ones(5), 0.15, out=out)
    assert torch.equal(out, torch.zeros(3, 5))
