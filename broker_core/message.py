"""The message as the broker core sees it, its time-ordered id, and validation of its fields."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from broker_core.errors import InvalidMessage, InvalidTopic, MessageTooLarge

#: Body flag: the client sent the body as base64 (``body_b64``) and wants it back that way.
FLAG_BODY_B64 = 0x1

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_TOPIC_LEN = 100
MAX_TAGS_LEN = 255
MAX_KEYS = 32
MAX_KEY_LEN = 128
MAX_PROPERTIES_BYTES = 32 * 1024

#: Properties the broker itself sets; clients may read them but not send them.
PROP_REAL_TOPIC = "REAL_TOPIC"
PROP_REAL_QUEUE = "REAL_QUEUE_ID"
PROP_ORIGIN_MSG_ID = "ORIGIN_MSG_ID"
PROP_RETRY_TOPIC = "RETRY_TOPIC"
PROP_DELIVERY_ATTEMPT = "DELIVERY_ATTEMPT"
PROP_DLQ_ORIGIN_TOPIC = "DLQ_ORIGIN_TOPIC"
PROP_SHARDING_KEY = "SHARDING_KEY"
PROP_DELIVER_AT = "DELIVER_AT"
PROP_RELEASED_AT = "RELEASED_AT"

SYSTEM_PREFIX = "SYS_"
RETRY_PREFIX = "%RETRY%"
DLQ_PREFIX = "%DLQ%"

# Internal names (retry topics: "%RETRY%<group>+<topic>") stay under the 255-byte file name
# limit because client topics and groups are at most 100 characters.
#: Any topic name the server knows, internal ones included (docs/openapi.yaml: TopicName).
TOPIC_PATTERN = r"^[A-Za-z0-9_%+\-]{1,255}$"
#: What clients name topics, consumer groups and producer groups (ClientTopicName, GroupName).
CLIENT_NAME_PATTERN = r"^[A-Za-z0-9_\-]{1,100}$"
_TOPIC_RE = re.compile(TOPIC_PATTERN)
_CLIENT_TOPIC_RE = re.compile(CLIENT_NAME_PATTERN)
_MSG_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_ANY_CASE_HEX_RE = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass(slots=True)
class Message:
    """One message. ``msg_id`` is assigned once at entry and never changes afterwards."""

    topic: str
    body: bytes
    tags: str = ""
    keys: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)
    msg_id: bytes = b""
    flags: int = 0
    queue_id: int = -1
    born_at: int = 0
    reconsume_count: int = 0


@dataclass(slots=True)
class StoredMessage:
    """A message read back from the CommitLog, with where and when it was stored."""

    topic: str
    body: bytes
    tags: str
    keys: tuple[str, ...]
    properties: dict[str, str]
    msg_id: bytes
    flags: int
    queue_id: int
    born_at: int
    reconsume_count: int
    queue_offset: int
    phy_offset: int
    stored_at: int
    size: int

    @property
    def origin_msg_id(self) -> str:
        """The id the client knows: retries and dead letters keep the first message's id."""
        return self.properties.get(PROP_ORIGIN_MSG_ID) or self.msg_id.hex()


class MsgIdGenerator:
    """16-byte ids: 48-bit epoch ms, 32-bit per-process random, 48-bit counter.

    Ids sort by creation time across processes (to the millisecond) and strictly within one
    process; the random middle keeps two processes (or two runs) from colliding.
    """

    __slots__ = ("_counter", "_last_ms", "_node")

    def __init__(self) -> None:
        self._node = int.from_bytes(os.urandom(4), "big")
        self._counter = int.from_bytes(os.urandom(5), "big")
        self._last_ms = 0

    def next(self, now_ms: int | None = None) -> bytes:
        if now_ms is None:
            now_ms = time.time_ns() // 1_000_000
        if now_ms < self._last_ms:
            now_ms = self._last_ms  # the clock stepped back: keep ids increasing
        self._last_ms = now_ms
        self._counter = (self._counter + 1) & 0xFFFF_FFFF_FFFF
        return ((now_ms << 80) | (self._node << 48) | self._counter).to_bytes(16, "big")


def msg_id_time_ms(msg_id: bytes) -> int:
    return int.from_bytes(msg_id[:6], "big")


def parse_msg_id(text: str) -> bytes:
    """Parse a 32-hex-digit id; raises :class:`InvalidMessage` saying why anything else is
    not one (see :func:`msg_id_problem`)."""
    if not isinstance(text, str) or not _MSG_ID_RE.fullmatch(text):
        raise InvalidMessage(msg_id_problem(text))
    return bytes.fromhex(text)


def msg_id_problem(given: object) -> str:
    """Why ``given`` is not a message id, quoting it (cut short)."""
    reason = "msg_id must be 32 lowercase hex digits"
    if isinstance(given, str) and _ANY_CASE_HEX_RE.fullmatch(given):
        reason += " (uppercase is not accepted)"
    return f"{reason}, got {quoted(given)}"


def quoted(value: object, limit: int = 40) -> str:
    """``value`` as an error message quotes it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_system_topic(name: str) -> bool:
    return name.startswith(SYSTEM_PREFIX) or name.startswith("%")


def validate_topic_name(name: object, *, client: bool) -> str:
    """Check a topic name; clients may not name system (``SYS_``) or ``%`` topics."""
    rule = f"a topic name is 1-{MAX_TOPIC_LEN} characters of letters, digits, '_' and '-'"
    if not isinstance(name, str) or not _TOPIC_RE.fullmatch(name):
        raise InvalidTopic(rule)
    if client and is_system_topic(name):
        raise InvalidTopic(f"topic {name!r} is reserved: 'SYS_' and '%' topics are internal")
    if client and not _CLIENT_TOPIC_RE.fullmatch(name):
        raise InvalidTopic(f"{rule}, not {name!r}" if len(name) <= MAX_TOPIC_LEN else rule)
    return name


def validate_message_fields(
    body: bytes, tags: str, keys: tuple[str, ...], properties: dict[str, str], max_body: int
) -> None:
    """Checks shared by every entry path (HTTP, SDK, internal re-puts)."""
    if len(body) > max_body:
        raise MessageTooLarge(f"body is {len(body)} bytes; the limit is {max_body}")
    if len(tags) > MAX_TAGS_LEN or "|" in tags:
        raise InvalidMessage(f"tags must be at most {MAX_TAGS_LEN} characters without '|'")
    if len(keys) > MAX_KEYS:
        raise InvalidMessage(f"at most {MAX_KEYS} keys per message")
    for key in keys:
        if not key or len(key) > MAX_KEY_LEN or "\x1f" in key:
            raise InvalidMessage(f"each key must be 1-{MAX_KEY_LEN} characters, without \\x1f")
    if properties and sum(len(k) + len(v) for k, v in properties.items()) > MAX_PROPERTIES_BYTES:
        raise InvalidMessage(f"properties exceed {MAX_PROPERTIES_BYTES} bytes")
    if "" in properties:  # no header carries it (lost on the way to NATS); RocketMQ refuses it
        raise InvalidMessage("a property name must not be empty")
