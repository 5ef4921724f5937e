"""Peak memory of each optimizer's steps: ``python -m bench.memprobe <set>``, in a process of its own.

For torch AdamW (foreach, fused) and HPAOptimizer on the backend ``"auto"`` picks (plain, plain
with a task open, i.e. with its W_prev snapshots, and online) it measures, on one copy of the
parameter set (each variant's state freed before the next): the exact optimizer-state bytes
(moments, step counts, W_prev snapshots, statistics) and the peak RSS above the resident
parameters and gradients over the optimizer's creation, ``begin_task`` and two steps. Prints one
JSON list.

Run it through :func:`probe_memory`, which starts it with ``MALLOC_MMAP_THRESHOLD_`` fixed so that
glibc hands every freed block of 128 KiB or more back to the system: one variant's freed memory
cannot then hide the next one's peak.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from hpa_kernels import ops

from .harness import peak_rss_bytes, reset_peak_rss, rss_bytes, run_probe
from .workloads import (
    MINILM_L6,
    ONLINE_KINDS,
    ModelSpec,
    build_model,
    hinv_vectors,
    llama_1b,
    make_optimizer,
    step_variants,
    sweep_spec,
)


def spec_by_name(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a set name (``minilm-l6``, ``llama-1b-<k>l``, ``sweep-<N>``)."""
    if name == MINILM_L6.name:
        return MINILM_L6
    if name.startswith("llama-1b-") and name.endswith("l"):
        return llama_1b(int(name[len("llama-1b-") : -1]))
    if name.startswith("sweep-"):
        return sweep_spec(float(name[len("sweep-") :]))
    raise ValueError(f"unknown parameter set {name!r}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages in ``opt.state``."""
    seen: set[int] = set()
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def _probe(model, variant, task: bool) -> dict:
    gc.collect()
    base = rss_bytes()
    exact = reset_peak_rss()
    opt = make_optimizer(variant, model)
    if task and variant.kind == "hpa-plain":
        opt.begin_task(hinv_safety=hinv_vectors(model, opt.hpa_layers, seed=1))
    for _ in range(2):
        opt.step()
    params = sum(p.numel() for p in model.parameters())
    return {
        "variant": variant.name + (" +task" if task and variant.kind == "hpa-plain" else ""),
        "task": task or variant.kind in ONLINE_KINDS,
        "params": params,
        "state_bytes": state_bytes(opt),
        "peak_bytes": peak_rss_bytes() - base if exact else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("set", help="parameter set name, e.g. llama-1b-1l")
    args = parser.parse_args(argv)
    spec = spec_by_name(args.set)
    runs = []
    ours = ops.resolve_backend("auto", torch.device("cpu"))
    for variant in step_variants():
        if variant.kind != "adamw" and variant.option != ours:
            continue  # the HPA rows: the backend "auto" picks (the torch reference is not a product path)
        runs.append((variant, False))
        if variant.kind == "hpa-plain":
            runs.append((variant, True))
    small = build_model(sweep_spec(1e5))
    for variant, task in runs:  # warm-up: lazy library loads and thread pools are not the optimizer's
        _probe(small, variant, task)
    model = build_model(spec)  # one copy of the parameters and gradients for every variant
    print(json.dumps([_probe(model, variant, task) for variant, task in runs]))


def probe_memory(set_name: str, timeout_s: float = 300.0) -> list[dict]:
    """Run :func:`main` for ``set_name`` in a fresh process and return its list."""
    return run_probe("bench.memprobe", set_name, env={"MALLOC_MMAP_THRESHOLD_": "131072"}, timeout_s=timeout_s)


if __name__ == "__main__":
    main()
