"""HPAConfig validates itself at construction."""

import pytest

from hpa_kernels import HPAConfig


def test_config_validates_itself():
    for kwargs in (
        {"p_min": 0.2, "p_max": 0.1},
        {"selection": "x"},
        {"alpha_bounds": (0.9, 0.1)},
        {"damping": 0},
        {"refresh_every": -1},
        {"extra_layers": "head"},
        {"p_max": float("nan")},
    ):
        with pytest.raises(ValueError):
            HPAConfig(**kwargs)
    assert HPAConfig().alpha_bounds == (0.4, 0.8)
