"""Two real tempomq servers on one real Redis, and on a Redis Cluster: they split the delay
shards, each releases what it accepted into its own topics, a cancel made on one server reaches
the other's message, and when one is SIGKILLed the survivor takes its shards and releases its
messages, exactly once and never early."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.server import Server, call, drain
from tests.integration.redis_process import RedisProcess

pytestmark = pytest.mark.e2e

LEASE = "1s"


async def _owned(session: aiohttp.ClientSession, base: str) -> int:
    async with session.get(f"{base}/metrics") as r:
        text = await r.text()
    m = re.search(r"^tempomq_delay_shards_owned ([0-9.]+)$", text, re.M)
    assert m is not None, "the metric is missing"
    return int(float(m.group(1)))


async def _wait_owned(
    session: aiohttp.ClientSession, expect: dict[str, int], timeout_s: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        got = {base: await _owned(session, base) for base in expect}
        if got == expect:
            return
        assert time.monotonic() < deadline, f"shards held {got}, expected {expect}"
        await asyncio.sleep(0.1)


async def _send(session: aiohttp.ClientSession, base: str, msgs: list[dict[str, Any]]) -> list[str]:
    status, data = await call(session, "POST", f"{base}/v1/topics/d/messages", {"messages": msgs})
    assert status == 201, data
    return [r["msg_id"] for r in data["results"]]


async def _receive(
    session: aiohttp.ClientSession, base: str, want: int, timeout_s: float
) -> list[dict[str, Any]]:
    return await drain(session, base, "d", "g", idle_polls=1, at_least=want, timeout_s=timeout_s)


@pytest.fixture(params=["redis", "cluster"])
def shared_redis(request: pytest.FixtureRequest) -> str:
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster_url"))
    process: RedisProcess = request.getfixturevalue("redis_process")
    return process.url


async def test_two_servers_share_one_redis_and_survive_a_sigkill(
    shared_redis: str, tmp_path: Path
) -> None:
    a = Server(tmp_path / "a", "--redis-url", shared_redis, "--delay-lease-ttl", LEASE)
    b = Server(tmp_path / "b", "--redis-url", shared_redis, "--delay-lease-ttl", LEASE)
    a.start()
    try:
        b.start()
        async with aiohttp.ClientSession() as session:
            await _wait_owned(session, {a.url: 8, b.url: 8})
            for s in (a, b):
                await call(session, "POST", f"{s.url}/v1/topics", {"name": "d", "queues": 2})
                await drain(
                    session, s.url, "d", "g", idle_polls=1
                )  # the group exists before releases

            # Each server releases what it accepted, into its own topic.
            soon = [{"body": f"soon-{s}-{i}", "delay_ms": 300} for s in "ab" for i in range(50)]
            await _send(session, a.url, soon[:50])
            await _send(session, b.url, soon[50:])
            got_a = await _receive(session, a.url, 50, 10)
            got_b = await _receive(session, b.url, 50, 10)
            assert sorted(m["body"] for m in got_a) == sorted(m["body"] for m in soon[:50])
            assert sorted(m["body"] for m in got_b) == sorted(m["body"] for m in soon[50:])

            # A cancel sent to a, of a message b holds and has in its wheel.
            (doomed,) = await _send(session, b.url, [{"body": "doomed", "delay_ms": 1500}])
            status, info = await call(session, "DELETE", f"{a.url}/v1/delayed/{doomed}")
            assert status == 200 and info["state"] == "cancelled", info

            # Pending on b when it dies: due before a can take over, and after.
            later = [{"body": f"b-{i}", "delay_ms": 200 + 20 * i} for i in range(150)]
            later_ids = await _send(session, b.url, later)
            mine = [{"body": f"a-{i}", "delay_ms": 1000 + 10 * i} for i in range(50)]
            await _send(session, a.url, mine)
            b.kill()
            killed_at = time.monotonic()
            await _wait_owned(session, {a.url: 16})
            took_over_s = time.monotonic() - killed_at

            got = await _receive(session, a.url, 200, 20)
            counts = Counter(m["body"] for m in got)
            assert sorted(counts) == sorted(m["body"] for m in later + mine), "lost or extra"
            assert max(counts.values()) == 1, "released twice"
            assert "doomed" not in counts
            for m in got:
                props = m["properties"]
                assert int(props["RELEASED_AT"]) >= int(props["DELIVER_AT"]), "released early"
            for msg_id in later_ids[:3]:
                status, info = await call(session, "GET", f"{a.url}/v1/delayed/{msg_id}")
                assert status == 200 and info["state"] == "delivered", info
            # The lease (1 s) bounds the takeover, plus a renewal round or two.
            assert took_over_s < 4.0, took_over_s
    finally:
        a.ensure_stopped()
        b.ensure_stopped()


async def _topic_holds(session: aiohttp.ClientSession, base: str, topic: str = "d") -> int:
    status, data = await call(session, "GET", f"{base}/v1/topics/{topic}")
    assert status == 200, data
    return sum(q["max_offset"] - q["min_offset"] for q in data["queue_offsets"])


async def test_a_resend_is_stored_once_on_redis_also_after_a_restart(
    redis_process: RedisProcess, tmp_path: Path
) -> None:
    """The Redis store's id filter, loaded from Redis at start: a plain resend of a delayed id
    stores nothing and answers the first result, before and after a restart; a delayed resend
    of a plain id too; a cancelled one stays cancelled."""
    server = Server(tmp_path / "a", "--redis-url", redis_process.url)
    server.start()
    ids = {kind: f"{n:032x}" for n, kind in enumerate(("delayed", "plain", "cancelled"), 1)}
    try:
        async with aiohttp.ClientSession() as session:
            base = server.url
            await call(session, "POST", f"{base}/v1/topics", {"name": "d", "queues": 4})
            first = {}
            for kind, msg_id in ids.items():
                msg: dict[str, Any] = {"body": kind, "msg_id": msg_id}
                if kind != "plain":
                    msg["delay_ms"] = 3_600_000
                status, first[kind] = await call(
                    session, "POST", f"{base}/v1/topics/d/messages", msg
                )
                assert status == 201, first[kind]
            status, _ = await call(session, "DELETE", f"{base}/v1/delayed/{ids['cancelled']}")
            assert status == 200
        for restarted in (False, True):
            if restarted:
                server.terminate()
                server.start()
            async with aiohttp.ClientSession() as session:
                base = server.url
                for kind, msg_id in ids.items():
                    for again in ({}, {"delay_ms": 3_600_000}):
                        status, answer = await call(
                            session,
                            "POST",
                            f"{base}/v1/topics/d/messages",
                            {"body": kind, "msg_id": msg_id, **again},
                        )
                        assert status == 201, answer
                        assert answer["queue_id"] == first[kind]["queue_id"], (kind, answer)
                        if kind != "plain":
                            assert answer["deliver_at"] == first[kind]["deliver_at"]
                assert await _topic_holds(session, base) == 1  # the plain one only
                status, info = await call(session, "GET", f"{base}/v1/delayed/{ids['plain']}")
                assert status == 404, info
                status, info = await call(session, "GET", f"{base}/v1/delayed/{ids['cancelled']}")
                assert info["state"] == "cancelled", info
    finally:
        server.ensure_stopped()


async def test_a_release_keeps_out_a_copy_another_server_stored_plain(
    redis_process: RedisProcess, tmp_path: Path
) -> None:
    """Servers remember ids each for itself: an id scheduled on b after a started is not in
    a's id filter, so a plain send of it to a is stored. When a then releases that delayed
    message (b is gone, a holds every shard), it finds the copy and keeps the message out: the
    id is in a's topic once."""
    a = Server(tmp_path / "a", "--redis-url", redis_process.url, "--delay-lease-ttl", LEASE)
    b = Server(tmp_path / "b", "--redis-url", redis_process.url, "--delay-lease-ttl", LEASE)
    a.start()
    try:
        b.start()
        msg_id = "00000000000000000000000000000abc"
        async with aiohttp.ClientSession() as session:
            await _wait_owned(session, {a.url: 8, b.url: 8})
            for s in (a, b):
                await call(session, "POST", f"{s.url}/v1/topics", {"name": "d", "queues": 2})
            msg = {"body": "once", "msg_id": msg_id}
            status, _ = await call(
                session, "POST", f"{b.url}/v1/topics/d/messages", {**msg, "delay_ms": 6000}
            )
            assert status == 201
            status, _ = await call(session, "POST", f"{a.url}/v1/topics/d/messages", msg)
            assert status == 201
            b.kill()
            await _wait_owned(session, {a.url: 16})
            deadline = time.monotonic() + 20  # due after a took b's shards over
            while True:
                status, info = await call(session, "GET", f"{a.url}/v1/delayed/{msg_id}")
                if info["state"] == "delivered":
                    break
                assert time.monotonic() < deadline, info
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.2)
            assert await _topic_holds(session, a.url) == 1
    finally:
        a.ensure_stopped()
        b.ensure_stopped()
