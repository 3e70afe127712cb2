"""The transaction barrier against a real MariaDB (InnoDB, REPEATABLE READ): the check-back and
the producer's local transaction race on the primary key, and always agree.

Each test uses tables of its own, dropped at the end. The SQLite twin of these cases is
tests/unit/test_client_barrier.py.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from tempomq.client import Barrier, TransactionRolledBack
from tests.unit.test_client_barrier import barrier_sql

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(mysql_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(mysql_url, pool_size=20, max_overflow=0)
    yield eng
    await eng.dispose()


@pytest.fixture
async def tables(engine: AsyncEngine) -> AsyncIterator[tuple[Barrier, Table]]:
    suffix = uuid.uuid4().hex[:10]
    barrier = Barrier(engine, table=f"barrier_{suffix}")
    orders = Table(
        f"orders_{suffix}",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("tx", String(64)),
        mysql_engine="InnoDB",
    )
    await barrier.create_table()
    async with engine.begin() as conn:
        await conn.run_sync(orders.create)
    yield barrier, orders
    async with engine.begin() as conn:
        await conn.run_sync(orders.drop)
        await conn.run_sync(barrier.table.drop)


async def until_waiting(engine: AsyncEngine, table: str, timeout_s: float = 10.0) -> None:
    """Until a barrier insert into ``table`` is executing on the server (it then waits for the
    row lock; INNODB_TRX does not reliably show LOCK WAIT on MariaDB, the process list does
    show the statement in progress)."""
    query = text(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
        "WHERE COMMAND = 'Query' AND INFO LIKE :pattern"
    )
    deadline = time.monotonic() + timeout_s
    while True:
        async with engine.connect() as conn:
            running = await conn.execute(query, {"pattern": f"INSERT IGNORE INTO {table} %"})
            if running.scalar_one():
                return
        assert time.monotonic() < deadline, "the check never reached the database"
        await asyncio.sleep(0.02)


async def count(engine: AsyncEngine, table: Table) -> int:
    async with engine.connect() as conn:
        return len((await conn.execute(select(table))).all())


async def test_no_commit_row_means_rollback_and_the_answer_sticks(
    tables: tuple[Barrier, Table],
) -> None:
    barrier, _ = tables
    assert await barrier.check("tx-1") == "rollback"
    assert await barrier.check("tx-1") == "rollback"
    async with AsyncSession(barrier.engine) as session:
        with pytest.raises(TransactionRolledBack):
            await barrier.insert_commit(session, "tx-1")
        await session.rollback()
    assert await barrier.check("tx-1") == "rollback"


async def test_a_committed_local_transaction_answers_commit(
    tables: tuple[Barrier, Table],
) -> None:
    barrier, orders = tables
    async with AsyncSession(barrier.engine) as session:
        await session.execute(orders.insert().values(id=1, tx="tx-2"))
        await barrier.insert_commit(session, "tx-2")
        await session.commit()
    assert await barrier.check("tx-2") == "commit"


@pytest.mark.parametrize("local", ["commit", "rollback"])
async def test_a_check_during_an_open_local_transaction_waits_for_its_outcome(
    tables: tuple[Barrier, Table], local: str
) -> None:
    barrier, orders = tables
    async with AsyncSession(barrier.engine) as session:
        await session.execute(orders.insert().values(id=3, tx="tx-3"))
        await barrier.insert_commit(session, "tx-3")
        check = asyncio.create_task(barrier.check("tx-3"))
        await until_waiting(barrier.engine, barrier.table.name)
        await asyncio.sleep(0.2)
        assert not check.done()  # waiting for the row the local transaction inserted
        await (session.commit() if local == "commit" else session.rollback())
    assert await asyncio.wait_for(check, 30) == local
    assert await count(barrier.engine, orders) == (1 if local == "commit" else 0)


async def test_a_local_commit_after_the_check_decided_fails_and_leaves_nothing(
    tables: tuple[Barrier, Table],
) -> None:
    barrier, orders = tables
    assert await barrier.check("tx-4") == "rollback"
    async with AsyncSession(barrier.engine) as session:
        await session.execute(orders.insert().values(id=4, tx="tx-4"))
        with pytest.raises(TransactionRolledBack):
            await barrier.insert_commit(session, "tx-4")
        await session.rollback()
    assert await count(barrier.engine, orders) == 0


async def test_checks_and_local_transactions_racing_always_agree(
    tables: tuple[Barrier, Table],
) -> None:
    """Many transactions, each with a check-back let loose at a random moment of its local
    transaction: before it, during it (waiting on the row), or after it."""
    barrier, orders = tables
    rng = random.Random(7)
    pairs = asyncio.Semaphore(8)  # two connections each, within the pool

    async def local(n: int, pause_s: float) -> str:
        async with AsyncSession(barrier.engine) as session:
            try:
                await session.execute(orders.insert().values(id=n, tx=f"tx-r{n}"))
                await asyncio.sleep(pause_s)
                await barrier.insert_commit(session, f"tx-r{n}")
                await asyncio.sleep(pause_s)
                await session.commit()
                return "commit"
            except TransactionRolledBack:
                await session.rollback()
                return "rollback"

    async def race(n: int) -> tuple[str, str]:
        async with pairs, asyncio.TaskGroup() as group:
            outcome = group.create_task(local(n, rng.uniform(0, 0.03)))
            await asyncio.sleep(rng.uniform(0, 0.08))
            answer = await barrier.check(f"tx-r{n}")
        return outcome.result(), answer

    async with asyncio.timeout(120), asyncio.TaskGroup() as group:
        races = [group.create_task(race(n)) for n in range(1, 51)]  # id 0 means "next"
    results = [task.result() for task in races]
    for n, (outcome, answer) in enumerate(results, start=1):
        assert outcome == answer, f"tx-r{n}: local {outcome}, check {answer}"
        assert await barrier.check(f"tx-r{n}") == answer
    committed = sum(1 for outcome, _ in results if outcome == "commit")
    assert await count(barrier.engine, orders) == committed
    assert 0 < committed < 50  # both orders of events happened


async def test_the_documented_sql_makes_a_working_barrier(engine: AsyncEngine) -> None:
    table = f"barrier_doc_{uuid.uuid4().hex[:10]}"
    async with engine.begin() as conn:
        await conn.execute(text(barrier_sql(mysql=True).replace("tempomq_tx_barrier", table)))
    barrier = Barrier(engine, table=table)
    try:
        async with AsyncSession(engine) as session:
            await barrier.insert_commit(session, "tx-5")
            await session.commit()
        assert (await barrier.check("tx-5"), await barrier.check("tx-6")) == ("commit", "rollback")
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(barrier.table.drop)
