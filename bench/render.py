"""The report as Markdown (``<machine>.md``) and as a figure (``<machine>.png``, matplotlib)."""

from __future__ import annotations

from pathlib import Path

from .record import Report
from .targets import TARGETS


def _ms(timing: dict) -> str:
    median = timing["median"]
    scale, unit = (1.0, "s") if median >= 1.0 else (1e3, "ms") if median >= 1e-3 else (1e6, "µs")
    return f"{timing['median'] * scale:.3g} {unit} ({timing['min'] * scale:.3g}–{timing['max'] * scale:.3g})"


def _params(n: float) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def markdown(report: Report, plot_name: str) -> str:
    m = report.machine
    bw = report.bandwidth
    lines = [
        f"# hpa-kernels performance report — {m['name']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']} "
        f"({m['torch_threads']} threads); hpa-kernels {m['hpa_kernels']}; backends {', '.join(m['backends'])}. "
        f"Load average at start / end: {report.config['loadavg_start']} / {report.config['loadavg_end']}. "
        f"Run: `{report.config['command']}`, {report.elapsed_s:.0f} s.",
        "",
        f"Times: median over the timed repeats after {report.config['warmup']} warm-up call(s), (min–max) "
        "after it. GB/s: bytes counted by bench.workloads (AdamW: p, g, m, v read, p, m, v "
        "written; online: + W_prev and the mask of managed layers; edit: 5 × the layer's bytes) over "
        "the median time.",
        "",
        f"Copy bandwidth (2 × {bw['bytes'] >> 20} MiB per copy): **{bw['gbps']:.2f} GB/s** ({bw['best_method']}); "
        + ", ".join(f"{k} {v['gbps']:.2f}" for k, v in bw["methods"].items())
        + f"; in-place scale (read + write of the same lines, no write-allocate) {bw['inplace_scale']['gbps']:.2f} GB/s.",
        "",
        "## Targets",
        "",
        "| target | goal | status | worst (medians) | worst (min times) | where missed |",
        "|---|---|---|---|---|---|",
    ]
    for t in report.targets:
        worst = f"{t['worst']:.2f} {t['unit']}" if "worst" in t else "—"
        if t.get("unit") == "of copy":
            worst = f"{t['worst']:.0%} of copy"
        on_min = f"{t['worst_min_times']:.2f} ×" if "worst_min_times" in t else "—"
        lines.append(
            f"| {t['target']} | {t['goal']} | **{t['status']}** | {worst} | {on_min} | "
            f"{', '.join(t.get('missed_on', [])) or '—'} |"
        )
    lines += [
        "",
        f"![time per step, GB/s, ratio to torch fused AdamW, edit speed-up]({plot_name})",
        "",
        "## Optimizer step",
        "",
        "| set | params | tensors | variant | time per step (min–max) | GB/s | % copy BW | × torch fused | × fused (min times) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.steps:
        if "timing" not in r:
            lines.append(
                f"| {r['set']} | {_params(r['params'])} | {r['tensors']} | {r['variant']} | skipped: {r['skipped']} | | | | |"
            )
            continue
        lines.append(
            f"| {r['set']} | {_params(r['params'])} | {r['tensors']} | {r['variant']} | {_ms(r['timing'])} | "
            f"{r['gbps']:.2f} | {r['copy_share']:.0%} | {r['vs_fused']:.2f} | {r.get('vs_fused_min', float('nan')):.2f} |"
        )
    lines += [
        "",
        "## End-of-task edit (reduce + select + write)",
        "",
        "Per layer (`functional.hpa_layer_update`, and its two passes alone, `ops.hpa_reduce`, `ops.hpa_apply`):",
        "",
        "| layer | backend | edit (min–max) | edit GB/s | reduce GB/s | apply GB/s | speed-up vs torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.edit_layers:
        lines.append(
            f"| {r['layer']} | {r['backend']} | {_ms(r['edit']['timing'])} | {r['edit']['gbps']:.2f} | "
            f"{r['reduce']['gbps']:.2f} | {r['apply']['gbps']:.2f} | {r.get('speedup_vs_torch', float('nan')):.1f}× |"
        )
    lines += [
        "",
        "Whole model (`HPAOptimizer.end_task`, every managed layer):",
        "",
        "| set | managed layers | managed params | backend | end_task (min–max) | GB/s | speed-up vs torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.edit_models:
        lines.append(
            f"| {r['set']} | {r['managed_layers']} | {_params(r['managed_params'])} | {r['backend']} | {_ms(r['timing'])} | "
            f"{r['gbps']:.2f} | {r.get('speedup_vs_torch', float('nan')):.1f}× |"
        )
    lines += ["", "## HessianCollector overhead per forward pass", ""]
    for c in report.calibration:
        lines.append(
            f"{c['model']}, batch {c['batch'][0]} × {c['batch'][1]} tokens, {c['watched_layers']} watched layers: "
            f"forward {_ms(c['forward'])}, with the collector {_ms(c['forward_with_collector'])}: "
            f"**+{c['overhead_s'] * 1e3:.1f} ms (+{c['overhead_ratio']:.0%})** per forward; the hooks' XᵀX "
            f"products are {c['collector_gflop']:.1f} GFLOP, {c['collector_gflops']:.0f} GFLOP/s over the overhead"
            + (
                f"; those products alone (`torch.mm` on the {c['distinct_inputs']} distinct inputs of one forward, "
                f"the FLOP floor) take {_ms(c['xtx_floor'])}: the overhead is "
                f"**{c['overhead_vs_floor']:.2f}× the floor**."
                if "xtx_floor" in c
                else "."
            )
        )
    lines += [
        "",
        "## Memory per parameter",
        "",
        "Optimizer state (exact tensor bytes: moments, step counts, W_prev snapshots, statistics) and the "
        "measured peak RSS above the resident parameters and gradients over creation, `begin_task` and two "
        f"steps, on {report.config['memory_set']} (fresh process).",
        "",
        "| variant | task open | state B/param | peak B/param |",
        "|---|---|---|---|",
    ]
    for r in report.memory:
        peak = "—" if r["peak_bytes"] is None else f"{r['peak_bytes'] / r['params']:.2f}"
        lines.append(
            f"| {r['variant']} | {'yes' if r['task'] else 'no'} | {r['state_bytes'] / r['params']:.2f} | {peak} |"
        )
    if report.notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in report.steps if r["set"].startswith("sweep-") and "timing" in r]
    variants = list(dict.fromkeys(r["variant"] for r in sweep))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    (ax_time, ax_bw), (ax_ratio, ax_edit) = axes
    shaped = [r for r in report.steps if not r["set"].startswith("sweep-") and "timing" in r]
    markers = {name: marker for name, marker in zip(dict.fromkeys(r["set"] for r in shaped), "*Ds^")}
    for index, variant in enumerate(variants):
        color = f"C{index}"
        rows = sorted((r for r in sweep if r["variant"] == variant), key=lambda r: r["params"])
        x = [r["params"] for r in rows]
        med = [r["timing"]["median"] for r in rows]
        err = [[m - r["timing"]["min"] for m, r in zip(med, rows)], [r["timing"]["max"] - m for m, r in zip(med, rows)]]
        style = "--" if variant.startswith("adamw") else "-"
        ax_time.errorbar(x, med, yerr=err, fmt=style + "o", color=color, ms=4, capsize=3, label=variant)
        ax_bw.plot(x, [r["gbps"] for r in rows], style + "o", color=color, ms=4, label=variant)
        ax_ratio.plot(x, [r["vs_fused"] for r in rows], style + "o", color=color, ms=4, label=variant)
        for r in (r for r in shaped if r["variant"] == variant):
            point = {"color": color, "marker": markers[r["set"]], "ms": 9, "ls": "none", "mec": "k"}
            ax_time.plot(r["params"], r["timing"]["median"], **point)
            ax_bw.plot(r["params"], r["gbps"], **point)
            ax_ratio.plot(r["params"], r["vs_fused"], **point)
    for name, marker in markers.items():
        for ax in (ax_time, ax_bw, ax_ratio):
            ax.plot([], [], marker=marker, color="w", mec="k", ms=9, ls="none", label=name)
    copy_gbps = report.bandwidth["gbps"]
    ax_bw.axhline(copy_gbps, color="k", lw=1, label=f"copy {copy_gbps:.1f} GB/s")
    ax_bw.axhline(
        TARGETS["bandwidth"] * copy_gbps, color="k", lw=1, ls=":", label=f"{TARGETS['bandwidth']:.0%} of copy"
    )
    ax_ratio.axhline(TARGETS["plain"], color="k", lw=1, label="plain target 1.0×")
    ax_ratio.axhline(TARGETS["online"], color="k", lw=1, ls=":", label="online target 1.15×")
    for ax, title, ylabel in (
        (ax_time, "time per step (median, min–max)", "seconds"),
        (ax_bw, "achieved bandwidth (bench.workloads byte count)", "GB/s"),
        (ax_ratio, "time / torch AdamW(fused=True)", "ratio"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (lines: 4 Llama-style blocks; large markers: model-shaped sets)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_time.set_yscale("log")
    ax_ratio.set_yscale("log")
    edits = [r for r in report.edit_layers if r["backend"] != "torch"]
    edits_m = [r for r in report.edit_models if r["backend"] != "torch"]
    labels = [f"{r['layer']}\n[{r['backend']}]" for r in edits] + [
        f"end_task {r['set']}\n[{r['backend']}]" for r in edits_m
    ]
    values = [r.get("speedup_vs_torch", 0.0) for r in edits + edits_m]
    if values:
        ax_edit.barh(range(len(values)), values, color="tab:green")
        ax_edit.set_yticks(range(len(values)), labels, fontsize=7)
        ax_edit.axvline(TARGETS["edit"], color="k", lw=1, ls=":", label="target 3×")
        ax_edit.legend(fontsize=7)
    ax_edit.set_xlabel("speed-up over the torch backend")
    ax_edit.set_title("end-of-task edit (reduce + select + write)")
    m = report.machine
    fig.suptitle(f"hpa-kernels on {m['cpu']} ({m['cores']} cores), torch {m['torch']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
