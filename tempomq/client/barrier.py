"""The transaction barrier: a table in the producer's own database that decides, exactly once,
whether a transactional message commits or rolls back.

The producer writes ``(tx_id, 'commit')`` inside its local transaction. A check-back that finds
no outcome yet inserts ``(tx_id, 'rollback')``, ignoring a duplicate, and then reads the row.
The primary key makes the two inserts race-free (the technique of DTM's barrier):

* the local transaction committed first → the check's insert is ignored, it reads ``commit``;
* the check came first → the local insert fails on the duplicate key, the producer rolls its
  transaction back, and the check's ``rollback`` stands;
* the check arrives while the local transaction is still open → its insert waits for the row
  (InnoDB: a lock on the uncommitted key; SQLite: the database write lock), then resolves as
  one of the two cases above.

The table (``docs/barrier.sql`` has the same as plain SQL)::

    tx_id      VARCHAR(64) PRIMARY KEY
    outcome    VARCHAR(16) NOT NULL       -- 'commit' | 'rollback'
    created_at TIMESTAMP   NOT NULL DEFAULT CURRENT_TIMESTAMP

Rows can be deleted once the coordinator no longer asks about them (days later, say).
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import Column, DateTime, Engine, MetaData, Select, String, Table, func, select
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from tempomq.client.errors import TransactionRolledBack

Outcome = Literal["commit", "rollback"]
COMMIT: Outcome = "commit"
ROLLBACK: Outcome = "rollback"
DEFAULT_TABLE = "tempomq_tx_barrier"
MAX_TX_ID = 64


def _checked(tx_id: str) -> str:
    # MySQL's INSERT IGNORE would silently truncate a longer id; two ids could then collide.
    if not tx_id or len(tx_id) > MAX_TX_ID:
        raise ValueError(f"a tx_id has 1-{MAX_TX_ID} characters, got {len(tx_id)}")
    return tx_id


def barrier_table(name: str = DEFAULT_TABLE) -> Table:
    """The barrier table's definition (``docs/barrier.sql``)."""
    return Table(
        name,
        MetaData(),
        Column("tx_id", String(MAX_TX_ID), primary_key=True),
        Column("outcome", String(16), nullable=False),
        Column("created_at", DateTime, nullable=False, server_default=func.current_timestamp()),
    )


def _supported(dialect: str) -> str:
    if dialect not in ("mysql", "mariadb", "sqlite"):
        raise ValueError(f"the barrier supports MySQL/MariaDB and SQLite, not {dialect}")
    return dialect


def _commit_row(table: Table, tx_id: str) -> Insert:
    return table.insert().values(tx_id=_checked(tx_id), outcome=COMMIT)


def _insert_ignore(dialect: str, table: Table, tx_id: str, outcome: Outcome) -> Insert:
    values = {"tx_id": _checked(tx_id), "outcome": outcome}
    if dialect == "sqlite":
        return sqlite.insert(table).values(values).on_conflict_do_nothing()
    return mysql.insert(table).values(values).prefix_with("IGNORE")


def _outcome_query(table: Table, tx_id: str) -> Select[Any]:
    # A locking read sees the latest committed row even under MySQL's REPEATABLE READ
    # (SQLite has no FOR SHARE; SQLAlchemy leaves the clause out there).
    return select(table.c.outcome).where(table.c.tx_id == tx_id).with_for_update(read=True)


def _outcome(tx_id: str, value: str) -> Outcome:
    if value not in (COMMIT, ROLLBACK):
        raise ValueError(f"barrier row of {tx_id} holds {value!r}")
    return COMMIT if value == COMMIT else ROLLBACK


class Barrier:
    """The barrier table of one database; works with ``mysql+aiomysql://`` (and MariaDB) and
    ``sqlite+aiosqlite://`` engines."""

    def __init__(self, engine: AsyncEngine, *, table: str = DEFAULT_TABLE) -> None:
        self.dialect = _supported(engine.dialect.name)
        self.engine = engine
        self.table = barrier_table(table)

    async def create_table(self) -> None:
        """Create the table if it is missing (or run ``docs/barrier.sql`` in a migration)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.table.create, checkfirst=True)

    async def insert_commit(self, session: AsyncSession, tx_id: str) -> None:
        """Write ``(tx_id, 'commit')`` in the caller's transaction. Raises
        :class:`TransactionRolledBack` when a check-back already decided ``rollback``; the
        session must then be rolled back."""
        # Flush the caller's pending ORM changes first, so that their errors stay theirs and
        # an IntegrityError below can only be this row's duplicate key.
        await session.flush()
        try:
            await session.execute(_commit_row(self.table, tx_id))
        except IntegrityError as e:
            raise TransactionRolledBack(tx_id) from e

    async def check(self, tx_id: str) -> Outcome:
        """The outcome of ``tx_id``, deciding ``rollback`` if none was written yet. Runs in its
        own connection and transaction; may wait while a local transaction holds the row."""
        async with self.engine.begin() as conn:
            await conn.execute(_insert_ignore(self.dialect, self.table, tx_id, ROLLBACK))
            value = (await conn.execute(_outcome_query(self.table, tx_id))).scalar_one()
        return _outcome(tx_id, value)


# -- the same with blocking SQLAlchemy (tempomq.client.sync) ---------------------------------


def create_table_sync(engine: Engine, table: str = DEFAULT_TABLE) -> None:
    """:meth:`Barrier.create_table` for a blocking engine."""
    _supported(engine.dialect.name)
    barrier_table(table).create(engine, checkfirst=True)


def insert_commit_sync(session: Session, tx_id: str, table: str = DEFAULT_TABLE) -> None:
    """:meth:`Barrier.insert_commit` in a blocking session."""
    session.flush()
    try:
        session.execute(_commit_row(barrier_table(table), tx_id))
    except IntegrityError as e:
        raise TransactionRolledBack(tx_id) from e


def check_sync(engine: Engine, tx_id: str, table: str = DEFAULT_TABLE) -> Outcome:
    """:meth:`Barrier.check` with a blocking engine."""
    t = barrier_table(table)
    with engine.begin() as conn:
        conn.execute(_insert_ignore(_supported(engine.dialect.name), t, tx_id, ROLLBACK))
        value = conn.execute(_outcome_query(t, tx_id)).scalar_one()
    return _outcome(tx_id, value)
