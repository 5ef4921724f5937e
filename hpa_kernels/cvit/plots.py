"""PNG plots of a run: AP, ASR and over-refusal after each task, one line per method; and the
final ASR against the final AP, one point per method (the frontier a user chooses on)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_results(results: dict, path: Path) -> Path:
    """Draw ``results`` (the ``results.json`` object of :func:`hpa_kernels.cvit.experiment.run`) as a PNG.

    Panels, one line per method, all in percent: AP after tasks 1..T; ASR and over-refusal on
    benign prompts at step 0 (the aligned model, before any task) and after tasks 1..T. Returns ``path``.
    """
    tasks = results["config"]["tasks"]
    fig, (ax_ap, ax_asr, ax_or) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    steps = list(range(1, len(tasks) + 1))
    for name, run in results["methods"].items():
        rows = run["after_task"]
        done = steps[: len(rows)]
        ax_ap.plot(done, [100.0 * r["ap"] for r in rows], marker="o", label=name)
        for ax, key in ((ax_asr, "asr"), (ax_or, "over_refusal")):
            values = [results["aligned"][key], *(r[key] for r in rows)]
            ax.plot([0, *done], [100.0 * v for v in values], marker="o", label=name)
    ax_ap.set_xticks(steps, tasks)
    for ax in (ax_asr, ax_or):
        ax.set_xticks(range(len(tasks) + 1), ["aligned", *tasks])
    ax_ap.set(title="Average accuracy (AP) ↑", xlabel="after task", ylabel="AP (%)")
    ax_asr.set(title="ASR on held-out harmful prompts ↓", xlabel="after task", ylabel="complied (%)")
    ax_or.set(title="Over-refusal on held-out benign prompts ↓", xlabel="after task", ylabel="refused (%)")
    for ax in (ax_ap, ax_asr, ax_or):
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"hpa-cvit on {Path(results['config']['model']).name}")
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_frontier(results: dict, path: Path) -> Path:
    """Draw each method's final ASR (y, lower is safer) against its final AP (x, higher is better),
    in percent, one labelled point per method, with the aligned model's ASR as a dashed line. The
    methods no other method beats on both axes (the Pareto front) are joined. Returns ``path``."""
    points = {
        name: (100.0 * run["final"]["ap"], 100.0 * run["final"]["asr"]) for name, run in results["methods"].items()
    }
    front = sorted(
        (p for p in points.values() if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points.values())),
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.8), constrained_layout=True)
    ax.axhline(100.0 * results["aligned"]["asr"], color="grey", linestyle="--", label="aligned model's ASR")
    if len(front) > 1:
        ax.plot(*zip(*front), color="tab:green", alpha=0.5, label="Pareto front")
    for name, (ap, asr) in points.items():
        ax.scatter([ap], [asr], s=40)
        ax.annotate(name, (ap, asr), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set(
        title="Final ASR against final AP (after the last task)",
        xlabel="AP (%) ↑",
        ylabel="ASR (%) ↓",
        ylim=(-2, 102),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
