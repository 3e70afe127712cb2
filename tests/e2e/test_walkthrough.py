"""The README's walk-through (docs/walkthrough.sh) works as written against a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.server import Server

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_walkthrough(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")
    server.start()
    try:
        runs = [
            subprocess.run(
                ["bash", str(ROOT / "docs" / "walkthrough.sh"), server.url],
                capture_output=True,
                text=True,
                timeout=60,
                env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
            )
            for _ in range(2)  # a second run in a row finds the topic there and works too
        ]
    finally:
        server.ensure_stopped()
    for out in runs:
        assert out.returncode == 0, out.stderr + out.stdout
        check_walkthrough_output(out.stdout)
    assert "topic_exists" in runs[1].stdout


def check_walkthrough_output(stdout: str) -> None:
    blocks = stdout.split("\n$ ")
    received = json.loads(blocks[3].splitlines()[1])
    assert sorted(m["body"] for m in received["messages"]) == [
        "order 17 created",
        "order 18 created",
        "order 19 created",
    ]
    assert json.loads(blocks[4].splitlines()[1]) == {"acked": 3, "failed": []}
    lag = json.loads(blocks[5].splitlines()[1])
    assert lag["lag"] == 0 and lag["inflight"] == 0
    found = json.loads(blocks[6].splitlines()[1])
    assert found["messages"] and all(m["keys"] == ["order-17"] for m in found["messages"])
    answers = "".join(blocks[7].splitlines()[1:]).replace("}{", "}\n{")
    delayed = [json.loads(x) for x in answers.splitlines()]
    sent, state, moved, cancelled = delayed
    assert state == {
        "msg_id": sent["msg_id"],
        "topic": "orders",
        "deliver_at": sent["deliver_at"],
        "state": "scheduled",
    }
    assert moved["deliver_at"] < sent["deliver_at"] and moved["state"] == "scheduled"
    assert cancelled["state"] == "cancelled"
    # And the README shows the same commands.
    readme = (ROOT / "README.md").read_text()
    for path in (
        "/v1/topics",
        "/messages",
        "/groups/billing/receive",
        "/groups/billing/ack",
        "/v1/delayed/",
    ):
        assert path in readme
