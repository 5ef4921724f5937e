"""pytest configuration of the microbenchmarks: ``python -m pytest bench -m bench``.

Collects ``bench/bench_*.py`` (the default ``python_files`` pattern only knows ``test_*.py``);
every benchmark carries the ``bench`` marker, which the default test run leaves out.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
