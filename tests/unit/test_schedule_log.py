"""The embedded delay store's schedule log (async flush mode): a schedule acknowledged from the
log alone survives ``kill -9``; a torn or corrupt tail ends the replay and loses nothing before
it; the watermark keeps a purged message from coming back; a failed append is cut off and the
schedule stored directly; a failed apply keeps its rows, says why, and applies them later; the
files take turns and are emptied; every other operation sees rows not yet applied; sync mode
writes no log and applies one left behind."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from broker_core.message import Message, MsgIdGenerator
from delayserver import schedule_log
from delayserver.embedded import EmbeddedDelayStore
from delayserver.schedule_log import ScheduleLog, frame, read_entries
from delayserver.store import DelayedInfo, DelayState, DelayStoreUnavailable, decode_message

T0_MS = 1_700_000_000_000
_ids = MsgIdGenerator()

#: Schedules messages one call each while another connection holds the database's write lock
#: (so none can reach the table), says so, and dies by SIGKILL.
_KILLED_WHILE_LOCKED = textwrap.dedent(
    """
    import asyncio, os, signal, sqlite3, sys
    from pathlib import Path
    from broker_core.message import Message
    from delayserver.embedded import EmbeddedDelayStore

    async def main():
        path = Path(sys.argv[1])
        store = EmbeddedDelayStore(path)
        await store.open()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        for i, hex_id in enumerate(sys.argv[2:]):
            msg = Message("orders", b"body-%d" % i, msg_id=bytes.fromhex(hex_id))
            assert await store.schedule([(msg, 1_700_000_060_000 + i)]) == [True]
        await asyncio.sleep(0.1)  # the apply has tried, and waits for the lock
        assert store._unapplied_ids, "the rows reached the table: the lock did not hold them"
        print("scheduled", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


def _msg(body: bytes = b"x", topic: str = "orders") -> Message:
    return Message(topic, body, msg_id=_ids.next())


async def _opened(path: Path, *, sync: bool = False) -> EmbeddedDelayStore:
    store = EmbeddedDelayStore(path, sync=sync)
    await store.open()
    return store


def _rows(path: Path) -> list[tuple[bytes, int, int]]:
    db = sqlite3.connect(path)
    try:
        return [
            (bytes(m), at, state)
            for m, at, state in db.execute(
                "SELECT msg_id, deliver_at, state FROM delayed ORDER BY deliver_at"
            )
        ]
    finally:
        db.close()


async def test_schedules_acknowledged_from_the_log_alone_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "delay.db"
    await (await _opened(path)).close()  # the schema exists before the other connection locks
    ids = [_ids.next() for _ in range(5)]
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_LOCKED, str(path), *(i.hex() for i in ids)],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr.decode()
    assert done.stdout.endswith(b"scheduled\n")
    assert _rows(path) == []  # only the log has them

    store = await _opened(path)
    try:
        for i, msg_id in enumerate(ids):
            due = await store.due(msg_id)
            assert due is not None and due.deliver_at_ms == 1_700_000_060_000 + i
            assert decode_message(due.record).body == b"body-%d" % i
        assert await store.pending() == 5
        # Known after the restart: a resend is not stored again.
        assert await store.schedule([(Message("orders", b"again", msg_id=ids[0]), T0_MS)]) == [
            False
        ]
    finally:
        await store.close()
    assert len(_rows(path)) == 5


def _log_bytes(path: Path) -> bytes:
    return (path.parent / (path.name + ".schedule-0")).read_bytes()


async def _crash_copy(store: EmbeddedDelayStore, path: Path, dest: Path) -> Path:
    """What a kill -9 now would leave: the database with its WAL and the log files, copied
    while the store is open (no close, no checkpoint)."""
    dest.mkdir()
    for f in path.parent.iterdir():
        if f.name.startswith(path.name):
            (dest / f.name).write_bytes(f.read_bytes())
    return dest / path.name


