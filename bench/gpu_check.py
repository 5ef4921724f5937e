"""The GPU check of the kernels, in one run of under five minutes: ``bash bench/gpu_check.sh``.

Each step runs in a process of its own under its own timeout (:data:`STEPS`, 295 s in all; three
times that in a dry run), so a hang costs one step and a failed step does not hide the results of
the next ones:

1. ``env``: python, torch, CUDA, triton, driver and nvcc versions, the GPU's name, SM count,
   capability and memory. No GPU fails here and ends the run.
2. ``build``: ``python setup.py build_ext --inplace`` with ``HPA_BUILD_CUDA=1`` (a missing nvcc is
   an error) and ``HPA_CUDA_ARCHS`` from the device's capability unless it is set.
3. ``backends``: :func:`hpa_kernels.ops.available_backends`; ``cuda`` or ``triton`` missing fails,
   with the reason (the warning of a compiled module that did not load).
4. ``tests``: ``pytest tests/test_ops.py -m gpu -rfEs``; a failure, an error, no test, no test
   passed on a GPU, or a skip this machine does not explain fails (:func:`tests_check`): a
   ``"needs a CUDA GPU and the 'cuda' backend"`` skip on a GPU means ``_C_cuda`` did not load.
5. ``bench``: ms, GB/s and share of the measured copy bandwidth per op × dtype × backend, and
   ``torch.optim.AdamW(fused=True)`` on the same tensors; bytes from :func:`adamw_bytes`,
   :func:`reduce_bytes`, :func:`apply_bytes` and :func:`online_bytes`.
6. ``launches``: kernels (``torch.profiler``) and host syncs of one ``HPAOptimizer.step`` over 291
   tensors (:func:`llama7b_spec`) per backend. A host sync fails: a refusal under
   ``torch.cuda.set_sync_debug_mode("error")``, a synchronising CUDA call or a copy from pageable
   host memory in the profile (:func:`count_events`).
7. ``bits``: the three outputs of ``hpa_reduce``, the scores ε̄, ζ̄
   :func:`hpa_kernels.functional.column_scores_from_energy` makes of its column energies on the same
   device, and the columns :func:`hpa_kernels.functional.select_columns` retains from them, on every
   backend, against the ``torch`` backend on CPU tensors (:func:`compare_bits`); one differing bit
   fails.

The exit status is 0 only when no check failed (:func:`exit_status`); a summary table ends the
output (also written to ``<log>/summary.txt``, next to each step's log).

``--dry-run`` (or ``HPA_GPU_CHECK_DRY_RUN=1``) runs the same steps without a GPU: CPU tensors,
tiny sizes, the backends of this machine (``triton`` under ``TRITON_INTERPRET=1``). The build is
skipped, so are the launch and sync counts (the 291-tensor step still runs on every backend), and
test skips for a missing GPU are expected. ``--steps`` runs a subset (``env`` always runs first).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# This process imports neither torch nor hpa_kernels: the build replaces hpa_kernels' compiled
# modules, so every step that uses them imports them afresh, in its own process.

ROOT = Path(__file__).resolve().parent.parent
HYPER = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
RETAIN_RATIO = 0.1  # of the masks compared in the bits step and of hpa_apply / online_step's masks
STEP_TENSORS = 291


@dataclass(frozen=True)
class Step:
    """One step of the check: its name and the wall-clock seconds it may take."""

    name: str
    timeout_s: int


STEPS = (
    Step("env", 15),
    Step("build", 65),
    Step("backends", 15),
    Step("tests", 120),
    Step("bench", 35),
    Step("launches", 20),
    Step("bits", 25),
)
DRY_RUN_TIMEOUT_SCALE = 3  # a shared CPU machine and the Triton interpreter are slower than the GPU machine


def step_timeout(step: Step, dry_run: bool) -> int:
    """Seconds ``step`` may take: its ``timeout_s``, times :data:`DRY_RUN_TIMEOUT_SCALE` in a dry run,
    times ``HPA_GPU_CHECK_TIMEOUT_SCALE`` (default 1; a slow or loaded machine, e.g. under pytest)."""
    scale = float(os.environ.get("HPA_GPU_CHECK_TIMEOUT_SCALE", "1"))
    return int(step.timeout_s * (DRY_RUN_TIMEOUT_SCALE if dry_run else 1) * scale)


@dataclass(frozen=True)
class Check:
    """One line of the summary; ``status`` is ``"ok"``, ``"FAIL"`` or ``"skip"`` (with the reason)."""

    name: str
    status: str
    detail: str


@dataclass
class Report:
    """What a step found: its checks, the rows of its table, and facts later steps use."""

    checks: list[Check] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode (a GPU run, or the dry run on CPU).

    Attributes:
        adamw_shapes: the tensors of one timed ``adamw_step`` call.
        matrix: (r, c) of the timed ``hpa_reduce``, ``hpa_apply`` and ``online_step``.
        copy_bytes: bytes of each copy that measures the copy bandwidth (read once, written once).
        repeats: timed calls per case (after two warm-up calls).
        bit_shapes: (r, c) of the ``hpa_reduce`` bit comparisons, in fp32, bf16 and fp16.
        bit_large: one more (r, c) compared in fp32 and bf16, or None.
        hidden, vocab: hidden and vocabulary size of the 291-tensor model.
    """

    adamw_shapes: tuple[tuple[int, ...], ...]
    matrix: tuple[int, int]
    copy_bytes: int
    repeats: int
    bit_shapes: tuple[tuple[int, int], ...]
    bit_large: tuple[int, int] | None
    hidden: int
    vocab: int


