"""One owner per data directory, with real servers: a second ``tempomq serve`` on a directory in
use exits 1 naming the owner's pid and touches none of its files, whether its own port is free
or taken; the owner keeps serving and keeps everything it acknowledged."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.server import Server, call, drain, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def owner(tmp_path: Path):  # type: ignore[no-untyped-def]
    # A checkpoint period far beyond the test: any change in the directory while the second
    # server tries its luck would be the second server's doing.
    server = Server(tmp_path / "data", "--flush", "sync", "--flush-interval", "1h")
    yield server
    server.ensure_stopped()


def _second_server(data_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPOMQ_")}
    return subprocess.run(
        [sys.executable, "-m", "tempomq", "serve", "--http", f"127.0.0.1:{port}",
         "--data-dir", str(data_dir), "--log-format", "json"],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: its mtime and a hash of its content."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (path.stat().st_mtime_ns, digest)
    return out


async def _settled_tree(root: Path, timeout_s: float = 60.0) -> dict[str, tuple[int, str]]:
    """:func:`_tree` once the running owner has stopped writing (two reads 1 s apart agree): a
    restarted owner goes on writing for a while (recovery, its first flushes), longer on a slow
    machine, and only what the second server does may be compared."""
    deadline = time.monotonic() + timeout_s
    tree = _tree(root)
    while True:
        await asyncio.sleep(1.0)
        again = _tree(root)
        if again == tree or time.monotonic() > deadline:
            return again
        tree = again


async def _send(session: aiohttp.ClientSession, base: str, bodies: list[str]) -> None:
    status, data = await call(
        session, "POST", f"{base}/v1/topics/t/messages", {"messages": [{"body": b} for b in bodies]}
    )
    assert status == 201, data


async def test_a_second_server_on_another_port_is_refused_and_the_first_keeps_its_data(
    owner: Server,
) -> None:
    owner.start()
    assert owner.proc is not None
    async with aiohttp.ClientSession() as session:
        await call(session, "POST", f"{owner.url}/v1/topics", {"name": "t", "queues": 2})
        await _send(session, owner.url, [f"before-{i}" for i in range(50)])

        second = _second_server(owner.data_dir, free_port())
        assert second.returncode == 1, second
        expected = f"data directory {owner.data_dir} is in use by pid {owner.proc.pid}"
        assert expected in second.stderr.splitlines(), second.stderr

        # The owner still serves, and what it acknowledged survives its restart.
        await _send(session, owner.url, [f"after-{i}" for i in range(50)])
    owner.kill()
    owner.start()
    async with aiohttp.ClientSession() as session:
        got = await drain(session, owner.url, "t", "audit", at_least=100)
    assert sorted(m["body"] for m in got) == sorted(
        [f"before-{i}" for i in range(50)] + [f"after-{i}" for i in range(50)]
    )


async def test_a_second_server_on_a_busy_port_touches_no_file(owner: Server) -> None:
    owner.start()
    async with aiohttp.ClientSession() as session:
        await call(session, "POST", f"{owner.url}/v1/topics", {"name": "t", "queues": 2})
        await _send(session, owner.url, ["kept"])
        status, _ = await call(
            session, "POST", f"{owner.url}/v1/topics/t/groups/g/receive", {"wait_ms": 0}
        )
        assert status == 200
    # Stop the owner once cleanly and restart it, so checkpoint.json and the other files that a
    # clean stop writes exist while it runs.
    assert owner.terminate() == 0
    owner.start()
    assert (owner.data_dir / "checkpoint.json").exists()
    before = await _settled_tree(owner.data_dir)

    second = _second_server(owner.data_dir, owner.port)
    assert second.returncode == 1, second
    assert "is in use by pid" in second.stderr, second.stderr
    assert _tree(owner.data_dir) == before
    async with aiohttp.ClientSession() as session:
        status, _ = await call(session, "GET", f"{owner.url}/readyz")
        assert status == 200
