"""The delay service: stores delayed messages and releases each into its topic on time.

Data flow. ``schedule`` writes messages to the :class:`DelayStore` (durable before it returns) and,
when due inside the current window, also puts them in the release queue. A loader keeps the queue
filled ``window_ms`` ahead: when the horizon comes within half a window of now, it reads the next
quarter window from the store, in small pages. So the queue, and memory, hold only what falls due
soon, however many messages are pending. The queue is a heap of ``(deliver_at_ms, msg_id)``
tuples beside a dict of ``msg_id: (deliver_at_ms, record)``, with one timer of the timing wheel
armed at the earliest. Plain tuples of ints and bytes are what the cyclic collector stops tracking
after its first pass (never a subclass of tuple), so a window of hundreds of thousands of
messages adds nothing to a full collection's pause (a ``TimerEntry`` and a callback per message
did: 25 to 140 ms per full collection with 50,000 in the window). When the timer fires,
everything due by then is released as one batch: switched back to their real topic with
``DELIVER_AT`` and ``RELEASED_AT`` properties, published to the release target
(:mod:`delayserver.targets`: the broker core, idempotently by ``(topic, msg_id)``, or NATS
JetStream or RabbitMQ), then marked delivered in the store. A crash between the put and the mark
re-releases after restart, and the idempotent put drops the copy: a message is never in its topic
twice. A message whose topic was deleted after it was sent is cancelled when due instead
(``MessageStore.is_orphan``; docs/concepts.md).

Restart: the window loads from time 0, so whatever fell due while the server was down is released
right after start, and nothing before its time.

Several servers on one Redis store (``leases``, :mod:`delayserver.leases`): this server loads and
releases only the shards whose lease it holds, into its own broker. Ids it generates fall in a
shard it holds, so what a server accepted is normally released by that server. A change another
server makes in a shard held here (a message due soon scheduled with a client's own id, a cancel,
a reschedule) arrives through the shard's inbox and is re-read from the store; each release first
claims its messages in the store, so a cancel made elsewhere a moment before wins. When a shard
is gained (a server died or left) its messages are loaded from time 0, so what fell due meanwhile
is released at once. A sweep every few seconds arms anything overdue that was missed, as a last
resort.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Collection, Sequence
from functools import partial
from heapq import heappop, heappush
from typing import Protocol, cast

import structlog
from prometheus_client import Counter, Gauge, Histogram

from broker_core.errors import StoreUnavailable
from broker_core.message import PROP_DELIVER_AT, PROP_RELEASED_AT, Message
from broker_core.metrics import DROPPED_MESSAGES
from broker_core.protocols import FirstSend
from broker_core.store import MessageStore
from broker_core.tasks import cancel_and_wait
from delayserver.leases import ShardLeases
from delayserver.store import (
    DelayedInfo,
    DelayState,
    DelayStore,
    DelayStoreUnavailable,
    Due,
    decode_message,
    encode_message,
    record_queue,
)
from delayserver.targets import EmbeddedTarget, ReleaseTarget, TargetUnavailable
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


#: Messages armed per turn of the event loop while a window loads: a page of ten thousand armed
#: in one go would hold the loop for tens of milliseconds and make what is due meanwhile late.
_ARM_CHUNK = 1000
#: Messages taken off the release queue per turn of the event loop when many fall due at once.
_FIRE_CHUNK = 1024
#: With leases: how often the last-resort sweep looks for overdue messages nobody armed, and how
#: overdue they must be (a burst being released is overdue too, but armed).
_SWEEP_EVERY_S = 2.0
_SWEEP_GRACE_MS = 1000
#: With leases: how often the inboxes of the shards held are read (one round trip for all).
_INBOX_EVERY_S = 0.01
#: ... and while this server is the only one (nobody else writes to its shards' inboxes; a
#: server joining shows up at the next lease round, and its first shards only after that).
_INBOX_ALONE_S = 0.5
#: Ids changed elsewhere re-read at once (their reads in flight together).
_REFRESH_CHUNK = 256
#: Released messages are marked delivered in the store this long after the first of them, the
#: releases meanwhile in the same write. Until marked they are neither re-armed nor cancelled.
_MARK_LINGER_S = 0.005
#: Writers tell a shard's holder about messages due before the end of its window plus this
#: (the servers' clocks may differ by up to this much).
_NEAR_SLACK_MS = 5000


class DelayUnavailable(StoreUnavailable):
    """The delay store cannot be reached: nothing was scheduled, changed or lost."""

    code = "delay_store_unavailable"


class ShardedStore(Protocol):
    """What the service needs of a store shared by several servers (the Redis store)."""

    near_until_ms: int

    def shard_of(self, msg_id: bytes) -> int: ...

    async def window(
        self,
        from_ms: int,
        to_ms: int,
        limit: int,
        *,
        after_msg_id: bytes = b"",
        shards: Collection[int] | None = None,
    ) -> list[Due]: ...

    async def claim(self, msg_ids: Sequence[bytes], now_ms: int) -> list[bool]: ...

    async def inbox(self, shards: Sequence[int], max_ids: int = 1000) -> list[bytes]: ...

    async def clear_inbox(self, shards: Sequence[int]) -> None: ...


class WheelTimers(Protocol):
    def now_ms(self) -> int: ...

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> TimerEntry: ...


class _PartlyReleased(TargetUnavailable):
    """The target took part of a release batch (recorded as delivered); ``left`` it did not."""

    def __init__(self, message: str, left: list[Due]) -> None:
        super().__init__(message)
        self.left = left


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
        leases: ShardLeases | None = None,
        target: ReleaseTarget | None = None,
    ) -> None:
        self.store = store
        #: Where released messages go (:mod:`delayserver.targets`): this broker's topics unless
        #: another target is given.
        self.target: ReleaseTarget = target if target is not None else EmbeddedTarget(broker_store)
        self.leases = leases
        #: The store as several servers share it; set with ``leases``.
        self._sharded = cast(ShardedStore, store) if leases is not None else None
        self.broker_store = broker_store
        self.timers = timers
        self.window_ms = window_ms
        self.window_limit = window_limit
        self.history_ms = history_ms
        #: Everything due before this is in the release queue (or being released).
        self._horizon_ms = 0
        #: The horizon a load in flight will reach; schedules before it go to the queue too.
        self._loading_to_ms = 0
        #: In-window messages: ``msg_id: (deliver_at_ms, record)``, what to release (and to
        #: re-arm if a cancel fails).
        self._entries: dict[bytes, tuple[int, bytes]] = {}
        #: Heap of ``(deliver_at_ms, msg_id)``; an item whose id is no longer in ``_entries``
        #: at that time is stale (cancelled, re-armed earlier) and skipped when it comes up.
        self._queue: list[tuple[int, bytes]] = []
        #: The one timer, armed at ``_timer_ms``: the head of the queue or earlier (a handle of
        #: the loop's after a backward step of the wall clock; see :meth:`_fire`).
        self._timer: TimerEntry | asyncio.TimerHandle | None = None
        self._timer_ms: float = math.inf
        self._releasing: set[bytes] = set()
        #: Released (in their topics) and not yet marked delivered in the store.
        self._unmarked: set[bytes] = set()
        #: Ids armed again from a resend (see :meth:`_known`): released with a check of their
        #: topic for a copy, as after a restart.
        self._recheck: set[bytes] = set()
        self._due: list[Due] = []
        self._wake_releaser = asyncio.Event()
        #: Without leases: ``(released_at_ms, ids)`` in their topics, still to be marked
        #: delivered in the store, by the marker task, off the release path.
        self._to_mark: list[tuple[int, list[bytes]]] = []
        self._marking = False
        self._wake_marker = asyncio.Event()
        self._marker_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: A message can already be in its topic only if an earlier run released it (and died
        #: before marking it delivered): its time is then before this run started, or, with
        #: leases, before this server last took a shard.
        self._started_at_ms = 0
        self._running = False
        #: Set at stop: the loops that talk to the store (with leases) end between two calls
        #: rather than being cancelled in the middle of one.
        self._stopping = asyncio.Event()
        self._polls: list[asyncio.Task[None]] = []
        self._releaser_task: asyncio.Task[None] | None = None
        self._takeovers: set[asyncio.Task[None]] = set()
        #: Held from claim to mark: a shard given up waits for the release under way.
        self._release_lock = asyncio.Lock()
        #: Ids changed elsewhere still to re-read (kept across a failed inbox round).
        self._to_refresh: dict[bytes, None] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        self._started_at_ms = self.timers.now_ms()
        leases, sharded = self.leases, self._sharded
        if leases is not None and sharded is not None:
            leases.on_gained = self._gained
            leases.on_lost = self._lost
            self._note_near()
            await leases.start()
            # Whatever was told before now is in the store and loads below.
            await sharded.clear_inbox(sorted(leases.owned))
        loaded = None if leases is None else leases.owned
        await self._load(0, self._started_at_ms + self.window_ms)
        self._running = True
        if leases is not None and loaded is not None and (missed := leases.owned - loaded):
            await self._gained(missed)  # taken by the lease task while the first load ran
        self._releaser_task = asyncio.create_task(self._releaser(), name="tempomq-delay-releaser")
        if leases is None:
            self._marker_task = asyncio.create_task(self._marker(), name="tempomq-delay-marker")
        self._tasks = [
            asyncio.create_task(self._loader(), name="tempomq-delay-loader"),
            asyncio.create_task(self._housekeeper(), name="tempomq-delay-housekeeper"),
        ]
        if leases is not None:
            self._stopping.clear()
            self._polls = [
                asyncio.create_task(self._sweeper(), name="tempomq-delay-sweeper"),
                asyncio.create_task(self._inbox(), name="tempomq-delay-inbox"),
            ]
        log.info(
            "delay.started",
            in_window=len(self._entries),
            pending=await self.store.pending(),
            shards=None if leases is None else sorted(leases.owned),
        )

    async def stop(self) -> None:
        """Stop loading, finish the release under way (so no other server repeats it), hand
        the shards on, close the store."""
        self._running = False
        self._stopping.set()
        if self._polls:
            await asyncio.wait(self._polls, timeout=2.0)
        await cancel_and_wait([*self._polls, *self._tasks, *self._takeovers])
        self._tasks, self._polls = [], []
        releaser, self._releaser_task = self._releaser_task, None
        if releaser is not None:
            self._wake_releaser.set()
            try:
                async with asyncio.timeout(5.0):
                    await asyncio.shield(releaser)
            except TimeoutError:
                log.warning("delay.release_interrupted", waiting=len(self._due))
            finally:
                await cancel_and_wait([releaser])
        marker, self._marker_task = self._marker_task, None
        if marker is not None:
            await self._marks_done(5.0)
            await cancel_and_wait([marker])
        if self.leases is not None:
            await self.leases.stop()
        self._entries.clear()
        self._queue.clear()
        self._recheck.clear()
        self._set_timer(None)
        await self.store.close()

    async def health(self) -> str | None:
        return await self.store.health()

    # -- the window --------------------------------------------------------------------------------

    async def _load(self, from_ms: int, to_ms: int) -> None:
        """Put everything scheduled in ``[from_ms, to_ms)`` into the queue, page by page."""
        self._loading_to_ms = to_ms
        await self._load_range(from_ms, to_ms, None if self.leases is None else self.leases.owned)
        self._horizon_ms = to_ms
        self._note_near()

    async def _load_range(
        self, from_ms: int, to_ms: int, shards: Collection[int] | None, *, one_page: bool = False
    ) -> int:
        """Arm what is scheduled in ``[from_ms, to_ms)`` (in ``shards``, None meaning the whole
        store), page by page, or only the first page. Returns how many timers this call armed
        (not those already armed, nor what others armed meanwhile)."""
        after = b""
        page_size = self.window_limit
        armed = 0
        while True:
            if shards is None:
                page = await self.store.window(from_ms, to_ms, page_size, after_msg_id=after)
            elif not shards:
                return armed
            else:
                assert self._sharded is not None
                page = await self._sharded.window(
                    from_ms, to_ms, page_size, after_msg_id=after, shards=shards
                )
            arm = self._arm
            for i in range(0, len(page), _ARM_CHUNK):
                for due in page[i : i + _ARM_CHUNK]:
                    armed += arm(due)
                await asyncio.sleep(0)  # let due releases run between chunks
            if len(page) < page_size or one_page:
                return armed
            from_ms, after = page[-1].deliver_at_ms, page[-1].msg_id  # the next page follows it

    def _note_near(self) -> None:
        """Tell the store up to when other servers' changes are near enough to pass on."""
        if self._sharded is not None:
            self._sharded.near_until_ms = self.timers.now_ms() + self.window_ms + _NEAR_SLACK_MS

    def _arm(self, due: Due) -> bool:
        """Put ``due`` in the release queue; False when it is not this server's to arm (being
        released, armed already at this time or earlier, or another server's shard)."""
        if due.msg_id in self._releasing:
            return False
        armed = self._entries.get(due.msg_id)
        if armed is not None:
            if due.deliver_at_ms >= armed[0]:
                return False
            # Armed later than this (a stale read): the earlier time wins; if the store's time
            # is the later one after all, the claim at release finds it not due and re-reads.
            # Its queue item goes stale.
            del self._entries[due.msg_id]
        if self._sharded is not None:
            assert self.leases is not None
            if self._sharded.shard_of(due.msg_id) not in self.leases.owned:
                return False  # another server's to release
        at = due.deliver_at_ms
        self._entries[due.msg_id] = (at, due.record)
        heappush(self._queue, (at, due.msg_id))
        if at < self._timer_ms:
            self._set_timer(at)
        return True

    def _set_timer(self, at: int | None) -> None:
        """Arm the one timer at ``at`` (None: disarm it)."""
        if self._timer is not None:
            self._timer.cancel()
        if at is None:
            self._timer, self._timer_ms = None, math.inf
        else:
            self._timer = self.timers.call_at(at, partial(self._fire, at))
            self._timer_ms = at

    def _fire(self, fired_for: int) -> None:
        """The timer, armed for ``fired_for`` (epoch ms): hand what is due by now to the
        releaser, at most ``_FIRE_CHUNK`` items per turn of the loop (a burst due in one
        millisecond goes out in chunks, the rest of the service running between them), then arm
        the timer at the next item.

        Due means due by the wall clock, never earlier. After the wall clock stepped back, the
        timers (whose time never goes back) hold a time as past that the clock has not reached
        again: a timer armed at it would run at once, again and again. The next item is then
        awaited on the loop's monotonic clock instead, at most a second at a time."""
        self._set_timer(None)
        now = self.timers.now_ms()
        queue, entries, due_list, releasing = self._queue, self._entries, self._due, self._releasing
        taken = 0
        for _ in range(_FIRE_CHUNK):
            if not queue or queue[0][0] > now:
                break
            at, msg_id = heappop(queue)
            armed = entries.get(msg_id)
            if armed is None or armed[0] != at:
                continue  # stale: cancelled, or armed again at another time
            del entries[msg_id]
            releasing.add(msg_id)
            due_list.append(Due(msg_id, at, armed[1]))
            taken += 1
        else:
            # More may be due: the rest after the loop's other callbacks (the releaser first;
            # a timer due now would run in the timer service's same turn).
            asyncio.get_running_loop().call_soon(self._fire, fired_for)
            queue = []
        if taken:
            self._wake_releaser.set()
        if queue:
            head = queue[0][0]
            if now < head <= fired_for:  # the wall clock stepped back (see above)
                wait_s = min(head - now, 1000) / 1000
                self._timer = asyncio.get_running_loop().call_later(wait_s, self._fire, head)
                self._timer_ms = head
            else:
                self._set_timer(head)

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
            except Exception:
                log.exception("delay.load_failed")
                await asyncio.sleep(1.0)

    # -- release -----------------------------------------------------------------------------------

    async def _releaser(self) -> None:
        while self._running:
            await self._wake_releaser.wait()
            self._wake_releaser.clear()
            retry = False
            while self._due and self._running:
                batch, self._due = self._due, []
                try:
                    await self._release(batch, retry=retry)
                    retry = False
                except (StoreUnavailable, DelayStoreUnavailable) as e:
                    # Nothing is lost: these stay scheduled in the store; try again shortly.
                    # The put may have landed: the next attempt checks for copies.
                    if isinstance(e, _PartlyReleased):
                        batch = e.left  # the others reached the target and are recorded
                    log.error("delay.release_failed", error=str(e), count=len(batch))
                    self._due[:0] = batch
                    retry = True
                    await asyncio.sleep(0.5)
                except Exception:
                    # A bug must not end releases for good: log it, keep the batch, go on.
                    log.exception("delay.release_failed", count=len(batch))
                    self._due[:0] = batch
                    retry = True
                    await asyncio.sleep(1.0)

    async def _release(self, batch: list[Due], *, retry: bool = False) -> None:
        async with self._release_lock:
            await self._release_locked(batch, retry=retry)

    async def _release_locked(self, batch: list[Due], *, retry: bool) -> None:
        now = self.timers.now_ms()
        if self.leases is not None:
            batch = await self._claim(batch, now)
            if not batch:
                return
        check = self._needs_check(batch, retry)
        released = str(now)
        msgs = []
        store = self.broker_store
        dropped = []
        for due in batch:
            msg = decode_message(due.record)
            if store.is_orphan(msg):  # its topic was deleted after it was sent
                dropped.append(due.msg_id)
                continue
            msg.properties[PROP_DELIVER_AT] = str(due.deliver_at_ms)
            msg.properties[PROP_RELEASED_AT] = released
            msgs.append(msg)
        left: list[Due] = []
        error: TargetUnavailable | None = None
        if msgs:
            try:
                await self.target.publish(msgs, check_duplicate=check)
            except TargetUnavailable as e:
                if not e.acknowledged:
                    raise
                # Record what the target took, so one message it refuses (a subject no stream
                # captures, a routing key no queue is bound to) neither holds the others back
                # nor has them published again at every retry.
                error, landed, dropping = e, e.acknowledged, set(dropped)
                left = [d for d in batch if d.msg_id not in landed and d.msg_id not in dropping]
                batch = [d for d in batch if d.msg_id in landed or d.msg_id in dropping]
        if dropped:
            await self._drop_orphans(dropped, now)
        ids = [d.msg_id for d in batch]
        if self.leases is None:
            # Marked in the background: the next batch due need not wait for this one's
            # commit. Until marked, the ids stay in _releasing (nothing re-arms them); a crash
            # before the mark re-releases them after restart, and the idempotent put drops the
            # copies (their times are before the restart).
            self._to_mark.append((now, ids))
            self._unmarked.update(ids)
            self._wake_marker.set()
        else:
            # With leases the mark stays under the release lock: a shard given up waits for it.
            await self.store.mark_delivered(ids, now)
            self._releasing.difference_update(ids)
        RELEASED.inc(len(batch))
        observe = LATENESS.observe
        for due in batch:
            observe(max(now - due.deliver_at_ms, 0) / 1000)
        if error is not None:
            raise _PartlyReleased(str(error), left)

    def _needs_check(self, batch: list[Due], retry: bool) -> bool:
        """Whether the release of ``batch`` must check the topics for copies already there:
        a retry (the put may have landed), a message due before this run started (an earlier
        run may have released it), one armed again from a stale read (see :meth:`_known`;
        a failed release is a retry, so those ids leave the set here), or any with leases: a
        plain send to this server may have stored an id another server scheduled since this
        one loaded its id filter (the Redis store's :meth:`find`), and the copy stays out."""
        started = self._started_at_ms
        check = (
            retry or self.leases is not None or any(due.deliver_at_ms <= started for due in batch)
        )
        recheck = self._recheck
        if recheck:
            ids = [due.msg_id for due in batch]
            check = check or not recheck.isdisjoint(ids)
            recheck.difference_update(ids)
        return check

    async def _marker(self) -> None:
        """Mark released messages delivered in the store, what queued meanwhile together
        (the store commits concurrent writes in one transaction). A mark that fails is
        tried again; nothing is released twice meanwhile (the ids stay in _releasing)."""
        while True:
            await self._wake_marker.wait()
            if self._running:
                # Releases come a few at a time (one timer each); the marks of the next few
                # milliseconds' releases go in the same write.
                await asyncio.sleep(_MARK_LINGER_S)
            self._wake_marker.clear()
            while self._to_mark:
                groups, self._to_mark = self._to_mark, []
                self._marking = True
                try:
                    await asyncio.gather(
                        *(self.store.mark_delivered(ids, at) for at, ids in groups)
                    )
                except Exception as e:
                    if isinstance(e, DelayStoreUnavailable):
                        log.error("delay.mark_failed", error=str(e), batches=len(groups))
                    else:
                        log.exception("delay.mark_failed", batches=len(groups))
                    self._to_mark[:0] = groups  # marking is idempotent: all of them again
                    await asyncio.sleep(0.5)
                    continue
                finally:
                    self._marking = False
                for _at, ids in groups:
                    self._releasing.difference_update(ids)
                    self._unmarked.difference_update(ids)

    async def _marks_done(self, timeout_s: float) -> None:
        """Wait until everything released is marked (at stop), at most ``timeout_s``."""
        self._wake_marker.set()
        deadline = time.monotonic() + timeout_s
        while self._to_mark or self._marking:
            if time.monotonic() > deadline:
                log.warning("delay.marks_unfinished", batches=len(self._to_mark))
                return
            await asyncio.sleep(0.005)

    async def _drop_orphans(self, msg_ids: list[bytes], now: int) -> None:
        """Messages due for a topic deleted since they were sent: cancelled, not released
        (``GET /v1/delayed/{id}`` then answers ``cancelled``), counted and logged."""
        for msg_id in msg_ids:
            await self.store.cancel(msg_id, now)
            log.warning("delay.dropped", msg_id=msg_id.hex(), reason="topic_deleted")
        DROPPED_MESSAGES.labels("delayed").inc(len(msg_ids))

    async def _claim(self, batch: list[Due], now: int) -> list[Due]:
        """With leases: keep the messages of shards still held that the store lets this server
        release now; forget the others (another server's now, or changed meanwhile)."""
        assert self.leases is not None and self._sharded is not None
        holds, shard_of, owned = self.leases.holds, self._sharded.shard_of, self.leases.owned
        mine: list[Due] = []
        later: list[Due] = []  # held, but not valid just now (a slow renewal): retry shortly
        gone: list[bytes] = []  # another server's now
        for due in batch:
            shard = shard_of(due.msg_id)
            if holds(shard):
                mine.append(due)
            elif shard in owned:
                later.append(due)
            else:
                gone.append(due.msg_id)
        if later:
            asyncio.get_running_loop().call_later(0.2, self._retry_release, later)
        flags = await self._sharded.claim([due.msg_id for due in mine], now) if mine else []
        claimed = [due for due, ok in zip(mine, flags, strict=True) if ok]
        unclaimed = [due.msg_id for due, ok in zip(mine, flags, strict=True) if not ok]
        self._releasing.difference_update(gone)
        if unclaimed:  # cancelled, or rescheduled later: arm it at its new time
            self._releasing.difference_update(unclaimed)
            await self._refresh_many(unclaimed)
        return claimed

    def _retry_release(self, dues: list[Due]) -> None:
        self._due.extend(dues)  # still in _releasing
        self._wake_releaser.set()

    # -- several servers ---------------------------------------------------------------------------

    async def _gained(self, shards: frozenset[int]) -> None:
        """Shards taken over: load each from time 0 (what fell due meanwhile goes at once), in
        the background, so lease renewals never wait for a load."""
        if not self._running:
            return  # start() loads them
        task = asyncio.create_task(self._take_over(shards), name="tempomq-delay-takeover")
        self._takeovers.add(task)
        task.add_done_callback(self._takeovers.discard)

    async def _take_over(self, shards: frozenset[int]) -> None:
        assert self._sharded is not None
        self._started_at_ms = self.timers.now_ms()  # their messages may be released already
        while True:
            try:
                await self._sharded.clear_inbox(sorted(shards))
                to = max(self._horizon_ms, self._loading_to_ms)
                await self._load_range(0, to, shards)
                return
            except DelayStoreUnavailable as e:
                log.error("delay.takeover_failed", error=str(e), shards=sorted(shards))
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("delay.takeover_failed", shards=sorted(shards))
                await asyncio.sleep(1.0)

    async def _lost(self, shards: frozenset[int]) -> None:
        """Shards lost or given up: their timers go; their releases are refused from now on."""
        assert self._sharded is not None
        shard_of = self._sharded.shard_of
        for msg_id in [m for m in self._entries if shard_of(m) in shards]:
            self._disarm(msg_id)
        # A release under way may hold some of their messages: let it finish before anyone else
        # can take the shards (those not yet claimed are dropped: the shards are not held).
        async with self._release_lock:
            pass

    async def _inbox(self) -> None:
        """Re-read what other servers changed in the shards held."""
        assert self.leases is not None and self._sharded is not None
        while await self._pause(_INBOX_EVERY_S if self.leases.servers > 1 else _INBOX_ALONE_S):
            try:
                ids = await self._sharded.inbox(sorted(self.leases.owned))
                self._to_refresh.update(dict.fromkeys(ids))
                while self._to_refresh:
                    chunk = list(self._to_refresh)[:_REFRESH_CHUNK]
                    await self._refresh_many(chunk)
                    for msg_id in chunk:
                        self._to_refresh.pop(msg_id, None)
            except DelayStoreUnavailable as e:
                log.warning("delay.inbox_failed", error=str(e))
                await self._pause(1.0)
            except Exception:
                log.exception("delay.inbox_failed")
                await self._pause(1.0)

    async def _refresh_many(self, msg_ids: Sequence[bytes]) -> None:
        """Make the release queue agree with the store about messages changed elsewhere (their reads
        all in flight at once)."""
        # Those being released: their claim decides, and re-reads them if not released.
        ids = [m for m in msg_ids if m not in self._releasing]
        dues = await asyncio.gather(*(self.store.due(m) for m in ids))
        horizon = max(self._horizon_ms, self._loading_to_ms)
        for msg_id, due in zip(ids, dues, strict=True):
            if msg_id in self._releasing:
                continue
            self._disarm(msg_id)
            if due is not None and due.deliver_at_ms < horizon:
                self._arm(due)

    async def _sweeper(self) -> None:
        """The last resort: arm messages overdue by more than a second that are neither armed
        nor being released (a change whose notice was lost, say). Normally finds nothing.

        Counts only the timers the sweep itself armed: the queue's size before and after its
        read would also count what ``schedule`` armed meanwhile (a whole batch due later, on a
        busy server), and report as missed what was on time."""
        assert self.leases is not None
        while await self._pause(_SWEEP_EVERY_S):
            try:
                found = await self._load_range(
                    0, self.timers.now_ms() - _SWEEP_GRACE_MS, self.leases.owned, one_page=True
                )
                if found:
                    log.warning("delay.sweep_found", armed=found)
            except DelayStoreUnavailable as e:
                log.warning("delay.sweep_failed", error=str(e))
            except Exception:
                log.exception("delay.sweep_failed")

    async def _pause(self, seconds: float) -> bool:
        """Sleep; False, at once, when the service is stopping."""
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return True
        return False

    def new_msg_id(self) -> bytes:
        """A fresh id; with leases, one in a shard this server holds, so that this server
        releases what it accepted into its own topics."""
        make = self.broker_store.new_msg_id
        leases, sharded = self.leases, self._sharded
        if leases is None or sharded is None or not (owned := leases.owned):
            return make()
        shard_of = sharded.shard_of
        for _ in range(64):
            msg_id = make()
            if shard_of(msg_id) in owned:
                break
        return msg_id

    # -- operations --------------------------------------------------------------------------------

    async def release_now(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` (ids set) to the release target now, idempotently by id (a
        committed transactional message). Raises ``StoreUnavailable`` when it cannot."""
        await self.target.publish(messages, check_duplicate=True)

    def may_hold(self, msg_id: bytes) -> bool:
        """The broker's Scheduler protocol: False when the store certainly does not hold
        ``msg_id`` (its id filter says so), True when :meth:`held` must ask it."""
        return self.store.may_hold(msg_id)

    async def held(self, msg_ids: Sequence[bytes]) -> list[FirstSend | None]:
        """The broker's Scheduler protocol: for each id, where and when the message the store
        holds under it goes (scheduled, delivered or cancelled, until purged), else None. A new
        id is answered from the store's id filter, without a read. Raises
        :class:`DelayUnavailable` when the store cannot be asked."""
        try:
            infos = await self.store.find(msg_ids)
        except DelayStoreUnavailable as e:
            raise DelayUnavailable(f"delayed messages cannot be looked up now: {e}") from None
        return [
            None if i is None else FirstSend(i.topic, i.queue_id, i.deliver_at_ms, True)
            for i in infos
        ]

    async def schedule(
        self, messages: Sequence[Message], deliver_at_ms: Sequence[int]
    ) -> list[int]:
        """Store ``messages`` durably for release at their times (the broker's Scheduler
        protocol). Assigns ``msg_id`` where a message has none. Returns each one's delivery
        time: as given, or for an id already known (a resend) the time it was stored with;
        a resend's ``queue_id`` is set to the one stored (-1 when none is recorded)."""
        for msg in messages:
            if not msg.msg_id:
                msg.msg_id = self.new_msg_id()
        items = list(zip(messages, deliver_at_ms, strict=True))
        self._note_near()
        try:
            fresh = await self.store.schedule(items)
        except DelayStoreUnavailable as e:
            raise DelayUnavailable(f"delayed messages cannot be stored now: {e}") from None
        SCHEDULED.inc(sum(fresh))
        horizon = max(self._horizon_ms, self._loading_to_ms)
        times = list(deliver_at_ms)
        resent = []
        for pos, ((msg, at), new) in enumerate(zip(items, fresh, strict=True)):
            if not new:
                resent.append(pos)
            elif at < horizon:
                self._arm(Due(msg.msg_id, at, encode_message(msg)))
        if resent:  # answer their stored times, and arm them (the first reply was lost?)
            known = await asyncio.gather(
                *(self._known(items[pos][0].msg_id, times[pos], horizon) for pos in resent)
            )
            for pos, (at, queue_id) in zip(resent, known, strict=True):
                times[pos] = at
                items[pos][0].queue_id = queue_id  # -1: none recorded
        return times

    async def _known(self, msg_id: bytes, asked_ms: int, horizon: int) -> tuple[int, int]:
        """A resent id's stored time and queue (-1 when not recorded)."""
        try:
            due = await self.store.due(msg_id)
            if due is not None:
                # The read may be stale: the message may have been released and marked while
                # it ran. Armed again, its release checks its topic for it first.
                if due.deliver_at_ms < horizon and self._arm(due):
                    self._recheck.add(msg_id)
                return due.deliver_at_ms, record_queue(due.record)
            [info] = await self.store.find([msg_id])
        except DelayStoreUnavailable as e:
            raise DelayUnavailable(str(e)) from None
        return (asked_ms, -1) if info is None else (info.deliver_at_ms, info.queue_id)

    async def get(self, msg_id: bytes) -> DelayedInfo | None:
        """The message's state: delivered as soon as it is in its topic, before the store's
        mark (which follows the release by a few milliseconds) says so."""
        # Released before the read: its answer may predate the mark, which may be done (and
        # the id no longer unmarked) by the time the answer arrives.
        released = msg_id in self._unmarked
        try:
            info = await self.store.get(msg_id)
        except DelayStoreUnavailable as e:
            raise DelayUnavailable(str(e)) from None
        if released or msg_id in self._unmarked:
            return _delivered(info)
        return info

    async def cancel(self, msg_id: bytes) -> DelayedInfo | None:
        """Cancel a scheduled message; the info after the call says whether it worked
        (``state`` delivered means it was too late)."""
        if msg_id in self._releasing:
            return await self._being_released(msg_id)
        armed = self._disarm(msg_id)
        self._note_near()
        try:
            return await self.store.cancel(msg_id, self.timers.now_ms())
        except DelayStoreUnavailable as e:
            if armed is not None:  # nothing changed in the store: keep its timer
                self._arm(armed)
            raise DelayUnavailable(str(e)) from None

    def _disarm(self, msg_id: bytes) -> Due | None:
        """Take ``msg_id`` out of the window (its queue item goes stale); what was armed."""
        armed = self._entries.pop(msg_id, None)
        return None if armed is None else Due(msg_id, *armed)

    async def _being_released(self, msg_id: bytes) -> DelayedInfo | None:
        """What a cancel or reschedule of a message being released answers: delivered (it is
        in its topic, or will be: a release is not called back), even while the store, whose
        mark comes after the release, still says scheduled."""
        return _delivered(await self.get(msg_id))

    async def reschedule(self, msg_id: bytes, deliver_at_ms: int) -> DelayedInfo | None:
        if msg_id in self._releasing:
            return await self._being_released(msg_id)
        armed = self._disarm(msg_id)
        self._note_near()
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


def _delivered(info: DelayedInfo | None) -> DelayedInfo | None:
    """``info`` of a released message the store may not have marked yet: delivered."""
    if info is not None and info.state is DelayState.SCHEDULED:
        return dataclasses.replace(info, state=DelayState.DELIVERED)
    return info
