"""The performance report: ``python -m bench.report`` measures, in one run, every optimizer step,
the end-of-task edit, the calibration hooks and the memory per parameter, side by side with
``torch.optim.AdamW`` and the machine's copy bandwidth, and writes
``bench/results/<machine>.json``, ``<machine>.md`` and ``<machine>.png``.

Bytes are counted by :func:`bench.workloads.step_bytes` and :func:`bench.workloads.edit_bytes`
(every tensor a fused pass must read or write, once). Times are medians after warm-up, with the
min–max of the timed repeats. ``--quick`` runs small sizes only (a smoke test of the script, not a report).

This module measures; :mod:`bench.record` holds what a run measured, :mod:`bench.targets` judges it
against the targets and :mod:`bench.render` writes the Markdown and the figure.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from hpa_kernels import HessianCollector, ops

from .harness import copy_bandwidth, machine_info, measure_many
from .memprobe import probe_memory
from .record import Report
from .render import markdown, plot
from .targets import evaluate_targets
from .workloads import (
    MINILM_L6,
    BertEncoder,
    LayerEdit,
    ModelEdit,
    ModelSpec,
    build_model,
    device_backends,
    edit_bytes,
    llama_1b,
    make_optimizer,
    model_edit_bytes,
    step_bytes,
    step_variants,
    sweep_spec,
)

RESULTS = Path(__file__).resolve().parent / "results"

SWEEP = (1e5, 1e6, 1e7, 1e8, 2e8)
QUICK_SWEEP = (1e5, 1e6)
# The ``torch`` backend is the for-loop ground truth, many passes per step: timed up to this size only.
REFERENCE_MAX_PARAMS = 3e7
# Per-layer edit shapes (out_features, in_features): MiniLM attention and FFN, Llama-1B q and down.
EDIT_LAYERS = (("minilm attn (384, 384)", 384, 384), ("minilm ffn (1536, 384)", 1536, 384))
EDIT_LAYERS_FULL = EDIT_LAYERS + (("llama q (2048, 2048)", 2048, 2048), ("llama down (2048, 8192)", 2048, 8192))


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _free() -> None:
    gc.collect()


# ---------------------------------------------------------------------------------------- steps


def bench_steps(report: Report, spec: ModelSpec, args: argparse.Namespace) -> None:
    """Every step variant on ``spec``, timed side by side (round-robin); rows carry GB/s, the
    share of copy bandwidth and the ratio to torch fused AdamW on the same parameters."""
    model = build_model(spec, args.device)
    params = spec.num_params
    rows, optimizers = {}, {}
    for variant in step_variants(args.device):
        rows[variant.name] = {"set": spec.name, "params": params, "tensors": spec.num_tensors, "variant": variant.name}
        if variant.option == "torch" and params > args.reference_max:
            rows[variant.name]["skipped"] = f"reference backend timed up to {args.reference_max:.0e} parameters"
            continue
        optimizers[variant] = make_optimizer(variant, model)
    timings = measure_many(
        {v.name: opt.step for v, opt in optimizers.items()},
        warmup=args.warmup,
        budget_s=args.budget,
        max_repeats=args.max_repeats,
        device=args.device,
    )
    for variant in optimizers:
        timing, num_bytes = timings[variant.name], step_bytes(variant, model)
        rows[variant.name] |= {
            "timing": timing.as_dict(),
            "bytes": num_bytes,
            "gbps": timing.gbps(num_bytes),
            "copy_share": timing.gbps(num_bytes) / report.bandwidth["gbps"],
            "vs_fused": timing.median / timings["adamw-fused"].median,
            "vs_fused_min": timing.min / timings["adamw-fused"].min,
        }
        _log(
            f"{spec.name:14s} {variant.name:24s} {timing.median * 1e3:10.2f} ms  {rows[variant.name]['gbps']:6.2f} GB/s"
        )
    report.steps.extend(rows.values())
    optimizers.clear()
    _free()
    if spec.name in args.edit_models:
        bench_model_edit(report, model, args)
    del model
    _free()


# ---------------------------------------------------------------------------------------- the edit


def bench_layer_edits(report: Report, args: argparse.Namespace) -> None:
    """One layer's edit (reduce + select + write) and its two passes alone, per backend, side by side."""
    for label, rows, cols in args.edit_layers:
        case = LayerEdit(rows, cols, args.device)
        backends = device_backends(args.device)
        parts = {
            "edit": (case.edit, edit_bytes(rows, cols)),
            "reduce": (case.reduce, 2 * rows * cols * 4),
            "apply": (case.apply, 3 * rows * cols * 4 + math.ceil(cols / 8)),
        }
        timings = measure_many(
            {(b, part): make(b) for b in backends for part, (make, _) in parts.items()},
            warmup=2,
            budget_s=args.budget,
            max_repeats=args.max_repeats,
            device=args.device,
        )
        for backend in backends:
            row = {"layer": label, "shape": [rows, cols], "backend": backend}
            for part, (_, num_bytes) in parts.items():
                timing = timings[backend, part]
                row[part] = {"timing": timing.as_dict(), "bytes": num_bytes, "gbps": timing.gbps(num_bytes)}
            report.edit_layers.append(row)
            _log(f"edit {label:24s} {backend:6s} {row['edit']['timing']['median'] * 1e3:9.2f} ms")
        del case
        _free()
    _speedups(report.edit_layers, "layer", lambda r: r["edit"]["timing"]["median"])


