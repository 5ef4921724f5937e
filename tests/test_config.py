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
        {"online_projection": "delayed"},
        {"extra_layers": "head"},
        {"p_max": float("nan")},
    ):
        with pytest.raises(ValueError):
            HPAConfig(**kwargs)
    assert HPAConfig().alpha_bounds == (0.4, 0.8)


def test_include_and_exclude_are_tuples_of_patterns():
    config = HPAConfig(include=["*vision_tower*"], exclude=("*.mlp.*",))
    assert config.include == ("*vision_tower*",) and config.exclude == ("*.mlp.*",)
    for kwargs in ({"include": "*vision*"}, {"exclude": ("",)}, {"include": (3,)}):
        with pytest.raises(ValueError):
            HPAConfig(**kwargs)


def test_online_projection_names_its_choices():
    assert HPAConfig().online_projection == "exact"
    assert HPAConfig(online=True, online_projection="lagged").online_projection == "lagged"
    with pytest.raises(ValueError, match=r"online_projection must be one of \('exact', 'lagged'\)"):
        HPAConfig(online_projection="Lagged")
