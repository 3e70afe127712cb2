"""What the Redis delay store adds to the DelayStore contract (test_delay_store_contract.py), on
fakeredis: its id filter answers a plain send's "is this id held?" for new ids without a round
trip to Redis, and a cancelled message's stub (kept for a resend's answer) is never handed out
as a message to release."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest

from broker_core.message import Message, MsgIdGenerator
from delayserver.id_filter import IdFilter
from delayserver.redis_store import RedisDelayStore
from delayserver.store import DelayState

T0_MS = 1_700_000_000_000
_ids = MsgIdGenerator()


def _msg(queue_id: int = 1) -> Message:
    return Message("orders", b"x" * 100, msg_id=_ids.next(), queue_id=queue_id)


@pytest.fixture
async def server() -> AsyncIterator[fakeredis.FakeServer]:
    yield fakeredis.FakeServer()


async def _open(server: fakeredis.FakeServer) -> RedisDelayStore:
    store = RedisDelayStore(
        "redis://fake", shards=4, client=fakeredis.aioredis.FakeRedis(server=server)
    )
    await store.open()
    return store


async def _loaded(store: RedisDelayStore) -> IdFilter:
    for _ in range(500):
        held = store._ids.filter
        if held is not None and not store._ids.loading:
            return held
        await asyncio.sleep(0.01)
    raise AssertionError("the id filter did not load")


def _round_trips(store: RedisDelayStore) -> list[str]:
    """The scripts the store runs from now on."""
    calls: list[str] = []
    run = store._run_per_shard

    async def counted(name: str, *args: Any, **kw: Any) -> list[Any]:
        calls.append(name)
        return await run(name, *args, **kw)

    store._run_per_shard = counted  # type: ignore[method-assign]
    return calls


async def test_new_ids_cost_no_round_trip_once_loaded_and_held_ones_are_told(
    server: fakeredis.FakeServer,
) -> None:
    store = await _open(server)
    old = [_msg(queue_id=i % 4) for i in range(30)]
    assert await store.schedule([(m, T0_MS) for m in old]) == [True] * 30
    await store.cancel(old[0].msg_id, T0_MS)
    await store.close()

    store = await _open(server)  # a restart: the filter is loaded from Redis (HSCAN)
    try:
        held = await _loaded(store)
        assert all(m.msg_id in held for m in old)
        calls = _round_trips(store)
        assert await store.find([_ids.next() for _ in range(50)]) == [None] * 50
        assert calls == []
        fresh = _msg(queue_id=3)
        assert await store.schedule([(fresh, T0_MS + 5)]) == [True]
        found = await store.find([old[0].msg_id, old[7].msg_id, fresh.msg_id])
        assert [(i.state, i.queue_id) for i in found if i is not None] == [
            (DelayState.CANCELLED, 0),
            (DelayState.SCHEDULED, 3),
            (DelayState.SCHEDULED, 3),
        ]
        assert calls == ["schedule", "find"]
    finally:
        await store.close()


async def test_ids_scheduled_while_the_filter_loads_are_in_it(
    server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("delayserver.redis_store.SCAN_PAGE", 10)
    monkeypatch.setattr("delayserver.id_filter.LOAD_SLICE", 3)
    store = await _open(server)
    table = [_msg() for _ in range(400)]
    assert await store.schedule([(m, T0_MS) for m in table]) == [True] * 400
    await store.close()

    store = await _open(server)
    try:
        during = []
        while store._ids.filter is None:
            m = _msg()
            during.append(m)
            assert await store.schedule([(m, T0_MS + 1)]) == [True]
            # Meanwhile every id is asked of Redis: a resend is told.
            (info,) = await store.find([table[len(during)].msg_id])
            assert info is not None
        assert len(during) > 3, "the load did not take several turns: nothing raced it"
        held = await _loaded(store)
        assert all(m.msg_id in held for m in table + during)
    finally:
        await store.close()


async def test_a_message_cancelled_between_the_window_reads_is_not_handed_out(
    server: fakeredis.FakeServer,
) -> None:
    store = await _open(server)
    try:
        doomed, kept = _msg(), _msg()
        await store.schedule([(doomed, T0_MS), (kept, T0_MS + 1)])
        earliest = store._earliest

        async def then_cancelled(*args: Any) -> list[tuple[bytes, int]]:
            chosen = await earliest(*args)
            await store.cancel(doomed.msg_id, T0_MS)  # its record is cut to a stub now
            return chosen

        store._earliest = then_cancelled  # type: ignore[method-assign]
        window = await store.window(0, T0_MS + 10, 10)
        assert [d.msg_id for d in window] == [kept.msg_id]
    finally:
        await store.close()
