"""MessageStore: puts, segments, idempotency, restart, crash recovery, rebuild, retention,
search by time, flush modes and write failures. Real files in tmp dirs, tiny segments."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker_core import codec
from broker_core import store as store_module
from broker_core.commitlog import CommitLog
from broker_core.errors import MessageTooLarge, StoreUnavailable, TopicExists, TopicNotFound
from broker_core.message import Message, MsgIdGenerator
from tests.unit.broker_helpers import T0_MS, msg, no_hang
from tests.unit.store_helpers import (
    SEG,
    Stores,
    all_in_queues,
    body_for,
    crash_copy,
    put_numbered,
    segments,
    write_at,
)


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    with no_hang(10):
        yield

# -- put / read ----------------------------------------------------------------------------------


async def test_put_then_read_by_offset_id_key_and_queue(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 2)
    m = msg("orders", "hi", tags="created", keys=["order-17", "user-3"], properties={"a": "b"})
    r = await store.put(m)
    assert r.duplicate is False
    assert r.topic == "orders" and r.queue_id in (0, 1) and r.queue_offset == 0
    assert len(r.msg_id) == 16 and m.msg_id == r.msg_id
    got = store.read(r.phy_offset)
    assert got is not None
    assert (got.body, got.tags, got.keys, got.properties) == (
        b"hi",
        "created",
        ("order-17", "user-3"),
        {"a": "b"},
    )
    assert got.msg_id == r.msg_id
    assert got.stored_at >= got.born_at > 0
    assert [x.phy_offset for x in store.lookup_id(r.msg_id)] == [r.phy_offset]
    assert [x.msg_id for x in store.lookup_key("orders", "user-3")] == [r.msg_id]
    assert store.lookup_key("orders", "nope") == []
    assert store.lookup_key("other", "user-3") == []
    assert store.queue_bounds("orders", r.queue_id) == (0, 1)


async def test_round_robin_over_queues_and_explicit_queue(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 3)
    rs = await put_numbered(store, "orders", 6)
    assert sorted(r.queue_id for r in rs) == [0, 0, 1, 1, 2, 2]
    r = await store.put(msg("orders", "x", queue_id=2))
    assert (r.queue_id, r.queue_offset) == (2, 2)


async def test_put_to_unknown_topic(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    with pytest.raises(TopicNotFound):
        await store.put(msg("nope"))


async def test_batch_with_an_unknown_topic_stores_nothing(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 1)
    with pytest.raises(TopicNotFound):
        await store.put_many([msg("orders", "a"), msg("nope", "b")])
    r = await store.put(msg("orders", "c"))
    assert r.queue_offset == 0
    assert all_in_queues(store, "orders") == [b"c"]


async def test_put_many_keeps_order(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 1)
    rs = await store.put_many([msg("orders", f"m{i}") for i in range(50)])
    assert [r.queue_offset for r in rs] == list(range(50))
    assert all(a.phy_offset < b.phy_offset for a, b in itertools.pairwise(rs))
    assert all_in_queues(store, "orders") == [f"m{i}".encode() for i in range(50)]


async def test_concurrent_puts_are_group_committed(
    stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = []
    orig = CommitLog.write

    def counting(self: CommitLog, offset: int, data: bytes, *, sync: bool) -> None:
        writes.append(len(data))
        orig(self, offset, data, sync=sync)

    monkeypatch.setattr(CommitLog, "write", counting)
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 4)
    rs = await asyncio.gather(*(store.put(msg("orders", f"m{i}")) for i in range(200)))
    assert len({r.msg_id for r in rs}) == 200
    assert len(writes) < 200
    assert sorted(all_in_queues(store, "orders")) == sorted(f"m{i}".encode() for i in range(200))


# -- segments ------------------------------------------------------------------------------------


async def test_records_never_straddle_segments(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 3)
    rs = []
    for i in range(160):
        size = 500 + (i * 997) % 4000  # varied sizes so segment tails differ
        rs.append(await store.put(msg("orders", body_for(i, size), keys=[f"k{i}"])))
    assert len(segments(tmp_path)) >= 5
    for r in rs:
        m = store.read(r.phy_offset)
        assert m is not None
        assert r.phy_offset // SEG == (r.phy_offset + m.size - 1) // SEG
    for i, r in enumerate(rs):
        [m] = store.lookup_id(r.msg_id)
        assert m.body == body_for(i, 500 + (i * 997) % 4000)
        assert [x.msg_id for x in store.lookup_key("orders", f"k{i}")] == [r.msg_id]
    # Walking the whole log skips the blank fillers and finds exactly the records.
    walked = store.commitlog.iter_records(0, store.commitlog.written_end)
    assert [off for off, _, _ in walked] == [r.phy_offset for r in rs]
    assert sorted(all_in_queues(store, "orders")) == sorted(
        body_for(i, 500 + (i * 997) % 4000) for i in range(160)
    )


async def test_record_exactly_filling_a_segment_tail(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("t", 1)
    first = await store.put(msg("t", b"x"))
    size = store.read(first.phy_offset).size  # type: ignore[union-attr]
    overhead = size - 1
    # Fill the segment exactly (the record, then its write's unit marker): the next record
    # starts the next segment with no filler at all.
    fill = SEG - store.commitlog.written_end - overhead - codec.UNIT_SIZE
    r = await store.put(msg("t", b"y" * fill))
    r_size = store.read(r.phy_offset).size  # type: ignore[union-attr]
    assert r.phy_offset + r_size + codec.UNIT_SIZE == SEG
    nxt = await store.put(msg("t", b"z"))
    assert nxt.phy_offset == SEG
    # A write leaving fewer than 8 bytes in the segment: the rest reads as the segment's end.
    fill = SEG - overhead - 5 - codec.UNIT_SIZE - (store.commitlog.written_end - SEG)
    await store.put(msg("t", b"w" * fill))
    after = await store.put(msg("t", b"v"))
    assert after.phy_offset == 2 * SEG
    assert [m for m in all_in_queues(store, "t")] == [
        b"x",
        b"y" * (SEG - size - overhead - 2 * codec.UNIT_SIZE),
        b"z",
        b"w" * fill,
        b"v",
    ]


async def test_record_larger_than_a_segment_is_refused_without_a_trace(
    stores: Stores, tmp_path: Path
) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("other", 1)
    await store.create_topic("t", 1)
    await store.put(msg("other", "first record of the log"))
    await store.put(msg("t", "a"))
    with pytest.raises(MessageTooLarge):
        await store.put(msg("t", b"x" * (SEG + 1)))
    with pytest.raises(MessageTooLarge):
        await store.put_many([msg("t", "b"), msg("t", b"x" * (SEG + 1))])
    r = await store.put(msg("t", "c"))
    # A refused put takes no queue offset: a hole would read as entry (0, 0) and hand the
    # group whatever record starts the CommitLog (here another topic's message).
    assert r.queue_offset == 1
    assert all_in_queues(store, "t") == [b"a", b"c"]


# -- idempotency ---------------------------------------------------------------------------------


async def test_duplicate_put_returns_first_result(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 4)
    mid = MsgIdGenerator().next()
    first = await store.put(msg("orders", "one", msg_id=mid), check_duplicate=True)
    again = await store.put(msg("orders", "two", msg_id=mid), check_duplicate=True)
    assert first.duplicate is False
    assert again.duplicate is True
    assert again[:5] == first[:5]
    assert [m.body for m in store.lookup_id(mid)] == [b"one"]
    assert sum(hi - lo for lo, hi in (store.queue_bounds("orders", q) for q in range(4))) == 1


async def test_duplicate_put_while_first_is_pending(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 4)
    mid = MsgIdGenerator().next()
    a, b, c = await asyncio.gather(
        store.put(msg("orders", "one", msg_id=mid), check_duplicate=True),
        store.put(msg("orders", "two", msg_id=mid), check_duplicate=True),
        store.put_many(
            [msg("orders", "three", msg_id=mid), msg("orders", "four", msg_id=mid)],
            check_duplicate=True,
        ),
    )
    assert a.duplicate is False
    assert b.duplicate is True and b[:5] == a[:5]
    assert all(x.duplicate and x[:5] == a[:5] for x in c)
    assert [m.body for m in store.lookup_id(mid)] == [b"one"]


async def test_duplicate_of_a_write_in_flight_waits_for_that_write(
    stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A duplicate must not be acknowledged before the original is written: if that write fails,
    # the duplicate's producer must hear about it instead of getting a success for a message that
    # was never stored.
    entered, release = threading.Event(), threading.Event()
    fail = {"on": False}
    orig = CommitLog.write

    def slow_write(self: CommitLog, offset: int, data: bytes, *, sync: bool) -> None:
        entered.set()
        release.wait(10)
        if fail["on"]:
            raise OSError(28, "No space left on device")
        orig(self, offset, data, sync=sync)

    monkeypatch.setattr(CommitLog, "write", slow_write)
    # The writer thread's path: small async writes are otherwise made on the event loop,
    # which this blocking write would stop.
    monkeypatch.setattr(store_module, "INLINE_WRITE_BYTES", 0)
    store = await stores.start(tmp_path)
    release.set()
    await store.create_topic("orders", 1)
    await store.put(msg("orders", "warm-up"))
    entered.clear()
    release.clear()
    mid = MsgIdGenerator().next()
    t1 = asyncio.create_task(store.put(msg("orders", "one", msg_id=mid), check_duplicate=True))
    assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
    t2 = asyncio.create_task(store.put(msg("orders", "one", msg_id=mid), check_duplicate=True))
    for _ in range(5):
        await asyncio.sleep(0)
    fail["on"] = True
    release.set()
    with pytest.raises(StoreUnavailable):
        await t1
    with pytest.raises(StoreUnavailable):
        await t2


async def test_duplicate_check_after_restart(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 4)
    mid = MsgIdGenerator().next()
    first = await store.put(msg("orders", "one", msg_id=mid), check_duplicate=True)
    await stores.stop(store)
    store = await stores.start(tmp_path)
    again = await store.put(msg("orders", "one", msg_id=mid), check_duplicate=True)
    assert again.duplicate is True and again[:5] == first[:5]


async def test_same_id_in_two_topics_is_allowed(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("a", 1)
    await store.create_topic("b", 1)
    mid = MsgIdGenerator().next()
    ra = await store.put(msg("a", "in a", msg_id=mid), check_duplicate=True)
    rb = await store.put(msg("b", "in b", msg_id=mid), check_duplicate=True)
    assert not ra.duplicate and not rb.duplicate
    assert ra.phy_offset != rb.phy_offset
    assert [(m.topic, m.body) for m in store.lookup_id(mid)] == [("a", b"in a"), ("b", b"in b")]


# -- topics --------------------------------------------------------------------------------------


async def test_topics_persist_and_duplicates_are_refused(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    t = await store.create_topic("orders", 3)
    assert (t.name, t.queues) == ("orders", 3)
    with pytest.raises(TopicExists):
        await store.create_topic("orders", 3)
    internal = await store.ensure_topic("%DLQ%billing", 1)
    assert await store.ensure_topic("%DLQ%billing", 1) == internal
    await stores.stop(store)
    store = await stores.start(tmp_path)
    assert store.topic("orders").queues == 3
    assert store.topic("%DLQ%billing").queues == 1


# -- restart -------------------------------------------------------------------------------------


async def test_clean_restart_keeps_everything(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 3)
    rs = await put_numbered(store, "orders", 60, size=2000)
    bounds = {q: store.queue_bounds("orders", q) for q in range(3)}
    end = store.commitlog.written_end
    await stores.stop(store)
    assert (tmp_path / "commitlog" / "clean_shutdown").exists()

    store = await stores.start(tmp_path)
    assert not (tmp_path / "commitlog" / "clean_shutdown").exists()
    assert store.commitlog.written_end == end
    assert {q: store.queue_bounds("orders", q) for q in range(3)} == bounds
    for i, r in enumerate(rs):
        [m] = store.lookup_id(r.msg_id)
        assert (m.body, m.queue_id, m.queue_offset) == (
            body_for(i, 2000),
            r.queue_id,
            r.queue_offset,
        )
        assert [x.msg_id for x in store.lookup_key("orders", f"k{i}")] == [r.msg_id]
    # Queue offsets continue where they were; the log continues at its end.
    more = await store.put(msg("orders", "after", queue_id=1))
    assert more.queue_offset == bounds[1][1]
    assert more.phy_offset >= end
    assert store.read(more.phy_offset).body == b"after"  # type: ignore[union-attr]


async def test_restart_of_an_empty_store(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await stores.stop(store)
    store = await stores.start(tmp_path)
    await store.create_topic("t", 1)
    r = await store.put(msg("t", "first"))
    assert (r.phy_offset, r.queue_offset) == (0, 0)


async def test_restart_right_after_a_segment_filled(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("t", 1)
    first = await store.put(msg("t", b"x"))
    overhead = store.read(first.phy_offset).size - 1  # type: ignore[union-attr]
    fill = SEG - store.commitlog.written_end - overhead - codec.UNIT_SIZE
    await store.put(msg("t", b"y" * fill))
    assert store.commitlog.written_end == SEG
    await stores.stop(store)
    store = await stores.start(tmp_path)
    r = await store.put(msg("t", b"z"))
    assert (r.phy_offset, r.queue_offset) == (SEG, 2)
    assert [m[:1] for m in all_in_queues(store, "t")] == [b"x", b"y", b"z"]


# -- crash recovery ------------------------------------------------------------------------------


def torn_record(topic: str) -> bytes:
    m = Message(topic=topic, body=b"torn" * 200, msg_id=MsgIdGenerator().next(), queue_id=0)
    raw = codec.encode(m, 999, 0, T0_MS)
    return raw[: len(raw) // 2]


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda: torn_record("orders"), id="partial-record"),
        pytest.param(lambda: b"\xa5" * 300, id="garbage"),
        pytest.param(lambda: b"\x00\x00\x01\x00" + b"\x00" * 4, id="length-without-magic"),
    ],
)
async def test_crash_with_torn_tail_is_truncated(
    stores: Stores, tmp_path: Path, tail: Callable[[], bytes]
) -> None:
    live_dir, crash_dir = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live_dir)
    await store.create_topic("orders", 2)
    rs = await put_numbered(store, "orders", 40, size=3000)  # spans several segments
    end = await crash_copy(store, live_dir, crash_dir)
    write_at(crash_dir, end, tail())

    recovered = await stores.start(crash_dir)
    assert recovered.commitlog.written_end == end
    for i, r in enumerate(rs):
        [m] = recovered.lookup_id(r.msg_id)
        assert m.body == body_for(i, 3000)
        assert [x.msg_id for x in recovered.lookup_key("orders", f"k{i}")] == [r.msg_id]
    for q in range(2):
        assert recovered.queue_bounds("orders", q) == store.queue_bounds("orders", q)
    nxt = await recovered.put(msg("orders", "after the crash", queue_id=0))
    assert nxt.phy_offset == end  # right after the last good record, over the torn bytes
    assert nxt.queue_offset == store.queue_bounds("orders", 0)[1]
    assert recovered.read(nxt.phy_offset).body == b"after the crash"  # type: ignore[union-attr]
    assert sorted(all_in_queues(recovered, "orders")) == sorted(
        [body_for(i, 3000) for i in range(40)] + [b"after the crash"]
    )


async def test_crash_with_corrupt_last_record_drops_only_it(stores: Stores, tmp_path: Path) -> None:
    live_dir, crash_dir = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live_dir)
    await store.create_topic("orders", 1)
    rs = await put_numbered(store, "orders", 20, size=1000)
    last = rs[-1]
    await crash_copy(store, live_dir, crash_dir)
    write_at(crash_dir, last.phy_offset + codec.HEADER_SIZE + 20, b"\xff\xfe")  # flip body bytes

    recovered = await stores.start(crash_dir)
    assert recovered.commitlog.written_end == last.phy_offset
    for i, r in enumerate(rs[:-1]):
        assert [m.body for m in recovered.lookup_id(r.msg_id)] == [body_for(i, 1000)]
    assert recovered.lookup_id(last.msg_id) == []
    assert recovered.queue_bounds("orders", 0) == (0, 19)
    nxt = await recovered.put(msg("orders", "replacement"))
    assert (nxt.phy_offset, nxt.queue_offset) == (last.phy_offset, 19)
    assert all_in_queues(recovered, "orders")[-1] == b"replacement"


async def test_crash_that_lost_indexed_records_keeps_index_chains_sound(
    stores: Stores, tmp_path: Path
) -> None:
    # The index pages of records the CommitLog then lost (power cut before the log's fsync) can
    # survive a crash, with slots pointing past the file's persisted count. Re-adding over them
    # must not link entries into a cycle: a lookup would never return, freezing the event loop.
    live_dir, crash_dir = tmp_path / "live", tmp_path / "crash"
    one_slot = {"index_slots": 1, "index_entries": 1000}  # every entry in one chain
    store = await stores.start(live_dir, **one_slot)
    await store.create_topic("t", 1)
    rs = [await store.put(msg("t", f"m{i}", keys=[f"k{i}"])) for i in range(5)]
    end = await crash_copy(store, live_dir, crash_dir)
    # Records 3 and 4 never made it: their bytes are zeros (the pages were never written).
    write_at(crash_dir, rs[3].phy_offset, bytes(end - rs[3].phy_offset))

    recovered = await stores.start(crash_dir, **one_slot)
    assert recovered.commitlog.written_end == rs[3].phy_offset
    new = [await recovered.put(msg("t", f"n{i}", keys=[f"k{i}"])) for i in range(3)]
    assert recovered.lookup_id(MsgIdGenerator().next()) == []
    assert recovered.lookup_key("t", "nothing") == []
    for r in rs[:3] + new:
        assert [m.msg_id for m in recovered.lookup_id(r.msg_id)] == [r.msg_id]
    for r in rs[3:]:
        assert recovered.lookup_id(r.msg_id) == []
    assert sorted(m.body for m in recovered.lookup_key("t", "k0")) == [b"m0", b"n0"]
    assert [m.body for m in recovered.lookup_key("t", "k4")] == []


async def test_crash_without_derived_files_flushed(stores: Stores, tmp_path: Path) -> None:
    # A crash copy taken after a checkpoint, with more puts after it: the re-dispatch from the
    # checkpoint fills the ConsumeQueues and the index in.
    live_dir, crash_dir = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live_dir)
    await store.create_topic("orders", 2)
    early = await put_numbered(store, "orders", 10, size=500)
    await store.flush()
    late = await put_numbered(store, "orders", 10, size=500, start=10)
    await crash_copy(store, live_dir, crash_dir)
    shutil.rmtree(crash_dir / "consumequeue")  # as if its pages never reached the disk
    recovered = await stores.start(crash_dir)
    for i, r in enumerate(early + late):
        assert [m.body for m in recovered.lookup_id(r.msg_id)] == [body_for(i, 500)]
    for q in range(2):
        assert recovered.queue_bounds("orders", q) == store.queue_bounds("orders", q)


async def test_clean_marker_that_does_not_match_the_data_is_not_trusted(
    stores: Stores, tmp_path: Path
) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 1)
    rs = await put_numbered(store, "orders", 5, size=100)
    end = store.commitlog.written_end
    await stores.stop(store)
    marker = tmp_path / "commitlog" / "clean_shutdown"
    marker.write_text(str(rs[2].phy_offset))  # points into valid data, not at its end
    store = await stores.start(tmp_path)
    assert store.commitlog.written_end == end
    assert len(all_in_queues(store, "orders")) == 5


# -- rebuilding derived files --------------------------------------------------------------------


@pytest.mark.parametrize("remove", [["consumequeue"], ["index"], ["consumequeue", "index"]])
async def test_rebuild_consumequeues_and_index(
    stores: Stores, tmp_path: Path, remove: list[str]
) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 3)
    await store.create_topic("audit", 1)
    rs = await put_numbered(store, "orders", 50, size=1500)
    ra = await put_numbered(store, "audit", 10, start=100)
    bounds = {q: store.queue_bounds("orders", q) for q in range(3)}
    await stores.stop(store)
    for name in remove:
        shutil.rmtree(tmp_path / name)

    store = await stores.start(tmp_path)
    assert {q: store.queue_bounds("orders", q) for q in range(3)} == bounds
    assert store.queue_bounds("audit", 0) == (0, 10)
    for i, r in enumerate(rs):
        [m] = store.lookup_id(r.msg_id)
        assert (m.body, m.queue_id, m.queue_offset) == (
            body_for(i, 1500),
            r.queue_id,
            r.queue_offset,
        )
        assert [x.msg_id for x in store.lookup_key("orders", f"k{i}")] == [r.msg_id]
    for i, r in enumerate(ra, start=100):
        assert [x.msg_id for x in store.lookup_key("audit", f"k{i}")] == [r.msg_id]
    assert sorted(all_in_queues(store, "orders")) == sorted(body_for(i, 1500) for i in range(50))
    more = await store.put(msg("orders", "more", queue_id=0))
    assert more.queue_offset == bounds[0][1]


async def test_rebuild_learns_topics_when_topics_json_is_lost(
    stores: Stores, tmp_path: Path
) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 2)
    rs = await put_numbered(store, "orders", 6)
    await stores.stop(store)
    (tmp_path / "topics.json").unlink()
    shutil.rmtree(tmp_path / "consumequeue")
    store = await stores.start(tmp_path)
    assert store.topic("orders").queues == 2
    assert sorted(all_in_queues(store, "orders")) == sorted(body_for(i) for i in range(6))
    assert [m.msg_id for m in store.lookup_id(rs[0].msg_id)] == [rs[0].msg_id]


# -- retention -----------------------------------------------------------------------------------


def age_segments(data_dir: Path, starts: list[int], age_s: float) -> None:
    old = time.time() - age_s
    for s in starts:
        os.utime(data_dir / "commitlog" / f"{s:020d}", (old, old))


async def test_retention_deletes_old_full_segments_never_the_active_one(
    stores: Stores, tmp_path: Path
) -> None:
    store = await stores.start(tmp_path, retention_ms=1000)
    await store.create_topic("orders", 2)
    rs = await put_numbered(store, "orders", 60, size=3000)
    segs = segments(tmp_path)
    assert len(segs) >= 3
    active = store.commitlog.segment_start(store.commitlog.written_end)
    assert active == segs[-1]
    age_segments(tmp_path, segs, 3600)  # even the active one looks old

    deleted = await store.enforce_retention()
    assert deleted == len(segs) - 1
    assert segments(tmp_path) == [active]
    assert store.commitlog.min_offset == active
    kept = [(i, r) for i, r in enumerate(rs) if r.phy_offset >= active]
    gone = [r for r in rs if r.phy_offset < active]
    assert kept and gone
    for r in gone:
        assert store.read(r.phy_offset) is None
        assert store.lookup_id(r.msg_id) == []
    for i, r in kept:
        assert [m.body for m in store.lookup_id(r.msg_id)] == [body_for(i, 3000)]
    for q in range(2):
        lo, hi = store.queue_bounds("orders", q)
        first_kept = min(r.queue_offset for _, r in kept if r.queue_id == q)
        assert lo == first_kept
        assert hi == max(r.queue_offset for r in rs if r.queue_id == q) + 1
    assert sorted(all_in_queues(store, "orders")) == sorted(body_for(i, 3000) for i, _ in kept)
    assert await store.enforce_retention() == 0  # nothing more to do


async def test_retention_keeps_young_segments_and_stays_contiguous(
    stores: Stores, tmp_path: Path
) -> None:
    store = await stores.start(tmp_path, retention_ms=3600_000)
    await store.create_topic("orders", 1)
    await put_numbered(store, "orders", 60, size=3000)
    segs = segments(tmp_path)
    assert await store.enforce_retention() == 0
    # Only the second segment is old: deleting it would leave a hole, so nothing goes.
    age_segments(tmp_path, [segs[1]], 7200)
    assert await store.enforce_retention() == 0
    age_segments(tmp_path, [segs[0]], 7200)
    assert await store.enforce_retention() == 2
    assert segments(tmp_path) == segs[2:]


async def test_retention_then_restart_keeps_queue_offsets(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path, retention_ms=1000)
    await store.create_topic("old", 1)
    await store.create_topic("new", 1)
    await put_numbered(store, "old", 16, size=3000)  # 16 = two whole ConsumeQueue files of 8
    await put_numbered(store, "new", 30, size=3000)
    age_segments(tmp_path, segments(tmp_path), 3600)
    await store.enforce_retention()
    assert store.queue_bounds("old", 0) == (16, 16)
    await stores.stop(store)
    store = await stores.start(tmp_path, retention_ms=1000)
    assert store.queue_bounds("old", 0)[1] == 16
    r = await store.put(msg("old", "next"))
    assert r.queue_offset == 16


# -- search by time ------------------------------------------------------------------------------


async def test_search_offset_by_timestamp(stores: Stores, tmp_path: Path) -> None:
    now = [T0_MS]
    store = await stores.start(tmp_path, clock=lambda: now[0])
    await store.create_topic("orders", 1)
    for i in range(20):
        now[0] = T0_MS + i * 10
        await store.put(msg("orders", f"m{i}"))
    s = store.search_offset
    assert s("orders", 0, 0) == 0
    assert s("orders", 0, T0_MS) == 0
    assert s("orders", 0, T0_MS + 1) == 1
    assert s("orders", 0, T0_MS + 10) == 1
    assert s("orders", 0, T0_MS + 55) == 6
    assert s("orders", 0, T0_MS + 190) == 19
    assert s("orders", 0, T0_MS + 191) == 20
    got = store.read(store.consume_queue("orders", 0).get(6)[0])
    assert got is not None and got.stored_at == T0_MS + 60


# -- flush modes and failures --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_flush_modes(
    stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    syncs = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    store = await stores.start(tmp_path, flush=mode)
    await store.create_topic("orders", 1)
    syncs.clear()
    rs = await put_numbered(store, "orders", 5)
    if mode == "sync":
        assert len(syncs) >= 1  # acknowledged only after an fdatasync
    else:
        assert syncs == []  # acknowledged once written; the periodic flush syncs
        await store.flush()
        assert len(syncs) >= 1
    assert [m.body for m in store.lookup_id(rs[-1].msg_id)] == [body_for(4)]
    await stores.stop(store)
    store = await stores.start(tmp_path, flush=mode)
    assert all_in_queues(store, "orders") == [body_for(i) for i in range(5)]


async def test_puts_after_stop_are_refused(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("orders", 1)
    await stores.stop(store)
    with pytest.raises(StoreUnavailable):
        await store.put(msg("orders", "late"))


async def test_a_different_segment_size_is_refused_not_applied(
    stores: Stores, tmp_path: Path
) -> None:
    """Opening a data directory with another segment size must not resize (cut) segments."""
    store = await stores.start(tmp_path)
    await store.create_topic("t", 1)
    await store.put(msg("t", "kept"))
    await stores.stop(store)
    segment = next((tmp_path / "commitlog").glob("0*"))
    size = segment.stat().st_size
    with pytest.raises(RuntimeError, match="cannot change"):
        await stores.start(tmp_path, segment_bytes=size * 2)
    assert segment.stat().st_size == size
    again = await stores.start(tmp_path)
    assert all_in_queues(again, "t") == [b"kept"]
