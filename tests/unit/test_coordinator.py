"""The transaction coordinator on a real broker, delay service and SQLite: a half message is
invisible until committed, outcomes are final and idempotent, check-backs reach producers by
check_url and by the SDK's long poll, unanswered checks park a transaction, and a restart
loses no half message and no outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.message import Message
from delayserver.embedded import EmbeddedDelayStore
from delayserver.service import DelayService
from delayserver.timers import TimerService
from tests.unit.broker_helpers import wait_for
from txcoord.coordinator import Coordinator, TxNotFound, TxSettings
from txcoord.states import AlreadyCommitted, AlreadyRolledBack, TxEvent, TxState
from txcoord.store import TxStore

FAST = TxSettings(check_immunity_ms=150, check_interval_ms=150, check_max=3, check_timeout_ms=300)


class Node:
    """A broker, delay service and coordinator on ``data``; the coordinator's store is the
    SQLite file ``data/tx.db`` unless ``store`` (e.g. a shared SQL store) is given."""

    def __init__(
        self, data: Path, settings: TxSettings = FAST, store: TxStore | None = None
    ) -> None:
        self.timers = TimerService(max_sleep_ms=None)
        self.broker = Broker(BrokerConfig(data_dir=data, segment_bytes=1 << 20), timers=self.timers)
        self.delay = DelayService(
            EmbeddedDelayStore(data / "delay.db"), self.broker.store, self.timers
        )
        self.tx = Coordinator(
            data / "tx.db" if store is None else store,
            self.broker.store,
            self.delay,
            self.timers,
            settings=settings,
        )

    async def start(self) -> Node:
        self.stopped = False
        self.timers.start()
        await self.broker.start()
        await self.delay.start()
        self.broker.scheduler = self.delay
        await self.tx.start()
        return self

    async def stop(self) -> None:
        self.stopped = True
        await self.tx.stop()
        await self.delay.stop()
        await self.broker.stop()
        await self.timers.stop()

    def bodies(self, topic: str) -> list[bytes]:
        store = self.broker.store
        out = []
        for q in range(store.topic(topic).queues):
            lo, hi = store.queue_bounds(topic, q)
            cq = store.consume_queue(topic, q)
            out.extend(store.read(cq.get(i)[0]).body for i in range(lo, hi))  # type: ignore[union-attr]
        return sorted(out)

    async def prepare(
        self,
        body: bytes,
        *,
        check_url: str | None = None,
        group: str = "svc",
        deliver_at_ms: int | None = None,
        keys: tuple[str, ...] = (),
    ) -> str:
        row = await self.tx.prepare(
            Message("orders", body, keys=keys),
            deliver_at_ms=self.timers.now_ms() if deliver_at_ms is None else deliver_at_ms,
            producer_group=group,
            check_url=check_url,
            check_immunity_ms=None,
        )
        return row.tx_id


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    running: list[Node] = []
    yield running
    for n in running:
        await n.stop()


async def _node(nodes: list[Node], data: Path, settings: TxSettings = FAST) -> Node:
    node = await Node(data, settings).start()
    await node.broker.create_topic(
        "orders", 2
    ) if "orders" not in node.broker.store.topics else None
    nodes.append(node)
    return node


async def _state(node: Node, tx_id: str) -> TxState:
    return (await node.tx.get(tx_id)).state


async def test_half_message_is_invisible_until_commit_and_outcomes_are_final(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = await _node(nodes, tmp_path / "d", TxSettings(check_immunity_ms=60_000))
    tx_id = await node.prepare(b"order", keys=("o-1",))
    row = await node.tx.get(tx_id)
    assert row.state is TxState.PREPARED and row.check_count == 0
    assert node.bodies("orders") == []
    assert node.broker.query_key("orders", "o-1") == []
    assert (await node.tx.commit(tx_id)).state is TxState.COMMITTED
    assert node.bodies("orders") == [b"order"]
    assert [m.body for m in node.broker.query_key("orders", "o-1")] == [b"order"]
    assert node.broker.get_message(row.msg_id).body == b"order"
    assert (await node.tx.commit(tx_id)).state is TxState.COMMITTED  # idempotent
    assert node.bodies("orders") == [b"order"]  # and delivered once
    with pytest.raises(AlreadyCommitted):
        await node.tx.rollback(tx_id)

    other = await node.prepare(b"never")
    assert (await node.tx.rollback(other)).state is TxState.ROLLED_BACK
    assert (await node.tx.rollback(other)).state is TxState.ROLLED_BACK
    with pytest.raises(AlreadyRolledBack):
        await node.tx.commit(other)
    assert node.bodies("orders") == [b"order"]
    with pytest.raises(TxNotFound):
        await node.tx.commit("no-such-tx")


async def test_a_resent_prepare_returns_the_first_transaction(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = await _node(nodes, tmp_path / "d", TxSettings(check_immunity_ms=60_000))
    msg_id = node.broker.store.new_msg_id()

    async def prepare() -> str:
        row = await node.tx.prepare(
            Message("orders", b"once", msg_id=msg_id),
            deliver_at_ms=node.timers.now_ms(),
            producer_group="svc",
            check_url=None,
            check_immunity_ms=None,
        )
        return row.tx_id

    first, second = await prepare(), await prepare()
    assert first == second
    await node.tx.commit(first)
    assert node.bodies("orders") == [b"once"]


async def test_concurrent_commits_deliver_once(nodes: list[Node], tmp_path: Path) -> None:
    node = await _node(nodes, tmp_path / "d", TxSettings(check_immunity_ms=60_000))
    tx_id = await node.prepare(b"once")
    results = await asyncio.gather(*(node.tx.commit(tx_id) for _ in range(10)))
    assert {r.state for r in results} == {TxState.COMMITTED}
    assert node.bodies("orders") == [b"once"]


async def test_check_url_answers_decide(nodes: list[Node], tmp_path: Path) -> None:
    answers: dict[str, str] = {}
    asked: list[dict[str, object]] = []

    async def check(request: web.Request) -> web.Response:
        body = await request.json()
        asked.append(body)
        return web.json_response({"state": answers[body["tx_id"]]})

    app = web.Application()
    app.router.add_post("/check", check)
    async with TestServer(app) as server:
        url = str(server.make_url("/check"))
        node = await _node(nodes, tmp_path / "d")
        yes = await node.prepare(b"yes", check_url=url, keys=("k",))
        no = await node.prepare(b"no", check_url=url)
        answers.update({yes: "commit", no: "rollback"})
        await wait_for(lambda: len(asked) >= 2)
        await wait_for(lambda: node.bodies("orders") == [b"yes"])
        for _ in range(100):
            if await _state(node, no) is TxState.ROLLED_BACK:
                break
            await asyncio.sleep(0.02)
        assert await _state(node, no) is TxState.ROLLED_BACK
        first = next(a for a in asked if a["tx_id"] == yes)
        assert first["topic"] == "orders" and first["keys"] == ["k"] and first["check_count"] == 1


async def test_unanswered_checks_park_the_transaction_which_stays_resolvable(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = await _node(nodes, tmp_path / "d")
    # A check_url nobody listens on: every check fails and counts as unknown.
    tx_id = await node.prepare(b"stuck", check_url="http://127.0.0.1:9/check")
    for _ in range(100):
        if await _state(node, tx_id) is TxState.CHECK_MAX:
            break
        await asyncio.sleep(0.05)
    row = await node.tx.get(tx_id)
    assert row.state is TxState.CHECK_MAX and row.check_count == FAST.check_max
    assert [r.tx_id for r in await node.tx.list_state(TxState.CHECK_MAX)] == [tx_id]
    assert node.bodies("orders") == []
    assert (await node.tx.commit(tx_id)).state is TxState.COMMITTED
    assert node.bodies("orders") == [b"stuck"]


async def test_sdk_producers_answer_through_the_long_poll(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = await _node(nodes, tmp_path / "d")
    tx_id = await node.prepare(b"polled", group="svc")
    checks = await node.tx.poll_checks("svc", max_n=10, wait_ms=3000)
    assert [c["tx_id"] for c in checks] == [tx_id]
    assert await node.tx.poll_checks("other", max_n=10, wait_ms=50) == []
    assert (await node.tx.answer(tx_id, TxEvent.COMMIT)).state is TxState.COMMITTED
    assert node.bodies("orders") == [b"polled"]


async def test_an_unanswered_long_poll_check_counts_and_is_asked_again(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = await _node(nodes, tmp_path / "d")
    tx_id = await node.prepare(b"slow", group="svc")
    first = await node.tx.poll_checks("svc", max_n=10, wait_ms=3000)
    assert [c["check_count"] for c in first] == [1]  # the first check-back
    second = await node.tx.poll_checks("svc", max_n=10, wait_ms=3000)  # after the timeout
    assert [c["check_count"] for c in second] == [2]
    # The first is over and counted: the transaction and its check-backs count alike.
    assert (await node.tx.get(tx_id)).check_count == 1
    assert (await node.tx.answer(tx_id, TxEvent.ROLLBACK)).state is TxState.ROLLED_BACK


async def test_transactional_and_delayed(nodes: list[Node], tmp_path: Path) -> None:
    node = await _node(nodes, tmp_path / "d", TxSettings(check_immunity_ms=60_000))
    at = node.timers.now_ms() + 400
    tx_id = await node.prepare(b"later", deliver_at_ms=at)
    await node.tx.commit(tx_id)
    assert node.bodies("orders") == []
    await wait_for(lambda: node.bodies("orders") == [b"later"])
    assert node.timers.now_ms() >= at


async def test_restart_keeps_open_transactions_and_checks_them_again(
    nodes: list[Node], tmp_path: Path
) -> None:
    data = tmp_path / "d"
    slow = TxSettings(
        check_immunity_ms=500, check_interval_ms=150, check_max=3, check_timeout_ms=300
    )
    node = await _node(nodes, data, slow)
    tx_id = await node.prepare(b"survivor", group="svc")
    done = await node.prepare(b"decided")
    await node.tx.commit(done)
    nodes.remove(node)
    await node.stop()

    again = await _node(nodes, data, slow)
    assert await _state(again, tx_id) is TxState.PREPARED
    assert await _state(again, done) is TxState.COMMITTED
    checks = await again.tx.poll_checks("svc", max_n=10, wait_ms=3000)
    assert [c["tx_id"] for c in checks] == [tx_id]
    await again.tx.answer(tx_id, TxEvent.COMMIT)
    assert again.bodies("orders") == [b"decided", b"survivor"]


async def test_a_committed_but_undelivered_transaction_is_delivered_at_start(
    nodes: list[Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d"
    node = await _node(nodes, data, TxSettings(check_immunity_ms=60_000))
    tx_id = await node.prepare(b"decided")

    async def crash(row: object) -> None:
        return None  # the process "dies" after the decision, before the message is put

    monkeypatch.setattr(node.tx, "_deliver", crash)
    await node.tx.commit(tx_id)
    assert node.bodies("orders") == []
    nodes.remove(node)
    await node.stop()

    again = await _node(nodes, data, TxSettings(check_immunity_ms=60_000))
    await wait_for(lambda: again.bodies("orders") == [b"decided"])
