"""EmbeddedDelayStore: delayed messages in a SQLite file inside the data directory (the default;
no server needed).

One table holds every message with its time and state; a partial index over the scheduled ones,
by time, makes a window query one index range scan however many are pending, and keeps memory
with SQLite's page cache rather than the Python heap. All SQL runs on the database's own thread
(:class:`~delayserver.sqlite.SqliteRunner`), and concurrent schedules share commits.

Durability: WAL journal; ``sync=False`` (the broker's async flush mode) commits without fsync,
which survives ``kill -9`` but may lose the last transactions on power loss; ``sync=True``
fsyncs every commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import structlog

from broker_core.message import Message
from delayserver.sqlite import SqliteRunner
from delayserver.store import DelayedInfo, DelayState, DelayStoreUnavailable, Due, encode_message

log = structlog.get_logger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS delayed (
    id          INTEGER PRIMARY KEY,
    msg_id      BLOB NOT NULL UNIQUE,
    deliver_at  INTEGER NOT NULL,
    topic       TEXT NOT NULL,
    state       INTEGER NOT NULL,
    finished_at INTEGER,
    record      BLOB
);
CREATE INDEX IF NOT EXISTS delayed_due ON delayed (deliver_at, msg_id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS delayed_done ON delayed (finished_at) WHERE state != 0;
"""
_STATES = (DelayState.SCHEDULED, DelayState.DELIVERED, DelayState.CANCELLED)
_SCHEDULED, _DELIVERED, _CANCELLED = 0, 1, 2
#: A message scheduled, or left out when its id is known (row count 0): a resend. Only the
#: id's uniqueness is let go (not ``INSERT OR IGNORE``, which would skip any violated
#: constraint silently).
_INSERT = (
    "INSERT INTO delayed (msg_id, deliver_at, topic, state, record) VALUES (?, ?, ?, 0, ?) "
    "ON CONFLICT (msg_id) DO NOTHING"
)
#: Writes of up to this many rows may commit on the event loop in async mode (tens of
#: microseconds); larger ones go to the database's thread so the loop never waits on them.
_SMALL_WRITE = 16


