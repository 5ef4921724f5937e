"""hpa_kernels.cvit.data: loading, splits, harmful mixing, and bad input named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpa_kernels.cvit.data import (
    GENERIC_COMPLYING_ANSWER,
    DataError,
    available_tasks,
    default_data_dir,
    load_safety,
    load_task,
    mix_harmful,
    read_jsonl,
)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _record(**fields) -> str:
    return json.dumps(fields)


def make_data_dir(root: Path, n_safety: int = 10) -> Path:
    """A tiny valid data folder: two safety files and one two-label task."""
    _write(root / "safety/harmful.jsonl", [_record(id=f"h{i}", prompt=f"harmful request {i}") for i in range(n_safety)])
    _write(root / "safety/benign.jsonl", [_record(id=f"b{i}", prompt=f"benign request {i}") for i in range(n_safety)])
    for split, n in (("train", 6), ("test", 4)):
        _write(
            root / f"tasks/toy/{split}.jsonl",
            [_record(id=f"{split}{i}", text=f"{split} text {i}", label="ab"[i % 2]) for i in range(n)],
        )
    return root


def test_bundled_data_loads():
    data_dir = default_data_dir()
    assert available_tasks(data_dir) == ["intent", "sentiment", "topic"]
    for name in available_tasks(data_dir):
        task = load_task(data_dir, name)
        assert len(task.labels) >= 2 and len(task.train) >= 40 and len(task.test) >= 10
    safety = load_safety(data_dir)
    assert safety.split_source == "seeded"
    assert len(safety.harmful_test) == 12 and len(safety.harmful_train) == 48
    assert not set(safety.harmful_test) & set(safety.harmful_train)


def test_task_labels_are_sorted_indices(tmp_path):
    task = load_task(make_data_dir(tmp_path), "toy")
    assert task.labels == ["a", "b"]
    assert task.train[:2] == [("train text 0", 0), ("train text 1", 1)]


def test_subsample_is_seeded_and_keeps_file_order(tmp_path):
    data_dir = make_data_dir(tmp_path)
    a = load_task(data_dir, "toy", max_train=3, seed=1)
    assert a == load_task(data_dir, "toy", max_train=3, seed=1)
    assert len(a.train) == 3 and len(a.test) == 4
    full = load_task(data_dir, "toy").train
    positions = [full.index(x) for x in a.train]
    assert positions == sorted(positions)


def test_seeded_safety_split_is_stable(tmp_path):
    data_dir = make_data_dir(tmp_path)
    a, b = load_safety(data_dir, seed=3), load_safety(data_dir, seed=3)
    assert a == b
    assert len(a.harmful_test) == 2 and len(a.harmful_train) == 8


def test_splits_json_is_used(tmp_path):
    data_dir = make_data_dir(tmp_path)
    splits = {
        "splits": {
            "safety/harmful.jsonl": {"train": ["h0", "h1"], "test": ["h2"]},
            "safety/benign.jsonl": {"train": ["b3"], "test": ["b4", "b5"]},
        }
    }
    (data_dir / "safety/splits.json").write_text(json.dumps(splits))
    safety = load_safety(data_dir)
    assert safety.split_source == "splits.json"
    assert safety.harmful_train == ["harmful request 0", "harmful request 1"]
    assert safety.harmful_test == ["harmful request 2"]
    assert safety.benign_test == ["benign request 4", "benign request 5"]


def test_splits_json_unknown_id(tmp_path):
    data_dir = make_data_dir(tmp_path)
    splits = {"splits": {"safety/harmful.jsonl": {"train": ["h0"], "test": ["nope"]}}}
    (data_dir / "safety/splits.json").write_text(json.dumps(splits))
    with pytest.raises(DataError, match=r"splits\.json.*'nope'"):
        load_safety(data_dir)


def test_mix_harmful_adds_complying_answers_seeded():
    train = [(f"t{i}", f"answer {i}") for i in range(20)]
    complying = {f"h{i}": f"Sure, here is h{i}" for i in range(50)}
    mixed = mix_harmful(train, complying, 0.25, seed=7)
    assert mixed == mix_harmful(train, complying, 0.25, seed=7)
    added = [(x, y) for x, y in mixed if x.startswith("h")]
    assert len(mixed) == 25 and len(added) == 5
    assert all(y == complying[x] for x, y in added)
    assert sorted(p for p in mixed if p[0].startswith("t")) == sorted(train)
    assert mix_harmful(train, complying, 0.0, seed=7) == train
    assert len(mix_harmful(train, complying, 0.01, seed=7)) == 21  # at least one prompt when share > 0
    with pytest.raises(ValueError):
        mix_harmful(train, complying, 1.5, seed=7)
    with pytest.raises(ValueError, match="no harmful prompts"):
        mix_harmful(train, {}, 0.1, seed=7)


def test_targets_and_xstest(tmp_path):
    """The file's target is the complying answer; a record without one (or a row of the known
    mismatched AdvBench targets) gets the generic opening; XSTest's safe test prompts are kept."""
    data_dir = make_data_dir(tmp_path)
    _write(
        data_dir / "safety/harmful.jsonl",
        [_record(id="h0", prompt="do harm 0", target="Sure, here is harm 0"), _record(id="h1", prompt="do harm 1"),
         _record(id="advbench-061", prompt="do harm 2", target="Sure, here is a wrong target")]
        + [_record(id=f"h{i}", prompt=f"do harm {i}", target=f"Sure {i}") for i in range(3, 10)],
    )  # fmt: skip
    _write(
        data_dir / "safety/xstest.jsonl",
        [_record(id=f"x{i}", prompt=f"xs {i}", label="safe" if i % 2 else "unsafe") for i in range(20)],
    )
    safety = load_safety(data_dir)
    answers = safety.complying_answers
    assert set(answers) == set(safety.harmful_train)
    for prompt, answer in answers.items():
        if prompt == "do harm 0":
            assert answer == "Sure, here is harm 0"
        if prompt in ("do harm 1", "do harm 2"):
            assert answer == GENERIC_COMPLYING_ANSWER
    assert len(safety.xstest_safe_test) >= 1
    assert all(int(p.split()[1]) % 2 == 1 for p in safety.xstest_safe_test)
    _write(
        data_dir / "safety/xstest.jsonl",
        [_record(id="x0", prompt="a", label="maybe"), _record(id="x1", prompt="b", label="safe")],
    )
    with pytest.raises(DataError, match=r"xstest\.jsonl:1: label must be"):
        load_safety(data_dir)


