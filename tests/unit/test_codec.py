"""Record codec (pure) and the message module: framing round-trips, scan classification, ids,
name and field validation. No event loop, no files."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_core import codec
from broker_core.codec import Scan
from broker_core.errors import InvalidMessage, InvalidTopic, MessageTooLarge
from broker_core.message import (
    DEFAULT_MAX_BODY_BYTES,
    FLAG_BODY_B64,
    MAX_KEY_LEN,
    MAX_KEYS,
    MAX_PROPERTIES_BYTES,
    MAX_TAGS_LEN,
    Message,
    MsgIdGenerator,
    msg_id_time_ms,
    parse_msg_id,
    validate_message_fields,
    validate_topic_name,
)

NOW = 1_735_689_600_000
SEGMENT = 64 * 1024


def make(**kw: object) -> Message:
    fields: dict[str, object] = {
        "topic": "orders",
        "body": b"payload",
        "tags": "created",
        "keys": ("order-17",),
        "properties": {"k": "v"},
        "msg_id": MsgIdGenerator().next(NOW),
        "flags": 0,
        "queue_id": 3,
        "born_at": NOW - 5,
        "reconsume_count": 2,
    }
    fields.update(kw)
    return Message(**fields)  # type: ignore[arg-type]


def roundtrip(m: Message, qoff: int = 7, phy: int = 1234, stored: int = NOW) -> codec.StoredMessage:
    raw = codec.encode(m, qoff, phy, stored)
    assert codec.scan(raw, 0, len(raw)) == (Scan.RECORD, len(raw))
    return codec.decode(raw)


def in_segment(record: bytes, at: int = 0) -> bytearray:
    """``record`` placed at ``at`` in a zeroed, segment-sized buffer (as a pre-allocated file)."""
    buf = bytearray(SEGMENT)
    buf[at : at + len(record)] = record
    return buf


# -- encode / frame / decode ---------------------------------------------------------------------


def test_roundtrip_keeps_every_field() -> None:
    m = make()
    d = roundtrip(m, qoff=7, phy=1234, stored=NOW)
    assert d.topic == "orders"
    assert d.body == b"payload"
    assert d.tags == "created"
    assert d.keys == ("order-17",)
    assert d.properties == {"k": "v"}
    assert d.msg_id == m.msg_id
    assert d.flags == 0
    assert d.queue_id == 3
    assert d.born_at == NOW - 5
    assert d.reconsume_count == 2
    assert d.queue_offset == 7
    assert d.phy_offset == 1234
    assert d.stored_at == NOW
    assert d.size == len(codec.encode(m, 7, 1234, NOW))


def test_b64_flag_roundtrips() -> None:
    d = roundtrip(make(flags=FLAG_BODY_B64, body=bytes(range(256))))
    assert d.flags & FLAG_BODY_B64
    assert d.body == bytes(range(256))


def test_unicode_keys_tags_and_properties() -> None:
    keys = ("commande-é", "注文-17", "emoji-🎉", "plain")
    props = {"région": "île-de-France", "ключ": "значение", "empty": ""}
    d = roundtrip(make(keys=keys, tags="créé", properties=props))
    assert d.keys == keys
    assert d.tags == "créé"
    assert d.properties == props


def test_empty_body_no_tags_no_keys_no_properties() -> None:
    d = roundtrip(make(body=b"", tags="", keys=(), properties={}))
    assert (d.body, d.tags, d.keys, d.properties) == (b"", "", (), {})
    assert d.size == codec.HEADER_SIZE + len(b"orders")


def test_4_mib_body() -> None:
    body = bytes(range(256)) * (DEFAULT_MAX_BODY_BYTES // 256)
    assert len(body) == DEFAULT_MAX_BODY_BYTES
    d = roundtrip(make(body=body))
    assert d.body == body


def test_decode_at_an_offset_inside_a_buffer() -> None:
    a, b = make(body=b"first"), make(body=b"second", topic="other", queue_id=1)
    ra = codec.encode(a, 0, 0, NOW)
    rb = codec.encode(b, 0, len(ra), NOW)
    buf = ra + rb
    assert codec.scan(buf, len(ra), len(buf)) == (Scan.RECORD, len(rb))
    d = codec.decode(memoryview(buf), len(ra))
    assert (d.topic, d.body, d.phy_offset) == ("other", b"second", len(ra))


@given(
    body=st.binary(max_size=2048),
    tags=st.text(max_size=40).filter(lambda t: "|" not in t),
    keys=st.lists(st.text(min_size=1, max_size=20).filter(lambda k: "\x1f" not in k), max_size=5),
    props=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4),
    qoff=st.integers(0, 2**62),
    phy=st.integers(0, 2**62),
    reconsume=st.integers(0, 0xFFFF),
)
@settings(max_examples=150, deadline=None)
def test_roundtrip_property(
    body: bytes,
    tags: str,
    keys: list[str],
    props: dict[str, str],
    qoff: int,
    phy: int,
    reconsume: int,
) -> None:
    m = make(body=body, tags=tags, keys=tuple(keys), properties=props, reconsume_count=reconsume)
    d = roundtrip(m, qoff=qoff, phy=phy)
    assert (d.body, d.tags, d.keys, d.properties) == (body, tags, tuple(keys), props)
    assert (d.queue_offset, d.phy_offset, d.reconsume_count) == (qoff, phy, reconsume)


# -- scan ----------------------------------------------------------------------------------------


RECORD = codec.encode(make(), 3, 0, NOW)


def test_scan_record_in_a_segment() -> None:
    buf = in_segment(RECORD)
    assert codec.scan(buf, 0, len(buf)) == (Scan.RECORD, len(RECORD))
    # What follows the last record of a pre-allocated segment is zeros: the end of data.
    assert codec.scan(buf, len(RECORD), len(buf)) == (Scan.END, 0)


def test_scan_zeros_is_end() -> None:
    assert codec.scan(bytes(64), 0, 64) == (Scan.END, 0)
    assert codec.scan(bytes(64), 17, 64) == (Scan.END, 0)


def test_scan_too_close_to_limit_is_end() -> None:
    # Fewer than BLANK_SIZE bytes left in the segment: nothing can start there.
    buf = b"\xff" * 16
    for pos in range(16 - codec.BLANK_SIZE + 1, 16):
        assert codec.scan(buf, pos, 16) == (Scan.END, 0)


@pytest.mark.parametrize("size", [codec.BLANK_SIZE, codec.BLANK_SIZE + 1, 100, SEGMENT - 10])
def test_blank_filler_sizes(size: int) -> None:
    blank = codec.encode_blank(size)
    assert len(blank) == codec.BLANK_SIZE
    buf = bytearray(SEGMENT)
    at = SEGMENT - size
    buf[at : at + len(blank)] = blank
    assert codec.scan(buf, at, SEGMENT) == (Scan.BLANK, size)


def test_blank_shorter_than_its_header_is_corrupt() -> None:
    buf = bytearray(64)
    buf[0:8] = codec.encode_blank(4)
    assert codec.scan(buf, 0, 64)[0] is Scan.CORRUPT


def test_blank_running_past_the_limit_is_corrupt() -> None:
    buf = bytearray(64)
    buf[0:8] = codec.encode_blank(65)
    assert codec.scan(buf, 0, 64)[0] is Scan.CORRUPT


def test_blank_that_stops_short_of_the_segment_end_is_corrupt() -> None:
    # The store only ever writes a filler that runs exactly to the end of its segment, so a
    # "blank" that ends earlier is damage, not a filler; accepting it would make recovery skip the
    # rest of the segment (every later record) as if the segment were full.
    buf = bytearray(SEGMENT)
    buf[100:108] = codec.encode_blank(64)
    assert codec.scan(buf, 100, SEGMENT)[0] is Scan.CORRUPT


@given(
    pos=st.integers(0, len(RECORD) - 1),
    xor=st.integers(1, 255),
    at=st.sampled_from([0, 1000]),
)
@settings(max_examples=400, deadline=None)
def test_any_single_byte_change_is_corrupt(pos: int, xor: int, at: int) -> None:
    buf = in_segment(RECORD, at)
    buf[at + pos] ^= xor
    kind, _ = codec.scan(buf, at, len(buf))
    assert kind is Scan.CORRUPT, f"byte {pos} ^ {xor:#x} scanned as {kind}"


def test_every_single_bit_flip_is_corrupt() -> None:
    wrong = []
    for pos in range(len(RECORD)):
        for bit in range(8):
            buf = in_segment(RECORD)
            buf[pos] ^= 1 << bit
            kind, _ = codec.scan(buf, 0, len(buf))
            if kind is not Scan.CORRUPT:
                wrong.append((pos, bit, kind))
    assert wrong == []


def test_record_magic_one_bit_from_blank_magic_is_corrupt() -> None:
    # RECORD_MAGIC and BLANK_MAGIC differ in one bit of byte 7: a single bit flip there must not
    # turn a record in the middle of a segment into a filler.
    buf = in_segment(RECORD)
    buf[7] ^= 0x01
    assert codec.scan(buf, 0, len(buf))[0] is Scan.CORRUPT


@pytest.mark.parametrize("keep", [1, 4, 7, 8, 12, 40, codec.HEADER_SIZE, len(RECORD) - 1])
def test_truncated_record_is_corrupt_or_end(keep: int) -> None:
    torn = RECORD[:keep]
    assert codec.scan(torn, 0, len(torn))[0] in (Scan.CORRUPT, Scan.END)
    # The same torn prefix inside a zeroed segment (a partial write) never reads as a record.
    buf = in_segment(torn)
    assert codec.scan(buf, 0, len(buf))[0] in (Scan.CORRUPT, Scan.END)


@given(keep=st.integers(0, len(RECORD) - 1))
def test_truncated_record_never_scans_as_record(keep: int) -> None:
    buf = in_segment(RECORD[:keep])
    assert codec.scan(buf, 0, len(buf))[0] in (Scan.CORRUPT, Scan.END)


def test_garbage_is_corrupt() -> None:
    buf = in_segment(b"\xde\xad\xbe\xef" * 30)
    assert codec.scan(buf, 0, len(buf))[0] is Scan.CORRUPT


def test_peek_topic_queue() -> None:
    m = make(topic="payments_eu-1", queue_id=5)
    raw = codec.encode(m, 42, 0, NOW)
    buf = b"\x00" * 10 + raw
    assert codec.peek_topic_queue(buf, 10) == ("payments_eu-1", 5, 42)
    assert codec.peek_topic_queue(memoryview(raw), 0) == ("payments_eu-1", 5, 42)


# -- message ids ---------------------------------------------------------------------------------


def test_msg_ids_strictly_increase_within_a_process() -> None:
    gen = MsgIdGenerator()
    ids = [gen.next() for _ in range(5000)]
    assert all(len(i) == 16 for i in ids)
    assert all(a < b for a, b in itertools.pairwise(ids))
    same_ms = [gen.next(NOW) for _ in range(100)]
    assert all(a < b for a, b in itertools.pairwise(same_ms))


def test_msg_ids_still_increase_when_the_clock_steps_back() -> None:
    # "strictly within one process" must survive an NTP step of the wall clock.
    gen = MsgIdGenerator()
    first = gen.next(NOW)
    second = gen.next(NOW - 1000)
    assert second > first


def test_msg_id_is_time_prefixed() -> None:
    gen = MsgIdGenerator()
    assert msg_id_time_ms(gen.next(NOW)) == NOW
    first = gen.next(NOW)
    assert gen.next(NOW + 1) > first
    # Ids of two generators (two processes) order by their millisecond.
    a, b = MsgIdGenerator(), MsgIdGenerator()
    assert a.next(NOW + 1) > b.next(NOW)
    assert b.next(NOW + 2) > a.next(NOW + 1)


def test_msg_id_default_clock_is_now() -> None:
    before = time.time_ns() // 1_000_000
    mid = MsgIdGenerator().next()
    after = time.time_ns() // 1_000_000
    assert before <= msg_id_time_ms(mid) <= after


def test_two_generators_do_not_collide() -> None:
    a, b = MsgIdGenerator(), MsgIdGenerator()
    assert {a.next(NOW) for _ in range(100)}.isdisjoint({b.next(NOW) for _ in range(100)})


def test_parse_msg_id() -> None:
    mid = MsgIdGenerator().next(NOW)
    assert parse_msg_id(mid.hex()) == mid


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "0" * 31,
        "0" * 33,
        "A" * 32,  # uppercase is refused
        "g" * 32,
        "0" * 30 + " 0",
        "0" * 32 + "\n",
        None,
        12,
    ],
)
def test_parse_msg_id_refuses(bad: object) -> None:
    with pytest.raises(InvalidMessage):
        parse_msg_id(bad)  # type: ignore[arg-type]


# -- topic names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["orders", "a", "A-b_c-9", "x" * 100, "sys_lowercase_is_fine"])
def test_client_topic_names_accepted(name: str) -> None:
    assert validate_topic_name(name, client=True) == name
    assert validate_topic_name(name, client=False) == name


@pytest.mark.parametrize(
    "name", ["SYS_TRANS_HALF", "%DLQ%billing", "%RETRY%g+orders", "x" * 101, "a+b", "SYS_"]
)
def test_internal_names_refused_for_clients_allowed_internally(name: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_name(name, client=True)
    assert validate_topic_name(name, client=False) == name


@pytest.mark.parametrize(
    "name",
    ["", "a b", "a/b", "../etc", "a.b", "é", "x" * 256, None, 7, "orders\n", "\norders"],
)
def test_invalid_topic_names_refused_everywhere(name: object) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_name(name, client=True)
    with pytest.raises(InvalidTopic):
        validate_topic_name(name, client=False)


# -- message field limits ------------------------------------------------------------------------


def check(
    body: bytes = b"x",
    tags: str = "",
    keys: tuple[str, ...] = (),
    props: dict[str, str] | None = None,
    max_body: int = 100,
) -> None:
    validate_message_fields(body, tags, keys, props or {}, max_body)


def test_fields_at_their_limits_pass() -> None:
    check(
        body=b"x" * 100,
        tags="t" * MAX_TAGS_LEN,
        keys=tuple("k" * MAX_KEY_LEN for _ in range(MAX_KEYS)),
        props={"k": "v" * (MAX_PROPERTIES_BYTES - 1)},
    )
    check(body=b"")


def test_body_over_limit_is_too_large() -> None:
    with pytest.raises(MessageTooLarge):
        check(body=b"x" * 101)


@pytest.mark.parametrize(
    "kw",
    [
        {"tags": "t" * (MAX_TAGS_LEN + 1)},
        {"tags": "a|b"},
        {"tags": "a || b"},
        {"keys": tuple(f"k{i}" for i in range(MAX_KEYS + 1))},
        {"keys": ("",)},
        {"keys": ("k" * (MAX_KEY_LEN + 1),)},
        {"keys": ("a\x1fb",)},
        {"props": {"k": "v" * MAX_PROPERTIES_BYTES}},
        {"props": {"": "v"}},
    ],
)
def test_fields_over_their_limits_are_invalid(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidMessage):
        check(**kw)  # type: ignore[arg-type]
