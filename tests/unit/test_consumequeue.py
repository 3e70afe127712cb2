"""ConsumeQueue, and the index files written beside it: entry arithmetic, puts and reads across
files, reload, truncation, retention, the page cache, and the flush to disk."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker_core.consumequeue import (
    ENTRY_SIZE,
    ConsumeQueue,
    entry_position,
    file_start,
    tag_hash,
)
from broker_core.index import Index

PER_FILE = 4


def files(d: Path) -> list[int]:
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def entry(i: int) -> tuple[int, int, int]:
    """A plausible entry for queue offset ``i``: records of 100 bytes laid end to end."""
    return (i * 100, 100, tag_hash(f"t{i % 3}"))


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    return tmp_path / "cq" / "orders" / "0"


@pytest.fixture
def opened() -> Iterator[list[ConsumeQueue]]:
    """Queues opened by a test; closed at its end (mmaps and fds)."""
    out: list[ConsumeQueue] = []
    yield out
    for cq in out:
        cq.close()


def open_cq(qdir: Path, opened: list[ConsumeQueue], per_file: int = PER_FILE) -> ConsumeQueue:
    cq = ConsumeQueue(qdir, "orders", 0, per_file=per_file)
    cq.load()
    opened.append(cq)
    return cq


def fill(cq: ConsumeQueue, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        assert cq.put(i, *entry(i)) is True


# -- arithmetic ----------------------------------------------------------------------------------


def test_entry_is_20_bytes() -> None:
    assert ENTRY_SIZE == 20


@pytest.mark.parametrize(
    ("index", "per_file", "start", "pos"),
    [
        (0, 4, 0, 0),
        (3, 4, 0, 60),
        (4, 4, 4, 0),
        (9, 4, 8, 20),
        (299_999, 300_000, 0, 299_999 * 20),
        (300_000, 300_000, 300_000, 0),
        (1_000_001, 300_000, 900_000, 100_001 * 20),
    ],
)
def test_file_start_and_entry_position(index: int, per_file: int, start: int, pos: int) -> None:
    assert file_start(index, per_file) == start
    assert entry_position(index, per_file) == pos


# -- put / get -----------------------------------------------------------------------------------


def test_empty_queue(qdir: Path, opened: list[ConsumeQueue]) -> None:
    cq = open_cq(qdir, opened)
    assert (cq.min_offset, cq.max_offset) == (0, 0)
    assert cq.last_phy_end() == 0


def test_put_and_get_across_file_boundaries(qdir: Path, opened: list[ConsumeQueue]) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 11)
    assert (cq.min_offset, cq.max_offset) == (0, 11)
    for i in range(11):
        assert cq.get(i) == entry(i)
    assert files(qdir) == [0, 4, 8]
    for start in files(qdir):
        assert (qdir / f"{start:020d}").stat().st_size == PER_FILE * ENTRY_SIZE
    assert cq.last_phy_end() == 10 * 100 + 100


def test_reput_is_idempotent(qdir: Path, opened: list[ConsumeQueue]) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 6)
    assert cq.put(2, 999_999, 1, 1) is False
    assert cq.put(5, 999_999, 1, 1) is False
    assert cq.get(2) == entry(2)
    assert cq.get(5) == entry(5)
    assert cq.max_offset == 6
    assert cq.put(6, *entry(6)) is True


# -- load ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 9, 12, 13, 31])
def test_load_finds_max_offset_after_reopen(qdir: Path, opened: list[ConsumeQueue], n: int) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, n)
    cq.close()
    again = open_cq(qdir, opened)
    assert (again.min_offset, again.max_offset) == (0, n)
    for i in range(n):
        assert again.get(i) == entry(i)
    assert again.put(n - 1, 1, 1, 1) is False
    assert again.put(n, *entry(n)) is True


def test_load_with_a_large_file_binary_search(qdir: Path, opened: list[ConsumeQueue]) -> None:
    cq = open_cq(qdir, opened, per_file=1000)
    fill(cq, 1737)
    cq.close()
    again = open_cq(qdir, opened, per_file=1000)
    assert (again.min_offset, again.max_offset) == (0, 1737)


# -- truncation ----------------------------------------------------------------------------------


def test_truncate_to_drops_entries_past_the_commitlog_end(
    qdir: Path, opened: list[ConsumeQueue]
) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 10)
    # Records of 100 bytes: entry i ends at (i + 1) * 100. Cut the CommitLog inside entry 7.
    cq.truncate_to(750)
    assert cq.max_offset == 7
    assert cq.last_phy_end() == 700
    assert cq.put(7, 700, 50, 0) is True
    assert cq.get(7) == (700, 50, 0)


def test_truncate_to_at_or_past_the_end_changes_nothing(
    qdir: Path, opened: list[ConsumeQueue]
) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 5)
    cq.truncate_to(500)
    assert cq.max_offset == 5
    cq.truncate_to(10_000)
    assert cq.max_offset == 5


def test_truncate_within_the_last_file_survives_reopen(
    qdir: Path, opened: list[ConsumeQueue]
) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 10)
    cq.truncate_to(900)  # keeps entries 0..8
    assert cq.max_offset == 9
    cq.close()
    again = open_cq(qdir, opened)
    assert again.max_offset == 9


def test_truncate_across_a_file_boundary_survives_reopen(
    qdir: Path, opened: list[ConsumeQueue]
) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 10)  # files 0, 4, 8
    cq.truncate_to(600)  # keeps entries 0..5; file 8 is left holding only zeros
    assert cq.max_offset == 6
    cq.close()
    again = open_cq(qdir, opened)
    # Reopening must not resurrect zeroed entries 6 and 7 as (phy 0, size 0) pointers...
    assert again.max_offset == 6
    # ...and the re-dispatch of record 6 from the CommitLog must be able to write it again.
    assert again.put(6, 600, 100, 0) is True
    assert again.get(6) == (600, 100, 0)


def test_truncate_everything_then_reopen(qdir: Path, opened: list[ConsumeQueue]) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 3)
    cq.truncate_to(0)
    assert cq.max_offset == 0
    cq.close()
    again = open_cq(qdir, opened)
    assert again.max_offset == 0
    assert again.put(0, 0, 100, 0) is True


# -- retention -----------------------------------------------------------------------------------


def test_drop_before_deletes_whole_files_and_advances_min(
    qdir: Path, opened: list[ConsumeQueue]
) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 11)  # files 0, 4, 8
    cq.drop_before(250)  # records 0, 1, 2 are gone (they start before 250)
    assert (cq.min_offset, cq.max_offset) == (3, 11)
    assert files(qdir) == [0, 4, 8]  # file 0 still holds entry 3
    cq.drop_before(900)
    assert (cq.min_offset, cq.max_offset) == (9, 11)
    assert files(qdir) == [8]
    assert cq.get(9) == entry(9)
    assert cq.get(10) == entry(10)


def test_drop_before_then_reopen_finds_min_and_max(qdir: Path, opened: list[ConsumeQueue]) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 11)
    cq.drop_before(500)  # min 5; file 0 deleted
    assert files(qdir) == [4, 8]
    cq.close()
    again = open_cq(qdir, opened)
    assert again.max_offset == 11
    # File 4 still holds entry 4 (whose record is gone): reload may start there or at 5, never
    # earlier than the first kept file.
    assert 4 <= again.min_offset <= 5
    assert again.get(10) == entry(10)


def test_drop_everything_keeps_the_queue_position(qdir: Path, opened: list[ConsumeQueue]) -> None:
    cq = open_cq(qdir, opened)
    fill(cq, 8)
    cq.drop_before(10_000)
    assert cq.min_offset == cq.max_offset == 8
    assert cq.put(8, *entry(8)) is True  # the queue continues where it was
    assert cq.max_offset == 9


def test_drop_everything_at_a_file_boundary_survives_reopen(
    qdir: Path, opened: list[ConsumeQueue]
) -> None:
    # Retention expired every record of the queue and its last entry ended a file. Queue
    # offsets must never go backwards: after a restart the next message is offset 8, not 0
    # (consumers committed 8; an offset 0 again would be skipped or delivered twice).
    cq = open_cq(qdir, opened)
    fill(cq, 8)
    cq.drop_before(10_000)
    cq.close()
    again = open_cq(qdir, opened)
    assert again.max_offset >= 8


# -- rebuilding ----------------------------------------------------------------------------------


def test_rebuild_of_a_queue_whose_head_expired(qdir: Path, opened: list[ConsumeQueue]) -> None:
    cq = open_cq(qdir, opened)
    assert cq.put(10, *entry(10)) is True
    assert (cq.min_offset, cq.max_offset) == (10, 11)
    fill(cq, 3, start=11)
    assert (cq.min_offset, cq.max_offset) == (10, 14)
    assert files(qdir) == [8, 12]
    cq.close()
    again = open_cq(qdir, opened)
    assert (again.min_offset, again.max_offset) == (10, 14)
    assert again.get(10) == entry(10)
    assert again.get(13) == entry(13)


# -- tag hash ------------------------------------------------------------------------------------


def test_tag_hash_is_stable_and_zero_for_no_tag() -> None:
    assert tag_hash("") == 0
    assert tag_hash("created") == tag_hash("created")
    assert tag_hash("created") != tag_hash("paid")
    # Stable across processes and versions: a persisted ConsumeQueue depends on it.
    assert tag_hash("created") == 6421811856808018649
    assert tag_hash("a") == 8384540466261131362
    values = {tag_hash(f"tag-{i}") for i in range(2000)}
    assert 0 not in values
    assert len(values) == 2000
    assert all(0 < v < 2**63 for v in values)
    assert tag_hash("é") > 0


# -- page cache ----------------------------------------------------------------------------------


def _resident_pages(view: object, length: int) -> int:
    """Pages of a mapping's first ``length`` bytes in the page cache (mincore(2))."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-length // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))  # type: ignore[arg-type]
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(addr, length, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) as on Linux")
def test_the_first_entry_of_a_new_file_brings_in_no_run_of_pages(
    qdir: Path, opened: list[ConsumeQueue]
) -> None:
    """A write to a fresh page of the sparse file must not read ahead: that zeroed up to
    megabytes of the file, on the event loop, for the first entry of each new file."""
    per_file = 300_000  # the default: a 6 MB file
    cq = open_cq(qdir, opened, per_file=per_file)
    cq.preallocate(0)
    assert cq.put(0, *entry(0))
    view = cq._files[0][1]
    assert _resident_pages(view, per_file * ENTRY_SIZE) <= 4
    assert cq.get(0) == entry(0)


