"""hpa_kernels.jsonl: one JSON object per line, errors naming the file and line."""

from __future__ import annotations

import pytest

from hpa_kernels.jsonl import json_object


class _Custom(ValueError):
    pass


def test_an_object_line_is_returned_as_a_dict():
    assert json_object('{"prompt": "hi", "id": 3}', "f.jsonl:1") == {"prompt": "hi", "id": 3}


@pytest.mark.parametrize(
    "line,match",
    [('{"a": 1 "b": 2}', r"^f\.jsonl:7: not valid JSON \(Expecting ',' delimiter at column 9\)$"),
     ("[1, 2]", r"^f\.jsonl:7: expected a JSON object, got list$"),
     ('"text"', r"^f\.jsonl:7: expected a JSON object, got str$")],
)  # fmt: skip
def test_bad_lines_raise_the_given_error_naming_where(line, match):
    with pytest.raises(_Custom, match=match):
        json_object(line, "f.jsonl:7", _Custom)
    with pytest.raises(ValueError, match=match):
        json_object(line, "f.jsonl:7")
