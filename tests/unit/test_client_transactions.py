"""TransactionalProducer against an in-test coordinator and a SQLite database: the order of
prepare, local commit and message commit; rollbacks; the barrier's duplicate key; the check-back
listener answering from the barrier or a callback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import Column, Integer, MetaData, String, Table, event, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from tempomq.client import (
    Barrier,
    CheckRequest,
    Client,
    InvalidMessage,
    OutgoingMessage,
    TransactionalProducer,
    TransactionRolledBack,
)

ServerFactory = Callable[..., Awaitable[TestServer]]
orders = Table(
    "orders", MetaData(), Column("id", Integer, primary_key=True), Column("tx", String(64))
)


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class FakeCoordinator:
    """The coordinator's wire protocol, in memory; ``events`` records the calls in order."""

    def __init__(self, barrier: Barrier) -> None:
        self.barrier = barrier
        self.events: list[str] = []
        self.states: dict[str, str] = {}
        self.checks: list[dict[str, Any]] = []
        self.answers: dict[str, str] = {}
        self.committed_rows_at_commit: list[tuple[Any, ...]] = []
        self.status: dict[str, int] = {}  # action -> status to answer instead
        self.polls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/transactions", self.prepare)
        app.router.add_post("/v1/transactions/{tx_id}/{action}", self.end)
        app.router.add_get("/v1/producers/{group}/checks", self.poll)
        return app

    def refuse(self, action: str) -> web.Response | None:
        status = self.status.get(action)
        if status is None:
            return None
        code = {400: "invalid_message", 503: "store_unavailable"}[status]
        return web.json_response({"error": code, "message": action}, status=status)

    async def prepare(self, request: web.Request) -> web.Response:
        body = await request.json()
        refused = self.refuse("prepare")
        if refused:
            return refused
        tx_id = f"tx-{len(self.states) + 1}"
        self.states[tx_id] = "prepared"
        self.events.append("prepare")
        assert body["producer_group"] == "order-svc" and body["topic"] == "orders"
        return web.json_response({"tx_id": tx_id, "msg_id": body["message"]["msg_id"]}, status=201)

    async def end(self, request: web.Request) -> web.Response:
        tx_id, action = request.match_info["tx_id"], request.match_info["action"]
        self.events.append(action)
        refused = self.refuse(action)
        if refused:
            return refused
        if action == "check":
            answer = (await request.json())["state"]
            self.answers[tx_id] = answer
            new = {"commit": "committed", "rollback": "rolled_back"}.get(answer, "prepared")
            self.states[tx_id] = new
            return web.json_response({"state": new})
        if action == "commit":  # what a consumer-side reader of the database sees right now
            async with self.barrier.engine.connect() as conn:
                found = await conn.execute(
                    select(self.barrier.table.c.tx_id, self.barrier.table.c.outcome)
                )
                self.committed_rows_at_commit = [tuple(r) for r in found]
        self.states[tx_id] = {"commit": "committed", "rollback": "rolled_back"}[action]
        return web.json_response({"state": self.states[tx_id]})

    async def poll(self, request: web.Request) -> web.Response:
        self.polls += 1
        refused = self.refuse("poll")
        if refused:
            return refused
        if not self.checks:
            await asyncio.sleep(0.05)  # a short stand-in for the long poll
        out, self.checks = self.checks, []
        return web.json_response({"checks": out})

    def ask(self, tx_id: str) -> None:
        self.checks.append(
            {
                "tx_id": tx_id,
                "msg_id": "0" * 32,
                "topic": "orders",
                "keys": ["k"],
                "properties": {},
                "check_count": 1,
            }
        )


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    async with eng.begin() as conn:
        await conn.run_sync(orders.create)
    yield eng
    await eng.dispose()


@pytest.fixture
async def barrier(engine: AsyncEngine) -> Barrier:
    b = Barrier(engine)
    await b.create_table()
    return b


@pytest.fixture
async def coordinator(barrier: Barrier) -> FakeCoordinator:
    return FakeCoordinator(barrier)


@pytest.fixture
async def client(
    coordinator: FakeCoordinator, aiohttp_server: ServerFactory
) -> AsyncIterator[Client]:
    server = await aiohttp_server(coordinator.app())
    async with Client(str(server.make_url("/")), retries=1, timeout_s=5) as c:
        yield c


def record_db_commits(session: AsyncSession, events: list[str]) -> None:
    event.listen(session.sync_session, "after_commit", lambda _: events.append("db_commit"))


async def order_rows(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(select(orders))]


MESSAGE = OutgoingMessage('{"order": 1}', keys=["order-1"])


async def test_commit_path_prepares_then_commits_the_database_then_the_message(
    client: Client, barrier: Barrier, coordinator: FakeCoordinator
) -> None:
    producer = TransactionalProducer(client, "order-svc", barrier=barrier)
    async with AsyncSession(barrier.engine) as session:
        record_db_commits(session, coordinator.events)
        async with producer.transaction("orders", MESSAGE, session) as tx:
            assert coordinator.events == ["prepare"]
            await session.execute(orders.insert().values(id=1, tx=tx.tx_id))
    assert coordinator.events == ["prepare", "db_commit", "commit"]
    assert coordinator.committed_rows_at_commit == [(tx.tx_id, "commit")]
    assert await order_rows(barrier.engine) == [(1, tx.tx_id)]
    assert coordinator.states[tx.tx_id] == "committed" and len(tx.msg_id) == 32