def ticks_during(work: Callable[[], None]) -> int:
    """How often this thread ran while ``work`` ran on another thread."""
    window: list[float] = []
    started = threading.Event()

    def run() -> None:
        started.set()
        t0 = time.perf_counter()
        work()
        window.extend((t0, time.perf_counter()))

    thread = threading.Thread(target=run)
    ticks = []
    thread.start()
    started.wait()
    while thread.is_alive():
        ticks.append(time.perf_counter())
    thread.join()
    return sum(1 for t in ticks if window[0] < t < window[1])


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that takes 50 ms per file sync (the sync itself lets go of the interpreter lock,
    as the system call does)."""
    real = os.fdatasync

    def slow(fd: int) -> None:
        time.sleep(0.05)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)


@pytest.mark.usefixtures("slow_disk")
def test_writing_the_files_to_disk_lets_the_event_loop_run(
    qdir: Path, opened: list[ConsumeQueue]
) -> None:
    """The periodic flush writes the queue's files on a thread while the event loop serves;
    ``mmap.flush`` held the interpreter lock through the whole write, so the loop stood still
    for it (3-4 ms at every flush interval, seen as release lateness)."""
    cq = open_cq(qdir, opened, per_file=1000)
    fill(cq, 2500)
    assert ticks_during(cq.flush) > 100
    assert [cq.get(i) for i in (0, 999, 1000, 2499)] == [entry(i) for i in (0, 999, 1000, 2499)]


@pytest.mark.usefixtures("slow_disk")
def test_writing_the_index_to_disk_lets_the_event_loop_run(tmp_path: Path) -> None:
    """The same for the index files the periodic flush writes (see the test above)."""
    index = Index(tmp_path / "index", slots=1024, capacity=4096)
    index.load()
    ids = [os.urandom(16) for _ in range(100)]
    for phy, msg_id in enumerate(ids):
        index.add(phy * 100, msg_id, "orders", (f"k{phy}",))
    try:
        assert ticks_during(index.flush) > 100
        assert index.lookup_id(ids[42]) == [4200]
        assert index.lookup_key("orders", "k7") == [700]
    finally:
        index.close()


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors of the file syncs made in the test, in order (after any ``slow_disk``
    the test asks for before this)."""
    out: list[int] = []
    real = os.fdatasync

    def counted(fd: int) -> None:
        out.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    return out


