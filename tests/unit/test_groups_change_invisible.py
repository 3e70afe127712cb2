"""ChangeInvisibleDuration in the consumer groups, with RocketMQ's meaning: the delivery stays out
under a new receipt, the old receipt stops working, and the message comes again (attempt + 1,
without a backoff) only if the new deadline passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_core.errors import GroupNotFound, ReceiptExpired
from tests.unit import test_groups
from tests.unit.test_groups import INVISIBLE_MS, Env, S
from tests.unit.test_groups_durable import CrashableEnv

# The fixtures of the consumer group tests: a broker with topic "orders" on a manual clock.
env = test_groups.env
_no_hang = test_groups._no_hang


async def change(env: Env, receipt: str, invisible_ms: int, group: str = "g") -> str:
    return await env.b.change_invisible("orders", group, receipt, invisible_ms)


async def test_new_receipt_acks_and_old_one_is_invalid(env: Env) -> None:
    await env.send("orders", "a")
    [d] = await env.recv()
    new = await change(env, d.receipt, 60 * S)
    assert new != d.receipt
    with pytest.raises(ReceiptExpired):
        await env.ack(d)
    assert await env.b.ack("orders", "g", [new]) == 1
    await env.advance(3600 * S)
    assert env.scheduler.scheduled == []
    assert await env.recv() == []


async def test_extension_outlives_the_first_deadline(env: Env) -> None:
    await env.send("orders", "a")
    [d] = await env.recv(invisible_ms=5 * S)
    new = await change(env, d.receipt, 60 * S)
    await env.advance(59 * S)  # well past the first 5 s
    assert env.scheduler.scheduled == []
    assert await env.recv() == []
    stats = await env.b.group_stats("orders", "g")
    assert stats["inflight"] == 1
    assert await env.b.ack("orders", "g", [new]) == 1


async def test_redelivered_with_next_attempt_when_the_new_deadline_passes(env: Env) -> None:
    [sent] = await env.send("orders", "a")
    [d] = await env.recv(invisible_ms=INVISIBLE_MS)
    new = await change(env, d.receipt, 2 * S)
    await env.advance(2 * S - 1)
    assert await env.recv() == []
    await env.advance(1)
    # Due at once: the client chose the wait, no backoff on top of it.
    assert env.scheduler.scheduled == []
    [again] = await env.recv()
    assert (again.message.origin_msg_id, again.attempt) == (sent.hex(), 2)
    with pytest.raises(ReceiptExpired):
        await env.b.ack("orders", "g", [new])
    await env.ack(again)
    # The first receive's own timer (30 s) finds nothing of its delivery left to fail.
    await env.advance(INVISIBLE_MS)
    assert env.scheduler.scheduled == []


async def test_zero_duration_makes_it_visible_again_at_once(env: Env) -> None:
    await env.send("orders", "a")
    [d] = await env.recv()
    await change(env, d.receipt, 0)
    await env.advance(0)
    [again] = await env.recv()
    assert again.attempt == 2


async def test_changed_twice_only_the_last_receipt_and_deadline_count(env: Env) -> None:
    await env.send("orders", "a")
    [d] = await env.recv()
    r1 = await change(env, d.receipt, 5 * S)
    r2 = await change(env, r1, 20 * S)
    with pytest.raises(ReceiptExpired):
        await change(env, r1, 5 * S)
    await env.advance(10 * S)  # r1's deadline: no longer in force
    assert await env.recv() == []
    await env.advance(10 * S)
    [again] = await env.recv()
    assert again.attempt == 2
    with pytest.raises(ReceiptExpired):
        await env.b.ack("orders", "g", [r2])


async def test_stale_receipts_and_unknown_groups(env: Env) -> None:
    await env.send("orders", "a")
    [d] = await env.recv()
    await env.ack(d)
    with pytest.raises(ReceiptExpired):
        await change(env, d.receipt, S)
    with pytest.raises(ReceiptExpired):
        await change(env, "not-a-receipt", S)
    with pytest.raises(GroupNotFound):
        await change(env, d.receipt, S, group="nobody")


async def test_fifo_change_then_expiry_resends_in_place(env: Env) -> None:
    await env.b.create_group("f", fifo=True, max_attempts=3)
    await env.send("orders", "m0", "m1")
    [d] = await env.recv(group="f")
    await change(env, d.receipt, 3 * S, group="f")
    await env.advance(3 * S)
    [again] = await env.recv(group="f")
    assert (again.message.body, again.attempt) == (b"m0", 2)
    await env.ack(again, group="f")
    [nxt] = await env.recv(group="f")
    assert nxt.message.body == b"m1"


async def test_the_new_deadline_survives_a_crash(tmp_path: Path) -> None:
    crashable = CrashableEnv(tmp_path / "data")
    await crashable.start()
    try:
        await crashable.b.create_topic("orders", 1)
        [sent] = await crashable.send("orders", "a")
        [d] = await crashable.recv(invisible_ms=5 * S)
        await change(crashable, d.receipt, 60 * S)
        await crashable.crash()
        await crashable.advance(30 * S)  # well past the first 5 s: still out
        await crashable.release()
        assert await crashable.recv() == []
        await crashable.advance(30 * S)  # the new deadline: redelivered, one attempt further
        await crashable.advance(3600 * S)  # (after a restart it waits out the backoff)
        await crashable.release()
        [again] = await crashable.recv()
        assert (again.message.origin_msg_id, again.attempt) == (sent.hex(), 2)
    finally:
        await crashable.stop()
