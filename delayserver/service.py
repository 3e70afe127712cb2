"""The delay service: stores delayed messages and releases each into its topic on time.

Data flow. ``schedule`` writes messages to the :class:`DelayStore` (durable before it returns) and,
when due inside the current window, also puts them in the timing wheel. A loader keeps the wheel
filled ``window_ms`` ahead: when the horizon comes within half a window of now, it reads the next
quarter window from the store, in small pages. So the wheel, and memory, hold only what falls due
soon, however many messages are pending. When a bucket of the wheel expires, its messages are
released as one batch: switched back to their real topic with ``DELIVER_AT`` and ``RELEASED_AT``
properties, put into the broker core idempotently by ``(topic, msg_id)``, then marked delivered in
the store. A crash between the put and the mark re-releases after restart, and the idempotent put
drops the copy: a message is never in its topic twice.

Restart: the window loads from time 0, so whatever fell due while the server was down is released
right after start, and nothing before its time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

import structlog
from prometheus_client import Counter, Gauge, Histogram

from broker_core.errors import StoreUnavailable
from broker_core.message import PROP_DELIVER_AT, PROP_RELEASED_AT, Message
from broker_core.store import MessageStore
from broker_core.tasks import cancel_and_wait
from delayserver.store import (
    DelayedInfo,
    DelayState,
    DelayStore,
    DelayStoreUnavailable,
    Due,
    decode_message,
    encode_message,
)
from delayserver.wheel import TimerEntry

log = structlog.get_logger(__name__)

RELEASED = Counter("tempomq_delayed_released", "Delayed messages released into their topics")
SCHEDULED = Counter("tempomq_delayed_scheduled", "Messages stored for later delivery")
PENDING = Gauge("tempomq_delayed_pending", "Delayed messages waiting for their time")
LATENESS = Histogram(
    "tempomq_delayed_lateness_seconds",
    "Release time minus delivery time of released messages",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)


#: Timers armed per turn of the event loop while a window loads: a page of ten thousand armed in
#: one go would hold the loop for tens of milliseconds and make what is due meanwhile late.
_ARM_CHUNK = 1000


class DelayUnavailable(StoreUnavailable):
    """The delay store cannot be reached: nothing was scheduled, changed or lost."""

    code = "delay_store_unavailable"


class WheelTimers(Protocol):
    def now_ms(self) -> int: ...

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> TimerEntry: ...


class DelayService:
    """Implements the broker core's ``Scheduler`` protocol and the delayed-message API."""

    def __init__(
        self,
        store: DelayStore,
        broker_store: MessageStore,
        timers: WheelTimers,
        *,
        window_ms: int = 60_000,
        window_limit: int = 2_000,
        history_ms: int = 72 * 3600_000,
    ) -> None:
        self.store = store
        self.broker_store = broker_store
        self.timers = timers
        self.window_ms = window_ms
        self.window_limit = window_limit
        self.history_ms = history_ms
        #: Everything due before this is in the wheel (or being released).
        self._horizon_ms = 0
        #: The horizon a load in flight will reach; schedules before it go to the wheel too.
        self._loading_to_ms = 0
        #: In-window messages: their timer and what to release (to re-arm if a cancel fails).
        self._entries: dict[bytes, tuple[TimerEntry, Due]] = {}
        self._releasing: set[bytes] = set()
        self._due: list[Due] = []
        self._wake_releaser = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: A message can already be in its topic only if an earlier run released it (and died
        #: before marking it delivered): its time is then before this run started.
        self._started_at_ms = 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        self._started_at_ms = self.timers.now_ms()
        await self._load(0, self._started_at_ms + self.window_ms)
        self._tasks = [
            asyncio.create_task(self._releaser(), name="tempomq-delay-releaser"),
            asyncio.create_task(self._loader(), name="tempomq-delay-loader"),
            asyncio.create_task(self._housekeeper(), name="tempomq-delay-housekeeper"),
        ]
        log.info("delay.started", in_window=len(self._entries), pending=await self.store.pending())

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        for entry, _due in self._entries.values():
            entry.cancel()
        self._entries.clear()
        await self.store.close()

    async def health(self) -> str | None:
        return await self.store.health()

    # -- the window --------------------------------------------------------------------------------

    async def _load(self, from_ms: int, to_ms: int) -> None:
        """Put everything scheduled in ``[from_ms, to_ms)`` into the wheel, page by page."""
        self._loading_to_ms = to_ms
        after = b""
        while True:
            page = await self.store.window(from_ms, to_ms, self.window_limit, after_msg_id=after)
            for i in range(0, len(page), _ARM_CHUNK):
                for due in page[i : i + _ARM_CHUNK]:
                    self._arm(due)
                await asyncio.sleep(0)  # let due releases run between chunks
            if len(page) < self.window_limit:
                break
            from_ms, after = page[-1].deliver_at_ms, page[-1].msg_id  # the next page follows it
        self._horizon_ms = to_ms

    def _arm(self, due: Due) -> None:
        if due.msg_id in self._entries or due.msg_id in self._releasing:
            return
        entry = self.timers.call_at(due.deliver_at_ms, partial(self._fire, due))
        self._entries[due.msg_id] = (entry, due)

    def _fire(self, due: Due) -> None:
        if self._entries.pop(due.msg_id, None) is None:
            return
        self._releasing.add(due.msg_id)
        self._due.append(due)
        self._wake_releaser.set()

    async def _loader(self) -> None:
        while True:
            wait_s = (self._horizon_ms - self.window_ms // 2 - self.timers.now_ms()) / 1000
            if wait_s > 0:
                await asyncio.sleep(wait_s)
                continue
            try:
                # A quarter window at a time, as soon as the horizon is within half a window:
                # the reads come often and small rather than rarely and large, so no single
                # load competes with due releases for long.
                await self._load(self._horizon_ms, self._horizon_ms + self.window_ms // 4)
                PENDING.set(await self.store.pending())
            except DelayStoreUnavailable as e:
                log.error("delay.load_failed", error=str(e))
                await asyncio.sleep(1.0)

    # -- release -----------------------------------------------------------------------------------

    async def _releaser(self) -> None:
        while True:
            await self._wake_releaser.wait()
            self._wake_releaser.clear()
            retry = False
            while self._due:
                batch, self._due = self._due, []
                try:
                    await self._release(batch, retry=retry)
                    retry = False
                except (StoreUnavailable, DelayStoreUnavailable) as e:
                    # Nothing is lost: these stay scheduled in the store; try again shortly.
                    # The put may have landed: the next attempt checks for copies.
                    log.error("delay.release_failed", error=str(e), count=len(batch))
                    self._due[:0] = batch
                    retry = True
                    await asyncio.sleep(0.5)

    async def _release(self, batch: list[Due], *, retry: bool = False) -> None:
        now = self.timers.now_ms()
        started = self._started_at_ms
        check = retry or any(due.deliver_at_ms <= started for due in batch)
        released = str(now)
        msgs = []
        topics = self.broker_store.topics
        for due in batch:
            msg = decode_message(due.record)
            msg.properties[PROP_DELIVER_AT] = str(due.deliver_at_ms)
            msg.properties[PROP_RELEASED_AT] = released
            if msg.topic not in topics:
                await self.broker_store.ensure_topic(msg.topic, 1)
            msgs.append(msg)
        await self.broker_store.put_many(msgs, check_duplicate=check)
        ids = [d.msg_id for d in batch]
        await self.store.mark_delivered(ids, now)
        self._releasing.difference_update(ids)
        RELEASED.inc(len(batch))
        observe = LATENESS.observe
        for due in batch:
            observe(max(now - due.deliver_at_ms, 0) / 1000)

    # -- operations --------------------------------------------------------------------------------

    async def schedule(self, messages: Sequence[Message], deliver_at_ms: Sequence[int]) -> None:
        """Store ``messages`` durably for release at their times (the broker's Scheduler
        protocol). Assigns ``msg_id`` where a message has none."""
        for msg in messages:
            if not msg.msg_id:
                msg.msg_id = self.broker_store.new_msg_id()
        items = list(zip(messages, deliver_at_ms, strict=True))
        try:
            fresh = await self.store.schedule(items)
        except DelayStoreUnavailable as e:
            raise DelayUnavailable(f"delayed messages cannot be stored now: {e}") from None
        SCHEDULED.inc(sum(fresh))
        horizon = max(self._horizon_ms, self._loading_to_ms)
        for (msg, at), new in zip(items, fresh, strict=True):
            if new and at < horizon:
                self._arm(Due(msg.msg_id, at, encode_message(msg)))

    async def get(self, msg_id: bytes) -> DelayedInfo | None:
        try:
            return await self.store.get(msg_id)
        except DelayStoreUnavailable as e:
            raise DelayUnavailable(str(e)) from None

    async def cancel(self, msg_id: bytes) -> DelayedInfo | None:
        """Cancel a scheduled message; the info after the call says whether it worked
        (``state`` delivered means it was too late)."""
        if msg_id in self._releasing:
            return await self.get(msg_id)  # being released: it is delivered, or about to be
        armed = self._disarm(msg_id)
        try:
            return await self.store.cancel(msg_id, self.timers.now_ms())
        except DelayStoreUnavailable as e:
            if armed is not None:  # nothing changed in the store: keep its timer
                self._arm(armed)
            raise DelayUnavailable(str(e)) from None

    def _disarm(self, msg_id: bytes) -> Due | None:
        armed = self._entries.pop(msg_id, None)
        if armed is None:
            return None
        armed[0].cancel()
        return armed[1]

    async def reschedule(self, msg_id: bytes, deliver_at_ms: int) -> DelayedInfo | None:
        if msg_id in self._releasing:
            return await self.get(msg_id)
        armed = self._disarm(msg_id)
        try:
            info = await self.store.reschedule(msg_id, deliver_at_ms)
        except DelayStoreUnavailable as e:
            if armed is not None:
                self._arm(armed)
            raise DelayUnavailable(str(e)) from None
        horizon = max(self._horizon_ms, self._loading_to_ms)
        if info is not None and info.state is DelayState.SCHEDULED and deliver_at_ms < horizon:
            if armed is not None:
                self._arm(Due(msg_id, deliver_at_ms, armed.record))
            else:  # it was beyond the window: read its record back from the store
                due = await self.store.due(msg_id)
                if due is not None:
                    self._arm(due)
        return info

    async def _housekeeper(self, every_s: float = 60.0) -> None:
        """Forget delivered and cancelled messages once their history is older than
        ``history_ms``; keep the pending gauge fresh."""
        while True:
            await asyncio.sleep(every_s)
            try:
                PENDING.set(await self.store.pending())
                await self.store.purge(int(time.time() * 1000) - self.history_ms)
            except DelayStoreUnavailable as e:
                log.warning("delay.housekeeping_failed", error=str(e))

    @property
    def in_window(self) -> int:
        return len(self._entries)
