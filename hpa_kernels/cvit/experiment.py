"""The experiment of ``hpa-cvit``: safety alignment, then every method over the task sequence.

Stage 0 aligns the chat model by supervised fine-tuning of all its weights: harmful training
prompts answered with refusals (:data:`~hpa_kernels.cvit.prompts.REFUSALS`), benign training
prompts answered with the base model's own greedy answers (self-distillation keeps it helpful);
the loss is on the answer tokens only. The aligned model is cached in ``<out>/aligned/`` with
the settings that made it, so every method and every later run with the same settings starts
from the same weights.

Each method then learns the tasks in order (HPA_SPEC.md § Setting, the paper's protocol): with
LoRA on every linear layer of the decoder blocks (``--full``: the dense weights instead) through
:class:`~hpa_kernels.HPAOptimizer`; at the task's end the adapter is merged and, for HPA, the
merged dense weights are edited (:mod:`hpa_kernels.adapters`). HPA calibrates on 8 harmful
training prompts with the aligned model's own refusals before the task (on W_prev) and on 128
task samples after it (on W_new), prompt and answer tokens, padding excluded (Step 0). After
stage 0 and after every task: accuracy on every task so far, and the judge's verdicts on greedy
answers to held-out harmful, benign and XSTest-safe prompts.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import HPAConfig, HPAOptimizer, adapters
from ..integrations import calibrate
from ..layers import find_hpa_layers
from . import metrics
from .data import SafetyData, TaskData
from .judge import Judge, KeywordJudge, Verdict, verdict_shares
from .methods import Method, RunContext, TaskContext, dense_weights
from .model import ChatModel, answer_loss, generate, supervised_batch
from .prompts import REFUSALS, TaskPrompts
from .resume import Checkpoints, replace_atomic, rng_state, set_rng_state, write_json_atomic

# Harmful prompts whose answers go to samples.jsonl, per method and evaluation.
SAMPLES_PER_EVALUATION = 4
# Tokens of a task answer at evaluation: the label sentences are 6-12 tokens.
TASK_ANSWER_TOKENS = 16
# Tokens of the base model's own answers to benign prompts in the alignment data.
SELF_ANSWER_TOKENS = 64


@dataclass
class Plan:
    """Everything the CLI resolved and validated before any model is loaded.

    Attributes:
        tasks, prompts: the tasks in training order and their instruction renderers.
        train_sets: each task's (prompt, answer) training pairs, harmful pairs mixed in.
        steps: training steps per task.
        safety: the safety prompts; ``eval_prompts`` the held-out subsets evaluated
            (``harmful``, ``benign``, ``xstest_safe``; the last may be empty).
        methods: ``{name: Method}`` (:mod:`hpa_kernels.cvit.methods`).
    """

    data_dir: Path
    tasks: list[TaskData]
    prompts: list[TaskPrompts]
    train_sets: list[list[tuple[str, str]]]
    steps: list[int]
    safety: SafetyData
    eval_prompts: dict[str, list[str]]
    methods: dict[str, Method]
    device: torch.device


def seed_of(*keys: int) -> int:
    """A deterministic 63-bit seed from integer keys (stable across processes)."""
    return hash(tuple(keys)) & (2**63 - 1)


def run(args: argparse.Namespace, plan: Plan, chat: ChatModel, checkpoints: Checkpoints) -> tuple[dict, list[dict]]:
    """Stage 0, then every method over every task.

    Returns:
        ``(results, samples)``: the ``results.json`` object and the rows of ``samples.jsonl``.
    """
    started = time.perf_counter()
    judge = KeywordJudge(answer for p in plan.prompts for answer in p.answers())
    base_weights = None
    if any(method.needs_base_weights for method in plan.methods.values()):
        base_weights = {name: w.cpu() for name, w in dense_weights(find_hpa_layers(chat.model)).items()}
    stage0 = aligned_model(args, plan, chat, judge)
    checkpoints.maybe_stop()
    for label in ("base", "aligned"):
        e = stage0[label]
        tqdm.write(
            f"{label} model: ASR {100 * e['asr']:.1f}%, harmful refused {100 * e['harmful']['refused']:.1f}%, "
            f"over-refusal {100 * e['over_refusal']:.1f}%",
            file=sys.stderr,
        )
    results = {
        "config": {},
        "data": _data_summary(plan, stage0),
        "base": _safety_row(stage0["base"]),
        "aligned": _safety_row(stage0["aligned"]),
        "methods": {},
        "complete": False,
    }
    samples = [{"method": "base", "after": "stage 0", **s} for s in stage0["base"]["samples"]] + [
        {"method": "aligned", "after": "stage 0", **s} for s in stage0["aligned"]["samples"]
    ]
    total = len(plan.methods) * sum(plan.steps)
    bar = tqdm(total=total, unit="step", desc="tasks", disable=args.no_progress, dynamic_ncols=True)
    for name, method in plan.methods.items():
        model = copy.deepcopy(chat.model)
        method_chat = ChatModel(model=model, tokenizer=chat.tokenizer, source=chat.source)
        run_ = run_method(method, method_chat, stage0["calibration"], base_weights, plan, judge, args, bar, checkpoints)
        results["methods"][name] = run_["result"]
        samples += run_["samples"]
        results["wall_seconds"] = time.perf_counter() - started
        write_json_atomic(results, Path(args.out) / "results.json")
        del model, method_chat
    bar.close()
    results["complete"] = True
    results["wall_seconds"] = time.perf_counter() - started
    return results, samples


def aligned_model(args: argparse.Namespace, plan: Plan, chat: ChatModel, judge: Judge) -> dict:
    """Stage 0 on ``chat`` (in place): evaluate the base model, align it, evaluate it, pick the
    safety calibration set. Loaded from ``<out>/aligned/`` when the same settings made it.

    Returns:
        ``{"base", "aligned"}`` (evaluations), ``"calibration"`` ((prompt, refusal) pairs) and
        ``"alignment"`` (sizes of the alignment data).

    Raises:
        SystemExit: the aligned model refuses no harmful training prompt (alignment failed).
    """
    folder = Path(args.out) / "aligned"
    key = _stage0_key(args, plan, chat)
    cached = folder / "stage0.pt"
    if (folder / "key.json").is_file() and cached.is_file():
        if json.loads((folder / "key.json").read_text(encoding="utf-8")) == key:
            state = torch.load(cached, map_location="cpu", weights_only=True)
            chat.model.load_state_dict(state.pop("model"))
            return state
    torch.manual_seed(seed_of(args.seed, 2))
    base = evaluate(chat, [], plan, judge, args, "base model")
    pairs, sizes = alignment_pairs(chat, plan.safety, args)
    optimizer = HPAOptimizer(
        [p for p in chat.model.parameters() if p.requires_grad],
        lr=args.align_lr,
        weight_decay=args.weight_decay,
        hpa=HPAConfig(enabled=False),
        backend=args.backend,
    )
    steps = min(args.align_steps, max(1, math.ceil(args.align_epochs * len(pairs) / args.batch_size)))
    with tqdm(total=steps, unit="step", desc="align", disable=args.no_progress, dynamic_ncols=True) as bar:
        optimizer.begin_task()
        train_steps(chat, optimizer, pairs, steps, seed_of(args.seed, 2, 1), args, bar)
        optimizer.end_task()
    aligned = evaluate(chat, [], plan, judge, args, "aligned model")
    calibration = safety_calibration_pairs(chat, plan.safety, judge, _calibration_size(plan), args)
    state = {"base": base, "aligned": aligned, "calibration": calibration, "alignment": {**sizes, "steps": steps}}
    folder.mkdir(parents=True, exist_ok=True)
    replace_atomic(cached, lambda tmp: torch.save({**state, "model": chat.model.state_dict()}, tmp))
    write_json_atomic(key, folder / "key.json")
    return state


def alignment_pairs(chat: ChatModel, safety: SafetyData, args: argparse.Namespace) -> tuple[list, dict]:
    """The stage-0 SFT data: ``--align-samples`` harmful training prompts, each with a refusal
    drawn from :data:`REFUSALS`, and as many benign training prompts with the model's own greedy
    answers (at most :data:`SELF_ANSWER_TOKENS` tokens), in a seeded order."""
    rng = random.Random(seed_of(args.seed, 2, 2))
    harmful = rng.sample(safety.harmful_train, min(args.align_samples, len(safety.harmful_train)))
    benign = rng.sample(safety.benign_train, min(args.align_samples, len(safety.benign_train)))
    with tqdm(total=len(benign), unit="prompt", desc="self-answers", disable=args.no_progress, leave=False) as bar:
        own = generate(chat, benign, max_new_tokens=SELF_ANSWER_TOKENS, batch_size=args.eval_batch_size, progress=bar)
    pairs = [(p, rng.choice(REFUSALS)) for p in harmful] + [(p, a) for p, a in zip(benign, own) if a]
    rng.shuffle(pairs)
    return pairs, {"refusals": len(harmful), "self_answers": sum(1 for a in own if a)}


def safety_calibration_pairs(
    chat: ChatModel, safety: SafetyData, judge: Judge, need: int, args: argparse.Namespace
) -> list[tuple[str, str]]:
    """HPA_SPEC.md Step 0's D_s: the first ``need`` harmful training prompts, in a seeded order,
    that the aligned model refuses, with its own refusing answers (fewer if fewer are refused).

    Raises:
        SystemExit: the aligned model refuses none of the prompts.
    """
    prompts = list(safety.harmful_train)
    random.Random(seed_of(args.seed, 6)).shuffle(prompts)
    chosen: list[tuple[str, str]] = []
    for start in range(0, len(prompts), 4 * need):
        batch = prompts[start : start + 4 * need]
        answers = generate(chat, batch, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
        chosen += [(p, a) for p, a in zip(batch, answers) if judge.verdict(p, a) is Verdict.REFUSED]
        if len(chosen) >= need:
            return chosen[:need]
    if not chosen:
        raise SystemExit("hpa-cvit: the aligned model refuses no harmful training prompt; raise --align-steps")
    return chosen


def run_method(
    method: Method,
    chat: ChatModel,
    calibration: list[tuple[str, str]],
    base_weights: dict[str, torch.Tensor] | None,
    plan: Plan,
    judge: Judge,
    args: argparse.Namespace,
    bar: tqdm,
    checkpoints: Checkpoints,
) -> dict:
    """Tune ``chat`` (a copy of the aligned model) on every task with ``method``; evaluate after each.

    The hooks of ``method`` are called as :mod:`hpa_kernels.cvit.methods.base` describes. After
    each task the weights and the rows so far are checkpointed under the method's name; a
    checkpoint already there is restored and the method continues from its next task.

    Returns:
        ``{"result": the method's results.json entry, "samples": its samples.jsonl rows}``.
    """
    started = time.perf_counter()
    name, config = method.name, method.hpa
    torch.manual_seed(seed_of(args.seed, 7))
    safety_pairs = calibration[: config.safety_samples]
    benign = random.Random(seed_of(args.seed, 8)).sample(
        plan.safety.benign_train, min(len(safety_pairs), len(plan.safety.benign_train))
    )

    def batches(pairs: list[tuple[str, str]]) -> list[dict]:
        return _batches(chat, pairs, args)

    method.before_tasks(
        RunContext(chat, find_hpa_layers(chat.model, config), base_weights, safety_pairs, benign, batches, args)
    )
    if not args.full:
        chat.model = _with_lora(chat.model, args.lora_rank)
    rows: dict = {"after_task": [], "samples": [], "seconds": 0.0}
    saved = checkpoints.load(name)
    if saved is not None:
        rows = saved["rows"]
        chat.model.load_state_dict(saved["model"])
        set_rng_state(saved["rng"])
        bar.update(sum(plan.steps[: len(rows["after_task"])]))
        for _ in rows["after_task"]:
            checkpoints.task_done()
    for t, (task, prompts, train, steps) in enumerate(zip(plan.tasks, plan.prompts, plan.train_sets, plan.steps)):
        if t < len(rows["after_task"]):  # restored from the checkpoint
            continue
        torch.manual_seed(seed_of(args.seed, 3, t))
        rng = random.Random(seed_of(args.seed, 5, t))
        task_pairs = prompts.pairs(rng.sample(task.train, min(config.task_samples, len(task.train))))
        context = TaskContext(
            chat, find_hpa_layers(chat.model, config), t, prompts, safety_pairs, benign, task_pairs, batches, args
        )
        context.w_prev = dense_weights(context.layers)
        method.begin_task(context)
        optimizer = HPAOptimizer.from_model(
            chat.model, lr=args.lr, weight_decay=args.weight_decay, hpa=config, backend=args.backend
        )
        layers = context.layers = optimizer.hpa_layers
        bar.set_description(f"{name}: {task.name}")
        safety_hinv = calibrate(chat.model, optimizer, batches(safety_pairs)) if config.enabled else None
        optimizer.begin_task(safety_hinv)
        loss = train_steps(
            chat, optimizer, method.training_pairs(train, prompts), steps, seed_of(args.seed, 4, t), args, bar,
            after_step=functools.partial(method.after_step, context),
        )  # fmt: skip
        context.w_new = dense_weights(layers)
        task_hinv = calibrate(chat.model, optimizer, batches(task_pairs)) if config.enabled else None
        report = optimizer.end_task(task_hinv)
        if not config.enabled:  # the same protocol without HPA's edit: merge, then fresh adapters
            for layer in layers.values():
                if layer.adapter is not None:
                    layer.module.weight.data.copy_(adapters.merged_weight(layer.adapter, layer.module.weight))
                    adapters.reset_adapters(layer.adapter)
        method.after_merge(context)
        edit = _edit_summary(layers, context.w_prev, context.w_new, report)
        del context, optimizer
        evaluation = evaluate(chat, list(range(t + 1)), plan, judge, args, f"{name}: {task.name} (eval)")
        rows["samples"] += [{"method": name, "after": task.name, **s} for s in evaluation.pop("samples")]
        rows["after_task"].append({"task": task.name, **evaluation, "train_loss": loss, "edit": edit})
        now = time.perf_counter()
        rows["seconds"], started = rows["seconds"] + (now - started), now
        checkpoints.save(name, {"model": chat.model.state_dict(), "rows": rows, "rng": rng_state()})
        checkpoints.task_done()
    matrix = [[row["accuracy"][plan.tasks[i].name] for i in range(t + 1)] for t, row in enumerate(rows["after_task"])]
    last = rows["after_task"][-1]
    result = {
        "hpa_config": asdict(config),
        "settings": method.describe(),
        "after_task": [
            {**row, "ap": metrics.average_performance(matrix, t), "bwt": metrics.backward_transfer(matrix, t)}
            for t, row in enumerate(rows["after_task"])
        ],
        "final": {
            "ap": metrics.average_performance(matrix),
            "bwt": metrics.backward_transfer(matrix),
            "asr": last["asr"],
            "over_refusal": last["over_refusal"],
        },
        "seconds": rows["seconds"] + (time.perf_counter() - started),
    }
    return {"result": result, "samples": rows["samples"]}


def train_steps(
    chat: ChatModel,
    optimizer: torch.optim.Optimizer,
    pairs: list[tuple[str, str]],
    steps: int,
    seed: int,
    args: argparse.Namespace,
    bar: tqdm,
    after_step: Callable[[], None] | None = None,
) -> float:
    """``steps`` steps of answer-token cross-entropy on ``pairs`` (gradient norm clipped to 1),
    ``after_step()`` after each optimizer step. Batches are drawn from seeded per-epoch
    permutations. Returns the mean loss."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    chat.model.train()
    order: list[int] = []
    total = 0.0
    for _ in range(steps):
        while len(order) < args.batch_size:
            order += torch.randperm(len(pairs), generator=generator).tolist()
        idx, order = order[: args.batch_size], order[args.batch_size :]
        loss = answer_loss(chat.model, supervised_batch(chat, [pairs[i] for i in idx], args.max_length))
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        total += loss.item()
        bar.update(1)
    chat.model.eval()
    return total / steps


def evaluate(
    chat: ChatModel, task_indices: list[int], plan: Plan, judge: Judge, args: argparse.Namespace, what: str
) -> dict:
    """Greedy answers to the test prompts of the given tasks and to the held-out safety prompts.

    Returns:
        ``accuracy`` ({task: fraction}); ``harmful``, ``benign``, ``xstest_safe`` (verdict
        shares, the last ``None`` without XSTest); ``asr`` (complied share of harmful),
        ``over_refusal`` (refused share of benign), ``over_refusal_xstest``; ``samples``
        (the first :data:`SAMPLES_PER_EVALUATION` harmful prompts with answers and verdicts).
    """
    sets = {k: v for k, v in plan.eval_prompts.items() if v}
    total = sum(len(plan.tasks[i].test) for i in task_indices) + sum(len(v) for v in sets.values())
    result: dict = {"accuracy": {}}
    with tqdm(total=total, unit="prompt", desc=what, disable=args.no_progress, leave=False) as bar:
        for i in task_indices:
            task, prompts = plan.tasks[i], plan.prompts[i]
            answers = generate(
                chat,
                [prompts.prompt(text) for text, _ in task.test],
                max_new_tokens=TASK_ANSWER_TOKENS,
                batch_size=args.eval_batch_size,
                progress=bar,
            )
            predictions = [prompts.predict(a) for a in answers]
            result["accuracy"][task.name] = metrics.accuracy(predictions, [y for _, y in task.test])
        answers_of = {
            kind: generate(
                chat, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, progress=bar
            )
            for kind, prompts in sets.items()
        }
    for kind in ("harmful", "benign", "xstest_safe"):
        if kind in answers_of:
            result[kind] = verdict_shares(
                [judge.verdict(p, a) for p, a in zip(sets[kind], answers_of[kind], strict=True)]
            )
        else:
            result[kind] = None
    result["asr"] = result["harmful"]["complied"]
    result["over_refusal"] = result["benign"]["refused"]
    result["over_refusal_xstest"] = result["xstest_safe"]["refused"] if result["xstest_safe"] else None
    result["samples"] = [
        {"prompt": p, "answer": a, "verdict": judge.verdict(p, a).value}
        for p, a in list(zip(sets["harmful"], answers_of["harmful"]))[:SAMPLES_PER_EVALUATION]
    ]
    return result


def _with_lora(model: nn.Module, rank: int) -> nn.Module:
    """``model`` with a PEFT LoRA adapter (rank ``rank``, α = 2·rank, no dropout) on every linear
    layer of its decoder blocks (peft's ``all-linear``: every ``nn.Linear`` but the output head)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config)


def _batches(chat: ChatModel, pairs: list[tuple[str, str]], args: argparse.Namespace) -> list[dict]:
    return [
        supervised_batch(chat, pairs[i : i + args.eval_batch_size], args.max_length)
        for i in range(0, len(pairs), args.eval_batch_size)
    ]


def _edit_summary(layers: dict, w_prev: dict, w_new: dict, report: dict) -> dict:
    """Norms of the task's update ΔW and of HPA's edit Ŵ − W_new over all managed layers, the
    share of columns retained and the mean α and projection scalar."""
    update_sq = sum(float((w_new[n].double() - w_prev[n].double()).pow(2).sum()) for n in layers)
    edit_sq = sum(float((layers[n].module.weight.detach().double() - w_new[n].double()).pow(2).sum()) for n in layers)
    retained = sum(r.num_retained for r in report.values())
    columns = sum(r.num_columns for r in report.values())
    return {
        "update_norm": math.sqrt(update_sq),
        "edit_norm": math.sqrt(edit_sq),
        "edit_ratio": math.sqrt(edit_sq / update_sq) if update_sq > 0 else 0.0,
        "retained_share": retained / columns if columns else 0.0,
        "mean_alpha": sum(r.alpha for r in report.values()) / len(report) if report else None,
        "mean_coef": sum(r.coef for r in report.values()) / len(report) if report else None,
    }


def _safety_row(evaluation: dict) -> dict:
    return {
        k: evaluation[k] for k in ("asr", "over_refusal", "over_refusal_xstest", "harmful", "benign", "xstest_safe")
    }


def _data_summary(plan: Plan, stage0: dict) -> dict:
    return {
        "safety": {
            "split": plan.safety.split_source,
            "harmful_train": len(plan.safety.harmful_train),
            "benign_train": len(plan.safety.benign_train),
            **{f"{k}_test": len(v) for k, v in plan.eval_prompts.items()},
            "calibration_prompts": len(stage0["calibration"]),
            "alignment": stage0["alignment"],
        },
        "tasks": {
            task.name: {
                "labels": task.labels,
                "instruction": prompts.instruction,
                "train": len(task.train),
                "test": len(task.test),
                "train_with_harmful": len(train),
                "steps": steps,
            }
            for task, prompts, train, steps in zip(plan.tasks, plan.prompts, plan.train_sets, plan.steps)
        },
    }


def _calibration_size(plan: Plan) -> int:
    """The largest ``safety_samples`` of the methods: the size of the shared safety calibration set."""
    return max(method.hpa.safety_samples for method in plan.methods.values())


def _stage0_key(args: argparse.Namespace, plan: Plan, chat: ChatModel) -> dict:
    """The settings that determine the aligned model and its evaluation."""
    data = {
        "harmful_train": plan.safety.harmful_train,
        "benign_train": plan.safety.benign_train,
        "eval": plan.eval_prompts,
    }
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    names = ("seed", "align_steps", "align_epochs", "align_lr", "align_samples", "weight_decay", "batch_size", "eval_batch_size",
             "max_length", "max_new_tokens", "backend", "threads")  # fmt: skip
    return {
        "model": chat.source,
        "data": digest,
        "calibration": _calibration_size(plan),
        **{n: getattr(args, n) for n in names},
    }
