"""The DelayStore contract: every store passes the same cases.

Stores under test: RedisDelayStore on fakeredis (always runs), RedisDelayStore on the real Redis
at ``TEMPOMQ_TEST_REDIS_URL`` (default db 15; skipped locally when Redis is down, failed under
``CI=true``) with a unique key prefix per test, RedisDelayStore on a throwaway three-node Redis
Cluster, and the embedded SQLite store in both flush modes.

Each case gets a :class:`Backend`: it opens stores on one backing dataset (a fakeredis server, a
key prefix, a file), so "reopen" means a new store instance on the same data.

Paging a window: ``window`` pages by the key ``(deliver_at_ms, msg_id)``. The caller passes
the last item's time and id as ``from_ms`` and ``after_msg_id`` and gets what comes strictly
after it, so pages never lose or repeat a message however many share one millisecond (see
``test_window_pages_by_time_and_id_*``). With the default ``after_msg_id=b""`` the window starts
at ``from_ms`` inclusive. Within one time the order is by ``msg_id`` (bytewise).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fakeredis
import pytest
import redis.asyncio

from broker_core.message import Message, MsgIdGenerator
from delayserver.redis_store import RedisDelayStore
from delayserver.store import (
    DelayedInfo,
    DelayState,
    DelayStore,
    Due,
    decode_message,
    encode_message,
)
from tests.services import require_service

T0_MS = 1_700_000_000_000
FAR_MS = T0_MS + 10 * 365 * 24 * 3600_000
REDIS_URL = os.environ.get("TEMPOMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

_ids = MsgIdGenerator()


class Backend:
    """Opens stores on one backing dataset and cleans it up at the end."""

    def __init__(self, make: Callable[[], DelayStore]) -> None:
        self._make = make
        self._open: list[DelayStore] = []

    async def open(self) -> DelayStore:
        store = self._make()
        await store.open()
        self._open.append(store)
        return store

    async def reopen(self, store: DelayStore) -> DelayStore:
        await store.close()
        self._open.remove(store)
        return await self.open()

    async def close(self) -> None:
        for store in self._open:
            await store.close()
        self._open.clear()


async def _fakeredis_backend(_tmp_path: Path) -> AsyncIterator[Backend]:
    server = fakeredis.FakeServer()
    clients: list[fakeredis.aioredis.FakeRedis] = []

    def make() -> DelayStore:
        clients.append(fakeredis.aioredis.FakeRedis(server=server))
        return RedisDelayStore("redis://fake", shards=4, client=clients[-1])

    backend = Backend(make)
    yield backend
    await backend.close()
    for client in clients:
        await client.aclose()


async def _redis_backend(_tmp_path: Path) -> AsyncIterator[Backend]:
    parts = urlsplit(REDIS_URL)
    require_service("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    prefix = f"tempomq-test-{uuid.uuid4().hex[:12]}"
    backend = Backend(lambda: RedisDelayStore(REDIS_URL, prefix=prefix))
    yield backend
    await backend.close()
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _cluster_backend(url: str) -> AsyncIterator[Backend]:
    # A throwaway cluster for the session: a unique prefix per test is cleanup enough.
    prefix = f"tempomq-test-{uuid.uuid4().hex[:12]}"
    backend = Backend(lambda: RedisDelayStore(url, prefix=prefix))
    yield backend
    await backend.close()


async def _embedded_backend(tmp_path: Path, sync: bool = False) -> AsyncIterator[Backend]:
    try:
        embedded = importlib.import_module("delayserver.embedded")
    except ModuleNotFoundError as e:
        if e.name != "delayserver.embedded":
            raise  # the module is there but broken: fail, do not hide it
        pytest.skip("delayserver.embedded does not exist yet")
    path = tmp_path / "delay.db"
    backend = Backend(lambda: embedded.EmbeddedDelayStore(path, sync=sync))
    yield backend
    await backend.close()


async def _embedded_sync_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    async for backend in _embedded_backend(tmp_path, sync=True):
        yield backend


BACKENDS = {
    "fakeredis": _fakeredis_backend,
    "redis": _redis_backend,
    # async flush mode (the schedule log) and sync mode (every schedule straight to the table)
    "embedded": _embedded_backend,
    "embedded-sync": _embedded_sync_backend,
}


@pytest.fixture(params=[*BACKENDS, "redis-cluster"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "redis-cluster":
        stores = _cluster_backend(request.getfixturevalue("redis_cluster_url"))
    else:
        stores = BACKENDS[request.param](tmp_path)
    async for b in stores:
        yield b


@pytest.fixture
async def store(backend: Backend) -> DelayStore:
    return await backend.open()


def message(topic: str = "orders", body: bytes = b"hello", **fields: Any) -> Message:
    return Message(topic, body, msg_id=_ids.next(), **fields)


async def schedule_at(store: DelayStore, *times_ms: int, topic: str = "orders") -> list[Message]:
    msgs = [message(topic, b"m%d" % i) for i in range(len(times_ms))]
    assert await store.schedule(list(zip(msgs, times_ms, strict=True))) == [True] * len(msgs)
    return msgs


def ids(dues: list[Due]) -> list[bytes]:
    return [d.msg_id for d in dues]


async def all_due(store: DelayStore) -> list[Due]:
    return await store.window(0, FAR_MS, 1_000_000)


async def page_through(
    store: DelayStore, limit: int, from_ms: int = T0_MS, to_ms: int = FAR_MS
) -> list[list[Due]]:
    """Every page of ``[from_ms, to_ms)``, each starting after the last item of the one before."""
    pages: list[list[Due]] = []
    after = b""
    while True:
        page = await store.window(from_ms, to_ms, limit, after_msg_id=after)
        assert len(page) <= limit
        pages.append(page)
        if len(page) < limit:
            return pages
        from_ms, after = page[-1].deliver_at_ms, page[-1].msg_id


# -- schedule and get ------------------------------------------------------------------------------


async def test_schedule_then_get(store: DelayStore) -> None:
    (m,) = await schedule_at(store, T0_MS + 5_000, topic="payments")

    assert await store.get(m.msg_id) == DelayedInfo(
        m.msg_id, "payments", T0_MS + 5_000, DelayState.SCHEDULED
    )
    assert await store.get(_ids.next()) is None
    assert await store.health() is None


async def test_schedule_nothing(store: DelayStore) -> None:
    assert await store.schedule([]) == []
    await store.mark_delivered([], T0_MS)
    assert await store.pending() == 0
    assert await store.window(0, FAR_MS, 10) == []


async def test_schedule_is_idempotent_by_msg_id(store: DelayStore) -> None:
    a, delivered, cancelled = await schedule_at(store, T0_MS, T0_MS + 1, T0_MS + 2)
    await store.mark_delivered([delivered.msg_id], T0_MS + 1)
    await store.cancel(cancelled.msg_id, T0_MS)
    fresh = message()
    # Known ids in any state are left alone, even with another time and body.
    again = [Message(m.topic, b"other", msg_id=m.msg_id) for m in (a, delivered, cancelled)]

    result = await store.schedule([*((m, T0_MS + 99) for m in again), (fresh, T0_MS + 3)])

    assert result == [False, False, False, True]
    assert [await store.get(m.msg_id) for m in (a, delivered, cancelled)] == [
        DelayedInfo(a.msg_id, "orders", T0_MS, DelayState.SCHEDULED),
        DelayedInfo(delivered.msg_id, "orders", T0_MS + 1, DelayState.DELIVERED),
        DelayedInfo(cancelled.msg_id, "orders", T0_MS + 2, DelayState.CANCELLED),
    ]
    assert [(d.msg_id, decode_message(d.record).body) for d in await all_due(store)] == [
        (a.msg_id, b"m0"),
        (fresh.msg_id, b"hello"),
    ]


async def test_a_lone_resend_is_known_in_every_state(store: DelayStore) -> None:
    # One message per call, as a one-call send schedules it.
    a, delivered, cancelled = (message(body=b"m%d" % i) for i in range(3))
    for i, m in enumerate((a, delivered, cancelled)):
        assert await store.schedule([(m, T0_MS + i)]) == [True]
    await store.mark_delivered([delivered.msg_id], T0_MS + 1)
    await store.cancel(cancelled.msg_id, T0_MS)

    for m in (a, delivered, cancelled):
        again = Message(m.topic, b"other", msg_id=m.msg_id)
        assert await store.schedule([(again, T0_MS + 99)]) == [False]

    assert [await store.get(m.msg_id) for m in (a, delivered, cancelled)] == [
        DelayedInfo(a.msg_id, "orders", T0_MS, DelayState.SCHEDULED),
        DelayedInfo(delivered.msg_id, "orders", T0_MS + 1, DelayState.DELIVERED),
        DelayedInfo(cancelled.msg_id, "orders", T0_MS + 2, DelayState.CANCELLED),
    ]
    assert [(d.msg_id, decode_message(d.record).body) for d in await all_due(store)] == [
        (a.msg_id, b"m0")
    ]
    assert await store.pending() == 1


async def test_same_id_in_a_batch_after_a_known_one(store: DelayStore) -> None:
    known = message(body=b"known")
    assert await store.schedule([(known, T0_MS)]) == [True]
    m = message(body=b"first")
    batch = [
        (Message(known.topic, b"again", msg_id=known.msg_id), T0_MS + 5),
        (m, T0_MS + 1),
        (Message(m.topic, b"second", msg_id=m.msg_id), T0_MS + 2),
        (Message(known.topic, b"again", msg_id=known.msg_id), T0_MS + 6),
    ]

    assert await store.schedule(batch) == [False, True, False, False]

    assert [(d.deliver_at_ms, decode_message(d.record).body) for d in await all_due(store)] == [
        (T0_MS, b"known"),
        (T0_MS + 1, b"first"),
    ]
    assert await store.pending() == 2


async def test_same_id_twice_in_one_batch_first_wins(store: DelayStore) -> None:
    m = message(body=b"first")
    twin = Message(m.topic, b"second", msg_id=m.msg_id)

    assert await store.schedule([(m, T0_MS), (twin, T0_MS + 1)]) == [True, False]

    (due,) = await all_due(store)
    assert (due.deliver_at_ms, decode_message(due.record).body) == (T0_MS, b"first")
    assert await store.pending() == 1


# -- find ----------------------------------------------------------------------------------------


async def test_find_tells_every_id_held_in_any_state_with_its_queue(
    backend: Backend, store: DelayStore
) -> None:
    """What a plain send of an id asks the delay store: held or not, where and when it goes.
    A scheduled or cancelled message names its queue; a delivered one's record is dropped
    (its copy in the topic says), so does a message whose queue the broker picks at release."""
    waiting = message(queue_id=3)
    delivered = message(queue_id=1)
    cancelled = message(queue_id=2)
    picked = message()  # no queue: the broker picks one at release
    assert (
        await store.schedule(
            [(waiting, T0_MS), (delivered, T0_MS + 1), (cancelled, T0_MS + 2), (picked, T0_MS + 3)]
        )
        == [True] * 4
    )
    await store.mark_delivered([delivered.msg_id], T0_MS + 10)
    await store.cancel(cancelled.msg_id, T0_MS + 20)
    unknown = _ids.next()
    asked = [waiting.msg_id, unknown, delivered.msg_id, cancelled.msg_id, picked.msg_id]
    expected = [
        DelayedInfo(waiting.msg_id, "orders", T0_MS, DelayState.SCHEDULED, 3),
        None,
        DelayedInfo(delivered.msg_id, "orders", T0_MS + 1, DelayState.DELIVERED, -1),
        DelayedInfo(cancelled.msg_id, "orders", T0_MS + 2, DelayState.CANCELLED, 2),
        DelayedInfo(picked.msg_id, "orders", T0_MS + 3, DelayState.SCHEDULED, -1),
    ]

    assert await store.find(asked) == expected
    assert await store.find([]) == []
    # A cancelled message keeps only what names its queue: never in a window, never due.
    assert ids(await all_due(store)) == [waiting.msg_id, picked.msg_id]
    assert await store.due(cancelled.msg_id) is None

    store = await backend.reopen(store)  # the id filter is loaded again (or still loading)
    assert await store.find(asked) == expected
    held = store._ids  # type: ignore[attr-defined]  # each store's id filter
    for _ in range(500):
        if held.filter is not None:
            break
        await asyncio.sleep(0.01)
    assert all(held.may_hold(m) for m in asked if m != unknown)
    assert await store.find(asked) == expected  # the same answers with the filter loaded
    assert await store.purge(T0_MS + 1_000) == 2
    assert await store.find(asked) == [expected[0], None, None, None, expected[4]]


# -- window --------------------------------------------------------------------------------------


async def test_window_is_the_scheduled_ones_in_range_by_time(store: DelayStore) -> None:
    times = [T0_MS + 30, T0_MS + 10, T0_MS + 20, T0_MS + 40, T0_MS + 10, T0_MS + 9]
    msgs = await schedule_at(store, *times)
    await store.cancel(msgs[2].msg_id, T0_MS)  # T0+20
    by_time = sorted(zip(times, (m.msg_id for m in msgs), strict=True))

    got = await store.window(T0_MS + 10, T0_MS + 40, 100)  # [from, to)

    expected = [(t, i) for t, i in by_time if T0_MS + 10 <= t < T0_MS + 40 and t != T0_MS + 20]
    assert [(d.deliver_at_ms, d.msg_id) for d in got] == expected
    assert ids(await store.window(T0_MS + 10, T0_MS + 40, 2)) == [i for _t, i in expected[:2]]
    assert await store.window(T0_MS + 41, FAR_MS, 100) == []
    assert await store.window(T0_MS + 10, T0_MS + 10, 100) == []


async def test_window_pages_without_loss_when_times_repeat(store: DelayStore) -> None:
    """Pages of 4 over groups of 3 equal times: each page restarts at the last time it got,
    the repeats at that time are dropped by id, and every message comes out once, in order."""
    times = [T0_MS + 10 * (i // 3) for i in range(30)]
    msgs = await schedule_at(store, *reversed(times))
    want = sorted(zip(reversed(times), (m.msg_id for m in msgs), strict=True))

    seen: dict[bytes, int] = {}
    from_ms = T0_MS
    for _page in range(len(times)):
        page = await store.window(from_ms, FAR_MS, 4)
        new = [d for d in page if d.msg_id not in seen]
        seen.update((d.msg_id, d.deliver_at_ms) for d in new)
        if len(page) < 4:
            break
        assert new, "a page made no progress"
        from_ms = page[-1].deliver_at_ms

    assert sorted((t, i) for i, t in seen.items()) == want
    assert [(t, i) for i, t in seen.items()] == want  # first seen in time order


async def test_window_pages_through_more_equal_times_than_limit(store: DelayStore) -> None:
    msgs = await schedule_at(store, *[T0_MS] * 10)

    pages = await page_through(store, 4)

    assert [len(p) for p in pages] == [4, 4, 2]
    assert [i for p in pages for i in ids(p)] == sorted(m.msg_id for m in msgs)


async def test_window_pages_by_time_and_id_through_10000_at_one_ms(store: DelayStore) -> None:
    msgs = [message(body=b"%d" % i) for i in range(10_000)]
    await store.schedule([(m, T0_MS) for m in reversed(msgs)])

    pages = await page_through(store, 1_000, T0_MS, T0_MS + 1)

    assert [len(p) for p in pages] == [1_000] * 10 + [0]
    got = [d for p in pages for d in p]
    assert ids(got) == sorted(m.msg_id for m in msgs)  # every id once, in id order
    assert {d.deliver_at_ms for d in got} == {T0_MS}
    by_id = {m.msg_id: m for m in msgs}
    assert all(decode_message(d.record) == by_id[d.msg_id] for d in got[::997])


async def test_window_pages_by_time_and_id_with_mixed_times(store: DelayStore) -> None:
    """Ties of many sizes among single times, with the range's ends and a time beyond it."""
    times = [T0_MS + t for t in (5, 1, 5, 5, 2, 5, 1, 9, 5, 3, 3, 3, 3, 7, 5, 20, 0, 8, 5, 2)]
    times += [T0_MS + 4] * 7 + [T0_MS + 10] * 4  # T0+10 is past the end
    msgs = await schedule_at(store, *times)
    want = sorted(
        (t, m.msg_id) for t, m in zip(times, msgs, strict=True) if T0_MS + 1 <= t < T0_MS + 10
    )

    for limit in (1, 3, 4, 50):
        pages = await page_through(store, limit, T0_MS + 1, T0_MS + 10)
        got = [(d.deliver_at_ms, d.msg_id) for p in pages for d in p]
        assert got == want, limit
        assert all(len(p) == limit for p in pages[:-1])

    # A cursor in the middle of a tie, and one between times: strictly after it.
    for k in (3, 9, 14):
        at, after = want[k]
        page = await store.window(at, T0_MS + 10, 3, after_msg_id=after)
        assert [(d.deliver_at_ms, d.msg_id) for d in page] == want[k + 1 : k + 4], k


