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
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

from broker_core import codec, metrics
from broker_core.codec import Scan

log = structlog.get_logger(__name__)

_CLEAN_MARKER = "clean_shutdown"
_FORMAT = "format.json"
_DAMAGE = "damage.jsonl"
_NAME_DIGITS = 20
#: Offsets below this in a data directory written before unit markers existed commit per record.
_NO_UNITS = 1 << 62
#: How much the self-heal probe allocates ahead of the write position after a failed write.
_PROBE_BYTES = 1 << 20


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

    def _check_sizes(self, starts: list[int]) -> None:
        """Refuse a real change of segment size; a short *last* segment is a torn tail."""
        fmt_path = self.dir / _FORMAT
        recorded: int | None = None
        if fmt_path.exists():
            fmt = orjson.loads(fmt_path.read_bytes())
            recorded = int(fmt["segment_bytes"])
            self.units_from = int(fmt.get("units_from", 0))
        elif starts:
            self.units_from = _NO_UNITS  # written before unit markers: set after recovery
        sizes = {s: self._path(s).stat().st_size for s in starts}
        if recorded is None and len(starts) > 1:
            recorded = sizes[starts[0]]
        if recorded is None and starts:
            # A lone segment in a directory from before format.json: its size is the only
            # record of the segment size, so a different size is refused as a size change.
            recorded = sizes[starts[0]]
        for start in starts:
            size = sizes[start]
            short_tail = start == starts[-1] and size < self.segment_bytes
            if (
                recorded != self.segment_bytes
                or start % self.segment_bytes
                or (size != self.segment_bytes and not short_tail)
            ):
                raise RuntimeError(
                    f"CommitLog segment {start} is {size} bytes but --segment-bytes is "
                    f"{self.segment_bytes} (the data directory was written with "
                    f"{recorded}); the segment size of an existing data directory cannot change"
                )
            if short_tail:
                log.error(
                    "commitlog.short_segment",
                    segment=start,
                    size=size,
                    expected=self.segment_bytes,
                    note="its lost end is treated as a torn tail",
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
        fmt_path = self.dir / _FORMAT
        if fmt_path.exists():
            try:
                fmt = orjson.loads(fmt_path.read_bytes())
                self.segment_bytes = int(fmt["segment_bytes"])
                self.units_from = int(fmt.get("units_from", 0))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                problems.append(f"{fmt_path}: unreadable ({e})")
        else:
            self.units_from = _NO_UNITS
        starts = sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit())
        if starts and not fmt_path.exists():
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
        """The first valid frame after ``offset`` in this or a later segment, or None."""
        start = self.segment_start(offset)
        pos = offset - start
        for s in sorted(x for x in self._segments if x >= start):
            seg = self._segments[s]
            limit = len(seg.view)
            if s > start:
                pos = -1  # from the segment's first byte
                kind, _ = codec.scan(seg.view, 0, limit)
                if kind is Scan.UNIT or (
                    kind is Scan.RECORD and codec.record_phy_offset(seg.view, 0) == s
                ):
                    return s
            found = codec.find_next_frame(seg.view, max(pos, 0), limit, s)
            if found is not None:
                return s + found
        return None

    def walk(self, scan_from: int | None = None) -> LogScan:
        """Walk every frame from the start of ``scan_from``'s segment (None: from the first
        segment) and tell where the committed data ends, what damage lies before that end and
        whether the last write was torn. Reads only."""
        starts = sorted(self._segments)
        if not starts:
            return LogScan(0, 0, 0, [], False)
        # From the start of the checkpoint's segment: a segment cut short since the checkpoint
        # ends the data before the checkpoint's offset.
        pos = starts[0] if scan_from is None else max(self.segment_start(scan_from), starts[0])
        good = pos  # end of the last committed write
        records = units = unit_records = 0  # unit_records: valid records since ``good``
        damaged: list[tuple[int, int]] = []  # damage since ``good``
        committed_damage: list[tuple[int, int]] = []
        last_unit_damaged = False
        last_unit_start = good
        while True:
            seg = self._segments.get(self.segment_start(pos))
            if seg is None:
                break
            rel, limit = pos - seg.start, len(seg.view)
            kind, size = codec.scan(seg.view, rel, limit)
            if kind is Scan.RECORD:
                pos += size
                unit_records += 1
                if pos <= self.units_from:  # written before unit markers: commits itself
                    good, last_unit_start = pos, pos
                    records, unit_records = records + 1, 0
                continue
            if kind is Scan.UNIT:
                ustart = codec.unit_start(seg.view, rel)
                if good <= ustart <= pos:
                    count = int.from_bytes(seg.view[rel + 20 : rel + 24], "big")
                    last_unit_damaged = bool(damaged) or count != unit_records
                    last_unit_start = good
                    committed_damage += damaged
                    records, units = records + unit_records, units + 1
                    damaged, unit_records = [], 0
                    good = pos + size
                pos += size
                continue
            if kind is Scan.BLANK or (kind is Scan.END and rel + codec.BLANK_SIZE > limit):
                pos = seg.start + self.segment_bytes  # segment full; data continues after it
                if pos <= self.units_from:
                    good, last_unit_start = pos, pos
                continue
            # Zeros inside a segment or a frame that does not check: the end of data, unless
            # valid frames follow, in which case it is damage to step over.
            nxt = self.next_frame(pos)
            if nxt is None:
                break
            damaged.append((pos, nxt))
            pos = nxt
        torn = last_unit_damaged and good > last_unit_start
        if torn:
            # The last write lost some of its records: a write torn by a crash, never
            # acknowledged whole. It ends the data, whole, rather than keep part of it.
            good = last_unit_start
        return LogScan(good, records, units, [d for d in committed_damage if d[1] <= good], torn)

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

    def check(self, offset: int) -> tuple[mmap.mmap, int] | None:
        """The record at ``offset`` if it is whole, CRC-valid and written there, else None
        (reported to the damage log when it is damaged, not when retention removed it)."""
        start = offset - offset % self.segment_bytes
        seg = self._segments.get(start)
        if seg is None:
            return None
        pos = offset - start
        if codec.check_record(seg.view, pos, self.segment_bytes, offset):
            return seg.view, pos
        self.damage.report(
            segment=start,
            offset=offset,
            length=0,
            found_by="read",
            reason="record failed its CRC or self-offset check; not delivered",
        )
        return None

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
                nxt = self.next_frame(offset)
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
