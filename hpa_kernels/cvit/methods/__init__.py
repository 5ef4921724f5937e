"""The methods ``hpa-cvit --methods`` compares, by name, on one protocol (:mod:`.base`).

``seqft`` (plain sequential fine-tuning), ``hpa`` and the paper's three ablations are the
:class:`~hpa_kernels.HPAOptimizer` with an :class:`~hpa_kernels.HPAConfig`; the baselines are one
module each, whose docstring names the paper, the rule it implements, its defaults and the
decisions taken where the paper is silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ... import HPAConfig
from .base import Method, RunContext, TaskContext, dense_weights, input_hessians
from .ema import EMA
from .lookahead import LookAhead
from .lox import LoX
from .model_tailor import ModelTailor
from .safe_delta import SafeDelta
from .sppft import SPPFT

# name -> factory(the run's HPAConfig: retain ratios and calibration sizes from the CLI) -> Method
METHODS: dict[str, Callable[[HPAConfig], Method]] = {
    "seqft": lambda hpa: Method("seqft", replace(hpa, enabled=False)),
    "hpa": lambda hpa: Method("hpa", hpa),
    "hpa-no-orth": lambda hpa: Method("hpa-no-orth", replace(hpa, orthogonal=False)),
    "hpa-safety-only": lambda hpa: Method("hpa-safety-only", replace(hpa, selection="safety_only")),
    "hpa-balance-only": lambda hpa: Method("hpa-balance-only", replace(hpa, selection="balance_only")),
    "sppft": SPPFT,
    "ema": EMA,
    "lox": LoX,
    "lookahead": LookAhead,
    "safe-delta": SafeDelta,
    "model-tailor": ModelTailor,
}

__all__ = ["METHODS", "Method", "RunContext", "TaskContext", "dense_weights", "input_hessians"]