async def test_an_exception_rolls_back_the_database_and_the_message(
    client: Client, barrier: Barrier, coordinator: FakeCoordinator
) -> None:
    producer = TransactionalProducer(client, "order-svc", barrier=barrier)
    async with AsyncSession(barrier.engine) as session:
        with pytest.raises(LookupError, match="no such customer"):
            async with producer.transaction("orders", MESSAGE, session) as tx:
                await session.execute(orders.insert().values(id=2, tx=tx.tx_id))
                raise LookupError("no such customer")
    assert coordinator.events == ["prepare", "rollback"]
    assert coordinator.states[tx.tx_id] == "rolled_back"
    assert await order_rows(barrier.engine) == []
    assert await barrier.check(tx.tx_id) == "rollback"  # no commit row was left behind


async def test_a_check_back_that_decided_first_makes_the_block_raise_rolled_back(
    client: Client, barrier: Barrier, coordinator: FakeCoordinator
) -> None:
    producer = TransactionalProducer(client, "order-svc", barrier=barrier)
    async with AsyncSession(barrier.engine) as session:
        with pytest.raises(TransactionRolledBack) as info:
            async with producer.transaction("orders", MESSAGE, session) as tx:
                # The coordinator's check-back reaches the barrier before the local commit.
                assert await barrier.check(tx.tx_id) == "rollback"
                await session.execute(orders.insert().values(id=3, tx=tx.tx_id))
    assert info.value.tx_id == tx.tx_id
    assert coordinator.events == ["prepare", "rollback"]
    assert await order_rows(barrier.engine) == []


async def test_a_commit_the_coordinator_does_not_confirm_is_logged_not_raised(
    client: Client, barrier: Barrier, coordinator: FakeCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator.status["commit"] = 503
    producer = TransactionalProducer(client, "order-svc", barrier=barrier)
    async with (
        AsyncSession(barrier.engine) as session,
        producer.transaction("orders", MESSAGE, session) as tx,
    ):
        await session.execute(orders.insert().values(id=4, tx=tx.tx_id))
    assert coordinator.events == ["prepare", "commit", "commit"]  # retried once, then left
    assert await order_rows(barrier.engine) == [(4, tx.tx_id)]
    assert await barrier.check(tx.tx_id) == "commit"  # what the check-back will answer
    assert "left to the check-back" in caplog.text


async def test_a_failed_local_commit_leaves_the_message_to_the_check_back(
    client: Client, barrier: Barrier, coordinator: FakeCoordinator
) -> None:
    producer = TransactionalProducer(client, "order-svc", barrier=barrier)

    def fail(_: Any) -> None:
        raise OSError("disk I/O error")

    async with AsyncSession(barrier.engine) as session:
        event.listen(session.sync_session, "before_commit", fail)
        with pytest.raises(OSError):
            async with producer.transaction("orders", MESSAGE, session) as tx:
                await session.execute(orders.insert().values(id=5, tx=tx.tx_id))
        await session.rollback()
    # Neither committed nor rolled back: the database may have committed, only it knows.
    assert coordinator.events == ["prepare"]
    assert coordinator.states[tx.tx_id] == "prepared"


async def test_a_refused_prepare_never_runs_the_block(
    client: Client, barrier: Barrier, coordinator: FakeCoordinator
) -> None:
    coordinator.status["prepare"] = 400
    producer = TransactionalProducer(client, "order-svc", barrier=barrier)
    ran = False
    async with AsyncSession(barrier.engine) as session:
        with pytest.raises(InvalidMessage):
            async with producer.transaction("orders", MESSAGE, session):
                ran = True
    assert not ran and coordinator.events == []


async def test_the_check_listener_answers_from_the_barrier(
    client: Client, barrier: Barrier, coordinator: FakeCoordinator
) -> None:
    async with AsyncSession(barrier.engine) as session:
        await barrier.insert_commit(session, "tx-done")
        await session.commit()
    coordinator.status["poll"] = 503  # the first polls fail; the listener keeps going
    async with TransactionalProducer(client, "order-svc", barrier=barrier):
        await eventually(lambda: coordinator.polls >= 2)
        del coordinator.status["poll"]
        coordinator.ask("tx-done")
        coordinator.ask("tx-never-committed")
        await eventually(lambda: len(coordinator.answers) == 2)
    assert coordinator.answers == {"tx-done": "commit", "tx-never-committed": "rollback"}
    assert await barrier.check("tx-never-committed") == "rollback"


async def test_a_check_callback_answers_instead_and_its_errors_mean_unknown(
    client: Client, barrier: Barrier, coordinator: FakeCoordinator
) -> None:
    asked: list[CheckRequest] = []

    async def check(request: CheckRequest) -> Any:
        asked.append(request)
        if request.tx_id == "tx-broken":
            raise ConnectionError("database down")
        return "commit"

    async with TransactionalProducer(client, "order-svc", barrier=barrier, check=check):
        coordinator.ask("tx-fine")
        coordinator.ask("tx-broken")
        await eventually(lambda: len(coordinator.answers) == 2)
    assert coordinator.answers == {"tx-fine": "commit", "tx-broken": "unknown"}
    assert asked[0].keys == ("k",) and asked[0].topic == "orders"


async def test_a_producer_needs_a_way_to_answer_check_backs(client: Client) -> None:
    with pytest.raises(ValueError):
        TransactionalProducer(client, "order-svc")