# adamw_step: one Llama-7B block (q, k, v, o; gate, up; down; two norms), 2.0e8 elements per call.
GPU_SIZES = Sizes(
    adamw_shapes=((4096, 4096),) * 4 + ((11008, 4096),) * 2 + ((4096, 11008),) + ((4096,),) * 2,
    matrix=(4096, 11008),
    copy_bytes=1 << 30,
    repeats=10,
    bit_shapes=((1, 1), (17, 33), (129, 65), (4097, 3), (257, 1023), (2, 16500)),
    bit_large=(2048, 11008),
    hidden=256,
    vocab=32000,
)
DRY_RUN_SIZES = Sizes(
    adamw_shapes=((17, 33), (7,)),
    matrix=(33, 65),
    copy_bytes=1 << 22,
    repeats=3,
    bit_shapes=((1, 1), (17, 33), (129, 65), (3, 300)),
    bit_large=None,
    hidden=16,
    vocab=64,
)


# ------------------------------------------------------------------------------------ byte counts
# The bytes an op must move: its tensor arguments and results, each read or written once, at the
# dtypes the kernels use. Workspaces (the reduce's fp64 block partials, the online step's per-chunk
# column sums) and 0-d scalars (step counts, lr, c') are the kernels' own overhead and not counted,
# so the "% copy" of a table row shows it.


def adamw_bytes(numel: int, param_size: int, moment_size: int = 4) -> int:
    """Bytes of one AdamW step over ``numel`` elements: p read and written, g read (``param_size``
    bytes each), m and v read and written (``moment_size`` bytes each).

    ``adamw_step`` keeps fp32 moments whatever the parameter dtype: 3·4 + 4·4 = 28 B/element for
    fp32 parameters, 3·2 + 4·4 = 22 for bf16. ``torch.optim.AdamW(fused=True)`` keeps them in the
    parameter's dtype (``moment_size=param_size``): 28 in fp32, 3·2 + 4·2 = 14 in bf16.
    """
    return numel * (3 * param_size + 4 * moment_size)


def reduce_bytes(rows: int, cols: int, size: int) -> int:
    """Bytes of ``hpa_reduce`` on (rows, cols) weights of ``size`` bytes per element: W_prev and
    W_new read, the fp64 (cols,) column energies and the fp32 0-d dot and norm² written."""
    return 2 * rows * cols * size + 8 * cols + 8


def apply_bytes(rows: int, cols: int, size: int) -> int:
    """Bytes of ``hpa_apply`` on (rows, cols) weights of ``size`` bytes per element: W_prev and
    W_new read, Ŵ written, the (cols,) bool mask read."""
    return 3 * rows * cols * size + cols


def online_bytes(rows: int, cols: int, size: int, orthogonal: bool = True) -> int:
    """Bytes of ``online_step`` on a (rows, cols) weight of ``size`` bytes per element.

    Pass 1 reads W, g and W_prev and writes W (4 × ``size`` per element), reads and writes the fp32
    m and v (16), reads the (cols,) bool mask and reads and writes the fp32 (cols,) col_energy (9
    per column). Pass 2 (``orthogonal``) reads W and W_prev and writes W on the non-retained
    columns, counted whole (3 × ``size`` per element): a scattered mask leaves almost no 32-byte
    memory sector untouched. It reads the mask again (1 per column).
    """
    per_element = 4 * size + 16 + (3 * size if orthogonal else 0)
    return rows * cols * per_element + cols * (9 + (1 if orthogonal else 0))


# ------------------------------------------------------------------------------------ judging results


def expected_skips(*, gpus: int, gpu_memory_gib: float, dry_run: bool) -> list[str]:
    """Patterns (``re.search``) of the skip reasons of tests/test_ops.py this machine explains:
    two GPUs on fewer, 30 GiB of GPU memory on less than 40, and, in a dry run, a missing GPU."""
    allowed = []
    if gpus < 2:
        allowed.append(r"^needs two GPUs")
    if gpu_memory_gib < 40:
        allowed.append(r"^needs about \d+ GiB of GPU memory")
    if dry_run:
        allowed.append(r"^needs a CUDA GPU")
    return allowed


