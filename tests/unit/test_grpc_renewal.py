"""Receipt renewal for push consumers on a manual clock: a held delivery stays out slice after
slice until acked with the receipt the client was first given; renewal ends when the client
goes away or after the longest hold, and the message then comes again like any expired one."""

from __future__ import annotations

import asyncio

import pytest

from broker_core.errors import ReceiptExpired
from tempomq.grpc.renewal import ReceiptRenewer
from tests.unit import test_groups
from tests.unit.broker_helpers import settle
from tests.unit.test_groups import Env, S

env = test_groups.env
_no_hang = test_groups._no_hang

SLICE_MS = 30 * S


async def advance(env: Env, renewer: ReceiptRenewer, ms: int) -> None:
    """Move the clock in steps; each renewal that fell due (a task whose record is written
    by the store's writer thread) finishes before the clock moves on."""
    for _ in range(ms // S):
        env.timers.advance(S)
        await asyncio.sleep(0)
        while renewer._tasks:
            await asyncio.gather(*renewer._tasks, return_exceptions=True)
        await settle(env.b)


async def held(env: Env, renewer: ReceiptRenewer, client: str = "c1") -> str:
    await env.send("orders", "work")
    [d] = await env.recv(invisible_ms=SLICE_MS)
    renewer.hold(client, "orders", "g", d.receipt, env.timers.now_ms() + SLICE_MS)
    return d.receipt


async def test_a_held_delivery_stays_out_until_acked_with_its_first_receipt(env: Env) -> None:
    renewer = ReceiptRenewer(env.b, slice_ms=SLICE_MS)
    first = await held(env, renewer)
    await advance(env, renewer, 5 * SLICE_MS)  # five slices: renewed four or five times
    assert await env.recv() == []
    with pytest.raises(ReceiptExpired):  # the group moved on to a newer receipt
        await env.b.ack("orders", "g", [first])
    assert await env.b.ack("orders", "g", [renewer.release(first)]) == 1
    assert len(renewer) == 0
    await advance(env, renewer, 2 * SLICE_MS)
    assert await env.recv() == []


async def test_a_client_that_goes_away_lets_its_messages_expire(env: Env) -> None:
    renewer = ReceiptRenewer(env.b, slice_ms=SLICE_MS)
    await held(env, renewer, client="gone")
    await held(env, renewer, client="stays")
    await advance(env, renewer, 2 * SLICE_MS)
    renewer.drop_client("gone")
    await advance(env, renewer, SLICE_MS)
    [again] = await env.recv()
    assert (again.message.body, again.attempt) == (b"work", 2)
    assert len(renewer) == 1


async def test_renewal_ends_after_the_longest_hold(env: Env) -> None:
    renewer = ReceiptRenewer(env.b, slice_ms=SLICE_MS, max_hold_ms=3 * SLICE_MS)
    await held(env, renewer)
    await advance(env, renewer, 3 * SLICE_MS)
    assert await env.recv() == []
    await advance(env, renewer, 2 * SLICE_MS)
    [again] = await env.recv()
    assert again.attempt == 2
    assert len(renewer) == 0


async def test_stop_cancels_every_renewal(env: Env) -> None:
    renewer = ReceiptRenewer(env.b, slice_ms=SLICE_MS)
    await held(env, renewer)
    await renewer.stop()
    assert len(renewer) == 0
    await advance(env, renewer, SLICE_MS)
    # Never renewed: it expired at its first deadline, so a retry waits out the backoff.
    assert len(env.scheduler.scheduled) == 1