@pytest.mark.parametrize("damage", ["torn", "corrupt"])
async def test_replay_stops_at_a_torn_or_corrupt_entry_and_keeps_those_before(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "a" / "delay.db"
    store = await _opened(path)
    # Hold the apply: every row stays in the log only.
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        msgs = [_msg(b"m%d" % i) for i in range(3)]
        for i, m in enumerate(msgs):
            assert await store.schedule([(m, T0_MS + i)]) == [True]
        crashed = await _crash_copy(store, path, tmp_path / "b")
    finally:
        other.execute("ROLLBACK")
        other.close()
        await store.close()
    log_file = crashed.parent / (crashed.name + ".schedule-0")
    data = log_file.read_bytes()
    entries = list(read_entries(log_file))
    assert [e.msg_id for e in entries] == [m.msg_id for m in msgs]
    e = entries[2]
    last = len(data) - len(frame(e.seq, e.msg_id, e.deliver_at_ms, b"orders", e.record))
    if damage == "torn":
        log_file.write_bytes(data[: len(data) - 7])  # the last write only half done
    else:
        flipped = bytearray(data)
        flipped[last + 30] ^= 0xFF  # inside the last entry
        log_file.write_bytes(bytes(flipped))

    store = await _opened(crashed)
    try:
        assert await store.get(msgs[0].msg_id) is not None
        assert await store.get(msgs[1].msg_id) is not None
        assert await store.get(msgs[2].msg_id) is None
        assert await store.pending() == 2
        # The log starts empty again, and takes new schedules.
        assert await store.schedule([(_msg(), T0_MS + 9)]) == [True]
    finally:
        await store.close()


async def test_the_watermark_keeps_a_purged_message_from_coming_back(tmp_path: Path) -> None:
    path = tmp_path / "a" / "delay.db"
    store = await _opened(path)
    try:
        msg = _msg()
        assert await store.schedule([(msg, T0_MS)]) == [True]
        await store.mark_delivered([msg.msg_id], T0_MS + 1)  # applies the row first
        assert await store.purge(T0_MS + 2) == 1
        assert await store.get(msg.msg_id) is None
        # The log still holds the entry (its file is not full, so not emptied).
        assert [e.msg_id for e in read_entries(path.parent / "delay.db.schedule-0")] == [msg.msg_id]
        crashed = await _crash_copy(store, path, tmp_path / "b")
    finally:
        await store.close()
    store = await _opened(crashed)
    try:
        assert await store.get(msg.msg_id) is None
        assert await store.pending() == 0
    finally:
        await store.close()


async def test_every_operation_sees_rows_not_yet_applied(tmp_path: Path) -> None:
    store = await _opened(tmp_path / "delay.db")
    try:
        a, b, c, d = (_msg(b"%d" % i) for i in range(4))
        for i, m in enumerate((a, b, c, d)):
            assert await store.schedule([(m, T0_MS + i)]) == [True]
        assert store._unapplied  # none applied yet: each call below must see them
        assert await store.schedule([(Message("orders", b"dup", msg_id=a.msg_id), 5)]) == [False]
        assert [x.msg_id for x in await store.window(0, T0_MS + 10, 10)] == [
            a.msg_id,
            b.msg_id,
            c.msg_id,
            d.msg_id,
        ]
        for _ in range(4):
            assert await store.schedule([(_msg(), T0_MS + 100)]) == [True]
        assert await store.count_due([T0_MS + 50]) == [4]
        e = _msg()
        assert await store.schedule([(e, T0_MS + 200)]) == [True]
        due = await store.due(e.msg_id)
        assert due is not None and due.deliver_at_ms == T0_MS + 200
        f = _msg()
        assert await store.schedule([(f, T0_MS + 300)]) == [True]
        cancelled = await store.cancel(f.msg_id, T0_MS)
        assert cancelled is not None and cancelled.state is DelayState.CANCELLED
        g = _msg()
        assert await store.schedule([(g, T0_MS + 400)]) == [True]
        moved = await store.reschedule(g.msg_id, T0_MS + 401)
        assert moved == DelayedInfo(g.msg_id, "orders", T0_MS + 401, DelayState.SCHEDULED)
        h = _msg()
        assert await store.schedule([(h, T0_MS + 500)]) == [True]
        await store.mark_delivered([h.msg_id], T0_MS)
        got = await store.get(h.msg_id)
        assert got is not None and got.state is DelayState.DELIVERED
        i = _msg()
        assert await store.schedule([(i, T0_MS + 600)]) == [True]
        assert await store.get(i.msg_id) is not None
        # A large schedule (the database's thread) after logged ones: the same id is a resend.
        j = _msg()
        assert await store.schedule([(j, T0_MS + 700)]) == [True]
        big = [(Message("orders", b"b", msg_id=j.msg_id), 1)] + [
            (_msg(), T0_MS + 800) for _ in range(40)
        ]
        assert await store.schedule(big) == [False] + [True] * 40
        assert await store.pending() == 4 + 4 + 1 + 1 + 1 + 1 + 40  # e g i j; f and h are done
    finally:
        await store.close()


async def test_a_failed_append_is_cut_off_and_the_schedule_stored_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "delay.db"
    store = await _opened(path)
    try:
        first = _msg(b"first")
        assert await store.schedule([(first, T0_MS)]) == [True]
        real_write = os.write

        def short_write(fd: int, data: bytes) -> int:  # a disk that fills up mid-entry
            return real_write(fd, data[: len(data) // 2])

        monkeypatch.setattr(schedule_log.os, "write", short_write)
        second = _msg(b"second")
        assert await store.schedule([(second, T0_MS + 1)]) == [True]
        monkeypatch.undo()
        # Stored directly, not through the log, whose torn part was cut off again.
        assert second.msg_id not in store._unapplied_ids
        assert [e.msg_id for e in read_entries(path.parent / "delay.db.schedule-0")] == [
            first.msg_id
        ]
        third = _msg(b"third")
        assert await store.schedule([(third, T0_MS + 2)]) == [True]
        assert [e.msg_id for e in read_entries(path.parent / "delay.db.schedule-0")] == [
            first.msg_id,
            third.msg_id,
        ]
        for m in (first, second, third):
            assert await store.get(m.msg_id) is not None
        assert await store.pending() == 3
    finally:
        await store.close()


async def test_a_failed_apply_keeps_its_rows_says_why_and_applies_them_later(
    tmp_path: Path,
) -> None:
    path = tmp_path / "delay.db"
    store = await _opened(path)
    db = store._db._db
    assert db is not None
    try:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")  # the thread's writes cannot grow it
        msgs = [_msg(b"x" * 20_000) for _ in range(3)]
        for m in msgs:
            assert await store.schedule([(m, T0_MS)]) == [True]
        with pytest.raises(DelayStoreUnavailable, match="database or disk is full"):
            await store.window(0, T0_MS + 1, 10)
        assert await store.health() is not None
        assert len(store._unapplied) == 3
        # While the database fails, a schedule does not pile up in the log: it fails.
        with pytest.raises(DelayStoreUnavailable, match="database or disk is full"):
            await store.schedule([(_msg(b"y" * 20_000), T0_MS)])
        db.execute("PRAGMA max_page_count = 1073741823")
        assert [d.msg_id for d in await store.window(0, T0_MS + 1, 10)] == sorted(
            m.msg_id for m in msgs
        )
        assert await store.health() is None
        assert await store.pending() == 3
    finally:
        await store.close()


async def test_the_background_apply_retries_after_a_failure(tmp_path: Path) -> None:
    store = await _opened(tmp_path / "delay.db")
    other = sqlite3.connect(tmp_path / "delay.db", isolation_level=None, timeout=0)
    try:
        db = store._db._db
        assert db is not None
        db.execute("PRAGMA busy_timeout = 0")  # the apply fails at once on the lock below
        other.execute("BEGIN IMMEDIATE")
        msg = _msg()
        assert await store.schedule([(msg, T0_MS)]) == [True]
        await asyncio.sleep(0.2)
        assert store._unapplied and store._apply_timer is not None  # failed, retry is set
        other.execute("ROLLBACK")
        deadline = asyncio.get_running_loop().time() + 5
        while store._unapplied or store._apply_lock.locked():
            assert asyncio.get_running_loop().time() < deadline, "never applied"
            await asyncio.sleep(0.05)
        assert _rows(tmp_path / "delay.db")[0][0] == msg.msg_id
    finally:
        other.close()
        await store.close()


async def test_the_files_take_turns_and_are_emptied_once_applied(tmp_path: Path) -> None:
    path = tmp_path / "a" / "delay.db"
    store = await _opened(path)
    store._log.switch_bytes = 4096
    files = store._log.paths
    try:
        sent = []
        seen_both = False
        for _ in range(300):
            m = _msg(b"z" * 200)
            sent.append(m)
            assert await store.schedule([(m, T0_MS)]) == [True]
            if len(sent) % 10 == 0:
                await store.count_due([T0_MS + 1])  # applies what is logged
            sizes = [p.stat().st_size for p in files]
            seen_both = seen_both or all(sizes)
            assert max(sizes) < 4096 + 2 * 300, sizes  # each is emptied before it grows on
        assert seen_both
        crashed = await _crash_copy(store, path, tmp_path / "b")
        logged = [e.msg_id for p in files for e in read_entries(p)]
        assert 0 < len(logged) < len(sent)
    finally:
        await store.close()
    store = await _opened(crashed)
    try:
        assert await store.pending() == 300
        assert {d.msg_id for d in await store.window(0, T0_MS + 1, 1000)} == {
            m.msg_id for m in sent
        }
    finally:
        await store.close()


async def test_sync_mode_writes_no_log_and_applies_one_left_behind(tmp_path: Path) -> None:
    path = tmp_path / "a" / "delay.db"
    store = await _opened(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        left = _msg(b"left")
        assert await store.schedule([(left, T0_MS)]) == [True]
        crashed = await _crash_copy(store, path, tmp_path / "b")
    finally:
        other.execute("ROLLBACK")
        other.close()
        await store.close()

    store = await _opened(crashed, sync=True)
    try:
        due = await store.due(left.msg_id)
        assert due is not None and decode_message(due.record).body == b"left"
        fresh = _msg()
        assert await store.schedule([(fresh, T0_MS + 1)]) == [True]
        assert not store._log.open
        for p in store._log.paths:
            assert not p.exists() or p.stat().st_size == 0
    finally:
        await store.close()
    assert {r[0] for r in _rows(crashed)} == {left.msg_id, fresh.msg_id}


async def test_close_applies_what_is_logged(tmp_path: Path) -> None:
    path = tmp_path / "delay.db"
    store = await _opened(path)
    msgs = [_msg() for _ in range(5)]
    for m in msgs:
        assert await store.schedule([(m, T0_MS)]) == [True]
    assert store._unapplied
    await store.close()
    assert sorted(r[0] for r in _rows(path)) == sorted(m.msg_id for m in msgs)


def test_read_entries_round_trips_and_stops_at_garbage(tmp_path: Path) -> None:
    f = tmp_path / "log"
    data = frame(1, b"\x01" * 16, T0_MS, "tópico".encode(), b"rec") + frame(
        2, b"\x02" * 16, -5, b"t", b""
    )
    f.write_bytes(data + b"\xff" * 40)
    got = list(read_entries(f))
    assert [(e.seq, e.msg_id, e.deliver_at_ms, e.topic, e.record) for e in got] == [
        (1, b"\x01" * 16, T0_MS, "tópico", b"rec"),
        (2, b"\x02" * 16, -5, "t", b""),
    ]
    assert list(read_entries(tmp_path / "absent")) == []


def test_an_append_whose_cut_fails_closes_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = ScheduleLog(tmp_path / "delay.db")
    log.start()

    def failing(*_: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(schedule_log.os, "write", failing)
    monkeypatch.setattr(schedule_log.os, "ftruncate", failing)
    with pytest.raises(OSError):
        log.append(frame(1, b"i", 0, b"t", b"r"), 1)
    assert not log.open
