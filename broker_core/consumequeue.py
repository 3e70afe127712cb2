"""ConsumeQueue: per topic and queue, fixed-size entries pointing into the CommitLog.

Entry ``i`` of a queue (its *queue offset*) is 20 bytes at byte ``(i % per_file) * 20`` of the
file named ``i - i % per_file``: CommitLog offset (i64), record size (i32), tag hash (i64). A
queue is a dense array, so reading entry ``i`` is arithmetic and one unpack, and the end of a
queue is the first entry whose size is zero (files are pre-allocated sparse, so unwritten
entries read as zeros). Everything here can be deleted and rebuilt from the CommitLog.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from pathlib import Path

ENTRY = struct.Struct(">qiq")
ENTRY_SIZE = ENTRY.size  # 20


#: Entries allocated on disk at a time ahead of use (80 KiB).
_ALLOCATE_ENTRIES = 4096
_MADV_RANDOM: int | None = getattr(mmap, "MADV_RANDOM", None)


def sync_file(fd: int) -> None:
    """Write a mapped file's dirty pages to disk, as ``msync(MS_SYNC)`` of its whole mapping
    does on Linux, with the interpreter lock let go meanwhile: ``mmap.flush`` holds it through
    the whole write, which stopped the event loop for 3-4 ms at every periodic flush."""
    os.fdatasync(fd)


def tag_hash(tags: str) -> int:
    """Stable 63-bit hash of a tag (0 for no tag), cheap enough for every put."""
    if not tags:
        return 0
    data = tags.encode()
    return (zlib.crc32(data) << 31) ^ zlib.adler32(data) or 1


def file_start(index: int, per_file: int) -> int:
    return index - index % per_file


def entry_position(index: int, per_file: int) -> int:
    return (index % per_file) * ENTRY_SIZE


class ConsumeQueue:
    """One topic/queue. All methods run on the event loop; writes go to shared mappings whose
    dirty pages the flusher syncs; a crash costs at most a re-dispatch from the CommitLog."""

    __slots__ = (
        "_allocated",
        "_files",
        "dir",
        "max_offset",
        "min_offset",
        "per_file",
        "queue_id",
        "topic",
    )

    def __init__(self, directory: Path, topic: str, queue_id: int, *, per_file: int) -> None:
        self.dir = directory
        self.topic = topic
        self.queue_id = queue_id
        self.per_file = per_file
        self._files: dict[int, tuple[int, mmap.mmap]] = {}
        #: Entries of each file whose disk space is known to be allocated (preallocate).
        self._allocated: dict[int, int] = {}
        self.min_offset = 0
        self.max_offset = 0  # one past the last entry

    def load(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        starts = sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit())
        for start in starts:
            self._map(start)
        # Files a truncation emptied hold nothing: the queue ends before them.
        while len(starts) > 1 and self._size_at(starts[-1]) == 0:
            self._unmap(starts.pop())
        if not starts:
            return
        first, last = starts[0], starts[-1]
        # Leading zero entries of the first file are positions before this queue's data
        # (retention dropped them, or a rebuild began mid-file).
        lo = 0
        while lo < self.per_file and self._size_at(first + lo) == 0:
            lo += 1
        if lo == self.per_file:  # the only file, and empty
            self.min_offset = self.max_offset = first
            return
        self.min_offset = first + lo
        # The end is the first zero-size entry after min_offset: binary search the last file.
        lo_i = self.min_offset - last if last == first else 0
        hi = self.per_file
        while lo_i < hi:
            mid = (lo_i + hi) // 2
            if self._size_at(last + mid) == 0:
                hi = mid
            else:
                lo_i = mid + 1
        self.max_offset = last + lo_i

    def _size_at(self, index: int) -> int:
        start = index - index % self.per_file
        return int(ENTRY.unpack_from(self._files[start][1], (index - start) * ENTRY_SIZE)[1])

    def _unmap(self, start: int) -> None:
        fd, view = self._files.pop(start)
        self._allocated.pop(start, None)
        view.close()
        os.close(fd)
        (self.dir / f"{start:020d}").unlink(missing_ok=True)

    def _map(self, start: int) -> mmap.mmap:
        size = self.per_file * ENTRY_SIZE
        fd = os.open(self.dir / f"{start:020d}", os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        view = mmap.mmap(fd, size)
        if _MADV_RANDOM is not None:
            # No read-ahead when an entry's page is first touched. A write to a fresh page of
            # this sparse file otherwise reads ahead, zeroing the whole 6 MB file into the page
            # cache on the event loop: 1.5-3 ms for the first entry of each new file (a new
            # topic's eight queues: a stall of about 20 ms at their first messages), against
            # 0.16 ms with this advice (bench/cq_first_write.py).
            view.madvise(_MADV_RANDOM)
        self._files[start] = (fd, view)
        return view

    def preallocate(self, index: int) -> None:
        """Allocate the disk space of entries up to ``index`` (a chunk at a time), so writing
        them through the mapping can never fault on a full disk, which would kill the process
        with SIGBUS. Runs on the writer thread before the CommitLog write of the records they
        point at; raises ``OSError`` (ENOSPC), which fails that write cleanly instead."""
        start = index - index % self.per_file
        done = self._allocated.get(start, 0)
        need = index - start + 1
        if need <= done:
            return
        if start not in self._files:
            self._map(start)
        fd = self._files[start][0]
        upto = min(self.per_file, max(need, done + _ALLOCATE_ENTRIES))
        os.posix_fallocate(fd, done * ENTRY_SIZE, (upto - done) * ENTRY_SIZE)
        self._allocated[start] = upto

    def put(self, index: int, phy_offset: int, size: int, tag_hash_: int) -> bool:
        """Write entry ``index``; False (and nothing written) if it is already there."""
        if index < self.max_offset:
            return False  # re-dispatch after recovery: already present
        if self.max_offset == self.min_offset == 0 and index > 0 and not self._files:
            self.min_offset = index  # rebuilding a queue whose head expired
        start = index - index % self.per_file
        f = self._files.get(start)
        view = f[1] if f is not None else self._map(start)
        ENTRY.pack_into(view, (index - start) * ENTRY_SIZE, phy_offset, size, tag_hash_)
        self.max_offset = index + 1
        return True

    def get(self, index: int) -> tuple[int, int, int]:
        """(commitlog offset, size, tag hash) of entry ``index`` (min_offset <= index < max)."""
        start = index - index % self.per_file
        phy, size, th = ENTRY.unpack_from(self._files[start][1], (index - start) * ENTRY_SIZE)
        return phy, size, th

    def last_phy_end(self) -> int:
        """CommitLog offset just past the last entry's record (0 for an empty queue)."""
        if self.max_offset <= self.min_offset:
            return 0
        phy, size, _ = self.get(self.max_offset - 1)
        return phy + size

    def truncate_to(self, phy_end: int) -> None:
        """Drop trailing entries that point at or past ``phy_end`` (the CommitLog was cut)."""
        while self.max_offset > self.min_offset:
            phy, size, _ = self.get(self.max_offset - 1)
            if phy + size <= phy_end:
                break
            index = self.max_offset - 1
            start = index - index % self.per_file
            ENTRY.pack_into(self._files[start][1], (index - start) * ENTRY_SIZE, 0, 0, 0)
            self.max_offset = index

    def drop_before(self, phy_min: int) -> None:
        """Retention: forget entries whose record is gone; delete files wholly before it.
        Runs on the event loop: the first entry whose record starts at or after ``phy_min`` is
        found by binary search (a queue's records lie in the CommitLog in queue order), not
        entry by entry, which took 80 ms of the loop per 300,000 entries (one file) dropped."""
        self.min_offset = self._first_from(phy_min)
        # The file holding the last entry stays even when expired: it is what tells a restart
        # where this queue's offsets continue.
        keep_from = self.max_offset - 1
        for start in sorted(self._files):
            end = start + self.per_file
            if end <= self.min_offset and end <= keep_from:
                self._unmap(start)

    def _first_from(self, phy_min: int) -> int:
        """The first entry from ``min_offset`` whose CommitLog offset is ``phy_min`` or more
        (``max_offset`` if none). Entries hold increasing offsets, except zero entries (a gap a
        recovery left), which count as before ``phy_min``: a probe that lands in a gap judges by
        the first entry after it."""
        lo, hi, end = self.min_offset, self.max_offset, self.max_offset
        while lo < hi:
            mid = (lo + hi) // 2
            at = mid
            while at < end and self._size_at(at) == 0:
                at += 1
            if at < end and self.get(at)[0] < phy_min:
                lo = at + 1
            else:
                hi = mid
        while lo < end and self._size_at(lo) == 0:
            lo += 1
        return lo

    def flush(self) -> None:
        """Write the queue's files to disk. Runs on the flush thread while retention, on the
        event loop, may close and delete a file meanwhile (:meth:`drop_before`): a file no longer
        here needs no sync, and its failure (EBADF, or the error of a file that took its
        descriptor's number) is not the flush's. Raises ``OSError`` for a file still here."""
        for start, (fd, view) in list(self._files.items()):
            try:
                sync_file(fd)
            except OSError:
                current = self._files.get(start)
                if current is not None and current[1] is view:
                    raise  # still this queue's file: the sync itself failed

    def close(self) -> None:
        for fd, view in self._files.values():
            sync_file(fd)
            view.close()
            os.close(fd)
        self._files.clear()
