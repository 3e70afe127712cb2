"""Helpers for the transactional-send tests that run the SDK against a real ``tempomq serve``
and a real MariaDB (``test_tx_mysql.py``).

A *producer process* is modelled by a :class:`TransactionalProducer` over a :class:`MortalClient`:
the SDK's own code path, with the process dying at a chosen :class:`Crash` point. Dying raises
:class:`ProducerDied`, a ``BaseException``, so none of the SDK's ``except Exception`` handlers
(which a real crash never reaches) can act on it: from that point on the "process" sends nothing,
and its open database transaction is rolled back as a dropped connection's would be.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import aiohttp
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tempomq.client import (
    Barrier,
    CheckAnswer,
    CheckRequest,
    Client,
    OutgoingMessage,
    TempoClientError,
    Transaction,
    TransactionalProducer,
    TransactionRolledBack,
)

GROUP = "order-svc"
TOPIC = "orders"
#: Server flags that make check-backs fast: first asked 300 ms after prepare, asked again every
#: 300 ms, 1 s to answer. check_max is high so that a slow restart never parks a transaction.
FAST_CHECKS = (
    "--tx-check-immunity",
    "300ms",
    "--tx-check-interval",
    "300ms",
    "--tx-check-timeout",
    "1s",
    "--tx-check-max",
    "100",
)
#: Long enough for at least one check-back to have been asked and answered (or timed out).
PAST_A_CHECK_S = 0.3 + 1.0 + 0.5


class ProducerDied(BaseException):
    """The producer process is gone; raised where it died."""


class AppError(Exception):
    """The application's own failure inside the transaction block."""


class LocalCommitFailed(Exception):
    """The local database commit failed (the transaction was rolled back)."""


class Crash(StrEnum):
    NONE = "none"
    BEFORE_PREPARE = "before_prepare"
    AFTER_PREPARE = "after_prepare"  # the half message is stored; no database work
    DURING_DB = "during_db"  # the order row is written but never committed
    AFTER_DB_COMMIT = "after_db_commit"  # committed locally, message commit never sent
    AFTER_MESSAGE_COMMIT = "after_message_commit"  # everything done, then the process dies


class MortalClient:
    """The :class:`Client` as one producer process uses it, dying at ``crash``.

    Only the calls :class:`TransactionalProducer` makes are here; the check-back listener's
    calls are passed through (stop the producer to stop answering).
    """

    def __init__(self, client: Client, crash: Crash = Crash.NONE) -> None:
        self.client = client
        self.crash = crash
        self.dead = False
        self.prepared: Transaction | None = None

    def die(self) -> None:
        self.dead = True
        raise ProducerDied(self.crash.value)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.client.endpoints

    async def prepare_transaction(
        self, topic: str, message: OutgoingMessage, **kw: Any
    ) -> Transaction:
        if self.dead or self.crash is Crash.BEFORE_PREPARE:
            self.die()
        tx = await self.client.prepare_transaction(topic, message, **kw)
        self.prepared = tx
        if self.crash is Crash.AFTER_PREPARE:
            self.die()
        return tx

    async def commit_transaction(self, tx: Transaction) -> None:
        if self.dead or self.crash is Crash.AFTER_DB_COMMIT:
            self.die()
        await self.client.commit_transaction(tx)
        if self.crash is Crash.AFTER_MESSAGE_COMMIT:
            self.die()

    async def rollback_transaction(self, tx: Transaction) -> None:
        if self.dead:
            self.die()
        await self.client.rollback_transaction(tx)

    async def poll_checks(self, endpoint: str, group: str, **kw: Any) -> list[CheckRequest]:
        return await self.client.poll_checks(endpoint, group, **kw)

    async def answer_check(self, endpoint: str, tx_id: str, answer: CheckAnswer) -> str:
        return await self.client.answer_check(endpoint, tx_id, answer)


def mortal_producer(
    client: Client,
    barrier: Barrier,
    crash: Crash = Crash.NONE,
    *,
    check_immunity_ms: int | None = None,
) -> tuple[TransactionalProducer, MortalClient]:
    mortal = MortalClient(client, crash)
    producer = TransactionalProducer(
        cast(Client, mortal), GROUP, barrier=barrier, check_immunity_ms=check_immunity_ms
    )
    return producer, mortal


