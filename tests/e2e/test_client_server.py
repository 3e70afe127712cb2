"""The SDK against a real ``tempomq serve``: sends (idempotent resends), reads, delayed messages,
a Consumer, failover from a dead endpoint, error mapping; and, once the server has the
transaction coordinator, TransactionalProducer with a SQLite barrier (skipped before that).

docs/sdk.md points at these tests for its snippets.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from tempomq.client import (
    AlreadyCancelled,
    Barrier,
    Client,
    Consumer,
    NotFound,
    OutgoingMessage,
    ReceivedMessage,
    TopicNotFound,
    TransactionalProducer,
)
from tests.e2e.server import Server

pytestmark = pytest.mark.e2e


async def eventually(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data")
    s.start()
    yield s
    s.ensure_stopped()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    async with Client(server.url) as c:
        await c.create_topic("orders", 4)
        yield c


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_send_read_and_resend_the_same_msg_id(client: Client) -> None:
    first = await client.send("orders", "hello", tags="created", keys=["order-17"])
    again = await client.send(
        "orders", "hello", tags="created", keys=["order-17"], msg_id=first.msg_id
    )
    assert again == first  # a resend is stored once and answers the first result
    stored = await client.get_message(first.msg_id)
    assert (stored.text, stored.tags, stored.keys) == ("hello", "created", ("order-17",))
    assert [m.msg_id for m in await client.query_by_key("orders", "order-17")] == [first.msg_id]
    raw = await client.send("orders", b"\x00\xff")
    assert (await client.get_message(raw.msg_id)).body == b"\x00\xff"


async def test_batch_of_more_than_a_request_holds(client: Client) -> None:
    results = await client.send_batch("orders", [OutgoingMessage(str(i)) for i in range(1500)])
    assert len({r.msg_id for r in results}) == 1500
    assert (await client.get_message(results[1234].msg_id)).text == "1234"


async def test_delayed_message_query_cancel_reschedule(client: Client) -> None:
    sent = await client.send("orders", "later", delay_ms=3_600_000)
    assert sent.deliver_at is not None
    state = await client.get_delayed(sent.msg_id)
    assert (state.state, state.deliver_at) == ("scheduled", sent.deliver_at)
    moved = await client.reschedule_delayed(sent.msg_id, delay_ms=7_200_000)
    assert moved.deliver_at > sent.deliver_at
    assert (await client.cancel_delayed(sent.msg_id)).state == "cancelled"
    assert (await client.cancel_delayed(sent.msg_id)).state == "cancelled"  # repeat: same
    with pytest.raises(AlreadyCancelled):
        await client.reschedule_delayed(sent.msg_id, delay_ms=1)


async def test_a_consumer_acks_handled_messages_and_retries_failed_ones(client: Client) -> None:
    handled: list[tuple[str, int]] = []

    async def handler(msg: ReceivedMessage) -> None:
        handled.append((msg.text, msg.delivery_attempt))
        if msg.text == "flaky" and msg.delivery_attempt == 1:
            raise RuntimeError("first attempt fails")

    await client.send_batch("orders", [OutgoingMessage(f"m{i}") for i in range(20)])
    await client.send("orders", "flaky")
    consumer = Consumer(client, "orders", "billing", handler, concurrency=4, wait_ms=500)
    consumer.start()
    try:
        await eventually(lambda: len(handled) >= 21)
        stats = await client.group_stats("orders", "billing")
        assert stats.inflight >= 0
    finally:
        await consumer.stop(drain_timeout_s=10)
    assert ("flaky", 1) in handled
    assert sorted(text for text, _ in handled if text != "flaky") == sorted(
        f"m{i}" for i in range(20)
    )


async def test_failover_from_a_dead_endpoint_and_error_mapping(server: Server) -> None:
    async with Client([dead_endpoint(), server.url], retries=1) as client:
        await client.create_topic("payments")
        sent = await client.send("payments", "x")
        assert client.current_endpoint == server.url
        assert (await client.get_message(sent.msg_id)).text == "x"
        with pytest.raises(TopicNotFound):
            await client.send("nowhere", "x")


# -- transactions (the coordinator lands separately) -------------------------------------------

orders_table = Table(
    "orders", MetaData(), Column("id", Integer, primary_key=True), Column("tx", String(64))
)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    async with eng.begin() as conn:
        await conn.run_sync(orders_table.create)
    yield eng
    await eng.dispose()


async def require_transactions(client: Client) -> None:
    try:
        await client.get_transaction("0" * 32)
    except NotFound as e:
        if e.code == "not_found":  # no such route: this server has no coordinator yet
            pytest.skip("the server does not serve /v1/transactions yet")


async def test_transactional_send_commits_with_the_database(
    client: Client, engine: AsyncEngine
) -> None:
    await require_transactions(client)
    barrier = Barrier(engine)
    await barrier.create_table()
    producer = TransactionalProducer(client, "order-svc", barrier=barrier)
    async with producer, AsyncSession(engine) as session:
        async with producer.transaction("orders", OutgoingMessage("paid"), session) as tx:
            await session.execute(orders_table.insert().values(id=1, tx=tx.tx_id))
        with pytest.raises(RuntimeError):
            async with producer.transaction("orders", OutgoingMessage("lost"), session) as lost:
                raise RuntimeError("payment declined")
    assert (await client.get_transaction(tx.tx_id)).state == "committed"
    assert (await client.get_transaction(lost.tx_id)).state == "rolled_back"
    received = await client.receive("orders", "shipping", wait_ms=2000)
    assert [m.text for m in received] == ["paid"]
    async with engine.connect() as conn:
        assert (await conn.execute(select(orders_table.c.tx))).scalars().all() == [tx.tx_id]


async def test_an_abandoned_transaction_is_rolled_back_by_the_check_back(
    client: Client, engine: AsyncEngine
) -> None:
    await require_transactions(client)
    barrier = Barrier(engine)
    await barrier.create_table()
    async with TransactionalProducer(client, "order-svc", barrier=barrier):
        # A producer that died between prepare and its local commit: no barrier row.
        tx = await client.prepare_transaction(
            "orders", OutgoingMessage("orphan"), producer_group="order-svc", check_immunity_ms=100
        )
        deadline = time.monotonic() + 60
        while (await client.get_transaction(tx.tx_id)).state == "prepared":
            assert time.monotonic() < deadline, "the check-back never resolved the transaction"
            await asyncio.sleep(0.1)
    assert (await client.get_transaction(tx.tx_id)).state == "rolled_back"
    assert await barrier.check(tx.tx_id) == "rollback"
