"""Translation between RocketMQ 5 protocol messages and tempomq's, without IO.

Incoming: a protobuf ``Message`` of a ``SendMessage`` becomes a :class:`~broker_core.message.
Message` and a delivery time (``tag`` → tags, ``keys``, ``user_properties`` → properties,
``message_group`` → the sharding key that picks the queue). Outgoing: a stored message and its
receipt become the protobuf ``Message`` of a ``ReceiveMessage`` stream or of a check-back.
Domain errors become RocketMQ status codes here, in one table.

Message ids: tempomq's are 16 bytes (48-bit epoch ms first, so they sort by time) shown as 32
lowercase hex digits; a RocketMQ client makes its own 34-hex-digit id before the first attempt
and resends with the same one. :func:`msg_id_for` maps the client's id to a tempomq id
deterministically (the id's own seconds, or the born time, then a hash of the id), so a resend
lands on the id of the first attempt and the broker core's idempotent put answers the first
result. Replies carry the tempomq id, which the client adopts; HTTP, the SDK and the RocketMQ
clients all then see the same id for a message.

Delivery times: the official Python client copies the user's ``delivery_timestamp`` into
``Timestamp.seconds`` unchanged, and its own documentation passes milliseconds. A ``seconds``
value above :data:`MILLIS_THRESHOLD` (about the year 5138 in seconds, 1973 in milliseconds) is
therefore read as milliseconds; only that form keeps millisecond precision.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from collections.abc import Mapping

from broker_core.errors import InvalidMessage, TempoError
from broker_core.http import RESERVED_PROPERTIES
from broker_core.message import (
    MAX_KEY_LEN,
    PROP_DELIVER_AT,
    PROP_DELIVERY_ATTEMPT,
    PROP_ORIGIN_MSG_ID,
    PROP_REAL_QUEUE,
    PROP_REAL_TOPIC,
    PROP_RETRY_TOPIC,
    PROP_SHARDING_KEY,
    Message,
    StoredMessage,
    validate_message_fields,
)
from broker_core.retry import real_topic
from tempomq.grpc.protocol import definition_pb2 as pb

Code = pb.Code

#: ``Timestamp.seconds`` above this are milliseconds (see the module docstring).
MILLIS_THRESHOLD = 100_000_000_000
#: 2021-01-01T00:00:00Z: RocketMQ's v1 message ids count seconds from here.
ROCKETMQ_ID_EPOCH_S = 1_609_459_200
_V1_ID_RE = re.compile(r"^01[0-9A-Fa-f]{32}$")
_TEMPO_ID_RE = re.compile(r"^[0-9a-f]{32}$")

#: Properties the broker sets that the protocol shows elsewhere or not at all.
_HIDDEN = frozenset(
    {
        PROP_ORIGIN_MSG_ID,
        PROP_RETRY_TOPIC,
        PROP_REAL_TOPIC,
        PROP_REAL_QUEUE,
        PROP_SHARDING_KEY,
        PROP_DELIVERY_ATTEMPT,
    }
)

_CODE_BY_ERROR = {
    "topic_not_found": Code.TOPIC_NOT_FOUND,
    "invalid_topic": Code.ILLEGAL_TOPIC,
    "group_not_found": Code.CONSUMER_GROUP_NOT_FOUND,
    "invalid_group": Code.ILLEGAL_CONSUMER_GROUP,
    "message_too_large": Code.MESSAGE_BODY_TOO_LARGE,
    "receipt_expired": Code.INVALID_RECEIPT_HANDLE,
    "transaction_not_found": Code.INVALID_TRANSACTION_ID,
    "unauthorized": Code.UNAUTHORIZED,
    "forbidden": Code.FORBIDDEN,
    "too_many_requests": Code.TOO_MANY_REQUESTS,
    "illegal_message_group": Code.ILLEGAL_MESSAGE_GROUP,
    "illegal_filter_expression": Code.ILLEGAL_FILTER_EXPRESSION,
}
_CODE_BY_STATUS = {
    400: Code.BAD_REQUEST,
    401: Code.UNAUTHORIZED,
    403: Code.FORBIDDEN,
    404: Code.NOT_FOUND,
    409: Code.PRECONDITION_FAILED,
    413: Code.MESSAGE_BODY_TOO_LARGE,
    429: Code.TOO_MANY_REQUESTS,
}


def status(code: int = Code.OK, message: str = "OK") -> pb.Status:
    return pb.Status(code=code, message=message)  # type: ignore[arg-type]


def code_for(exc: TempoError) -> int:
    """The RocketMQ status code of a domain error: by its error code, else by its HTTP status
    (401 → UNAUTHORIZED, 403 → FORBIDDEN, ...), 5xx → INTERNAL_SERVER_ERROR."""
    code = _CODE_BY_ERROR.get(exc.code)
    if code is None:
        code = _CODE_BY_STATUS.get(exc.status, Code.INTERNAL_SERVER_ERROR)
    return code


def error_status(exc: TempoError) -> pb.Status:
    return status(code_for(exc), f"{exc.code}: {exc.message}")


# -- ids and times -------------------------------------------------------------------------------


def msg_id_for(client_id: str, born_ms: int) -> bytes:
    """The tempomq id of a message the client calls ``client_id`` (see the module docstring).

    A tempomq id (32 lowercase hex, e.g. one the server answered before) is kept as it is.
    """
    if _TEMPO_ID_RE.fullmatch(client_id):
        return bytes.fromhex(client_id)
    when_ms = born_ms
    if _V1_ID_RE.fullmatch(client_id):
        # version (1 byte), MAC (6), pid (2), seconds since 2021 (4), sequence (4)
        when_ms = (ROCKETMQ_ID_EPOCH_S + int(client_id[18:26], 16)) * 1000
    digest = hashlib.blake2b(client_id.encode(), digest_size=10).digest()
    return (max(when_ms, 0) & 0xFFFF_FFFF_FFFF).to_bytes(6, "big") + digest


def timestamp_ms(ts: object) -> int:
    """Epoch ms of a protobuf ``Timestamp``, reading a huge ``seconds`` as milliseconds."""
    seconds: int = ts.seconds  # type: ignore[attr-defined]
    nanos: int = ts.nanos  # type: ignore[attr-defined]
    if seconds > MILLIS_THRESHOLD:
        return seconds
    return seconds * 1000 + nanos // 1_000_000


def body_digest(body: bytes) -> str:
    return f"{zlib.crc32(body):08X}"


# -- messages in ---------------------------------------------------------------------------------


def message_type(m: pb.Message) -> int:
    return m.system_properties.message_type


def to_message(m: pb.Message, topic: str, *, max_body: int, now_ms: int) -> tuple[Message, int]:
    """A sent message → (message with its mapped id, deliver_at_ms; <= now means now).

    Raises :class:`InvalidMessage` / ``MessageTooLarge`` with the reason.
    """
    sp = m.system_properties
    body = m.body
    if sp.body_encoding == pb.Encoding.GZIP:
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as e:
            raise InvalidMessage(f"body is marked GZIP but does not decompress: {e}") from None
    tags = sp.tag if sp.HasField("tag") else ""
    keys = tuple(sp.keys)
    props = dict(m.user_properties)
    reserved = RESERVED_PROPERTIES.intersection(props)
    if reserved:
        raise InvalidMessage(f"properties {sorted(reserved)} are set by the broker")
    validate_message_fields(body, tags, keys, props, max_body)
    if sp.HasField("message_group"):
        group = sp.message_group
        if not 0 < len(group) <= MAX_KEY_LEN:
            raise InvalidMessage(f"message_group must be 1-{MAX_KEY_LEN} characters")
        props[PROP_SHARDING_KEY] = group
    born_ms = timestamp_ms(sp.born_timestamp) if sp.HasField("born_timestamp") else now_ms
    msg_id = msg_id_for(sp.message_id, born_ms) if sp.message_id else b""
    deliver_at = now_ms
    if sp.HasField("delivery_timestamp"):
        deliver_at = timestamp_ms(sp.delivery_timestamp)
    msg = Message(topic, body, tags, keys, props, msg_id, 0, -1, born_ms)
    return msg, deliver_at


# -- messages out --------------------------------------------------------------------------------


def _set_ms(ts: object, ms: int) -> None:
    ts.seconds, ts.nanos = divmod(ms, 1000)  # type: ignore[attr-defined]
    ts.nanos *= 1_000_000  # type: ignore[attr-defined]


def to_pb(
    topic: str,
    msg_id: str,
    body: bytes,
    tags: str,
    keys: tuple[str, ...],
    properties: Mapping[str, str],
    born_ms: int,
) -> pb.Message:
    """The parts every outgoing message has: topic, id, body with its digest, tag, keys and
    the user's properties (broker bookkeeping left out, its sharding key as message_group)."""
    out = pb.Message(body=body)
    out.topic.name = topic
    sp = out.system_properties
    sp.message_id = msg_id
    sp.body_encoding = pb.Encoding.IDENTITY
    sp.body_digest.type = pb.DigestType.CRC32
    sp.body_digest.checksum = body_digest(body)
    if tags:
        sp.tag = tags
    sp.keys.extend(keys)
    _set_ms(sp.born_timestamp, born_ms)
    sp.message_type = pb.MessageType.NORMAL
    group = properties.get(PROP_SHARDING_KEY)
    if group:
        sp.message_group = group
        sp.message_type = pb.MessageType.FIFO
    deliver_at = properties.get(PROP_DELIVER_AT)
    if deliver_at and deliver_at.isdigit():
        _set_ms(sp.delivery_timestamp, int(deliver_at))
        sp.message_type = pb.MessageType.DELAY
    user = out.user_properties
    for k, v in properties.items():
        if k not in _HIDDEN:
            user[k] = v
    return out


def delivery_to_pb(
    m: StoredMessage, *, receipt: str, attempt: int, invisible_ms: int, host: str
) -> pb.Message:
    """A delivery of a ``ReceiveMessage`` stream."""
    out = to_pb(real_topic(m), m.origin_msg_id, m.body, m.tags, m.keys, m.properties, m.born_at)
    sp = out.system_properties
    _set_ms(sp.store_timestamp, m.stored_at)
    sp.store_host = host
    sp.receipt_handle = receipt
    sp.delivery_attempt = attempt
    sp.queue_id = m.queue_id
    sp.queue_offset = m.queue_offset
    sp.invisible_duration.seconds, ms = divmod(invisible_ms, 1000)
    sp.invisible_duration.nanos = ms * 1_000_000
    return out


def half_message_to_pb(msg: Message) -> pb.Message:
    """The half message of a check-back (``recover_orphaned_transaction_command``)."""
    out = to_pb(
        msg.topic, msg.msg_id.hex(), msg.body, msg.tags, msg.keys, msg.properties, msg.born_at
    )
    out.system_properties.message_type = pb.MessageType.TRANSACTION
    return out
