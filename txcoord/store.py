"""Where transactions live: the :class:`TxStore` interface and its SQLite implementation.

Two implementations (``--tx-store``):

* :class:`SqliteTxStore` (the default, a file in the data directory): one node, group commit on
  its own thread (:class:`~delayserver.sqlite.SqliteRunner`), ``fsync`` per commit with
  ``--flush sync``. The coordinator keeps a timer per open transaction in its own wheel.
* :class:`~txcoord.sql_store.SqlTxStore` (MySQL/MariaDB or PostgreSQL through SQLAlchemy async):
  shared by several nodes. It is a :class:`SharedTxStore`: every row that needs a node's work
  (a check-back due, a committed message not yet delivered) carries ``due_at``; a node *claims*
  due rows (``SELECT ... FOR UPDATE SKIP LOCKED`` and a lease: ``owner`` and ``due_at`` moved
  to the lease's end), renews the leases of the work it is doing, and a dead node's leases run
  out so that another node claims its rows.

A state change is :meth:`TxStore.change`: the row read and locked, changed by a pure function
(the table in :mod:`txcoord.states`), written back, in one database transaction, so concurrent
commits, rollbacks and check answers (on any node) cannot both win.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from broker_core.errors import StoreUnavailable, TempoError
from delayserver.sqlite import SqliteRunner
from txcoord.states import TxState

T = TypeVar("T")


class TxNotFound(TempoError):
    status, code = 404, "transaction_not_found"


class TxStoreUnavailable(StoreUnavailable):
    code = "transaction_store_unavailable"


@dataclass(slots=True)
class TxRow:
    """One transaction. Times are epoch milliseconds; ``record`` is the encoded half message
    (None once delivered or rolled back). ``owner`` and ``due_at`` are kept by shared stores
    only: the node holding the row's lease and when the row next needs a node (None: never)."""

    tx_id: str
    msg_id: bytes
    topic: str
    producer_group: str
    check_url: str | None
    state: TxState
    check_count: int
    next_check_at: int
    deliver_at: int
    delivered: bool
    created_at: int
    updated_at: int
    record: bytes | None
    owner: str | None = None
    due_at: int | None = None

    @classmethod
    def from_sql(cls, r: Sequence[Any]) -> TxRow:
        """From a result row in :data:`COLUMNS` order (then ``owner, due_at`` if present)."""
        return cls(
            r[0],
            bytes(r[1]),
            r[2],
            r[3],
            r[4],
            TxState(r[5]),
            int(r[6]),
            int(r[7]),
            int(r[8]),
            bool(r[9]),
            int(r[10]),
            int(r[11]),
            None if r[12] is None else bytes(r[12]),
            *(r[13:15] if len(r) > 13 else ()),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "tx_id": self.tx_id,
            "msg_id": self.msg_id.hex(),
            "topic": self.topic,
            "producer_group": self.producer_group,
            "state": self.state.value,
            "check_count": self.check_count,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


#: The columns every store keeps, in :meth:`TxRow.from_sql` order.
COLUMNS = (
    "tx_id",
    "msg_id",
    "topic",
    "producer_group",
    "check_url",
    "state",
    "check_count",
    "next_check_at",
    "deliver_at",
    "delivered",
    "created_at",
    "updated_at",
    "record",
)
#: What :meth:`TxStore.change` writes back when a row changed.
MUTABLE = ("state", "check_count", "next_check_at", "updated_at", "record", "delivered")


class TxStore(ABC):
    """The transactions of one node (or, for a :class:`SharedTxStore`, of all nodes on it).

    Every method raises :class:`TxStoreUnavailable` (HTTP 503) when the database cannot be
    reached or cannot take writes."""

    #: What ``/readyz`` and errors call it (no password).
    name: str = "transaction store"

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if missing (idempotent)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def health(self) -> str | None:
        """None when the store takes writes, else why not."""

    @abstractmethod
    async def insert(self, row: TxRow) -> TxRow | None:
        """Store a new transaction; returns the existing one instead when a transaction with
        the same ``msg_id`` exists (a resent prepare), and then stores nothing."""

    @abstractmethod
    async def get(self, tx_id: str) -> TxRow | None: ...

    @abstractmethod
    async def change(self, tx_id: str, fn: Callable[[TxRow], T]) -> T:
        """Read ``tx_id`` locked, let ``fn`` change it in place (it may raise, then nothing is
        written), write it back if it changed, in one transaction; returns what ``fn`` returns.
        Raises :class:`TxNotFound` when there is no such transaction."""

    @abstractmethod
    async def mark_delivered(self, tx_id: str) -> None:
        """The committed message is in its topic (or the delay service): drop the record."""

    @abstractmethod
    async def open_rows(self) -> list[TxRow]:
        """Transactions still to be checked (``prepared``) or delivered (committed, not yet)."""

    @abstractmethod
    async def list_page(
        self, state: TxState, *, limit: int, after: tuple[int, str] | None
    ) -> list[TxRow]:
        """Up to ``limit`` transactions in ``state``, oldest first, after the (created_at,
        tx_id) of the last one of the previous page."""

    @abstractmethod
    async def count_states(self) -> dict[str, int]:
        """State -> number of transactions, for the states that have any."""

    @abstractmethod
    async def record_check(self, tx_id: str, at: int, answer: str, via: str) -> None: ...

    @abstractmethod
    async def check_history(self, tx_id: str, limit: int) -> list[tuple[int, str, str]]:
        """(at, answer, via) of the check-backs of ``tx_id``, oldest first."""

    @abstractmethod
    async def purge(self, before: int) -> int:
        """Forget transactions finished and delivered before ``before`` and the check history
        of transactions no longer kept; returns how many transactions went."""


class SharedTxStore(TxStore):
    """A store several nodes share: work on its rows is claimed under leases."""

    @abstractmethod
    async def claim_due(
        self,
        *,
        now: int,
        until: int,
        owner: str,
        groups: Collection[str],
        others_after: int,
        limit: int,
    ) -> list[TxRow]:
        """Claim up to ``limit`` rows due at ``now`` that no other node holds (rows another node
        has locked are skipped, not waited for): each gets ``owner`` and ``due_at = until``.
        A check-back for an SDK producer group (no ``check_url``) is claimed at once only when
        its group is in ``groups`` (this node holds that group's long polls); otherwise only
        once it has been due since ``others_after``, so that a node the producer polls asks
        first. Committed, undelivered rows and ``check_url`` checks are claimed as soon as due.
        Returns the claimed rows as they are now."""

    @abstractmethod
    async def renew(self, owner: str, tx_ids: Collection[str], until: int) -> int:
        """Extend ``owner``'s leases on ``tx_ids`` to ``until``; returns how many it still held."""


# -- SQLite ----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tx (
    tx_id          TEXT PRIMARY KEY,
    msg_id         BLOB NOT NULL,
    topic          TEXT NOT NULL,
    producer_group TEXT NOT NULL,
    check_url      TEXT,
    state          TEXT NOT NULL,
    check_count    INTEGER NOT NULL DEFAULT 0,
    next_check_at  INTEGER NOT NULL,
    deliver_at     INTEGER NOT NULL,
    delivered      INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    record         BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS tx_msg_id ON tx (msg_id);
CREATE INDEX IF NOT EXISTS tx_open ON tx (state) WHERE state IN ('prepared', 'check_max');
CREATE INDEX IF NOT EXISTS tx_undelivered ON tx (delivered) WHERE delivered = 0;
CREATE INDEX IF NOT EXISTS tx_finished ON tx (updated_at)
    WHERE state IN ('committed', 'rolled_back');
-- Counting and paging transactions by state reads this index only.
CREATE INDEX IF NOT EXISTS tx_state ON tx (state, created_at, tx_id);
-- Every check-back asked and how it was answered, for operators (bounded: check_max per tx).
CREATE TABLE IF NOT EXISTS tx_check (
    tx_id  TEXT NOT NULL,
    at     INTEGER NOT NULL,
    answer TEXT NOT NULL,
    via    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tx_check_tx ON tx_check (tx_id, at);
CREATE INDEX IF NOT EXISTS tx_check_at ON tx_check (at);
"""
_COLUMNS = ", ".join(COLUMNS)


def _sql_values(row: TxRow) -> tuple[object, ...]:
    return (
        row.tx_id,
        row.msg_id,
        row.topic,
        row.producer_group,
        row.check_url,
        row.state.value,
        row.check_count,
        row.next_check_at,
        row.deliver_at,
        int(row.delivered),
        row.created_at,
        row.updated_at,
        row.record,
    )


def _select(db: sqlite3.Connection, *, tx_id: str) -> TxRow | None:
    r = db.execute(f"SELECT {_COLUMNS} FROM tx WHERE tx_id = ?", (tx_id,)).fetchone()
    return None if r is None else TxRow.from_sql(r)


class SqliteTxStore(TxStore):
    """Transactions in a SQLite file of one node (today's ``data_dir/tx/tx.db``); ``sync``:
    every commit is fsynced before it is acknowledged (``--flush sync``)."""

    def __init__(self, path: Path, *, sync: bool = False) -> None:
        self.path = path
        self.name = "transaction store (SQLite)"
        self.db = SqliteRunner(
            path, schema=_SCHEMA, sync=sync, name="tx-store", unavailable=TxStoreUnavailable
        )

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def health(self) -> str | None:
        return await self.db.check()

    async def insert(self, row: TxRow) -> TxRow | None:
        values = _sql_values(row)

        def run(db: sqlite3.Connection) -> TxRow | None:
            prior = db.execute(f"SELECT {_COLUMNS} FROM tx WHERE msg_id = ?", (row.msg_id,))
            found = prior.fetchone()
            if found is not None:
                return TxRow.from_sql(found)
            db.execute(f"INSERT INTO tx ({_COLUMNS}) VALUES ({','.join('?' * 13)})", values)
            return None

        return await self.db.write(run)

    async def get(self, tx_id: str) -> TxRow | None:
        return await self.db.read(partial(_select, tx_id=tx_id))

    async def change(self, tx_id: str, fn: Callable[[TxRow], T]) -> T:
        def run(db: sqlite3.Connection) -> T:
            row = _select(db, tx_id=tx_id)
            if row is None:
                raise TxNotFound(f"no transaction {tx_id}")
            before = dataclasses.replace(row)
            out = fn(row)
            if row != before:
                db.execute(
                    "UPDATE tx SET state = ?, check_count = ?, next_check_at = ?, updated_at = ?, "
                    "record = ?, delivered = ? WHERE tx_id = ?",
                    (
                        row.state.value,
                        row.check_count,
                        row.next_check_at,
                        row.updated_at,
                        row.record,
                        int(row.delivered),
                        tx_id,
                    ),
                )
            return out

        return await self.db.write(run)

    async def mark_delivered(self, tx_id: str) -> None:
        await self.db.write(
            lambda db: db.execute(
                "UPDATE tx SET delivered = 1, record = NULL WHERE tx_id = ?", (tx_id,)
            )
        )

    async def open_rows(self) -> list[TxRow]:
        return await self.db.read(
            lambda db: [
                TxRow.from_sql(r)
                for r in db.execute(
                    f"SELECT {_COLUMNS} FROM tx WHERE state = 'prepared' OR delivered = 0"
                )
            ]
        )

    async def list_page(
        self, state: TxState, *, limit: int, after: tuple[int, str] | None
    ) -> list[TxRow]:
        # One range of the tx_state index.
        at, tx_id = after if after is not None else (-1, "")
        return await self.db.read(
            lambda db: [
                TxRow.from_sql(r)
                for r in db.execute(
                    f"SELECT {_COLUMNS} FROM tx INDEXED BY tx_state WHERE state = ? "
                    "AND (created_at, tx_id) > (?, ?) ORDER BY created_at, tx_id LIMIT ?",
                    (state.value, at, tx_id, limit),
                )
            ]
        )

    async def count_states(self) -> dict[str, int]:
        rows = await self.db.read(
            lambda db: db.execute(
                "SELECT state, COUNT(*) FROM tx INDEXED BY tx_state GROUP BY state"
            ).fetchall()
        )
        return {state: int(n) for state, n in rows}

    async def record_check(self, tx_id: str, at: int, answer: str, via: str) -> None:
        await self.db.write(
            lambda db: db.execute(
                "INSERT INTO tx_check (tx_id, at, answer, via) VALUES (?, ?, ?, ?)",
                (tx_id, at, answer, via),
            )
        )

    async def check_history(self, tx_id: str, limit: int) -> list[tuple[int, str, str]]:
        rows = await self.db.read(
            lambda db: db.execute(
                "SELECT at, answer, via FROM tx_check WHERE tx_id = ? ORDER BY at LIMIT ?",
                (tx_id, limit),
            ).fetchall()
        )
        return [(int(at), answer, via) for at, answer, via in rows]

    async def purge(self, before: int) -> int:
        def run(db: sqlite3.Connection) -> int:
            # Checks of transactions still kept stay, however old (a parked one's history).
            db.execute(
                "DELETE FROM tx_check WHERE at < ? AND tx_id NOT IN (SELECT tx_id FROM tx)",
                (before,),
            )
            return db.execute(
                "DELETE FROM tx WHERE state IN ('committed', 'rolled_back') AND delivered = 1 "
                "AND updated_at < ?",
                (before,),
            ).rowcount

        return await self.db.write(run)
