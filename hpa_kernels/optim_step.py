"""What ``HPAOptimizer.step`` hands the kernels: every gradient checked before any state changes,
and each param group's tensor lists (state created on first use)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import distributed, ops

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Parameter dtypes every kernels backend steps; the "torch" reference also steps float64.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def param_label(group_index: int, group: Mapping[str, Any], index: int, p: Tensor, names: Mapping[int, str]) -> str:
    """``p`` named for an error message: its name (the group's ``param_names``, else ``names``
    keyed by ``id``), its place in the param groups and its shape."""
    group_names = group.get("param_names")
    name = group_names[index] if group_names else names.get(id(p))
    where = f"parameter {index} of param group {group_index}" + (f" {group['name']!r}" if "name" in group else "")
    return f"{name!r} ({where}, shape {tuple(p.shape)})" if name else f"{where}, shape {tuple(p.shape)}"


def check_grads(param_groups: Sequence[Mapping[str, Any]], backend: str, names: Mapping[int, str]) -> None:
    """Every parameter with a gradient can be stepped: dense, real, a dtype its backend steps.

    Raises:
        TypeError: a sparse or complex gradient, or a dtype the backend does not step, naming the
            parameter (:func:`param_label`).
    """
    backends: dict[torch.device, str] = {}
    for group_index, group in enumerate(param_groups):
        for index, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.layout != torch.strided:
                label = param_label(group_index, group, index, p, names)
                raise TypeError(f"HPAOptimizer does not support sparse gradients ({grad.layout}): {label}")
            if p.is_complex() or grad.is_complex():
                label = param_label(group_index, group, index, p, names)
                raise TypeError(f"HPAOptimizer does not support complex tensors: {label}")
            if p.device not in backends:
                backends[p.device] = ops.resolve_backend(backend, p.device)
            if p.dtype not in KERNEL_DTYPES and not (p.dtype == torch.float64 and backends[p.device] == "torch"):
                raise TypeError(
                    f"HPAOptimizer: the {backends[p.device]!r} backend steps float32, bfloat16 and float16 "
                    f"parameters (float64 only with backend='torch'); "
                    f"{param_label(group_index, group, index, p, names)} is {p.dtype}"
                )


def gather_group(
    group: Mapping[str, Any], state: MutableMapping[Tensor, dict[str, Any]], skip: frozenset[int] = frozenset()
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The lists ``ops.adamw_step`` takes for every parameter of ``group`` with a gradient, without
    those in ``skip`` (ids of weights the online step handles), and the ``(parameter, fp32 master
    copy)`` pairs among them.

    State is created on first use: ``step`` (fp32 0-d), ``exp_avg`` / ``exp_avg_sq`` (fp32;
    float64 for float64 parameters) and, with ``master_weights``, ``master_param`` for bf16 / fp16
    parameters. A master copy stands in for its parameter (with an fp32 gradient); DTensor
    (FSDP2) tensors are replaced by this rank's shards (AdamW is elementwise).
    """
    params, grads, exp_avgs, exp_avg_sqs, steps, masters = [], [], [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        p_state = state[p]
        if "step" not in p_state:
            p_state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            moments = torch.float64 if p.dtype == torch.float64 else torch.float32
            p_state["exp_avg"] = torch.zeros_like(p, dtype=moments, memory_format=torch.preserve_format)
            p_state["exp_avg_sq"] = torch.zeros_like(p, dtype=moments, memory_format=torch.preserve_format)
        if group.get("master_weights") and p.dtype in LOW_PRECISION and "master_param" not in p_state:
            p_state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        if id(p) in skip:
            continue
        master = p_state.get("master_param")
        tensors = (
            p if master is None else master,
            p.grad if master is None else p.grad.float(),
            p_state["exp_avg"],
            p_state["exp_avg_sq"],
        )
        if distributed.is_sharded(p):
            tensors = tuple(distributed.local_tensor(t) for t in tensors)
        params.append(tensors[0])
        grads.append(tensors[1])
        exp_avgs.append(tensors[2])
        exp_avg_sqs.append(tensors[3])
        steps.append(p_state["step"])
        if master is not None:
            masters.append((p, master))
    return params, grads, exp_avgs, exp_avg_sqs, steps, masters
