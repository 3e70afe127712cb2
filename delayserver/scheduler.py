"""Durable scheduling of messages for later delivery, on the broker's own CommitLog.

A scheduled message is stored in the system topic ``SYS_DELAY`` (one queue) with its real topic
and queue in properties, and a timer on the service's timing wheel. When the timer fires the
message is switched back to its real topic and put there with the same ``msg_id``; the put is
idempotent by ``(topic, msg_id)``, so a crash between the put and the bookkeeping never delivers
twice. The bookkeeping is a watermark: the ``SYS_DELAY`` offset below which everything is
released, persisted with the checkpoint. A restart scans from the watermark, skips what the index
shows as released, and sets timers for the rest (overdue ones fire at once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import orjson
import structlog

from broker_core.message import (
    PROP_DELIVER_AT,
    PROP_REAL_QUEUE,
    PROP_REAL_TOPIC,
    PROP_RELEASED_AT,
    Message,
)
from broker_core.protocols import Timers
from broker_core.store import MessageStore, write_json_atomic

log = structlog.get_logger(__name__)

DELAY_TOPIC = "SYS_DELAY"
_STATE_FILE = "delay_state.json"


class DelayScheduler:
    """Implements :class:`broker_core.protocols.Scheduler` on the CommitLog and the wheel."""

    def __init__(self, store: MessageStore, timers: Timers) -> None:
        self.store = store
        self.timers = timers
        #: SYS_DELAY offsets stored and not yet released, and their order (for the watermark).
        self._pending: set[int] = set()
        self._order: deque[int] = deque()
        self._due: list[int] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._path = Path(store.root) / _STATE_FILE
        self._saved_watermark = -1

    @property
    def pending(self) -> int:
        return len(self._pending)

    def watermark(self) -> int:
        order, pending = self._order, self._pending
        while order and order[0] not in pending:
            order.popleft()
        if order:
            return order[0]
        return self.store.queue_bounds(DELAY_TOPIC, 0)[1]

    async def start(self) -> None:
        await self.store.ensure_topic(DELAY_TOPIC, 1)
        start = 0
        if self._path.exists():
            start = int(orjson.loads(self._path.read_bytes()).get("watermark", 0))
        self._recover(start)
        self._tasks = [
            asyncio.create_task(self._releaser(), name="tempomq-delay-releaser"),
            asyncio.create_task(self._persister(), name="tempomq-delay-persister"),
        ]

    def _recover(self, start: int) -> None:
        lo, hi = self.store.queue_bounds(DELAY_TOPIC, 0)
        cq = self.store.consume_queue(DELAY_TOPIC, 0)
        restored = 0
        for offset in range(max(start, lo), hi):
            m = self.store.read(cq.get(offset)[0])
            if m is None:
                continue
            real = m.properties.get(PROP_REAL_TOPIC, "")
            if real in self.store.topics and self.store.find_in_topic(m.msg_id, real) is not None:
                continue  # released before the crash; only the watermark was behind
            self._track(offset, int(m.properties.get(PROP_DELIVER_AT, "0")))
            restored += 1
        log.info("delay.recovered", pending=restored, scanned_from=start)

    def _track(self, offset: int, deliver_at_ms: int) -> None:
        self._pending.add(offset)
        self._order.append(offset)
        self.timers.call_at(deliver_at_ms, partial(self._fire, offset))

    def _fire(self, offset: int) -> None:
        self._due.append(offset)
        self._wake.set()

    async def schedule(self, messages: Sequence[Message], deliver_at_ms: Sequence[int]) -> None:
        """Store ``messages`` durably for release at their times. Assigns ``msg_id`` where a
        message has none (the caller reads it back from the message)."""
        wrapped = []
        for msg, at in zip(messages, deliver_at_ms, strict=True):
            props = dict(msg.properties)
            props[PROP_REAL_TOPIC] = msg.topic
            props[PROP_REAL_QUEUE] = str(msg.queue_id)
            props[PROP_DELIVER_AT] = str(at)
            wrapped.append(
                Message(
                    DELAY_TOPIC,
                    msg.body,
                    msg.tags,
                    msg.keys,
                    props,
                    msg.msg_id,
                    msg.flags,
                    0,
                    msg.born_at,
                    msg.reconsume_count,
                )
            )
        results = await self.store.put_many(
            wrapped, check_duplicate=any(m.msg_id for m in messages)
        )
        for msg, result, at in zip(messages, results, deliver_at_ms, strict=True):
            msg.msg_id = result.msg_id
            if not result.duplicate:
                self._track(result.queue_offset, at)

    async def _releaser(self) -> None:
        """Releases due messages in batches: one put for everything that fell due together."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            due, self._due = self._due, []
            if not due:
                continue
            try:
                await self._release(due)
            except Exception as e:  # store unavailable: try again shortly, nothing is lost
                log.error("delay.release_failed", error=str(e), count=len(due))
                self._due.extend(due)
                await asyncio.sleep(0.5)
                self._wake.set()

    async def _release(self, due: list[int]) -> None:
        cq = self.store.consume_queue(DELAY_TOPIC, 0)
        now = self.timers.now_ms()
        out = []
        for offset in due:
            m = self.store.read(cq.get(offset)[0])
            if m is None:
                continue
            props = dict(m.properties)
            topic = props.pop(PROP_REAL_TOPIC)
            queue_id = int(props.pop(PROP_REAL_QUEUE, "-1"))
            props[PROP_RELEASED_AT] = str(now)
            await self.store.ensure_topic(topic, 1)
            out.append(
                Message(
                    topic,
                    m.body,
                    m.tags,
                    m.keys,
                    props,
                    m.msg_id,
                    m.flags,
                    queue_id,
                    m.born_at,
                    m.reconsume_count,
                )
            )
        await self.store.put_many(out, check_duplicate=True)
        self._pending.difference_update(due)

    def snapshot(self) -> int | None:
        """The watermark to persist, or None when unchanged."""
        mark = self.watermark()
        if mark == self._saved_watermark:
            return None
        self._saved_watermark = mark
        return mark

    def save(self, watermark: int) -> None:
        write_json_atomic(self._path, {"watermark": watermark})

    async def _persister(self, interval_s: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            mark = self.snapshot()
            if mark is not None:
                await loop.run_in_executor(None, self.save, mark)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        mark = self.snapshot()
        if mark is not None:
            self.save(mark)
