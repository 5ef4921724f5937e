"""JSON Lines input: one JSON object per line, each error naming its file and line."""

from __future__ import annotations

import json
from typing import Any


def json_object(line: str, where: str, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object on one line of a JSON Lines file.

    Args:
        line: the line's text.
        where: ``"<file>:<line number>"``, the prefix of the error messages.
        error: the ``ValueError`` subclass to raise.

    Raises:
        ``error``: the line is not JSON, or not a JSON object.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record
