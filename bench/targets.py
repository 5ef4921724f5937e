"""The performance targets of the report and their verdicts (met / missed) from the rows measured."""

from __future__ import annotations

from .record import Report

TARGETS = {
    "plain": 1.0,  # HPA plain step time / torch fused AdamW time, at most
    "online": 1.15,  # HPA online step time (the lagged projection's one pass) / torch fused AdamW time, at most
    "edit": 3.0,  # torch-backend edit time / compiled-backend edit time, at least
    "bandwidth": 0.85,  # plain step GB/s / copy GB/s at >= 1e7 parameters, at least
    "collector": 1.2,  # HessianCollector's overhead per forward / its XᵀX products alone, at most
}


def evaluate_targets(report: Report, ours: str) -> None:
    """Mark each target met / missed from the rows measured (worst case over the sets)."""
    steps = [r for r in report.steps if "timing" in r]

    def ratios(variant: str, key: str = "vs_fused") -> list[tuple[str, float]]:
        return [(r["set"], r[key]) for r in steps if r["variant"] == variant and key in r]

    def target(name: str, goal: str, values: list[tuple[str, float]], ok, unit: str, worst, on_min=None) -> None:
        if not values:
            report.targets.append({"target": name, "goal": goal, "status": "not measured", "values": {}})
            return
        bad = [s for s, v in values if not ok(v)]
        report.targets.append(
            {
                "target": name,
                "goal": goal,
                "status": "met" if not bad else "missed",
                "worst": worst(v for _, v in values),
                "unit": unit,
                "missed_on": bad,
                "values": dict(values),
            }
        )
        if on_min:  # the same ratio on each side's fastest repeat: least disturbed by other processes
            report.targets[-1]["worst_min_times"] = worst(v for _, v in on_min)

    target(
        f"plain step (hpa-plain[{ours}]) vs torch fused AdamW",
        f"≤ {TARGETS['plain']:.2f}× on every set",
        ratios(f"hpa-plain[{ours}]"),
        lambda v: v <= TARGETS["plain"],
        "×",
        max,
        ratios(f"hpa-plain[{ours}]", key="vs_fused_min"),
    )
    # The online target judges the lagged projection (one pass over the weights, the fast one); the
    # exact projection's two passes (hpa-online) stay in the step table.
    target(
        f"online step (hpa-online-lagged[{ours}]) vs torch fused AdamW",
        f"≤ {TARGETS['online']:.2f}× on every set",
        ratios(f"hpa-online-lagged[{ours}]"),
        lambda v: v <= TARGETS["online"],
        "×",
        max,
        ratios(f"hpa-online-lagged[{ours}]", key="vs_fused_min"),
    )
    if ours == "torch":
        report.targets.append(
            {"target": "end-of-task edit vs torch backend", "goal": "≥ 3×", "status": "not measured", "values": {}}
        )
    else:
        edits = [(f"layer {r['layer']}", r["speedup_vs_torch"]) for r in report.edit_layers if r["backend"] == ours]
        edits += [(f"model {r['set']}", r["speedup_vs_torch"]) for r in report.edit_models if r["backend"] == ours]
        target(
            f"end-of-task edit, {ours} vs torch backend",
            f"≥ {TARGETS['edit']:.0f}× faster, per layer and whole model",
            edits,
            lambda v: v >= TARGETS["edit"],
            "× faster",
            min,
        )
    shares = [(r["set"], r["copy_share"]) for r in steps if r["variant"] == f"hpa-plain[{ours}]" and r["params"] >= 1e7]
    target(
        f"plain step (hpa-plain[{ours}]) bandwidth at ≥ 1e7 parameters",
        f"≥ {TARGETS['bandwidth']:.0%} of copy bandwidth",
        shares,
        lambda v: v >= TARGETS["bandwidth"],
        "of copy",
        min,
    )
    target(
        "HessianCollector overhead vs its FLOP floor (the XᵀX products alone)",
        f"≤ {TARGETS['collector']:.1f}×",
        [(c["model"], c["overhead_vs_floor"]) for c in report.calibration if "overhead_vs_floor" in c],
        lambda v: v <= TARGETS["collector"],
        "× floor",
        max,
    )
