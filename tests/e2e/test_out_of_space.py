"""A real server whose data directory is on a small tmpfs that fills up: everything that must
write (sends, topics, a new group, the delay store, the transaction DB) answers 503 with the
cause (never 500), and once space is freed the server takes sends,
topics, new groups, delayed and transactional messages and turns ready again by itself, and
everything acknowledged before is there after a restart.

Needs ``mount`` (root): skipped with the reason elsewhere, except under ``CI=true``.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.server import Server, call, drain, wait_ready

pytestmark = pytest.mark.e2e

#: The largest body sent; segments of 2 MiB keep the whole CommitLog small on an 8 MiB disk.
BODY = "x" * 16_000
OUT_OF_SPACE = ("No space left on device", "database or disk is full")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs: {result.stderr.strip() or result.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def server(small_disk: Path) -> Iterator[Server]:
    s = Server(
        small_disk / "data",
        *("--flush", "sync", "--segment-bytes", "2MiB", "--max-body-bytes", "64KiB"),
    )
    # The log goes next to the data (on the small disk) unless moved off it.
    s.log_path = small_disk.parent / f"server-{s.port}.log"
    yield s
    s.ensure_stopped()


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full."""
    chunk = b"\0" * 65536
    # Unbuffered: a buffered file would try the rest of a short write again at close, and
    # raise ENOSPC there.
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def assert_out_of_space(status: int, body: Any, code: str = "store_unavailable") -> None:
    assert status == 503, body
    assert body["error"] == code, body
    assert any(cause in body["message"] for cause in OUT_OF_SPACE), body


async def send(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> Any:
    return await call(session, "POST", f"{base}/v1/topics/t/messages", body)


async def test_a_full_disk_is_503_with_the_cause_and_heals_once_space_is_freed(
    server: Server, small_disk: Path
) -> None:
    server.start()
    base = server.url
    acked: list[str] = []
    async with aiohttp.ClientSession() as session:
        assert (await call(session, "POST", f"{base}/v1/topics", {"name": "t", "queues": 2}))[
            0
        ] == 201
        for i in range(20):
            status, _ = await send(session, base, {"body": f"before-{i}"})
            assert status == 201
            acked.append(f"before-{i}")

        filler = small_disk / "filler"
        fill(filler)
        # The CommitLog may still have room in its current segment: send until it has none.
        for i in range(1000):
            status, data = await send(session, base, {"body": f"{i}-{BODY}"})
            if status != 201:
                break
            acked.append(f"{i}-{BODY}")
        assert_out_of_space(status, data)

        assert_out_of_space(
            *await call(session, "POST", f"{base}/v1/topics", {"name": "t2", "queues": 1})
        )
        assert_out_of_space(
            *await call(session, "POST", f"{base}/v1/topics/t/groups/new/receive", {"wait_ms": 0})
        )
        status, ready = await call(session, "GET", f"{base}/readyz")
        assert status == 503 and "broker" in ready["checks"], ready
        # The embedded delay store and the transaction DB (SQLite) are on the same disk.
        assert_out_of_space(
            *await send(session, base, {"body": "later", "delay_ms": 500}),
            code="delay_store_unavailable",
        )
        assert_out_of_space(
            *await call(
                session,
                "POST",
                f"{base}/v1/transactions",
                {"topic": "t", "message": {"body": "tx"}, "producer_group": "p"},
            ),
            code="transaction_store_unavailable",
        )
        status, ready = await call(session, "GET", f"{base}/readyz")
        assert status == 503 and ready["checks"].keys() >= {"delay_store", "transactions"}

        filler.unlink()
        # No restart: the server notices by itself that writes succeed again.
        status, ready = await wait_ready(session, base)
        assert status == 200, ready

        status, _ = await send(session, base, {"body": "after"})
        assert status == 201
        acked.append("after")
        status, data = await send(session, base, {"body": "delayed-after", "delay_ms": 200})
        assert status == 201, data
        acked.append("delayed-after")
        assert (await call(session, "POST", f"{base}/v1/topics", {"name": "t2", "queues": 1}))[
            0
        ] == 201
        status, data = await call(
            session, "POST", f"{base}/v1/topics/t/groups/new/receive", {"wait_ms": 0}
        )
        assert status == 200, data
        status, data = await call(
            session,
            "POST",
            f"{base}/v1/transactions",
            {"topic": "t2", "message": {"body": "tx"}, "producer_group": "p"},
        )
        assert status == 201, data
        status, data = await call(session, "POST", f"{base}/v1/transactions/{data['tx_id']}/commit")
        assert status == 200, data

    assert server.terminate() == 0
    server.start()
    async with aiohttp.ClientSession() as session:
        got = await drain(session, server.url, "t", "audit", at_least=len(acked))
        tx = await drain(session, server.url, "t2", "audit", at_least=1)
    bodies = [m["body"] for m in got]
    assert sorted(set(acked) - set(bodies)) == []
    assert [m["body"] for m in tx] == ["tx"]
