"""The ``hpa-cvit`` runner: CLI end to end on the real all-MiniLM-L6-v2, outputs, determinism, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpa_kernels.cvit import run as cvit

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"

# Two tasks, a few steps: the whole pipeline (alignment, calibration, edit, evaluation) in seconds.
TINY = ["--tasks", "topic,sentiment", "--steps", "3", "--align-steps", "12", "--align-lr", "1e-4",
        "--max-train", "24", "--max-test", "8", "--max-length", "32", "--threads", "1", "--no-progress"]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``hpa-cvit`` in a fresh interpreter (as a user runs it; global torch flags stay there)."""
    return subprocess.run(
        [sys.executable, "-m", "hpa_kernels.cvit.run", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def numbers(results: dict) -> dict:
    """Everything in results.json that must repeat under the same seed (timings and paths excluded)."""
    methods = {name: {k: v for k, v in r.items() if k != "seconds"} for name, r in results["methods"].items()}
    return {"aligned": results["aligned"], "methods": methods, "data": results["data"]}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    outs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
    procs = [run_cli(*TINY, "--out", str(out)) for out in outs]
    return outs, procs


def test_cli_writes_json_markdown_png(tiny_runs):
    (out, _), (proc, _) = tiny_runs
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert results["config"]["tasks"] == ["topic", "sentiment"]
    assert set(results["methods"]) == {"seqft", "hpa"}
    for r in results["methods"].values():
        assert [len(row) for row in r["accuracy"]] == [1, 2]
        assert len(r["ap"]) == len(r["asr"]) == len(r["over_refusal"]) == 2
        assert r["bwt"][0] is None and isinstance(r["bwt"][1], float)
        assert all(0.0 <= a <= 1.0 for row in r["accuracy"] for a in row)
    # HPA edits the managed layers at each task's end; SeqFT leaves them as trained.
    assert all(e["edit_norm"] > 0 and e["retained_share"] > 0 for e in results["methods"]["hpa"]["edits"])
    assert all(e["edit_norm"] == 0 for e in results["methods"]["seqft"]["edits"])
    markdown = (out / "results.md").read_text()
    assert "| seqft |" in markdown and "| hpa |" in markdown and "AP ↑" in markdown
    assert "| seqft |" in proc.stdout  # the table is printed too
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))


def test_same_seed_same_numbers(tiny_runs):
    outs, procs = tiny_runs
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    first, second = (json.loads((out / "results.json").read_text()) for out in outs)
    assert numbers(first) == numbers(second)


def test_unknown_method_is_a_clean_error(tmp_path):
    proc = run_cli("--methods", "seqft,bogus", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "unknown method 'bogus'" in proc.stderr and "hpa-safety-only" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "topic,nope"], "unknown task 'nope'"),
        (["--tasks", "topic,topic"], "lists a task twice"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--harmful-mix", "2"], "--harmful-mix must be in [0, 1]"),
        (["--backend", "nope"], "unknown HPA kernels backend"),
    ],
)
def test_bad_arguments_stop_before_training(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cvit.main([*argv, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_data_line_is_named_before_training(tmp_path, capsys):
    data_dir = tmp_path / "data"
    for rel in ("safety/harmful.jsonl", "safety/benign.jsonl", "tasks/a/train.jsonl", "tasks/a/test.jsonl"):
        (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"id": f"{i}", "prompt": f"p{i}"}) for i in range(5)]
    (data_dir / "safety/harmful.jsonl").write_text("\n".join(rows))
    (data_dir / "safety/benign.jsonl").write_text("\n".join(rows))
    task = [json.dumps({"id": f"{i}", "text": f"t{i}", "label": "xy"[i % 2]}) for i in range(4)]
    (data_dir / "tasks/a/train.jsonl").write_text("\n".join([*task[:2], '{"id": "2", "text": "t2"}', *task[3:]]))
    (data_dir / "tasks/a/test.jsonl").write_text("\n".join(task))
    with pytest.raises(SystemExit) as info:
        cvit.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{data_dir / 'tasks/a/train.jsonl'}:3: missing field 'label'" in err
    assert not (tmp_path / "out").exists()


def test_tables_and_outputs_from_a_results_object(tmp_path):
    results = {
        "config": {"tasks": ["a", "b"], "seed": 0, "argv": ["--seed", "0"], "machine": "test"},
        "aligned": {"asr": 0.0, "over_refusal": 0.1},
        "methods": {
            name: {
                "accuracy": [[0.9], [0.7, 0.8]],
                "ap": [0.9, 0.75],
                "bwt": [None, -0.2],
                "asr": [0.1, asr],
                "over_refusal": [0.1, 0.2],
                "edits": [{"update_norm": 1.0, "edit_ratio": e, "retained_share": e} for _ in range(2)],
            }
            for name, asr, e in (("seqft", 0.5, 0.0), ("hpa", 0.25, 0.3))
        },
        "wall_seconds": 12.0,
    }
    table = cvit.format_tables(results)
    assert "| seqft | 70.0 | 80.0 | 75.0 | -20.0 | 50.0 | 20.0 |" in table
    assert "| hpa | 2: b | 75.0 | -20.0 | 25.0 | 20.0 | 1.000 | 30.0 | 30.0 |" in table
    assert "| aligned model (before any task) | – | – | – | – | 0.0 | 10.0 |" in table
    paths = cvit.write_outputs(results, table, tmp_path / "out")
    assert [p.name for p in paths] == ["results.json", "results.md", "results.png"]
    assert json.loads(paths[0].read_text()) == results
    assert "hpa-cvit --seed 0" in paths[1].read_text()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_cli_on_shared_data(tmp_path):
    proc = run_cli(
        "--data-dir", str(SHARED_DATA), "--tasks", "trec,sst2", "--methods", "seqft,hpa,hpa-safety-only",
        "--steps", "4", "--align-steps", "12", "--align-lr", "1e-4", "--max-train", "64", "--max-test", "32",
        "--harmful-mix", "0.05", "--threads", "1", "--no-progress", "--out", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data"]["safety"]["split"] == "splits.json"
    assert results["data"]["tasks"]["trec"]["train_with_harmful"] == 64 + 3
    assert set(results["methods"]) == {"seqft", "hpa", "hpa-safety-only"}
