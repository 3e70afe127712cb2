"""EmbeddedDelayStore: delayed messages in a SQLite file inside the data directory (the default;
no server needed).

One table holds every message with its time and state; a partial index over the scheduled ones,
by time, makes a window query one index range scan however many are pending, and keeps memory
with SQLite's page cache rather than the Python heap. All SQL runs on the database's own thread
(:class:`~delayserver.sqlite.SqliteRunner`), and concurrent schedules share commits.

Durability: WAL journal; ``sync=False`` (the broker's async flush mode) commits without fsync,
which survives ``kill -9`` but may lose the last transactions on power loss; ``sync=True``
fsyncs every commit.

In async mode a schedule of a few messages (a one-call send) is acknowledged once appended to
the schedule log (:mod:`delayserver.schedule_log`), as durable as that mode's commit, and its
rows reach the table in batches a few milliseconds later, many schedules to one transaction.
Every other operation first waits for the rows scheduled before it, so what it reads or
changes is in the table; a resend is told from the table and from the rows not yet in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import structlog

from broker_core.message import Message
from delayserver.id_filter import HeldIds
from delayserver.schedule_log import ScheduleLog, frame
from delayserver.sqlite import SqliteRunner
from delayserver.store import (
    RECORD_QUEUE_AT,
    RECORD_STUB_BYTES,
    DelayedInfo,
    DelayState,
    DelayStoreUnavailable,
    Due,
    encode_message,
    queue_of,
)

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
CREATE TABLE IF NOT EXISTS schedule_log (
    id      INTEGER PRIMARY KEY CHECK (id = 0),
    applied INTEGER NOT NULL
);
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
#: Schedules of up to this many go through the schedule log in async mode.
_SMALL_WRITE = 16
#: A schedule-log entry as a row to insert: (seq, msg_id, deliver_at_ms, topic, record).
_Logged = tuple[int, bytes, int, str, bytes]
#: The watermark: every schedule-log entry up to this seq is in the table.
_APPLIED = (
    "INSERT INTO schedule_log (id, applied) VALUES (0, ?) "
    "ON CONFLICT (id) DO UPDATE SET applied = excluded.applied"
)
_KNOWN = "SELECT 1 FROM delayed WHERE msg_id = ?"
#: Rows wait this long after the first of them is logged before they are applied together.
_APPLY_AFTER_S = 0.01
#: ... or until this many wait; a schedule finding twice as many waits for them first.
_APPLY_ROWS = 2000
#: After a failed apply, the rows wait this long before the next try.
_RETRY_AFTER_S = 1.0
#: The id filter loads this many of the table's ids per read on the database's thread (other
#: statements run between reads).
_LOAD_ROWS = 20_000
#: What :meth:`EmbeddedDelayStore.find` reads of an id: its row, and the queue id of its
#: record (two bytes: a scheduled message's whole record, or a cancelled one's stub).
_FIND = (
    f"SELECT topic, deliver_at, state, substr(record, {RECORD_QUEUE_AT + 1}, 2) FROM delayed "
    "WHERE msg_id = ?"
)


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
        self._log = ScheduleLog(path)
        self._seq = 0
        #: Logged rows not yet in the table, oldest first.
        self._unapplied: list[_Logged] = []
        self._unapplied_ids: set[bytes] = set()
        self._apply_lock = asyncio.Lock()
        self._apply_timer: asyncio.TimerHandle | None = None
        self._apply_task: asyncio.Task[None] | None = None
        #: Why the last apply failed; None once one succeeds.
        self._apply_error: str | None = None
        #: The seq of the last entry a failed append may have left whole in a log it could
        #: not cut (0: none): the next direct schedule raises the watermark to it, so those
        #: entries, never acknowledged, are never replayed.
        self._spent_seq = 0
        #: Set at close: the background apply is not started or retried any more.
        self._closing = False
        #: The ids the table may hold (:mod:`delayserver.id_filter`): a schedule through the
        #: log and :meth:`find` ask SQLite only about those its filter may hold.
        self._ids = HeldIds(
            name="delay-store",
            count=lambda: self._read(_row_count),
            read=self._table_ids,
            pending=lambda: self._unapplied_ids,
            errors=(DelayStoreUnavailable, sqlite3.Error),
        )

    async def open(self) -> None:
        self._closing = False
        await self._db.open()
        await self._replay()
        self._pending = await self._read(
            lambda db: db.execute(
                "SELECT count(*) FROM delayed INDEXED BY delayed_due WHERE state = 0"
            ).fetchone()[0]
        )
        log.info("delay_store.opened", path=str(self.path), pending=self._pending)
        self._ids.start()

    async def _replay(self) -> None:
        """Apply what the schedule log holds above the watermark (a crash, or a close whose
        last apply failed), then start it empty; in sync mode, leave it closed."""
        loop = asyncio.get_running_loop()
        applied = await self._read(_applied_seq)
        rows = [
            (e.seq, e.msg_id, e.deliver_at_ms, e.topic, e.record)
            for e in await loop.run_in_executor(None, self._log.read)
            if e.seq > applied
        ]
        if rows:
            await self._write(_applying(rows))
            log.info("delay_store.schedule_log_replayed", entries=len(rows))
        self._seq = max(applied, rows[-1][0] if rows else 0)
        await loop.run_in_executor(None, self._log.remove if self._db.sync else self._log.start)

    async def close(self) -> None:
        self._closing = True
        if self._apply_timer is not None:
            self._apply_timer.cancel()
            self._apply_timer = None
        await self._ids.stop()
        try:
            await self._settle()
        except Exception as e:  # the rows stay in the log, applied at the next open
            log.warning("delay_store.apply_failed_at_close", error=str(e))
        if self._apply_task is not None:  # it may still be emptying a file
            await asyncio.wait([self._apply_task])
        await self._db.close()
        self._log.close()

    async def health(self) -> str | None:
        problem = await self._db.check()
        if problem is None and self._apply_error is not None:
            with contextlib.suppress(DelayStoreUnavailable):  # _apply_error says why
                await self._apply()
            return self._apply_error
        return problem

    # -- operations ------------------------------------------------------------------------------

    async def schedule(self, items: Sequence[tuple[Message, int]]) -> list[bool]:
        direct = self._ids.in_flight  # ids being stored by schedules that bypass the log
        if (
            self._log.open
            and len(items) <= _SMALL_WRITE
            and self._db.failure is None
            and self._apply_error is None
            and len(self._unapplied) < 2 * _APPLY_ROWS
            and not (direct and any(m.msg_id in direct for m, _ in items))
        ):
            result = self._schedule_logged(items)
            if result is not None:
                return result
        # Known as being written from before the first await: a schedule through the log
        # meanwhile (the apply below, the write) is then stored directly too, after this one.
        with self._ids.writing([m.msg_id for m, _ in items]):
            return await self._schedule_directly(items)

    async def _schedule_directly(self, items: Sequence[tuple[Message, int]]) -> list[bool]:
        await self._settle()
        # Every row logged is in the table now (a log that leaves seqs spent is closed: no
        # row is logged after them), so the watermark may pass them.
        spent = self._spent_seq
        if len(items) == 1 and not spent:
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
            result = [insert(_INSERT, row).rowcount == 1 for row in rows]
            if spent:
                db.execute(_APPLIED, (spent,))
            return result

        result = await self._write(run, small=len(rows) <= _SMALL_WRITE)
        if self._spent_seq == spent:
            self._spent_seq = 0
        self._pending += sum(result)
        return result

    def _schedule_logged(self, items: Sequence[tuple[Message, int]]) -> list[bool] | None:
        """Schedule through the log, all on the loop (no await: no other schedule can come
        between the check for a known id and the append). None when the log cannot take them:
        the caller stores them directly."""
        db = self._db.inline
        assert db is not None
        known = self._unapplied_ids
        held = self._ids.filter  # None: ask SQLite about every id
        fresh: list[bool] = []
        frames: list[bytes] = []
        rows = []
        seq = self._seq
        try:
            for msg, at in items:
                msg_id = msg.msg_id
                if msg_id in known or (
                    (held is None or msg_id in held)
                    and db.execute(_KNOWN, (msg_id,)).fetchone() is not None
                ):
                    fresh.append(False)
                    continue
                seq += 1
                record = encode_message(msg)
                frames.append(frame(seq, msg_id, at, msg.topic.encode(), record))
                rows.append((seq, msg_id, at, msg.topic, record))
                known.add(msg_id)
                fresh.append(True)
        except sqlite3.Error as e:
            known.difference_update(r[1] for r in rows)
            log.warning("delay_store.lookup_failed", error=str(e))
            return None
        except BaseException:  # a message that cannot be encoded: none of the call is stored
            known.difference_update(r[1] for r in rows)
            raise
        if not rows:
            return fresh
        try:
            self._log.append(b"".join(frames), seq)
        except OSError as e:
            known.difference_update(r[1] for r in rows)
            log.error("delay_store.schedule_log_failed", error=str(e), open=self._log.open)
            if not self._log.open:
                # Not cut off: whole entries of this write may be in the file.
                self._seq = self._spent_seq = seq
            return None
        self._seq = seq
        self._unapplied += rows
        self._ids.note([row[1] for row in rows])
        self._pending += len(rows)
        if len(self._unapplied) >= _APPLY_ROWS:
            self._apply_soon(0)
        elif self._apply_timer is None and self._apply_task is None:
            self._apply_soon(_APPLY_AFTER_S)
        return fresh

    # -- applying the log --------------------------------------------------------------------

    def _apply_soon(self, delay_s: float) -> None:
        if self._closing:
            return  # close applies what it can; the rest waits in the log for the next open
        if self._apply_timer is not None:
            self._apply_timer.cancel()
        self._apply_timer = asyncio.get_running_loop().call_later(delay_s, self._start_apply)

    def _start_apply(self) -> None:
        self._apply_timer = None
        if self._apply_task is None:
            self._apply_task = asyncio.create_task(
                self._apply_in_background(), name="tempomq-delay-store-apply"
            )

    async def _apply_in_background(self) -> None:
        retry = False
        try:
            await self._apply()
        except DelayStoreUnavailable as e:
            log.error("delay_store.apply_failed", error=str(e), waiting=len(self._unapplied))
            retry = True
        except Exception:
            log.exception("delay_store.apply_failed", waiting=len(self._unapplied))
            retry = True
        finally:
            self._apply_task = None
        if self._unapplied and self._apply_timer is None:
            self._apply_soon(_RETRY_AFTER_S if retry else _APPLY_AFTER_S)

    async def _settle(self) -> None:
        """Return once every row logged before the call is in the table. Raises
        ``DelayStoreUnavailable`` when they cannot be applied (they stay logged)."""
        if self._unapplied or self._apply_lock.locked():
            await self._apply()

    async def _apply(self) -> None:
        async with self._apply_lock:
            if not self._unapplied:
                return
            rows, self._unapplied = self._unapplied, []
            try:
                await self._write(_applying(rows))
            except BaseException as e:
                self._unapplied[:0] = rows
                if isinstance(e, DelayStoreUnavailable):
                    self._apply_error = str(e)
                raise
            self._apply_error = None
            self._unapplied_ids.difference_update(r[1] for r in rows)
            index = self._log.to_empty(rows[-1][0])
        if index is not None:
            ok = False
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._log.empty, index)
                ok = True
            except OSError as e:
                log.warning("delay_store.schedule_log_not_emptied", error=str(e))
            finally:
                self._log.emptied(index, ok)

    # -- the id filter -----------------------------------------------------------------------

    async def _table_ids(self) -> AsyncIterator[list[bytes]]:
        """Every id of the table, :data:`_LOAD_ROWS` per read (other statements run between)."""
        after = -1
        while rows := await self._read(_ids_after(after)):
            after = rows[-1][0]
            yield [r[1] for r in rows]

    def may_hold(self, msg_id: bytes) -> bool:
        return self._ids.may_hold(msg_id)

    async def find(self, msg_ids: Sequence[bytes]) -> list[DelayedInfo | None]:
        ask = [m for m in msg_ids if self._ids.may_hold(m)]
        if not ask:
            return [None] * len(msg_ids)
        if not self._unapplied_ids.isdisjoint(ask):
            await self._settle()
        found: dict[bytes, DelayedInfo] | None = None
        db = self._db.inline
        if db is not None and self._db.failure is None:
            with contextlib.suppress(sqlite3.Error):  # busy, say: the thread asks instead
                found = _found(db, ask)
        if found is None:
            found = await self._read(lambda db: _found(db, ask))
        return [found.get(m) for m in msg_ids]

    async def window(
        self, from_ms: int, to_ms: int, limit: int, *, after_msg_id: bytes = b""
    ) -> list[Due]:
        await self._settle()

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
        if msg_id in self._unapplied_ids:
            await self._settle()

        def run(db: sqlite3.Connection) -> Due | None:
            row = db.execute(
                "SELECT deliver_at, record FROM delayed WHERE msg_id = ? AND state = 0", (msg_id,)
            ).fetchone()
            return None if row is None else Due(msg_id, row[0], bytes(row[1]))

        return await self._read(run)

    async def mark_delivered(self, msg_ids: Sequence[bytes], released_at_ms: int) -> None:
        if self._unapplied_ids and not self._unapplied_ids.isdisjoint(msg_ids):
            await self._settle()
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
        if msg_id in self._unapplied_ids:
            await self._settle()

        def run(db: sqlite3.Connection) -> tuple[int, DelayedInfo | None]:
            # The record's first bytes stay (RECORD_STUB_BYTES): a resend of the id still
            # answers the queue the message was meant for.
            n = db.execute(
                "UPDATE delayed SET state = 2, finished_at = ?, record = substr(record, 1, ?) "
                "WHERE msg_id = ? AND state = 0",
                (now_ms, RECORD_STUB_BYTES, msg_id),
            ).rowcount
            return n, _info(db, msg_id)

        n, info = await self._write(run, small=True)
        self._pending -= n
        return info

    async def reschedule(self, msg_id: bytes, deliver_at_ms: int) -> DelayedInfo | None:
        if msg_id in self._unapplied_ids:
            await self._settle()

        def run(db: sqlite3.Connection) -> DelayedInfo | None:
            db.execute(
                "UPDATE delayed SET deliver_at = ? WHERE msg_id = ? AND state = 0",
                (deliver_at_ms, msg_id),
            )
            return _info(db, msg_id)

        return await self._write(run, small=True)

    async def get(self, msg_id: bytes) -> DelayedInfo | None:
        if msg_id in self._unapplied_ids:
            await self._settle()
        return await self._read(lambda db: _info(db, msg_id))

    async def pending(self) -> int:
        return self._pending

    async def count_due(self, bounds_ms: Sequence[int]) -> list[int]:
        await self._settle()

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


def _applying(rows: list[_Logged]) -> Callable[[sqlite3.Connection], None]:
    """The write that puts logged rows into the table and moves the watermark to the last."""

    def run(db: sqlite3.Connection) -> None:
        db.executemany(_INSERT, [r[1:] for r in rows])
        db.execute(_APPLIED, (rows[-1][0],))

    return run


def _row_count(db: sqlite3.Connection) -> int:
    """How many rows the table holds, or a little more: the span of their ids while that is
    small (two index probes), a count otherwise."""
    lo, hi = db.execute("SELECT min(id), max(id) FROM delayed").fetchone()
    if hi is None:
        return 0
    if hi - lo < 1 << 21:
        return int(hi - lo + 1)
    return int(db.execute("SELECT count(*) FROM delayed").fetchone()[0])


def _ids_after(after: int) -> Callable[[sqlite3.Connection], list[tuple[int, bytes]]]:
    def run(db: sqlite3.Connection) -> list[tuple[int, bytes]]:
        return db.execute(
            "SELECT id, msg_id FROM delayed WHERE id > ? ORDER BY id LIMIT ?", (after, _LOAD_ROWS)
        ).fetchall()

    return run


def _found(db: sqlite3.Connection, msg_ids: Sequence[bytes]) -> dict[bytes, DelayedInfo]:
    """The rows of ``msg_ids`` the table holds, as infos with their queue ids."""
    found = {}
    for msg_id in msg_ids:
        row = db.execute(_FIND, (msg_id,)).fetchone()
        if row is not None:
            topic, deliver_at, state, queue = row
            found[msg_id] = DelayedInfo(msg_id, topic, deliver_at, _STATES[state], queue_of(queue))
    return found


def _applied_seq(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT applied FROM schedule_log WHERE id = 0").fetchone()
    return 0 if row is None else int(row[0])


def _info(db: sqlite3.Connection, msg_id: bytes) -> DelayedInfo | None:
    row = db.execute(
        "SELECT topic, deliver_at, state FROM delayed WHERE msg_id = ?", (msg_id,)
    ).fetchone()
    if row is None:
        return None
    return DelayedInfo(msg_id, row[0], row[1], _STATES[row[2]])
