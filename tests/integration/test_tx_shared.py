"""Two coordinators on one shared SQL store (MariaDB and PostgreSQL): each check-back goes out
once across them, either one decides any transaction and the message is delivered once, an SDK
producer polling one node gets the checks of transactions prepared on the other, and a
coordinator that stops renewing its leases (it "died") has its claimed check-backs and
deliveries taken over by the other within a lease period.

Each node has its own broker, delay service and data directory, as separate servers would;
the store has tables of its own per test (dropped after).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker_core.tasks import cancel_and_wait
from tests.integration.tx_store_helpers import own_tables
from tests.unit.broker_helpers import wait_for
from tests.unit.test_coordinator import Node
from txcoord.coordinator import TxRow, TxSettings
from txcoord.sql_store import SqlTxStore
from txcoord.states import TxEvent, TxState

pytestmark = pytest.mark.integration

#: Checks every 200 ms, 1 s leases (claims every 200 ms), high check_max: nothing parks.
LEASE_MS = 1000
SHARED = TxSettings(
    check_immunity_ms=200,
    check_interval_ms=200,
    check_max=100,
    check_timeout_ms=600,
    lease_ms=LEASE_MS,
)


@pytest.fixture(params=["mariadb", "postgresql"])
async def store_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    db = request.getfixturevalue("mysql_url" if request.param == "mariadb" else "postgres_url")
    async with own_tables(db) as url:
        yield url


@pytest.fixture
async def pair(store_url: str, tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    nodes = []
    for name in ("a", "b"):
        node = Node(tmp_path / name, SHARED, SqlTxStore(store_url))
        await node.start()
        await node.broker.create_topic("orders", 2)
        nodes.append(node)
    yield nodes[0], nodes[1]
    for node in nodes:
        if not node.stopped:
            await node.stop()


def delivered(*nodes: Node) -> Counter[bytes]:
    """Each body and how many times it is in any node's topic."""
    return Counter(b for n in nodes for b in n.bodies("orders"))


async def die(node: Node) -> None:
    """The node's coordinator stops dead: no more claims, renewals, answers or releases."""
    node.tx._closing = True
    await cancel_and_wait(node.tx._tasks)


