"""docs/openapi.yaml against a running server, by schemathesis with every check it has.

Schemathesis generates requests from the spec, valid and invalid, and checks each answer: no
5xx, only documented status codes and bodies, every schema-valid request accepted and every
schema-violating one refused. Examples per operation are bounded and the seed is fixed, so a
run is the same each time; a failure prints schemathesis's report with a curl line that
reproduces it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tempomq.app import OPENAPI_PATH
from tests.e2e.server import Server

ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = 8
TOKEN = "tmq_spec-run-admin-0123456789abcdef"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    # --max-wait keeps long polls short; the spec says the server's limit caps wait_ms. Auth is
    # on, as the spec's security schemes say: schemathesis also checks that bad credentials fail.
    s = Server(tmp_path / "data", "--max-wait", "1s", env={"TEMPOMQ_ADMIN_TOKEN": TOKEN})
    s.start()
    try:
        yield s
    finally:
        s.ensure_stopped()


def test_the_server_and_its_openapi_spec_agree(server: Server, tmp_path: Path) -> None:
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        str(OPENAPI_PATH),
        "--url",
        server.url,
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "1",
        "--workers",
        "1",
        "--no-shrink",
        "--request-timeout",
        "30",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks",
        "PYTHONPATH": str(ROOT),  # for the hooks; the run's cache goes to its cwd, a tmp dir
        "NO_COLOR": "1",
    }
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    report = done.stdout[-12000:] + done.stderr[-4000:]
    assert done.returncode == 0, f"{report}\n--- server log ---\n{server.log()}"
