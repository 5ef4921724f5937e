"""hpa_kernels.cvit.metrics against hand-computed cases (HPA_SPEC.md § What the paper reports)."""

from __future__ import annotations

import pytest

from hpa_kernels.cvit.metrics import (
    accuracy,
    average_performance,
    backward_transfer,
)

# a[t][i]: accuracy on task i after training task t.
MATRIX = [
    [0.90],
    [0.70, 0.80],
    [0.60, 0.50, 0.95],
]


def test_accuracy():
    assert accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == 0.75
    with pytest.raises(ValueError):
        accuracy([0], [0, 1])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_average_performance_per_step():
    assert average_performance(MATRIX, 0) == pytest.approx(0.90)
    assert average_performance(MATRIX, 1) == pytest.approx((0.70 + 0.80) / 2)
    assert average_performance(MATRIX) == pytest.approx((0.60 + 0.50 + 0.95) / 3)  # 0.6833...


def test_backward_transfer_per_step():
    assert backward_transfer(MATRIX, 0) is None  # no earlier task
    assert backward_transfer(MATRIX, 1) == pytest.approx(0.70 - 0.90)  # -0.20
    # ((0.60 - 0.90) + (0.50 - 0.80)) / 2 = -0.30
    assert backward_transfer(MATRIX) == pytest.approx(-0.30)


def test_backward_transfer_can_be_positive():
    assert backward_transfer([[0.5], [0.75, 0.9]]) == pytest.approx(0.25)


def test_malformed_matrix():
    with pytest.raises(ValueError):
        average_performance([])
    with pytest.raises(ValueError):
        average_performance([[0.5, 0.5]])
    with pytest.raises(ValueError):
        backward_transfer([[0.5, 0.1], [0.5, 0.5]])
    with pytest.raises(ValueError):
        average_performance(MATRIX, 3)