async def test_each_check_back_goes_out_once_across_two_coordinators(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    asked: dict[str, list[int]] = defaultdict(list)

    async def check(request: web.Request) -> web.Response:
        body = await request.json()
        asked[body["tx_id"]].append(body["check_count"])
        # Two checks learn nothing; the third commits.
        return web.json_response({"state": "commit" if body["check_count"] >= 3 else "unknown"})

    app = web.Application()
    app.router.add_post("/check", check)
    async with TestServer(app) as server:
        url = str(server.make_url("/check"))
        ids = [
            await node.prepare(f"m{i}".encode(), check_url=url)
            for i, node in enumerate([a, b] * 10)
        ]

        async def all_committed() -> bool:
            rows = [await a.tx.get(t) for t in ids]
            return all(r.state is TxState.COMMITTED for r in rows)

        deadline = time.monotonic() + 30
        while not await all_committed():
            assert time.monotonic() < deadline, dict(asked)
            await asyncio.sleep(0.1)
        await wait_for(lambda: sum(delivered(a, b).values()) >= 20, timeout_s=10)
    assert {t: asked[t] for t in ids} == {t: [1, 2, 3] for t in ids}  # never asked twice
    assert delivered(a, b) == Counter(f"m{i}".encode() for i in range(20))  # each once
    history = await b.tx.check_history(ids[0])
    assert [h["answer"] for h in history] == ["unknown", "unknown", "commit"]
    row = await b.tx.get(ids[0])
    assert row.check_count == 2 and row.delivered and row.owner is None and row.due_at is None


async def test_either_node_decides_any_transaction_and_delivers_once(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    slow = dataclasses.replace(SHARED, check_immunity_ms=60_000)
    a.tx.settings = b.tx.settings = slow
    one = await a.prepare(b"prepared-on-a")
    assert (await b.tx.commit(one)).state is TxState.COMMITTED
    assert b.bodies("orders") == [b"prepared-on-a"] and a.bodies("orders") == []
    assert (await a.tx.get(one)).delivered

    other = await b.prepare(b"rolled-back-on-a")
    assert (await a.tx.rollback(other)).state is TxState.ROLLED_BACK
    assert (await b.tx.get(other)).state is TxState.ROLLED_BACK

    # Both nodes commit one transaction at once, several times: one decision, one delivery.
    race = await a.prepare(b"raced")
    results = await asyncio.gather(*(n.tx.commit(race) for n in [a, b] * 5))
    assert {r.state for r in results} == {TxState.COMMITTED}
    await asyncio.sleep(LEASE_MS / 1000 * 1.5)  # a second delivery by a lease's end would show
    assert delivered(a, b) == Counter([b"prepared-on-a", b"raced"])


async def test_an_sdk_producer_polling_one_node_is_asked_about_the_others_transactions(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    tx_id = await a.prepare(b"polled-on-b", group="svc")
    checks = await b.tx.poll_checks("svc", max_n=10, wait_ms=5000)
    assert [c["tx_id"] for c in checks] == [tx_id] and checks[0]["check_count"] == 1
    # The answer comes in on the other node (a load balancer's choice).
    assert (await a.tx.answer(tx_id, TxEvent.COMMIT)).state is TxState.COMMITTED
    await asyncio.sleep(SHARED.check_timeout_ms / 1000 + 0.3)  # past b's wait for an answer
    assert [h["answer"] for h in await a.tx.check_history(tx_id)] == ["commit"]
    assert delivered(a, b) == Counter([b"polled-on-b"])
    assert (await b.tx.get(tx_id)).check_count == 0


async def test_a_dead_nodes_claimed_check_back_is_asked_again_by_the_other_within_a_lease(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    asks: list[float] = []
    first_asked = asyncio.Event()
    hold = asyncio.Event()

    async def check(request: web.Request) -> web.Response:
        asks.append(time.monotonic())
        if len(asks) == 1:
            first_asked.set()
            await hold.wait()  # the node that asked dies before the answer
            return web.json_response({"state": "rollback"})
        return web.json_response({"state": "commit"})

    app = web.Application()
    app.router.add_post("/check", check)
    async with TestServer(app) as server:
        url = str(server.make_url("/check"))
        # Only a can claim it first: b is "dead" until a holds the claim.
        b.tx._closing = True
        await cancel_and_wait(b.tx._tasks)
        tx_id = await a.prepare(b"taken-over", check_url=url)
        await asyncio.wait_for(first_asked.wait(), 10)
        row = await b.tx.get(tx_id)
        assert row.owner == a.tx.node_id  # a holds the claim
        await die(a)
        died = time.monotonic()
        b.tx._closing = False
        b.tx._spawn(b.tx._claimer())
        await wait_for(lambda: len(asks) >= 2, timeout_s=10)
        took_s = asks[1] - died
        hold.set()
        await wait_for(lambda: b.bodies("orders") == [b"taken-over"], timeout_s=10)
    # Within the lease (plus the claim poll and the test's own scheduling).
    assert took_s <= LEASE_MS / 1000 + 3 * SHARED.poll_ms / 1000 + 0.5, took_s
    assert (await b.tx.get(tx_id)).state is TxState.COMMITTED
    assert a.bodies("orders") == [] and len(asks) == 2


async def test_a_dead_nodes_undelivered_commit_is_delivered_by_the_other(
    pair: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    slow = dataclasses.replace(SHARED, check_immunity_ms=60_000)
    a.tx.settings = b.tx.settings = slow
    tx_id = await a.prepare(b"decided-then-died")

    async def dies_before_the_put(row: TxRow) -> None:
        return None  # the decision is durable; the node dies before the message is put

    monkeypatch.setattr(a.tx, "_deliver", dies_before_the_put)
    await a.tx.commit(tx_id)
    assert (await b.tx.get(tx_id)).owner == a.tx.node_id
    await die(a)
    died = time.monotonic()
    await wait_for(lambda: b.bodies("orders") == [b"decided-then-died"], timeout_s=10)
    assert time.monotonic() - died <= LEASE_MS / 1000 + 3 * slow.poll_ms / 1000 + 0.5
    for _ in range(100):  # the mark follows the put
        row = await b.tx.get(tx_id)
        if row.delivered:
            break
        await asyncio.sleep(0.05)
    assert row.delivered and row.record is None and row.owner is None
    assert delivered(a, b) == Counter([b"decided-then-died"])


async def test_a_stopping_node_lets_go_of_its_check_backs_at_once(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    long_lease = dataclasses.replace(SHARED, lease_ms=30_000)
    a.tx.settings = b.tx.settings = long_lease
    asks: list[float] = []
    first_asked = asyncio.Event()

    async def check(request: web.Request) -> web.Response:
        asks.append(time.monotonic())
        if len(asks) == 1:
            first_asked.set()
            await asyncio.sleep(60)  # a's stop cuts this call short
        return web.json_response({"state": "commit"})

    app = web.Application()
    app.router.add_post("/check", check)
    async with TestServer(app) as server:
        await die(b)  # only a claims the first check
        tx_id = await a.prepare(b"released", check_url=str(server.make_url("/check")))
        await asyncio.wait_for(first_asked.wait(), 10)
        await a.stop()
        stopped = time.monotonic()
        b.tx._closing = False
        b.tx._spawn(b.tx._claimer())
        await wait_for(lambda: len(asks) >= 2, timeout_s=10)
        await wait_for(lambda: b.bodies("orders") == [b"released"], timeout_s=10)
    assert asks[1] - stopped < 5  # far within the 30 s lease: released, not expired
    assert (await b.tx.get(tx_id)).state is TxState.COMMITTED