def test_an_index_file_that_fills_up_is_sealed_by_the_flush_not_on_the_put_path(
    tmp_path: Path, synced: list[int]
) -> None:
    """The put path (the event loop) rolls to the next index file when one fills; syncing the
    full file there stopped the loop for as long as the disk took. The periodic flush, on its
    thread, seals it instead: on disk it is then full and clean, and needs no repair."""
    index = Index(tmp_path / "index", slots=64, capacity=100)
    index.load()
    ids = [os.urandom(16) for _ in range(150)]
    for phy, msg_id in enumerate(ids):
        index.add(phy * 100, msg_id, "orders", ())
    assert synced == []  # nothing written to disk on the put path
    index.flush()
    assert synced
    full = index._files[0]
    assert (full.count, full.clean) == (100, True)
    index.close()
    again = Index(tmp_path / "index", slots=64, capacity=100)
    again.load()
    try:
        assert (again._files[0].count, again._files[0].clean) == (100, True)
        found = [again.lookup_id(ids[i]) for i in (0, 99, 100, 149)]
        assert found == [[0], [9900], [10000], [14900]]
    finally:
        again.close()


def _index_of_three_files(directory: Path) -> tuple[Index, list[bytes]]:
    """An index whose files 0 and 1 are full (ids 0-99 and 100-199) and file 2 takes writes."""
    index = Index(directory, slots=64, capacity=100)
    index.load()
    ids = [os.urandom(16) for _ in range(250)]
    for phy, msg_id in enumerate(ids):
        index.add(phy * 100, msg_id, "orders", ())
    return index, ids


