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

Durability (after RocketMQ 5's pop consumer, which journals its checkpoint and ack records in a
revive topic): every change of consumer state is a record in the CommitLog (:meth:`_journal`),
written in the same group commit as messages and awaited before the client is answered, so it
is as durable as a message in the flush mode in use. The records:

====  ===========================================================================
G     a group created (name, fifo, max_attempts)
D     deliveries handed out: (cursor topic, queue, offset, phy, attempt, deadline), and the
      cursors' next offsets
A     deliveries finished: acknowledged, or their retry / dead-letter copy stored (that copy and
      this record go out in one write, so a copy is stored once and a message reaches
      ``%DLQ%<group>`` at most once)
F     a FIFO delivery failed and waits in place until ``ready_at``
I     the retry copy a failed delivery is about to schedule (its id and time), so a retry that
      a crash interrupted is scheduled again with the same id and keeps its time
R     a reset: cursors moved, deliveries out dropped
X     a group deleted: its config, cursors and offsets forgotten
====  ===========================================================================

A deleted topic (:meth:`MessageStore.delete_topic`) needs no record of its own: its tombstone
names the CommitLog offset of the deletion, and records and snapshot state about that topic from
before it are not replayed, so a topic created again under the name starts without them.

``groups.json`` is a snapshot of the whole state as of a CommitLog offset (``state_at``), saved
with each flush; a restart loads it and replays the records after it. Deliveries that were out at
a crash come back with their attempt count and deadline: once the deadline passes they are
redelivered with ``delivery_attempt`` one higher, and after ``max_attempts`` dead-lettered.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from heapq import heappop, heappush
from pathlib import Path
from typing import Any

import orjson
import structlog

from broker_core import metrics
from broker_core.config import BrokerConfig
from broker_core.consumequeue import tag_hash
from broker_core.errors import (
    GroupExists,
    GroupNotFound,
    InvalidGroup,
    InvalidReceipt,
    InvalidRequest,
    ReceiptExpired,
    ReceiptMismatch,
    StoreUnavailable,
)
from broker_core.message import CLIENT_NAME_PATTERN, Message, StoredMessage, is_system_topic
from broker_core.protocols import Scheduler, TimerHandle, Timers
from broker_core.retry import delivery_attempt, dlq_topic, plan_redelivery, retry_topic
from broker_core.store import MessageStore, set_aside, write_json_atomic
from broker_core.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

_GROUP_RE = re.compile(CLIENT_NAME_PATTERN)
MAX_ATTEMPTS = 1000
_GROUPS_FILE = "groups.json"
#: When a redelivery could not be stored (a full disk, say), it is tried again this much later.
_REDELIVERY_RETRY_MS = 1000
#: Receive batches whose invisibility ends are checked per turn of the event loop.
_EXPIRE_CHUNK = 1024

#: A receive batch's invisibility deadline: ``(deadline_ms, seq, (group, topic), ((cursor index,
#: offset, token), ...))``.
_Deadline = tuple[int, int, tuple[str, str], tuple[tuple[int, int, int], ...]]


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
    #: CommitLog offset of the record that finishes this delivery, while that record is being
    #: written (a snapshot taken meanwhile checks it on restart).
    finish_at: int | None = None
    #: The retry copy this delivery's failure schedules: its msg_id and time (record I).
    copy_id: bytes | None = None
    copy_at_ms: int | None = None

    def to_json(self) -> list[Any]:
        return [
            self.offset,
            self.phy,
            self.attempt,
            self.deadline_ms,
            self.ready_at_ms,
            self.finish_at,
            self.copy_id.hex() if self.copy_id else None,
            self.copy_at_ms,
        ]


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
class ReceiptFailure:
    """A well-formed receipt an ack or nack could not apply, and why (an API error code)."""

    receipt: str
    error: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"receipt": self.receipt, "error": self.error, "message": self.message}


#: A receipt as receive hands it out: server run, cursor index, offset, token (Receipt in the spec).
RECEIPT_PATTERN = r"^([0-9a-f]{1,16})-([0-9]{1,9})-([0-9]{1,19})-([0-9a-f]{1,16})$"
_RECEIPT_RE = re.compile(RECEIPT_PATTERN)


