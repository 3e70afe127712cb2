"""A server whose configured backend does not answer at start exits 1 with one log line naming
it (password hidden), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.server import free_port

pytestmark = pytest.mark.e2e


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPOMQ_")}
    return subprocess.run(
        [sys.executable, "-m", "tempomq", "serve", "--http", f"127.0.0.1:{free_port()}",
         "--grpc", "off", "--data-dir", str(tmp_path / "data"), "--log-format", "json", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


def test_a_redis_nobody_listens_on_fails_the_start_in_one_line(tmp_path: Path) -> None:
    done = _serve(tmp_path, "--redis-url", f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    assert "startup failed" in output and "redis unavailable" in output, output
    assert "s3cret" not in output
