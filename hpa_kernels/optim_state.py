"""HPAOptimizer's param groups and state dict: the keys a group may hold, what a load accepts from
``torch.optim.AdamW``, and how saved tensors are checked and restored (shapes, dtypes, devices)
before anything is loaded."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from .config import HPAConfig

# Group keys torch's own schedulers write into the groups (LRScheduler, OneCycleLR, CyclicLR, SWALR):
# kept as torch.optim.AdamW keeps them, so a scheduler resumes from a loaded state dict.
SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"})
GROUP_KEYS = (
    frozenset({"params", "lr", "betas", "eps", "weight_decay", "maximize", "master_weights", "name", "param_names"})
    | SCHEDULER_KEYS
)
# Group keys of torch.optim.AdamW state dicts that a load accepts (and drops) when they ask for
# nothing HPAOptimizer does differently: {key: required truth value, or None for any value}.
ADAMW_GROUP_KEYS = {
    "foreach": None,
    "fused": None,
    "amsgrad": False,
    "capturable": False,
    "differentiable": False,
    "decoupled_weight_decay": True,
}
# Per-parameter state of the shape of the parameter.
PARAM_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "hpa_prev", "master_param")
# Per-parameter state with one entry per HPA column (the layer's input features).
COLUMN_STATE = ("hpa_hinv_safety", "hpa_mask", "hpa_col_energy")
# Per-parameter one-element state: the lagged online projection's pending coefficient c_next.
SCALAR_STATE = ("hpa_online_coef",)
# Per-parameter state that exists only inside a task.
TASK_STATE = ("hpa_prev", *COLUMN_STATE, *SCALAR_STATE)
_LOW_PRECISION = (torch.bfloat16, torch.float16, torch.int64)


def adamw_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """The AdamW keyword arguments of ``ops.adamw_step`` and ``ops.online_step`` from a param
    group: ``lr``, ``beta1``, ``beta2`` (from ``betas``), ``eps``, ``weight_decay``, ``maximize``."""
    beta1, beta2 = group["betas"]
    return {
        "lr": group["lr"],
        "beta1": beta1,
        "beta2": beta2,
        "eps": group["eps"],
        "weight_decay": group["weight_decay"],
        "maximize": group["maximize"],
    }


def check_param_dtype(p: Tensor, label: str) -> None:
    """Refuse a parameter no backend can step (complex, integer or bool), naming it.

    Raises:
        ValueError: a complex or non-floating-point ``p``.
    """
    if p.is_complex():
        raise ValueError(f"HPAOptimizer: {label} is complex ({p.dtype}); not supported (view it as real pairs)")
    if not p.is_floating_point():
        raise ValueError(f"HPAOptimizer: {label} has dtype {p.dtype}; only floating-point parameters are supported")


def checked_param_group(param_group: Mapping[str, Any]) -> dict[str, Any]:
    """A new param group dict with ``params`` as a list (a generator is consumed once, here),
    after checking its keys and parameters.

    Raises:
        ValueError: a key outside :data:`GROUP_KEYS`, a complex or non-floating-point parameter,
            or a tensor listed twice in the group (tied weights passed by hand: stepping it twice
            would apply two AdamW updates per step), naming it.
    """
    unknown = set(param_group) - GROUP_KEYS
    if unknown:
        raise ValueError(f"HPAOptimizer: unknown param group keys {sorted(unknown)}; allowed: {sorted(GROUP_KEYS)}")
    params = param_group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    seen: set[int] = set()
    for index, p in enumerate(params):
        name, tensor = p if isinstance(p, tuple) else (None, p)  # (name, parameter) pairs, as torch allows
        if isinstance(tensor, Tensor):
            label = f"parameter {name!r}" if name else f"parameter {index} of the group"
            check_param_dtype(tensor, label)
            if id(tensor) in seen:
                raise ValueError(
                    f"HPAOptimizer: {label} is listed twice in one param group (tied weights?); "
                    "list each tensor once, e.g. with model.parameters()"
                )
            seen.add(id(tensor))
    return {**param_group, "params": params}


def check_saved_groups(param_groups: Iterable[Mapping[str, Any]]) -> None:
    """Refuse a saved param group that asks for an option HPAOptimizer does not implement.

    Raises:
        ValueError: a key outside :data:`GROUP_KEYS` that is not one of :data:`ADAMW_GROUP_KEYS`
            at an accepted value (``amsgrad=True``, another optimizer's ``momentum``, ...).
    """
    for index, group in enumerate(param_groups):
        for key in sorted(set(group) - GROUP_KEYS):
            required = ADAMW_GROUP_KEYS.get(key, "refuse")
            if required == "refuse" or (required is not None and bool(group[key]) != required):
                raise ValueError(
                    f"HPAOptimizer.load_state_dict: saved param group {index} sets {key}={group[key]!r}, "
                    "which HPAOptimizer does not implement"
                )


def check_saved_state(
    saved: Mapping[Any, Mapping[str, Any]],
    by_id: Mapping[Any, Tensor],
    columns_of: Mapping[int, tuple[int, ...]],
    names: Mapping[int, str],
) -> None:
    """Check every saved tensor's shape against its parameter before anything is loaded.

    Args:
        saved: the state dict's ``"state"``: ``{saved id: {key: value}}``.
        by_id: ``{saved id: parameter}``.
        columns_of: ``{id(weight): (in_features,)}`` of the managed weights (their column state
            is one entry per input feature, whatever the storage layout, e.g. GPT-2 Conv1D).
        names: ``{id(parameter): name}`` for the messages.

    Raises:
        ValueError: a parameter-shaped, column or one-element state whose shape does not fit,
            naming both.
    """
    for saved_id, saved_state in saved.items():
        param = by_id.get(saved_id)
        if param is None:
            continue
        label = names.get(id(param), f"parameter {saved_id}")
        columns = columns_of.get(id(param), tuple(param.shape[1:]))
        for key, value in saved_state.items():
            if key in PARAM_SHAPED_STATE and isinstance(value, Tensor) and value.shape != param.shape:
                raise ValueError(
                    f"HPAOptimizer.load_state_dict: state {key!r} of {label!r} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(param.shape)} (a state dict of another model?)"
                )
            if key in COLUMN_STATE and isinstance(value, Tensor) and value.shape != columns:
                raise ValueError(
                    f"HPAOptimizer.load_state_dict: state {key!r} of {label!r} has shape {tuple(value.shape)}, "
                    f"expected {columns}"
                )
            if key in SCALAR_STATE and isinstance(value, Tensor) and value.numel() != 1:
                raise ValueError(
                    f"HPAOptimizer.load_state_dict: state {key!r} of {label!r} has shape {tuple(value.shape)}, "
                    "expected one element"
                )


def restored_value(key: str, value: Any, param: Tensor) -> Any:
    """A saved state entry as the optimizer keeps it: a copy on ``param``'s device in its saved
    dtype, except moments and ``step`` saved in a lower precision (a ``torch.optim.AdamW`` state
    over bf16 parameters, an integer step), which become fp32 as the kernels need; a ``step``
    saved as a number becomes an fp32 0-d tensor. Non-tensor values are returned as they are."""
    if key == "step" and not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=torch.float32, device=param.device)
    if not isinstance(value, Tensor):
        return value
    widen = key in ("exp_avg", "exp_avg_sq", "step") and value.dtype in _LOW_PRECISION
    return value.to(device=param.device, dtype=torch.float32 if widen else value.dtype, copy=True)


def restore_groups(param_groups: Iterable[dict[str, Any]], defaults: Mapping[str, Any]) -> None:
    """After ``torch.optim.Optimizer.load_state_dict``: drop the keys of loaded groups that
    HPAOptimizer does not keep (a ``torch.optim.AdamW`` group's ``foreach``, ``amsgrad``, ...,
    checked by :func:`check_saved_groups`) and give the keys they lack their ``defaults``."""
    for group in param_groups:
        for key in set(group) - GROUP_KEYS:
            del group[key]
        for key, value in defaults.items():
            if key in GROUP_KEYS:
                group.setdefault(key, value)


def restore_state(
    state: MutableMapping[Tensor, dict[str, Any]],
    saved_state: Mapping[Any, Mapping[str, Any]],
    by_id: Mapping[Any, Tensor],
) -> None:
    """After ``torch.optim.Optimizer.load_state_dict``: every saved tensor entry (and ``step``)
    re-read from ``saved_state`` as :func:`restored_value` makes it (torch's loader casts
    floating state to the parameter's dtype; the optimizer keeps saved dtypes, and copies).
    ``by_id`` maps the saved parameter ids to the parameters; state of no parameter is left
    as torch keeps it."""
    for saved_id, saved in saved_state.items():
        param = by_id.get(saved_id)
        if param is None:
            continue
        for key, value in saved.items():
            if isinstance(value, Tensor) or key == "step":
                state[param][key] = restored_value(key, value, param)


def config_values(config: HPAConfig) -> dict[str, Any]:
    """``config`` as plain values (tuples as lists), as the ``"hpa"`` entry of a state dict keeps it
    (loadable with ``torch.load(..., weights_only=True)``)."""
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v for f in fields(config)}


def config_differences(saved: Mapping[str, Any] | None, config: HPAConfig) -> list[str]:
    """``"name: saved -> current"`` for every field of a saved :func:`config_values` that differs
    from ``config`` (none when the state dict saved no config)."""
    if not saved:
        return []
    current = config_values(config)
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in current if k in saved and saved[k] != current[k]]


def saved_lifecycle(state_dict: Mapping[str, Any], tasks_completed: int) -> dict[str, Any]:
    """The ``"hpa"`` entry of a state dict, or, for one without it (torch.distributed.checkpoint's
    get/set_optimizer_state_dict keep only ``"state"`` and ``"param_groups"``), the lifecycle it
    implies: a task is open iff a W_prev snapshot was saved; ``tasks_completed`` is kept."""
    lifecycle = state_dict.get("hpa")
    if lifecycle:
        return dict(lifecycle)
    return {
        "in_task": any("hpa_prev" in saved for saved in state_dict["state"].values()),
        "tasks_completed": tasks_completed,
    }