def tests_check(junit: Path, rc: int, *, expected: Sequence[str], dry_run: bool) -> Check:
    """The verdict on a pytest run, from its JUnit XML file and exit status ``rc``.

    Fails on a missing or unreadable result file, no test case, a failure or error (collection
    errors included), a skip whose reason matches none of ``expected`` (:func:`expected_skips`),
    a non-zero ``rc``, or, unless ``dry_run``, no test passed.
    """
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as exc:
        return Check("tests", "FAIL", f"pytest exited {rc} without a readable result file ({exc})")
    passed, failed, skipped = 0, [], []
    for case in root.iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            passed += 1
        elif outcome.tag == "skipped":
            skipped.append(outcome.get("message", ""))
        else:
            failed.append(f"{case.get('name')} ({outcome.tag})")
    counts = f"{passed} passed, {len(failed)} failed, {len(skipped)} skipped"
    unexpected = sorted({reason for reason in skipped if not any(re.search(p, reason) for p in expected)})
    if failed:
        return Check("tests", "FAIL", f"{counts}: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}")
    if unexpected:
        return Check("tests", "FAIL", f"{counts}; unexpected skips: {'; '.join(unexpected)}")
    if passed + len(skipped) == 0:
        return Check("tests", "FAIL", f"no test ran (pytest exit status {rc})")
    if rc != 0 or (passed == 0 and not dry_run):
        return Check("tests", "FAIL", f"{counts} (pytest exit status {rc})")
    reasons = "; ".join(sorted(set(skipped)))
    return Check("tests", "ok", counts + (f" (expected skips: {reasons})" if reasons else ""))


_SYNC_CALLS = re.compile(
    r"^(cuda(Device|Stream|Event)Synchronize|cudaMemcpy(2D)?|cuCtxSynchronize|cu(Stream|Event)Synchronize"
    r"|cuMemcpy[DH]to[DH](_v2)?)$"
)


def count_events(events: Iterable[Any], marker: str) -> dict[str, int]:
    """Kernels, copies and host syncs among the ``torch.profiler`` events of a profile around one step.

    Args:
        events: ``prof.events()``; each has ``name``, ``device_type`` and ``time_range``.
        marker: the name of the ``record_function`` around the step.

    Returns:
        ``{"kernels", "copies", "syncs"}``: device events that are kernels, device copies and
        fills (``Memcpy`` / ``Memset``), and host syncs: the synchronising CUDA runtime and driver
        calls made on the host inside the marker (not the synchronize that ends the profile),
        plus the copies from or to pageable host memory, which synchronise too. The marker's
        own device-side annotation is not a kernel.
    """
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    events = list(events)
    step = next(e for e in events if e.name == marker and e.device_type != cuda)
    kernels = copies = syncs = 0
    for e in events:
        if e.device_type == cuda:
            if e.name == marker or getattr(e, "is_user_annotation", False):
                continue
            if e.name.startswith(("Memcpy", "Memset")):
                copies += 1
                syncs += "Pageable" in e.name
            else:
                kernels += 1
        elif _SYNC_CALLS.match(e.name) and step.time_range.start <= e.time_range.start <= step.time_range.end:
            syncs += 1
    return {"kernels": kernels, "copies": copies, "syncs": syncs}


BIT_OUTPUTS = ("col_energy", "dot", "norm_sq", "eps_bar", "zeta_bar", "mask")


def compare_bits(want: Sequence[Any], got: Mapping[str, Sequence[Any]]) -> list[str]:
    """What differs, bit for bit, between the reference's outputs ``want`` and each backend's.

    Args:
        want: the six tensors of :data:`BIT_OUTPUTS` on CPU: ``hpa_reduce``'s float64 (c,) column
            energies, float32 0-d dot and 0-d norm², the float32 (c,) ε̄ and ζ̄ from the energies,
            and the (c,) bool mask selected from them.
        got: backend name → the same six, on CPU.

    Returns:
        One line per differing output (``"<backend> <output>: k of n differ"``, or its dtype and
        shape when those differ); empty when every bit agrees (NaNs compare by their bits).
    """
    import torch

    integers = {torch.float32: torch.int32, torch.float64: torch.int64}

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(integers[t.dtype]) if t.dtype in integers else t.reshape(-1)

    differences = []
    for backend, outputs in got.items():
        for name, a, b in zip(BIT_OUTPUTS, want, outputs):
            if a.shape != b.shape or a.dtype != b.dtype:
                differences.append(f"{backend} {name}: {b.dtype} {tuple(b.shape)} != {a.dtype} {tuple(a.shape)}")
            elif not torch.equal(raw(a), raw(b)):
                differing = int((raw(a) != raw(b)).sum())
                differences.append(f"{backend} {name}: {differing} of {a.numel()} differ")
    return differences


