"""SqliteRunner on a full disk, through its connection seam: a failed write fails with the
database's own cause (never a rollback error that hides it), nothing latches, and
:meth:`SqliteRunner.check` turns healthy again by itself once writes succeed."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from delayserver.sqlite import SqliteRunner

SCHEMA = "CREATE TABLE IF NOT EXISTS t (x INTEGER);"
FULL = "database or disk is full"


class Unavailable(Exception):
    pass


class Disk:
    """The switch of a fake disk: while ``full``, every COMMIT fails as SQLite fails on
    SQLITE_FULL: the transaction is rolled back by SQLite itself, then the error is raised."""

    def __init__(self) -> None:
        self.full = False

    def connect(self, path: Path) -> sqlite3.Connection:
        disk = self

        class OnThisDisk(sqlite3.Connection):
            def execute(self, sql: str, params: Any = (), /) -> sqlite3.Cursor:
                if disk.full and sql == "COMMIT":
                    super().execute("ROLLBACK")
                    raise sqlite3.OperationalError(FULL)
                return super().execute(sql, params)

        return sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, factory=OnThisDisk
        )


@pytest.fixture
def disk() -> Disk:
    return Disk()


@pytest.fixture
async def runner(tmp_path: Path, disk: Disk) -> AsyncIterator[SqliteRunner]:
    r = SqliteRunner(
        tmp_path / "db.sqlite",
        schema=SCHEMA,
        sync=True,
        name="test-db",
        unavailable=Unavailable,
        connect=disk.connect,
    )
    await r.open()
    yield r
    disk.full = False
    await r.close()


def insert(value: int) -> Any:
    def run(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (?)", (value,))

    return run


def rows(db: sqlite3.Connection) -> list[int]:
    return [r[0] for r in db.execute("SELECT x FROM t ORDER BY x")]


async def test_a_write_on_a_full_disk_fails_with_the_real_cause(
    runner: SqliteRunner, disk: Disk
) -> None:
    await runner.write(insert(1))
    disk.full = True
    with pytest.raises(Unavailable) as info:
        await runner.write(insert(2))
    assert str(info.value) == f"test-db write failed: {FULL}"
    assert "rollback" not in str(info.value)
    assert runner.health() == f"test-db write failed: {FULL}"
    assert await runner.read(rows) == [1]  # the failed batch left nothing behind


async def test_check_stays_red_while_full_and_turns_green_once_writes_succeed(
    runner: SqliteRunner, disk: Disk
) -> None:
    disk.full = True
    with pytest.raises(Unavailable):
        await runner.write(insert(1))
    assert await runner.check() == f"test-db write failed: {FULL}"
    disk.full = False
    # No client write is needed: the check itself tries one.
    assert await runner.check() is None
    assert runner.health() is None
    await runner.write(insert(3))
    assert await runner.read(rows) == [3]


async def test_check_of_a_healthy_database_writes_nothing(runner: SqliteRunner, disk: Disk) -> None:
    disk.full = True  # a write would fail; a healthy runner must not try one
    assert await runner.check() is None


async def test_writes_resume_after_the_disk_is_freed(runner: SqliteRunner, disk: Disk) -> None:
    await runner.write(insert(1))
    disk.full = True
    for value in (2, 3):
        with pytest.raises(Unavailable):
            await runner.write(insert(value))
    disk.full = False
    await runner.write(insert(4))
    assert runner.health() is None
    assert await runner.read(rows) == [1, 4]


async def test_a_domain_error_fails_alone_and_does_not_mark_the_database(
    runner: SqliteRunner,
) -> None:
    def refuses(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (99)")
        raise KeyError("not found")

    with pytest.raises(KeyError):
        await runner.write(refuses)
    await runner.write(insert(5))
    assert runner.health() is None
    assert await runner.read(rows) == [5]


# -- small writes on the event loop (async mode) -----------------------------------------------


async def _async_runner(tmp_path: Path, disk: Disk) -> SqliteRunner:
    r = SqliteRunner(
        tmp_path / "inline.sqlite",
        schema=SCHEMA,
        sync=False,
        name="inline-db",
        unavailable=Unavailable,
        connect=disk.connect,
    )
    await r.open()
    return r


def _insert(x: int) -> Any:
    def run(db: sqlite3.Connection) -> int:
        db.execute("INSERT INTO t (x) VALUES (?)", (x,))
        return x

    return run


async def test_a_small_write_commits_on_the_loop_and_is_read_back(
    tmp_path: Path, disk: Disk
) -> None:
    r = await _async_runner(tmp_path, disk)
    try:
        assert await r.write(_insert(1), small=True) == 1
        assert r._writer is None  # nothing went through the thread's queue
        assert await r.read(lambda db: db.execute("SELECT x FROM t").fetchall()) == [(1,)]
    finally:
        await r.close()
    # Committed for good: a fresh connection after close sees it.
    db = sqlite3.connect(tmp_path / "inline.sqlite")
    assert db.execute("SELECT x FROM t").fetchall() == [(1,)]
    db.close()


async def test_a_small_write_behind_queued_writes_keeps_their_order(
    tmp_path: Path, disk: Disk
) -> None:
    r = await _async_runner(tmp_path, disk)
    try:
        first = asyncio.ensure_future(r.write(_insert(1)))  # queued for the thread
        await asyncio.sleep(0)
        second = await r.write(_insert(2), small=True)  # the queue is busy: goes behind it
        assert (await first, second) == (1, 2)
        rows = await r.read(lambda db: db.execute("SELECT x FROM t ORDER BY rowid").fetchall())
        assert rows == [(1,), (2,)]
    finally:
        await r.close()


async def test_a_small_write_on_a_full_disk_fails_with_the_cause_and_heals(
    tmp_path: Path, disk: Disk
) -> None:
    r = await _async_runner(tmp_path, disk)
    try:
        disk.full = True
        with pytest.raises(Unavailable, match=FULL):
            await r.write(_insert(1), small=True)
        assert r.health() is not None
        disk.full = False
        assert await r.write(_insert(2), small=True) == 2  # via the thread, which clears it
        assert r.health() is None
        assert await r.read(lambda db: db.execute("SELECT x FROM t").fetchall()) == [(2,)]
    finally:
        await r.close()
