"""tempomq.client.SyncClient against a spawned server: the async client's calls, blocking, and
transactional messages tied to a blocking SQLAlchemy Session through the barrier table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.orm import Session

from tempomq.client import OutgoingMessage, SyncClient, TransactionRolledBack
from tempomq.client.barrier import create_table_sync, insert_commit_sync
from tests.e2e.server import Server

ORDERS = Table(
    "orders", MetaData(), Column("id", Integer, primary_key=True), Column("note", String(40))
)


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    # Check-backs come soon, so the barrier answers within the test.
    s = Server(tmp_path / "data", "--tx-check-immunity", "100ms", "--tx-check-interval", "200ms")
    s.start()
    try:
        yield s
    finally:
        s.ensure_stopped()


@pytest.fixture
def client(server: Server) -> Iterator[SyncClient]:
    with SyncClient(server.url, timeout_s=10) as c:
        c.create_topic("orders", queues=2)
        yield c


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ORDERS.metadata.create_all(engine)
    create_table_sync(engine)
    return engine


def test_send_query_delayed_receive_ack_and_nack(client: SyncClient) -> None:
    sent = client.send("orders", "one", keys=["order-1"])
    batch = client.send_batch("orders", [OutgoingMessage("two"), OutgoingMessage(b"\x00three")])
    assert client.get_message(sent.msg_id).text == "one"
    assert [m.msg_id for m in client.query_by_key("orders", "order-1")] == [sent.msg_id]
    later = client.send("orders", "later", delay_ms=3_600_000)
    assert later.deliver_at is not None
    assert client.get_delayed(later.msg_id).state == "scheduled"
    moved = client.reschedule_delayed(later.msg_id, delay_ms=7_200_000)
    assert moved.deliver_at > later.deliver_at
    assert client.cancel_delayed(later.msg_id).state == "cancelled"
    got = client.receive("orders", "app", max_messages=10, wait_ms=2000)
    assert sorted(m.msg_id for m in got) == sorted([sent.msg_id, *(r.msg_id for r in batch)])
    first, *rest = got
    client.nack("orders", "app", first, retry_after_ms=0)
    assert client.ack("orders", "app", rest) == 2
    stats = client.group_stats("orders", "app")
    assert stats.inflight == 0


def test_calls_from_several_threads(client: SyncClient) -> None:
    results: list[str] = []

    def send(i: int) -> None:
        results.append(client.send("orders", f"t{i}").msg_id)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 8


def test_a_transaction_sends_if_and_only_if_the_session_commits(
    client: SyncClient, engine: Engine
) -> None:
    with (
        Session(engine) as session,
        client.transaction(
            session, "orders", OutgoingMessage("order 1"), producer_group="shop"
        ) as tx,
    ):
        session.execute(ORDERS.insert().values(id=1, note="paid"))
    assert client.get_transaction(tx.tx_id).state == "committed"
    order_2 = OutgoingMessage("order 2")
    with (
        pytest.raises(RuntimeError, match="out of stock"),
        Session(engine) as session,
        client.transaction(session, "orders", order_2, producer_group="shop") as failed,
    ):
        session.execute(ORDERS.insert().values(id=2, note="never"))
        raise RuntimeError("out of stock")
    assert client.get_transaction(failed.tx_id).state == "rolled_back"
    with Session(engine) as session:
        assert session.execute(select(ORDERS.c.id)).scalars().all() == [1]
    got = client.receive("orders", "billing", max_messages=10, wait_ms=1000)
    assert [m.text for m in got] == ["order 1"]


def test_check_backs_are_answered_from_the_barrier(client: SyncClient, engine: Engine) -> None:
    client.answer_checks("shop", engine)
    # Committed locally but never told: the check-back finds the barrier row.
    committed = client.prepare_transaction("orders", OutgoingMessage("kept"), producer_group="shop")
    with Session(engine) as session:
        session.execute(ORDERS.insert().values(id=3, note="kept"))
        insert_commit_sync(session, committed.tx_id)
        session.commit()
    # Never committed locally: the check-back decides rollback, and the late commit loses.
    lost = client.prepare_transaction("orders", OutgoingMessage("lost"), producer_group="shop")
    wait_for(lambda: client.get_transaction(committed.tx_id).state == "committed")
    wait_for(lambda: client.get_transaction(lost.tx_id).state == "rolled_back")
    with Session(engine) as session, pytest.raises(TransactionRolledBack):
        insert_commit_sync(session, lost.tx_id)
