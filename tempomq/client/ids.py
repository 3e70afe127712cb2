"""Client-side message ids, laid out like the server's so they sort by time the same way.

128 bits as 32 lowercase hex digits: 48-bit epoch milliseconds, 32 random bits chosen per
process, 48-bit counter. A producer that picks the id before sending can resend after a lost
answer, and the server stores the message once (a resent id returns the first result).
"""

from __future__ import annotations

import os
import threading
import time

_COUNTER_MASK = (1 << 48) - 1


class MsgIdGenerator:
    """Time-ordered ids; strictly increasing within one process, even if the clock steps back."""

    __slots__ = ("_counter", "_last_ms", "_lock", "_node")

    def __init__(self) -> None:
        self._last_ms = 0
        self._node = 0
        self._counter = 0
        self._lock = threading.Lock()
        self.reseed()

    def reseed(self) -> None:
        """New random bits and a new lock (another thread may have held the old one at the
        fork); a forked child calls this so it never repeats its parent's ids."""
        self._lock = threading.Lock()
        self._node = int.from_bytes(os.urandom(4), "big")
        self._counter = int.from_bytes(os.urandom(5), "big")

    def next(self, now_ms: int | None = None) -> str:
        if now_ms is None:
            now_ms = time.time_ns() // 1_000_000
        with self._lock:
            now_ms = max(now_ms, self._last_ms)  # the clock stepped back: keep ids increasing
            self._last_ms = now_ms
            self._counter = (self._counter + 1) & _COUNTER_MASK
            value = (now_ms << 80) | (self._node << 48) | self._counter
        return f"{value:032x}"


_IDS = MsgIdGenerator()
os.register_at_fork(after_in_child=_IDS.reseed)


def new_msg_id() -> str:
    """A fresh message id for :class:`~tempomq.client.OutgoingMessage` ``msg_id``."""
    return _IDS.next()


def msg_id_time_ms(msg_id: str) -> int:
    """When the id was made (epoch ms)."""
    return int(msg_id[:12], 16)
