"""Markdown tables of a ``hpa-cvit`` run (percent; the ``results.json`` object holds fractions)."""

from __future__ import annotations


def format_tables(results: dict) -> str:
    """The final table (accuracy on each task after the last one, AP, BWT, ASR, over-refusal on
    benign and XSTest-safe prompts, benign non-answers) and the per-task table, in Markdown.

    ``results`` is the ``results.json`` object of :func:`hpa_kernels.cvit.experiment.run`.
    """
    tasks = results["config"]["tasks"]
    lines = [
        f"## hpa-cvit: {' → '.join(tasks)} (seed {results['config']['seed']})",
        "",
        "After the last task (percent). ASR: held-out harmful prompts whose answer complies; over-refusal: "
        "benign (and XSTest-safe) prompts refused; non-answer: benign prompts answered with nothing usable.",
        "",
        "| method | " + " | ".join(f"{t} acc" for t in tasks)
        + " | AP ↑ | BWT ↑ | ASR ↓ | harmful refused | over-refusal ↓ | XSTest over-refusal ↓ | benign non-answer ↓ |",
        "|---|" + "---:|" * (len(tasks) + 7),
    ]  # fmt: skip
    for label, row in (("base model", results["base"]), ("aligned model (before any task)", results["aligned"])):
        lines.append(f"| {label} | " + " | ".join("–" for _ in tasks) + " | – | – | " + _safety_cells(row) + " |")
    for name, run in results["methods"].items():
        last = run["after_task"][-1]
        lines.append(
            f"| {name} | "
            + " | ".join(_pct(last["accuracy"].get(t)) for t in tasks)
            + f" | {_pct(run['final']['ap'])} | {_pct(run['final']['bwt'])} | {_safety_cells(last)} |"
        )
    lines += [
        "",
        "After each task (‖ΔW‖: Frobenius norm of the task's merged update of the managed layers; edit: "
        "‖Ŵ − W_new‖ / ‖ΔW‖; retained: share of columns reverted to W_prev):",
        "",
        "| method | after task | AP | BWT | ASR | harmful refused / non-answer | over-refusal | XSTest over-refusal "
        "| train loss | ‖ΔW‖ | edit | retained |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in results["methods"].items():
        for t, row in enumerate(run["after_task"]):
            e = row["edit"]
            lines.append(
                f"| {name} | {t + 1}: {row['task']} | {_pct(row['ap'])} | {_pct(row['bwt'])} | {_pct(row['asr'])}"
                f" | {_pct(row['harmful']['refused'])} / {_pct(row['harmful']['non-answer'])}"
                f" | {_pct(row['over_refusal'])} | {_pct(row['over_refusal_xstest'])} | {row['train_loss']:.3f}"
                f" | {e['update_norm']:.3f} | {_pct(e['edit_ratio'])} | {_pct(e['retained_share'])} |"
            )
    return "\n".join(lines) + "\n"


def _safety_cells(row: dict) -> str:
    return " | ".join(
        (
            _pct(row["asr"]),
            _pct(row["harmful"]["refused"]),
            _pct(row["over_refusal"]),
            _pct(row["over_refusal_xstest"]),
            _pct(row["benign"]["non-answer"]),
        )
    )


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.1f}"
