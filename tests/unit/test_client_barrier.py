"""The transaction barrier on SQLite (aiosqlite, a file in tmp): the check-back answers from the
table, and a check racing an open local transaction waits for it and agrees with its outcome.
The same cases run against MariaDB in tests/integration/test_tx_barrier_mysql.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from tempomq.client import Barrier, TransactionRolledBack

orders = Table(
    "orders", MetaData(), Column("id", Integer, primary_key=True), Column("tx", String(64))
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
    await b.create_table()  # a second time is harmless
    return b


def watch_inserts(engine: AsyncEngine) -> asyncio.Event:
    """Set when a barrier ``rollback`` insert goes to the database (the check has begun)."""
    began = asyncio.Event()

    def before(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT") and "rollback" in str(params):
            began.set()

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return began


async def rows(engine: AsyncEngine, table: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(text(f"SELECT * FROM {table} ORDER BY 1"))]


async def test_no_commit_row_means_rollback_and_the_answer_sticks(barrier: Barrier) -> None:
    assert await barrier.check("tx-1") == "rollback"
    assert await barrier.check("tx-1") == "rollback"
    async with AsyncSession(barrier.engine) as session:
        with pytest.raises(TransactionRolledBack):
            await barrier.insert_commit(session, "tx-1")
        await session.rollback()
    assert await barrier.check("tx-1") == "rollback"


async def test_a_committed_local_transaction_answers_commit(barrier: Barrier) -> None:
    async with AsyncSession(barrier.engine) as session:
        await session.execute(orders.insert().values(id=1, tx="tx-2"))
        await barrier.insert_commit(session, "tx-2")
        await session.commit()
    assert await barrier.check("tx-2") == "commit"
    outcomes = [
        (tx_id, outcome) for tx_id, outcome, _ in await rows(barrier.engine, "tempomq_tx_barrier")
    ]
    assert outcomes == [("tx-2", "commit")]


@pytest.mark.parametrize("local", ["commit", "rollback"])
async def test_a_check_during_an_open_local_transaction_waits_for_its_outcome(
    barrier: Barrier, local: str
) -> None:
    began = watch_inserts(barrier.engine)
    async with AsyncSession(barrier.engine) as session:
        await session.execute(orders.insert().values(id=3, tx="tx-3"))
        await barrier.insert_commit(session, "tx-3")
        check = asyncio.create_task(barrier.check("tx-3"))
        await asyncio.wait_for(began.wait(), 10)
        await asyncio.sleep(0.2)
        assert not check.done()  # blocked on the write lock the local transaction holds
        await (session.commit() if local == "commit" else session.rollback())
    assert await asyncio.wait_for(check, 10) == local
    assert len(await rows(barrier.engine, "orders")) == (1 if local == "commit" else 0)


async def test_a_local_commit_after_the_check_decided_fails_and_leaves_nothing(
    barrier: Barrier,
) -> None:
    assert await barrier.check("tx-4") == "rollback"
    async with AsyncSession(barrier.engine) as session:
        await session.execute(orders.insert().values(id=4, tx="tx-4"))
        with pytest.raises(TransactionRolledBack) as info:
            await barrier.insert_commit(session, "tx-4")
        await session.rollback()
    assert info.value.tx_id == "tx-4" and info.value.code == "already_rolled_back"
    assert await rows(barrier.engine, "orders") == []


async def test_own_table_name_and_id_length(engine: AsyncEngine) -> None:
    b = Barrier(engine, table="svc_barrier")
    await b.create_table()
    assert await b.check("x" * 64) == "rollback"
    assert [r[0] for r in await rows(engine, "svc_barrier")] == ["x" * 64]
    with pytest.raises(ValueError):
        await b.check("x" * 65)
    async with engine.connect() as conn:
        names = (
            await conn.execute(select(text("name")).select_from(text("sqlite_master")))
        ).scalars()
        assert "tempomq_tx_barrier" not in set(names)


def barrier_sql(mysql: bool) -> str:
    """The CREATE TABLE of docs/barrier.sql for MySQL or SQLite."""
    path = Path(__file__).resolve().parents[2] / "docs" / "barrier.sql"
    code = "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("--"))
    statements = [s.strip() for s in code.split(";") if s.strip()]
    (found,) = [s for s in statements if ("ENGINE=InnoDB" in s) == mysql]
    return found


async def test_the_documented_sql_makes_a_working_barrier_on_sqlite(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(barrier_sql(mysql=False)))
    b = Barrier(engine)
    await b.create_table()  # finds the table there
    async with AsyncSession(engine) as session:
        await b.insert_commit(session, "tx-5")
        await session.commit()
    assert (await b.check("tx-5"), await b.check("tx-6")) == ("commit", "rollback")
