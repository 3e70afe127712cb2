"""Transactions with another broker as the release target, on several nodes.

A server releasing into NATS JetStream takes a transaction (and a plain and a delayed send) for a
topic it never created: the topic lives in the target, the name is only validated.

Three ``tempomq serve`` processes share a private Redis (delays, shard leases) and a transaction
store on MariaDB (tables of their own), releasing into NATS JetStream (a stream of its own), then
the same into RabbitMQ (an exchange and queue of their own). Under a load of delayed sends and
transactions spread round-robin (each prepared on one node and committed or rolled back on the
next, some left to a check-back answered through a check URL), one node is SIGKILLed. Every
acknowledged delayed message and every committed transaction's message arrives (JetStream: exactly
once; RabbitMQ: at least once, each copy with its ``message_id``), none before its time, and no
rolled-back one ever does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.e2e.server import Server, call, until_ready
from tests.integration.redis_process import RedisProcess
from tests.integration.target_services import (
    JetStreamReader,
    RabbitReader,
    Received,
    require_nats,
    require_rabbitmq,
    unique,
)
from tests.integration.test_nodes_on_nats import _all_arrived, _send_load
from tests.integration.tx_store_helpers import own_tables

pytestmark = pytest.mark.e2e

#: Check-backs soon after a prepare, leases of a second: a killed node's work moves quickly.
TX_FAST = (
    "--tx-lease",
    "1s",
    "--tx-check-immunity",
    "500ms",
    "--tx-check-interval",
    "500ms",
    "--tx-check-max",
    "100",
)
#: What a transaction's producer means to do: commit, roll back, or leave it to a check-back
#: (which the check URL answers with commit).
INTENTS = ("commit", "rollback", "check")


async def test_a_transaction_needs_no_local_topic_when_releasing_into_nats(
    tmp_path: Path,
) -> None:
    reader = JetStreamReader(require_nats(), unique("TQT"), unique("tqt"))
    await reader.open()
    server = Server(
        tmp_path / "d", "--release-to", reader.url, "--release-topic", reader.subject_template
    )
    try:
        server.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await until_ready(session, server.url)
            base = server.url
            status, tx = await call(
                session,
                "POST",
                f"{base}/v1/transactions",
                {"topic": "never-created", "message": {"body": "tx"}, "producer_group": "svc"},
            )
            assert status == 201, tx
            status, out = await call(
                session, "POST", f"{base}/v1/transactions/{tx['tx_id']}/commit"
            )
            assert status == 200 and out["state"] == "committed", out
            status, plain = await call(
                session, "POST", f"{base}/v1/topics/never-created/messages", {"body": "plain"}
            )
            assert status == 201, plain
            status, later = await call(
                session,
                "POST",
                f"{base}/v1/topics/never-created/messages",
                {"body": "delayed", "delay_ms": 300},
            )
            assert status == 201, later
            # A bad name is still refused.
            status, err = await call(
                session,
                "POST",
                f"{base}/v1/transactions",
                {"topic": "bad name!", "message": {"body": "x"}, "producer_group": "svc"},
            )
            assert status == 400, err
            want = {tx["msg_id"], plain["msg_id"], later["msg_id"]}
            got = await _all_arrived(reader, want, 20)
        assert sorted(r.body for r in got) == [b"delayed", b"plain", b"tx"]
        assert Counter(r.msg_id for r in got) == Counter(want)
        assert {r.headers["Nats-Msg-Id"] for r in got} == want
    finally:
        server.ensure_stopped()
        await reader.close()


@dataclass
class TxLoad:
    """What the transactional producers did. ``meant`` maps each message body to its intent;
    ``committed`` the msg_ids that must arrive (msg_id -> deliver_at); ``rolled_back`` those that
    must never; a prepare whose answer never came may arrive, once, unless it was meant to be
    rolled back."""

    meant: dict[str, str] = field(default_factory=dict)
    due: dict[str, int] = field(default_factory=dict)  # body -> deliver_at asked for
    committed: dict[str, int] = field(default_factory=dict)
    rolled_back: set[str] = field(default_factory=set)
    asked: Counter[str] = field(default_factory=Counter)


async def _check_url_producer(load: TxLoad) -> web.Application:
    """The producer's check URL: answers by the intent the message's key carries."""

    async def check(request: web.Request) -> web.Response:
        body = await request.json()
        intent = body["keys"][0] if body["keys"] else "rollback"
        load.asked[intent] += 1
        return web.json_response({"state": "rollback" if intent == "rollback" else "commit"})

    app = web.Application()
    app.router.add_post("/check", check)
    return app


async def _tx_load(
    session: aiohttp.ClientSession,
    bases: list[str],
    load: TxLoad,
    check_url: str,
    *,
    count: int,
    every_s: float,
) -> None:
    """``count`` transactions round-robin: prepared on one node, committed or rolled back on the
    next (or left to a check-back); half of them delayed by up to 2 s."""
    nodes = itertools.cycle(range(len(bases)))
    for n in range(count):
        i = next(nodes)
        # Each intent in turn on every node (not tied to one: the killed one would get them all).
        intent = INTENTS[(n // len(bases)) % len(INTENTS)]
        body = f"tx-{n}-{intent}"
        load.meant[body] = intent
        deliver_at = int(time.time() * 1000) + (n % 4) * 500
        load.due[body] = deliver_at
        message: dict[str, Any] = {"body": body, "keys": [intent], "deliver_at": deliver_at}
        try:
            status, tx = await call(
                session,
                "POST",
                f"{bases[i]}/v1/transactions",
                {
                    "topic": "orders",
                    "message": message,
                    "producer_group": "svc",
                    "check_url": check_url,
                },
            )
        except aiohttp.ClientError:
            continue  # its node was killed: stored or not, the check-back decides by intent
        if status != 201:
            continue
        msg_id = tx["msg_id"]
        if intent == "rollback":
            load.rolled_back.add(msg_id)
        else:
            load.committed[msg_id] = deliver_at
        if intent != "check":
            other = bases[(i + 1) % len(bases)]
            # A refused or unanswered end (the other node was killed) leaves it to a check-back,
            # which answers by the same intent.
            with contextlib.suppress(aiohttp.ClientError):
                await call(session, "POST", f"{other}/v1/transactions/{tx['tx_id']}/{intent}")
        await asyncio.sleep(every_s)


def _check_arrivals(
    got: list[tuple[Received, int]],
    sent: dict[str, int],
    unanswered: set[int],
    load: TxLoad,
    *,
    exactly_once: bool,
) -> None:
    """``got``: each copy received with the time (epoch ms) it was known to be in the target."""
    must = {**sent, **load.committed}
    counts = Counter(r.msg_id for r, _ in got)
    missing = set(must) - set(counts)
    assert not missing, f"{len(missing)} of {len(must)} acknowledged or committed messages lost"
    if exactly_once:
        assert max(counts.values()) == 1, "stored twice"
    assert not load.rolled_back & set(counts), "a rolled-back transaction's message arrived"
    for r, at_ms in got:
        assert r.msg_id, "a copy without its message id"
        body = r.body.decode()
        if body.startswith("tx-"):
            assert load.meant[body] != "rollback", f"rolled back, yet arrived: {body}"
        elif r.msg_id not in sent:  # a delayed batch whose answer never came
            assert int(body.split("-")[0]) in unanswered, f"a message nobody sent: {body}"
        # A delayed one carries its times; a transaction committed after its time goes straight
        # to the target, without them.
        deliver_at = must.get(r.msg_id) or load.due.get(body) or int(r.headers["DELIVER_AT"])
        if "DELIVER_AT" in r.headers:
            assert int(r.headers["DELIVER_AT"]) == deliver_at, body
            assert int(r.headers["RELEASED_AT"]) >= deliver_at, ("released early", body)
        assert at_ms >= deliver_at - 1, ("in the target early", body, at_ms, deliver_at)


@pytest.fixture
async def tx_store(mysql_url: str) -> AsyncIterator[str]:
    async with own_tables(mysql_url) as url:
        yield url


async def _run_nodes(
    tmp_path: Path,
    redis_url: str,
    tx_store: str,
    release: tuple[str, ...],
    *,
    collect: Any = None,
) -> tuple[dict[str, int], set[int], TxLoad]:
    """Three nodes under delayed and transactional load, the second SIGKILLed mid-load."""
    common = (
        "--redis-url",
        redis_url,
        "--delay-lease-ttl",
        "1s",
        "--tx-store",
        tx_store,
        *TX_FAST,
        *release,
    )
    nodes = [Server(tmp_path / name, *common) for name in "abc"]
    load = TxLoad()
    sent: dict[str, int] = {}
    unanswered: set[int] = set()
    async with TestServer(await _check_url_producer(load)) as producer:
        try:
            for node in nodes:
                node.start()
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for node in nodes:
                    await until_ready(session, node.url, timeout_s=30)
                bases = [n.url for n in nodes]
                delayed = asyncio.create_task(
                    _send_load(
                        session,
                        bases,
                        sent,
                        unanswered,
                        batches=60,
                        per_batch=20,
                        every_s=0.04,
                        delay_ms=(300, 2500),
                    )
                )
                txs = asyncio.create_task(
                    _tx_load(
                        session,
                        bases,
                        load,
                        str(producer.make_url("/check")),
                        count=90,
                        every_s=0.02,
                    )
                )
                await asyncio.sleep(1.5)
                nodes[1].kill()
                await asyncio.gather(delayed, txs)
                # Check-backs of what the killed node held, and its shards' releases, go on.
                if collect is not None:
                    await collect(sent, load)
        finally:
            for node in nodes:
                node.ensure_stopped()
    assert len(sent) >= 600, len(sent)  # a third of the batches go to the killed node
    # About a third each, less what went to the killed node.
    assert len(load.committed) >= 20 and len(load.rolled_back) >= 8, load
    assert load.asked["check"] > 0, "no check-back was asked"
    return sent, unanswered, load


async def test_three_nodes_with_transactions_into_jetstream_one_killed(
    redis_process: RedisProcess, tx_store: str, tmp_path: Path
) -> None:
    reader = JetStreamReader(require_nats(), unique("TQX"), unique("tqx"))
    await reader.open()
    got: list[Received] = []

    async def collect(sent: dict[str, int], load: TxLoad) -> None:
        got.extend(await _all_arrived(reader, set(sent) | set(load.committed), 40))
        await asyncio.sleep(1.5)  # a rolled-back one or a second copy would show by now
        got[:] = await reader.read_all()

    try:
        sent, unanswered, load = await _run_nodes(
            tmp_path,
            redis_process.url,
            tx_store,
            ("--release-to", reader.url, "--release-topic", reader.subject_template),
            collect=collect,
        )
        _check_arrivals([(r, r.stored_ms) for r in got], sent, unanswered, load, exactly_once=True)
    finally:
        await reader.close()


async def test_three_nodes_with_transactions_into_rabbitmq_one_killed(
    redis_process: RedisProcess, tx_store: str, tmp_path: Path
) -> None:
    reader = RabbitReader(require_rabbitmq(), unique("tqx"))
    await reader.open("load", "orders")
    got: list[tuple[Received, int]] = []
    # Pushed as they come: the time a copy is taken is (within a scheduling slice) when it
    # reached the queue.
    await reader.consume(lambda r: got.append((r, int(time.time() * 1000))))

    async def collect(sent: dict[str, int], load: TxLoad) -> None:
        want = set(sent) | set(load.committed)
        deadline = time.monotonic() + 40
        while not want <= {r.msg_id for r, _ in got} and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # a rolled-back one would show by now

    try:
        sent, unanswered, load = await _run_nodes(
            tmp_path,
            redis_process.url,
            tx_store,
            ("--release-to", reader.url, "--release-topic", reader.route_template),
            collect=collect,
        )
        _check_arrivals(got, sent, unanswered, load, exactly_once=False)
    finally:
        await reader.close()
