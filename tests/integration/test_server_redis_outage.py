"""A real tempomq server with its delay store in Redis, while that Redis dies and comes back:
delayed sends answer 503 with the reason, /readyz names the delay store, nothing acknowledged
is lost, and the server recovers by itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.server import Server, call, wait_ready
from tests.integration.redis_process import RedisProcess

pytestmark = pytest.mark.integration


async def _receive_all(
    session: aiohttp.ClientSession, base: str, want: int, timeout_s: float
) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        _, data = await call(
            session,
            "POST",
            f"{base}/v1/topics/t/groups/g/receive",
            {"max_messages": 100, "wait_ms": 200},
        )
        got.extend(m["body"] for m in data["messages"])
        if data["messages"]:
            await call(
                session,
                "POST",
                f"{base}/v1/topics/t/groups/g/ack",
                {"receipts": [m["receipt"] for m in data["messages"]]},
            )
    return got


async def test_delayed_sends_survive_a_redis_outage(
    redis_process: RedisProcess, tmp_path: Path
) -> None:
    redis_process.kill()
    redis_process.persist = True  # Redis with AOF: what it acknowledged outlives a restart
    redis_process.start()
    server = Server(tmp_path / "data", "--redis-url", redis_process.url)
    server.start()
    try:
        async with aiohttp.ClientSession() as session:
            base = server.url
            await call(session, "POST", f"{base}/v1/topics", {"name": "t", "queues": 2})
            await _receive_all(session, base, 0, 0)  # create the group
            status, _ = await call(
                session,
                "POST",
                f"{base}/v1/topics/t/messages",
                {"messages": [{"body": f"before-{i}", "delay_ms": 2500} for i in range(20)]},
            )
            assert status == 201

            redis_process.kill()
            status, body = await call(
                session, "POST", f"{base}/v1/topics/t/messages", {"body": "during", "delay_ms": 100}
            )
            assert status == 503 and body["error"] == "delay_store_unavailable", body
            status, ready = await call(session, "GET", f"{base}/readyz")
            assert status == 503 and "delay_store" in ready["checks"], ready
            # Plain sends do not need the delay store.
            status, _ = await call(
                session, "POST", f"{base}/v1/topics/t/messages", {"body": "plain"}
            )
            assert status == 201

            await asyncio.sleep(3.0)  # the "before" ones fall due while Redis is down
            redis_process.start()
            status, _ = await wait_ready(session, base, timeout_s=10.0)
            assert status == 200
            status, _ = await call(
                session, "POST", f"{base}/v1/topics/t/messages", {"body": "after", "delay_ms": 200}
            )
            assert status == 201
            got = await _receive_all(session, base, 22, 15)
            assert sorted(got) == sorted(["after", "plain"] + [f"before-{i}" for i in range(20)])
    finally:
        server.ensure_stopped()


async def test_messages_scheduled_in_redis_survive_a_server_restart(
    redis_process: RedisProcess, tmp_path: Path
) -> None:
    server = Server(tmp_path / "data", "--redis-url", redis_process.url)
    server.start()
    try:
        async with aiohttp.ClientSession() as session:
            base = server.url
            await call(session, "POST", f"{base}/v1/topics", {"name": "t", "queues": 2})
            await _receive_all(session, base, 0, 0)
            status, _ = await call(
                session,
                "POST",
                f"{base}/v1/topics/t/messages",
                {"messages": [{"body": f"m{i}", "delay_ms": 1500} for i in range(50)]},
            )
            assert status == 201
            server.kill()
        server.start()
        async with aiohttp.ClientSession() as session:  # the old connections died with it
            got = await _receive_all(session, server.url, 50, 15)
        assert sorted(got) == sorted(f"m{i}" for i in range(50))
    finally:
        server.ensure_stopped()
