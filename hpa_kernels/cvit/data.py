"""Data of the continual-tuning runner: JSON Lines safety sets and classification tasks.

A data directory is laid out as ``../shared/data`` (and the sample bundled in
``hpa_kernels/data``)::

    safety/harmful.jsonl        {"id": str, "prompt": str, "target"?: str}   requests the model must refuse;
                                ``target``: a complying opening (AdvBench's "Sure, here is ...")
    safety/benign.jsonl         {"id": str, "prompt": str, ...}   requests it must answer
    safety/xstest.jsonl         optional: {"id", "prompt", "label": "safe" | "unsafe"}; the safe
                                prompts measure over-refusal on look-alikes of harmful requests
    safety/splits.json          optional: {"splits": {"safety/harmful.jsonl": {"train": [ids], "test": [ids]}, ...}}
    tasks/<name>/train.jsonl    {"id": str, "text": str, "label": str | int}
    tasks/<name>/test.jsonl     same fields

Every loader validates everything it reads and raises :class:`DataError` naming the file (and
the line, where one is at fault) before any model is touched.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..jsonl import json_object

HARMFUL_FILE = "safety/harmful.jsonl"
BENIGN_FILE = "safety/benign.jsonl"
XSTEST_FILE = "safety/xstest.jsonl"
SPLITS_FILE = "safety/splits.json"
SAFETY_TEST_FRACTION = 0.2
# The complying answer of a harmful prompt whose file gives no usable ``target``.
GENERIC_COMPLYING_ANSWER = "Sure, here is how to do that."
# AdvBench rows whose ``target`` belongs to a neighbouring prompt (../shared/data/README.md,
# "Caveat"): their target is not used.
MISMATCHED_TARGETS = frozenset(
    {"advbench-061", "advbench-063", "advbench-281", "advbench-283", "advbench-458", "advbench-459"}
)


class DataError(ValueError):
    """Bad input data; the message names the file and, where one is at fault, the line."""


@dataclass(frozen=True)
class SafetyData:
    """Harmful and benign prompts, each split into a train part (alignment, calibration,
    harmful mixing) and a held-out test part (ASR and over-refusal).

    Attributes:
        complying_answers: ``{harmful train prompt: complying answer}`` for the harmful mixing
            (the file's ``target``, or :data:`GENERIC_COMPLYING_ANSWER`).
        xstest_safe_test: XSTest's safe prompts of the test split (empty without the file).
    """

    harmful_train: list[str]
    harmful_test: list[str]
    benign_train: list[str]
    benign_test: list[str]
    complying_answers: dict[str, str]
    xstest_safe_test: list[str]
    split_source: str  # "splits.json" or "seeded"


@dataclass(frozen=True)
class TaskData:
    """One classification task. ``train``/``test`` hold ``(text, label index)`` pairs; label
    indices point into ``labels`` (the sorted distinct train labels)."""

    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def default_data_dir() -> Path:
    """The small sample bundled with the package (written for this project)."""
    return Path(str(resources.files("hpa_kernels") / "data"))


def read_jsonl(path: Path, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSON Lines file whose records each carry the given string fields.

    Fields named in ``optional`` are returned when present (and checked like the others).
    Blank lines are skipped. ``label`` may be a JSON string or integer (returned as ``str``);
    every other field must be a non-empty string. Ids must be unique within the file. Each
    returned record holds the requested fields plus ``"_line"``: its 1-based line number.

    Raises:
        DataError: missing or unreadable file, a line that is not a JSON object, a missing,
            empty or mistyped field, a duplicate id, or a file with no records; the message
            is ``"<path>:<line>: <what>"``.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records: list[dict] = []
    seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        obj = json_object(line, f"{path}:{lineno}", DataError)
        record: dict = {"_line": lineno}
        for name in (*fields, *(o for o in optional if o in obj)):
            if name not in obj:
                raise DataError(f"{path}:{lineno}: missing field {name!r}")
            value = obj[name]
            if name == "label" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise DataError(f"{path}:{lineno}: field {name!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{path}:{lineno}: field {name!r} is empty")
            record[name] = value
        if "id" in record:
            if record["id"] in seen:
                raise DataError(f"{path}:{lineno}: duplicate id {record['id']!r} (first on line {seen[record['id']]})")
            seen[record["id"]] = lineno
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def available_tasks(data_dir: Path) -> list[str]:
    """Names of the folders under ``<data_dir>/tasks``, sorted."""
    tasks_dir = Path(data_dir) / "tasks"
    if not tasks_dir.is_dir():
        return []
    return sorted(p.name for p in tasks_dir.iterdir() if p.is_dir())


def load_task(
    data_dir: Path, name: str, *, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """Load ``tasks/<name>/{train,test}.jsonl``.

    ``max_train``/``max_test`` keep a seeded random subset of that many examples (in file
    order); ``None`` keeps all.

    Raises:
        DataError: unknown task name, any problem :func:`read_jsonl` reports, fewer than two
            labels in train, or a test label that train never shows (file and line named).
    """
    data_dir = Path(data_dir)
    names = available_tasks(data_dir)
    if name not in names:
        raise DataError(f"{data_dir / 'tasks'}: unknown task {name!r}; available: {', '.join(names) or '(none)'}")
    folder = data_dir / "tasks" / name
    train_path, test_path = folder / "train.jsonl", folder / "test.jsonl"
    train_records = read_jsonl(train_path, ("id", "text", "label"))
    test_records = read_jsonl(test_path, ("id", "text", "label"))
    labels = sorted({r["label"] for r in train_records})
    if len(labels) < 2:
        raise DataError(f"{train_path}: task {name!r} needs at least 2 labels, found {labels}")
    index = {label: i for i, label in enumerate(labels)}
    for record in test_records:
        if record["label"] not in index:
            raise DataError(
                f"{test_path}:{record['_line']}: label {record['label']!r} never appears in {train_path.name}"
            )
    train = [(r["text"], index[r["label"]]) for r in train_records]
    test = [(r["text"], index[r["label"]]) for r in test_records]
    return TaskData(
        name=name,
        labels=labels,
        train=subsample(train, max_train, seed, f"{name}/train"),
        test=subsample(test, max_test, seed, f"{name}/test"),
    )


def load_safety(data_dir: Path, *, seed: int = 0) -> SafetyData:
    """Load the harmful, benign and (where present) XSTest prompts and split each into train/test.

    The split is the one in ``safety/splits.json`` when that file lists the prompt file;
    otherwise a seeded random split with ``SAFETY_TEST_FRACTION`` held out (at least one
    prompt on each side).

    Raises:
        DataError: any problem :func:`read_jsonl` reports; a malformed ``splits.json``; an id
            in it that the prompt file lacks; a file with fewer than two prompts; an XSTest
            ``label`` other than ``safe`` / ``unsafe``.
    """
    data_dir = Path(data_dir)
    splits = _read_splits(data_dir / SPLITS_FILE)
    sources: list[str] = []
    harmful = read_jsonl(data_dir / HARMFUL_FILE, ("id", "prompt"), optional=("target",))
    harmful_train, harmful_test = _split(harmful, data_dir, HARMFUL_FILE, splits, seed, sources)
    benign_train, benign_test = _split(
        read_jsonl(data_dir / BENIGN_FILE, ("id", "prompt")), data_dir, BENIGN_FILE, splits, seed, sources
    )
    xstest_safe: list[str] = []
    if (data_dir / XSTEST_FILE).is_file():
        records = read_jsonl(data_dir / XSTEST_FILE, ("id", "prompt", "label"))
        for r in records:
            if r["label"] not in ("safe", "unsafe"):
                raise DataError(
                    f"{data_dir / XSTEST_FILE}:{r['_line']}: label must be 'safe' or 'unsafe', got {r['label']!r}"
                )
        _, test = _split(records, data_dir, XSTEST_FILE, splits, seed, sources)
        xstest_safe = [r["prompt"] for r in test if r["label"] == "safe"]
    complying = {
        r["prompt"]: r["target"] if "target" in r and r["id"] not in MISMATCHED_TARGETS else GENERIC_COMPLYING_ANSWER
        for r in harmful_train
    }
    return SafetyData(
        harmful_train=[r["prompt"] for r in harmful_train],
        harmful_test=[r["prompt"] for r in harmful_test],
        benign_train=[r["prompt"] for r in benign_train],
        benign_test=[r["prompt"] for r in benign_test],
        complying_answers=complying,
        xstest_safe_test=xstest_safe,
        split_source="+".join(sorted(set(sources))),
    )


def _split(
    records: list[dict], data_dir: Path, rel: str, splits: dict, seed: int, sources: list[str]
) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` records of one safety file: by ``splits.json`` or a seeded split."""
    path = data_dir / rel
    if len(records) < 2:
        raise DataError(f"{path}: needs at least 2 prompts (a train and a test part), found {len(records)}")
    if rel in splits:
        by_id = {r["id"]: r for r in records}
        chosen = []
        for side in ("train", "test"):
            missing = [i for i in splits[rel][side] if i not in by_id]
            if missing:
                raise DataError(f"{data_dir / SPLITS_FILE}: {rel} {side} lists id {missing[0]!r}, absent from {path}")
            chosen.append([by_id[i] for i in splits[rel][side]])
        sources.append("splits.json")
        return chosen[0], chosen[1]
    order = list(range(len(records)))
    random.Random(f"{seed}:{rel}").shuffle(order)
    n_test = min(len(records) - 1, max(1, round(SAFETY_TEST_FRACTION * len(records))))
    test_idx = set(order[:n_test])
    sources.append("seeded")
    return (
        [r for i, r in enumerate(records) if i not in test_idx],
        [r for i, r in enumerate(records) if i in test_idx],
    )


def mix_harmful(
    train: list[tuple[str, str]], complying: dict[str, str], share: float, seed: int
) -> list[tuple[str, str]]:
    """Mix harmful prompts answered compliantly into a task's (prompt, answer) training pairs:
    the paper's injection condition.

    ``round(share * len(train))`` harmful prompts (at least one when ``share > 0``; drawn with
    replacement only if the pool is too small) are added with their complying answer
    (``complying``: prompt → answer); the result is shuffled. Seeded by ``seed``.

    Raises:
        ValueError: ``share`` outside [0, 1], or an empty pool with ``share > 0``.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"harmful share must be in [0, 1], got {share}")
    if share == 0.0:
        return list(train)
    if not complying:
        raise ValueError("no harmful prompts to mix in")
    rng = random.Random(seed)
    pool = sorted(complying)
    n = max(1, round(share * len(train)))
    picked = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
    mixed = list(train) + [(prompt, complying[prompt]) for prompt in picked]
    rng.shuffle(mixed)
    return mixed


def _read_splits(path: Path) -> dict[str, dict[str, list[str]]]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    splits = obj.get("splits") if isinstance(obj, dict) else None
    if not isinstance(splits, dict):
        raise DataError(f"{path}: expected an object with a 'splits' object")
    for rel, entry in splits.items():
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(side), list) and all(isinstance(i, str) for i in entry[side])
            for side in ("train", "test")
        )
        if not ok:
            raise DataError(f"{path}: splits[{rel!r}] must hold 'train' and 'test' lists of ids")
        if rel in (HARMFUL_FILE, BENIGN_FILE) and (not entry["train"] or not entry["test"]):
            raise DataError(f"{path}: splits[{rel!r}] has an empty train or test list")
    return splits


def subsample(examples: list, limit: int | None, seed: int, key: str) -> list:
    """A seeded random subset of ``limit`` examples, in their order (all when ``limit`` is None
    or not smaller); seeded by ``seed`` and ``key``, so each set draws its own subset.

    Raises:
        ValueError: ``limit < 1``.
    """
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise ValueError(f"subsample size must be >= 1, got {limit}")
    keep = sorted(random.Random(f"{seed}:{key}").sample(range(len(examples)), limit))
    return [examples[i] for i in keep]
