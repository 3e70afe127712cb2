"""The message store: puts with group commit, dispatch to ConsumeQueues and the index, reads,
topics, recovery and retention. The IO shell around the CommitLog and its derived files.

Put path (event loop, no await per message): validate, assign id, queue and queue offset,
reserve CommitLog space, frame the record, append it to the pending batch. One writer task hands
each batch to the writer thread (one ``pwrite``, one fdatasync in ``sync`` mode), then dispatches
the batch into ConsumeQueues and the index and resolves the one future every put of the batch
awaits. A record is therefore readable through a ConsumeQueue only after it is on disk (``sync``)
or in the OS (``async``): consumers never see what a crash could take back in that mode.

Each write ends with a unit marker, so a batch is stored all or nothing (see
:mod:`broker_core.commitlog`). A failed write (disk full, I/O error) fails every put it carried
and those queued behind it with ``503 store_unavailable`` naming the cause, gives their space and
queue offsets back, and leaves the store taking puts: while the disk stays full each write is
refused after a cheap allocation probe, and the first probe that succeeds (on the next put, or
within a second when idle) heals the store without a restart.

Consumer state (``broker_core.groups``) is journalled as records flagged
:data:`~broker_core.codec.FLAG_STATE` in the same CommitLog, written in the same group commits as
messages (:meth:`MessageStore.stage_state`), and never dispatched to a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson
import structlog

from broker_core import codec, metrics
from broker_core.commitlog import CommitLog, FileIO
from broker_core.config import BrokerConfig
from broker_core.consumequeue import ConsumeQueue, tag_hash
from broker_core.errors import (
    InvalidTopic,
    MessageTooLarge,
    StoreUnavailable,
    TopicExists,
    TopicNotFound,
)
from broker_core.index import Index
from broker_core.message import (
    PROP_DELIVER_AT,
    PROP_RETRY_TOPIC,
    Message,
    MsgIdGenerator,
    StoredMessage,
    is_system_topic,
    validate_topic_name,
)
from broker_core.protocols import FirstSend

log = structlog.get_logger(__name__)

_CHECKPOINT = "checkpoint.json"
_TOPICS = "topics.json"
#: Tombstones of deleted topics (see :meth:`MessageStore.delete_topic`).
_DELETED = "deleted-topics.json"
#: Topic name carried by consumer-state records (never a real topic, never dispatched).
STATE_TOPIC = "SYS_CONSUMER_STATE"
_HEAL_PROBE_S = 1.0


#: What dispatch needs of a written record: topic, queue, queue offset, CommitLog offset, size,
#: tag hash, msg_id, keys.
_Dispatch = tuple[str, int, int, int, int, int, bytes, tuple[str, ...]]


def _is_message(view: codec.Buffer, pos: int) -> bool:
    return not codec.record_flags(view, pos) & codec.FLAG_STATE


def _is_state(view: codec.Buffer, pos: int) -> bool:
    return bool(codec.record_flags(view, pos) & codec.FLAG_STATE)


@dataclass(slots=True, frozen=True)
class TopicConfig:
    name: str
    queues: int
    created_at: int

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "queues": self.queues, "created_at": self.created_at}


@dataclass(slots=True, frozen=True)
class Tombstone:
    """A deleted topic: which one (its name and ``created_at``), when (``deleted_at``, epoch
    ms) and where the CommitLog stood then (``phy``): every record of that name before ``phy``
    belongs to it and is never dispatched, found or delivered again."""

    name: str
    created_at: int
    deleted_at: int
    phy: int

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "created_at": self.created_at,
            "deleted_at": self.deleted_at,
            "phy": self.phy,
        }


class PutResult(NamedTuple):
    # A tuple rather than a dataclass: one is built per message on the put path.
    msg_id: bytes
    topic: str
    queue_id: int
    queue_offset: int
    phy_offset: int
    #: True when the id was already stored in that topic and this put changed nothing.
    duplicate: bool = False


def _first_send(m: Message | StoredMessage, queue_id: int) -> FirstSend:
    """A stored message as the first send of its id: a released delayed message answers its
    delivery time, any other the time it was sent (when it was delivered)."""
    props = m.properties
    deliver_at = props.get(PROP_DELIVER_AT) if props else None
    if deliver_at is None:
        return FirstSend(m.topic, queue_id, m.born_at, False)
    return FirstSend(m.topic, queue_id, int(deliver_at), True)


class _CommitFuture(asyncio.Future[None]):
    """The future every put of one group commit awaits. It refuses cancellation, so a caller
    that is cancelled while waiting (a client hung up) cannot cancel the batch for the other
    callers; that caller sees its CancelledError once the write is done."""

    def cancel(self, msg: object = None) -> bool:
        return False


def write_json_atomic(path: Path, data: object) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def set_aside(path: Path) -> Path:
    """Rename an unreadable file out of the way (kept for inspection); its new path."""
    kept = path.with_name(f"{path.name}.unreadable-{time.time_ns() // 1_000_000}")
    path.replace(kept)
    return kept


def _nothing() -> None:
    """Run on a pool to wait for what it is running now."""


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


#: In async flush mode a pending write up to this size is written on the event loop itself
#: (a ``pwrite`` into the page cache, microseconds); larger ones and every write in sync mode
#: (which waits for ``fdatasync``) go to the writer thread.
INLINE_WRITE_BYTES = 64 * 1024


class MessageStore:
    def __init__(
        self,
        config: BrokerConfig,
        *,
        clock: Callable[[], int] = now_ms,
        io: FileIO | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        root = Path(config.data_dir)
        self.root = root
        self.commitlog = CommitLog(root / "commitlog", segment_bytes=config.segment_bytes, io=io)
        self.index = Index(root / "index", slots=config.index_slots, capacity=config.index_entries)
        self.topics: dict[str, TopicConfig] = {}
        #: The latest tombstone of each deleted topic name (re-created or not).
        self.deleted: dict[str, Tombstone] = {}
        self._tombstones: list[Tombstone] = []
        self._deleting: set[str] = set()
        self._cqs: dict[tuple[str, int], ConsumeQueue] = {}
        self._next_qoff: dict[tuple[str, int], int] = {}
        self._rr: dict[str, int] = {}
        self._ids = MsgIdGenerator()
        self._sync = config.flush == "sync"
        # Pending batch: records waiting for the writer, what to dispatch after the write, and
        # the one future all their puts await.
        self._buf: list[bytes] = []
        self._buf_start = 0
        self._buf_dispatch: list[_Dispatch] = []
        self._buf_future: _CommitFuture | None = None
        self._buf_records = 0
        #: Client-supplied ids of records not yet written: each one's result, the write its put
        #: awaits and the message.
        self._pending_ids: dict[bytes, tuple[PutResult, _CommitFuture, Message]] = {}
        self._wake_writer: asyncio.Event | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._write_pool = ThreadPoolExecutor(1, thread_name_prefix="tempomq-write")
        self._flush_pool = ThreadPoolExecutor(1, thread_name_prefix="tempomq-flush")
        self._failure: str | None = None
        #: A body up to this size fits a segment whatever the rest of the record holds.
        self._body_fits = config.segment_bytes - codec.MAX_OVERHEAD
        self._closing = False
        #: Called after each dispatched batch with the topics that got new messages.
        self.on_dispatch: Callable[[set[str]], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._flush_pool, self._open)
        self._wake_writer = asyncio.Event()
        self._writer_task = asyncio.create_task(self._writer(), name="tempomq-commitlog-writer")

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        checkpoint = self._read_checkpoint()
        scan_from = checkpoint.get("dispatched")
        end = self.commitlog.open(scan_from=None if scan_from is None else int(scan_from))
        self._buf_start = end
        self._load_tombstones()
        topics_ok = self._load_topics()
        self.index.load()
        for topic in self.topics.values():
            for q in range(topic.queues):
                self._cq(topic.name, q)
        index_max_phy = self.index.max_phy
        for cq in self._cqs.values():
            cq.truncate_to(end)
        cq_total = sum(cq.max_offset for cq in self._cqs.values())
        start = min(int(checkpoint.get("dispatched", 0)), end)
        if (
            not checkpoint
            or cq_total < int(checkpoint.get("cq_entries", 0))
            or self.index.entry_count < int(checkpoint.get("index_entries", 0))
            or not topics_ok
        ):
            start = self.commitlog.min_offset  # derived files were lost: rebuild everything
        n = self._redispatch(start, end, index_max_phy)
        floor = self.commitlog.min_offset
        for key, cq in self._cqs.items():
            cq.drop_before(floor)  # entries whose records retention deleted
            self._next_qoff[key] = cq.max_offset
        log.info(
            "store.opened",
            commitlog_end=end,
            redispatched=n,
            redispatch_from=start,
            topics=len(self.topics),
        )

    def _redispatch(self, start: int, end: int, index_max_phy: int) -> int:
        """Feed records in ``[start, end)`` to the ConsumeQueues and index, idempotently."""
        n = 0
        deleted = self.deleted
        for phy, view, pos in self.commitlog.iter_records(start, end, include=_is_message):
            m = codec.decode(view, pos)
            tomb = deleted.get(m.topic)
            if tomb is not None and phy < tomb.phy:
                continue  # a record of a topic deleted since
            if m.topic not in self.topics:
                # topics.json lost or older than the log: learn the topic from its records.
                self.topics[m.topic] = TopicConfig(m.topic, max(m.queue_id + 1, 1), m.stored_at)
            topic = self.topics[m.topic]
            if m.queue_id >= topic.queues:
                self.topics[m.topic] = TopicConfig(topic.name, m.queue_id + 1, topic.created_at)
            cq = self._cq(m.topic, m.queue_id)
            if m.queue_offset > cq.max_offset and cq.max_offset > cq.min_offset:
                log.warning("store.queue_gap", topic=m.topic, queue=m.queue_id, at=m.queue_offset)
            cq.put(m.queue_offset, phy, m.size, tag_hash(m.tags))
            if phy > index_max_phy:
                self.index.add(phy, m.msg_id, m.topic, m.keys)
            n += 1
        if n:
            write_json_atomic(self.root / _TOPICS, self._topics_json())
        return n

    async def stop(self) -> None:
        """Write what was acknowledged or is pending, flush everything, mark a clean stop."""
        self._closing = True
        if self._writer_task is not None:
            assert self._wake_writer is not None
            self._wake_writer.set()  # the writer drains what is pending, then returns
            await self._writer_task
            self._writer_task = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._flush_pool, self._close)
        self._write_pool.shutdown(wait=True)
        self._flush_pool.shutdown(wait=True)

    def _close(self) -> None:
        clean = self._failure is None
        self._checkpoint_sync(self._checkpoint_mark())
        for cq in self._cqs.values():
            cq.close()
        self.index.close()
        self.commitlog.close(clean=clean)

    @property
    def failure(self) -> str | None:
        return self._failure

    # -- topics ----------------------------------------------------------------------------------

    def _load_topics(self) -> bool:
        """Load topics.json; False when it is unreadable (set aside, topics relearned from the
        CommitLog's records)."""
        path = self.root / _TOPICS
        if not path.exists():
            return True
        try:
            loaded = [
                TopicConfig(t["name"], int(t["queues"]), int(t["created_at"]))
                for t in orjson.loads(path.read_bytes())
            ]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            kept = set_aside(path)
            log.error("store.topics_unreadable", error=str(e), kept_as=str(kept))
            return False
        self.topics.update((t.name, t) for t in loaded)
        deleted = {(t.name, t.created_at) for t in self._tombstones}
        for t in loaded:
            if (t.name, t.created_at) in deleted:
                # A crash between the tombstone and topics.json: the deletion stands.
                del self.topics[t.name]
        return True

    def _load_tombstones(self) -> None:
        path = self.root / _DELETED
        if not path.exists():
            return
        try:
            self._tombstones = [
                Tombstone(t["name"], int(t["created_at"]), int(t["deleted_at"]), int(t["phy"]))
                for t in orjson.loads(path.read_bytes())
            ]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            # Without them deleted topics could come back from their records: refuse to start
            # rather than deliver what was deleted.
            raise StoreUnavailable(f"{path} is unreadable ({e}); restore it from a backup") from e
        for t in self._tombstones:
            if t.name not in self.deleted or self.deleted[t.name].phy <= t.phy:
                self.deleted[t.name] = t
        for name in self.deleted:
            if name not in self.topics:
                _remove_tree(self.root / "consumequeue" / name)  # a crash before its removal

    async def delete_topic(self, name: str) -> Tombstone:
        """Delete topic ``name`` durably: it is refused from now on, its ConsumeQueues go, and
        its records (which stay in the CommitLog until retention removes their segment) are
        never dispatched, looked up or delivered again, also after a restart. The name can be
        created again, fresh. Raises :class:`TopicNotFound`, or ``StoreUnavailable`` when the
        deletion could not be saved (the topic then stays)."""
        topic = self.topic(name)
        self._deleting.add(name)
        try:
            return await self._delete_topic(topic)
        finally:
            self._deleting.discard(name)

    async def _delete_topic(self, topic: TopicConfig) -> Tombstone:
        name = topic.name
        # Every record staged before this point (in flight to disk included) lies below phy.
        tomb = Tombstone(name, topic.created_at, self.clock(), self.commitlog.reserved_end)
        del self.topics[name]
        # Tombstoned at once: lookups hide its records and releases for it are dropped, rather
        # than re-creating it, while the files are written.
        prior = self.deleted.get(name)
        self.deleted[name] = tomb
        tombstones = [*self._tombstones, tomb]
        loop = asyncio.get_running_loop()
        try:
            # Tombstone first: a crash before topics.json is rewritten still finds it deleted.
            await loop.run_in_executor(
                self._flush_pool,
                write_json_atomic,
                self.root / _DELETED,
                [t.to_json() for t in tombstones],
            )
            await loop.run_in_executor(
                self._flush_pool, write_json_atomic, self.root / _TOPICS, self._topics_json()
            )
        except OSError as e:
            self.topics[name] = topic
            if prior is None:
                del self.deleted[name]
            else:
                self.deleted[name] = prior
            raise StoreUnavailable(f"cannot delete topic {name!r}: {e.strerror or e}") from e
        self._tombstones = tombstones
        cqs = [self._cqs.pop((name, q)) for q in range(topic.queues) if (name, q) in self._cqs]
        for q in range(topic.queues):
            self._next_qoff.pop((name, q), None)
        self._rr.pop(name, None)
        # Closed once no thread can be using them: a write in flight may have taken them before
        # they left _cqs (later writes skip queues that are gone), a checkpoint in flight too.
        await loop.run_in_executor(self._write_pool, _nothing)
        await loop.run_in_executor(self._flush_pool, self._drop_queues, name, cqs)
        await self.flush()  # a checkpoint without its entries, so a restart need not rebuild
        log.info("topic.deleted", topic=name, phy=tomb.phy)
        return tomb

    def _drop_queues(self, name: str, cqs: list[ConsumeQueue]) -> None:
        for cq in cqs:
            cq.close()
        _remove_tree(self.root / "consumequeue" / name)

    def is_orphan(self, msg: Message) -> bool:
        """Is ``msg`` (a delayed message due, a committed transaction's message, a retry copy)
        meant for a topic deleted after it was sent? Such a message is dropped, not delivered:
        its topic is gone, or is a new topic of the same name (created after ``born_at``).
        A retry copy is checked against its retry topic and the topic it retries."""
        topic = msg.topic
        tomb = self.deleted.get(topic)
        if tomb is not None:
            current = self.topics.get(topic)
            if current is None:
                return True
            if not is_system_topic(topic) and msg.born_at < current.created_at:
                return True
        real = msg.properties.get(PROP_RETRY_TOPIC) if msg.properties else None
        return (
            real is not None
            and real != topic
            and self.is_orphan(Message(real, b"", born_at=msg.born_at))
        )

    def _visible(self, m: StoredMessage) -> bool:
        """Is this stored record one of a live topic (not of a topic deleted since)?"""
        tomb = self.deleted.get(m.topic)
        return tomb is None or m.phy_offset >= tomb.phy

    def _topics_json(self) -> list[dict[str, object]]:
        return [t.to_json() for t in sorted(self.topics.values(), key=lambda t: t.name)]

    async def create_topic(self, name: str, queues: int, *, client: bool = True) -> TopicConfig:
        validate_topic_name(name, client=client)
        if (
            isinstance(queues, bool)
            or not isinstance(queues, int)
            or not (1 <= queues <= self.config.max_queues)
        ):
            raise InvalidTopic(f"queues must be an integer from 1 to {self.config.max_queues}")
        if name in self.topics:
            raise TopicExists(f"topic {name!r} already exists")
        if name in self._deleting:
            raise TopicExists(f"topic {name!r} is being deleted: create it again in a moment")
        topic = TopicConfig(name, queues, self.clock())
        self.topics[name] = topic
        try:
            if name in self.deleted:  # a topic of that name was deleted: start empty
                await asyncio.get_running_loop().run_in_executor(
                    self._write_pool, _remove_tree, self.root / "consumequeue" / name
                )
            for q in range(queues):
                self._next_qoff[(name, q)] = self._cq(name, q).max_offset
            await asyncio.get_running_loop().run_in_executor(
                self._flush_pool, write_json_atomic, self.root / _TOPICS, self._topics_json()
            )
        except OSError as e:  # disk full: the topic does not exist (it could not be saved)
            del self.topics[name]
            raise StoreUnavailable(f"cannot save topic {name!r}: {e.strerror or e}") from e
        log.info("topic.created", topic=name, queues=queues)
        return topic

    async def ensure_topic(self, name: str, queues: int) -> TopicConfig:
        """Internal topics (retry, DLQ, system) exist on first use."""
        topic = self.topics.get(name)
        if topic is None:
            try:
                topic = await self.create_topic(name, queues, client=False)
            except TopicExists:
                found = self.topics.get(name)
                if found is None:  # being deleted just now
                    raise StoreUnavailable(
                        f"topic {name!r} is being deleted; try again in a moment"
                    ) from None
                topic = found
        return topic

    def topic(self, name: str) -> TopicConfig:
        topic = self.topics.get(name)
        if topic is None:
            raise TopicNotFound(f"topic {name!r} does not exist")
        return topic

    def _cq(self, topic: str, queue_id: int) -> ConsumeQueue:
        cq = self._cqs.get((topic, queue_id))
        if cq is None:
            cq = ConsumeQueue(
                self.root / "consumequeue" / topic / str(queue_id),
                topic,
                queue_id,
                per_file=self.config.cq_entries_per_file,
            )
            cq.load()
            self._cqs[(topic, queue_id)] = cq
        return cq

    def consume_queue(self, topic: str, queue_id: int) -> ConsumeQueue:
        return self._cqs[(topic, queue_id)]

    # -- put -------------------------------------------------------------------------------------

    def new_msg_id(self) -> bytes:
        return self._ids.next(self.clock())

    def select_queue(self, topic: TopicConfig, sharding_key: str | None) -> int:
        if sharding_key:
            return zlib.crc32(sharding_key.encode()) % topic.queues
        n = self._rr.get(topic.name, 0)
        self._rr[topic.name] = n + 1
        return n % topic.queues

    async def put(self, msg: Message, *, check_duplicate: bool = False) -> PutResult:
        return (await self.put_many((msg,), check_duplicate=check_duplicate))[0]

    async def put_many(
        self, msgs: Sequence[Message], *, check_duplicate: bool = False, checked: bool = False
    ) -> list[PutResult]:
        """Store ``msgs`` (topics must exist). With ``check_duplicate``, a message whose
        ``msg_id`` is already in its topic is not stored again; its first result is returned.
        ``checked``: the caller has just looked every id up (:meth:`first_send`, holding it:
        :mod:`broker_core.claims`) and found none, so they are not looked up again; they are
        still known as being written, as with ``check_duplicate``."""
        if self._closing:
            raise StoreUnavailable("the store is shutting down")
        results, waits = self.stage(msgs, check_duplicate=check_duplicate, checked=checked)
        for fut in waits:
            await fut
        return results

    def stage(  # noqa: C901 - the put hot path, one frame on purpose
        self, msgs: Iterable[Message], *, check_duplicate: bool = False, checked: bool = False
    ) -> tuple[list[PutResult], list[_CommitFuture]]:
        """Append ``msgs`` to the pending write; returns their results and the writes to await
        (this batch's, and those of in-flight originals that a duplicate refers to). What one
        call (and any :meth:`stage_state` in the same step of the event loop) stages goes out
        in one write: all of it is stored, or none."""
        now = self.clock()
        buf = self._buf
        dispatch = self._buf_dispatch
        topics = self.topics
        next_qoff = self._next_qoff
        results: list[PutResult] = []
        for m in msgs:  # all or nothing: check every message before appending anything
            if m.topic not in topics:
                raise TopicNotFound(f"topic {m.topic!r} does not exist")
            if len(m.body) > self._body_fits:
                self._check_fits(m)
        rr = self._rr
        encode_record, dumps = codec.encode_record, orjson.dumps
        waits: list[_CommitFuture] = []
        batch = self._buf_future
        if batch is None:
            batch = self._buf_future = _CommitFuture()
        appended = 0
        new_id = self._ids.next
        place = self._place

        for m in msgs:
            topic = topics[m.topic]
            if not m.msg_id:
                m.msg_id = new_id(now)
            elif check_duplicate and not checked:
                prior = self._prior_put(m, waits)
                if prior is not None:
                    results.append(prior)
                    continue
            qid = m.queue_id
            if qid < 0 or qid >= topic.queues:
                n = rr.get(m.topic, 0)
                rr[m.topic] = n + 1
                qid = m.queue_id = n % topic.queues
            if not m.born_at:
                m.born_at = now
            key = (m.topic, qid)
            qoff = next_qoff[key]
            next_qoff[key] = qoff + 1
            record = encode_record(
                m, dumps(m.properties) if m.properties else b"", qoff, now, place
            )
            phy = self.commitlog.reserved_end - len(record)
            size = len(record)
            buf.append(record)
            appended += 1
            tags = m.tags
            dispatch.append(
                (m.topic, qid, qoff, phy, size, tag_hash(tags) if tags else 0, m.msg_id, m.keys)
            )
            result = PutResult(m.msg_id, m.topic, qid, qoff, phy)
            if check_duplicate:
                self._pending_ids[m.msg_id] = (result, batch, m)
            results.append(result)
        if appended:
            self._buf_records += appended
            assert self._wake_writer is not None
            self._wake_writer.set()
            if batch not in waits:
                waits.append(batch)
        return results, waits

    def _place(self, size: int) -> int:
        """Reserve CommitLog space for a frame of ``size`` bytes in the pending write."""
        phy, filler = self.commitlog.reserve(size)
        if filler is not None:
            self._buf.append(filler)
        return phy

    def stage_state(self, payload: bytes) -> tuple[int, asyncio.Future[None]]:
        """Append a consumer-state record to the pending write. Returns its CommitLog offset
        and the write to await; see :meth:`stage` for what goes out together."""
        if self._closing:
            raise StoreUnavailable("the store is shutting down")
        batch = self._buf_future
        if batch is None:
            batch = self._buf_future = _CommitFuture()
        m = Message(topic=STATE_TOPIC, body=payload, flags=codec.FLAG_STATE, queue_id=0)
        record = codec.encode_record(m, b"", 0, self.clock(), self._place)
        self._buf.append(record)
        self._buf_records += 1
        assert self._wake_writer is not None
        self._wake_writer.set()
        return self.commitlog.reserved_end - len(record), batch

    def state_records(self, start: int) -> list[tuple[int, bytes]]:
        """Consumer-state records from ``start`` to the end of the log: (offset, payload)."""
        out = []
        for phy, view, pos in self.commitlog.iter_records(
            max(start, self.commitlog.min_offset), self.commitlog.written_end, include=_is_state
        ):
            out.append((phy, codec.decode(view, pos).body))
        return out

    def has_state_record(self, phy_offset: int) -> bool:
        """Is a valid consumer-state record stored at ``phy_offset``?"""
        if not self.commitlog.min_offset <= phy_offset < self.commitlog.written_end:
            return False
        found = self.commitlog.check(phy_offset)
        return found is not None and _is_state(*found)

    def _check_fits(self, m: Message) -> None:
        """Exact size check for a body large enough that the record might not fit a segment."""
        size = codec.record_size(m, codec.encode_properties(m.properties))
        if size > self.commitlog.segment_bytes:
            raise MessageTooLarge(
                f"a record of {size} bytes does not fit a CommitLog segment "
                f"({self.commitlog.segment_bytes} bytes)"
            )

    def _prior_put(self, m: Message, waits: list[_CommitFuture]) -> PutResult | None:
        """The earlier put of ``m.msg_id`` in ``m.topic``, if any. One still being written adds
        its write to ``waits``: the duplicate is acknowledged only when the original is."""
        in_flight = self._pending_ids.get(m.msg_id)
        if in_flight is not None and in_flight[0].topic == m.topic:
            if in_flight[1] not in waits:
                waits.append(in_flight[1])
            return in_flight[0]._replace(duplicate=True)
        return self.find_in_topic(m.msg_id, m.topic)

    async def _writer(self) -> None:
        """The one task that moves pending batches to disk, in order."""
        assert self._wake_writer is not None
        loop = asyncio.get_running_loop()
        write = self._prepare_and_write
        while True:
            if self._failure is None:
                await self._wake_writer.wait()
            else:  # failed: probe now and then even with nothing to write, to heal
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_HEAL_PROBE_S):
                        await self._wake_writer.wait()
                await self._heal()
            self._wake_writer.clear()
            while self._buf:
                if self._failure is not None and not await self._heal():
                    self._refuse_pending(self._failure)
                    break
                start = self._buf_start
                marker_at = self._place(codec.UNIT_SIZE)
                self._buf.append(codec.encode_unit(start, self._buf_records))
                data = b"".join(self._buf)
                dispatch = self._buf_dispatch
                fut = self._buf_future
                self._buf, self._buf_dispatch, self._buf_future = [], [], None
                self._buf_records = 0
                self._buf_start = start + len(data)
                t0 = time.perf_counter()
                try:
                    if self._sync or len(data) > INLINE_WRITE_BYTES:
                        await loop.run_in_executor(self._write_pool, write, start, data, dispatch)
                    else:
                        # Async flush, a small write: one pwrite into the page cache takes
                        # microseconds, less than the trip to the writer thread and back
                        # (two wake-ups, and the interpreter lock changing hands twice).
                        # The OS has the bytes before anyone hears of them either way.
                        write(start, data, dispatch)
                except OSError as e:  # disk full, I/O error: fail this write, keep going
                    await self._write_failed(e, fut, start, marker_at)
                    continue
                if self._sync:
                    metrics.FLUSH_SECONDS.observe(time.perf_counter() - t0)
                self.commitlog.written_end = start + len(data)
                self._dispatch(dispatch)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            if self._closing:
                return

    def _prepare_and_write(self, start: int, data: bytes, dispatch: list[_Dispatch]) -> None:
        """On the writer thread: allocate the ConsumeQueue and index space the write's records
        will take (a full disk fails the write here, before anything is written, rather than
        with SIGBUS in a mapping later), then write."""
        last: dict[tuple[str, int], int] = {}
        n_index = 0
        for topic, qid, qoff, _p, _s, _t, _id, keys in dispatch:
            last[(topic, qid)] = qoff
            n_index += 1 + len(keys)
        cqs = self._cqs
        for key, qoff in last.items():
            cq = cqs.get(key)
            if cq is not None:  # None: its topic was deleted meanwhile
                cq.preallocate(qoff)
        if n_index:
            self.index.preallocate(n_index)
        self.commitlog.write(start, data, sync=self._sync)

    async def _write_failed(
        self, e: OSError, fut: _CommitFuture | None, start: int, marker_at: int
    ) -> None:
        """A write failed: nothing of it or of what queued behind it is acknowledged; its space
        and queue offsets are given back, and its marker is kept off the disk."""
        reason = f"cannot write to the CommitLog: {e.strerror or e}"
        if e.errno == errno.ENOSPC:
            reason += " (free space on the data directory's file system)"
        metrics.WRITE_FAILURES.inc()
        log.error("store.write_failed", reason=reason, offset=start)
        self._failure = reason
        # The marker goes first: only then may anyone hear that the write failed (a crash
        # right after the answer must not find the batch committed).
        await asyncio.get_running_loop().run_in_executor(
            self._write_pool, self.commitlog.unwrite, start, marker_at
        )
        if fut is not None and not fut.done():
            fut.set_exception(StoreUnavailable(reason))
        self._refuse_pending(reason)

    def _refuse_pending(self, reason: str) -> None:
        """Fail every put staged but not written, and give back what they reserved."""
        fut = self._buf_future
        self._buf, self._buf_dispatch, self._buf_future = [], [], None
        self._buf_records = 0
        self._pending_ids.clear()
        self.commitlog.rewind()
        self._buf_start = self.commitlog.written_end
        for key, cq in self._cqs.items():
            self._next_qoff[key] = cq.max_offset
        if fut is not None and not fut.done():
            fut.set_exception(StoreUnavailable(reason))

    async def _heal(self) -> bool:
        """After a failed write: True (and the store healthy again) once the disk takes writes."""
        if self._failure is None:
            return True
        try:
            await asyncio.get_running_loop().run_in_executor(self._write_pool, self.commitlog.probe)
        except OSError as e:
            cause = f"cannot write to the CommitLog: {e.strerror or e}"
            if cause not in self._failure:
                self._failure = cause
            return False
        log.info("store.write_recovered", after=self._failure)
        self._failure = None
        return True

    def _dispatch(self, batch: list[_Dispatch]) -> None:
        cqs = self._cqs
        index_add = self.index.add
        touched: set[str] = set()
        last_topic = None
        for topic, qid, qoff, phy, size, th, msg_id, keys in batch:
            cq = cqs.get((topic, qid))
            if cq is None:
                continue  # its topic was deleted while the write was in flight
            cq.put(qoff, phy, size, th)
            index_add(phy, msg_id, topic, keys)
            if topic is not last_topic:
                touched.add(topic)
                last_topic = topic
        pending = self._pending_ids
        if pending:
            for _topic, _q, _o, phy, _s, _t, msg_id, _k in batch:
                in_flight = pending.get(msg_id)
                if in_flight is not None and in_flight[0].phy_offset == phy:
                    del pending[msg_id]
        metrics.PUT_MESSAGES.inc(len(batch))
        if self.on_dispatch is not None:
            self.on_dispatch(touched)

    # -- reads -----------------------------------------------------------------------------------

    def read(self, phy_offset: int) -> StoredMessage | None:
        """The record at ``phy_offset``, or None when retention removed it."""
        if phy_offset < self.commitlog.min_offset or phy_offset >= self.commitlog.written_end:
            return None
        return self.commitlog.read(phy_offset)  # CRC on every read: damage is never handed out

    def stored_at(self, phy_offset: int) -> int | None:
        if phy_offset < self.commitlog.min_offset:
            return None
        view, pos = self.commitlog.view_at(phy_offset)
        return int.from_bytes(view[pos + 42 : pos + 50], "big", signed=True)

    def find_in_topic(self, msg_id: bytes, topic: str) -> PutResult | None:
        """The stored (dispatched) record with this id in ``topic``, as a duplicate result."""
        for m in self.lookup_id(msg_id):
            if m.topic == topic:
                return PutResult(m.msg_id, topic, m.queue_id, m.queue_offset, m.phy_offset, True)
        return None

    def first_send(self, msg_id: bytes) -> tuple[FirstSend, asyncio.Future[None] | None] | None:
        """Where a client's message with this id went (a topic clients send to), with the
        write to await when it is still being written: a resend is acknowledged only once the
        first send is. None when no such message is stored. Costs an index lookup."""
        in_flight = self._pending_ids.get(msg_id)
        if in_flight is not None and not is_system_topic(in_flight[0].topic):
            result, fut, m = in_flight
            return _first_send(m, result.queue_id), fut
        if not self.index.lookup_id(msg_id, 1):
            return None  # nearly every id: new, and no record read
        for stored in self.lookup_id(msg_id):
            if not is_system_topic(stored.topic):
                return _first_send(stored, stored.queue_id), None
        return None

    def lookup_id(self, msg_id: bytes) -> list[StoredMessage]:
        """Stored records with this id (one per topic it passed through), oldest first."""
        out = []
        for phy in sorted(set(self.index.lookup_id(msg_id))):
            m = self.read(phy)
            if m is not None and m.msg_id == msg_id and self._visible(m):
                out.append(m)
        return out

    def lookup_key(self, topic: str, key: str, limit: int = 64) -> list[StoredMessage]:
        out = []
        for phy in sorted(set(self.index.lookup_key(topic, key, limit))):
            m = self.read(phy)
            if m is not None and m.topic == topic and key in m.keys and self._visible(m):
                out.append(m)
        return out

    def queue_bounds(self, topic: str, queue_id: int) -> tuple[int, int]:
        cq = self._cqs[(topic, queue_id)]
        return cq.min_offset, cq.max_offset

    def search_offset(self, topic: str, queue_id: int, timestamp_ms: int) -> int:
        """First queue offset whose message was stored at or after ``timestamp_ms``."""
        cq = self._cqs[(topic, queue_id)]
        lo, hi = cq.min_offset, cq.max_offset
        while lo < hi:
            mid = (lo + hi) // 2
            at = self.stored_at(cq.get(mid)[0])
            if at is None or at < timestamp_ms:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # -- flush, checkpoint, retention (off the loop) ---------------------------------------------

    async def flush(self) -> None:
        """Periodic flush: CommitLog fsync (async mode), derived files and the checkpoint."""
        if self._writer_task is None:
            return
        t0 = time.perf_counter()
        mark = self._checkpoint_mark()
        await asyncio.get_running_loop().run_in_executor(
            self._flush_pool, self._checkpoint_sync, mark
        )
        if not self._sync:
            metrics.FLUSH_SECONDS.observe(time.perf_counter() - t0)

    def _checkpoint_mark(self) -> dict[str, int]:
        """Taken on the loop, between dispatches: everything up to ``dispatched`` is in the
        mappings, which the msync in :meth:`_checkpoint_sync` makes durable before the
        checkpoint claims it."""
        return {
            "dispatched": self.commitlog.written_end,
            "cq_entries": sum(cq.max_offset for cq in self._cqs.values()),
            "index_entries": self.index.entry_count,
        }

    def _checkpoint_sync(self, mark: dict[str, int]) -> None:
        self.commitlog.sync()
        for cq in list(self._cqs.values()):
            cq.flush()
        self.index.flush()
        write_json_atomic(self.root / _CHECKPOINT, mark)

    def _read_checkpoint(self) -> dict[str, int]:
        path = self.root / _CHECKPOINT
        if not path.exists():
            return {}
        try:
            data = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            log.warning("store.checkpoint_unreadable")
            return {}
        return data if isinstance(data, dict) else {}

    async def enforce_retention(self) -> int:
        cutoff_s = (self.clock() - self.config.retention_ms) / 1000
        expired = self.commitlog.expired_segments(cutoff_s)
        if not expired:
            return 0
        loop = asyncio.get_running_loop()
        for start in expired:
            await loop.run_in_executor(self._flush_pool, self.commitlog.delete_segment, start)
        floor = self.commitlog.min_offset
        for cq in list(self._cqs.values()):
            cq.drop_before(floor)
        self.index.drop_before(floor)
        return len(expired)