def bench_model_edit(report: Report, model, args: argparse.Namespace) -> None:
    """``HPAOptimizer.end_task`` over every managed layer of ``model``, per backend, side by side."""
    num_bytes = model_edit_bytes(model)
    cases = {backend: ModelEdit(model, backend) for backend in device_backends(args.device)}
    timings = measure_many(
        {b: (case.run, case.setup) for b, case in cases.items()},
        warmup=1,
        budget_s=args.budget,
        max_repeats=10,
        device=args.device,
    )
    for backend, case in cases.items():
        timing = timings[backend]
        report.edit_models.append(
            {
                "set": model.spec.name,
                "managed_layers": len(case.opt.hpa_layers),
                "managed_params": model.spec.num_managed_params,
                "backend": backend,
                "timing": timing.as_dict(),
                "bytes": num_bytes,
                "gbps": timing.gbps(num_bytes),
            }
        )
        _log(f"end_task {model.spec.name:14s} {backend:6s} {timing.median * 1e3:9.2f} ms")
    cases.clear()
    _free()
    _speedups(report.edit_models, "set", lambda r: r["timing"]["median"])


def _speedups(rows: list[dict], key: str, seconds) -> None:
    reference = {r[key]: seconds(r) for r in rows if r["backend"] == "torch"}
    for row in rows:
        if row[key] in reference:
            row["speedup_vs_torch"] = reference[row[key]] / seconds(row)


# ---------------------------------------------------------------------------------------- calibration


def bench_calibration(report: Report, args: argparse.Namespace) -> None:
    """A MiniLM-L6 forward pass (batch 4 × 128 tokens) with and without HessianCollector's hooks,
    side by side with the hooks' FLOP floor: the XᵀX products of the forward's distinct layer
    inputs alone (``torch.mm`` on inputs captured from one forward), which any collector must
    compute."""
    model = build_model(MINILM_L6, args.device, grads=False)
    assert isinstance(model, BertEncoder)
    tokens = torch.randint(0, 30522, (4, 128), generator=torch.Generator().manual_seed(0)).to(args.device)
    layers = [f"blocks.{i}.{s.name}" for i in range(MINILM_L6.num_blocks) for s in MINILM_L6.linears]
    collector = HessianCollector(model, layers)
    inputs = _distinct_inputs(model, layers, tokens)
    flops = sum(2 * x.shape[0] * x.shape[1] ** 2 for x in inputs)

    def hooked_forward() -> None:
        with collector:
            model(tokens)

    def floor() -> None:
        for x in inputs:
            torch.mm(x.T, x)

    with torch.no_grad():
        timings = measure_many(
            {"plain": functools.partial(model, tokens), "hooked": hooked_forward, "floor": floor},
            warmup=2,
            budget_s=args.budget,
            device=args.device,
        )
    plain, hooked = timings["plain"], timings["hooked"]
    overhead = hooked.median - plain.median
    report.calibration.append(
        {
            "model": MINILM_L6.name,
            "batch": list(tokens.shape),
            "watched_layers": len(layers),
            "distinct_inputs": len(inputs),
            "forward": plain.as_dict(),
            "forward_with_collector": hooked.as_dict(),
            "xtx_floor": timings["floor"].as_dict(),
            "overhead_s": overhead,
            "overhead_ratio": hooked.median / plain.median - 1.0,
            "overhead_vs_floor": overhead / timings["floor"].median,
            "collector_gflop": flops / 1e9,
            "collector_gflops": flops / 1e9 / max(overhead, 1e-9),
        }
    )
    _log(
        f"calibration forward {plain.median * 1e3:.1f} ms, with collector {hooked.median * 1e3:.1f} ms, "
        f"XᵀX floor {timings['floor'].median * 1e3:.1f} ms"
    )


