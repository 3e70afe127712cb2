"""CommitLog record codec: framing with length, magic and CRC32. Pure: bytes in, bytes out.

Layout of one record (big-endian)::

    0   total_len   u32   whole record, this field included
    4   magic       u32   RECORD_MAGIC, or BLANK_MAGIC for the filler that ends a segment
    8   crc32       u32   over bytes [12, total_len)
    12  flags       u16
    14  queue_id    u16
    16  reconsume   u16
    18  queue_off   i64   position in the topic/queue's ConsumeQueue
    26  phy_off     i64   position of this record in the CommitLog
    34  born_at     i64   epoch ms
    42  stored_at   i64   epoch ms
    50  msg_id      16s
    66  topic_len u8, tags_len u16, keys_len u16, props_len u32, body_len u32
    79  topic, tags, keys ("\\x1f"-joined), properties (JSON object), body

Each group commit (one write of many records) ends with a *unit marker*, a 24-byte frame::

    0   total_len   u32   24
    4   magic       u32   UNIT_MAGIC
    8   crc32       u32   over bytes [12, 24)
    12  unit_start  i64   CommitLog offset where the write began
    20  count       u32   records in the write

A write is committed only once its marker is on disk, so recovery can tell a write that a crash
or a failed ``pwrite`` tore (records without their marker: dropped whole, which keeps a client's
batch all or nothing) from damage in the middle of the log (skipped, and what follows kept).

A reader can always tell the cases at a position apart: a valid record or unit marker (magic
and CRC match), the blank filler (skip to the next segment), and the end of data (a zero
length, which is what a pre-allocated segment holds past its last write). Anything else is a
torn or corrupt frame; :func:`find_next_frame` finds where valid frames resume after it.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Callable
from enum import Enum

import orjson

from broker_core.message import Message, StoredMessage

#: What records are read from: a mapped segment or bytes.
Buffer = bytes | bytearray | memoryview | mmap.mmap

# RocketMQ's two magic codes: 17 bits apart, so no single corruption turns one into the other.
RECORD_MAGIC = 0xDAA320A7
BLANK_MAGIC = 0xCBD43194
UNIT_MAGIC = 0xB7E15163

#: Record flag: a consumer-state record (``broker_core.groups``), never dispatched to a queue.
FLAG_STATE = 0x8000

_PRE = struct.Struct(">III")
_REST = struct.Struct(">HHHqqqq16sBHHII")
PRE_SIZE = _PRE.size
HEADER_SIZE = _PRE.size + _REST.size
BLANK_SIZE = 8  # total_len + magic is all a reader needs to skip the filler
_BLANK = struct.Struct(">II")
#: Most a record can add to its body: header, longest topic and tags, 32 keys of 128 UTF-8
#: characters and their separators, 32 KiB of properties as JSON (escaping may double them).
MAX_OVERHEAD = HEADER_SIZE + 255 + 4 * 255 + 32 * (4 * 128 + 1) + 2 * 6 * 32 * 1024
_LEN = struct.Struct(">I")
_UNIT = struct.Struct(">IIIqI")
UNIT_SIZE = _UNIT.size
_UNIT_BODY = struct.Struct(">qI")
_PHY = struct.Struct(">q")
_RECORD_MAGIC_BYTES = RECORD_MAGIC.to_bytes(4, "big")
_UNIT_MAGIC_BYTES = UNIT_MAGIC.to_bytes(4, "big")
_rest_pack = _REST.pack
_pre_pack = _PRE.pack
_crc32 = zlib.crc32
# Offsets inside the record that readers peek at without a full decode.
_OFF_TOPIC_LEN = 66


class Scan(Enum):
    RECORD = "record"
    UNIT = "unit"
    BLANK = "blank"
    END = "end"
    CORRUPT = "corrupt"


def encode_properties(properties: dict[str, str]) -> bytes:
    return orjson.dumps(properties) if properties else b""


def record_size(msg: Message, props: bytes) -> int:
    keys = "\x1f".join(msg.keys).encode() if msg.keys else b""
    return (
        HEADER_SIZE
        + len(msg.topic.encode())
        + len(msg.tags.encode())
        + len(keys)
        + len(props)
        + len(msg.body)
    )


def encode_record(
    msg: Message, props: bytes, queue_offset: int, stored_at: int, reserve: Callable[[int], int]
) -> bytes:
    """Frame ``msg`` as one record. ``reserve(size)`` is asked for the record's CommitLog offset
    once its size is known (the header carries the offset, and the offset depends on the size:
    a record that does not fit a segment's tail moves to the next segment)."""
    topic = msg.topic.encode()
    tags = msg.tags.encode()
    keys = "\x1f".join(msg.keys).encode() if msg.keys else b""
    body = msg.body
    n_topic, n_tags, n_keys, n_props, n_body = (
        len(topic),
        len(tags),
        len(keys),
        len(props),
        len(body),
    )
    total = HEADER_SIZE + n_topic + n_tags + n_keys + n_props + n_body
    head = _rest_pack(
        msg.flags,
        msg.queue_id,
        msg.reconsume_count,
        queue_offset,
        reserve(total),
        msg.born_at,
        stored_at,
        msg.msg_id,
        n_topic,
        n_tags,
        n_keys,
        n_props,
        n_body,
    )
    # One join and one CRC pass beat a CRC call per field for the small records that dominate.
    rest = b"".join((head, topic, tags, keys, props, body))
    return _pre_pack(total, RECORD_MAGIC, _crc32(rest)) + rest


def encode(msg: Message, queue_offset: int, phy_offset: int, stored_at: int) -> bytes:
    """Encode ``msg`` as one framed record at a known offset."""
    return encode_record(
        msg, encode_properties(msg.properties), queue_offset, stored_at, lambda _size: phy_offset
    )


def encode_blank(size: int) -> bytes:
    """Filler for the unused tail of a segment (its length says how far to skip)."""
    return _BLANK.pack(size, BLANK_MAGIC)


def encode_unit(unit_start: int, count: int) -> bytes:
    """The marker that commits one write of ``count`` records that began at ``unit_start``."""
    body = _UNIT_BODY.pack(unit_start, count)
    return _PRE.pack(UNIT_SIZE, UNIT_MAGIC, _crc32(body)) + body


def unit_start(buf: Buffer, pos: int) -> int:
    """The ``unit_start`` of the unit marker at ``pos`` (checked by :func:`scan`)."""
    return int(_PHY.unpack_from(buf, pos + PRE_SIZE)[0])


def record_phy_offset(buf: Buffer, pos: int) -> int:
    """The CommitLog offset a record at ``pos`` says it was written at (its header field)."""
    return int(_PHY.unpack_from(buf, pos + 26)[0])


def record_flags(buf: Buffer, pos: int) -> int:
    return int(buf[pos + 12]) << 8 | int(buf[pos + 13])


def claimed_record_size(buf: Buffer, pos: int, limit: int, phy_offset: int) -> int:
    """The length a record header at ``pos`` claims, when the header looks whole (magic, a
    length that fits, written at ``phy_offset``) whether or not its CRC matches; else 0."""
    if pos + HEADER_SIZE > limit:
        return 0
    total, magic = _BLANK.unpack_from(buf, pos)
    if magic != RECORD_MAGIC or total < HEADER_SIZE or pos + total > limit:
        return 0
    return int(total) if record_phy_offset(buf, pos) == phy_offset else 0


def scan(buf: Buffer, pos: int, limit: int) -> tuple[Scan, int]:
    """Classify what starts at ``pos`` in ``buf[:limit]``; returns (kind, size)."""
    if pos + BLANK_SIZE > limit:
        return Scan.END, 0
    total, magic = _BLANK.unpack_from(buf, pos)
    if total == 0 and magic == 0:
        return Scan.END, 0
    if magic == UNIT_MAGIC:
        if total != UNIT_SIZE or pos + UNIT_SIZE > limit:
            return Scan.CORRUPT, 0
        (crc,) = _LEN.unpack_from(buf, pos + 8)
        if _crc32(memoryview(buf)[pos + PRE_SIZE : pos + UNIT_SIZE]) != crc:
            return Scan.CORRUPT, 0
        return Scan.UNIT, UNIT_SIZE
    if magic == BLANK_MAGIC:
        # A filler always runs exactly to the end of its segment.
        if total < BLANK_SIZE or pos + total != limit:
            return Scan.CORRUPT, 0
        return Scan.BLANK, total
    if magic != RECORD_MAGIC or total < HEADER_SIZE or pos + total > limit:
        return Scan.CORRUPT, 0
    (crc,) = _LEN.unpack_from(buf, pos + 8)
    if zlib.crc32(memoryview(buf)[pos + PRE_SIZE : pos + total]) != crc:
        return Scan.CORRUPT, 0
    return Scan.RECORD, total


def check_record(buf: Buffer, pos: int, limit: int, phy_offset: int) -> bool:
    """Is there a whole, CRC-valid record at ``pos`` that was written at ``phy_offset``?"""
    kind, _ = scan(buf, pos, limit)
    return kind is Scan.RECORD and record_phy_offset(buf, pos) == phy_offset


def find_next_frame(
    buf: Buffer, first: int, end: int, limit: int, base: int
) -> int | None:
    """The first position in ``[first, end)`` of ``buf[:limit]`` where a valid frame starts: a
    record whose header names its own offset (``base`` + position), or a unit marker. None if
    there is none. Used to step over damage: a frame that checks is never mistaken, since both
    its CRC and its self-reference must match."""
    view = buf if isinstance(buf, mmap.mmap | bytes | bytearray) else bytes(buf)
    at = first
    stop = min(end + PRE_SIZE, limit)  # a magic is 4 bytes in, at most 8 bytes past ``end``
    while at < end and at + BLANK_SIZE <= limit:
        r = view.find(_RECORD_MAGIC_BYTES, at + 4, stop)
        u = view.find(_UNIT_MAGIC_BYTES, at + 4, stop)
        hits = [h for h in (r, u) if h >= 0]
        if not hits:
            return None
        cand = min(hits) - 4
        # Cheap checks first (a header names its own offset; a marker follows its write's
        # start), so a body full of look-alike headers costs no CRC each.
        if cand == r - 4:
            ok = (
                cand + HEADER_SIZE <= limit
                and record_phy_offset(view, cand) == base + cand
                and scan(view, cand, limit)[0] is Scan.RECORD
            )
        else:
            ok = (
                cand + UNIT_SIZE <= limit
                and unit_start(view, cand) <= base + cand
                and scan(view, cand, limit)[0] is Scan.UNIT
            )
        if ok:
            return cand
        at = cand + 1
    return None


def decode(buf: Buffer, pos: int = 0) -> StoredMessage:
    """Decode the record at ``pos``. The caller has checked it (``scan``) or trusts it."""
    decoded = _decode(buf, pos, -1, -1)
    assert decoded is not None
    return decoded


def decode_checked(buf: Buffer, pos: int, limit: int, phy_offset: int) -> StoredMessage | None:
    """Decode the record at ``pos`` of ``buf[:limit]`` if it is whole, its CRC matches and it
    was written at ``phy_offset``; else None. The read path's check, in one pass."""
    return _decode(buf, pos, limit, phy_offset)


def _decode(buf: Buffer, pos: int, limit: int, phy_check: int) -> StoredMessage | None:
    """Decode; when ``limit`` >= 0, first check frame, CRC and self-offset (None if bad)."""
    total, magic, crc = _PRE.unpack_from(buf, pos)
    mv = memoryview(buf)
    if limit >= 0 and (
        magic != RECORD_MAGIC
        or total < HEADER_SIZE
        or pos + total > limit
        or _crc32(mv[pos + PRE_SIZE : pos + total]) != crc
    ):
        return None
    (
        flags,
        queue_id,
        reconsume,
        queue_offset,
        phy_offset,
        born_at,
        stored_at,
        msg_id,
        topic_len,
        tags_len,
        keys_len,
        props_len,
        body_len,
    ) = _REST.unpack_from(buf, pos + PRE_SIZE)
    if limit >= 0 and phy_offset != phy_check:
        return None
    p = pos + HEADER_SIZE
    topic = str(mv[p : p + topic_len], "utf-8")
    p += topic_len
    tags = str(mv[p : p + tags_len], "utf-8") if tags_len else ""
    p += tags_len
    keys: tuple[str, ...] = (
        tuple(str(mv[p : p + keys_len], "utf-8").split("\x1f")) if keys_len else ()
    )
    p += keys_len
    properties: dict[str, str] = orjson.loads(mv[p : p + props_len]) if props_len else {}
    p += props_len
    body = bytes(mv[p : p + body_len])
    return StoredMessage(
        topic=topic,
        body=body,
        tags=tags,
        keys=keys,
        properties=properties,
        msg_id=msg_id,
        flags=flags,
        queue_id=queue_id,
        born_at=born_at,
        reconsume_count=reconsume,
        queue_offset=queue_offset,
        phy_offset=phy_offset,
        stored_at=stored_at,
        size=total,
    )


def peek_topic_queue(buf: Buffer, pos: int) -> tuple[str, int, int]:
    """Topic, queue id and queue offset of the record at ``pos`` without decoding the rest."""
    queue_id = struct.unpack_from(">H", buf, pos + 14)[0]
    queue_offset = struct.unpack_from(">q", buf, pos + 18)[0]
    topic_len = buf[pos + _OFF_TOPIC_LEN]
    start = pos + HEADER_SIZE
    return str(memoryview(buf)[start : start + topic_len], "utf-8"), queue_id, queue_offset
