"""Consumer groups in the simple-consumer model: receive with receipts, ack, nack, redelivery.

Each (group, topic) subscription keeps, per queue, a *next* offset (the next entry to hand out)
and the deliveries handed out but not finished. The committed offset (persisted, where a restart
resumes) is the lowest unfinished one, so one slow message holds back only the restart point,
never the other messages. A nack or an invisibility timeout turns a delivery into a copy in the
retry topic ``%RETRY%<group>+<topic>`` due after the backoff (through the :class:`Scheduler`, so a
retry hours out survives restarts), or after ``max_attempts`` into ``%DLQ%<group>``; the original
delivery is finished once the copy is stored. FIFO groups instead keep a failed message in place
and block its queue until it is acked or dead-lettered, so order holds per queue (and so per
sharding key).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import orjson
import structlog

from broker_core import metrics
from broker_core.config import BrokerConfig
from broker_core.consumequeue import tag_hash
from broker_core.errors import (
    GroupExists,
    GroupNotFound,
    InvalidGroup,
    InvalidRequest,
    ReceiptExpired,
    StoreUnavailable,
)
from broker_core.message import StoredMessage
from broker_core.protocols import Scheduler, Timers
from broker_core.retry import delivery_attempt, dlq_topic, plan_redelivery, retry_topic
from broker_core.store import MessageStore, write_json_atomic
from broker_core.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

_GROUP_RE = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")
_GROUPS_FILE = "groups.json"


@dataclass(slots=True)
class GroupConfig:
    name: str
    fifo: bool
    max_attempts: int
    created_at: int

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "fifo": self.fifo,
            "max_attempts": self.max_attempts,
            "created_at": self.created_at,
        }


@dataclass(slots=True)
class Pending:
    """A delivery handed out and not finished. ``token`` 0: its copy is being stored."""

    offset: int
    phy: int
    attempt: int
    token: int
    deadline_ms: int
    #: FIFO only: when a failed delivery may go out again (None while it is out).
    ready_at_ms: int | None = None


@dataclass(slots=True)
class Cursor:
    topic: str
    queue_id: int
    next: int
    #: Position in its subscription's cursor list (what a receipt names).
    index: int = 0
    pending: dict[int, Pending] = field(default_factory=dict)
    #: Offsets handed out, in order; the head is the committed offset once finished ones go.
    order: deque[int] = field(default_factory=deque)

    def committed(self) -> int:
        order, pending = self.order, self.pending
        while order and order[0] not in pending:
            order.popleft()
        return order[0] if order else self.next


@dataclass(slots=True)
class Delivery:
    message: StoredMessage
    receipt: str
    attempt: int


class Subscription:
    __slots__ = ("config", "cursors", "retry_topic", "rr", "topic")

    def __init__(self, config: GroupConfig, topic: str, cursors: list[Cursor], retry: str) -> None:
        self.config = config
        self.topic = topic
        self.cursors = cursors
        self.retry_topic = retry
        self.rr = 0


def parse_tags(expr: object) -> frozenset[str] | None:
    """``"a || b"`` → {"a", "b"}; ``None``, ``""`` or ``"*"`` → None (everything)."""
    if expr is None:
        return None
    if not isinstance(expr, str):
        raise InvalidRequest("tags must be a string like 'a || b'")
    parts = [p.strip() for p in expr.split("||")]
    if any(p == "*" for p in parts) or not expr.strip():
        return None
    if any(not p for p in parts):
        raise InvalidRequest(f"malformed tag expression {expr!r}")
    return frozenset(parts)


class GroupManager:
    def __init__(
        self,
        store: MessageStore,
        config: BrokerConfig,
        *,
        timers: Timers,
        scheduler: Scheduler | None,
    ) -> None:
        self.store = store
        self.config = config
        self.timers = timers
        self.scheduler = scheduler
        self.groups: dict[str, GroupConfig] = {}
        self._subs: dict[tuple[str, str], Subscription] = {}
        self._saved_offsets: dict[str, dict[str, dict[str, int]]] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._epoch = int.from_bytes(os.urandom(4), "big")
        self._token = 0
        self._dirty = False
        self._closing = False
        self._path = Path(config.data_dir) / _GROUPS_FILE

    # -- persistence ---------------------------------------------------------------------------

    def load(self) -> None:
        if not self._path.exists():
            return
        data = orjson.loads(self._path.read_bytes())
        for g in data.get("groups", []):
            self.groups[g["name"]] = GroupConfig(
                g["name"], bool(g["fifo"]), int(g["max_attempts"]), int(g["created_at"])
            )
        self._saved_offsets = data.get("offsets", {})

    def snapshot(self) -> dict[str, object] | None:
        """What to persist, or None when nothing changed since the last save."""
        if not self._dirty:
            return None
        self._dirty = False
        offsets = {
            g: {t: dict(q) for t, q in topics.items()} for g, topics in self._saved_offsets.items()
        }
        for (group, _topic), sub in self._subs.items():
            for cur in sub.cursors:
                offsets.setdefault(group, {}).setdefault(cur.topic, {})[str(cur.queue_id)] = (
                    cur.committed()
                )
        return {"groups": [g.to_json() for g in self.groups.values()], "offsets": offsets}

    def save(self, snapshot: dict[str, object]) -> None:
        write_json_atomic(self._path, snapshot)

    # -- groups --------------------------------------------------------------------------------

    def create_group(
        self, name: object, *, fifo: object = False, max_attempts: object = None
    ) -> GroupConfig:
        if not isinstance(name, str) or not _GROUP_RE.fullmatch(name):
            raise InvalidGroup(
                "group name must be 1-100 characters of letters, digits, '_' and '-'"
            )
        if not isinstance(fifo, bool):
            raise InvalidGroup("fifo must be true or false")
        if max_attempts is None:
            max_attempts = self.config.max_attempts
        if (
            isinstance(max_attempts, bool)
            or not isinstance(max_attempts, int)
            or not (1 <= max_attempts <= 1000)
        ):
            raise InvalidGroup("max_attempts must be an integer from 1 to 1000")
        if name in self.groups:
            raise GroupExists(f"group {name!r} already exists")
        group = GroupConfig(name, fifo, max_attempts, self.store.clock())
        self.groups[name] = group
        self._dirty = True
        log.info("group.created", group=name, fifo=fifo, max_attempts=max_attempts)
        return group

    async def _subscription(self, group: str, topic: str, *, create: bool = False) -> Subscription:
        """The group's state on ``topic``. Only a receive creates an unknown group: reads and
        acks must not leave a default-configured group behind."""
        sub = self._subs.get((group, topic))
        if sub is not None:
            return sub
        cfg = self.groups.get(group)
        if cfg is None:
            if not create:
                raise GroupNotFound(f"group {group!r} does not exist")
            cfg = self.create_group(group)
        topic_cfg = self.store.topic(topic)
        retry = retry_topic(group, topic)
        names = [(topic, q) for q in range(topic_cfg.queues)]
        if not cfg.fifo:
            await self.store.ensure_topic(retry, 1)
            names.append((retry, 0))
        sub = self._subs.get((group, topic))
        if sub is not None:  # created by a concurrent receive while we awaited
            return sub
        saved = self._saved_offsets.get(group, {})
        cursors: list[Cursor] = []
        for t, q in names:
            lo, hi = self.store.queue_bounds(t, q)
            start = saved.get(t, {}).get(str(q))
            # A new group starts at the oldest retained message, so nothing sent before its
            # first receive is missed; a known one where it committed (never before what
            # retention kept). Replay elsewhere with reset.
            nxt = lo if start is None else min(max(int(start), lo), hi)
            cursors.append(Cursor(t, q, nxt, len(cursors)))
        sub = Subscription(cfg, topic, cursors, retry)
        self._subs[(group, topic)] = sub
        self._dirty = True
        return sub

    # -- receive -------------------------------------------------------------------------------

    async def receive(
        self,
        topic: str,
        group: str,
        *,
        max_messages: int,
        wait_ms: int,
        invisible_ms: int,
        tags: frozenset[str] | None,
    ) -> list[Delivery]:
        sub = await self._subscription(group, topic, create=True)
        deadline = self.timers.now_ms() + wait_ms
        loop = asyncio.get_running_loop()
        while True:
            out = self._poll(sub, max_messages, invisible_ms, tags)
            if out:
                metrics.RECEIVED_MESSAGES.inc(len(out))
                return out
            remaining_ms = deadline - self.timers.now_ms()
            if remaining_ms <= 0 or self._closing:
                return out
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(topic, []).append(fut)
            self._waiters.setdefault(sub.retry_topic, []).append(fut)
            try:
                await asyncio.wait_for(fut, remaining_ms / 1000)
            except TimeoutError:
                pass
            finally:
                for t in (topic, sub.retry_topic):
                    waiters = self._waiters.get(t)
                    if waiters is not None and fut in waiters:
                        waiters.remove(fut)

    def begin_shutdown(self) -> None:
        """Answer every long poll now (empty), so a stopping server need not wait them out."""
        self._closing = True
        self.wake(set(self._waiters))

    def wake(self, topics: set[str]) -> None:
        """New messages in ``topics`` (or a FIFO queue unblocked): wake long polls."""
        for t in topics:
            waiters = self._waiters.pop(t, None)
            if waiters:
                for f in waiters:
                    if not f.done():
                        f.set_result(None)

    def _poll(
        self, sub: Subscription, max_n: int, invisible_ms: int, tags: frozenset[str] | None
    ) -> list[Delivery]:
        now = self.timers.now_ms()
        deadline = now + invisible_ms
        tag_hashes = None if tags is None else {tag_hash(t) for t in tags}
        fifo = sub.config.fifo
        store = self.store
        out: list[Delivery] = []
        issued: list[tuple[Cursor, Pending]] = []
        cursors = sub.cursors
        n = len(cursors)
        start = sub.rr
        sub.rr = (start + 1) % n
        for i in range(n):
            cur = cursors[(start + i) % n]
            if fifo and cur.pending:
                self._fifo_resend(sub, cur, now, deadline, out, issued)
                if len(out) >= max_n:
                    break
                continue
            cq = store.consume_queue(cur.topic, cur.queue_id)
            if cur.next < cq.min_offset:
                cur.next = cq.min_offset  # retention removed what this group had not read
            while len(out) < max_n and cur.next < cq.max_offset:
                offset = cur.next
                cur.next = offset + 1
                phy, size, th = cq.get(offset)
                if size == 0:
                    continue  # a hole (never written): nothing to deliver
                if tag_hashes is not None and th not in tag_hashes:
                    continue  # filtered out: consumed for this group, as in RocketMQ
                msg = store.read(phy)
                if msg is None or (tags is not None and msg.tags not in tags):
                    continue
                pending = self._issue(cur, offset, phy, delivery_attempt(msg), deadline)
                cur.order.append(offset)
                out.append(Delivery(msg, self._receipt(sub, cur, pending), pending.attempt))
                issued.append((cur, pending))
                if fifo:
                    break
            if len(out) >= max_n:
                break
        if issued:
            self._dirty = True
            self.timers.call_at(deadline, partial(self._expire, sub, issued))
        return out

    def _issue(self, cur: Cursor, offset: int, phy: int, attempt: int, deadline: int) -> Pending:
        self._token += 1
        pending = Pending(offset, phy, attempt, self._token, deadline)
        cur.pending[offset] = pending
        return pending

    def _fifo_resend(
        self,
        sub: Subscription,
        cur: Cursor,
        now: int,
        deadline: int,
        out: list[Delivery],
        issued: list[tuple[Cursor, Pending]],
    ) -> None:
        """A FIFO queue is blocked by its one pending message; resend it once it is due."""
        offset = cur.committed()
        p = cur.pending.get(offset)
        if p is None or p.ready_at_ms is None or p.ready_at_ms > now or p.token == 0:
            return
        msg = self.store.read(p.phy)
        if msg is None:
            cur.pending.pop(offset)
            return
        again = self._issue(cur, offset, p.phy, p.attempt + 1, deadline)
        out.append(Delivery(msg, self._receipt(sub, cur, again), again.attempt))
        issued.append((cur, again))

    def _receipt(self, sub: Subscription, cur: Cursor, p: Pending) -> str:
        return f"{self._epoch:x}-{cur.index}-{p.offset}-{p.token:x}"

    def _resolve(self, sub: Subscription, receipt: object) -> tuple[Cursor, Pending]:
        if not isinstance(receipt, str):
            raise InvalidRequest("a receipt is a string returned by receive")
        parts = receipt.split("-")
        try:
            if len(parts) != 4:
                raise ValueError(receipt)
            epoch, qidx, offset, token = (
                int(parts[0], 16),
                int(parts[1]),
                int(parts[2]),
                int(parts[3], 16),
            )
        except ValueError:
            raise ReceiptExpired("unknown receipt") from None
        if epoch != self._epoch or not 0 <= qidx < len(sub.cursors):
            raise ReceiptExpired("receipt is from an earlier server run or another group")
        cur = sub.cursors[qidx]
        p = cur.pending.get(offset)
        if p is None or p.token != token or p.ready_at_ms is not None:
            raise ReceiptExpired("receipt expired or already acknowledged")
        return cur, p

    # -- ack / nack / timeout ------------------------------------------------------------------

    async def ack(self, topic: str, group: str, receipts: list[object]) -> int:
        sub = await self._subscription(group, topic)
        resolved = [self._resolve(sub, r) for r in receipts]
        done = 0
        for cur, p in resolved:
            if cur.pending.get(p.offset) is p:  # the same receipt twice in one call
                del cur.pending[p.offset]
                done += 1
        if done:
            self._dirty = True
            metrics.ACKED_MESSAGES.inc(done)
            if sub.config.fifo:
                self.wake({topic})
        return done

    async def nack(
        self, topic: str, group: str, receipt: object, retry_after_ms: int | None
    ) -> None:
        sub = await self._subscription(group, topic)
        cur, p = self._resolve(sub, receipt)
        await self._fail_delivery(sub, cur, p, retry_after_ms)

    async def change_invisible(
        self, topic: str, group: str, receipt: object, invisible_ms: int
    ) -> str:
        """RocketMQ's ChangeInvisibleDuration: the delivery stays out under a new receipt,
        invisible until now + ``invisible_ms``; the old receipt stops working. Only if that new
        deadline passes is the message delivered again (attempt + 1), at once: the caller chose
        the wait, so no backoff is added. Not a nack: the attempt is not used up early."""
        sub = await self._subscription(group, topic)
        cur, old = self._resolve(sub, receipt)
        deadline = self.timers.now_ms() + max(invisible_ms, 0)
        # A new entry under the same offset: the old receipt's token and the old batch timer
        # no longer match it, so neither can finish or fail this delivery.
        again = self._issue(cur, old.offset, old.phy, old.attempt, deadline)
        self._dirty = True

        async def redeliver() -> None:
            try:
                await self._fail_delivery(sub, cur, again, 0)
            except StoreUnavailable as e:
                log.error("group.redelivery_failed", group=sub.config.name, reason=str(e))

        def expire() -> None:
            if cur.pending.get(again.offset) is again and again.token and again.ready_at_ms is None:
                task = asyncio.get_running_loop().create_task(redeliver())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        self.timers.call_at(deadline, expire)
        return self._receipt(sub, cur, again)

    def _expire(self, sub: Subscription, issued: list[tuple[Cursor, Pending]]) -> None:
        """Invisibility timer of one receive batch: what is still out has failed."""
        failed = [
            (cur, p)
            for cur, p in issued
            if cur.pending.get(p.offset) is p and p.token and p.ready_at_ms is None
        ]
        if failed:
            task = asyncio.get_running_loop().create_task(self._fail_all(sub, failed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fail_all(self, sub: Subscription, failed: list[tuple[Cursor, Pending]]) -> None:
        for cur, p in failed:
            if cur.pending.get(p.offset) is p:
                try:
                    await self._fail_delivery(sub, cur, p, None)
                except StoreUnavailable as e:
                    log.error("group.redelivery_failed", group=sub.config.name, reason=str(e))

    async def _fail_delivery(
        self, sub: Subscription, cur: Cursor, p: Pending, retry_after_ms: int | None
    ) -> None:
        now = self.timers.now_ms()
        cfg = sub.config
        metrics.NACKED_MESSAGES.inc()
        if cfg.fifo and p.attempt < cfg.max_attempts:
            wait = retry_after_ms if retry_after_ms is not None else self._backoff(p.attempt)
            p.ready_at_ms = now + max(wait, 0)
            self.timers.call_at(p.ready_at_ms, partial(self.wake, {sub.topic}))
            return
        msg = self.store.read(p.phy)
        token = p.token
        p.token = 0  # receipt dead; the offset stays unfinished until the copy is stored
        try:
            if msg is not None:
                plan = plan_redelivery(
                    msg,
                    group=cfg.name,
                    attempt=p.attempt,
                    max_attempts=cfg.max_attempts,
                    schedule=self.config.backoff_ms,
                    now_ms=now,
                    retry_after_ms=retry_after_ms,
                )
                if plan.dead:
                    await self.store.ensure_topic(dlq_topic(cfg.name), 1)
                    await self.store.put(plan.message)
                    metrics.DLQ_MESSAGES.inc()
                    log.warning(
                        "group.dead_letter",
                        group=cfg.name,
                        msg_id=msg.origin_msg_id,
                        attempts=p.attempt,
                    )
                elif plan.deliver_at_ms <= now or self.scheduler is None:
                    await self.store.put(plan.message)
                else:
                    await self.scheduler.schedule([plan.message], [plan.deliver_at_ms])
        except BaseException:
            p.token = token  # not stored: the delivery stays out and times out again
            raise
        if cur.pending.get(p.offset) is p:
            del cur.pending[p.offset]
        self._dirty = True
        if cfg.fifo:
            self.wake({sub.topic})

    def _backoff(self, attempt: int) -> int:
        schedule = self.config.backoff_ms
        return schedule[min(attempt, len(schedule)) - 1]

    # -- offsets, lag, reset -------------------------------------------------------------------

    async def stats(self, topic: str, group: str) -> dict[str, object]:
        sub = await self._subscription(group, topic)
        queues = []
        lag = inflight = 0
        for cur in sub.cursors:
            lo, hi = self.store.queue_bounds(cur.topic, cur.queue_id)
            committed = max(cur.committed(), lo)
            q_inflight = sum(1 for p in cur.pending.values() if p.token and p.ready_at_ms is None)
            q_lag = hi - committed
            lag += q_lag
            inflight += q_inflight
            queues.append(
                {
                    "topic": cur.topic,
                    "queue_id": cur.queue_id,
                    "min_offset": lo,
                    "max_offset": hi,
                    "committed_offset": committed,
                    "next_offset": cur.next,
                    "inflight": q_inflight,
                    "lag": q_lag,
                }
            )
        return {
            "group": group,
            "topic": topic,
            "fifo": sub.config.fifo,
            "max_attempts": sub.config.max_attempts,
            "lag": lag,
            "inflight": inflight,
            "queues": queues,
        }

    async def reset(self, topic: str, group: str, timestamp_ms: int) -> list[dict[str, int]]:
        """Replay: every queue of ``topic`` restarts at the first message stored at or after
        ``timestamp_ms``; deliveries out now lose their receipts."""
        sub = await self._subscription(group, topic)
        out = []
        for cur in sub.cursors:
            if cur.topic != topic:
                continue
            offset = self.store.search_offset(cur.topic, cur.queue_id, timestamp_ms)
            cur.next = offset
            cur.pending.clear()
            cur.order.clear()
            out.append({"queue_id": cur.queue_id, "offset": offset})
        self._dirty = True
        self.wake({topic})
        log.info("group.reset", group=group, topic=topic, timestamp=timestamp_ms)
        return out

    def lag_by_group(self) -> list[tuple[str, str, int]]:
        out = []
        for (group, topic), sub in self._subs.items():
            total = 0
            for cur in sub.cursors:
                lo, hi = self.store.queue_bounds(cur.topic, cur.queue_id)
                total += hi - max(cur.committed(), lo)
            out.append((group, topic, total))
        return out

    async def stop(self) -> None:
        # Cancelled or failed: what was not stored is delivered again after a restart.
        await cancel_and_wait(self._tasks)
        for waiters in self._waiters.values():
            for f in waiters:
                if not f.done():
                    f.cancel()
        self._waiters.clear()
