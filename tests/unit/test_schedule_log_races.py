"""The embedded delay store's schedule log under races and failures: a schedule of an id that a
direct write is storing is a resend, however the two interleave, and a schedule that fails
part-way leaves no id known; a log closed by a failed cut still lets schedules through to the
table, and what the failed write left in it never comes back once delivered and purged; a
close ends the background apply for good; and the service answers delivered for a released
message even when the store's answer predates its mark."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.message import Message, MsgIdGenerator
from delayserver import embedded, schedule_log
from delayserver.embedded import EmbeddedDelayStore
from delayserver.schedule_log import ScheduleLog, frame
from delayserver.service import DelayService
from delayserver.store import DelayedInfo, DelayState, decode_message
from delayserver.timers import TimerService
from tests.unit.broker_helpers import wait_for

T0_MS = 1_700_000_000_000
_ids = MsgIdGenerator()


def _msg(body: bytes = b"x") -> Message:
    return Message("orders", body, msg_id=_ids.next())


async def _opened(path: Path) -> EmbeddedDelayStore:
    store = EmbeddedDelayStore(path)
    await store.open()
    return store


async def _crash_copy(path: Path, dest: Path) -> Path:
    """What a kill -9 now would leave (no close, no checkpoint)."""
    dest.mkdir()
    for f in path.parent.iterdir():
        if f.name.startswith(path.name):
            (dest / f.name).write_bytes(f.read_bytes())
    return dest / path.name


def _no_space(*_: object) -> int:
    raise OSError(28, "No space left on device")


async def test_a_large_schedule_waiting_for_the_apply_and_a_logged_resend_store_the_id_once(
    tmp_path: Path,
) -> None:
    store = await _opened(tmp_path / "delay.db")
    try:
        assert await store.schedule([(_msg(), T0_MS)]) == [True]  # a row waits to be applied
        twin = _msg(b"first")
        big = [(twin, T0_MS)] + [(_msg(), T0_MS + 1) for _ in range(40)]
        large = asyncio.ensure_future(store.schedule(big))
        await asyncio.sleep(0)  # the large one waits for the apply of the row before it
        lone = await store.schedule([(Message("orders", b"second", msg_id=twin.msg_id), 5)])
        results = await large
        assert [results[0], lone[0]].count(True) == 1
        due = await store.due(twin.msg_id)
        assert due is not None
        assert decode_message(due.record).body == (b"first" if results[0] else b"second")
        assert await store.pending() == 42
    finally:
        await store.close()


async def test_a_lone_direct_schedule_and_a_logged_resend_store_the_id_once(
    tmp_path: Path,
) -> None:
    store = await _opened(tmp_path / "delay.db")
    try:
        # So many rows wait that the next schedule goes to the table, after applying them.
        waiting = 2 * embedded._APPLY_ROWS
        for _ in range(waiting):
            assert await store.schedule([(_msg(), T0_MS)]) == [True]
        twin = _msg(b"first")
        direct = asyncio.ensure_future(store.schedule([(twin, T0_MS)]))
        await asyncio.sleep(0)  # it waits for the apply; the log takes schedules again
        lone = await store.schedule([(Message("orders", b"second", msg_id=twin.msg_id), 5)])
        first = await direct
        assert [first[0], lone[0]].count(True) == 1
        assert await store.pending() == waiting + 1
    finally:
        await store.close()


async def test_a_log_closed_by_a_failed_cut_lets_the_schedule_through_to_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _opened(tmp_path / "delay.db")
    store._log.switch_bytes = 1024
    try:
        sent = [_msg(b"z" * 200) for _ in range(8)]
        for m in sent:
            assert await store.schedule([(m, T0_MS)]) == [True]
        # Both files hold entries not yet applied.
        assert all(p.stat().st_size for p in store._log.paths)
        monkeypatch.setattr(schedule_log.os, "write", _no_space)
        monkeypatch.setattr(schedule_log.os, "ftruncate", _no_space)
        last = _msg(b"last")
        assert await store.schedule([(last, T0_MS)]) == [True]
        monkeypatch.undo()
        assert not store._log.open
        for m in [*sent, last]:
            info = await store.get(m.msg_id)
            assert info is not None and info.state is DelayState.SCHEDULED
        assert await store.pending() == 9
    finally:
        await store.close()


def test_emptying_a_file_of_a_closed_log_fails_as_an_os_error(tmp_path: Path) -> None:
    log = ScheduleLog(tmp_path / "delay.db", switch_bytes=1)
    log.start()
    log.append(frame(1, b"i", 0, b"t", b"r"), 1)  # full: the next append goes to the other
    index = log.to_empty(1)
    assert index == 0
    log.close()  # a failed cut, while the emptying waited for its thread
    with pytest.raises(OSError):
        log.empty(index)
    log.emptied(index, False)
    assert log.to_empty(1) is None


async def test_a_close_while_the_apply_fails_leaves_no_apply_behind(tmp_path: Path) -> None:
    path = tmp_path / "delay.db"
    store = await _opened(path)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    msg = _msg()
    try:
        db = store._db._db
        assert db is not None
        db.execute("PRAGMA busy_timeout = 200")  # the apply fails soon on the lock below
        other.execute("BEGIN IMMEDIATE")
        assert await store.schedule([(msg, T0_MS)]) == [True]
        await wait_for(store._apply_lock.locked)  # the background apply waits for the lock
        await store.close()  # its own apply fails too: the row stays in the log
        assert store._apply_timer is None and store._apply_task is None
    finally:
        other.execute("ROLLBACK")
        other.close()
    store = await _opened(path)
    try:
        assert await store.due(msg.msg_id) is not None
    finally:
        await store.close()


async def test_entries_a_failed_cut_left_in_the_log_stay_gone_once_delivered_and_purged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a" / "delay.db"
    store = await _opened(path)
    try:
        a, b = _msg(b"a"), _msg(b"b")
        real_write = os.write

        def torn(fd: int, data: bytes) -> int:  # the first entry whole, the second not
            return real_write(fd, data[: len(data) - 5])

        monkeypatch.setattr(schedule_log.os, "write", torn)
        monkeypatch.setattr(schedule_log.os, "ftruncate", _no_space)
        assert await store.schedule([(a, T0_MS), (b, T0_MS)]) == [True, True]
        monkeypatch.undo()
        assert not store._log.open  # stored in the table directly
        await store.mark_delivered([a.msg_id, b.msg_id], T0_MS + 1)
        assert await store.purge(T0_MS + 2) == 2
        crashed = await _crash_copy(path, tmp_path / "b")
    finally:
        await store.close()
    store = await _opened(crashed)
    try:
        assert await store.get(a.msg_id) is None
        assert await store.get(b.msg_id) is None
        assert await store.pending() == 0
    finally:
        await store.close()


async def test_a_state_read_the_mark_overtakes_still_answers_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timers = TimerService(max_sleep_ms=None)
    broker = Broker(BrokerConfig(data_dir=tmp_path, segment_bytes=1 << 20), timers=timers)
    service = DelayService(EmbeddedDelayStore(tmp_path / "delay.db"), broker.store, timers)
    timers.start()
    await broker.start()
    await service.start()
    try:
        await broker.create_topic("t", 1)
        store = service.store
        read_done = asyncio.Event()
        marked: list[bytes] = []
        mark, get = store.mark_delivered, store.get

        async def mark_after_the_read(msg_ids: Sequence[bytes], released_at_ms: int) -> None:
            await read_done.wait()
            await mark(msg_ids, released_at_ms)
            marked.extend(msg_ids)

        async def read_answered_after_the_mark(msg_id: bytes) -> DelayedInfo | None:
            info = await get(msg_id)  # before the mark: scheduled
            read_done.set()
            await wait_for(lambda: msg_id in marked)
            return info

        monkeypatch.setattr(store, "mark_delivered", mark_after_the_read)
        monkeypatch.setattr(store, "get", read_answered_after_the_mark)
        msg = Message("t", b"m")
        await service.schedule([msg], [timers.now_ms() + 50])
        await wait_for(lambda: _in_topic(broker))
        info = await service.get(msg.msg_id)  # asked once the message is in its topic
        assert info is not None and info.state is DelayState.DELIVERED, info
    finally:
        await service.stop()
        await broker.stop()
        await timers.stop()


def _in_topic(broker: Broker) -> bool:
    lo, hi = broker.store.queue_bounds("t", 0)
    return hi > lo


async def test_a_schedule_that_fails_part_way_leaves_none_of_its_ids_known(
    tmp_path: Path,
) -> None:
    store = await _opened(tmp_path / "delay.db")
    try:
        good = _msg(b"good")
        unencodable = Message("orders", b"x", msg_id=_ids.next(), keys=("k" * 70_000,))
        with pytest.raises(struct.error):
            await store.schedule([(good, T0_MS), (unencodable, T0_MS)])
        assert await store.get(good.msg_id) is None
        # Never stored: sent again, it is new, and stored.
        assert await store.schedule([(good, T0_MS)]) == [True]
        assert await store.get(good.msg_id) is not None
    finally:
        await store.close()
