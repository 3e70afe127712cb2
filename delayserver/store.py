"""The DelayStore protocol: where delayed messages wait, durably, until their time.

A store keeps each scheduled message whole (its encoded record) with its delivery time and a
state: ``scheduled`` until released or cancelled, then ``delivered`` or ``cancelled`` (kept for
queries for ``history_ms``, then forgotten). The delay service keeps only the next window of
messages in memory (in the timing wheel) and asks the store for the following window ahead of
time, so memory does not grow with the number pending.

Every implementation passes the same contract suite (``tests/unit/test_delay_store_contract.py``).
All methods are coroutines; implementations never block the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from broker_core import codec
from broker_core.message import Message


class DelayState(StrEnum):
    SCHEDULED = "scheduled"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


@dataclass(slots=True, frozen=True)
class DelayedInfo:
    """What a state query answers."""

    msg_id: bytes
    topic: str
    deliver_at_ms: int
    state: DelayState
    #: The queue it is (or was) to be released to; -1 when not recorded (a delivered one's
    #: record is dropped: the copy in its topic says) or when the broker picks it at release.
    queue_id: int = -1


@dataclass(slots=True, frozen=True)
class Due:
    """A scheduled message handed to the service for its window: enough to release it."""

    msg_id: bytes
    deliver_at_ms: int
    record: bytes  # encode_message(...) of the message, real topic and all


class DelayStoreUnavailable(Exception):
    """The backing service cannot be reached. A call that failed before reaching it changed
    nothing; one whose reply was lost may have run. Every operation is safe to retry (a retried
    ``schedule`` reports False for ids the failed call stored)."""


class DelayStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def schedule(self, items: Sequence[tuple[Message, int]]) -> list[bool]:
        """Store each (message with ``msg_id`` set, deliver_at_ms) durably before returning.
        Idempotent by ``msg_id``: an id already known (any state) is left as it is and its entry
        in the result is False; True where it was stored now."""
        ...

    def may_hold(self, msg_id: bytes) -> bool:
        """False when the store certainly does not hold ``msg_id``, answered from memory (an
        id filter); True when it may (:meth:`find` tells)."""
        ...

    async def find(self, msg_ids: Sequence[bytes]) -> list[DelayedInfo | None]:
        """The info of each id the store knows (any state, ``queue_id`` where recorded), None
        for the others. Ids the store certainly does not hold are answered from memory where
        it can (an id filter), so a new id costs no read."""
        ...

    async def window(
        self, from_ms: int, to_ms: int, limit: int, *, after_msg_id: bytes = b""
    ) -> list[Due]:
        """Scheduled messages with ``deliver_at_ms < to_ms`` whose ``(deliver_at_ms, msg_id)``
        comes after ``(from_ms, after_msg_id)`` (so ``b""`` includes ``from_ms`` itself), in
        ``(deliver_at_ms, msg_id)`` order, at most ``limit``. The next page starts after the
        last item: paging never loses or repeats one, however many share a millisecond."""
        ...

    async def due(self, msg_id: bytes) -> Due | None:
        """One scheduled message with its record; None when unknown or no longer scheduled."""
        ...

    async def mark_delivered(self, msg_ids: Sequence[bytes], released_at_ms: int) -> None:
        """The messages are in their topics: scheduled → delivered. Unknown or already
        finished ids are ignored (a release may be retried after a crash)."""
        ...

    async def cancel(self, msg_id: bytes, now_ms: int) -> DelayedInfo | None:
        """scheduled → cancelled, atomically. Returns the info after the call (a delivered
        message stays delivered: the caller answers 409), None when the id is unknown."""
        ...

    async def reschedule(self, msg_id: bytes, deliver_at_ms: int) -> DelayedInfo | None:
        """Move a scheduled message to a new time, atomically. Returns the info after the
        call (unchanged when it is no longer scheduled), None when the id is unknown."""
        ...

    async def get(self, msg_id: bytes) -> DelayedInfo | None: ...

    async def pending(self) -> int:
        """How many messages are scheduled."""
        ...

    async def count_due(self, bounds_ms: Sequence[int]) -> list[int]:
        """For each bound, how many scheduled messages fall due before it: counted from the
        time index, without reading the messages."""
        ...

    async def purge(self, finished_before_ms: int) -> int:
        """Forget delivered and cancelled messages finished before the given time."""
        ...

    async def health(self) -> str | None:
        """None when usable, else why not (for /readyz)."""
        ...


_NO_QUEUE = 0xFFFF  # "the broker picks the queue at release"
#: Where a record (the CommitLog format, :mod:`broker_core.codec`) keeps its queue id (u16).
RECORD_QUEUE_AT = 14
#: What a cancelled message keeps of its record: the header up to its queue id, so that a
#: resend of its id still answers its queue.
RECORD_STUB_BYTES = 16


def encode_message(msg: Message) -> bytes:
    """A message as a store keeps it: a CommitLog-format record (length, magic, CRC)."""
    queue_id = msg.queue_id
    if queue_id >= 0:
        return codec.encode(msg, 0, 0, 0)
    msg.queue_id = _NO_QUEUE  # set and restored in place: a copy per message costs more
    try:
        return codec.encode(msg, 0, 0, 0)
    finally:
        msg.queue_id = queue_id


def decode_message(record: bytes) -> Message:
    m = codec.decode(record)
    return Message(
        m.topic,
        m.body,
        m.tags,
        m.keys,
        m.properties,
        m.msg_id,
        m.flags,
        -1 if m.queue_id == _NO_QUEUE else m.queue_id,
        m.born_at,
        m.reconsume_count,
    )


def record_queue(record: bytes | None) -> int:
    """The queue id a stored record (or its stub) names; -1 when none."""
    if record is None:
        return -1
    return queue_of(record[RECORD_QUEUE_AT : RECORD_QUEUE_AT + 2])


def queue_of(field: bytes | None) -> int:
    """The queue id of a record's two queue-id bytes; -1 when missing or "none"."""
    if field is None or len(field) != 2:
        return -1
    queue_id = int.from_bytes(field, "big")
    return -1 if queue_id == _NO_QUEUE else queue_id
