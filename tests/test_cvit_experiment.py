"""``hpa-cvit`` end to end on the real SmolLM2-135M-Instruct, cut to a few steps: outputs,
SeqFT vs HPA edits, same seed same numbers, and a killed run resumed to the same numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpa_kernels.cvit.methods import METHODS

REPO = Path(__file__).resolve().parents[1]

# Two tasks of the bundled sample, a few short steps: alignment, calibration, LoRA, merge, edit,
# generation and judging in about a minute.
TINY = ["--tasks", "topic,sentiment", "--steps", "2", "--align-steps", "2", "--align-samples", "4",
        "--batch-size", "2", "--eval-batch-size", "8", "--max-length", "64", "--max-new-tokens", "8",
        "--max-train", "12", "--max-test", "4", "--max-safety-test", "4", "--task-samples", "4",
        "--lora-rank", "2", "--no-progress"]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``hpa-cvit`` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "hpa_kernels.cvit.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )


def numbers(results: dict) -> dict:
    """Everything in results.json that must repeat under the same seed (timings excluded)."""
    methods = {name: {k: v for k, v in run.items() if k != "seconds"} for name, run in results["methods"].items()}
    return {"base": results["base"], "aligned": results["aligned"], "methods": methods, "data": results["data"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run, and one killed after its first method task then resumed."""
    whole, killed = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("killed")
    return {
        "whole": (whole, run_cli(*TINY, "--out", str(whole))),
        "killed": (killed, run_cli(*TINY, "--out", str(killed), "--stop-after-task", "1")),
        "resumed": (killed, run_cli(*TINY, "--out", str(killed), "--resume")),
    }


def test_outputs(runs):
    out, proc = runs["whole"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert results["config"]["tasks"] == ["topic", "sentiment"] and set(results["methods"]) == {"seqft", "hpa"}
    for key in ("base", "aligned"):
        row = results[key]
        assert set(row["harmful"]) == {"refused", "complied", "non-answer"}
        assert abs(sum(row["harmful"].values()) - 1.0) < 1e-9
        assert row["asr"] == row["harmful"]["complied"] and row["over_refusal"] == row["benign"]["refused"]
    for run in results["methods"].values():
        assert [row["task"] for row in run["after_task"]] == ["topic", "sentiment"]
        assert [list(row["accuracy"]) for row in run["after_task"]] == [["topic"], ["topic", "sentiment"]]
        assert run["after_task"][0]["bwt"] is None and isinstance(run["final"]["bwt"], float)
        assert set(run["final"]) == {"ap", "bwt", "asr", "over_refusal"}
        assert all(0.0 <= v <= 1.0 for row in run["after_task"] for v in row["accuracy"].values())
        assert all(row["edit"]["update_norm"] > 0 for row in run["after_task"])  # the merged LoRA moved the weights
    # HPA edits the merged weights at each task's end; SeqFT leaves them as trained.
    assert all(
        r["edit"]["edit_norm"] > 0 and r["edit"]["retained_share"] > 0 for r in results["methods"]["hpa"]["after_task"]
    )
    assert all(r["edit"]["edit_norm"] == 0 for r in results["methods"]["seqft"]["after_task"])
    markdown = (out / "results.md").read_text()
    assert "| seqft |" in markdown and "| hpa |" in markdown and "ASR ↓" in markdown and "| aligned model" in markdown
    assert "| seqft |" in proc.stdout  # the table is printed too
    for plot in ("results.png", "frontier.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {(s["method"], s["after"]) for s in samples} == {
        ("base", "stage 0"), ("aligned", "stage 0"), ("seqft", "topic"), ("seqft", "sentiment"),
        ("hpa", "topic"), ("hpa", "sentiment"),
    }  # fmt: skip
    assert all(s["verdict"] in ("refused", "complied", "non-answer") and "answer" in s for s in samples)
    assert (out / "aligned" / "stage0.pt").is_file()  # the aligned model is cached under --out
    assert not (out / "checkpoints").exists() and not list(out.glob(".*.tmp"))


def test_resume_gives_the_numbers_of_an_uninterrupted_run(runs):
    """Same seed, same numbers: the resumed run equals the whole one, and so both runs repeat."""
    assert runs["killed"][1].returncode == 3, runs["killed"][1].stderr[-3000:]
    out, proc = runs["resumed"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = json.loads((runs["whole"][0] / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    assert numbers(resumed) == numbers(whole)


def test_every_method_runs_on_the_same_protocol(runs, tmp_path):
    """``--methods all`` on the first task, from the aligned model of the whole run: every method
    starts from the same weights and data, SeqFT repeats its numbers, and each baseline acts where
    it should (a post-hoc edit after the merge, or nothing after it)."""
    shutil.copytree(runs["whole"][0] / "aligned", tmp_path / "aligned")  # stage 0 is not redone
    args = list(TINY)
    args[args.index("--tasks") + 1] = "topic"
    proc = run_cli(*args, "--methods", "all", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    whole = json.loads((runs["whole"][0] / "results.json").read_text())
    assert list(results["methods"]) == list(METHODS) and results["aligned"] == whole["aligned"]
    assert numbers(results)["methods"]["seqft"]["after_task"][0] == numbers(whole)["methods"]["seqft"]["after_task"][0]
    edits = {name: run["after_task"][0]["edit"]["edit_norm"] for name, run in results["methods"].items()}
    assert all(
        edits[name] > 0 for name in METHODS if name.startswith("hpa") or name in ("ema", "safe-delta", "model-tailor")
    )
    assert all(edits[name] == 0 for name in ("seqft", "sppft", "lox", "lookahead"))
    sppft = results["methods"]["sppft"]["settings"]  # the tiny alignment may show no safety layers
    assert len(sppft["gap"]) == 30 and set(sppft["safety_layers"]) <= set(range(30))
    markdown = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in markdown for name in METHODS)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