def exit_status(summary: Iterable[Mapping[str, Any]]) -> int:
    """The exit status of a run from its summary rows: 1 when any row's status is ``"FAIL"``, else 0."""
    return 1 if any(row["status"] == "FAIL" for row in summary) else 0


# ------------------------------------------------------------------------------------ the steps' work


def _device(dry_run: bool):
    import torch

    return torch.device("cpu" if dry_run else "cuda")


def runnable_backends(device: Any) -> list[str]:
    """The backends of ``ops.available_backends()`` that run tensors on ``device``."""
    from hpa_kernels import ops

    names = []
    for name in ops.available_backends():
        try:
            ops.resolve_backend(name, device)
        except ValueError:
            continue
        names.append(name)
    return names


def _tool_version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "not found"
    found = re.search(pattern, out)
    if found:
        return found.group(1)
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _nvcc() -> str | None:
    """nvcc where setup.py looks for it: $CUDA_HOME/bin, $CUDA_PATH/bin, $PATH, /usr/local/cuda/bin."""
    homes = [os.environ.get(var) for var in ("CUDA_HOME", "CUDA_PATH")]
    candidates = [str(Path(home) / "bin" / "nvcc") for home in homes if home]
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def env_report(dry_run: bool) -> Report:
    """Versions, and the GPU (name, SM count, capability, memory); no GPU fails unless ``dry_run``."""
    import torch

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    nvcc = _nvcc()
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": version("triton"),
        "driver": _tool_version(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], r"(\S+)"),
        "nvcc": _tool_version([nvcc], r"release ([\d.]+)") if nvcc else "not found",
    }
    report = Report(info={"gpus": 0, "gpu_memory_gib": 0.0})
    report.checks.append(Check("versions", "ok", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpus = torch.cuda.device_count()
        memory = props.total_memory / 2**30
        report.info.update(gpus=gpus, gpu_memory_gib=memory, capability=f"{props.major}{props.minor}")
        detail = (
            f"{props.name}, {props.multi_processor_count} SMs, capability {props.major}.{props.minor}, "
            f"{memory:.0f} GiB" + (f", {gpus} GPUs (checks use cuda:0)" if gpus > 1 else "")
        )
        report.checks.append(Check("gpu", "ok", detail))
    elif dry_run:
        report.checks.append(Check("gpu", "skip", "none used (dry run: CPU tensors)"))
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "no device visible"
        report.checks.append(Check("gpu", "FAIL", f"torch sees no CUDA GPU ({why}); --dry-run checks on CPU"))
    return report


def backends_report(dry_run: bool) -> Report:
    """The loaded backends; ``cuda`` and ``triton`` are required unless ``dry_run``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from hpa_kernels import ops

        available = ops.available_backends()
    detail = ", ".join(available)
    missing = [] if dry_run else [name for name in ("cuda", "triton") if name not in available]
    if not missing:
        return Report([Check("backends", "ok", detail)], info={"backends": available})
    reasons = [str(w.message) for w in caught if "hpa_kernels" in str(w.message)]
    if "cuda" in missing and not any("_C_cuda" in r for r in reasons):
        built = importlib.util.find_spec("hpa_kernels._C_cuda") is not None
        reasons.append("hpa_kernels._C_cuda loaded but sees no GPU" if built else "hpa_kernels._C_cuda is not built")
    if "triton" in missing:
        installed = importlib.util.find_spec("triton") is not None
        reasons.append("triton is installed but torch sees no GPU" if installed else "triton is not installed")
    detail = f"missing {', '.join(missing)}; loaded {detail}" + "".join(f"; {r}" for r in reasons)
    return Report([Check("backends", "FAIL", detail)], info={"backends": available})


@dataclass(frozen=True)
class BenchCase:
    """One timed call: ``fn()`` runs ``op`` on ``backend`` over ``numel`` elements, moving ``num_bytes``."""

    op: str
    backend: str
    shape: str
    numel: int
    num_bytes: int
    fn: Callable[[], object]


def _bench_cases(sizes: Sizes, device: Any, dtype: Any, backends: list[str]) -> Iterator[BenchCase]:
    """Every timed case of one parameter dtype; each case's tensors are made when it is reached."""
    import torch

    from hpa_kernels import ops

    size = torch.empty((), dtype=dtype).element_size()

    def rand(shape, scale=1.0):
        return (torch.randn(shape, device=device) * scale).to(dtype)

    numel = sum(torch.Size(s).numel() for s in sizes.adamw_shapes)
    label = f"{len(sizes.adamw_shapes)} tensors"
    for backend in backends:
        args = (
            [rand(s) for s in sizes.adamw_shapes],
            [rand(s, 1e-3) for s in sizes.adamw_shapes],
            [torch.zeros(s, device=device) for s in sizes.adamw_shapes],
            [torch.zeros(s, device=device) for s in sizes.adamw_shapes],
            [torch.zeros((), device=device) for _ in sizes.adamw_shapes],
        )

        def adamw(args=args, backend=backend):
            ops.adamw_step(*args, **HYPER, backend=backend)

        yield BenchCase("adamw_step", backend, label, numel, adamw_bytes(numel, size), adamw)
    fused = [torch.nn.Parameter(rand(s)) for s in sizes.adamw_shapes]
    for p in fused:
        p.grad = rand(p.shape, 1e-3)
    opt = torch.optim.AdamW(
        fused,
        lr=HYPER["lr"],
        betas=(HYPER["beta1"], HYPER["beta2"]),
        eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
        fused=True,
    )
    yield BenchCase("adamw_step", "torch-fused", label, numel, adamw_bytes(numel, size, size), opt.step)

    rows, cols = sizes.matrix
    w_prev = rand(sizes.matrix)
    w_new = (w_prev.float() + 0.01 * torch.randn(sizes.matrix, device=device)).to(dtype)
    hinv_safety, hinv_task = (torch.rand(cols, device=device) + 0.5 for _ in range(2))
    mask = torch.rand(cols, device=device) < RETAIN_RATIO
    out = torch.empty_like(w_new)
    label = f"{rows}x{cols}"
    for backend in backends:

        def reduce(backend=backend):
            ops.hpa_reduce(w_prev, w_new, hinv_safety, hinv_task, backend=backend)

        yield BenchCase("hpa_reduce", backend, label, rows * cols, reduce_bytes(rows, cols, size), reduce)
    for backend in backends:

        def apply(backend=backend):
            ops.hpa_apply(w_prev, w_new, mask, 0.01, out, backend=backend)

        yield BenchCase("hpa_apply", backend, label, rows * cols, apply_bytes(rows, cols, size), apply)
    for backend in backends:
        state = (
            w_new.clone(),
            rand(sizes.matrix, 1e-3),
            torch.zeros(sizes.matrix, device=device),
            torch.zeros(sizes.matrix, device=device),
            torch.zeros((), device=device),
            torch.zeros(cols, device=device),
        )

        lagged = ops.OnlineProjection(mode="lagged", coef=torch.zeros((), device=device))

        def online(state=state, backend=backend, projection=None):
            param, grad, exp_avg, exp_avg_sq, step, col_energy = state
            ops.online_step(
                param, grad, exp_avg, exp_avg_sq, step, w_prev, mask, col_energy, **HYPER,
                projection=projection, backend=backend,
            )  # fmt: skip

        yield BenchCase("online_step", backend, label, rows * cols, online_bytes(rows, cols, size), online)
        # The lagged projection: pass 1's bytes only.
        one_pass = online_bytes(rows, cols, size, orthogonal=False)
        yield BenchCase("online_step_lagged", backend, label, rows * cols, one_pass, partial(online, projection=lagged))


def bench_report(dry_run: bool) -> Report:
    """ms, GB/s and % of the copy bandwidth of every op × dtype (fp32, bf16) × backend, and of
    torch's fused AdamW; a case that raises fails the step (the others are still timed)."""
    import torch

    from .harness import copy_bandwidth, measure

    sizes = DRY_RUN_SIZES if dry_run else GPU_SIZES
    device = _device(dry_run)
    backends = runnable_backends(device)
    copy = copy_bandwidth(sizes.copy_bytes, device, repeats=sizes.repeats)["gbps"]
    report = Report()
    errors = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for case in _bench_cases(sizes, device, dtype, backends):
            try:
                seconds = measure(case.fn, warmup=2, repeats=sizes.repeats, device=device).median
            except Exception as exc:  # a kernel that raises is a result of the check, not its end
                errors.append(f"{case.op} {name} {case.backend}: {type(exc).__name__}: {exc}")
                continue
            gbps = case.num_bytes / seconds / 1e9
            report.rows.append(
                {
                    "op": case.op,
                    "dtype": name,
                    "backend": case.backend,
                    "shape": case.shape,
                    "B/elem": round(case.num_bytes / case.numel, 2),
                    "ms": round(seconds * 1e3, 3),
                    "GB/s": round(gbps, 1),
                    "% copy": round(100 * gbps / copy, 1),
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    detail = f"{len(report.rows)} cases, copy bandwidth {copy:.0f} GB/s ({device.type})"
    report.checks.append(Check("bench", "FAIL" if errors else "ok", "; ".join(errors) or detail))
    return report


def llama7b_spec(hidden: int, vocab: int):
    """The 291 parameter tensors of Llama-7B at hidden size ``hidden`` and vocabulary ``vocab``: 32
    blocks of q, k, v, o (hidden, hidden), gate, up (ffn, hidden), down (hidden, ffn) and two
    (hidden,) norms, ffn = hidden · 11008 / 4096 rounded; the embedding and head (vocab, hidden)
    and the final (hidden,) norm. A :class:`bench.workloads.ModelSpec`."""
    from .workloads import LinearSpec, ModelSpec

    ffn = round(hidden * 11008 / 4096)
    shapes = [("q_proj", hidden, hidden), ("k_proj", hidden, hidden), ("v_proj", hidden, hidden)]
    shapes += [("o_proj", hidden, hidden), ("gate_proj", ffn, hidden), ("up_proj", ffn, hidden)]
    shapes += [("down_proj", hidden, ffn)]
    spec = ModelSpec(
        name=f"llama-7b-tensors-h{hidden}",
        description=f"Llama-7B's {STEP_TENSORS} parameter tensors at hidden size {hidden}",
        linears=tuple(LinearSpec(name, out, inp, False) for name, out, inp in shapes),
        vectors=(("input_layernorm", hidden), ("post_attention_layernorm", hidden)),
        num_blocks=32,
        extras=(("embed_tokens", (vocab, hidden)), ("norm", (hidden,)), ("lm_head", (vocab, hidden))),
    )
    assert spec.num_tensors == STEP_TENSORS, spec.num_tensors
    return spec


def _profile_step(step: Callable[[], object]) -> dict[str, int]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    marker = "gpu_check.step"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(marker):
            step()
        torch.cuda.synchronize()
    return count_events(prof.events(), marker)


def _sync_refusal(step: Callable[[], object]) -> str | None:
    """None when ``step`` runs under ``set_sync_debug_mode("error")``, else the refusal's first line."""
    import torch

    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def launch_report(dry_run: bool) -> Report:
    """Kernels, copies and host syncs of one 291-tensor ``HPAOptimizer.step`` on every backend of
    the device but ``torch`` (and of torch's fused AdamW, for comparison, not judged); in a dry run
    the steps run (after a first one that creates the state), uncounted."""
    import torch

    from hpa_kernels import HPAOptimizer

    from .workloads import LR, WEIGHT_DECAY, build_model

    sizes = DRY_RUN_SIZES if dry_run else GPU_SIZES
    device = _device(dry_run)
    spec = llama7b_spec(sizes.hidden, sizes.vocab)
    report = Report()
    failures = []
    variants = [b for b in runnable_backends(device) if b != "torch"] + ["torch-fused"]
    for variant in variants:
        model = build_model(spec, device)
        params = list(model.parameters())
        if variant == "torch-fused":
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        else:
            opt = HPAOptimizer.from_model(model, lr=LR, weight_decay=WEIGHT_DECAY, backend=variant)
        opt.step()  # state created, kernels compiled
        row: dict[str, Any] = {"step": variant, "tensors": len(params)}
        if dry_run:
            opt.step()
            report.rows.append(row | {"kernels": "-", "copies": "-", "syncs": "-", "sync debug": "-"})
        else:
            torch.cuda.synchronize()
            refusal = _sync_refusal(opt.step)
            counts = _profile_step(opt.step)
            report.rows.append(row | counts | {"sync debug": refusal or "none"})
            if variant != "torch-fused":
                if refusal or counts["syncs"]:
                    refused = f", refused: {refusal}" if refusal else ""
                    failures.append(f"{variant}: {counts['syncs']} host syncs in the profile{refused}")
                if counts["kernels"] == 0:
                    failures.append(f"{variant}: the profiler recorded no kernel")
        del model, params, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if dry_run:
        detail = f"{STEP_TENSORS}-tensor steps ran on {', '.join(variants)}; launch and sync counts need a GPU"
        report.checks.append(Check("launches", "skip", detail))
    elif failures:
        report.checks.append(Check("launches", "FAIL", "; ".join(failures)))
    else:
        counts = ", ".join(f"{r['step']} {r['kernels']}" for r in report.rows)
        report.checks.append(Check("launches", "ok", f"no host sync; kernels per step: {counts}"))
    return report


def bits_report(dry_run: bool) -> Report:
    """``hpa_reduce``'s outputs and the masks selected from them on every backend, bit for bit,
    against the ``torch`` backend on CPU tensors: each backend of the device on the device's
    tensors (``torch`` on a GPU included), and ``cpu`` on CPU tensors."""
    import torch

    from hpa_kernels import ops
    from hpa_kernels.functional import column_scores_from_energy, select_columns

    sizes = DRY_RUN_SIZES if dry_run else GPU_SIZES
    device = _device(dry_run)
    cpu = torch.device("cpu")
    targets = {name: device for name in runnable_backends(device)}
    if "cpu" in ops.available_backends():
        targets["cpu"] = cpu
    if targets.get("torch") == cpu:
        del targets["torch"]
    if not targets:
        return Report([Check("bits", "skip", "no backend but torch (cpu) to compare")])
    cases = [(shape, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16) for shape in sizes.bit_shapes]
    if sizes.bit_large is not None:
        cases += [(sizes.bit_large, dtype) for dtype in (torch.float32, torch.bfloat16)]

    def outputs(inputs, backend, dev):
        w_prev, w_new, hinv_safety, hinv_task = (t.to(dev) for t in inputs)
        col_energy, dot, norm_sq = ops.hpa_reduce(w_prev, w_new, backend=backend)
        eps_bar = column_scores_from_energy(col_energy, w_new.shape[0], hinv_safety)
        zeta_bar = column_scores_from_energy(col_energy, w_new.shape[0], hinv_task)
        mask, _ = select_columns(eps_bar, zeta_bar, RETAIN_RATIO)
        return [t.cpu() for t in (col_energy, dot, norm_sq, eps_bar, zeta_bar, mask)]

    report = Report()
    differences = []
    for shape, dtype in cases:
        gen = torch.Generator().manual_seed(shape[0] * 100003 + shape[1])
        w_prev = torch.randn(shape, generator=gen).to(dtype)
        w_new = (w_prev.float() + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        inputs = (w_prev, w_new, torch.rand(shape[1], generator=gen) + 0.5, torch.rand(shape[1], generator=gen) + 0.5)
        want = outputs(inputs, "torch", cpu)
        found = compare_bits(want, {name: outputs(inputs, name, dev) for name, dev in targets.items()})
        label = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
        differences += [f"{label} {d}" for d in found]
        report.rows.append({"case": label, "backends": ", ".join(targets), "differences": len(found)})
    names = ", ".join(f"{name} ({dev.type})" for name, dev in targets.items())
    if differences:
        report.checks.append(Check("bits", "FAIL", "; ".join(differences[:6])))
    else:
        detail = f"{len(cases)} cases, {names} equal to torch (cpu) in every bit of E, dot, norm², ε̄, ζ̄, mask"
        report.checks.append(Check("bits", "ok", detail))
    return report


WORKERS: dict[str, Callable[[bool], Report]] = {
    "env": env_report,
    "backends": backends_report,
    "bench": bench_report,
    "launches": launch_report,
    "bits": bits_report,
}


# ------------------------------------------------------------------------------------ running the steps


@dataclass(frozen=True)
class Outcome:
    """How a command ended: exit status (-9 when killed at its timeout), seconds, and whether it timed out."""

    rc: int
    seconds: float
    timed_out: bool


def run_command(argv: list[str], *, timeout_s: float, log: Path, env: Mapping[str, str]) -> Outcome:
    """Run ``argv`` in the repository root, its output to ``log``; at ``timeout_s`` its whole
    process group (nvcc, pytest's children) is killed."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Outcome(-9, time.monotonic() - start, True)
    return Outcome(rc, time.monotonic() - start, False)


def _tail(log: Path, lines: int = 15, pattern: str | None = None) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    if pattern:
        text = [line for line in text if re.match(pattern, line)] or text
    return "\n".join("    " + line for line in text[-lines:])


def child_env(dry_run: bool) -> dict[str, str]:
    """The environment of every step: no backend override; ``TRITON_INTERPRET=1`` in a dry run
    (Triton on CPU tensors), unset on a GPU (compiled Triton)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HPA_KERNELS_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    return env


def _failed(step: Step, outcome: Outcome, log: Path) -> Check:
    why = f"timed out after {outcome.seconds:.0f} s" if outcome.timed_out else f"exit status {outcome.rc}"
    return Check(step.name, "FAIL", f"{why} (log: {log})")


def run_step(step: Step, log_dir: Path, env: Mapping[str, str], *, dry_run: bool, info: Mapping[str, Any]) -> Report:
    """Run one step in its own process and judge it; ``info`` holds what earlier steps found."""
    log = log_dir / f"{step.name}.log"
    py = sys.executable
    timeout_s = step_timeout(step, dry_run)
    if step.name == "build":
        if dry_run:
            return Report([Check("build", "skip", "dry run: the CUDA module is not built")])
        archs = os.environ.get("HPA_CUDA_ARCHS") or info["capability"]
        build_env = {**env, "HPA_BUILD_CUDA": "1", "HPA_CUDA_ARCHS": archs}
        argv = [py, "setup.py", "build_ext", "--inplace", "--parallel", str(os.cpu_count() or 1)]
        outcome = run_command(argv, timeout_s=timeout_s, log=log, env=build_env)
        if outcome.rc != 0:
            print(_tail(log, 30), flush=True)
            return Report([_failed(step, outcome, log)])
        return Report([Check("build", "ok", f"HPA_CUDA_ARCHS={archs}, {outcome.seconds:.0f} s")])
    if step.name == "tests":
        junit = log_dir / "tests.xml"
        junit.unlink(missing_ok=True)
        argv = [py, "-m", "pytest", "tests/test_ops.py", "-m", "gpu", "-rfEs", "-q", "-p", "no:cacheprovider"]
        argv.append(f"--junitxml={junit}")
        outcome = run_command(argv, timeout_s=timeout_s, log=log, env=env)
        if outcome.timed_out:
            print(_tail(log), flush=True)
            return Report([_failed(step, outcome, log)])
        expected = expected_skips(
            gpus=info.get("gpus", 0), gpu_memory_gib=info.get("gpu_memory_gib", 0.0), dry_run=dry_run
        )
        check = tests_check(junit, outcome.rc, expected=expected, dry_run=dry_run)
        if check.status == "FAIL":
            print(_tail(log, 20, r"(FAILED|ERROR|SKIPPED)"), flush=True)
        return Report([check])
    out = log_dir / f"{step.name}.json"
    out.unlink(missing_ok=True)
    argv = [py, "-m", "bench.gpu_check", "--worker", step.name, "--out", str(out)] + (["--dry-run"] if dry_run else [])
    outcome = run_command(argv, timeout_s=timeout_s, log=log, env=env)
    if outcome.rc != 0 or not out.is_file():
        print(_tail(log), flush=True)
        return Report([_failed(step, outcome, log)])
    data = json.loads(out.read_text())
    return Report([Check(**c) for c in data["checks"]], data["rows"], data["info"])


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` as aligned text columns (the keys of the first row), numbers right-aligned."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[str(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    numeric = [all(isinstance(row.get(k), (int, float)) for row in rows) for k in keys]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(keys), *(line(c) for c in cells)])


def select_steps(names: str | None) -> tuple[Step, ...]:
    """The steps of :data:`STEPS` named in ``names`` (comma-separated), in their order, ``env`` always
    included; every step when ``names`` is None.

    Raises:
        ValueError: a name that is not a step.
    """
    if names is None:
        return STEPS
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    unknown = wanted - {step.name for step in STEPS}
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}; steps: {', '.join(s.name for s in STEPS)}")
    return tuple(step for step in STEPS if step.name in wanted | {"env"})


def run(log_dir: Path, *, dry_run: bool, steps: Sequence[Step] = STEPS) -> int:
    """Run ``steps`` in order, print each step's table and the summary; returns :func:`exit_status`.

    After a failed ``env`` step (no GPU) the remaining steps are not run.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(dry_run)
    budget = sum(step_timeout(s, dry_run) for s in steps)
    mode = "dry run: CPU tensors, tiny sizes" if dry_run else "GPU run"
    print(f"gpu_check ({mode}): {len(steps)} steps, timeouts {budget} s in all; logs in {log_dir}", flush=True)
    summary: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    stopped = None
    start = time.monotonic()
    for step in steps:
        if stopped:
            summary.append({"step": step.name, "check": step.name, "status": "skip", "s": 0.0, "detail": stopped})
            continue
        begun = time.monotonic()
        report = run_step(step, log_dir, env, dry_run=dry_run, info=info)
        seconds = round(time.monotonic() - begun, 1)
        info.update(report.info)
        if report.rows:
            print(f"\n---- {step.name} ----\n{format_table(report.rows)}", flush=True)
        for check in report.checks:
            print(f"[{step.name}] {check.name}: {check.status} — {check.detail}", flush=True)
            row = {"step": step.name, "check": check.name, "status": check.status, "s": seconds, "detail": check.detail}
            summary.append(row)
        if step.name == "env" and any(c.status == "FAIL" for c in report.checks):
            stopped = "not run: the env step failed"
    status = exit_status(summary)
    failed = sum(row["status"] == "FAIL" for row in summary)
    verdict = f"{failed} of {len(summary)} checks FAILED" if status else f"no check of {len(summary)} failed"
    text = f"---- summary ({time.monotonic() - start:.0f} s; {verdict}; exit status {status}) ----\n"
    text += format_table(summary)
    print("\n" + text, flush=True)
    (log_dir / "summary.txt").write_text(text + "\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``bash bench/gpu_check.sh`` (``python bench/gpu_check.py``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="bash bench/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=os.environ.get("HPA_GPU_CHECK_DRY_RUN", "0") == "1",
        help="no GPU: CPU tensors, tiny sizes, no build, no launch counts (also HPA_GPU_CHECK_DRY_RUN=1)",
    )
    parser.add_argument(
        "--steps",
        help=f"comma-separated steps to run, of {', '.join(s.name for s in STEPS)} (env always runs; default: all)",
    )
    parser.add_argument(
        "--log",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "hpa_gpu_check",
        help="folder of the logs and the summary (default: $TMPDIR/hpa_gpu_check)",
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        report = WORKERS[args.worker](args.dry_run)
        data = {"checks": [asdict(c) for c in report.checks], "rows": report.rows, "info": report.info}
        args.out.write_text(json.dumps(data))
        return 0
    try:
        steps = select_steps(args.steps)
    except ValueError as exc:
        parser.error(str(exc))
    return run(args.log, dry_run=args.dry_run, steps=steps)


if __name__ == "__main__":
    sys.exit(main())
