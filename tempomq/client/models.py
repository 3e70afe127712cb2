"""Plain data of the SDK: messages going out and coming back, and what the API answers.

Each ``from_json`` reads one API object (API.md) leniently: a field the server adds later is
ignored, and optional fields missing from an older server get their defaults.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal

CheckAnswer = Literal["commit", "rollback", "unknown"]
TransactionState = Literal["prepared", "committed", "rolled_back", "check_max"]
DelayedStateName = Literal["scheduled", "delivered", "cancelled"]


@dataclass(slots=True, frozen=True)
class OutgoingMessage:
    """A message to send. ``str`` bodies travel as text, ``bytes`` as base64.

    Leave ``msg_id`` empty and the client picks one per call (so its own retries are
    idempotent); set it (``new_msg_id()``) to make *your* retries of a whole call idempotent too.
    """

    body: str | bytes
    _: KW_ONLY
    tags: str | None = None
    keys: Sequence[str] = ()
    properties: Mapping[str, str] | None = None
    sharding_key: str | None = None
    delay_ms: int | None = None
    deliver_at: int | None = None
    msg_id: str | None = None

    def __post_init__(self) -> None:
        check_message(self.body, self.keys, self.delay_ms, self.deliver_at)

    def to_json(self, msg_id: str) -> dict[str, Any]:
        """The API's message object, carrying ``msg_id`` (this message's own when it has one)."""
        return message_json(
            self.msg_id or msg_id,
            self.body,
            self.tags,
            self.keys,
            self.properties,
            self.sharding_key,
            self.delay_ms,
            self.deliver_at,
        )


def check_message(body: object, keys: object, delay_ms: int | None, deliver_at: int | None) -> None:
    """What :class:`OutgoingMessage` refuses: raises ``TypeError`` or ``ValueError``."""
    if not isinstance(body, str | bytes):
        raise TypeError(f"body must be str or bytes, not {type(body).__name__}")
    if isinstance(keys, str):
        raise TypeError("keys must be a sequence of strings, not one string")
    if delay_ms is not None and deliver_at is not None:
        raise ValueError("give delay_ms or deliver_at, not both")


def message_json(
    msg_id: str,
    body: str | bytes,
    tags: str | None = None,
    keys: Sequence[str] = (),
    properties: Mapping[str, str] | None = None,
    sharding_key: str | None = None,
    delay_ms: int | None = None,
    deliver_at: int | None = None,
) -> dict[str, Any]:
    """The API's message object (API.md) from checked fields; ``Client.send`` builds it without
    an :class:`OutgoingMessage` in between."""
    if isinstance(body, bytes):
        out: dict[str, Any] = {"msg_id": msg_id, "body_b64": base64.b64encode(body).decode()}
    else:
        out = {"msg_id": msg_id, "body": body}
    if tags is not None:
        out["tags"] = tags
    if keys:
        out["keys"] = list(keys)
    if properties:
        out["properties"] = dict(properties)
    if sharding_key is not None:
        out["sharding_key"] = sharding_key
    if delay_ms is not None:
        out["delay_ms"] = delay_ms
    if deliver_at is not None:
        out["deliver_at"] = deliver_at
    return out


@dataclass(slots=True, frozen=True)
class SendResult:
    msg_id: str
    queue_id: int
    deliver_at: int | None = None  # set when the message was scheduled for later

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SendResult:
        at = d.get("deliver_at")
        return cls(str(d["msg_id"]), int(d["queue_id"]), None if at is None else int(at))


def _body(d: Mapping[str, Any]) -> bytes:
    if d.get("body_b64") is not None:
        return base64.b64decode(d["body_b64"])
    return str(d.get("body", "")).encode("utf-8")


@dataclass(slots=True, frozen=True)
class Message:
    """A stored message as the API shows it; ``body`` is always bytes, ``text`` decodes it."""

    msg_id: str
    topic: str
    queue_id: int
    body: bytes
    tags: str | None
    keys: tuple[str, ...]
    properties: dict[str, str]
    born_at: int
    stored_at: int

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    @staticmethod
    def _fields(d: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "msg_id": str(d["msg_id"]),
            "topic": str(d.get("topic", "")),
            "queue_id": int(d.get("queue_id", 0)),
            "body": _body(d),
            "tags": d.get("tags") or None,
            "keys": tuple(d.get("keys") or ()),
            "properties": dict(d.get("properties") or {}),
            "born_at": int(d.get("born_at", 0)),
            "stored_at": int(d.get("stored_at", 0)),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Message:
        return cls(**cls._fields(d))


@dataclass(slots=True, frozen=True)
class ReceivedMessage(Message):
    """A delivery to a consumer group. ``endpoint`` is the server that issued ``receipt``:
    a receipt means nothing to another server, so ack and nack go back there."""

    receipt: str
    delivery_attempt: int
    endpoint: str = field(repr=False)

    @classmethod
    def from_delivery(cls, d: Mapping[str, Any], endpoint: str) -> ReceivedMessage:
        return cls(
            **cls._fields(d),
            receipt=str(d["receipt"]),
            delivery_attempt=int(d.get("delivery_attempt", 1)),
            endpoint=endpoint,
        )


@dataclass(slots=True, frozen=True)
class Topic:
    name: str
    queues: int
    created_at: int | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Topic:
        at = d.get("created_at")
        return cls(str(d["name"]), int(d["queues"]), None if at is None else int(at))


@dataclass(slots=True, frozen=True)
class DelayedState:
    msg_id: str
    topic: str
    deliver_at: int
    state: DelayedStateName

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DelayedState:
        return cls(str(d["msg_id"]), str(d.get("topic", "")), int(d["deliver_at"]), d["state"])


@dataclass(slots=True, frozen=True)
class QueueStats:
    queue_id: int
    lag: int
    inflight: int
    min_offset: int
    max_offset: int
    committed_offset: int
    next_offset: int


@dataclass(slots=True, frozen=True)
class GroupStats:
    lag: int
    inflight: int
    queues: tuple[QueueStats, ...]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GroupStats:
        names = QueueStats.__dataclass_fields__
        queues = tuple(
            QueueStats(**{k: int(q.get(k, 0)) for k in names}) for q in d.get("queues", ())
        )
        return cls(int(d["lag"]), int(d["inflight"]), queues)


@dataclass(slots=True, frozen=True)
class Transaction:
    """A prepared (half) message. ``endpoint`` is the server holding it: commit and rollback
    go there, never to another endpoint."""

    tx_id: str
    msg_id: str
    topic: str
    endpoint: str = field(repr=False)


@dataclass(slots=True, frozen=True)
class TransactionStatus:
    tx_id: str
    msg_id: str
    topic: str
    state: TransactionState
    check_count: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TransactionStatus:
        return cls(
            str(d["tx_id"]),
            str(d.get("msg_id", "")),
            str(d.get("topic", "")),
            d["state"],
            int(d.get("check_count", 0)),
        )


@dataclass(slots=True, frozen=True)
class CheckRequest:
    """The coordinator asking a producer group how a transaction ended locally."""

    tx_id: str
    msg_id: str
    topic: str
    keys: tuple[str, ...]
    properties: dict[str, str]
    check_count: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CheckRequest:
        return cls(
            str(d["tx_id"]),
            str(d.get("msg_id", "")),
            str(d.get("topic", "")),
            tuple(d.get("keys") or ()),
            dict(d.get("properties") or {}),
            int(d.get("check_count", 0)),
        )
