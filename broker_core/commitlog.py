"""CommitLog: every message of every topic appended to fixed-size, pre-allocated segment files.

Offsets are global byte positions; segment ``k`` holds ``[k * segment_bytes, (k+1) *
segment_bytes)`` and is named after its first offset (20 digits, as RocketMQ names them). A record
never straddles two segments: when one does not fit, the tail of the segment gets a blank filler
and the record starts the next segment.

Writes go through one writer thread, so the event loop never waits on the disk: puts made while a
write (and, in ``sync`` mode, its fsync) is in flight pile up and go out together in the next
write: group commit, one ``pwrite`` and at most one ``fdatasync`` for many messages. Each write
ends with a unit marker (:mod:`broker_core.codec`) that commits it. Readers map the segments
read-only; a record is readable once :meth:`write` for it returned.

Recovery (:meth:`open`) finds the end of valid data. After a clean stop it trusts the marker the
stop wrote; otherwise it walks every frame written since the last checkpoint:

* a write whose unit marker is missing, or the last write when one of its records does not
  check, at the very end of the log is a *torn tail*: a crash interrupted it, nothing of it was
  acknowledged, and it is cut off whole (so a client's batch is all or nothing);
* damage followed by valid frames (a flipped bit, a bad sector, a zeroed page) is *not* a tail:
  the damaged bytes are skipped and reported to the :class:`DamageLog`, and everything after
  them is kept. Recovery never deletes a segment.

A short last segment (the file was cut) is grown back to its size: its lost end is a torn tail.
``format.json`` records the segment size, so a real change of ``--segment-bytes`` is refused
rather than applied (resizing would cut records off).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import structlog

from broker_core import codec, metrics
from broker_core.codec import Scan
from broker_core.message import StoredMessage

log = structlog.get_logger(__name__)

_CLEAN_MARKER = "clean_shutdown"
_FORMAT = "format.json"
_DAMAGE = "damage.jsonl"
_NAME_DIGITS = 20
#: Offsets below this in a data directory written before unit markers existed commit per record.
_NO_UNITS = 1 << 62
#: How much the self-heal probe allocates ahead of the write position after a failed write.
_PROBE_BYTES = 1 << 20


def _data_ranges(fd: int, pos: int, limit: int) -> list[tuple[int, int]]:
    """The ranges of ``[pos, limit)`` of a sparse file that hold data (``SEEK_DATA`` /
    ``SEEK_HOLE``); the whole range where the file system cannot tell."""
    out = []
    while pos < limit:
        try:
            lo = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but holes from here
                break
            return [(pos, limit)]
        if lo >= limit:
            break
        hi = min(os.lseek(fd, lo, os.SEEK_HOLE), limit)
        out.append((lo, hi))
        pos = hi
    return out


class StorageError(RuntimeError):
    """The data directory cannot be opened as it is; the message says what to do."""


class FileIO:
    """The file operations the writer uses: the seam through which tests inject a full disk,
    short writes or I/O errors without a real device."""

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)


@dataclass(slots=True, frozen=True)
class LogScan:
    """What :meth:`CommitLog.walk` found."""

    #: End of the last committed write: where valid data ends and the next write goes.
    end: int
    #: Valid records in committed writes (from where the walk began).
    records: int
    #: Committed writes (unit markers) seen.
    units: int
    #: Damaged ranges ``(start, end)`` before ``end``, stepped over.
    damage: list[tuple[int, int]]
    #: The last write had lost records: a write torn by a crash, dropped whole.
    torn_last_write: bool


@dataclass(slots=True)
class _Walk:
    """What :meth:`CommitLog.walk` keeps while it steps from frame to frame."""

    good: int  # end of the last committed write
    units_from: int
    records: int = 0
    units: int = 0
    recs: list[int] = field(default_factory=list)  # starts of valid records since ``good``
    damaged: list[tuple[int, int]] = field(default_factory=list)  # damage since ``good``
    committed_damage: list[tuple[int, int]] = field(default_factory=list)
    last_unit_damaged: bool = False
    last_unit_start: int = 0

    def record(self, pos: int, end: int) -> None:
        self.recs.append(pos)
        if end <= self.units_from:  # written before unit markers: commits itself
            self.good = self.last_unit_start = end
            self.records += 1
            self.recs = []
            self.committed_damage += self.damaged
            self.damaged = []

    def unit(self, ustart: int, count: int, pos: int, end: int) -> None:
        if not self.good <= ustart <= pos:
            return  # a stale marker (of a write that failed or was cut): commits nothing
        # Records before ``ustart`` are an earlier write whose marker was damaged: a later write
        # committed after it, so it was written whole.
        own = sum(1 for r in self.recs if r >= ustart)
        self.last_unit_damaged = own != count or any(hi > ustart for _, hi in self.damaged)
        self.last_unit_start = ustart
        self.committed_damage += self.damaged
        self.records += len(self.recs)
        self.units += 1
        self.damaged, self.recs = [], []
        self.good = end

    def segment_end(self, end: int) -> None:
        if end <= self.units_from:
            self.good = self.last_unit_start = end

    def result(self) -> LogScan:
        good = self.good
        torn = self.last_unit_damaged and good > self.last_unit_start
        if torn:
            # The last write lost some of its records: a write torn by a crash, never
            # acknowledged whole. It ends the data, whole, rather than keep part of it.
            good = self.last_unit_start
        kept = [d for d in self.committed_damage if d[1] <= good]
        return LogScan(good, self.records, self.units, kept, torn)


@dataclass(slots=True)
class _Segment:
    start: int
    path: Path
    fd: int
    view: mmap.mmap


class DamageLog:
    """Damaged CommitLog ranges found by recovery, a read or ``tempomq verify``, kept in
    ``damage.jsonl`` so an operator can list them (``GET /v1/admin/damage``) after the fact.

    Each entry: ``{"segment": int, "offset": int, "length": int, "found_by": str, "found_at":
    epoch ms, "reason": str}``; ``offset`` is the global CommitLog offset. One entry per offset.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: set[int] = set()
        self._ranges: list[tuple[int, int]] = []
        self.entries: list[dict[str, object]] = []
        if path.exists():
            for line in path.read_bytes().splitlines():
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line torn by a crash
                if isinstance(entry, dict) and isinstance(entry.get("offset"), int):
                    self._remember(entry["offset"], int(entry.get("length", 0)))
                    self.entries.append(entry)

    def _remember(self, offset: int, length: int) -> None:
        self._seen.add(offset)
        if length > 0:
            self._ranges.append((offset, offset + length))

    def known(self, offset: int) -> bool:
        return offset in self._seen or any(lo <= offset < hi for lo, hi in self._ranges)

    def report(self, *, segment: int, offset: int, length: int, found_by: str, reason: str) -> bool:
        """Record damage at ``offset`` once (a read inside a range already reported is not
        reported again); True when it was new. Logs it as an ERROR."""
        metrics.CORRUPT_RECORDS.labels(found_by).inc()
        if self.known(offset):
            return False
        self._remember(offset, length)
        entry: dict[str, object] = {
            "segment": segment,
            "offset": offset,
            "length": length,
            "found_by": found_by,
            "found_at": time.time_ns() // 1_000_000,
            "reason": reason,
        }
        self.entries.append(entry)
        log.error("commitlog.damage", **entry)
        try:
            with open(self.path, "ab") as f:
                f.write(orjson.dumps(entry) + b"\n")
        except OSError as e:  # the report must not turn a read into a failure
            log.error("commitlog.damage_log_unwritable", error=str(e))
        return True


