"""The README's Python examples run as written (blocks that start with "# sketch" are excerpts
that need the reader's own model, data or process group, and are only compiled)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    pytest.importorskip("transformers")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    runnable = [block for block in blocks if not block.startswith("# sketch")]
    assert runnable, "README has no runnable python example"
    for block in blocks:
        code = compile(block, str(README), "exec")
        if block in runnable:
            exec(code, {"__name__": "readme_example"})
