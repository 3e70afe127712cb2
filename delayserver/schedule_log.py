"""The schedule log: where the embedded delay store acknowledges a schedule in async flush mode.

A schedule is durable once one CRC-framed entry is appended to this log (one ``write`` into
the page cache: it survives ``kill -9``, not a power loss, the async flush mode's promise). The
rows reach the SQLite table later, in batches (one transaction for many schedules), each batch
committing the highest sequence number it holds as a watermark in the same transaction. At
open, entries above the watermark are applied again, and the log starts empty. The idea is
RocketMQ 5's timer log (``TimerLog``): a timer message is acknowledged once appended to a log,
and its index is built behind it.

Two files, ``<db>.schedule-0`` and ``<db>.schedule-1``, take turns: appends go to one until it
holds ``switch_bytes``; then, once the other is empty, to the other. A file is emptied once the
watermark covers its last entry. So the log holds only what is not yet applied, plus at most
``switch_bytes`` or so per file.

Entry: ``u32 size | u32 crc32 | u64 seq | i64 deliver_at_ms | u8 id_len | u16 topic_len |
msg_id | topic (UTF-8) | record``, little-endian; ``size`` counts the bytes after the CRC, and
the CRC covers them. Reading a file stops at the first entry that is short or fails its CRC (a
torn tail): nothing after it was acknowledged, since a failed append is cut back off the file
(see :meth:`ScheduleLog.append`).
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: size, crc32 | seq, deliver_at_ms, id_len, topic_len
_FRAME = struct.Struct("<II")
_HEAD = struct.Struct("<QqBH")
_MAX_ENTRY = 256 << 20  # far above any message the server accepts: a larger size is garbage


@dataclass(slots=True, frozen=True)
class Entry:
    seq: int
    msg_id: bytes
    deliver_at_ms: int
    topic: str
    record: bytes


def frame(seq: int, msg_id: bytes, deliver_at_ms: int, topic: bytes, record: bytes) -> bytes:
    """One entry as written (``topic`` already UTF-8 encoded)."""
    body = b"".join(
        (_HEAD.pack(seq, deliver_at_ms, len(msg_id), len(topic)), msg_id, topic, record)
    )
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def read_entries(path: Path) -> Iterator[Entry]:
    """The file's entries in order, up to the first torn or corrupt one; none if it is absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    pos, end = 0, len(data)
    while pos + _FRAME.size <= end:
        size, crc = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        if size < _HEAD.size or size > _MAX_ENTRY or start + size > end:
            return
        body = memoryview(data)[start : start + size]
        if zlib.crc32(body) != crc:
            return
        seq, at, id_len, topic_len = _HEAD.unpack_from(body)
        ids = _HEAD.size
        topics = ids + id_len
        records = topics + topic_len
        if records > size:
            return
        yield Entry(
            seq,
            bytes(body[ids:topics]),
            at,
            str(body[topics:records], "utf-8"),
            bytes(body[records:]),
        )
        pos = start + size


class ScheduleLog:
    """The two files beside a database at ``db_path``. Not thread-safe: appends, switches and
    the choice of what to empty happen on the event loop; emptying a file (:meth:`empty`) may
    run on a thread, since no append goes to a file that is waiting to be emptied."""

    def __init__(self, db_path: Path, *, switch_bytes: int = 64 << 20) -> None:
        self.paths = (
            db_path.with_name(db_path.name + ".schedule-0"),
            db_path.with_name(db_path.name + ".schedule-1"),
        )
        self.switch_bytes = switch_bytes
        self._fds: list[int] = []
        self._current = 0
        self._size = [0, 0]
        #: The highest seq in each file (0: the file is empty).
        self._last = [0, 0]
        #: A file handed out by :meth:`to_empty` and not yet back through :meth:`emptied`.
        self._emptying: int | None = None

    def read(self) -> list[Entry]:
        """Every entry of both files, by seq (blocking: run it off the event loop)."""
        entries = [e for p in self.paths for e in read_entries(p)]
        entries.sort(key=lambda e: e.seq)
        return entries

    def start(self) -> None:
        """Empty both files and open them for appending (blocking; at open, after the entries
        :meth:`read` found are applied)."""
        self.close()
        for path in self.paths:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                os.close(fd)
                raise
            self._fds.append(fd)
        self._current, self._size, self._last, self._emptying = 0, [0, 0], [0, 0], None

    def remove(self) -> None:
        """Close and delete both files (blocking; sync mode, which keeps no log)."""
        self.close()
        for path in self.paths:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    @property
    def open(self) -> bool:
        return bool(self._fds)

    def append(self, data: bytes, last_seq: int) -> None:
        """Append entries (one ``write``). Raises ``OSError`` when they are not all written;
        what was written of them is cut off again, so a later append never follows a torn entry.
        If that cut fails too, the log closes (:attr:`open` turns False) and the error is
        raised: the caller stops using it."""
        cur = self._current
        fd = self._fds[cur]
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"schedule log: short write ({written} of {len(data)} bytes)")
        except OSError:
            try:
                os.ftruncate(fd, self._size[cur])
            except OSError:
                self.close()
            raise
        self._size[cur] += written
        self._last[cur] = last_seq
        if self._size[cur] >= self.switch_bytes:
            other = 1 - cur
            if self._last[other] == 0 and self._emptying != other:
                self._current = other

    def to_empty(self, applied_seq: int) -> int | None:
        """The file to empty now that every entry up to ``applied_seq`` is in the table (not
        the one taking appends), or None; pass it to :meth:`empty`, then :meth:`emptied`.
        None once closed: a log closed by a failed cut keeps its files as they are."""
        other = 1 - self._current
        if self._fds and self._emptying is None and 0 < self._last[other] <= applied_seq:
            self._emptying = other
            return other
        return None

    def empty(self, index: int) -> None:
        """Truncate file ``index`` (blocking). ``OSError`` once the log is closed (by a failed
        cut while this waited for a thread)."""
        fds = self._fds
        if not fds:
            raise OSError(errno.EBADF, "schedule log closed")
        os.ftruncate(fds[index], 0)

    def emptied(self, index: int, ok: bool) -> None:
        self._emptying = None
        if ok:
            self._size[index] = 0
            self._last[index] = 0
            if self._size[self._current] >= self.switch_bytes:
                self._current = index