def _index_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("sealed", [False, True], ids=["unsealed", "sealed"])
def test_retention_deletes_index_files_without_syncing_them(
    tmp_path: Path, slow_disk: None, synced: list[int], sealed: bool
) -> None:
    """Retention runs on the event loop; it closed each index file it deleted with a sync of
    the file, which stopped the loop for as long as the disk took. A file being deleted needs
    none, whether the flush sealed it already or not."""
    index, ids = _index_of_three_files(tmp_path / "index")
    try:
        if sealed:
            index.flush()
        synced.clear()
        index.drop_before(200 * 100)  # records 0-199 are gone: files 0 and 1 go
        assert synced == []
        assert _index_files(tmp_path / "index") == ["000000000002.idx"]
        assert [index.lookup_id(ids[i]) for i in (0, 199, 200, 249)] == [[], [], [20000], [24900]]
    finally:
        index.close()


def retention_during_flush(
    monkeypatch: pytest.MonkeyPatch, flush: Callable[[], None], drop: Callable[[], None]
) -> tuple[list[BaseException], list[int]]:
    """Run ``flush`` on a thread and ``drop`` (retention) here while the flush is in its first
    file's sync: what the flush raised, and the descriptors it synced once ``drop`` was done."""
    real = os.fdatasync
    first = threading.Event()
    dropped = threading.Event()
    synced_after: list[int] = []

    def held(fd: int) -> None:
        if dropped.is_set():
            synced_after.append(fd)
        elif not first.is_set():
            first.set()
            dropped.wait(5)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            flush()
        except BaseException as e:
            failed.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        first.wait(5)
        drop()
    finally:
        dropped.set()
        thread.join()
    return failed, list(synced_after)