class CommitLog:
    """Segment files, the write position, recovery and retention. Thread-safe where it must be:
    :meth:`write` and :meth:`sync` run on worker threads, everything else on the loop."""

    def __init__(self, directory: Path, *, segment_bytes: int, io: FileIO | None = None) -> None:
        if segment_bytes < 64 * 1024:
            raise ValueError("segment_bytes must be at least 64 KiB")
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.io = io or FileIO()
        self._segments: dict[int, _Segment] = {}
        self._lock = threading.Lock()  # guards _segments between the writer and the loop
        #: End of data that is written (readable). Advanced by the writer's caller on the loop.
        self.written_end = 0
        #: End of data reserved for records not yet written (>= written_end).
        self.reserved_end = 0
        self._dirty: set[int] = set()
        #: Offsets below this commit record by record (written before unit markers existed).
        self.units_from = 0
        #: Segments found shorter than their size (cut) at open.
        self._short_segments: set[int] = set()
        self.damage = DamageLog(directory / _DAMAGE)

    # -- layout arithmetic (pure) ------------------------------------------------------------

    def segment_start(self, offset: int) -> int:
        return offset - offset % self.segment_bytes

    def reserve(self, size: int) -> tuple[int, bytes | None]:
        """Reserve ``size`` bytes for one record; returns its offset and, when the record has
        to move to the next segment, the filler for the rest of the current one (else None)."""
        end = self.reserved_end
        seg_end = self.segment_start(end) + self.segment_bytes
        if end + size <= seg_end:
            self.reserved_end = end + size
            return end, None
        if size > self.segment_bytes:
            raise ValueError(f"record of {size} bytes is larger than a segment")
        gap = seg_end - end
        # The pending batch is written as one contiguous run, so the filler covers the whole
        # gap. A gap too small for a filler header stays zeros, which reads as "end of
        # segment" (codec.scan returns END when a header cannot fit).
        filler = (
            codec.encode_blank(gap) + bytes(gap - codec.BLANK_SIZE)
            if gap >= codec.BLANK_SIZE
            else bytes(gap)
        )
        self.reserved_end = seg_end + size
        return seg_end, filler

    def rewind(self) -> None:
        """Give back everything reserved but not written (after a failed write)."""
        self.reserved_end = self.written_end

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def min_offset(self) -> int:
        return min(self._segments) if self._segments else 0

    # -- files ---------------------------------------------------------------------------------

    def _path(self, start: int) -> Path:
        return self.dir / f"{start:0{_NAME_DIGITS}d}"

    def _open_segment(self, start: int, *, create: bool) -> _Segment:
        path = self._path(start)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o644)
        if os.fstat(fd).st_size != self.segment_bytes:
            # Sparse pre-allocation: zeros past the last record are what marks the end of data.
            # Only ever grows a file (a short last segment; see _check_sizes).
            os.ftruncate(fd, self.segment_bytes)
        view = mmap.mmap(fd, self.segment_bytes, access=mmap.ACCESS_READ)
        seg = _Segment(start, path, fd, view)
        with self._lock:
            self._segments[start] = seg
        return seg

    def _segment(self, start: int) -> _Segment:
        seg = self._segments.get(start)
        if seg is None:
            seg = self._open_segment(start, create=True)
        return seg

    def _read_format(self) -> int | None:
        """The segment size ``format.json`` records (None without one); sets ``units_from``."""
        path = self.dir / _FORMAT
        if not path.exists():
            return None
        try:
            fmt = orjson.loads(path.read_bytes())
            recorded = int(fmt["segment_bytes"])
            self.units_from = int(fmt.get("units_from", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise StorageError(
                f"{path} is unreadable ({e}); restore it from a backup, or delete it and the "
                "segment files' sizes will stand for the segment size"
            ) from None
        return recorded

    def _check_sizes(self, starts: list[int]) -> None:
        """Refuse a real change of segment size. A segment shorter than the size
        ``format.json`` records was cut: it is grown back and its lost end is damage (or, at the
        end of the log, a torn tail). Without ``format.json`` only the last segment may be short."""
        recorded = self._read_format()
        known = recorded is not None
        if recorded is None and starts:
            self.units_from = _NO_UNITS  # written before unit markers: set after recovery
        sizes = {s: self._path(s).stat().st_size for s in starts}
        if recorded is None and starts:
            # A directory from before format.json: its first segment's size is the only
            # record of the segment size, so a different size is refused as a size change.
            recorded = sizes[starts[0]]
        for start in starts:
            size = sizes[start]
            short = size < self.segment_bytes and (known or start == starts[-1])
            if (
                recorded != self.segment_bytes
                or start % self.segment_bytes
                or (size != self.segment_bytes and not short)
            ):
                raise StorageError(
                    f"CommitLog segment {start} is {size} bytes but --segment-bytes is "
                    f"{self.segment_bytes} (the data directory was written with "
                    f"{recorded}); the segment size of an existing data directory cannot change"
                )
            if short:
                self._short_segments.add(start)
                log.error(
                    "commitlog.short_segment",
                    segment=start,
                    size=size,
                    expected=self.segment_bytes,
                    note="cut short: grown back; what it lost is damage or a torn tail",
                )

    def _write_format(self) -> None:
        from broker_core.store import write_json_atomic  # the one atomic-replace helper

        write_json_atomic(
            self.dir / _FORMAT,
            {"version": 2, "segment_bytes": self.segment_bytes, "units_from": self.units_from},
        )

    def open(self, *, scan_from: int | None = None) -> int:
        """Open the segments, find and return the end of valid data (blocking; run off-loop).

        ``scan_from``: a record boundary up to which everything is known durable and checked (the
        last checkpoint); an unclean stop is recovered by checking every frame after it. None
        checks the whole log.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        starts = sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit())
        self._check_sizes(starts)
        for start in starts:
            self._open_segment(start, create=False)
        marker = self.dir / _CLEAN_MARKER
        end = None
        if marker.exists():
            try:
                end = int(marker.read_text().strip())
            except ValueError:
                end = None
            marker.unlink()
            if end is not None and not self._is_end(end):
                log.warning("commitlog.clean_marker_mismatch", marker_end=end)
                end = None
        if end is None:
            end = self._recover(scan_from)
        self.written_end = self.reserved_end = end
        if self.units_from == _NO_UNITS:
            self.units_from = end
        self._write_format()
        if not self._segments:
            self._open_segment(0, create=True)
        return end

    def open_readonly(self) -> list[str]:
        """Map the segments read-only for an offline check (``tempomq verify``), changing
        nothing on disk; returns problems with the files themselves (sizes, format)."""
        problems = []
        recorded = None
        try:
            recorded = self._read_format()
            if recorded is None:
                self.units_from = _NO_UNITS  # from before format.json: no unit markers
        except StorageError as e:
            problems.append(str(e))  # written by this version: unit markers from the start
        starts = sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit())
        if recorded is not None:
            self.segment_bytes = recorded
        elif starts:  # no (readable) format.json: the first segment's size stands for it
            self.segment_bytes = self._path(starts[0]).stat().st_size
        for start in starts:
            path = self._path(start)
            size = path.stat().st_size
            if size != self.segment_bytes or start % self.segment_bytes:
                problems.append(
                    f"segment {start} is {size} bytes, expected {self.segment_bytes}"
                    + (" (its end is lost: a torn tail)" if start == starts[-1] else "")
                )
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            view = mmap.mmap(fd, min(size, self.segment_bytes), access=mmap.ACCESS_READ)
            self._segments[start] = _Segment(start, path, fd, view)
        return problems

    def _is_end(self, offset: int) -> bool:
        start = self.segment_start(offset)
        seg = self._segments.get(start)
        if seg is None:
            return offset == start and (not self._segments or offset == max(self._segments))
        kind, _ = codec.scan(seg.view, offset - start, self.segment_bytes)
        return kind is Scan.END and not any(s > start for s in self._segments)

    def next_frame(self, offset: int) -> int | None:
        """The first valid frame after ``offset`` in this or a later segment, or None. Only the
        parts of the files that hold data are searched: sparse holes (the unwritten end of a
        segment) are skipped without being read."""
        start = self.segment_start(offset)
        for s in sorted(x for x in self._segments if x >= start):
            seg = self._segments[s]
            first = offset - s + 1 if s == start else 0
            for lo, hi in _data_ranges(seg.fd, first, len(seg.view)):
                found = codec.find_next_frame(seg.view, max(lo, first), hi, len(seg.view), s)
                if found is not None:
                    return s + found
        return None

    def walk(self, scan_from: int | None = None) -> LogScan:
        """Walk every frame from ``scan_from`` (None: from the first segment) and tell where
        the committed data ends, what damage lies before that end and whether the last write
        was torn. Reads only."""
        starts = sorted(self._segments)
        if not starts:
            return LogScan(0, 0, 0, [], False)
        pos = self._walk_start(starts[0], scan_from)
        w = _Walk(pos, self.units_from, last_unit_start=pos)
        while True:
            seg = self._segments.get(self.segment_start(pos))
            if seg is None:  # past the last segment, or a segment file is missing
                later = next((s for s in starts if s > pos), None)
                if later is None:
                    break
                w.damaged.append((pos, later))
                pos = later
                continue
            rel, limit = pos - seg.start, len(seg.view)
            kind, size = codec.scan(seg.view, rel, limit)
            if kind is Scan.RECORD:
                w.record(pos, pos + size)
            elif kind is Scan.UNIT:
                count = int.from_bytes(seg.view[rel + 20 : rel + 24], "big")
                w.unit(codec.unit_start(seg.view, rel), count, pos, pos + size)
            elif kind is Scan.BLANK or (kind is Scan.END and rel + codec.BLANK_SIZE > limit):
                size = seg.start + self.segment_bytes - pos  # the segment is full
                w.segment_end(pos + size)
            else:
                # Zeros inside a segment or a frame that does not check: the end of data,
                # unless valid frames follow, in which case it is damage to step over.
                nxt = self.skip_damage(pos)
                if nxt is None:
                    break
                w.damaged.append((pos, nxt))
                size = nxt - pos
            pos += size
        return w.result()

    def skip_damage(self, offset: int) -> int | None:
        """Where valid frames resume after damage at ``offset``, or None when none follow.

        A record whose header is whole (magic, a length that fits, its own offset) but whose
        CRC fails is stepped over by its length when a valid frame follows it: its body is
        never searched, so frames a client wrote into a message body cannot be mistaken for the
        log's. Otherwise the search goes byte by byte (:meth:`next_frame`)."""
        seg = self._segments.get(self.segment_start(offset))
        if seg is not None:
            rel, limit = offset - seg.start, len(seg.view)
            claimed = codec.claimed_record_size(seg.view, rel, limit, offset)
            if claimed:
                after = offset + claimed
                aseg = self._segments.get(self.segment_start(after))
                if aseg is not None and after < aseg.start + len(aseg.view):
                    kind, _ = codec.scan(aseg.view, after - aseg.start, len(aseg.view))
                    if kind is not Scan.CORRUPT and (
                        kind is not Scan.END or self.next_frame(after) is not None
                    ):
                        return after
        return self.next_frame(offset)

    def _walk_start(self, first: int, scan_from: int | None) -> int:
        """Where recovery begins: at the checkpoint when a unit marker ends right before it (it
        is where a write ended), else at the start of its segment (a cut segment, an edited
        checkpoint: the data may end before it)."""
        if scan_from is None or scan_from < first:
            return first
        start = self.segment_start(scan_from)
        seg = self._segments.get(start)
        if seg is None:
            return first
        rel = scan_from - start
        if (
            start not in self._short_segments
            and rel >= codec.UNIT_SIZE
            and codec.scan(seg.view, rel - codec.UNIT_SIZE, len(seg.view))[0] is Scan.UNIT
        ):
            return scan_from
        return start

    def _recover(self, scan_from: int | None) -> int:
        """Walk the frames after ``scan_from``; report damage, cut the torn tail, return the
        end of the last committed write."""
        found = self.walk(scan_from)
        if found.torn_last_write:
            log.warning("commitlog.torn_last_write", end=found.end)
        self._report_skipped(found.damage)
        self._cut_tail(found.end)
        return found.end

    def _report_skipped(self, ranges: list[tuple[int, int]]) -> None:
        for lo, hi in ranges:
            self.damage.report(
                segment=self.segment_start(lo),
                offset=lo,
                length=hi - lo,
                found_by="recovery",
                reason="corrupt bytes followed by valid records; skipped",
            )

    def _cut_tail(self, end: int) -> None:
        """Zero the torn bytes after ``end`` in its segment (shrinking and re-growing zeroes
        them in the kernel, however long the torn part is). Later segments hold nothing valid
        (recovery found no frame there) and are kept: writes reach and overwrite them."""
        start = self.segment_start(end)
        seg = self._segments.get(start)
        if seg is None or end == start + self.segment_bytes:
            return
        rel = end - start
        if codec.scan(seg.view, rel, self.segment_bytes)[0] is Scan.END and not any(
            seg.view[rel : min(rel + 4096, self.segment_bytes)]
        ):
            return  # nothing written there
        log.warning("commitlog.truncate_torn_tail", offset=end)
        os.ftruncate(seg.fd, rel)
        os.ftruncate(seg.fd, self.segment_bytes)
        os.fsync(seg.fd)

    # -- writing (worker thread) ----------------------------------------------------------------

    def write(self, offset: int, data: bytes, *, sync: bool) -> None:
        """Write ``data`` at ``offset`` (it may span segments) and fdatasync when ``sync``.
        Raises ``OSError`` (ENOSPC, EIO, a short write that cannot continue)."""
        view = memoryview(data)
        pos = 0
        touched: list[_Segment] = []
        io = self.io
        while pos < len(data):
            at = offset + pos
            start = self.segment_start(at)
            seg = self._segment(start)
            n = min(len(data) - pos, start + self.segment_bytes - at)
            written = io.pwrite(seg.fd, view[pos : pos + n], at - start)
            if written <= 0:
                raise OSError(errno.EIO, f"short write to commitlog segment {start}")
            pos += written  # a short write continues where it stopped
            if not touched or touched[-1] is not seg:
                touched.append(seg)
        if sync:
            for seg in touched:
                io.fdatasync(seg.fd)
        else:
            with self._lock:
                self._dirty.update(s.start for s in touched)

    def unwrite(self, offset: int, marker_at: int) -> None:
        """After a failed write at ``offset``: make sure its unit marker (at ``marker_at``) does
        not stand on disk, so nothing of the failed write is taken as committed later. Best
        effort: where the marker's page was never allocated, it was never written either."""
        seg = self._segments.get(self.segment_start(marker_at))
        if seg is None:
            return
        with contextlib.suppress(OSError):
            self.io.pwrite(seg.fd, memoryview(bytes(codec.UNIT_SIZE)), marker_at - seg.start)

    def probe(self) -> None:
        """Can the disk take writes again? Allocates the space ahead of the write position
        (raises ``OSError`` while it cannot), so a healed store does not fail on the next put."""
        end = self.written_end
        start = self.segment_start(end)
        seg = self._segment(start)
        length = min(_PROBE_BYTES, start + self.segment_bytes - end)
        if length > 0:
            self.io.fallocate(seg.fd, end - start, length)

    def sync(self) -> None:
        """fdatasync the segments written since the last sync (async flush mode)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            segs = [self._segments[s] for s in dirty if s in self._segments]
        for seg in segs:
            self.io.fdatasync(seg.fd)

    def close(self, *, clean: bool) -> None:
        self.sync()
        with self._lock:
            segs, self._segments = list(self._segments.values()), {}
        for seg in segs:
            seg.view.close()
            os.fsync(seg.fd)
            os.close(seg.fd)
        if clean:
            marker = self.dir / _CLEAN_MARKER
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(str(self.written_end))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(marker)

    # -- reading (event loop) --------------------------------------------------------------------

    def view_at(self, offset: int) -> tuple[mmap.mmap, int]:
        """The mapped segment holding ``offset`` and the position inside it."""
        start = offset - offset % self.segment_bytes
        seg = self._segments.get(start)
        if seg is None:
            raise KeyError(offset)
        return seg.view, offset - start

    def read(self, offset: int) -> StoredMessage | None:
        """The record at ``offset`` if it is whole, CRC-valid and written there, else None
        (reported to the damage log when it is damaged, not when retention removed it)."""
        start = offset - offset % self.segment_bytes
        seg = self._segments.get(start)
        if seg is None:
            return None
        found = codec.decode_checked(seg.view, offset - start, self.segment_bytes, offset)
        if found is None:
            self._report_bad_read(offset)
        return found

    def check(self, offset: int) -> tuple[mmap.mmap, int] | None:
        """Where the record at ``offset`` is, if it is whole, CRC-valid and written there, else
        None (reported like a bad :meth:`read`)."""
        start = offset - offset % self.segment_bytes
        seg = self._segments.get(start)
        if seg is None:
            return None
        pos = offset - start
        if codec.check_record(seg.view, pos, self.segment_bytes, offset):
            return seg.view, pos
        self._report_bad_read(offset)
        return None

    def _report_bad_read(self, offset: int) -> None:
        self.damage.report(
            segment=self.segment_start(offset),
            offset=offset,
            length=0,
            found_by="read",
            reason="record failed its CRC or self-offset check; not delivered",
        )

    def iter_records(
        self,
        start: int,
        end: int,
        *,
        include: Callable[[mmap.mmap, int], bool] | None = None,
    ) -> list[tuple[int, mmap.mmap, int]]:
        """Offsets of the records in ``[start, end)`` (``start`` at a frame boundary), stepping
        over unit markers, fillers and damage. ``include`` filters by the record's bytes."""
        out = []
        offset = start
        while offset < end:
            seg_start = self.segment_start(offset)
            seg = self._segments.get(seg_start)
            if seg is None:  # expired by retention
                offset = seg_start + self.segment_bytes
                continue
            pos = offset - seg_start
            kind, size = codec.scan(seg.view, pos, self.segment_bytes)
            if kind is Scan.RECORD:
                if include is None or include(seg.view, pos):
                    out.append((offset, seg.view, pos))
                offset += size
            elif kind is Scan.UNIT:
                offset += size
            elif kind is Scan.BLANK or (
                kind is Scan.END and pos + codec.BLANK_SIZE > self.segment_bytes
            ):
                offset = seg_start + self.segment_bytes
            else:  # damage (recovery reported it): resume at the next valid frame
                nxt = self.skip_damage(offset)
                if nxt is None or nxt >= end:
                    break
                offset = nxt
        return out

    # -- retention -------------------------------------------------------------------------------

    def expired_segments(self, older_than_s: float) -> list[int]:
        """Starts of whole segments last written before ``older_than_s`` (never the active one)."""
        active = self.segment_start(self.reserved_end)
        out = []
        for start in sorted(self._segments):
            if start >= active:
                break
            if os.stat(self._segments[start].path).st_mtime < older_than_s:
                out.append(start)
            else:
                break  # keep the log contiguous: never leave a hole before a kept segment
        return out

    def delete_segment(self, start: int) -> None:
        with self._lock:
            seg = self._segments.pop(start, None)
        if seg is None:
            return
        seg.view.close()
        os.close(seg.fd)
        seg.path.unlink(missing_ok=True)
        log.info("commitlog.segment_deleted", segment=start)
