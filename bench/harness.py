"""Measuring: wall-clock timings (median, min, max after warm-up), the machine's copy bandwidth,
peak memory of a step (in a fresh process), and the machine's name."""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls that followed ``warmup`` untimed ones."""

    median: float
    min: float
    max: float
    repeats: int
    warmup: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def gbps(self, num_bytes: int) -> float:
        """Achieved GB/s (10⁹ bytes per second) at the median time."""
        return num_bytes / self.median / 1e9


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object],
    *,
    setup: Callable[[], object] | None = None,
    warmup: int = 1,
    repeats: int | None = None,
    min_repeats: int = 3,
    max_repeats: int = 30,
    budget_s: float = 2.0,
    device: torch.device | str | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones (each after ``setup()``,
    untimed). With ``repeats=None`` it is ``budget_s`` over the last warm-up time, clamped to
    ``[min_repeats, max_repeats]``. The garbage collector is off while timing."""
    last = 0.0
    for _ in range(max(1, warmup)):
        if setup is not None:
            setup()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        last = time.perf_counter() - start
    if repeats is None:
        repeats = int(min(max_repeats, max(min_repeats, budget_s // max(last, 1e-9))))
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            if setup is not None:
                setup()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return Timing(statistics.median(times), min(times), max(times), repeats, max(1, warmup))


def measure_many(
    cases: dict[str, Callable[[], object] | tuple[Callable[[], object], Callable[[], object]]],
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 30,
    budget_s: float = 2.0,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time several calls side by side, round-robin: each round calls every case once, so a
    change in the machine's load (other processes) weighs on all of them alike.

    ``cases`` maps a name to ``fn`` or ``(fn, setup)`` (``setup`` untimed, before each call).
    ``warmup`` untimed rounds first; then rounds until ``budget_s`` of measured time per case
    has passed on the slowest case (at least ``min_repeats``, at most ``max_repeats`` rounds).
    """
    calls = {name: case if isinstance(case, tuple) else (case, None) for name, case in cases.items()}

    def once(fn, setup) -> float:
        if setup is not None:
            setup()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    last = {name: 0.0 for name in calls}
    for _ in range(max(1, warmup)):
        for name, (fn, setup) in calls.items():
            last[name] = once(fn, setup)
    repeats = int(min(max_repeats, max(min_repeats, budget_s // max(max(last.values()), 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, (fn, setup) in calls.items():
                times[name].append(once(fn, setup))
    finally:
        gc.enable()
    return {name: Timing(statistics.median(t), min(t), max(t), repeats, max(1, warmup)) for name, t in times.items()}


# ---------------------------------------------------------------------------------------- bandwidth


def copy_bandwidth(num_bytes: int = 1 << 29, device: torch.device | str = "cpu", repeats: int = 7) -> dict:
    """The machine's copy bandwidth, from large tensor copies of ``num_bytes`` (fp32).

    Bytes counted as a STREAM copy counts them: read + write = 2 × ``num_bytes`` (the cache line
    read that a plain store triggers is not counted). Methods on a CPU: ``torch.Tensor.copy_``,
    ``memcpy`` (``numpy.copyto``) on one thread and on two halves in parallel, and, as the ceiling
    for in-place streams, ``x.mul_(1)`` (reads and writes the same lines). ``gbps``, the figure
    every share is taken against, is the best median among the copies (not the in-place scale).
    """
    numel = num_bytes // 4
    src = torch.empty(numel, device=device).uniform_()
    dst = torch.empty_like(src).fill_(1.0)
    methods: dict[str, Callable[[], object]] = {"torch copy_": lambda: dst.copy_(src)}
    if torch.device(device).type == "cpu":
        src_np, dst_np = src.numpy(), dst.numpy()
        threads = max(1, min(2, torch.get_num_threads()))
        pool = ThreadPoolExecutor(threads)
        bounds = np.linspace(0, numel, threads + 1, dtype=np.int64)
        halves = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        methods["memcpy 1 thread"] = lambda: np.copyto(dst_np, src_np)
        if threads > 1:
            methods[f"memcpy {threads} threads"] = lambda: list(
                pool.map(lambda s: np.copyto(dst_np[s], src_np[s]), halves)
            )
    results = {}
    for name, fn in methods.items():
        timing = measure(fn, warmup=2, repeats=repeats, device=device)
        results[name] = {"timing": timing.as_dict(), "gbps": timing.gbps(2 * num_bytes)}
    scale = measure(lambda: dst.mul_(1.0), warmup=2, repeats=repeats, device=device)
    best = max(results, key=lambda k: results[k]["gbps"])
    return {
        "bytes": num_bytes,
        "methods": results,
        "inplace_scale": {"timing": scale.as_dict(), "gbps": scale.gbps(2 * num_bytes)},
        "best_method": best,
        "gbps": results[best]["gbps"],
    }


# ---------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to the current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def run_probe(module: str, *args: str, env: dict[str, str] | None = None, timeout_s: float = 300.0):
    """Run ``python -m <module> <args>`` in a fresh process (clean allocator, clean peak RSS), with
    ``env`` added to the environment, and return the JSON value its last stdout line holds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {args} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the figures were measured on; ``name`` is a file-name slug (``<cpu>-<n>c`` or the GPU)."""
    import hpa_kernels

    from .workloads import device_backends

    info = {
        "cpu": cpu_model(),
        "cores": num_cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hpa_kernels": hpa_kernels.__version__,
        "backends": device_backends(device),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        base = info["gpu"]
    else:
        base = f"{info['cpu']}-{info['cores']}c"
    info["name"] = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    return info
