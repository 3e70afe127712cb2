"""CommitLog: every message of every topic appended to fixed-size, pre-allocated segment files.

Offsets are global byte positions; segment ``k`` holds ``[k * segment_bytes, (k+1) *
segment_bytes)`` and is named after its first offset (20 digits, as RocketMQ names them). A record
never straddles two segments: when one does not fit, the tail of the segment gets a blank filler
and the record starts the next segment.

Writes go through one writer thread, so the event loop never waits on the disk: puts made while a
write (and, in ``sync`` mode, its fsync) is in flight pile up and go out together in the next
write: group commit, one ``pwrite`` and at most one ``fdatasync`` for many messages. Readers map
the segments read-only; a record is readable once :meth:`write` for it returned.

Recovery (:meth:`open`) finds the end of valid data: after a clean stop it trusts the marker the
stop wrote; otherwise it CRC-checks the records of the last two segments and truncates at the
first torn or corrupt one.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from broker_core import codec
from broker_core.codec import Scan

log = structlog.get_logger(__name__)

_CLEAN_MARKER = "clean_shutdown"
_NAME_DIGITS = 20


@dataclass(slots=True)
class _Segment:
    start: int
    path: Path
    fd: int
    view: mmap.mmap


class CommitLog:
    """Segment files, the write position, recovery and retention. Thread-safe where it must be:
    :meth:`write` and :meth:`sync` run on worker threads, everything else on the loop."""

    def __init__(self, directory: Path, *, segment_bytes: int) -> None:
        if segment_bytes < 64 * 1024:
            raise ValueError("segment_bytes must be at least 64 KiB")
        self.dir = directory
        self.segment_bytes = segment_bytes
        self._segments: dict[int, _Segment] = {}
        self._lock = threading.Lock()  # guards _segments between the writer and the loop
        #: End of data that is written (readable). Advanced by the writer's caller on the loop.
        self.written_end = 0
        #: End of data reserved for records not yet written (>= written_end).
        self.reserved_end = 0
        self._dirty: set[int] = set()

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

    def open(self) -> int:
        """Open the segments, find and return the end of valid data (blocking; run off-loop)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        starts = sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit())
        for start in starts:
            size = (self.dir / f"{start:0{_NAME_DIGITS}d}").stat().st_size
            if start % self.segment_bytes or size != self.segment_bytes:
                # Never resize: shrinking a segment would cut off its records.
                raise RuntimeError(
                    f"CommitLog segment {start} is {size} bytes but --segment-bytes is "
                    f"{self.segment_bytes}; the segment size of an existing data directory "
                    "cannot change"
                )
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
            end = self._recover(starts)
        self.written_end = self.reserved_end = end
        if not self._segments:
            self._open_segment(0, create=True)
        return end

    def _is_end(self, offset: int) -> bool:
        start = self.segment_start(offset)
        seg = self._segments.get(start)
        if seg is None:
            return offset == start and (not self._segments or offset == max(self._segments))
        kind, _ = codec.scan(seg.view, offset - start, self.segment_bytes)
        return kind is Scan.END and not any(s > start for s in self._segments)

    def _recover(self, starts: list[int]) -> int:
        """CRC-scan the last two segments; truncate at the first record that does not check."""
        if not starts:
            return 0
        first = starts[-2] if len(starts) > 1 else starts[-1]
        for i, start in enumerate(starts):
            if start < first:
                continue
            seg = self._segments[start]
            pos = 0
            while True:
                kind, size = codec.scan(seg.view, pos, self.segment_bytes)
                if kind is Scan.RECORD:
                    pos += size
                    continue
                if kind is Scan.BLANK or (
                    kind is Scan.END and pos + codec.BLANK_SIZE > self.segment_bytes
                ):
                    break  # segment full; data continues in the next one
                # END inside the segment, or CORRUPT: the valid data ends here.
                if kind is Scan.CORRUPT:
                    log.warning("commitlog.truncate_torn_record", offset=start + pos)
                self._truncate_at(seg, pos, later=starts[i + 1 :])
                return start + pos
            if i == len(starts) - 1:
                # The last segment is full: the next write starts a new one.
                return start + self.segment_bytes
        return starts[-1]  # unreachable: the loop returns from the last segment

    def _truncate_at(self, seg: _Segment, pos: int, *, later: list[int]) -> None:
        # Shrinking and re-growing zeroes the tail in the kernel, however long the torn part is.
        os.ftruncate(seg.fd, pos)
        os.ftruncate(seg.fd, self.segment_bytes)
        os.fsync(seg.fd)
        for start in later:
            dead = self._segments.pop(start)
            dead.view.close()
            os.close(dead.fd)
            dead.path.unlink()
            log.warning("commitlog.drop_segment_after_truncation", segment=start)

    # -- writing (worker thread) ----------------------------------------------------------------

    def write(self, offset: int, data: bytes, *, sync: bool) -> None:
        """Write ``data`` at ``offset`` (it may span segments) and fdatasync when ``sync``."""
        view = memoryview(data)
        pos = 0
        touched: list[_Segment] = []
        while pos < len(data):
            at = offset + pos
            start = self.segment_start(at)
            seg = self._segment(start)
            n = min(len(data) - pos, start + self.segment_bytes - at)
            written = os.pwrite(seg.fd, view[pos : pos + n], at - start)
            if written <= 0:
                raise OSError(f"short write to commitlog segment {start}")
            pos += written
            if not touched or touched[-1] is not seg:
                touched.append(seg)
        if sync:
            for seg in touched:
                os.fdatasync(seg.fd)
        else:
            with self._lock:
                self._dirty.update(s.start for s in touched)

    def sync(self) -> None:
        """fdatasync the segments written since the last sync (async flush mode)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            segs = [self._segments[s] for s in dirty if s in self._segments]
        for seg in segs:
            os.fdatasync(seg.fd)

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

    def iter_records(self, start: int, end: int) -> list[tuple[int, mmap.mmap, int]]:
        """Offsets of the records in ``[start, end)`` (``start`` at a record boundary)."""
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
                out.append((offset, seg.view, pos))
                offset += size
            elif kind is Scan.CORRUPT:
                raise RuntimeError(f"corrupt commitlog record at {offset}")
            elif kind is Scan.END and offset >= self.written_end:
                break
            else:  # blank filler or short gap: continue in the next segment
                offset = seg_start + self.segment_bytes
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