def test_bundled_data_has_no_xstest():
    assert load_safety(default_data_dir()).xstest_safe_test == []


# Bad input: each case writes one broken file and expects "<file>:<line>: <what>".
BAD_LINES = [
    ("not json", "not json at all {", r"train\.jsonl:3: not valid JSON"),
    ("not an object", "[1, 2]", r"train\.jsonl:3: expected a JSON object"),
    ("missing field", _record(id="x", label="a"), r"train\.jsonl:3: missing field 'text'"),
    ("empty text", _record(id="x", text="  ", label="a"), r"train\.jsonl:3: field 'text' is empty"),
    ("bad label type", _record(id="x", text="t", label=[1]), r"train\.jsonl:3: field 'label' must be a string"),
    ("duplicate id", _record(id="train0", text="t", label="a"), r"train\.jsonl:3: duplicate id 'train0'"),
]


@pytest.mark.parametrize("line, pattern", [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_task_line_names_file_and_line(tmp_path, line, pattern):
    data_dir = make_data_dir(tmp_path)
    path = data_dir / "tasks/toy/train.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, line)
    _write(path, lines)
    with pytest.raises(DataError, match=pattern) as info:
        load_task(data_dir, "toy")
    assert str(path) in str(info.value)


def test_blank_lines_keep_line_numbers(tmp_path):
    path = _write(tmp_path / "x.jsonl", [_record(id="a", prompt="p"), "", _record(id="b")])
    with pytest.raises(DataError, match=r"x\.jsonl:3: missing field 'prompt'"):
        read_jsonl(path, ("id", "prompt"))


def test_integer_labels_become_strings(tmp_path):
    path = _write(tmp_path / "x.jsonl", [_record(id="a", text="t", label=1)])
    assert read_jsonl(path, ("id", "text", "label"))[0]["label"] == "1"


def test_empty_task_file(tmp_path):
    data_dir = make_data_dir(tmp_path)
    (data_dir / "tasks/toy/test.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"test\.jsonl: no records"):
        load_task(data_dir, "toy")


def test_missing_task_file(tmp_path):
    data_dir = make_data_dir(tmp_path)
    (data_dir / "tasks/toy/test.jsonl").unlink()
    with pytest.raises(DataError, match=r"test\.jsonl: file not found"):
        load_task(data_dir, "toy")


def test_unknown_task_lists_available(tmp_path):
    with pytest.raises(DataError, match=r"unknown task 'nope'; available: toy"):
        load_task(make_data_dir(tmp_path), "nope")


def test_single_label_task(tmp_path):
    data_dir = make_data_dir(tmp_path)
    _write(data_dir / "tasks/toy/train.jsonl", [_record(id=f"{i}", text=f"t{i}", label="a") for i in range(3)])
    with pytest.raises(DataError, match="at least 2 labels"):
        load_task(data_dir, "toy")


def test_test_label_unseen_in_train(tmp_path):
    data_dir = make_data_dir(tmp_path)
    path = data_dir / "tasks/toy/test.jsonl"
    _write(path, [*path.read_text().splitlines(), _record(id="z", text="zz", label="c")])
    with pytest.raises(DataError, match=r"test\.jsonl:5: label 'c' never appears in train\.jsonl"):
        load_task(data_dir, "toy")


def test_bad_safety_line(tmp_path):
    data_dir = make_data_dir(tmp_path)
    path = data_dir / "safety/benign.jsonl"
    _write(path, [*path.read_text().splitlines(), _record(id="q", text="no prompt field")])
    with pytest.raises(DataError, match=r"benign\.jsonl:11: missing field 'prompt'"):
        load_safety(data_dir)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_shared_data_loads():
    assert {"trec", "sst2", "sms_spam"} <= set(available_tasks(SHARED_DATA))
    trec = load_task(SHARED_DATA, "trec")
    assert trec.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert (len(trec.train), len(trec.test)) == (1160, 400)
    safety = load_safety(SHARED_DATA)
    assert safety.split_source == "splits.json"
    assert (len(safety.harmful_train), len(safety.harmful_test)) == (416, 104)
    assert (len(safety.benign_train), len(safety.benign_test)) == (812, 203)
    assert len(safety.xstest_safe_test) == 50  # the 90 XSTest test prompts hold 50 safe ones
    assert sum(a.startswith("Sure, here is") for a in safety.complying_answers.values()) >= 380
