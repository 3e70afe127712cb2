"""Transactions over HTTP against a real server, killed with SIGKILL mid-flight: after the
restart every transaction ends as its producer decided, and the delivered messages are exactly
the committed ones, each once."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.e2e.server import Server, call

pytestmark = pytest.mark.e2e


async def _drain(base: str, want: int, timeout_s: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        idle = 0
        while time.monotonic() < deadline and (len(got) < want or idle < 3):
            _, data = await call(
                session,
                "POST",
                f"{base}/v1/topics/orders/groups/audit/receive",
                {"max_messages": 500, "wait_ms": 200},
            )
            idle = 0 if data["messages"] else idle + 1
            got.extend(m["body"] for m in data["messages"])
            if data["messages"]:
                await call(
                    session,
                    "POST",
                    f"{base}/v1/topics/orders/groups/audit/ack",
                    {"receipts": [m["receipt"] for m in data["messages"]]},
                )
    return got


async def test_sigkill_mid_flight_keeps_every_outcome(tmp_path: Path) -> None:
    decisions: dict[str, str] = {}  # tx_id -> what the producer's database says

    async def check(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        return web.json_response({"state": decisions.get(body["tx_id"], "unknown")})

    app = web.Application()
    app.router.add_post("/check", check)
    rng = random.Random(11)
    server = Server(
        tmp_path / "data",
        "--flush",
        "sync",
        "--tx-check-immunity",
        "300ms",
        "--tx-check-interval",
        "300ms",
        "--tx-check-max",
        "100",
    )
    async with TestServer(app) as producer:
        check_url = str(producer.make_url("/check"))
        server.start()
        try:
            base = server.url
            committed: set[str] = set()
            rolled_back: set[str] = set()
            async with aiohttp.ClientSession() as session:
                await call(session, "POST", f"{base}/v1/topics", {"name": "orders", "queues": 2})
                for i in range(200):
                    body = f"tx-{i}"
                    status, tx = await call(
                        session,
                        "POST",
                        f"{base}/v1/transactions",
                        {
                            "topic": "orders",
                            "message": {"body": body},
                            "producer_group": "orders-svc",
                            "check_url": check_url,
                            "check_immunity_ms": 300,
                        },
                    )
                    assert status == 201, tx
                    fate = rng.choice(["commit", "rollback", "open-commit", "open-rollback"])
                    if fate == "commit":
                        status, _ = await call(
                            session, "POST", f"{base}/v1/transactions/{tx['tx_id']}/commit"
                        )
                        assert status == 200
                        committed.add(body)
                    elif fate == "rollback":
                        status, _ = await call(
                            session, "POST", f"{base}/v1/transactions/{tx['tx_id']}/rollback"
                        )
                        assert status == 200
                        rolled_back.add(body)
                    else:
                        # The producer died before telling: its database decides at check-back.
                        decisions[tx["tx_id"]] = fate.removeprefix("open-")
                        (committed if fate == "open-commit" else rolled_back).add(body)
            server.kill()  # some open ones were checked already, most were not
            server.start()
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 20
                open_ids = set(decisions)
                while open_ids and time.monotonic() < deadline:
                    for tx_id in list(open_ids):
                        _, info = await call(session, "GET", f"{base}/v1/transactions/{tx_id}")
                        if info["state"] != "prepared":
                            want = "committed" if decisions[tx_id] == "commit" else "rolled_back"
                            assert info["state"] == want, info
                            open_ids.discard(tx_id)
                    await asyncio.sleep(0.1)
                assert not open_ids, f"{len(open_ids)} transactions never checked after restart"
            got = await _drain(base, len(committed), 20)
        finally:
            server.ensure_stopped()
    counts = Counter(got)
    missing, extra = committed - set(counts), set(counts) - committed
    assert not missing and not extra, f"missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
    assert max(counts.values()) == 1
