"""Real ``tempomq serve`` processes on a shared transaction store: a server SIGKILLed while it
holds a check-back has it asked again by the other within a lease, which then delivers the
message once; and the store going down (a TCP proxy this test cuts, never the shared database)
answers 503 ``transaction_store_unavailable`` with ``/readyz`` naming the reason, and loses
nothing once it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy.engine import make_url

from tests.e2e.server import Server, call, drain, wait_ready
from tests.integration.tx_store_helpers import TcpProxy, own_tables

pytestmark = pytest.mark.integration

LEASE = ("--tx-lease", "1s")
FAST = ("--tx-check-immunity", "300ms", "--tx-check-interval", "300ms", "--tx-check-max", "100")


@pytest.fixture(params=["mariadb", "postgresql"])
async def store_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    db = request.getfixturevalue("mysql_url" if request.param == "mariadb" else "postgres_url")
    async with own_tables(db) as url:
        yield url


async def _prepare(session: aiohttp.ClientSession, base: str, body: str, **extra: Any) -> str:
    status, tx = await call(
        session,
        "POST",
        f"{base}/v1/transactions",
        {"topic": "orders", "message": {"body": body}, "producer_group": "svc", **extra},
    )
    assert status == 201, tx
    return str(tx["tx_id"])


async def _bodies(
    session: aiohttp.ClientSession, base: str, *, at_least: int = 0, idle_polls: int = 4
) -> list[str]:
    """What the group ``audit`` receives (and acks) from ``base``'s topic ``orders``."""
    got = await drain(
        session, base, "orders", "audit", idle_polls=idle_polls, at_least=at_least, timeout_s=20
    )
    return [m["body"] for m in got]


async def test_a_sigkilled_servers_check_back_is_taken_over_and_delivered_once(
    store_url: str, tmp_path: Path
) -> None:
    asks: list[tuple[str, int]] = []
    first = asyncio.Event()
    hold = asyncio.Event()

    async def check(request: web.Request) -> web.Response:
        body = await request.json()
        asks.append((body["tx_id"], body["check_count"]))
        if len(asks) == 1:
            first.set()
            await hold.wait()  # its server is killed while waiting for this answer
        return web.json_response({"state": "commit"})

    app = web.Application()
    app.router.add_post("/check", check)
    servers = [
        Server(tmp_path / name, "--tx-store", store_url, *LEASE, *FAST) for name in ("a", "b")
    ]
    async with TestServer(app) as producer, aiohttp.ClientSession() as session:
        try:
            for s in servers:
                s.start()
                assert (await wait_ready(session, s.url, timeout_s=30))[0] == 200
                await call(session, "POST", f"{s.url}/v1/topics", {"name": "orders", "queues": 2})
            a, b = servers
            tx_id = await _prepare(
                session, a.url, "survives", check_url=str(producer.make_url("/check"))
            )
            # Only a runs while the first check goes out.
            b.kill()
            await asyncio.wait_for(first.wait(), 15)
            b.start()
            a.kill()
            killed = time.monotonic()
            while len(asks) < 2:
                assert time.monotonic() - killed < 15, asks
                await asyncio.sleep(0.05)
            took_s = time.monotonic() - killed
            hold.set()
            assert await _bodies(session, b.url, at_least=1, idle_polls=6) == ["survives"]
            status, info = await call(session, "GET", f"{b.url}/v1/transactions/{tx_id}")
            assert status == 200 and info["state"] == "committed", info
            a.start()
            assert await _bodies(session, a.url) == []  # delivered by b only
        finally:
            hold.set()
            for s in servers:
                s.ensure_stopped()
    # Lease 1s; b's start-up (a second or two on a loaded machine) is inside this time too.
    assert took_s < 10, took_s
    assert asks[0][0] == asks[1][0] == tx_id


async def test_the_store_down_is_a_503_with_its_reason_and_nothing_is_lost(
    store_url: str, tmp_path: Path
) -> None:
    url = make_url(store_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 0)
    await proxy.start()
    via_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
    server = Server(tmp_path / "d", "--tx-store", via_proxy, *LEASE)
    try:
        await asyncio.to_thread(server.start)  # the proxy runs on this loop meanwhile
        base = server.url
        async with aiohttp.ClientSession() as session:
            assert (await wait_ready(session, base, timeout_s=30))[0] == 200
            await call(session, "POST", f"{base}/v1/topics", {"name": "orders", "queues": 2})
            kept = await _prepare(session, base, "kept", check_immunity_ms=3_600_000)
            await proxy.cut()
            status, err = await call(
                session,
                "POST",
                f"{base}/v1/transactions",
                {"topic": "orders", "message": {"body": "x"}, "producer_group": "svc"},
            )
            assert status == 503 and err["error"] == "transaction_store_unavailable", err
            status, ready = await call(session, "GET", f"{base}/readyz")
            assert status == 503 and "transaction store" in ready["checks"]["transactions"], ready
            status, err = await call(session, "POST", f"{base}/v1/transactions/{kept}/commit")
            assert status == 503, err
            await proxy.restore()
            assert (await wait_ready(session, base, timeout_s=30))[0] == 200
            status, out = await call(session, "POST", f"{base}/v1/transactions/{kept}/commit")
            assert status == 200 and out["state"] == "committed", out
            assert await _bodies(session, base, at_least=1) == ["kept"]
    finally:
        server.ensure_stopped()
        await proxy.close()
