"""Every Python block of docs/sdk.md runs, in order, as a script against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.server import Server

pytestmark = pytest.mark.e2e

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
DOC_URL = "http://127.0.0.1:8080"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_page_has_examples() -> None:
    assert len(python_blocks()) >= 5


def test_every_example_runs(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")
    server.start()
    try:
        for n, block in enumerate(python_blocks(), start=1):
            assert DOC_URL in block, f"example {n} does not talk to {DOC_URL}"
            script = tmp_path / f"example_{n}.py"
            script.write_text(block.replace(DOC_URL, server.url))
            done = subprocess.run(
                [sys.executable, str(script)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, f"example {n} failed:\n{block}\n{done.stderr}"
    finally:
        server.ensure_stopped()
