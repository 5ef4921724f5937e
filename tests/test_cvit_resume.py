"""hpa_kernels.cvit.resume: atomic writes (a killed write leaves the previous file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpa_kernels.cvit import resume


class Killed(BaseException):
    """A kill in the middle of writing (not an Exception: nothing may catch it)."""


@pytest.mark.parametrize("killed_in", ["dump", "replace"])
def test_a_killed_write_leaves_the_previous_results(tmp_path, monkeypatch, killed_in):
    path = tmp_path / "results.json"
    previous = {"methods": {"seqft": {"after_task": []}}, "complete": False}
    resume.write_json_atomic(previous, path)
    if killed_in == "dump":

        def half_written(self, text, *args, **kwargs):
            with open(self, "w", encoding="utf-8") as f:
                f.write(text[: len(text) // 2])
            raise Killed

        monkeypatch.setattr(Path, "write_text", half_written)
    else:

        def killed(*args):
            raise Killed

        monkeypatch.setattr(resume.os, "replace", killed)
    with pytest.raises(Killed):
        resume.write_json_atomic({"methods": {"seqft": {}, "hpa": {}}, "complete": True}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def test_atomic_writes_use_unique_temporary_names(tmp_path):
    seen = []
    for _ in range(2):
        resume.replace_atomic(tmp_path / "f.txt", lambda tmp: (seen.append(tmp.name), tmp.write_text("x")))
    assert seen[0] != seen[1] and all(n.startswith(".f.txt.") and n.endswith(".tmp") for n in seen)
