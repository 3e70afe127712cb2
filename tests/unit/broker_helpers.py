"""Shared fixtures for the broker core unit tests: a manual clock, a real-time clock, an in-memory
scheduler, small configurations and message builders."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.message import Message, MsgIdGenerator
from broker_core.protocols import FirstSend
from broker_core.store import MessageStore

#: A fixed, realistic epoch-ms start for manual clocks (2025-01-01T00:00:00Z).
T0_MS = 1_735_689_600_000


class _Handle:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    """Manual clock implementing ``broker_core.protocols.Timers``.

    ``call_at`` only records the callback; :meth:`advance` moves the clock and runs every callback
    that is due, in time order (callbacks registered while running run too when they are due).
    """

    def __init__(self, start_ms: int = T0_MS) -> None:
        self.now = start_ms
        self._heap: list[tuple[int, int, Callable[[], None], _Handle]] = []
        self._seq = itertools.count()

    def now_ms(self) -> int:
        return self.now

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> _Handle:
        handle = _Handle()
        heapq.heappush(self._heap, (when_ms, next(self._seq), callback, handle))
        return handle

    def pending(self) -> list[int]:
        return sorted(w for w, _, _, h in self._heap if not h.cancelled)

    def advance(self, ms: int) -> int:
        """Move the clock by ``ms`` and run what fell due; returns how many callbacks ran."""
        self.now += ms
        ran = 0
        while self._heap and self._heap[0][0] <= self.now:
            _, _, callback, handle = heapq.heappop(self._heap)
            if not handle.cancelled:
                callback()
                ran += 1
        return ran


class RealTimers:
    """Wall-clock ``Timers`` on the running event loop (for the long-polling tests)."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        delay_s = max(when_ms - self.now_ms(), 0) / 1000
        return loop.call_later(delay_s, callback)


@dataclass
class FakeScheduler:
    """In-memory ``Scheduler``: records what would be delayed; the test releases it."""

    scheduled: list[tuple[Message, int]] = field(default_factory=list)
    ids: MsgIdGenerator = field(default_factory=MsgIdGenerator)

    def new_msg_id(self) -> bytes:
        return self.ids.next()

    #: Time each id was first scheduled for: like the real delay stores, a resend of an id is
    #: stored once and answers its first time.
    first_at: dict[bytes, int] = field(default_factory=dict)

    #: The first message scheduled under each id.
    first_msg: dict[bytes, Message] = field(default_factory=dict)

    async def schedule(
        self, messages: Sequence[Message], deliver_at_ms: Sequence[int]
    ) -> list[int]:
        out = []
        for m, at in zip(messages, deliver_at_ms, strict=True):
            if m.msg_id and m.msg_id in self.first_at:
                m.queue_id = self.first_msg[m.msg_id].queue_id
                out.append(self.first_at[m.msg_id])
                continue
            if m.msg_id:
                self.first_at[m.msg_id] = at
                self.first_msg[m.msg_id] = m
            self.scheduled.append((m, at))
            out.append(at)
        return out

    def may_hold(self, msg_id: bytes) -> bool:
        return msg_id in self.first_msg

    async def held(self, msg_ids: Sequence[bytes]) -> list[FirstSend | None]:
        out: list[FirstSend | None] = []
        for msg_id in msg_ids:
            m = self.first_msg.get(msg_id)
            at = self.first_at.get(msg_id)
            out.append(
                None if m is None or at is None else FirstSend(m.topic, m.queue_id, at, True)
            )
        return out

    async def release(self, store: MessageStore, now_ms: int | None = None) -> int:
        """Put every scheduled message (due by ``now_ms`` if given) into its topic."""
        due = [(m, at) for m, at in self.scheduled if now_ms is None or at <= now_ms]
        self.scheduled = [x for x in self.scheduled if x not in due]
        for m, _ in due:
            await store.put(m, check_duplicate=bool(m.msg_id))
        return len(due)


def small_config(data_dir: Path, **overrides: Any) -> BrokerConfig:
    """Tiny files so segments, ConsumeQueue files and index files roll over in a test."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "segment_bytes": 64 * 1024,
        "cq_entries_per_file": 8,
        "index_slots": 64,
        "index_entries": 32,
        "flush_interval_ms": 60_000,  # the periodic flusher stays out of the tests' way
    }
    values.update(overrides)
    return BrokerConfig(**values)


def msg(
    topic: str,
    body: bytes | str = b"hello",
    *,
    tags: str = "",
    keys: Sequence[str] = (),
    properties: dict[str, str] | None = None,
    msg_id: bytes = b"",
    queue_id: int = -1,
) -> Message:
    if isinstance(body, str):
        body = body.encode()
    return Message(
        topic=topic,
        body=body,
        tags=tags,
        keys=tuple(keys),
        properties=dict(properties or {}),
        msg_id=msg_id,
        queue_id=queue_id,
    )


async def settle(broker: Broker, rounds: int = 5) -> None:
    """Let callbacks and the group manager's background redelivery tasks finish."""
    for _ in range(rounds):
        await asyncio.sleep(0)
        tasks = list(broker.groups._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)


class Hang(AssertionError):
    """Raised by :func:`no_hang` when the code under test did not return in time."""


@contextlib.contextmanager
def no_hang(seconds: float = 5.0) -> Iterator[None]:
    """Turn an endless loop on the main thread into a test failure instead of a stuck suite
    (a guard against hangs, not a speed assertion: the limit is far above the normal time)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"did not finish within {seconds} s (endless loop?)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` every 10 ms until it holds; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
