"""The embedded delay store's id filter: every id the table holds or a schedule is writing is
in it, so a resend is always told from a new message; a new id costs no SQLite lookup once it
is loaded; it loads in pieces while schedules go on, replaces itself when full, and a failed
load leaves the store asking SQLite until a later one succeeds."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from broker_core.message import Message, MsgIdGenerator
from delayserver import embedded, id_filter
from delayserver.embedded import EmbeddedDelayStore
from delayserver.id_filter import IdFilter

T0_MS = 1_700_000_000_000
_ids = MsgIdGenerator()


def _msg() -> Message:
    return Message("orders", b"x", msg_id=_ids.next())


async def _loaded(store: EmbeddedDelayStore) -> IdFilter:
    for _ in range(500):
        if store._ids.filter is not None and not store._ids.loading:
            return store._ids.filter
        await asyncio.sleep(0.01)
    raise AssertionError("the id filter did not load")


def _lookups(store: EmbeddedDelayStore) -> list[str]:
    """The SQL statements run on the store's event-loop connection from now on."""
    seen: list[str] = []
    inline = store._db.inline
    assert inline is not None
    inline.set_trace_callback(seen.append)
    return seen


def test_every_added_id_is_in_and_few_others_are() -> None:
    f = IdFilter(10_000)
    added = [os.urandom(16) for _ in range(f.capacity)]
    f.update(added[: len(added) // 2])
    for msg_id in added[len(added) // 2 :]:
        f.add(msg_id)
    assert all(msg_id in f for msg_id in added)
    assert f.count == f.capacity and not f.full
    others = [os.urandom(16) for _ in range(20_000)]
    # About 1.4 % at capacity; 5 % would be wildly unlikely for a working filter.
    assert sum(msg_id in f for msg_id in others) < len(others) * 0.05
    f.add(others[0])
    assert f.full


def test_size_stays_within_bounds() -> None:
    small = IdFilter(0)
    assert small.capacity == (1 << id_filter.MIN_BITS_LOG2) // 16
    huge = IdFilter(10**12)
    assert huge.at_largest and huge.capacity == (1 << id_filter.MAX_BITS_LOG2) // 16
    assert not small.at_largest


async def test_a_new_id_costs_no_lookup_once_loaded_and_resends_are_still_told(
    tmp_path: Path,
) -> None:
    path = tmp_path / "delay.db"
    store = EmbeddedDelayStore(path)
    await store.open()
    old = [_msg() for _ in range(50)]
    assert await store.schedule([(m, T0_MS) for m in old]) == [True] * 50
    await store.close()

    store = EmbeddedDelayStore(path)
    await store.open()
    try:
        held = await _loaded(store)
        assert all(m.msg_id in held for m in old)
        seen = _lookups(store)
        fresh = _msg()
        assert await store.schedule([(fresh, T0_MS)]) == [True]
        assert not [sql for sql in seen if sql.startswith("SELECT")], seen
        # Resends of ids from the table and from the log are told, whatever the filter says.
        assert await store.schedule([(old[7], T0_MS + 5)]) == [False]
        assert await store.schedule([(fresh, T0_MS + 5)]) == [False]
        await store._settle()
        assert await store.schedule([(fresh, T0_MS + 9)]) == [False]
        assert (await store.due(fresh.msg_id)).deliver_at_ms == T0_MS  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_schedules_during_a_load_in_pieces_are_all_in_the_filter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "_LOAD_ROWS", 40)
    monkeypatch.setattr(id_filter, "LOAD_SLICE", 7)
    path = tmp_path / "delay.db"
    store = EmbeddedDelayStore(path)
    await store.open()
    table = [_msg() for _ in range(1_000)]
    assert await store.schedule([(m, T0_MS) for m in table]) == [True] * 1_000
    await store.close()

    store = EmbeddedDelayStore(path)
    await store.open()
    try:
        assert store._ids.filter is None  # loading: 25 reads of 40 ids, 6 slices each
        during: list[Message] = []
        turns = 0
        while store._ids.filter is None:
            turns += 1
            one, many = _msg(), [_msg() for _ in range(20)]  # the log, then a direct write
            during += [one, *many]
            assert await store.schedule([(one, T0_MS + 1)]) == [True]
            assert await store.schedule([(m, T0_MS + 2) for m in many]) == [True] * 20
            # A resend meanwhile is told by SQLite (or the rows not yet applied).
            assert await store.schedule([(table[turns % 1_000], T0_MS)]) == [False]
        assert turns > 3, "the load did not take several turns: nothing raced it"
        held = await _loaded(store)
        assert all(m.msg_id in held for m in table + during)
        for m in (table[0], table[-1], during[0], during[-1]):
            assert await store.schedule([(m, T0_MS + 3)]) == [False]
    finally:
        await store.close()


async def test_a_full_filter_is_replaced_by_a_larger_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(id_filter, "MIN_BITS_LOG2", 10)  # 64 ids before it is full
    store = EmbeddedDelayStore(tmp_path / "delay.db")
    await store.open()
    try:
        first = await _loaded(store)
        sent = [_msg() for _ in range(200)]
        for m in sent:
            assert await store.schedule([(m, T0_MS)]) == [True]
            await asyncio.sleep(0)
        held = await _loaded(store)
        assert held is not first and held.capacity > first.capacity
        assert all(m.msg_id in held for m in sent)
        assert await store.schedule([(sent[0], T0_MS + 1)]) == [False]
    finally:
        await store.close()


async def test_a_failed_load_asks_sqlite_until_a_later_load_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "delay.db"
    store = EmbeddedDelayStore(path)
    await store.open()
    old = _msg()
    assert await store.schedule([(old, T0_MS)]) == [True]
    await store.close()

    failures = []
    ids_after = embedded._ids_after

    def failing_once(after: int):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(after)
            raise sqlite3.OperationalError("disk I/O error")
        return ids_after(after)

    monkeypatch.setattr(embedded, "_ids_after", failing_once)
    monkeypatch.setattr(id_filter, "LOAD_RETRY_S", 0.2)
    store = EmbeddedDelayStore(path)
    await store.open()
    try:
        await asyncio.sleep(0.05)
        assert failures and store._ids.filter is None
        seen = _lookups(store)
        assert await store.schedule([(old, T0_MS + 1)]) == [False]
        assert await store.schedule([(_msg(), T0_MS)]) == [True]
        assert [sql for sql in seen if sql.startswith("SELECT 1 FROM delayed")]
        held = await _loaded(store)
        assert old.msg_id in held
    finally:
        await store.close()
