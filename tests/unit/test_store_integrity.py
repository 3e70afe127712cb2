"""Storage integrity: damage in the middle of the log is skipped and reported (never a reason to
drop what follows), CRC on every read, torn tails and short segments, atomic batches, and write
failures (full disk, short writes, failed fsync) through the file-layer seam."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from broker_core import codec
from broker_core.commitlog import FileIO, StorageError
from broker_core.errors import StoreUnavailable
from broker_core.message import Message, MsgIdGenerator
from tests.unit.broker_helpers import msg, no_hang
from tests.unit.store_helpers import (
    SEG,
    Stores,
    body_for,
    crash_copy,
    put_numbered,
    segments,
    write_at,
)
from tests.unit.store_helpers import (
    readable_bodies as bodies,
)


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    with no_hang(10):
        yield


class FaultyIO(FileIO):
    """A disk that can be made full (ENOSPC on writes and allocation), fail fsync (EIO), or
    fail after writing part of a write."""

    def __init__(self) -> None:
        self.full = False
        self.fsync_fails = False
        self.partial: int | None = None  # bytes written before the failure

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if self.partial is not None:
            n = min(self.partial, len(data))
            if n:
                os.pwrite(fd, data[:n], offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        if self.fsync_fails:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fdatasync(fd)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        if self.full or self.partial is not None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().fallocate(fd, offset, length)


def damage_entries(data_dir: Path) -> list[dict[str, object]]:
    path = data_dir / "commitlog" / "damage.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# -- damage in the middle of the log -------------------------------------------------------------


async def test_corrupt_bytes_mid_log_skip_only_the_damaged_records(
    stores: Stores, tmp_path: Path
) -> None:
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("orders", 2)
    rs = await put_numbered(store, "orders", 80, size=3000)  # four segments
    assert len(segments(live)) == 4
    end = await crash_copy(store, live, crash)
    third = segments(crash)[2]
    victim = next(r for r in rs if r.phy_offset > third + SEG // 2)
    write_at(crash, victim.phy_offset + 100, b"\xa5" * 16)  # flip 16 bytes of one record

    recovered = await stores.start(crash)
    assert recovered.commitlog.written_end == end  # nothing after the damage was cut
    assert segments(crash) == segments(live)  # no segment deleted
    kept = sorted(bodies(recovered, "orders"))
    expected = sorted(body_for(i, 3000) for i, r in enumerate(rs) if r is not victim)
    assert kept == expected
    assert recovered.lookup_id(victim.msg_id) == []
    found = damage_entries(crash)
    assert [e["offset"] for e in found] == [victim.phy_offset]
    assert found[0]["segment"] == third and found[0]["found_by"] == "recovery"
    # New puts go after the old end and everything stays readable.
    nxt = await recovered.put(msg("orders", "after"))
    assert nxt.phy_offset >= end
    assert b"after" in bodies(recovered, "orders")


async def test_a_zeroed_page_mid_log_is_damage_not_the_end(stores: Stores, tmp_path: Path) -> None:
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    rs = await put_numbered(store, "t", 40, size=1000)
    end = await crash_copy(store, live, crash)
    write_at(crash, rs[10].phy_offset, bytes(rs[12].phy_offset - rs[10].phy_offset))

    recovered = await stores.start(crash)
    assert recovered.commitlog.written_end == end
    assert bodies(recovered, "t") == [body_for(i, 1000) for i in range(40) if i not in (10, 11)]
    assert [e["offset"] for e in damage_entries(crash)] == [rs[10].phy_offset]


async def test_recovery_checks_every_segment_since_the_checkpoint(
    stores: Stores, tmp_path: Path
) -> None:
    # The damage sits three segments before the end; a recovery that checks only the last two
    # segments would hand the damaged record out.
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    rs = await put_numbered(store, "t", 100, size=3000)
    assert len(segments(live)) >= 5
    await crash_copy(store, live, crash)
    victim = rs[3]
    write_at(crash, victim.phy_offset + 60, b"\x00\xff\x00\xff")
    recovered = await stores.start(crash)
    assert [e["offset"] for e in damage_entries(crash)] == [victim.phy_offset]
    assert len(bodies(recovered, "t")) == 99


async def test_crc_checked_on_every_read_after_a_clean_stop(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("t", 1)
    rs = await put_numbered(store, "t", 10, size=200)
    await stores.stop(store)
    write_at(tmp_path, rs[4].phy_offset + codec.HEADER_SIZE + 30, b"\x00\x00")

    store = await stores.start(tmp_path)  # a clean stop: recovery trusts its marker
    assert damage_entries(tmp_path) == []
    assert store.read(rs[4].phy_offset) is None  # by offset (receive, replay)
    assert store.lookup_id(rs[4].msg_id) == []  # by id
    assert store.lookup_key("t", "k4") == []  # by key
    assert [m.body for m in store.lookup_id(rs[5].msg_id)] == [body_for(5, 200)]
    assert bodies(store, "t") == [body_for(i, 200) for i in range(10) if i != 4]
    found = damage_entries(tmp_path)
    assert [(e["offset"], e["found_by"]) for e in found] == [(rs[4].phy_offset, "read")]


async def test_a_record_read_at_the_wrong_offset_is_refused(stores: Stores, tmp_path: Path) -> None:
    # A valid record in the wrong place (a ConsumeQueue entry pointing elsewhere) is not handed
    # out as if it were the one asked for.
    store = await stores.start(tmp_path)
    await store.create_topic("t", 1)
    a, b = await put_numbered(store, "t", 2, size=10)
    raw = store.commitlog.view_at(a.phy_offset)
    view, pos = raw
    record = bytes(view[pos : pos + store.read(a.phy_offset).size])  # type: ignore[union-attr]
    await stores.stop(store)
    write_at(tmp_path, b.phy_offset, record)  # a's bytes, CRC intact, at b's offset
    store = await stores.start(tmp_path)
    assert store.read(b.phy_offset) is None


# -- torn tails -------------------------------------------------------------------------------


async def test_a_torn_batch_is_dropped_whole(stores: Stores, tmp_path: Path) -> None:
    # A crash in the middle of writing a batch leaves its first records valid and no unit
    # marker: none of the batch is kept, so a batch is all or nothing.
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 2)
    before = await put_numbered(store, "t", 3, size=100)
    end_before = store.commitlog.written_end
    batch = await store.put_many([msg("t", body_for(100 + i, 100)) for i in range(50)])
    end = await crash_copy(store, live, crash)
    marker_at = end - codec.UNIT_SIZE
    keep = (batch[30].phy_offset - end_before) // 2
    write_at(crash, end_before + keep, bytes(marker_at + codec.UNIT_SIZE - end_before - keep))

    recovered = await stores.start(crash)
    assert recovered.commitlog.written_end == end_before
    assert sorted(bodies(recovered, "t")) == sorted(body_for(i, 100) for i in range(3))
    assert damage_entries(crash) == []  # a torn tail is not damage
    nxt = await recovered.put(msg("t", "next"))
    assert nxt.phy_offset == end_before
    assert recovered.lookup_id(before[0].msg_id)


async def test_a_last_write_with_a_damaged_record_is_a_torn_tail(
    stores: Stores, tmp_path: Path
) -> None:
    # Pages of the last write reached the disk out of order (power cut during its fsync): its
    # marker is there but a record is not. It was never acknowledged: dropped whole.
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    await put_numbered(store, "t", 3, size=100)
    end_before = store.commitlog.written_end
    batch = await store.put_many([msg("t", body_for(100 + i, 100)) for i in range(10)])
    await crash_copy(store, live, crash)
    write_at(crash, batch[4].phy_offset + 50, b"\xff\xff\xff")
    recovered = await stores.start(crash)
    assert recovered.commitlog.written_end == end_before
    assert bodies(recovered, "t") == [body_for(i, 100) for i in range(3)]


async def test_a_truncated_last_segment_is_a_torn_tail(stores: Stores, tmp_path: Path) -> None:
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    rs = await put_numbered(store, "t", 30, size=3000)
    await crash_copy(store, live, crash)
    last = segments(crash)[-1]
    path = crash / "commitlog" / f"{last:020d}"
    cut = rs[-3].phy_offset - last + 10  # inside the third-last record
    os.truncate(path, cut)

    recovered = await stores.start(crash)
    assert path.stat().st_size == SEG
    assert recovered.commitlog.written_end == rs[-3].phy_offset
    assert bodies(recovered, "t") == [body_for(i, 3000) for i in range(27)]


async def test_a_real_segment_size_change_is_still_refused(stores: Stores, tmp_path: Path) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("t", 1)
    await put_numbered(store, "t", 30, size=3000)
    await stores.stop(store)
    with pytest.raises(RuntimeError, match="cannot change"):
        await stores.start(tmp_path, segment_bytes=2 * SEG)


# -- write failures ---------------------------------------------------------------------------


async def test_full_disk_is_503_with_the_cause_and_heals_without_restart(
    stores: Stores, tmp_path: Path
) -> None:
    io = FaultyIO()
    store = await stores.start(tmp_path, io=io)
    await store.create_topic("t", 2)
    await store.put(msg("t", "before"))
    io.full = True
    with pytest.raises(StoreUnavailable, match="No space left on device"):
        await store.put(msg("t", "refused"))
    with pytest.raises(StoreUnavailable, match="No space left on device"):
        await store.put_many([msg("t", f"refused {i}") for i in range(50)])
    assert store.failure is not None and "No space left" in store.failure
    io.full = False
    await store.put(msg("t", "after"))  # the next put probes, heals and is stored
    assert store.failure is None
    assert sorted(bodies(store, "t")) == [b"after", b"before"]
    await stores.stop(store)
    store = await stores.start(tmp_path)
    assert sorted(bodies(store, "t")) == [b"after", b"before"]


async def test_an_idle_failed_store_heals_by_itself(stores: Stores, tmp_path: Path) -> None:
    io = FaultyIO()
    store = await stores.start(tmp_path, io=io)
    await store.create_topic("t", 1)
    io.full = True
    with pytest.raises(StoreUnavailable):
        await store.put(msg("t", "refused"))
    io.full = False
    for _ in range(100):  # the writer probes about once a second while failed
        if store.failure is None:
            break
        await __import__("asyncio").sleep(0.05)
    assert store.failure is None


@pytest.mark.parametrize("fault", ["partial", "fsync"])
async def test_a_failed_batch_is_not_there_after_a_restart(
    stores: Stores, tmp_path: Path, fault: str
) -> None:
    live, crash = tmp_path / "live", tmp_path / "crash"
    io = FaultyIO()
    store = await stores.start(live, io=io, flush="sync")
    await store.create_topic("t", 2)
    await put_numbered(store, "t", 5, size=100)
    if fault == "partial":
        io.partial = 2000  # about half the batch reaches the file, then the disk is full
    else:
        io.fsync_fails = True  # all of it reaches the file, then its fsync fails
    with pytest.raises(StoreUnavailable):
        await store.put_many([msg("t", body_for(100 + i, 100)) for i in range(50)])
    # A crash now, before anything else was written.
    await crash_copy(store, live, crash)
    recovered = await stores.start(crash)
    assert sorted(bodies(recovered, "t")) == sorted(body_for(i, 100) for i in range(5))
    # And the live store, healed, reuses the space and queue offsets the batch gave back.
    io.partial, io.fsync_fails = None, False
    r = await store.put(msg("t", "next", queue_id=0))
    assert r.queue_offset == store.queue_bounds("t", 0)[1] - 1
    assert sorted(bodies(store, "t")) == sorted([*(body_for(i, 100) for i in range(5)), b"next"])
    await stores.stop(store)
    store = await stores.start(live)
    assert sorted(bodies(store, "t")) == sorted([*(body_for(i, 100) for i in range(5)), b"next"])


async def test_derived_file_space_is_allocated_before_the_write(
    stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ConsumeQueue and index entries are written through mappings: on a full disk a page that
    # was never allocated would kill the process with SIGBUS. Their space is allocated before
    # the CommitLog write, so a full disk fails the put cleanly instead.
    store = await stores.start(tmp_path)
    await store.create_topic("t", 1)
    await put_numbered(store, "t", 2)
    real = os.posix_fallocate

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    # Enough puts to need new ConsumeQueue files and index entries beyond the first chunk.
    with pytest.raises(StoreUnavailable, match="No space left"):
        for i in range(5000):
            await store.put(msg("t", f"m{i}", keys=[f"key{i}"]))
    monkeypatch.setattr(os, "posix_fallocate", real)
    await store.put(msg("t", "after"))
    got = bodies(store, "t")
    assert got[:2] == [body_for(0), body_for(1)] and got[-1] == b"after"
    await stores.stop(store)
    store = await stores.start(tmp_path)
    assert bodies(store, "t") == got


# -- found by trying to break it -------------------------------------------------------------


async def test_a_damaged_marker_loses_neither_its_write_nor_the_next(
    stores: Stores, tmp_path: Path
) -> None:
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    batches = [
        await store.put_many([msg("t", body_for(10 * b + i, 50)) for i in range(10)])
        for b in range(5)
    ]
    end = await crash_copy(store, live, crash)
    # The marker of the second-to-last write: right after its last record.
    last_of_fourth = batches[3][-1]
    m = store.read(last_of_fourth.phy_offset)
    assert m is not None
    write_at(crash, last_of_fourth.phy_offset + m.size + 14, b"\xff\xff\xff\xff")

    recovered = await stores.start(crash)
    assert recovered.commitlog.written_end == end
    assert sorted(bodies(recovered, "t")) == sorted(body_for(i, 50) for i in range(50))
    assert [e["offset"] for e in damage_entries(crash)] == [
        last_of_fourth.phy_offset + m.size
    ]


async def test_frames_written_into_a_body_are_never_taken_for_the_log(
    stores: Stores, tmp_path: Path
) -> None:
    # A client sends a body holding a forged unit marker and a forged record that names the
    # offset it will land at. Damage to the real record's CRC must not make recovery look
    # inside its body: the real record is skipped by its length, the forged one never appears.
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    first = await store.put(msg("t", "before"))
    m = store.read(first.phy_offset)
    assert m is not None
    host_at = first.phy_offset + m.size + codec.UNIT_SIZE
    fake = Message(
        topic="t", body=b"FORGED BY A CLIENT", msg_id=MsgIdGenerator().next(), queue_id=0
    )
    probe = msg("t", b"")
    header = codec.record_size(probe, b"")  # the host record's size without its body
    forged_at = host_at + header + codec.UNIT_SIZE
    forged = codec.encode_unit(host_at, 0) + codec.encode(fake, 5000, forged_at, 1)
    host = await store.put(msg("t", forged))
    assert host.phy_offset == host_at
    after = await put_numbered(store, "t", 5, size=20, start=100)
    await crash_copy(store, live, crash)
    write_at(crash, host_at + 8, b"\x00\x00\x00\x01")  # the host's CRC field
    shutil.rmtree(crash / "consumequeue")
    shutil.rmtree(crash / "index")

    recovered = await stores.start(crash)
    got = bodies(recovered, "t")
    assert b"FORGED BY A CLIENT" not in got
    assert got == [b"before", *(body_for(100 + i, 20) for i in range(5))]
    assert recovered.queue_bounds("t", 0)[1] < 100
    assert [r.msg_id for r in after] == [
        x.msg_id for r in after for x in recovered.lookup_id(r.msg_id)
    ]


async def test_a_missing_segment_loses_only_itself(stores: Stores, tmp_path: Path) -> None:
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    rs = await put_numbered(store, "t", 80, size=3000)
    end = await crash_copy(store, live, crash)
    gone = segments(crash)[1]
    (crash / "commitlog" / f"{gone:020d}").unlink()

    recovered = await stores.start(crash)
    assert recovered.commitlog.written_end == end
    kept = [i for i, r in enumerate(rs) if not gone <= r.phy_offset < gone + SEG]
    assert bodies(recovered, "t") == [body_for(i, 3000) for i in kept]
    assert [e["offset"] for e in damage_entries(crash)] == [gone]


async def test_a_segment_cut_short_mid_log_loses_only_its_end(
    stores: Stores, tmp_path: Path
) -> None:
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    rs = await put_numbered(store, "t", 80, size=3000)
    end = await crash_copy(store, live, crash)
    cut_seg = segments(crash)[1]
    os.truncate(crash / "commitlog" / f"{cut_seg:020d}", SEG // 2)

    recovered = await stores.start(crash)
    assert recovered.commitlog.written_end == end
    lost = [r for r in rs if cut_seg + SEG // 2 - 3100 < r.phy_offset < cut_seg + SEG]
    assert 0 < len(lost) < 20
    kept = bodies(recovered, "t")
    assert len(kept) >= 80 - len(lost)
    assert body_for(79, 3000) in kept


async def test_a_checkpoint_past_the_data_does_not_move_the_end(
    stores: Stores, tmp_path: Path
) -> None:
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    await put_numbered(store, "t", 5, size=100)
    await store.flush()
    end = await crash_copy(store, live, crash)
    cp = orjson.loads((crash / "checkpoint.json").read_bytes())
    cp["dispatched"] = end + 10_000
    (crash / "checkpoint.json").write_bytes(orjson.dumps(cp))
    recovered = await stores.start(crash)
    assert recovered.commitlog.written_end == end


async def test_an_unreadable_format_file_is_a_clear_refusal(
    stores: Stores, tmp_path: Path
) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("t", 1)
    await stores.stop(store)
    (tmp_path / "commitlog" / "format.json").write_text("{garbage")
    with pytest.raises(StorageError, match=r"format\.json is unreadable"):
        await stores.start(tmp_path)


async def test_an_unreadable_topics_file_is_relearned_from_the_log(
    stores: Stores, tmp_path: Path
) -> None:
    store = await stores.start(tmp_path)
    await store.create_topic("t", 2)
    await put_numbered(store, "t", 6, size=10)
    await stores.stop(store)
    (tmp_path / "topics.json").write_text("{garbage")
    store = await stores.start(tmp_path)
    assert store.topic("t").queues == 2
    assert sorted(bodies(store, "t")) == sorted(body_for(i, 10) for i in range(6))
    assert list(tmp_path.glob("topics.json.unreadable-*"))
