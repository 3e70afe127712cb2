"""The embedded delay store's writes of one message (a one-call send): durable before the
answer in both flush modes (a process killed with SIGKILL right after keeps it), a resend known
across calls, a database locked by another writer (sync mode: the write waits for the lock on
the database's thread; async mode: acknowledged from the schedule log, in the table once the
lock goes), and a failed direct write reported with its cause."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from broker_core.message import Message, MsgIdGenerator
from delayserver.embedded import EmbeddedDelayStore
from delayserver.store import DelayedInfo, DelayState, DelayStoreUnavailable, decode_message
from tests.unit.broker_helpers import wait_for

T0_MS = 1_700_000_000_000
_ids = MsgIdGenerator()

#: Schedules one message, says so, and dies by SIGKILL: no close, no checkpoint.
_KILLED = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from broker_core.message import Message
    from delayserver.embedded import EmbeddedDelayStore

    async def main():
        store = EmbeddedDelayStore(Path(sys.argv[1]), sync=sys.argv[2] == "sync")
        await store.open()
        msg = Message("orders", b"kept", msg_id=bytes.fromhex(sys.argv[3]))
        assert await store.schedule([(msg, 1_700_000_060_000)]) == [True]
        print("scheduled", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("flush", ["async", "sync"])
async def test_a_lone_schedule_survives_sigkill_right_after_its_answer(
    tmp_path: Path, flush: str
) -> None:
    path = tmp_path / "delay.db"
    msg_id = _ids.next()
    done = subprocess.run(
        [sys.executable, "-c", _KILLED, str(path), flush, msg_id.hex()],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr.decode()
    assert done.stdout.endswith(b"scheduled\n")

    store = EmbeddedDelayStore(path)
    await store.open()
    try:
        assert await store.get(msg_id) == DelayedInfo(
            msg_id, "orders", 1_700_000_060_000, DelayState.SCHEDULED
        )
        assert await store.pending() == 1
        # A resend after the restart is known.
        again = Message("orders", b"again", msg_id=msg_id)
        assert await store.schedule([(again, T0_MS)]) == [False]
        due = await store.due(msg_id)
        assert due is not None and decode_message(due.record).body == b"kept"
    finally:
        await store.close()


@pytest.mark.parametrize("sync", [False, True])
async def test_a_lone_resend_is_stored_once_in_both_flush_modes(tmp_path: Path, sync: bool) -> None:
    path = tmp_path / "delay.db"
    store = EmbeddedDelayStore(path, sync=sync)
    await store.open()
    msg = Message("orders", b"first", msg_id=_ids.next())
    try:
        assert await store.schedule([(msg, T0_MS + 5)]) == [True]
        again = Message("orders", b"second", msg_id=msg.msg_id)
        assert await store.schedule([(again, T0_MS + 9)]) == [False]
        assert await store.pending() == 1
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT count(*), min(deliver_at) FROM delayed").fetchone() == (
            1,
            T0_MS + 5,
        )
    finally:
        db.close()


async def test_a_lone_schedule_on_a_locked_database_waits_on_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "delay.db"
    store = EmbeddedDelayStore(path, sync=True)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        msg = Message("orders", b"waits", msg_id=_ids.next())
        twin = Message("orders", b"twin", msg_id=msg.msg_id)
        first = asyncio.ensure_future(store.schedule([(msg, T0_MS)]))
        second = asyncio.ensure_future(store.schedule([(twin, T0_MS + 1)]))
        # Both queue for the thread, which waits for the lock; the loop goes on meanwhile.
        await wait_for(lambda: store._db._writer is not None)
        await asyncio.sleep(0.05)
        assert not first.done() and not second.done()
        other.execute("COMMIT")
        assert await asyncio.wait_for(asyncio.gather(first, second), 10) == [[True], [False]]
        due = await store.due(msg.msg_id)
        assert due is not None and decode_message(due.record).body == b"waits"
        assert await store.pending() == 1
        assert await store.health() is None
    finally:
        other.close()
        await store.close()


async def test_a_lone_schedule_on_a_locked_database_is_logged_and_applied_later(
    tmp_path: Path,
) -> None:
    path = tmp_path / "delay.db"
    store = EmbeddedDelayStore(path)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        msg = Message("orders", b"logged", msg_id=_ids.next())
        twin = Message("orders", b"twin", msg_id=msg.msg_id)
        # Both answered at once, the loop never waiting on the lock; the twin is a resend.
        assert await asyncio.wait_for(store.schedule([(msg, T0_MS)]), 1) == [True]
        assert await asyncio.wait_for(store.schedule([(twin, T0_MS + 1)]), 1) == [False]
        assert other.execute("SELECT count(*) FROM delayed").fetchone() == (0,)
        other.execute("COMMIT")
        due = await asyncio.wait_for(store.due(msg.msg_id), 10)
        assert due is not None and decode_message(due.record).body == b"logged"
        assert await store.pending() == 1
        assert await store.health() is None
    finally:
        other.close()
        await store.close()


async def test_a_failed_lone_schedule_says_why_and_stores_nothing(tmp_path: Path) -> None:
    store = EmbeddedDelayStore(tmp_path / "delay.db")
    await store.open()
    try:
        inline = store._db._inline
        assert inline is not None
        # Without the schedule log (an append that failed and could not be cut off), a lone
        # schedule is written on the loop. That connection may not grow the file:
        # SQLITE_FULL, as on a full disk (not a busy database, which would go to the thread
        # and succeed there).
        store._log.close()
        inline.execute("PRAGMA max_page_count = 1")
        msg = Message("orders", b"x" * 20_000, msg_id=_ids.next())
        with pytest.raises(DelayStoreUnavailable, match="database or disk is full"):
            await store.schedule([(msg, T0_MS)])
        assert await store.get(msg.msg_id) is None
        assert await store.pending() == 0
        # The next write goes through the thread, which can write: healthy again.
        assert await store.schedule([(msg, T0_MS)]) == [True]
        assert await store.health() is None
        assert await store.pending() == 1
    finally:
        await store.close()
