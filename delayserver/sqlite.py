"""A SQLite database run on one dedicated thread, with group commit.

The event loop never waits on SQLite or fsync: reads and writes are functions of the connection
run on the database's own thread. Writes that queue up while a transaction runs are committed
together in the next one (one commit, one fsync in ``sync`` mode, for all of them). Used by the
embedded delay store and by the transaction coordinator.

A failed write (a full disk, an I/O error) fails its batch with the database's own error and
marks the runner unhealthy; nothing latches: the next write that succeeds clears the mark, and
:meth:`SqliteRunner.check` makes such a write (a rewrite of the header's ``user_version``) so a
readiness probe turns green again once the disk takes writes, even when no client writes.
The connection comes from ``connect`` (by default :func:`connect`), the seam through which
tests inject faults such as ``database or disk is full`` without a real disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
Connect = Callable[[Path], sqlite3.Connection]


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from the runner's
    thread."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


#: Inline commits between two passive WAL checkpoints (on the database's thread).
_CHECKPOINT_EVERY = 1000
#: Primary result codes of a statement that found the database locked (and changed nothing).
_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _checkpoint(db: sqlite3.Connection) -> None:
    # Inside the thread's write transaction a checkpoint cannot run; it runs after COMMIT
    # through the connection's own autocheckpoint, which this write (a no-op) triggers.
    _probe_write(db)


def _probe_write(db: sqlite3.Connection) -> None:
    # Rewrites page 1 with what it holds: a real write (a WAL frame at commit) that changes
    # nothing, so it fails exactly when the database cannot take writes.
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    db.execute(f"PRAGMA user_version = {version}")


class SqliteRunner:
    def __init__(
        self,
        path: Path,
        *,
        schema: str,
        sync: bool,
        name: str,
        unavailable: type[Exception],
        connect: Connect = connect,
    ) -> None:
        self.path = path
        self.schema = schema
        self.sync = sync
        self.name = name
        self.unavailable = unavailable
        self._connect = connect
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"tempomq-{name}")
        self._queued: list[tuple[Op, asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.failure: str | None = None
        #: A second connection for writes made on the event loop itself (see :meth:`write`).
        self._inline: sqlite3.Connection | None = None
        self._inline_commits = 0

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect(self.path)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives kill -9 (it is in the WAL) but not a power loss until the
        # next checkpoint; FULL fsyncs every commit.
        db.execute(f"PRAGMA synchronous={'FULL' if self.sync else 'NORMAL'}")
        db.execute("PRAGMA cache_size=-65536")  # 64 MiB of pages; the heap stays small
        db.execute("PRAGMA temp_store=MEMORY")
        db.executescript(self.schema)
        self._db = db
        if not self.sync:
            inline = self._connect(self.path)
            inline.execute("PRAGMA synchronous=NORMAL")
            inline.execute("PRAGMA cache_size=-16384")
            # Never wait for the lock on the event loop, never checkpoint there: a busy
            # database sends the write to the thread, and checkpoints run on the thread.
            inline.execute("PRAGMA busy_timeout=0")
            inline.execute("PRAGMA wal_autocheckpoint=0")
            self._inline = inline

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close)
        self._pool.shutdown(wait=True)

    def _close(self) -> None:
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._db is not None:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    @property
    def inline(self) -> sqlite3.Connection | None:
        """The connection for writes and reads on the event loop (async mode only), for a
        caller's own quick statements between awaits; None in sync mode or when closed."""
        return self._inline

    def health(self) -> str | None:
        if self._db is None:
            return f"{self.name} is not open"
        return self.failure

    async def check(self) -> str | None:
        """:meth:`health`, after trying a write when the last one failed: None once the
        database takes writes again."""
        if self._db is not None and self.failure is not None:
            with contextlib.suppress(self.unavailable):  # self.failure says why
                await self.write(_probe_write)
        return self.health()

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise self.unavailable(f"{self.name} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, db)

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, small: bool = False) -> T:
        """Run ``fn`` in the next write transaction (shared with other queued writes).
        ``small``: a write of a few rows, which in async mode may commit right here on the
        event loop (see :meth:`_write_inline`); large ones always go to the thread."""
        if self._db is None:
            raise self.unavailable(f"{self.name} is not open")
        if small and self._inline is not None and self._writer is None and self.failure is None:
            done, result = self._write_inline(fn)
            if done:
                return cast(T, result)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued.append((fn, fut))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name=f"tempomq-{self.name}-writer")
        return await fut

    async def write_one(self, sql: str, params: Sequence[object]) -> int:
        """One statement (an ``INSERT ... ON CONFLICT DO NOTHING`` of one row, say) as a write
        of its own; returns its row count (``sqlite3.Cursor.rowcount``: 0 for a row left out as
        a duplicate).

        In async mode with no write queued or running, it runs right here on the event loop
        in SQLite's autocommit mode: the statement is its own transaction, committed into the
        WAL before it returns (as durable as any other commit of this runner), with no BEGIN
        and COMMIT of its own to run. A busy database (a transaction of the thread's, or of
        another process) sends it to the thread, as :meth:`write` does with a small write."""
        if self._db is None:
            raise self.unavailable(f"{self.name} is not open")
        db = self._inline
        if db is not None and self._writer is None and self.failure is None:
            try:
                count = db.execute(sql, params).rowcount
            except sqlite3.Error as e:
                # Busy: SQLite took no lock and changed nothing; the thread waits for the lock.
                if getattr(e, "sqlite_errorcode", 0) & 0xFF not in _BUSY:
                    raise self._failed(e) from None
            else:
                self._committed_inline()
                return count
        return await self.write(lambda db: db.execute(sql, params).rowcount)

    def _write_inline(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[bool, Any]:
        """Async mode (``synchronous=NORMAL``, no fsync) with no write queued or running: run
        ``fn`` in a transaction of its own right here. A small write commits into the WAL in
        tens of microseconds, less than the trip to the database thread and back. Returns
        (False, None) when the database is busy (a transaction of the thread's): the write then
        queues as usual, behind it. ``fn``'s own exception is raised as from the thread."""
        db = self._inline
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False, None  # locked: the thread's transaction is under way
        except sqlite3.Error as e:
            raise self._failed(e) from None
        try:
            result = fn(db)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise self._failed(e) from None
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._committed_inline()
        return True, result

    def _committed_inline(self) -> None:
        self._inline_commits += 1
        if self._inline_commits % _CHECKPOINT_EVERY == 0:
            # The inline connection never checkpoints; the thread's does, passively.
            self._queued.append((_checkpoint, asyncio.get_running_loop().create_future()))
            self._writer = asyncio.create_task(self._drain(), name=f"tempomq-{self.name}-writer")

    def _failed(self, e: sqlite3.Error) -> Exception:
        self.failure = f"{self.name} write failed: {e}"
        log.error("sqlite.write_failed", db=self.name, error=str(e))
        return self.unavailable(self.failure)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    results = await loop.run_in_executor(self._pool, self._transaction, batch)
                except sqlite3.Error as e:
                    self.failure = f"{self.name} write failed: {e}"
                    log.error("sqlite.write_failed", db=self.name, error=str(e))
                    for _fn, fut in batch:
                        if not fut.done():
                            fut.set_exception(self.unavailable(self.failure))
                    continue
                except Exception as e:  # a bug outside any one operation: fail the batch
                    log.exception("sqlite.batch_failed", db=self.name)
                    for _fn, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                self.failure = None
                for (_fn, fut), (ok, result) in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if ok:
                        fut.set_result(result)
                    else:
                        fut.set_exception(result)
        finally:
            self._writer = None

    def _transaction(self, batch: list[tuple[Op, Any]]) -> list[tuple[bool, Any]]:
        """One transaction for the batch; each operation in its own savepoint, so one that
        raises (a domain error such as "not found") is undone alone and fails alone."""
        db = self._db
        assert db is not None
        results: list[tuple[bool, Any]] = []
        if db.in_transaction:  # left open by a rollback that failed: end it first
            db.execute("ROLLBACK")
        db.execute("BEGIN IMMEDIATE")
        try:
            for fn, _fut in batch:
                db.execute("SAVEPOINT op")
                try:
                    results.append((True, fn(db)))
                except sqlite3.Error:
                    raise  # the database itself failed: the whole batch fails
                except Exception as e:
                    db.execute("ROLLBACK TO op")
                    results.append((False, e))
                db.execute("RELEASE op")
            db.execute("COMMIT")
        except BaseException as exc:
            # SQLite ends the transaction itself on some errors (a full disk at COMMIT):
            # roll back only what is still open, and never let the rollback hide the cause.
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error as rollback_error:
                    log.error(
                        "sqlite.rollback_failed",
                        db=self.name,
                        error=str(rollback_error),
                        cause=str(exc),
                    )
            raise
        return results
