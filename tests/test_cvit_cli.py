"""hpa_kernels.cvit.cli: bad input stops before any training, with the file and line or the path."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch

from hpa_kernels.cvit import cli
from hpa_kernels.cvit.resume import Checkpoints


@pytest.fixture(autouse=True)
def _keep_environment():
    """cli.main sets MKL_CBWR, torch's thread count and deterministic mode for its own process;
    none of it may leak into later tests (a thread count changes their float bits)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with mock.patch.dict(os.environ):  # restores the environment as it was, MKL_CBWR unset included
        yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def run_main(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "seqft,bogus"], "unknown method 'bogus'; choose from seqft, hpa, hpa-no-orth"),
        (["--methods", "hpa,hpa"], "lists a method twice"),
        (["--tasks", "topic,nope"], "unknown task 'nope'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--harmful-mix", "2"], "--harmful-mix must be in [0, 1]"),
        (["--lr", "nan"], "--lr must be > 0"),
        (["--max-safety-test", "-1"], "--max-safety-test must be >= 0"),
        (["--backend", "nope"], "nope"),
        (["--p-min", "0.3", "--p-max", "0.2"], "p_min <= p_max"),
    ],
)
def test_bad_arguments_stop_before_training(tmp_path, capsys, argv, message):
    code, err = run_main([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_data_line_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "safety").mkdir(parents=True)
    (data / "tasks" / "toy").mkdir(parents=True)
    lines = [json.dumps({"id": f"h{i}", "prompt": f"p{i}"}) for i in range(4)]
    (data / "safety" / "harmful.jsonl").write_text("\n".join(lines) + "\n")
    (data / "safety" / "benign.jsonl").write_text("\n".join(lines) + "\n")
    rows = [json.dumps({"id": f"t{i}", "text": f"t{i}", "label": "ab"[i % 2]}) for i in range(4)]
    (data / "tasks" / "toy" / "train.jsonl").write_text("\n".join(rows) + '\n{"id": "t9", "text": "x"}\n')
    (data / "tasks" / "toy" / "test.jsonl").write_text("\n".join(rows) + "\n")
    code, err = run_main(["--data-dir", str(data), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "train.jsonl:5: missing field 'label'" in err
    (data / "tasks" / "toy" / "train.jsonl").write_text("")
    code, err = run_main(["--data-dir", str(data), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "train.jsonl: no records" in err


def test_a_model_that_is_not_a_causal_lm_is_named(tmp_path, capsys):
    folder = tmp_path / "encoder"
    folder.mkdir()
    config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 30}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    code, err = run_main(["--model", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"{folder}: cannot load as a causal language model" in err
    code, err = run_main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "no such file or folder" in err
    assert not (tmp_path / "out").exists()


def test_resume_with_other_arguments_is_a_clean_error(tmp_path, capsys):
    out = tmp_path / "out"
    saved = cli.build_parser().parse_args(["--steps", "2", "--out", str(out)])
    saved.argv = []
    Checkpoints(out, saved)  # what a run with --steps 2 leaves behind
    code, err = run_main(["--steps", "3", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "hpa-cvit: error: --resume:" in err and "--steps 2 then, 3 now" in err


def test_resume_without_checkpoint_is_a_clean_error(tmp_path, capsys):
    code, err = run_main(["--out", str(tmp_path / "out"), "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    assert "(default: 40)" in options and "(default: None)" not in options and "(default: False)" not in options
    for block in options.split("\n  --")[1:]:
        assert block.count("(default") <= 1, block


def test_steps_are_capped_by_epochs():
    """At most --steps per task, and at most --epochs passes over each task's training data."""
    args = cli.build_parser().parse_args(["--batch-size", "8"])
    args.argv = []
    plan = cli.prepare(args)
    sizes = [len(train) for train in plan.train_sets]
    assert plan.steps == [min(40, -(-n // 8)) for n in sizes] and max(plan.steps) < 40
    args = cli.build_parser().parse_args(["--epochs", "100", "--steps", "7"])
    assert cli.prepare(args).steps == [7, 7, 7]