class HeldSession(AsyncSession):
    """A session whose ``commit`` stops at a gate with the transaction still open (the order row
    and the barrier row written, so their locks held), until :meth:`release`; then it commits,
    or rolls back and raises :class:`LocalCommitFailed`."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.at_commit = asyncio.Event()
        self._gate = asyncio.Event()
        self._outcome = "commit"

    def release(self, outcome: str) -> None:
        """Let the commit go on as ``outcome``; only the first call counts."""
        assert outcome in ("commit", "rollback")
        if self._gate.is_set():
            return
        self._outcome = outcome
        self._gate.set()

    async def commit(self) -> None:
        self.at_commit.set()
        await self._gate.wait()
        if self._outcome == "rollback":
            await self.rollback()
            raise LocalCommitFailed("the local commit failed")
        await super().commit()


# -- the producer's database ---------------------------------------------------------------------


@dataclass(slots=True)
class Db:
    engine: AsyncEngine
    barrier: Barrier
    orders: Table

    async def orders_by_body(self) -> dict[str, str]:
        """Committed ``orders`` rows: body -> tx_id."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(self.orders.c.body, self.orders.c.tx_id))
            return {body: tx_id for body, tx_id in rows.all()}

    async def barrier_rows(self) -> dict[str, str]:
        """tx_id -> outcome, read without writing anything."""
        table = self.barrier.table
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(table.c.tx_id, table.c.outcome))
            return {tx_id: outcome for tx_id, outcome in rows.all()}

    async def until_checks_wait(
        self, n: int = 1, *, tx_id: str = "", timeout_s: float = 10.0
    ) -> None:
        """Until ``n`` barrier checks (of ``tx_id``, if given) are executing on the server, i.e.
        waiting for the row lock of an open local transaction. The process list shows the
        statement (with client-side parameters, the literal tx_id in it); INNODB_TRX does not
        reliably show LOCK WAIT on MariaDB."""
        query = text(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE COMMAND = 'Query' AND INFO LIKE :pattern"
        )
        pattern = f"INSERT IGNORE INTO {self.barrier.table.name} %{tx_id}%"
        deadline = time.monotonic() + timeout_s
        while True:
            async with self.engine.connect() as conn:
                if (await conn.execute(query, {"pattern": pattern})).scalar_one() >= n:
                    return
            assert time.monotonic() < deadline, f"no check {tx_id} waits in the database"
            await asyncio.sleep(0.02)


@asynccontextmanager
async def own_tables(engine: AsyncEngine) -> AsyncIterator[Db]:
    """An ``orders`` table and a barrier table with names of their own, dropped afterwards."""
    suffix = uuid.uuid4().hex[:10]
    barrier = Barrier(engine, table=f"tx_barrier_{suffix}")
    orders = Table(
        f"orders_{suffix}",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("body", String(64), nullable=False, unique=True),
        Column("tx_id", String(64)),
        mysql_engine="InnoDB",
    )
    await barrier.create_table()
    async with engine.begin() as conn:
        await conn.run_sync(orders.create)
    try:
        yield Db(engine, barrier, orders)
    finally:
        async with engine.begin() as conn:
            # A failed test may leave a transaction holding the tables: wait for it only so long.
            await conn.execute(text("SET SESSION lock_wait_timeout = 20"))
            await conn.run_sync(orders.drop, checkfirst=True)
            await conn.run_sync(barrier.table.drop, checkfirst=True)


