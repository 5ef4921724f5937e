"""What one ``python -m bench.report`` run measured: :class:`Report`, written as JSON and read by
:mod:`bench.targets` and :mod:`bench.render`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Report:
    """Everything one run measured; ``as_dict`` is the JSON file."""

    machine: dict
    config: dict
    bandwidth: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    edit_layers: list[dict] = field(default_factory=list)
    edit_models: list[dict] = field(default_factory=list)
    calibration: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)