class EmbeddedDelayStore:
    def __init__(self, path: Path, *, sync: bool = False, history_ms: int = 72 * 3600_000) -> None:
        self.path = path
        self.history_ms = history_ms
        self._db = SqliteRunner(
            path, schema=_SCHEMA, sync=sync, name="delay-store", unavailable=DelayStoreUnavailable
        )
        self._read = self._db.read
        self._write = self._db.write
        self._pending = 0

    async def open(self) -> None:
        await self._db.open()
        self._pending = await self._read(
            lambda db: db.execute(
                "SELECT count(*) FROM delayed INDEXED BY delayed_due WHERE state = 0"
            ).fetchone()[0]
        )
        log.info("delay_store.opened", path=str(self.path), pending=self._pending)

    async def close(self) -> None:
        await self._db.close()

    async def health(self) -> str | None:
        return await self._db.check()

    # -- operations ------------------------------------------------------------------------------

    async def schedule(self, items: Sequence[tuple[Message, int]]) -> list[bool]:
        if len(items) == 1:
            # A lone message (a one-call send): one autocommit statement, whose row count
            # tells new (1) from a resend (0).
            msg, at = items[0]
            row = (msg.msg_id, at, msg.topic, encode_message(msg))
            new = await self._db.write_one(_INSERT, row) == 1
            self._pending += new
            return [new]
        rows = [(m.msg_id, at, m.topic, encode_message(m)) for m, at in items]

        def run(db: sqlite3.Connection) -> list[bool]:
            # The same id twice in one call: the first wins, the second is ignored as a resend.
            insert = db.execute
            return [insert(_INSERT, row).rowcount == 1 for row in rows]

        result = await self._write(run, small=len(rows) <= _SMALL_WRITE)
        self._pending += sum(result)
        return result

    async def window(
        self, from_ms: int, to_ms: int, limit: int, *, after_msg_id: bytes = b""
    ) -> list[Due]:
        def run(db: sqlite3.Connection) -> list[Due]:
            # A row value comparison: one range scan of the (deliver_at, msg_id) index.
            cur = db.execute(
                "SELECT msg_id, deliver_at, record FROM delayed INDEXED BY delayed_due "
                "WHERE state = 0 AND (deliver_at, msg_id) > (?, ?) AND deliver_at < ? "
                "ORDER BY deliver_at, msg_id LIMIT ?",
                (from_ms, after_msg_id, to_ms, limit),
            )
            return [Due(bytes(m), at, bytes(r)) for m, at, r in cur]

        return await self._read(run)

    async def due(self, msg_id: bytes) -> Due | None:
        def run(db: sqlite3.Connection) -> Due | None:
            row = db.execute(
                "SELECT deliver_at, record FROM delayed WHERE msg_id = ? AND state = 0", (msg_id,)
            ).fetchone()
            return None if row is None else Due(msg_id, row[0], bytes(row[1]))

        return await self._read(run)

    async def mark_delivered(self, msg_ids: Sequence[bytes], released_at_ms: int) -> None:
        params = [(released_at_ms, m) for m in msg_ids]

        def run(db: sqlite3.Connection) -> int:
            before = db.total_changes
            db.executemany(
                "UPDATE delayed SET state = 1, finished_at = ?, record = NULL "
                "WHERE msg_id = ? AND state = 0",
                params,
            )
            return db.total_changes - before

        # Read _pending only after the await: no lost update.
        done = await self._write(run, small=len(params) <= _SMALL_WRITE)
        self._pending -= done

    async def cancel(self, msg_id: bytes, now_ms: int) -> DelayedInfo | None:
        def run(db: sqlite3.Connection) -> tuple[int, DelayedInfo | None]:
            n = db.execute(
                "UPDATE delayed SET state = 2, finished_at = ?, record = NULL "
                "WHERE msg_id = ? AND state = 0",
                (now_ms, msg_id),
            ).rowcount
            return n, _info(db, msg_id)

        n, info = await self._write(run, small=True)
        self._pending -= n
        return info

    async def reschedule(self, msg_id: bytes, deliver_at_ms: int) -> DelayedInfo | None:
        def run(db: sqlite3.Connection) -> DelayedInfo | None:
            db.execute(
                "UPDATE delayed SET deliver_at = ? WHERE msg_id = ? AND state = 0",
                (deliver_at_ms, msg_id),
            )
            return _info(db, msg_id)

        return await self._write(run, small=True)

    async def get(self, msg_id: bytes) -> DelayedInfo | None:
        return await self._read(lambda db: _info(db, msg_id))

    async def pending(self) -> int:
        return self._pending

    async def count_due(self, bounds_ms: Sequence[int]) -> list[int]:
        def run(db: sqlite3.Connection) -> list[int]:
            # Counts entries of the partial time index, no message row. Each range between two
            # bounds is counted once and summed, so the index is read up to the last bound once.
            sql = (
                "SELECT COUNT(*) FROM delayed INDEXED BY delayed_due "
                "WHERE state = 0 AND deliver_at >= ? AND deliver_at < ?"
            )
            counts = [0] * len(bounds_ms)
            total, low = 0, -(1 << 63)
            for i in sorted(range(len(bounds_ms)), key=bounds_ms.__getitem__):
                total += int(db.execute(sql, (low, bounds_ms[i])).fetchone()[0])
                counts[i], low = total, bounds_ms[i]
            return counts

        return await self._read(run)

    async def purge(self, finished_before_ms: int) -> int:
        def run(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM delayed WHERE state != 0 AND finished_at < ?", (finished_before_ms,)
            ).rowcount

        return await self._write(run)


def _info(db: sqlite3.Connection, msg_id: bytes) -> DelayedInfo | None:
    row = db.execute(
        "SELECT topic, deliver_at, state FROM delayed WHERE msg_id = ?", (msg_id,)
    ).fetchone()
    if row is None:
        return None
    return DelayedInfo(msg_id, row[0], row[1], _STATES[row[2]])