def parse_receipt(receipt: object) -> tuple[int, int, int, int]:
    """A receipt's (server run, cursor index, offset, token); :class:`InvalidReceipt` naming
    it for anything receive cannot have handed out."""
    m = _RECEIPT_RE.fullmatch(receipt) if isinstance(receipt, str) else None
    if m is None:
        shown = repr(receipt) if len(repr(receipt)) <= 80 else repr(receipt)[:77] + "..."
        raise InvalidReceipt(f"{shown} is not a receipt: use a 'receipt' from a receive answer")
    epoch, qidx, offset, token = m.groups()
    return int(epoch, 16), int(qidx), int(offset), int(token, 16)


@dataclass(slots=True)
class InFlight:
    """A delivery not finished, as the console lists it."""

    message: StoredMessage
    topic: str
    offset: int
    attempt: int
    deadline_ms: int
    ready_at_ms: int | None


@dataclass(slots=True)
class Delivery:
    message: StoredMessage
    receipt: str
    attempt: int


class Subscription:
    __slots__ = ("by_name", "config", "cursors", "gone", "retry_topic", "rr", "topic")

    def __init__(self, config: GroupConfig, topic: str, cursors: list[Cursor], retry: str) -> None:
        self.config = config
        self.topic = topic
        self.cursors = cursors
        self.by_name = {(c.topic, c.queue_id): c for c in cursors}
        self.retry_topic = retry
        self.rr = 0
        #: Its group or topic was deleted: a long poll on it ends, its timers do nothing.
        self.gone = False


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
        #: Invisibility deadlines of receive batches, a heap of plain tuples naming deliveries
        #: by cursor index, offset and token, with one timer armed at its head. A timer and a
        #: callback per batch, holding the deliveries themselves, kept every message received
        #: in the last ``invisible_ms`` alive and tracked by the cyclic collector, acknowledged
        #: or not: at 4,000 messages a second and the default 30 s, each full collection walked
        #: 120,000 of them and held the event loop for 40-70 ms. Tuples of ints and strs are
        #: left alone by the collector, and an acknowledged delivery leaves nothing behind.
        self._deadlines: list[_Deadline] = []
        self._deadline_seq = 0
        self._deadline_timer: TimerHandle | None = None
        self._deadline_timer_ms: float = math.inf
        self._epoch = int.from_bytes(os.urandom(4), "big")
        self._token = 0
        self._dirty = False
        self._closing = False
        self._unarmed = False
        #: Set by :meth:`stop`: the timers outlive this manager, and what they still hold for it
        #: must not act on a closed store (each failure would arm a retry, every second, forever).
        self._stopped = False
        self._path = Path(config.data_dir) / _GROUPS_FILE

    # -- persistence ---------------------------------------------------------------------------

    def _journal(self, op: dict[str, Any]) -> tuple[int, asyncio.Future[None]]:
        """Stage one state record; its CommitLog offset and the write to await."""
        self._dirty = True
        return self.store.stage_state(orjson.dumps(op))

    async def restore(self) -> None:
        """Load the snapshot and replay the state records after it (the store is open); then
        arm the timers of the deliveries that were out."""
        self._stopped = False
        loop = asyncio.get_running_loop()
        data, ops = await loop.run_in_executor(None, self._read_state)
        for g in data.get("groups", []):
            self.groups[g["name"]] = GroupConfig(
                g["name"], bool(g["fifo"]), int(g["max_attempts"]), int(g["created_at"])
            )
        state_at = int(data.get("state_at", 0))
        self._saved_offsets = {
            group: {t: q for t, q in topics.items() if not self._deleted_since(t, state_at)}
            for group, topics in data.get("offsets", {}).items()
        }
        for s in data.get("subs", []):
            if self._deleted_since(s["t"], state_at):
                continue  # the topic was deleted after this snapshot
            sub = await self._restored_sub(s["g"], s["t"])
            if sub is None:
                continue
            for c in s["c"]:
                cur = sub.by_name.get((c["ct"], c["q"]))
                if cur is None:
                    continue
                cur.next = int(c["next"])
                for e in c["p"]:
                    p = self._restored_pending(e)
                    if p.finish_at is not None and self.store.has_state_record(p.finish_at):
                        continue  # finished by a record written just after the snapshot
                    p.finish_at = None
                    cur.pending[p.offset] = p
        for phy, op in ops:
            if "t" in op and self._deleted_since(op["t"], phy):
                continue  # about a topic deleted since (perhaps created again)
            await self._apply(op)
        self._unarmed = True  # see resume()
        self._dirty = True  # a fresh snapshot, so the next restart replays from here

    def _deleted_since(self, topic: str, phy: int) -> bool:
        """Was ``topic`` deleted after CommitLog offset ``phy`` (state from there is void)?"""
        tomb = self.store.deleted.get(topic)
        return tomb is not None and phy <= tomb.phy

    def _read_state(self) -> tuple[dict[str, Any], list[tuple[int, dict[str, Any]]]]:
        data: dict[str, Any] = {}
        # Without a snapshot of this format, replay from where this version began writing.
        start = self.store.commitlog.units_from
        if self._path.exists():
            try:
                data = orjson.loads(self._path.read_bytes())
                start = int(data.get("state_at", start))
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
                kept = set_aside(self._path)
                log.error("group.snapshot_unreadable", error=str(e), kept_as=str(kept))
                data, start = {}, self.store.commitlog.min_offset  # rebuild from the records
        ops = [(phy, orjson.loads(body)) for phy, body in self.store.state_records(start)]
        return data, ops

    def _restored_pending(self, e: list[Any]) -> Pending:
        offset, phy, attempt, deadline, ready_at, finish_at, copy_id, copy_at = e
        self._token += 1
        return Pending(
            int(offset),
            int(phy),
            int(attempt),
            self._token,
            int(deadline),
            ready_at,
            finish_at,
            bytes.fromhex(copy_id) if copy_id else None,
            copy_at,
        )

    async def _restored_sub(self, group: str, topic: str) -> Subscription | None:
        if group not in self.groups or topic not in self.store.topics:
            return None  # the topic's records are gone (retention, a lost directory)
        return await self._subscription(group, topic)

    async def _apply(self, op: dict[str, Any]) -> None:  # noqa: C901 - one branch per record
        """Replay one state record (records are applied in log order; each is idempotent)."""
        kind = op["op"]
        if kind == "G":
            if op["n"] not in self.groups:
                self.groups[op["n"]] = GroupConfig(op["n"], op["f"], op["m"], op["c"])
            return
        if kind == "X":
            self._forget_group(op["n"])
            return
        sub = await self._restored_sub(op["g"], op["t"])
        if sub is None:
            return
        cur: Cursor | None
        if kind == "D":
            for ct, q, offset, phy, attempt, deadline in op["d"]:
                cur = sub.by_name.get((ct, q))
                if cur is not None:
                    self._token += 1
                    cur.pending[offset] = Pending(offset, phy, attempt, self._token, deadline)
            for ct, q, nxt in op["n"]:
                cur = sub.by_name.get((ct, q))
                if cur is not None:
                    cur.next = nxt
        elif kind == "A":
            for ct, q, offset in op["a"]:
                cur = sub.by_name.get((ct, q))
                if cur is not None:
                    cur.pending.pop(offset, None)
        elif kind in ("F", "I"):
            cur = sub.by_name.get((op["ct"], op["q"]))
            p = None if cur is None else cur.pending.get(op["off"])
            if p is not None and kind == "F":
                p.attempt, p.ready_at_ms = op["a"], op["r"]
            elif p is not None:
                p.copy_id, p.copy_at_ms = bytes.fromhex(op["id"]), op["at"]
        elif kind == "R":
            for ct, q, nxt in op["n"]:
                cur = sub.by_name.get((ct, q))
                if cur is not None:
                    cur.next = nxt
                    cur.pending.clear()

    def resume(self) -> None:
        """Arm the timers of the deliveries restored by :meth:`restore`, once the scheduler
        their retries go through is wired in (the broker does it; a deadline long past fires
        at once). Idempotent."""
        if self._unarmed:
            self._unarmed = False
            self._arm_restored()

    def _arm_restored(self) -> None:
        """Deliveries out at the last stop: their receipts died with it; they are redelivered
        (attempt + 1) when their invisibility deadline passes, FIFO ones when they are ready."""
        for sub in self._subs.values():
            for cur in sub.cursors:
                cur.order = deque(sorted(cur.pending))
                for p in cur.pending.values():
                    if p.ready_at_ms is not None:
                        self.timers.call_at(p.ready_at_ms, partial(self.wake, {sub.topic}))
                    else:
                        self._expire_at(
                            p.deadline_ms,
                            (sub.config.name, sub.topic),
                            ((cur.index, p.offset, p.token),),
                        )

    def snapshot(self) -> dict[str, object] | None:
        """What to persist (the state as of ``state_at``), or None when nothing changed."""
        if not self._dirty:
            return None
        self._dirty = False
        offsets = {
            g: {t: dict(q) for t, q in topics.items()} for g, topics in self._saved_offsets.items()
        }
        subs = []
        for (group, topic), sub in self._subs.items():
            cursors = []
            for cur in sub.cursors:
                offsets.setdefault(group, {}).setdefault(cur.topic, {})[str(cur.queue_id)] = (
                    cur.committed()
                )
                cursors.append(
                    {
                        "ct": cur.topic,
                        "q": cur.queue_id,
                        "next": cur.next,
                        "p": [p.to_json() for p in cur.pending.values()],
                    }
                )
            subs.append({"g": group, "t": topic, "c": cursors})
        return {
            "version": 2,
            # Records not yet written when the snapshot is taken are replayed over it too
            # (replay is idempotent in log order), and a failed write gives its space back.
            "state_at": self.store.commitlog.written_end,
            "groups": [g.to_json() for g in self.groups.values()],
            "subs": subs,
            "offsets": offsets,
        }

    def save(self, snapshot: dict[str, object]) -> None:
        write_json_atomic(self._path, snapshot)

    # -- groups --------------------------------------------------------------------------------

    async def create_group(
        self, name: object, *, fifo: object = False, max_attempts: object = None
    ) -> GroupConfig:
        """Create a group durably (its record is written before this returns)."""
        group, fut = self._new_group(name, fifo=fifo, max_attempts=max_attempts)
        try:
            await fut
        except StoreUnavailable:
            self.groups.pop(group.name, None)  # not durable: it does not exist
            raise
        # Its dead-letter topic can be read (empty) from now on, not only after a dead letter.
        await self.store.ensure_topic(dlq_topic(group.name), 1)
        return group

    def _new_group(
        self, name: object, *, fifo: object = False, max_attempts: object = None
    ) -> tuple[GroupConfig, asyncio.Future[None]]:
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
            or not (1 <= max_attempts <= MAX_ATTEMPTS)
        ):
            raise InvalidGroup(f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS}")
        if name in self.groups:
            raise GroupExists(f"group {name!r} already exists")
        group = GroupConfig(name, fifo, max_attempts, self.store.clock())
        self.groups[name] = group
        _, fut = self._journal(
            {"op": "G", "n": name, "f": fifo, "m": max_attempts, "c": group.created_at}
        )
        log.info("group.created", group=name, fifo=fifo, max_attempts=max_attempts)
        return group, fut

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
            cfg = await self.create_group(group)
        topic_cfg = self.store.topic(topic)
        await self.store.ensure_topic(dlq_topic(group), 1)  # for a group from an older release
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
            if sub.gone:  # deleted while this long poll waited
                return []
            out, written = self._poll(sub, max_messages, invisible_ms, tags)
            if written is not None:
                await written  # the deliveries (or a cursor moved past filtered ones) are durable
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
                async with asyncio.timeout(remaining_ms / 1000):
                    await fut
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

    def _poll(  # noqa: C901 - the receive hot path, one frame on purpose
        self, sub: Subscription, max_n: int, invisible_ms: int, tags: frozenset[str] | None
    ) -> tuple[list[Delivery], asyncio.Future[None] | None]:
        """Hand out what is ready; returns the deliveries and the write of their record."""
        now = self.timers.now_ms()
        deadline = now + invisible_ms
        tag_hashes = None if tags is None else {tag_hash(t) for t in tags}
        fifo = sub.config.fifo
        store = self.store
        out: list[Delivery] = []
        issued: list[tuple[Cursor, Pending]] = []
        moved: list[Cursor] = []
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
            if cur.next < cq.max_offset:
                moved.append(cur)
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
            self._expire_at(
                deadline,
                (sub.config.name, sub.topic),
                tuple([(c.index, p.offset, p.token) for c, p in issued]),
            )
        if not moved and not issued:
            return out, None
        _, fut = self._journal(
            {
                "op": "D",
                "g": sub.config.name,
                "t": sub.topic,
                "d": [
                    (c.topic, c.queue_id, p.offset, p.phy, p.attempt, p.deadline_ms)
                    for c, p in issued
                ],
                "n": [(c.topic, c.queue_id, c.next) for c in moved],
            }
        )
        return out, fut

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
        """The delivery out under ``receipt`` in ``sub``. Raises :class:`InvalidReceipt` for
        what is not a receipt, and for a well-formed one that names no delivery out here
        :class:`ReceiptMismatch` (live in another group or topic) or :class:`ReceiptExpired`."""
        epoch, qidx, offset, token = parse_receipt(receipt)
        if epoch != self._epoch:
            raise ReceiptExpired(
                f"receipt {receipt!r} is from an earlier server run: its message is delivered again"
            )
        if 0 <= qidx < len(sub.cursors):
            cur = sub.cursors[qidx]
            p = cur.pending.get(offset)
            if p is not None and p.token == token and p.ready_at_ms is None:
                return cur, p
        for (group, topic), other in self._subs.items():
            if other is not sub and 0 <= qidx < len(other.cursors):
                p = other.cursors[qidx].pending.get(offset)
                if p is not None and p.token == token:
                    raise ReceiptMismatch(
                        f"receipt {receipt!r} belongs to group {group!r} on topic {topic!r},"
                        f" not to group {sub.config.name!r} on topic {sub.topic!r}"
                    )
        raise ReceiptExpired(f"receipt {receipt!r} expired or was already acknowledged")

    async def _resolve_all(
        self, topic: str, group: str, receipts: list[object], failed: list[ReceiptFailure] | None
    ) -> tuple[Subscription, list[tuple[Cursor, Pending]]]:
        """The deliveries out under ``receipts``, each once. Every receipt is checked for form
        first (:class:`InvalidReceipt`: nothing done); a stale one goes to ``failed``, or fails
        the call when ``failed`` is None."""
        for r in receipts:
            parse_receipt(r)
        sub = await self._subscription(group, topic)
        resolved: dict[int, tuple[Cursor, Pending]] = {}
        for r in receipts:
            try:
                cur, p = self._resolve(sub, r)
            except (ReceiptExpired, ReceiptMismatch) as e:
                if failed is None:
                    raise
                failed.append(ReceiptFailure(str(r), e.code, e.message))
                continue
            resolved[id(p)] = (cur, p)  # the same receipt twice in one call counts once
        return sub, list(resolved.values())

    # -- ack / nack / timeout ------------------------------------------------------------------

    async def ack(
        self,
        topic: str,
        group: str,
        receipts: list[object],
        *,
        failed: list[ReceiptFailure] | None = None,
    ) -> int:
        """Finish the deliveries; returns how many. Answered once their record is written: an
        acknowledged message is never delivered again, even after a crash.

        Any malformed receipt fails the whole call (nothing acked). A stale one (expired,
        acked, another group's) is appended to ``failed`` while the others are acked; without
        ``failed`` it fails the whole call."""
        sub, resolved = await self._resolve_all(topic, group, receipts, failed)
        finished = []
        for cur, p in resolved:
            del cur.pending[p.offset]
            finished.append((cur.topic, cur.queue_id, p.offset))
        if finished:
            _, fut = self._journal(self._finish_op(sub, finished))
            metrics.ACKED_MESSAGES.inc(len(finished))
            if sub.config.fifo:
                self.wake({topic})
            await fut
        return len(finished)

    @staticmethod
    def _finish_op(sub: Subscription, done: Iterable[tuple[str, int, int]]) -> dict[str, Any]:
        return {"op": "A", "g": sub.config.name, "t": sub.topic, "a": list(done)}

    async def nack(
        self, topic: str, group: str, receipt: object, retry_after_ms: int | None
    ) -> None:
        sub = await self._subscription(group, topic)
        cur, p = self._resolve(sub, receipt)
        await self._fail_delivery(sub, cur, p, retry_after_ms)

    async def nack_all(
        self,
        topic: str,
        group: str,
        receipts: list[object],
        retry_after_ms: int | None,
        failed: list[ReceiptFailure],
    ) -> int:
        """Give back every delivery that can be; returns how many. As for :meth:`ack`, a
        malformed receipt fails the call and a stale one is appended to ``failed``."""
        sub, resolved = await self._resolve_all(topic, group, receipts, failed)
        done = 0
        for cur, p in resolved:
            if cur.pending.get(p.offset) is p and p.token:  # not timed out meanwhile
                await self._fail_delivery(sub, cur, p, retry_after_ms)
                done += 1
        return done

    async def change_invisible(
        self, topic: str, group: str, receipt: object, invisible_ms: int
    ) -> str:
        """RocketMQ's ChangeInvisibleDuration: the delivery stays out under a new receipt,
        invisible until now + ``invisible_ms``; the old receipt stops working. Only if that new
        deadline passes is the message delivered again (attempt + 1), at once: the caller chose
        the wait, so no backoff is added. Not a nack: the attempt is not used up early.
        Answered once its record (a D record with the new deadline) is written."""
        sub = await self._subscription(group, topic)
        cur, old = self._resolve(sub, receipt)
        deadline = self.timers.now_ms() + max(invisible_ms, 0)
        # A new entry under the same offset: the old receipt's token and the old batch timer
        # no longer match it, so neither can finish or fail this delivery.
        again = self._issue(cur, old.offset, old.phy, old.attempt, deadline)
        _, written = self._journal(
            {
                "op": "D",
                "g": sub.config.name,
                "t": sub.topic,
                "d": [(cur.topic, cur.queue_id, again.offset, again.phy, again.attempt, deadline)],
                "n": [],
            }
        )

        async def redeliver() -> None:
            try:
                await self._fail_delivery(sub, cur, again, 0)
            except Exception as e:  # a delivery left without a timer would never come back
                log.error("group.redelivery_failed", group=sub.config.name, reason=str(e))
                self.timers.call_at(self.timers.now_ms() + _REDELIVERY_RETRY_MS, expire)

        def expire() -> None:
            if self._stopped:
                return
            if cur.pending.get(again.offset) is again and again.token and again.ready_at_ms is None:
                task = asyncio.get_running_loop().create_task(redeliver())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        self.timers.call_at(deadline, expire)
        try:
            await written
        except BaseException:
            if cur.pending.get(again.offset) is again:  # not durable: the old receipt stands
                cur.pending[again.offset] = old
            raise
        return self._receipt(sub, cur, again)

    def _expire_at(
        self, deadline_ms: int, key: tuple[str, str], issued: tuple[tuple[int, int, int], ...]
    ) -> None:
        """Fail what of ``issued`` (deliveries of the subscription ``key``) is still out at
        ``deadline_ms``."""
        self._deadline_seq += 1
        heappush(self._deadlines, (deadline_ms, self._deadline_seq, key, issued))
        if deadline_ms < self._deadline_timer_ms:
            self._arm_deadlines(deadline_ms)

    def _arm_deadlines(self, at_ms: int | None) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        if at_ms is None:
            self._deadline_timer, self._deadline_timer_ms = None, math.inf
        else:
            self._deadline_timer = self.timers.call_at(at_ms, partial(self._deadlines_due, at_ms))
            self._deadline_timer_ms = at_ms

    def _deadlines_due(self, due_ms: int) -> None:
        """The deadline timer, armed for ``due_ms`` (epoch ms): expire the receive batches due
        by then or by now, at most ``_EXPIRE_CHUNK`` per turn of the loop, then arm the timer at
        the next. The timers' own time decides what is due: after the wall clock stepped back,
        ``now_ms()`` reads earlier than a time they already hold as past, and arming again at
        such a time would run this at once, again and again, until the clock caught up."""
        self._arm_deadlines(None)
        if self._stopped:
            return
        now = max(self.timers.now_ms(), due_ms)
        heap, subs = self._deadlines, self._subs
        for _ in range(_EXPIRE_CHUNK):
            if not heap or heap[0][0] > now:
                break
            _at, _seq, key, issued = heappop(heap)
            sub = subs.get(key)
            if sub is None or sub.gone:
                continue
            cursors = sub.cursors
            out = []
            for qidx, offset, token in issued:
                if qidx < len(cursors):
                    cur = cursors[qidx]
                    p = cur.pending.get(offset)
                    if p is not None and p.token == token:
                        out.append((cur, p))
            if out:
                self._expire(sub, out)
        else:
            asyncio.get_running_loop().call_soon(self._deadlines_due, now)
            return
        if heap:
            self._arm_deadlines(heap[0][0])

    def _expire(self, sub: Subscription, issued: list[tuple[Cursor, Pending]]) -> None:
        """Invisibility timer of one receive batch: what is still out has failed."""
        if self._stopped:
            return
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
                except Exception as e:  # a delivery left without a timer would never come back
                    log.error(
                        "group.redelivery_failed",
                        group=sub.config.name,
                        reason=str(e) or type(e).__name__,
                        retry_in_ms=_REDELIVERY_RETRY_MS,
                    )
                    self.timers.call_at(
                        self.timers.now_ms() + _REDELIVERY_RETRY_MS,
                        partial(self._expire, sub, [(cur, p)]),
                    )

    async def _fail_delivery(
        self, sub: Subscription, cur: Cursor, p: Pending, retry_after_ms: int | None
    ) -> None:
        now = self.timers.now_ms()
        cfg = sub.config
        metrics.NACKED_MESSAGES.inc()
        if cfg.fifo and p.attempt < cfg.max_attempts:
            wait = retry_after_ms if retry_after_ms is not None else self._backoff(p.attempt)
            p.ready_at_ms = now + max(wait, 0)
            _, fut = self._journal(
                {
                    "op": "F",
                    "g": cfg.name,
                    "t": sub.topic,
                    "ct": cur.topic,
                    "q": cur.queue_id,
                    "off": p.offset,
                    "a": p.attempt,
                    "r": p.ready_at_ms,
                }
            )
            self.timers.call_at(p.ready_at_ms, partial(self.wake, {sub.topic}))
            await fut
            return
        msg = self.store.read(p.phy)
        token = p.token
        p.token = 0  # receipt dead; the offset stays unfinished until the copy is stored
        try:
            await self._store_copy(sub, cur, p, msg, now, retry_after_ms)
        except BaseException:
            p.token = token  # not stored: the delivery stays out and times out again
            p.finish_at = None
            raise
        if cur.pending.get(p.offset) is p:
            del cur.pending[p.offset]
        self._dirty = True
        if cfg.fifo:
            self.wake({sub.topic})

    async def _store_finishing(
        self, p: Pending, copy: Message, finish: dict[str, Any], *, check_duplicate: bool
    ) -> None:
        """Stage ``copy`` and the record ``finish`` that ends ``p`` in one write (both are
        stored, or neither) and wait for it."""
        _, waits = self.store.stage([copy], check_duplicate=check_duplicate)
        p.finish_at, fut = self._journal(finish)
        for w in waits:
            await w
        await fut

    async def _store_copy(
        self,
        sub: Subscription,
        cur: Cursor,
        p: Pending,
        msg: StoredMessage | None,
        now: int,
        retry_after_ms: int | None,
    ) -> None:
        """Store the retry or dead-letter copy of a failed delivery and the record that
        finishes the delivery, so that after any crash the copy exists exactly once."""
        cfg = sub.config
        finish = self._finish_op(sub, [(cur.topic, cur.queue_id, p.offset)])
        if msg is None:  # gone (retention) or damaged: nothing to redeliver
            p.finish_at, fut = self._journal(finish)
            await fut
            return
        plan = plan_redelivery(
            msg,
            group=cfg.name,
            attempt=p.attempt,
            max_attempts=cfg.max_attempts,
            schedule=self.config.backoff_ms,
            now_ms=now,
            retry_after_ms=retry_after_ms,
        )
        deliver_at = plan.deliver_at_ms if p.copy_at_ms is None else p.copy_at_ms
        # A copy already handed to the scheduler (record I) goes through it again under the same
        # id, even when its time has passed: the scheduler may hold it from before a crash, and
        # only the same id keeps it from being stored twice.
        direct = p.copy_id is None and (deliver_at <= now or self.scheduler is None)
        if plan.dead or direct:
            if plan.dead:
                await self.store.ensure_topic(dlq_topic(cfg.name), 1)
            await self._store_finishing(p, plan.message, finish, check_duplicate=False)
            if plan.dead:
                metrics.DLQ_MESSAGES.inc()
                log.warning(
                    "group.dead_letter",
                    group=cfg.name,
                    msg_id=msg.origin_msg_id,
                    attempts=p.attempt,
                )
            return
        if self.scheduler is None:  # a restored copy, and no scheduler: stored at once, once
            plan.message.msg_id = p.copy_id or b""
            await self._store_finishing(p, plan.message, finish, check_duplicate=True)
            return
        if p.copy_id is None:  # first try: choose the copy's id and time, durably
            p.copy_id, p.copy_at_ms = self.scheduler.new_msg_id(), deliver_at
            _, fut = self._journal(
                {
                    "op": "I",
                    "g": cfg.name,
                    "t": sub.topic,
                    "ct": cur.topic,
                    "q": cur.queue_id,
                    "off": p.offset,
                    "id": p.copy_id.hex(),
                    "at": deliver_at,
                }
            )
            await fut
        plan.message.msg_id = p.copy_id
        # Idempotent by msg_id: a retry scheduled again after a crash keeps its first time.
        await self.scheduler.schedule([plan.message], [deliver_at])
        p.finish_at, fut = self._journal(finish)
        await fut

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
        _, fut = self._journal(
            {
                "op": "R",
                "g": group,
                "t": topic,
                "n": [(topic, q["queue_id"], q["offset"]) for q in out],
            }
        )
        self.wake({topic})
        log.info("group.reset", group=group, topic=topic, timestamp=timestamp_ms)
        await fut
        return out

    async def delete_group(self, name: str) -> None:
        """Forget group ``name`` durably (record X): its config, cursors and offsets. Its retry
        and dead-letter topics stay, as stored messages do; receipts it handed out expire."""
        if name not in self.groups:
            raise GroupNotFound(f"group {name!r} does not exist")
        # Forgotten in the same step as its record is staged, like every change of state, so a
        # snapshot never holds a group whose deletion it does not replay.
        cfg, saved = self.groups[name], self._saved_offsets.get(name)
        subs = {k: v for k, v in self._subs.items() if k[0] == name}
        _, fut = self._journal({"op": "X", "n": name})
        self._forget_group(name)
        try:
            await fut
        except StoreUnavailable:  # not durable: the group stays
            self.groups[name] = cfg
            self._subs.update(subs)
            if saved is not None:
                self._saved_offsets[name] = saved
            raise
        log.info("group.deleted", group=name)

    def _forget_group(self, name: str) -> None:
        self.groups.pop(name, None)
        for key in [k for k in self._subs if k[0] == name]:
            self._drop_sub(self._subs.pop(key))
        self._saved_offsets.pop(name, None)
        self._dirty = True

    def _drop_sub(self, sub: Subscription) -> None:
        """A subscription whose group or topic is deleted: its deliveries out are forgotten
        (their receipts expire and their invisibility timers do nothing, so no retry copy is
        made), and long polls on it return."""
        sub.gone = True
        for cur in sub.cursors:
            cur.pending.clear()
            cur.order.clear()
        self.wake({sub.topic, sub.retry_topic})

    def forget_topic(self, topic: str) -> list[str]:
        """Forget every group's state on ``topic``, which is being deleted: subscriptions,
        deliveries out, saved offsets. Returns the groups that had state on it. Not journalled:
        the topic's tombstone voids that state on restart (see :meth:`restore`)."""
        groups = set()
        for key in [k for k in self._subs if k[1] == topic]:
            groups.add(key[0])
            self._drop_sub(self._subs.pop(key))
        for group, offsets in self._saved_offsets.items():
            if offsets.pop(topic, None) is not None:
                groups.add(group)
            offsets.pop(retry_topic(group, topic), None)
        self._dirty = True
        return sorted(groups)

    def subscriptions(self, group: str) -> list[str]:
        """The topics ``group`` has received from since the server started or it was saved."""
        topics = {t for g, t in self._subs if g == group}
        topics.update(t for t in self._saved_offsets.get(group, {}) if t in self.store.topics)
        return sorted(t for t in topics if not is_system_topic(t))

    async def inflight(self, topic: str, group: str, limit: int) -> list[InFlight]:
        """Up to ``limit`` deliveries of ``group`` on ``topic`` not yet acked, oldest offset
        first per queue: out now (with their invisibility deadline), or failed and waiting for
        their redelivery (FIFO). Reads only the messages it returns."""
        sub = await self._subscription(group, topic)
        out: list[InFlight] = []
        for cur in sub.cursors:
            for offset in sorted(cur.pending):
                if len(out) >= limit:
                    return out
                p = cur.pending[offset]
                if not p.token:
                    continue  # its redelivery copy is being stored
                msg = self.store.read(p.phy)
                if msg is not None:
                    out.append(
                        InFlight(msg, cur.topic, offset, p.attempt, p.deadline_ms, p.ready_at_ms)
                    )
        return out

    def consumed_by(self, topic: str, queue_id: int, offset: int) -> list[dict[str, object]]:
        """Each group subscribed to ``topic`` and where it stands with the message at
        ``offset`` of queue ``queue_id``: ``acked``, ``inflight`` (with its attempt) or
        ``waiting``."""
        out: list[dict[str, object]] = []
        for (group, t), sub in sorted(self._subs.items()):
            if t != topic:
                continue
            for cur in sub.cursors:
                if cur.topic != topic or cur.queue_id != queue_id:
                    continue
                p = cur.pending.get(offset)
                entry: dict[str, object] = {"group": group}
                if p is not None:
                    entry.update(state="inflight", delivery_attempt=p.attempt)
                elif offset < cur.next:  # handed out and finished
                    entry["state"] = "acked"
                else:
                    entry["state"] = "waiting"
                out.append(entry)
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
        self._stopped = True
        self._arm_deadlines(None)
        self._deadlines.clear()
        await cancel_and_wait(self._tasks)
        for waiters in self._waiters.values():
            for f in waiters:
                if not f.done():
                    f.cancel()
        self._waiters.clear()
