"""EmbeddedDelayStore: delayed messages in a SQLite file inside the data directory (the default;
no server needed).

One table holds every message with its time and state; a partial index over the scheduled ones,
by time, makes a window query one index range scan however many are pending, and keeps memory
with SQLite's page cache rather than the Python heap. All SQL runs on one dedicated thread (the
event loop never waits on SQLite or fsync). Writes that arrive while a transaction is running
are queued and committed together in the next one, so concurrent schedules share commits.

Durability: WAL journal; ``sync=False`` (the broker's async flush mode) commits without fsync,
which survives ``kill -9`` but may lose the last transactions on power loss; ``sync=True``
fsyncs every commit.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from broker_core.message import Message
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
_IN_CHUNK = 500  # ids per "IN (...)" query, under SQLite's variable limit


class EmbeddedDelayStore:
    def __init__(self, path: Path, *, sync: bool = False, history_ms: int = 72 * 3600_000) -> None:
        self.path = path
        self.sync = sync
        self.history_ms = history_ms
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tempomq-delaydb")
        self._pending = 0
        # Queued write operations and the future of the transaction that will run them.
        self._queued: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._failure: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.sync else 'NORMAL'}")
        db.execute("PRAGMA cache_size=-65536")  # 64 MiB of pages; the heap stays small
        db.execute("PRAGMA temp_store=MEMORY")
        db.executescript(_SCHEMA)
        self._pending = db.execute(
            "SELECT count(*) FROM delayed INDEXED BY delayed_due WHERE state = 0"
        ).fetchone()[0]
        self._db = db
        log.info("delay_store.opened", path=str(self.path), pending=self._pending)

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close)
        self._pool.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    async def health(self) -> str | None:
        if self._db is None:
            return "delay store is not open"
        return self._failure

    # -- plumbing ----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise DelayStoreUnavailable("delay store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, db)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next write transaction (shared with other queued writes)."""
        if self._db is None:
            raise DelayStoreUnavailable("delay store is not open")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued.append((fn, fut))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name="tempomq-delaydb-writer")
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    results = await loop.run_in_executor(self._pool, self._transaction, batch)
                except sqlite3.Error as e:
                    self._failure = f"delay store write failed: {e}"
                    log.error("delay_store.write_failed", error=str(e))
                    for _fn, fut in batch:
                        if not fut.done():
                            fut.set_exception(DelayStoreUnavailable(self._failure))
                    continue
                self._failure = None
                for (_fn, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._writer = None

    def _transaction(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], Any]]
    ) -> list[Any]:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            results = [fn(db) for fn, _fut in batch]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return results

    # -- operations ------------------------------------------------------------------------------

    async def schedule(self, items: Sequence[tuple[Message, int]]) -> list[bool]:
        rows = [(m.msg_id, at, m.topic, encode_message(m)) for m, at in items]

        def run(db: sqlite3.Connection) -> list[bool]:
            known = _existing(db, [r[0] for r in rows])
            fresh = []
            out = []
            for row in rows:
                new = row[0] not in known
                out.append(new)
                if new:
                    known.add(row[0])  # the same id twice in one call: the first wins
                    fresh.append(row)
            db.executemany(
                "INSERT INTO delayed (msg_id, deliver_at, topic, state, record) "
                "VALUES (?, ?, ?, 0, ?)",
                fresh,
            )
            return out

        result = await self._write(run)
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

        done = await self._write(run)  # read _pending only after the await: no lost update
        self._pending -= done

    async def cancel(self, msg_id: bytes, now_ms: int) -> DelayedInfo | None:
        def run(db: sqlite3.Connection) -> tuple[int, DelayedInfo | None]:
            n = db.execute(
                "UPDATE delayed SET state = 2, finished_at = ?, record = NULL "
                "WHERE msg_id = ? AND state = 0",
                (now_ms, msg_id),
            ).rowcount
            return n, _info(db, msg_id)

        n, info = await self._write(run)
        self._pending -= n
        return info

    async def reschedule(self, msg_id: bytes, deliver_at_ms: int) -> DelayedInfo | None:
        def run(db: sqlite3.Connection) -> DelayedInfo | None:
            db.execute(
                "UPDATE delayed SET deliver_at = ? WHERE msg_id = ? AND state = 0",
                (deliver_at_ms, msg_id),
            )
            return _info(db, msg_id)

        return await self._write(run)

    async def get(self, msg_id: bytes) -> DelayedInfo | None:
        return await self._read(lambda db: _info(db, msg_id))

    async def pending(self) -> int:
        return self._pending

    async def purge(self, finished_before_ms: int) -> int:
        def run(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM delayed WHERE state != 0 AND finished_at < ?", (finished_before_ms,)
            ).rowcount

        return await self._write(run)


def _existing(db: sqlite3.Connection, ids: list[bytes]) -> set[bytes]:
    found: set[bytes] = set()
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        found.update(
            bytes(r[0])
            for r in db.execute(f"SELECT msg_id FROM delayed WHERE msg_id IN ({marks})", chunk)
        )
    return found


def _info(db: sqlite3.Connection, msg_id: bytes) -> DelayedInfo | None:
    row = db.execute(
        "SELECT topic, deliver_at, state FROM delayed WHERE msg_id = ?", (msg_id,)
    ).fetchone()
    if row is None:
        return None
    return DelayedInfo(msg_id, row[0], row[1], _STATES[row[2]])
