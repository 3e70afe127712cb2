"""Index by ``msg_id`` and by key: persisted hash files, rebuildable from the CommitLog.

Each index file is a fixed hash table with chained entries, as RocketMQ's IndexFile::

    header   64 bytes: magic u32, slots u32, capacity u32, count u32, min_phy i64, max_phy i64,
             clean u32 (1 once the file was closed or sealed full; 0 while it takes writes)
    slots    slots x u32        1-based number of the newest entry in the slot's chain, 0 = empty
    entries  capacity x 20 B    key hash u64, CommitLog offset i64, previous entry u32

A lookup walks one chain and returns candidate offsets whose 64-bit hash matches; the caller
reads the record to confirm, so a hash collision costs a read, never a wrong answer. When a file
is full the next one starts; files are searched newest first, and retention deletes files whose
newest record is gone. A file left open by a crash may hold slots that point past its persisted
count; loading such a file rebuilds its slots from the entries the count covers, and the
CommitLog re-dispatch adds the rest again. The files are mapped shared, so memory stays with the
page cache, not the Python heap, however many messages there are.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
from pathlib import Path

from broker_core.consumequeue import sync_file

_MAGIC = 0x54514958  # "TQIX"
_HEADER = struct.Struct(">IIIIqqI")
_HEADER_SIZE = 64
_SLOT = struct.Struct(">I")
_ENTRY = struct.Struct(">Qqi")
_ENTRY_SIZE = _ENTRY.size  # 20
#: Entries allocated on disk at a time ahead of use (80 KiB).
_ALLOCATE_ENTRIES = 4096
_slot_unpack = _SLOT.unpack_from
_slot_pack = _SLOT.pack_into
_entry_pack = _ENTRY.pack_into


def key_hash(topic: str, key: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"{topic}\x00{key}".encode(), digest_size=8).digest(), "big"
    )


def id_hash(msg_id: bytes) -> int:
    # Inlined in Index.add (the put path); keep the two in step.
    # Ids end in a per-process counter, so folding the two halves spreads them evenly already.
    return int.from_bytes(msg_id[:8], "big") ^ int.from_bytes(msg_id[8:], "big")


class _IndexFile:
    __slots__ = (
        "allocated",
        "capacity",
        "clean",
        "count",
        "dropped",
        "entries_at",
        "fd",
        "lock",
        "max_phy",
        "min_phy",
        "name",
        "slots",
        "view",
    )

    def __init__(self, path: Path, *, slots: int, capacity: int) -> None:
        size = _HEADER_SIZE + slots * 4 + capacity * _ENTRY_SIZE
        self.name = path
        self.dropped = False  # closed unsynced by retention (see discard)
        #: Held while the flush thread writes the header and while retention closes the mapping,
        #: never across a sync: the flush never writes to a closed mapping.
        self.lock = threading.Lock()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fresh = os.fstat(self.fd).st_size == 0
        self.allocated = 0  # entries whose disk space is allocated (see Index.preallocate)
        if fresh:
            os.ftruncate(self.fd, size)
            try:  # the header and slots are written at random: allocate them up front
                os.posix_fallocate(self.fd, 0, _HEADER_SIZE + slots * 4)
            except OSError:
                os.close(self.fd)
                path.unlink(missing_ok=True)
                raise
        self.view = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        if fresh:
            _HEADER.pack_into(self.view, 0, _MAGIC, slots, capacity, 0, -1, -1, 0)
        magic, self.slots, self.capacity, self.count, self.min_phy, self.max_phy, clean = (
            _HEADER.unpack_from(self.view, 0)
        )
        if magic != _MAGIC:
            raise RuntimeError(f"{path} is not an index file")
        self.entries_at = _HEADER_SIZE + self.slots * 4
        self.clean = bool(clean)
        if not fresh and not self.clean:
            self._repair()

    def _repair(self) -> None:
        """Rebuild the slot chains from entries 1..count (the ones the header vouches for)."""
        view = self.view
        view[_HEADER_SIZE : self.entries_at] = bytes(self.entries_at - _HEADER_SIZE)
        base = self.entries_at
        slots = self.slots
        for n in range(1, self.count + 1):
            pos = base + (n - 1) * _ENTRY_SIZE
            h, phy, _prev = _ENTRY.unpack_from(view, pos)
            slot_pos = _HEADER_SIZE + (h % slots) * 4
            _entry_pack(view, pos, h, phy, _slot_unpack(view, slot_pos)[0])
            _slot_pack(view, slot_pos, n)

    def allocate(self, entries: int) -> None:
        """Allocate the disk space of the first ``entries`` entries (a chunk at a time)."""
        entries = min(entries, self.capacity)
        if entries <= self.allocated:
            return
        upto = min(self.capacity, max(entries, self.allocated + _ALLOCATE_ENTRIES))
        os.posix_fallocate(
            self.fd,
            self.entries_at + self.allocated * _ENTRY_SIZE,
            (upto - self.allocated) * _ENTRY_SIZE,
        )
        self.allocated = upto

    def add(self, h: int, phy: int) -> None:
        slot_pos = _HEADER_SIZE + (h % self.slots) * 4
        view = self.view
        prev = _slot_unpack(view, slot_pos)[0]
        n = self.count
        if prev > n:  # written after the last persisted count, then lost with a crash
            prev = 0
        _entry_pack(view, self.entries_at + n * _ENTRY_SIZE, h, phy, prev)
        self.count = n + 1
        _slot_pack(view, slot_pos, n + 1)
        if self.min_phy < 0:
            self.min_phy = phy
        self.max_phy = phy

    def sync_header(self, *, clean: bool = False) -> None:
        self.clean = clean
        _HEADER.pack_into(
            self.view,
            0,
            _MAGIC,
            self.slots,
            self.capacity,
            self.count,
            self.min_phy,
            self.max_phy,
            int(clean),
        )

    def lookup(self, h: int, out: list[int], limit: int) -> None:
        view = self.view
        base = _HEADER_SIZE + self.slots * 4
        n = _SLOT.unpack_from(view, _HEADER_SIZE + (h % self.slots) * 4)[0]
        while n and len(out) < limit:
            if n > self.count:
                break
            eh, phy, prev = _ENTRY.unpack_from(view, base + (n - 1) * _ENTRY_SIZE)
            if eh == h:
                out.append(phy)
            if prev >= n:  # chains only point backwards; anything else is damage
                break
            n = prev

    def close(self) -> None:
        self.sync_header(clean=True)
        sync_file(self.fd)
        self.view.close()
        os.close(self.fd)

    def write_header(self, *, clean: bool = False) -> bool:
        """:meth:`sync_header` from the flush thread; False (nothing written) once discarded."""
        with self.lock:
            if self.dropped:
                return False
            self.sync_header(clean=clean)
            return True

    def discard(self) -> None:
        """Close a file that is being deleted, without writing it to disk: its contents are
        going away. Retention runs on the event loop, where the sync of :meth:`close` stopped
        the loop for as long as the disk took (3-4 ms per 84 MB file)."""
        with self.lock:
            self.dropped = True
            self.view.close()
            os.close(self.fd)


class Index:
    """The sequence of index files. Runs on the event loop; :meth:`flush` may run on a thread."""

    def __init__(self, directory: Path, *, slots: int, capacity: int) -> None:
        self.dir = directory
        self.slots = slots
        self.capacity = capacity
        self._files: list[_IndexFile] = []
        #: The next file, created ahead by :meth:`preallocate` when the active one is filling.
        self._spare: _IndexFile | None = None

    def load(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        names = sorted(p for p in self.dir.iterdir() if p.suffix == ".idx")
        self._files = [_IndexFile(p, slots=self.slots, capacity=self.capacity) for p in names]
        if self._files and self._files[-1].count < self._files[-1].capacity:
            active = self._files[-1]
            active.sync_header(clean=False)  # taking writes again: a crash must repair it
            active.view.flush(0, _HEADER_SIZE)

    @property
    def max_phy(self) -> int:
        """CommitLog offset of the newest indexed record (-1 when empty)."""
        for f in reversed(self._files):
            if f.max_phy >= 0:
                return int(f.max_phy)
        return -1

    @property
    def entry_count(self) -> int:
        return sum(f.count for f in self._files)

    def _active(self) -> _IndexFile:
        if not self._files or self._files[-1].count >= self._files[-1].capacity:
            # The full file is sealed by the next flush, on its thread (see flush): a sync here,
            # on the event loop, stopped the loop for as long as the disk took.
            f, self._spare = self._spare or self._new_file(), None
            self._files.append(f)
        return self._files[-1]

    def _new_file(self) -> _IndexFile:
        seq = len(self._files) and int(self._files[-1].name.stem) + 1
        return _IndexFile(self.dir / f"{seq:012d}.idx", slots=self.slots, capacity=self.capacity)

    def preallocate(self, n: int) -> None:
        """Allocate the disk space of the next ``n`` entries, creating the next file ahead when
        the active one fills, so adding them through the mappings can never fault on a full
        disk (SIGBUS). Runs on the writer thread before the CommitLog write of their records;
        raises ``OSError`` (ENOSPC), which fails that write cleanly instead."""
        f = self._files[-1] if self._files else None
        room = 0 if f is None else f.capacity - f.count
        if f is not None and room > 0:
            f.allocate(f.count + min(n, room))
        if n > room:
            if self._spare is None:
                self._spare = self._new_file()
            self._spare.allocate(n - room)

    def add(self, phy: int, msg_id: bytes, topic: str, keys: tuple[str, ...]) -> None:
        files = self._files
        f = files[-1] if files and files[-1].count < files[-1].capacity else self._active()
        # _IndexFile.add inlined for the id entry every message has (the put path).
        h = int.from_bytes(msg_id[:8], "big") ^ int.from_bytes(msg_id[8:], "big")
        view = f.view
        slot_pos = _HEADER_SIZE + (h % f.slots) * 4
        prev = _slot_unpack(view, slot_pos)[0]
        n = f.count
        if prev > n:
            prev = 0
        _entry_pack(view, f.entries_at + n * _ENTRY_SIZE, h, phy, prev)
        f.count = n + 1
        _slot_pack(view, slot_pos, n + 1)
        if f.min_phy < 0:
            f.min_phy = phy
        f.max_phy = phy
        for key in keys:
            if f.count >= f.capacity:
                f = self._active()
            f.add(key_hash(topic, key), phy)

    def lookup_id(self, msg_id: bytes, limit: int = 16) -> list[int]:
        return self._lookup(id_hash(msg_id), limit)

    def lookup_key(self, topic: str, key: str, limit: int = 64) -> list[int]:
        return self._lookup(key_hash(topic, key), limit)

    def _lookup(self, h: int, limit: int) -> list[int]:
        out: list[int] = []
        for f in reversed(self._files):
            f.lookup(h, out, limit)
            if len(out) >= limit:
                break
        return out

    def flush(self) -> None:
        """Write the files still taking writes, or full but not yet sealed, to disk. Runs on
        the flush thread; a full file takes no more writes, so it is sealed here: its entries
        go to disk first, then the header that marks it clean (never the header alone, which
        would vouch for entries a power cut lost). Retention, on the event loop, may discard a
        file meanwhile (:meth:`drop_before`): a dropped file needs no sync, its header is not
        written, and the failure of its closed descriptor (EBADF, or the error of a file that
        took its number) is not the flush's. Raises ``OSError`` from the sync of a file still
        here."""
        for f in list(self._files):
            if f.clean:
                continue
            try:
                if not f.write_header():
                    continue
                sync_file(f.fd)
                if f.count >= f.capacity and f.write_header(clean=True):
                    sync_file(f.fd)
            except OSError:
                if not f.dropped:
                    raise  # still one of the index's files: the sync itself failed

    def drop_before(self, phy_min: int) -> None:
        """Retention: delete files whose every record is older than the CommitLog's start.
        Runs on the event loop: the files are discarded, not synced (see :meth:`flush`)."""
        while len(self._files) > 1 and 0 <= self._files[0].max_phy < phy_min:
            f = self._files.pop(0)
            f.discard()
            f.name.unlink(missing_ok=True)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        if self._spare is not None:
            self._spare.close()
            self._spare = None