def test_retention_closing_a_file_during_the_flush_fails_no_flush(
    qdir: Path, opened: list[ConsumeQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush syncs on its thread, the interpreter lock let go, while retention on the event
    loop closes and deletes the files it has done with: their descriptors were then closed (or
    taken by another file) under the flush, which failed with EBADF and skipped the checkpoint
    and the consumer offsets' save. A file retention deleted needs no sync."""
    cq = open_cq(qdir, opened, per_file=10)
    fill(cq, 35)
    # Retention: the files of entries 0-29 go.
    failed, _ = retention_during_flush(monkeypatch, cq.flush, lambda: cq.drop_before(entry(30)[0]))
    assert failed == []
    assert sorted(cq._files) == [30]
    assert (cq.min_offset, cq.max_offset) == (30, 35)


def test_retention_deleting_index_files_during_the_flush_fails_no_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for the index: retention discards full index files the flush, on its thread,
    is still syncing and sealing. Their closed descriptors (EBADF) and mappings are not the
    flush's failure, and the file that stays is written to disk as before."""
    index, ids = _index_of_three_files(tmp_path / "index")
    try:
        # Retention: files 0 and 1 go while the flush is in the sync of file 0.
        failed, synced_after = retention_during_flush(
            monkeypatch, index.flush, lambda: index.drop_before(200 * 100)
        )
        assert failed == []
        assert synced_after == [index._files[0].fd]  # the file kept, not file 1 (dropped)
        assert _index_files(tmp_path / "index") == ["000000000002.idx"]
        index.flush()
    finally:
        index.close()
    again = Index(tmp_path / "index", slots=64, capacity=100)
    again.load()
    try:
        assert [again.lookup_id(ids[i]) for i in (0, 200, 249)] == [[], [20000], [24900]]
    finally:
        again.close()


def test_retention_finds_the_new_first_entry_without_reading_every_entry_before_it(
    qdir: Path, opened: list[ConsumeQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention runs on the event loop and may drop millions of entries at once: reading each
    of them took 80 ms of the loop per 300,000. Zero entries (a gap a recovery left) count as
    gone, as they did."""
    cq = open_cq(qdir, opened, per_file=1000)
    fill(cq, 5000)
    for i in range(5100, 5200):  # entries 5000-5099: a gap of zeros
        assert cq.put(i, *entry(i))
    reads: list[int] = []
    real_get = ConsumeQueue.get

    def get(self: ConsumeQueue, index: int) -> tuple[int, int, int]:
        reads.append(index)
        return real_get(self, index)

    monkeypatch.setattr(ConsumeQueue, "get", get)
    cq.drop_before(entry(3500)[0])
    assert (cq.min_offset, cq.max_offset) == (3500, 5200)
    assert sorted(cq._files) == [3000, 4000, 5000]
    assert len(reads) < 50
    cq.drop_before(entry(5050)[0] + 1)  # inside the gap: the next entry is 5100
    assert cq.min_offset == 5100
    cq.drop_before(entry(5150)[0])
    assert cq.min_offset == 5150
    cq.drop_before(entry(9999)[0])  # everything: the queue keeps its position
    assert (cq.min_offset, cq.max_offset) == (5200, 5200)
    assert sorted(cq._files) == [5000]
