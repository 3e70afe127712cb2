"""RedisDelayStore when its Redis goes away and comes back.

Runs against a throwaway ``redis-server`` started here on a free port (no persistence), so the
test can kill, freeze and restart it. Skipped when the binary is missing, failed under CI=true.
Every wait is bounded: an operation that hangs fails the test through ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker_core.message import Message, MsgIdGenerator
from delayserver.redis_store import OP_TIMEOUT_S, RedisDelayStore
from delayserver.store import DelayState, DelayStoreUnavailable
from tests.integration.redis_process import RedisProcess

pytestmark = pytest.mark.integration

T0_MS = 1_700_000_000_000
FAR_MS = T0_MS + 3600_000
START_WAIT_S = 10.0
#: Longest any call may take against a dead or frozen server: the op timeout plus slack.
NO_HANG_S = OP_TIMEOUT_S + 5.0

_ids = MsgIdGenerator()


@pytest.fixture
async def store(redis_process: RedisProcess) -> AsyncIterator[RedisDelayStore]:
    store = RedisDelayStore(redis_process.url, shards=4)
    await store.open()
    yield store
    await store.close()


def message() -> Message:
    return Message("orders", b"payload", msg_id=_ids.next())


async def assert_unavailable(store: RedisDelayStore) -> None:
    """Every kind of call fails fast with DelayStoreUnavailable; health gives a reason."""
    async with asyncio.timeout(NO_HANG_S):
        with pytest.raises(DelayStoreUnavailable):
            await store.schedule([(message(), T0_MS)])
    async with asyncio.timeout(NO_HANG_S):
        with pytest.raises(DelayStoreUnavailable):
            await store.window(T0_MS, FAR_MS, 100)
    async with asyncio.timeout(NO_HANG_S):
        with pytest.raises(DelayStoreUnavailable):
            await store.cancel(_ids.next(), T0_MS)
    async with asyncio.timeout(NO_HANG_S):
        reason = await store.health()
    assert reason is not None and "redis" in reason


async def assert_works(store: RedisDelayStore) -> None:
    m = message()
    async with asyncio.timeout(NO_HANG_S):
        assert await store.health() is None
        assert await store.schedule([(m, T0_MS)]) == [True]
        assert [d.msg_id for d in await store.window(T0_MS, FAR_MS, 100)] == [m.msg_id]
        info = await store.cancel(m.msg_id, T0_MS)
        assert info is not None and info.state is DelayState.CANCELLED
        await store.mark_delivered([m.msg_id], T0_MS)
        assert await store.pending() == 0


async def test_a_killed_server_fails_calls_fast_and_a_restarted_one_is_used_again(
    redis_process: RedisProcess, store: RedisDelayStore
) -> None:
    await assert_works(store)

    redis_process.kill()
    await assert_unavailable(store)
    await assert_unavailable(store)  # and again: nothing is stuck after the first failure

    # Same port, empty server (no persistence): its script cache is empty too, so the calls
    # also prove that the store reloads its scripts by itself.
    redis_process.start()
    await assert_works(store)


async def test_a_frozen_server_times_out_instead_of_hanging(
    redis_process: RedisProcess, store: RedisDelayStore
) -> None:
    await assert_works(store)

    redis_process.freeze()
    try:
        async with asyncio.timeout(NO_HANG_S):
            reason = await store.health()
        assert reason is not None
        async with asyncio.timeout(NO_HANG_S):
            with pytest.raises(DelayStoreUnavailable):
                await store.schedule([(message(), T0_MS)])
    finally:
        redis_process.thaw()

    await assert_works(store)


async def test_open_fails_cleanly_when_redis_is_down(redis_process: RedisProcess) -> None:
    redis_process.kill()
    store = RedisDelayStore(redis_process.url)
    try:
        async with asyncio.timeout(NO_HANG_S):
            with pytest.raises(DelayStoreUnavailable):
                await store.open()
        redis_process.start()
        async with asyncio.timeout(NO_HANG_S):
            await store.open()  # the same instance opens once Redis is there
        await assert_works(store)
    finally:
        await store.close()


async def test_a_restart_between_calls_goes_unnoticed(
    redis_process: RedisProcess, store: RedisDelayStore
) -> None:
    """The pooled connection died with the old server; the next call replaces it and goes on."""
    await assert_works(store)

    redis_process.kill()
    redis_process.start()

    await assert_works(store)