async def place_order(
    producer: TransactionalProducer,
    db: Db,
    n: int,
    *,
    session: AsyncSession | None = None,
    work: Any = None,
) -> Transaction:
    """One order, the way an application does it: ``orders`` row and message in one
    ``producer.transaction``. ``work`` (an awaitable factory) runs inside the block after the
    insert; a :class:`MortalClient` set to ``DURING_DB`` dies right after it."""
    body = f"order-{n}"
    own = session is None
    s = AsyncSession(db.engine) if session is None else session
    try:
        message = OutgoingMessage(body, keys=[body])
        async with producer.transaction(TOPIC, message, s) as tx:
            await s.execute(db.orders.insert().values(id=n, body=body, tx_id=tx.tx_id))
            if work is not None:
                await work()
            client = producer.client
            if isinstance(client, MortalClient) and client.crash is Crash.DURING_DB:
                client.die()
        return tx
    finally:
        if own:
            await s.close()


#: A fate of the randomized run: a crash point, or the block raising, or a block slower than
#: the check immunity (so the check-back may come before the barrier row).
APP_ERROR = "app_error"
SLOW = "slow"
SLOW_BLOCK_S = 0.45


async def run_fate(client: Client, db: Db, n: int, fate: str, work_s: float) -> tuple[str, str]:
    """Place order ``n`` through a producer process meeting ``fate``; returns what the producer
    saw and the tx_id it prepared (``""`` when none)."""
    crash = Crash(fate) if fate in {c.value for c in Crash} else Crash.NONE
    producer, mortal = mortal_producer(client, db.barrier, crash)

    async def work() -> None:
        await asyncio.sleep(SLOW_BLOCK_S if fate == SLOW else work_s)
        if fate == APP_ERROR:
            raise AppError(n)

    try:
        await place_order(producer, db, n, work=work)
        seen = "done"
    except ProducerDied:
        seen = f"died {crash}"
    except AppError:
        seen = APP_ERROR
    except TransactionRolledBack:
        seen = "rolled back by a check-back"
    except TempoClientError as e:  # the coordinator is down: prepare failed
        seen = f"prepare failed: {type(e).__name__}"
    return seen, mortal.prepared.tx_id if mortal.prepared is not None else ""


# -- the coordinator -----------------------------------------------------------------------------


async def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} not ready within {timeout_s}s"
            await asyncio.sleep(0.05)


async def open_transactions(url: str) -> list[dict[str, Any]]:
    """Every transaction the coordinator still holds open (``prepared`` or ``check_max``),
    including ones whose prepare answer never reached the producer."""
    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        for state in ("prepared", "check_max"):
            async with http.get(f"{url}/v1/transactions", params={"state": state}) as r:
                assert r.status == 200, await r.text()
                out.extend((await r.json())["transactions"])
    return out


async def until_none_open(url: str, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        still = await open_transactions(url)
        if not still:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(still)} transactions still open: {still[:5]}")
        await asyncio.sleep(0.1)


async def final_state(client: Client, tx_id: str, timeout_s: float = 20.0) -> str:
    """The state of ``tx_id`` once it is no longer ``prepared``."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.get_transaction(tx_id)
        if status.state != "prepared":
            return status.state
        assert time.monotonic() < deadline, f"{tx_id} still prepared after {timeout_s}s"
        await asyncio.sleep(0.05)


async def states(client: Client, tx_ids: Sequence[str]) -> dict[str, str]:
    sem = asyncio.Semaphore(32)

    async def one(tx_id: str) -> tuple[str, str]:
        async with sem:
            return tx_id, (await client.get_transaction(tx_id)).state

    return dict(await asyncio.gather(*(one(t) for t in tx_ids)))


async def drain(
    client: Client,
    group: str,
    *,
    want: int,
    timeout_s: float = 30.0,
    quiet_s: float = 1.0,
) -> Counter[str]:
    """Receive and ack on ``group`` until ``want`` messages came and then nothing more for
    ``quiet_s`` (or ``timeout_s`` passed); bodies with how often each came."""
    got: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    quiet_from: float | None = None
    while time.monotonic() < deadline:
        msgs = await client.receive(
            TOPIC, group, max_messages=256, wait_ms=200, invisible_ms=120_000
        )
        if msgs:
            got.update(m.text for m in msgs)
            await client.ack(TOPIC, group, msgs)
            quiet_from = None
            continue
        if got.total() < want:
            continue
        quiet_from = quiet_from or time.monotonic()
        if time.monotonic() - quiet_from >= quiet_s:
            break
    return got
