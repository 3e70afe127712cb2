"""One owner per data directory: an exclusive OS lock on ``<data-dir>/LOCK``.

Two servers writing one data directory destroy each other's CommitLog, offsets and checkpoints,
so ``tempomq serve`` takes this lock before anything in the directory is read or written and
holds it for the life of the process. The lock is ``flock(LOCK_EX | LOCK_NB)`` on an open file:
the kernel drops it when the process ends however it ends (``kill -9`` included), so a stale
lock cannot outlive its owner; the pid written into the file only names the owner in the
message a second server prints.

``flock`` locks belong to the open file description, so a second :func:`acquire` of the same
directory fails even inside one process (which is what the tests use).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "LOCK"

#: How long a loser waits for the winner to write its pid (it locks first, then writes).
_PID_WAIT_S = 1.0
_PID_POLL_S = 0.02


class DataDirInUse(Exception):
    """Another process holds the data directory."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        owner = "an unknown pid" if pid is None else f"pid {pid}"
        super().__init__(f"data directory {data_dir} is in use by {owner}")
        self.data_dir = data_dir
        self.pid = pid


class DataDirLock:
    """The held lock on one data directory; :meth:`release` (or process exit) gives it up."""

    def __init__(self, data_dir: Path, fd: int) -> None:
        self.data_dir = data_dir
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            # Closing the descriptor drops the flock; the file (and its stale pid) stays, which
            # is harmless: the lock, not the file, says whether the directory is in use.
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(data_dir: Path) -> DataDirLock:
    """Lock ``data_dir`` (created when missing) for this process, or raise :class:`DataDirInUse`
    naming the owner's pid."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    # No O_TRUNC: the file may hold the running owner's pid, which we must not wipe.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        pid = _wait_for_pid(fd)
        os.close(fd)
        raise DataDirInUse(data_dir, pid) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return DataDirLock(data_dir, fd)


def parse_pid(content: bytes) -> int | None:
    """The pid in a LOCK file's content, or None when it holds none (yet)."""
    with contextlib.suppress(ValueError):
        pid = int(content.strip() or b"x")
        if pid > 0:
            return pid
    return None


def _wait_for_pid(fd: int) -> int | None:
    # The owner locks before it writes its pid: a loser arriving in between reads nothing.
    deadline = time.monotonic() + _PID_WAIT_S
    while True:
        pid = parse_pid(os.pread(fd, 32, 0))
        if pid is not None or time.monotonic() >= deadline:
            return pid
        time.sleep(_PID_POLL_S)
