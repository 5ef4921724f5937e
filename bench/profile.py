"""Where a step or an edit spends its time: ``python -m bench.profile {step,edit} --set <set> ...``.

cProfile over repeated calls, after warm-up, split three ways by each function's own time:

* compiled kernels: the ``hpa_kernels._C`` functions (one call = one fused pass);
* torch ops: torch's built-in functions and tensor methods (each a pass, or a launch);
* Python: everything else (argument checks, loops over tensors, dict look-ups, selection glue).

Then the top functions by own time. Examples::

    python -m bench.profile step --set minilm-l6 --variant "hpa-plain[cpu]"
    python -m bench.profile edit --set llama-1b-1l --backend cpu
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

from .memprobe import spec_by_name
from .workloads import ModelEdit, build_model, make_optimizer, step_variants

_KERNEL_MARKS = ("hpa_kernels._C", "_C_cuda")
_TORCH_MARKS = ("torch.", "Tensor", "of 'torch._C", "_VariableFunctionsClass", "TensorBase")


def classify(func: tuple[str, int, str]) -> str:
    """``"kernel"``, ``"torch"`` or ``"python"`` for a pstats function key."""
    filename, _, name = func
    if filename == "~":
        if any(mark in name for mark in _KERNEL_MARKS):
            return "kernel"
        if any(mark in name for mark in _TORCH_MARKS):
            return "torch"
    return "python"


def split(stats: pstats.Stats) -> dict[str, float]:
    """Own time per class (seconds) over every profiled function."""
    totals = {"kernel": 0.0, "torch": 0.0, "python": 0.0}
    for func, (_, _, tottime, _, _) in stats.stats.items():
        totals[classify(func)] += tottime
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("step", "edit"))
    parser.add_argument("--set", default="minilm-l6")
    parser.add_argument("--variant", default="hpa-plain[cpu]", help="step variant (bench.workloads.step_variants)")
    parser.add_argument("--backend", default="cpu", help="edit backend")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    model = build_model(spec_by_name(args.set), grads=args.what == "step")
    if args.what == "step":
        variant = {v.name: v for v in step_variants()}[args.variant]
        opt = make_optimizer(variant, model)
        opt.step()
        opt.step()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            opt.step()
        profiler.disable()
    else:
        case = ModelEdit(model, args.backend)
        case.setup()
        case.run()
        profiler = cProfile.Profile()
        for _ in range(args.calls):
            case.setup()
            profiler.enable()
            case.run()
            profiler.disable()
    stats = pstats.Stats(profiler)
    totals = split(stats)
    total = sum(totals.values())
    print(
        f"{args.what} {args.set} {args.variant if args.what == 'step' else args.backend}: {total / args.calls * 1e3:.2f} ms per call"
    )
    for name, seconds in totals.items():
        print(f"  {name:7s} {seconds / args.calls * 1e3:9.2f} ms  {seconds / total:6.1%}")
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