async def test_window_pages_on_after_the_cursor_message_is_gone(store: DelayStore) -> None:
    """The last message of a page may be released, cancelled or moved before the next call:
    the next page still starts right after its (time, id)."""
    times = [T0_MS + t for t in (1, 2, 2, 2, 2, 2, 2, 3, 3)]
    msgs = await schedule_at(store, *times)
    want = sorted((t, m.msg_id) for t, m in zip(times, msgs, strict=True))

    first = await store.window(T0_MS, FAR_MS, 3)
    assert [(d.deliver_at_ms, d.msg_id) for d in first] == want[:3]
    await store.cancel(first[-1].msg_id, T0_MS)
    second = await store.window(T0_MS + 2, FAR_MS, 3, after_msg_id=first[-1].msg_id)
    assert [(d.deliver_at_ms, d.msg_id) for d in second] == want[3:6]
    await store.mark_delivered([second[-1].msg_id], T0_MS)
    await store.reschedule(want[7][1], T0_MS)  # moved before the cursor: not seen again
    third = await store.window(T0_MS + 2, FAR_MS, 3, after_msg_id=second[-1].msg_id)
    assert [(d.deliver_at_ms, d.msg_id) for d in third] == [want[6], want[8]]


async def test_window_is_exact_when_ids_crowd_one_shard(store: DelayStore) -> None:
    """Ids that all hash to one Redis shard (crc32 % 16 == 0, so also % 4 and % 8) hold the
    earliest times: a store that reads only a share of ``limit`` from each shard must notice
    that it has not seen enough and read on."""
    crowded: list[Message] = []
    while len(crowded) < 150:
        m = message()
        if zlib.crc32(m.msg_id) % 16 == 0:
            crowded.append(m)
    spread = [message() for _ in range(150)]
    items = [(m, T0_MS + i // 2) for i, m in enumerate(crowded)]
    items += [(m, T0_MS + 50 + i) for i, m in enumerate(spread)]
    await store.schedule(items)
    want = sorted((at, m.msg_id) for m, at in items)

    for from_ms in (T0_MS, T0_MS + 60):
        expected = [(at, i) for at, i in want if at >= from_ms]
        for limit in (1, 7, 30, 100, 160, 299, 400):
            got = await store.window(from_ms, FAR_MS, limit)
            assert [(d.deliver_at_ms, d.msg_id) for d in got] == expected[:limit], (from_ms, limit)


async def test_record_round_trips(store: DelayStore) -> None:
    m = message(
        "orders",
        bytes(range(256)) * 3,
        tags="vip",
        keys=("order-1", "user-ü"),
        properties={"REAL_TOPIC": "orders", "note": "a|b\x00c"},
        flags=1,
        queue_id=3,
        born_at=T0_MS - 5,
        reconsume_count=2,
    )
    await store.schedule([(m, T0_MS)])

    (due,) = await all_due(store)

    assert due == Due(m.msg_id, T0_MS, encode_message(m))
    assert decode_message(due.record) == m


async def test_due_is_one_scheduled_message_with_its_record(store: DelayStore) -> None:
    m = message("payments", b"pay \x00\xff", tags="vip", properties={"k": "v|w"}, queue_id=2)
    other = message()
    await store.schedule([(m, T0_MS + 5), (other, T0_MS + 6)])

    due = await store.due(m.msg_id)

    assert due == Due(m.msg_id, T0_MS + 5, encode_message(m))
    assert decode_message(due.record) == m
    await store.reschedule(m.msg_id, T0_MS + 99)
    assert await store.due(m.msg_id) == Due(m.msg_id, T0_MS + 99, encode_message(m))
    assert await store.due(_ids.next()) is None


async def test_due_is_none_once_finished(store: DelayStore) -> None:
    delivered, cancelled, waiting = await schedule_at(store, T0_MS, T0_MS + 1, T0_MS + 2)
    await store.mark_delivered([delivered.msg_id], T0_MS + 3)
    await store.cancel(cancelled.msg_id, T0_MS + 3)

    assert await store.due(delivered.msg_id) is None
    assert await store.due(cancelled.msg_id) is None
    due = await store.due(waiting.msg_id)
    assert due is not None and decode_message(due.record) == waiting
    await store.purge(T0_MS + 4)
    assert await store.due(delivered.msg_id) is None


async def test_bodies_with_every_byte_value(store: DelayStore) -> None:
    bodies = [bytes([b]) * 7 for b in range(256)] + [b"", bytes(range(256))[::-1]]
    msgs = [message(body=body) for body in bodies]
    await store.schedule([(m, T0_MS + i) for i, m in enumerate(msgs)])

    got = await all_due(store)

    assert [decode_message(d.record).body for d in got] == bodies


# -- state changes -------------------------------------------------------------------------------


async def test_mark_delivered(store: DelayStore) -> None:
    a, b, c = await schedule_at(store, T0_MS, T0_MS + 1, T0_MS + 2)

    await store.mark_delivered([a.msg_id, b.msg_id, _ids.next()], T0_MS + 3)
    await store.mark_delivered([a.msg_id], T0_MS + 50)  # a retried release changes nothing

    assert await store.get(a.msg_id) == DelayedInfo(a.msg_id, "orders", T0_MS, DelayState.DELIVERED)
    assert ids(await all_due(store)) == [c.msg_id]
    assert await store.pending() == 1
    # Delivered at T0+3, not at the retry's T0+50: purging up to T0+4 forgets it.
    assert await store.purge(T0_MS + 4) == 2
    assert await store.get(a.msg_id) is None


async def test_mark_delivered_leaves_cancelled_cancelled(store: DelayStore) -> None:
    (m,) = await schedule_at(store, T0_MS)
    await store.cancel(m.msg_id, T0_MS)

    await store.mark_delivered([m.msg_id], T0_MS + 1)

    info = await store.get(m.msg_id)
    assert info is not None and info.state is DelayState.CANCELLED


async def test_cancel(store: DelayStore) -> None:
    a, b = await schedule_at(store, T0_MS, T0_MS + 1)

    cancelled = DelayedInfo(a.msg_id, "orders", T0_MS, DelayState.CANCELLED)
    assert await store.cancel(a.msg_id, T0_MS - 100) == cancelled
    assert await store.cancel(a.msg_id, T0_MS - 50) == cancelled  # idempotent
    assert await store.get(a.msg_id) == cancelled
    assert ids(await all_due(store)) == [b.msg_id]
    assert await store.pending() == 1
    assert await store.cancel(_ids.next(), T0_MS) is None


async def test_cancel_after_delivery_answers_delivered(store: DelayStore) -> None:
    (m,) = await schedule_at(store, T0_MS)
    await store.mark_delivered([m.msg_id], T0_MS + 2)

    delivered = DelayedInfo(m.msg_id, "orders", T0_MS, DelayState.DELIVERED)
    assert await store.cancel(m.msg_id, T0_MS + 3) == delivered
    assert await store.get(m.msg_id) == delivered


async def test_reschedule_moves_it_in_the_window(store: DelayStore) -> None:
    a, b, c = await schedule_at(store, T0_MS + 10, T0_MS + 20, T0_MS + 30)

    info = await store.reschedule(c.msg_id, T0_MS + 5)

    assert info == DelayedInfo(c.msg_id, "orders", T0_MS + 5, DelayState.SCHEDULED)
    assert await store.get(c.msg_id) == info
    got = await all_due(store)
    assert [(d.msg_id, d.deliver_at_ms) for d in got] == [
        (c.msg_id, T0_MS + 5),
        (a.msg_id, T0_MS + 10),
        (b.msg_id, T0_MS + 20),
    ]
    assert decode_message(got[0].record) == c
    assert ids(await store.window(T0_MS + 30, FAR_MS, 10)) == []
    assert await store.reschedule(a.msg_id, T0_MS + 40) is not None
    assert ids(await all_due(store)) == [c.msg_id, b.msg_id, a.msg_id]
    assert await store.pending() == 3


async def test_reschedule_is_refused_once_finished(store: DelayStore) -> None:
    delivered, cancelled = await schedule_at(store, T0_MS, T0_MS + 1)
    await store.mark_delivered([delivered.msg_id], T0_MS)
    await store.cancel(cancelled.msg_id, T0_MS)

    for m, at, state in ((delivered, T0_MS, "delivered"), (cancelled, T0_MS + 1, "cancelled")):
        info = DelayedInfo(m.msg_id, "orders", at, DelayState(state))
        assert await store.reschedule(m.msg_id, T0_MS + 1_000) == info
        assert await store.get(m.msg_id) == info
    assert await all_due(store) == []
    assert await store.reschedule(_ids.next(), T0_MS) is None


async def test_pending_counts_only_scheduled(store: DelayStore) -> None:
    msgs = await schedule_at(store, *(T0_MS + i for i in range(10)))
    assert await store.pending() == 10

    await store.mark_delivered([m.msg_id for m in msgs[:3]], T0_MS)
    await store.cancel(msgs[3].msg_id, T0_MS)
    await store.reschedule(msgs[4].msg_id, T0_MS + 100)
    await store.schedule([(msgs[5], T0_MS)])  # known: no change

    assert await store.pending() == 6


async def test_count_due_counts_scheduled_ones_before_each_bound(store: DelayStore) -> None:
    msgs = await schedule_at(store, T0_MS, T0_MS + 10, T0_MS + 10, T0_MS + 500, FAR_MS - 1)
    await store.cancel(msgs[1].msg_id, T0_MS)
    await store.mark_delivered([msgs[0].msg_id], T0_MS)
    await store.reschedule(msgs[4].msg_id, T0_MS + 499)

    bounds = [T0_MS, T0_MS + 10, T0_MS + 11, T0_MS + 500, T0_MS + 501, FAR_MS]
    assert await store.count_due(bounds) == [0, 0, 1, 2, 3, 3]
    assert await store.count_due([T0_MS + 501, T0_MS + 11, T0_MS + 11]) == [3, 1, 1]
    assert await store.count_due([]) == []


async def test_pending_under_concurrent_calls(store: DelayStore) -> None:
    """The service schedules and releases from many coroutines at once."""
    batches = [[message() for _ in range(20)] for _ in range(10)]

    await asyncio.gather(*(store.schedule([(m, T0_MS) for m in b]) for b in batches))
    assert await store.pending() == 200
    await asyncio.gather(
        *(store.mark_delivered([m.msg_id for m in b], T0_MS) for b in batches[:5]),
        *(store.cancel(b[0].msg_id, T0_MS) for b in batches[5:]),
    )

    assert await store.pending() == 200 - 5 * 20 - 5
    assert len(await all_due(store)) == 200 - 5 * 20 - 5


async def test_purge_forgets_finished_before_the_time(store: DelayStore) -> None:
    early, late, cancelled, waiting = await schedule_at(store, T0_MS, T0_MS, T0_MS, T0_MS)
    await store.mark_delivered([early.msg_id], T0_MS + 10)
    await store.mark_delivered([late.msg_id], T0_MS + 20)
    await store.cancel(cancelled.msg_id, T0_MS + 5)

    assert await store.purge(T0_MS + 10) == 1  # finished strictly before: the cancelled one
    assert await store.get(cancelled.msg_id) is None
    assert await store.get(early.msg_id) is not None
    assert await store.purge(T0_MS + 1_000) == 2
    assert await store.purge(T0_MS + 1_000) == 0

    assert [await store.get(m.msg_id) for m in (early, late)] == [None, None]
    assert await store.get(waiting.msg_id) == DelayedInfo(
        waiting.msg_id, "orders", T0_MS, DelayState.SCHEDULED
    )
    assert ids(await all_due(store)) == [waiting.msg_id]
    # Forgotten means forgotten: the id may be scheduled again.
    assert await store.schedule([(early, T0_MS + 1)]) == [True]


# -- scale and durability ------------------------------------------------------------------------


async def test_large_batch_across_shards(store: DelayStore) -> None:
    n = 5_000
    msgs = [message(body=b"%d" % i) for i in range(n)]
    times = [T0_MS + (i * 7919) % 1_000 for i in range(n)]  # scattered, with repeats

    assert await store.schedule(list(zip(msgs, times, strict=True))) == [True] * n
    assert await store.schedule([(m, T0_MS) for m in msgs[::2]]) == [False] * (n // 2)

    assert await store.pending() == n
    got = await all_due(store)
    assert [(d.deliver_at_ms, d.msg_id) for d in got] == sorted(
        zip(times, (m.msg_id for m in msgs), strict=True)
    )
    first = await store.window(T0_MS, FAR_MS, 100)
    assert first == got[:100]
    await store.mark_delivered([m.msg_id for m in msgs[1::2]], T0_MS + 2_000)
    assert await store.pending() == n - n // 2
    assert await store.purge(T0_MS + 2_001) == n // 2


async def test_reopen_keeps_everything(backend: Backend, store: DelayStore) -> None:
    waiting, delivered, cancelled, moved = await schedule_at(
        store, T0_MS, T0_MS + 1, T0_MS + 2, T0_MS + 3
    )
    await store.mark_delivered([delivered.msg_id], T0_MS + 10)
    await store.cancel(cancelled.msg_id, T0_MS + 20)
    await store.reschedule(moved.msg_id, T0_MS - 1)
    before = {m.msg_id: await store.get(m.msg_id) for m in (waiting, delivered, cancelled, moved)}
    due_before = await all_due(store)

    store = await backend.reopen(store)

    assert {m: await store.get(m) for m in before} == before
    assert await all_due(store) == due_before
    assert ids(due_before) == [moved.msg_id, waiting.msg_id]
    assert await store.pending() == 2
    assert await store.schedule([(waiting, T0_MS)]) == [False]
    assert await store.purge(T0_MS + 15) == 1  # finish times survived too
    assert await store.get(delivered.msg_id) is None
    assert await store.get(cancelled.msg_id) is not None
