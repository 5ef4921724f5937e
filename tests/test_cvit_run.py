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


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A tiny run stopped (``--stop-after-task``, the hidden testing aid) after seqft's first task,
    resumed with other arguments (refused), resumed and stopped again after hpa's first task (seqft
    done), then resumed to the end. Returns the folder, the processes and the mid-run results."""
    out = tmp_path_factory.mktemp("killed")
    procs = {"first": run_cli(*TINY, "--out", str(out), "--stop-after-task", "1")}
    checkpoints_after_first = sorted(p.name for p in (out / "checkpoints").iterdir())
    other = [("4" if a == "3" else a) for a in TINY]  # --steps 4
    procs["mismatch"] = run_cli(*other, "--out", str(out), "--resume")
    procs["second"] = run_cli(*TINY, "--out", str(out), "--resume", "--stop-after-task", "3")
    mid = json.loads((out / "results.json").read_text())
    procs["last"] = run_cli(*TINY, "--out", str(out), "--resume")
    return out, procs, mid, checkpoints_after_first


def test_resume_gives_the_numbers_of_an_uninterrupted_run(killed_and_resumed, tiny_runs):
    out, procs, mid, checkpoints_after_first = killed_and_resumed
    assert procs["first"].returncode == 3, procs["first"].stderr
    assert "stopped after 1 task(s)" in procs["first"].stderr
    assert checkpoints_after_first == ["config.json", "seqft.pt", "stage0.pt"]
    assert procs["second"].returncode == 3, procs["second"].stderr
    assert mid["complete"] is False and list(mid["methods"]) == ["seqft"]  # written after seqft finished
    assert procs["last"].returncode == 0, procs["last"].stderr
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["complete"] is True
    uninterrupted = json.loads((tiny_runs[0][0] / "results.json").read_text())
    assert numbers(resumed) == numbers(uninterrupted)
    assert numbers(mid)["methods"]["seqft"] == numbers(uninterrupted)["methods"]["seqft"]
    assert not (out / "checkpoints").exists()  # a complete run removes its checkpoints
    assert not list(out.glob(".*.tmp"))


def test_resume_with_other_arguments_is_a_clean_error(killed_and_resumed):
    proc = killed_and_resumed[1]["mismatch"]
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "hpa-cvit: error: --resume:" in proc.stderr and "--steps 3 then, 4 now" in proc.stderr


def test_resume_without_checkpoint_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cvit.main([*TINY, "--out", str(tmp_path / "out"), "--resume"])
    assert info.value.code == 2
    assert "nothing to resume" in capsys.readouterr().err


class Killed(BaseException):
    """A kill in the middle of writing (not an Exception: nothing may catch it)."""


@pytest.mark.parametrize("killed_in", ["dump", "replace"])
def test_a_killed_write_leaves_the_previous_results(tmp_path, monkeypatch, killed_in):
    path = tmp_path / "results.json"
    previous = {"methods": {"seqft": {"accuracy": [[0.5]]}}, "complete": False}
    cvit.write_json_atomic(previous, path)
    if killed_in == "dump":

        def half_written(self, text, *args, **kwargs):
            with open(self, "w", encoding="utf-8") as f:
                f.write(text[: len(text) // 2])
            raise Killed

        monkeypatch.setattr(Path, "write_text", half_written)
    else:

        def killed(*args):
            raise Killed

        monkeypatch.setattr(cvit.os, "replace", killed)
    with pytest.raises(Killed):
        cvit.write_json_atomic({"methods": {"seqft": {}, "hpa": {}}, "complete": True}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def test_atomic_writes_use_unique_temporary_names(tmp_path):
    seen = []
    for _ in range(2):
        cvit._replace_atomic(tmp_path / "f.txt", lambda tmp: (seen.append(tmp.name), tmp.write_text("x")))
    assert seen[0] != seen[1] and all(n.startswith(".f.txt.") and n.endswith(".tmp") for n in seen)


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
