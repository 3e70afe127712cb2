"""IdClaims: one send per message id at a time; a send claims all its ids or waits holding none,
so two sends never wait for each other; a waiter cancelled leaves the others waiting."""

from __future__ import annotations

import asyncio

from broker_core.claims import IdClaims


async def test_an_id_claimed_makes_the_next_claim_wait_until_released() -> None:
    claims = IdClaims()
    assert claims.take({b"a", b"b"})
    assert not claims.take({b"b", b"c"})
    assert b"c" not in claims  # all or nothing
    waiter = asyncio.create_task(claims.acquire({b"b", b"c"}))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    claims.release({b"a", b"b"})
    await asyncio.wait_for(waiter, 1)
    assert b"c" in claims and b"a" not in claims


async def test_crossed_claims_never_wait_for_each_other() -> None:
    claims = IdClaims()
    assert claims.take({b"x"})
    first = asyncio.create_task(claims.acquire({b"x", b"y"}))
    second = asyncio.create_task(claims.acquire({b"y", b"x"}))
    await asyncio.sleep(0.01)
    assert b"y" not in claims  # both wait for x, holding nothing
    claims.release({b"x"})
    done, _ = await asyncio.wait({first, second}, timeout=1, return_when=asyncio.FIRST_COMPLETED)
    winner = done.pop()
    other = second if winner is first else first
    claims.release({b"x", b"y"})
    await asyncio.wait_for(other, 1)


async def test_a_waiter_cancelled_does_not_end_the_wait_of_the_others() -> None:
    claims = IdClaims()
    assert claims.take({b"a"})
    gone = asyncio.create_task(claims.acquire({b"a"}))
    stays = asyncio.create_task(claims.acquire({b"a"}))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    assert not stays.done()
    claims.release({b"a"})
    await asyncio.wait_for(stays, 1)
    assert b"a" in claims
