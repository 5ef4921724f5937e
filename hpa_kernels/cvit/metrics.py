"""Continual-learning metrics (HPA_SPEC.md § What the paper reports); ASR and over-refusal are
shares of the judge's verdicts (:mod:`hpa_kernels.cvit.judge`).

All values are fractions in [0, 1] (the Markdown table prints percent). The accuracy matrix is
lower-triangular and stored as a list of rows: ``a[t][i]`` is the test accuracy on task ``i``
after training on task ``t`` (0-based, ``i <= t``), so row ``t`` has ``t + 1`` entries.
"""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Share of ``predictions`` equal to ``labels``.

    Raises:
        ValueError: different lengths or no examples.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(int(p == y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


def average_performance(matrix: Sequence[Sequence[float]], step: int | None = None) -> float:
    """AP after task ``step`` (default: the last row): ``mean_{i <= step} a[step][i]``.

    Raises:
        ValueError: an empty matrix, or a row whose length is not ``step + 1``.
    """
    row = _row(matrix, step)
    return sum(row) / len(row)


def backward_transfer(matrix: Sequence[Sequence[float]], step: int | None = None) -> float | None:
    """BWT after task ``step`` (default: the last): ``mean_{i < step} (a[step][i] - a[i][i])``.

    Negative values mean forgetting. ``None`` after the first task, where no earlier task exists.

    Raises:
        ValueError: an empty matrix, or rows that are not lower-triangular.
    """
    row = _row(matrix, step)
    t = len(row) - 1
    if t == 0:
        return None
    for i in range(t):
        if len(matrix[i]) != i + 1:
            raise ValueError(f"accuracy matrix row {i} has {len(matrix[i])} entries, expected {i + 1}")
    return sum(row[i] - matrix[i][i] for i in range(t)) / t


def _row(matrix: Sequence[Sequence[float]], step: int | None) -> Sequence[float]:
    if not matrix:
        raise ValueError("empty accuracy matrix")
    step = len(matrix) - 1 if step is None else step
    if not 0 <= step < len(matrix):
        raise ValueError(f"step {step} outside the matrix's {len(matrix)} rows")
    row = matrix[step]
    if len(row) != step + 1:
        raise ValueError(f"accuracy matrix row {step} has {len(row)} entries, expected {step + 1}")
    return row
