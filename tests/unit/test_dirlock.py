"""The data-directory lock: one holder at a time, the owner's pid in the refusal, released on
release and on any process exit (kill -9 included), never fooled by a stale LOCK file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker_core import dirlock


def test_a_second_acquire_is_refused_with_the_owners_pid(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with dirlock.acquire(data) as held:
        assert held.held
        assert (data / dirlock.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(dirlock.DataDirInUse) as info:
            dirlock.acquire(data)
        assert str(info.value) == f"data directory {data} is in use by pid {os.getpid()}"
        assert info.value.pid == os.getpid()
        # The refused attempt left the owner's pid in place.
        assert (data / dirlock.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not held.held
    dirlock.acquire(data).release()


def test_release_lets_the_next_owner_in(tmp_path: Path) -> None:
    first = dirlock.acquire(tmp_path)
    first.release()
    first.release()  # idempotent
    second = dirlock.acquire(tmp_path)
    assert second.held
    second.release()


def test_a_stale_lock_file_of_a_dead_owner_does_not_block(tmp_path: Path) -> None:
    (tmp_path / dirlock.LOCK_FILE).write_text("999999999\n")
    with dirlock.acquire(tmp_path):
        assert (tmp_path / dirlock.LOCK_FILE).read_text() == f"{os.getpid()}\n"


_HOLDER = """
import sys
from pathlib import Path
from broker_core import dirlock
lock = dirlock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def test_the_os_drops_the_lock_of_a_killed_owner(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "locked\n"
        with pytest.raises(dirlock.DataDirInUse) as info:
            dirlock.acquire(tmp_path)
        assert info.value.pid == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with dirlock.acquire(tmp_path) as lock:
            assert lock.held
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_missing_data_directory_is_created(tmp_path: Path) -> None:
    data = tmp_path / "a" / "b"
    with dirlock.acquire(data):
        assert (data / dirlock.LOCK_FILE).exists()


@pytest.mark.parametrize(
    ("content", "pid"),
    [(b"1234\n", 1234), (b"  77 ", 77), (b"", None), (b"\n", None), (b"abc", None), (b"-5", None)],
)
def test_parse_pid(content: bytes, pid: int | None) -> None:
    assert dirlock.parse_pid(content) == pid


def test_an_owner_that_wrote_no_pid_yet_is_named_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dirlock, "_PID_WAIT_S", 0.0)
    with dirlock.acquire(tmp_path):
        os.truncate(tmp_path / dirlock.LOCK_FILE, 0)
        with pytest.raises(dirlock.DataDirInUse) as info:
            dirlock.acquire(tmp_path)
    assert info.value.pid is None
    assert str(info.value) == f"data directory {tmp_path} is in use by an unknown pid"
