"""The runnable example in docs/API.md runs and its assertions hold."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "API.md"


def test_api_example_runs(tmp_path: Path) -> None:
    text = DOCS.read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S)
    assert example, "docs/API.md lost its example"
    script = tmp_path / "example.py"
    script.write_text(example.group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 generations" in out.stdout
