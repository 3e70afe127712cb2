"""IdClaims: the message ids that sends are storing right now, each held by one send at a time.

A send first finds out whether its ids are known (stored in a topic, or held by the delay
server), then stores the messages that are new; both steps may wait (for a read, for a commit).
Two sends carrying the same id, one plain and one delayed say, must not both find it new and
both store it. So a send claims its ids before it looks and keeps them until what it stored is
acknowledged; a send that finds one of its ids claimed waits until that claim ends and looks
again: it then finds the id stored, or new again when the other send failed.

A claim costs a dict insert and delete per id; waiting happens only when the same id is being
sent concurrently. A send claims all its ids at once or none (it waits holding nothing), so two
sends can never wait for each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable


class IdClaims:
    def __init__(self) -> None:
        #: Claimed ids, each with the future that ends its claim (made when someone waits).
        self._held: dict[bytes, asyncio.Future[None] | None] = {}

    def __contains__(self, msg_id: bytes) -> bool:
        return msg_id in self._held

    def take(self, msg_ids: Collection[bytes]) -> bool:
        """Claim every id of ``msg_ids`` (distinct) if none of them is claimed; False (and
        nothing claimed) otherwise: :meth:`acquire` waits."""
        held = self._held
        if held and not held.keys().isdisjoint(msg_ids):
            return False
        for msg_id in msg_ids:
            held[msg_id] = None
        return True

    async def acquire(self, msg_ids: Collection[bytes]) -> None:
        """Claim every id of ``msg_ids`` (distinct), waiting while any of them is claimed.
        Cancelled while waiting, it holds none of them."""
        held = self._held
        while not self.take(msg_ids):
            busy = next(msg_id for msg_id in msg_ids if msg_id in held)
            ended = held[busy]
            if ended is None:
                ended = held[busy] = asyncio.get_running_loop().create_future()
            # asyncio.wait, not await: a waiter cancelled must not cancel the shared future.
            await asyncio.wait((ended,))

    def release(self, msg_ids: Iterable[bytes]) -> None:
        """End the claims on ``msg_ids`` (those :meth:`acquire` took); waiters look again."""
        held = self._held
        for msg_id in msg_ids:
            ended = held.pop(msg_id, None)
            if ended is not None:
                ended.set_result(None)
