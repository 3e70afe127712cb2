"""Delayed messages over HTTP against a real server: on time, never early, cancel and
reschedule, and exactly-once release across a SIGKILL with thousands pending."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.server import Server, call

pytestmark = pytest.mark.e2e


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _collect(
    session: aiohttp.ClientSession, base: str, topic: str, group: str, want: int, timeout_s: float
) -> list[dict[str, Any]]:
    """Receive and ack until ``want`` messages arrived or the time is up; each message gets
    the local time it was received at."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        status, data = await call(
            session,
            "POST",
            f"{base}/v1/topics/{topic}/groups/{group}/receive",
            {"max_messages": 500, "wait_ms": 200},
        )
        assert status == 200, data
        now = _now_ms()
        for m in data["messages"]:
            m["received_at"] = now
        got.extend(data["messages"])
        if data["messages"]:
            await call(
                session,
                "POST",
                f"{base}/v1/topics/{topic}/groups/{group}/ack",
                {"receipts": [m["receipt"] for m in data["messages"]]},
            )
    return got


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Server(tmp_path / "data")
    s.start()
    yield s
    s.ensure_stopped()


async def test_on_time_never_early_cancel_and_reschedule(server: Server) -> None:
    base = server.url
    async with aiohttp.ClientSession() as session:
        await call(session, "POST", f"{base}/v1/topics", {"name": "d", "queues": 4})
        await _collect(session, base, "d", "g", 0, 0)  # the group exists before anything is due
        delays = [200 + 1800 * i // 39 for i in range(40)]
        status, sent = await call(
            session,
            "POST",
            f"{base}/v1/topics/d/messages",
            {"messages": [{"body": f"m{i}", "delay_ms": d} for i, d in enumerate(delays)]},
        )
        assert status == 201
        ids = [r["msg_id"] for r in sent["results"]]
        status, info = await call(session, "GET", f"{base}/v1/delayed/{ids[0]}")
        assert status == 200 and info["state"] == "scheduled" and info["topic"] == "d"
        # Sent again with the same id and another delay: stored once, answered with its time.
        status, again = await call(
            session,
            "POST",
            f"{base}/v1/topics/d/messages",
            {"body": "m0", "msg_id": ids[0], "delay_ms": 600_000},
        )
        assert status == 201 and again["deliver_at"] == sent["results"][0]["deliver_at"]

        # Cancel two, move one later and one earlier.
        for i in (5, 30):
            status, body = await call(session, "DELETE", f"{base}/v1/delayed/{ids[i]}")
            assert status == 200 and body["state"] == "cancelled"
        later_at = _now_ms() + 2600
        status, body = await call(
            session, "PATCH", f"{base}/v1/delayed/{ids[10]}", {"deliver_at": later_at}
        )
        assert status == 200 and body["deliver_at"] == later_at
        status, body = await call(session, "PATCH", f"{base}/v1/delayed/{ids[39]}", {"delay_ms": 0})
        assert status == 200

        got = await _collect(session, base, "d", "g", 38, 8)
        bodies = Counter(m["body"] for m in got)
        assert set(bodies) == {f"m{i}" for i in range(40)} - {"m5", "m30"}
        assert max(bodies.values()) == 1
        for m in got:
            deliver_at = int(m["properties"]["DELIVER_AT"])
            released_at = int(m["properties"]["RELEASED_AT"])
            assert released_at >= deliver_at, "released early"
            assert m["received_at"] - deliver_at < 1000, "more than a second late"
        moved = next(m for m in got if m["body"] == "m10")
        assert int(moved["properties"]["DELIVER_AT"]) == later_at

        status, body = await call(session, "DELETE", f"{base}/v1/delayed/{ids[0]}")
        assert status == 409 and body["error"] == "already_delivered"
        status, body = await call(session, "GET", f"{base}/v1/delayed/{ids[5]}")
        assert body["state"] == "cancelled"
        status, body = await call(session, "GET", f"{base}/v1/delayed/{'0' * 32}")
        assert status == 404


async def test_bad_delays_are_refused(server: Server) -> None:
    base = server.url
    async with aiohttp.ClientSession() as session:
        await call(session, "POST", f"{base}/v1/topics", {"name": "d", "queues": 1})
        for bad in (
            {"delay_ms": -1},
            {"delay_ms": 5, "deliver_at": _now_ms()},
            {"delay_ms": 11 * 365 * 24 * 3600 * 1000},
            {"deliver_at": "soon"},
        ):
            status, body = await call(
                session, "POST", f"{base}/v1/topics/d/messages", {"body": "x", **bad}
            )
            assert status == 400 and body["error"] == "invalid_message", (bad, body)
        status, body = await call(
            session, "POST", f"{base}/v1/topics/d/messages", {"body": "x", "deliver_at": 1}
        )
        assert status == 400 and "looks like seconds" in body["message"]  # 1970: seconds?
        past = _now_ms() - 60_000
        status, body = await call(
            session, "POST", f"{base}/v1/topics/d/messages", {"body": "past", "deliver_at": past}
        )
        assert status == 201 and body["deliver_at"] >= past  # a time in the past means now
        got = await _collect(session, base, "d", "g", 1, 5)
        assert [m["body"] for m in got] == ["past"]


async def test_sigkill_with_thousands_pending_releases_each_exactly_once(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", "--flush", "sync")
    server.start()
    rng = random.Random(7)
    try:
        async with aiohttp.ClientSession() as session:
            base = server.url
            await call(session, "POST", f"{base}/v1/topics", {"name": "d", "queues": 4})
            await _collect(session, base, "d", "g", 0, 0)
            acked: dict[str, int] = {}
            for batch in range(30):
                msgs = [
                    {"body": f"b{batch}-{i}", "delay_ms": rng.randint(300, 6000)}
                    for i in range(100)
                ]
                status, sent = await call(
                    session, "POST", f"{base}/v1/topics/d/messages", {"messages": msgs}
                )
                assert status == 201
                for m, r in zip(msgs, sent["results"], strict=True):
                    acked[m["body"]] = r["deliver_at"]
            await asyncio.sleep(1.0)
            server.kill()  # some are released, most pending, some fall due while down
        await asyncio.sleep(2.0)
        restarted_at = _now_ms()
        server.start()
        async with aiohttp.ClientSession() as session:  # the old connections died with it
            got = await _collect(session, base, "d", "g", len(acked), 30)
    finally:
        server.ensure_stopped()
    counts = Counter(m["body"] for m in got)
    assert set(counts) == set(acked), f"missing {len(set(acked) - set(counts))}"
    assert max(counts.values()) == 1, "a message was released twice"
    for m in got:
        deliver_at = int(m["properties"]["DELIVER_AT"])
        assert deliver_at == acked[m["body"]]
        assert int(m["properties"]["RELEASED_AT"]) >= deliver_at, "released early"
    overdue = [m for m in got if acked[m["body"]] < restarted_at]
    assert overdue, "the outage should have made some overdue"
    # Overdue ones went out right after the restart (well within its first seconds).
    assert max(int(m["properties"]["RELEASED_AT"]) for m in overdue) - restarted_at < 10_000