def _distinct_inputs(model: torch.nn.Module, layers: list[str], tokens: torch.Tensor) -> list[torch.Tensor]:
    """The distinct inputs (n, c) of ``layers`` in one forward of ``model`` (q/k/v read one)."""
    seen: dict[int, torch.Tensor] = {}  # by id of the input itself, which it keeps alive (ids are not reused)
    modules = dict(model.named_modules())

    def keep(_: torch.nn.Module, args: tuple) -> None:
        seen.setdefault(id(args[0]), args[0])

    hooks = [modules[name].register_forward_pre_hook(keep) for name in layers]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return [x.detach().reshape(-1, x.shape[-1]).float().contiguous() for x in seen.values()]


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only: checks the script, not a report")
    parser.add_argument("--sizes", type=float, nargs="+", help=f"sweep sizes (default {SWEEP})")
    parser.add_argument("--llama-blocks", type=int, default=3, help="Llama-1B blocks on this machine (0: none)")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timed repeats per measurement")
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first allocates the state)")
    parser.add_argument(
        "--reference-max", type=float, default=REFERENCE_MAX_PARAMS, help="largest set for backend=torch steps"
    )
    parser.add_argument("--memory-set", default=MINILM_L6.name, help="parameter set of the memory probe ('' skips it)")
    parser.add_argument("--machine", help="results file name (default: from the CPU model and core count)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--from-json", type=Path, help="rewrite the Markdown and PNG of a saved run; measures nothing")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = QUICK_SWEEP if args.quick else SWEEP
    if args.quick:
        args.llama_blocks = 0
        args.budget = min(args.budget, 0.3)
        args.memory_set = args.memory_set and "sweep-1e6"
    args.edit_layers = EDIT_LAYERS if args.quick else EDIT_LAYERS_FULL
    sets = [sweep_spec(n) for n in args.sizes] + [MINILM_L6]
    if args.llama_blocks:
        sets.append(llama_1b(args.llama_blocks))
    args.sets = sets
    args.edit_models = {MINILM_L6.name} | ({llama_1b(args.llama_blocks).name} if args.llama_blocks else set())
    return args


def write(report: Report, out: Path, name: str) -> None:
    """``<name>.json``, ``<name>.png`` and ``<name>.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    plot(report, out / f"{name}.png")
    (out / f"{name}.md").write_text(markdown(report, f"{name}.png"))
    _log(f"wrote {out / name}.{{json,md,png}}")


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    if args.from_json:
        report = Report(**json.loads(args.from_json.read_text()))
        fused_min = {r["set"]: r["timing"]["min"] for r in report.steps if r["variant"] == "adamw-fused"}
        for row in report.steps:
            if "timing" in row:
                row["vs_fused_min"] = row["timing"]["min"] / fused_min[row["set"]]
        report.targets = []
        evaluate_targets(report, report.config["auto_backend"])
        write(report, args.from_json.parent, args.from_json.stem)
        return report
    start = time.perf_counter()
    torch.manual_seed(0)
    machine = machine_info(args.device)
    if args.machine:
        machine["name"] = args.machine
    ours = ops.resolve_backend("auto", torch.device(args.device))
    report = Report(
        machine=machine,
        config={
            "command": "python -m bench.report" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
            "sizes": list(args.sizes),
            "sets": [
                {"name": s.name, "params": s.num_params, "tensors": s.num_tensors, "description": s.description}
                for s in args.sets
            ],
            "warmup": args.warmup,
            "budget_s": args.budget,
            "reference_max_params": args.reference_max,
            "auto_backend": ours,
            "online_step": "HPAOptimizer(online=True), online_projection 'exact' (hpa-online) and 'lagged'",
            "memory_set": args.memory_set,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
    )
    if ours == "torch":
        report.notes.append(
            "No compiled backend on this machine (hpa_kernels._C did not load): targets are not measurable."
        )
    _log(f"machine {machine['name']}, backends {machine['backends']}, auto -> {ours}")
    report.bandwidth = copy_bandwidth(device=args.device)
    _log(f"copy bandwidth {report.bandwidth['gbps']:.2f} GB/s ({report.bandwidth['best_method']})")
    for spec in args.sets:
        bench_steps(report, spec, args)
    bench_layer_edits(report, args)
    bench_calibration(report, args)
    if args.memory_set:
        report.memory = probe_memory(args.memory_set)
    evaluate_targets(report, ours)
    report.config["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if max(report.config["loadavg_start"][0], report.config["loadavg_end"][0]) > machine["cores"]:
        report.notes.append(
            f"The machine was busy (load average above its {machine['cores']} cores) during this run: "
            "times are upper bounds."
        )
    report.elapsed_s = time.perf_counter() - start
    write(report, args.out, machine["name"] + ("-quick" if args.quick else ""))
    _log(f"done in {report.elapsed_s:.0f} s")
    return report


if __name__ == "__main__":
    main()
