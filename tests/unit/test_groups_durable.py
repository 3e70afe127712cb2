"""Durable consumer state: a crash (the data directory as a kill -9 leaves it) keeps groups,
offsets, deliveries out and their attempt counts; retries keep their time; a message reaches
``%DLQ%<group>`` at most once. The delay store (here the recording scheduler) is durable on its
own and survives the crash with the broker's files."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker_core.errors import GroupNotFound
from tests.unit.test_groups import INVISIBLE_MS, Env, S, _no_hang, bodies  # noqa: F401


class CrashableEnv(Env):
    """An Env whose crash() leaves what kill -9 would: the files as the OS holds them (no
    clean stop, no snapshot), then starts a fresh broker on them."""

    crashes = 0

    async def crash(self) -> None:
        assert self.broker is not None
        self.crashes += 1
        copy = self.data_dir.with_name(f"{self.data_dir.name}-crash{self.crashes}")
        shutil.copytree(self.data_dir, copy)
        dead, self.broker = self.broker, None
        await dead.stop()  # releases the original's files; the copy is what "survived"
        self.data_dir = copy
        await self.start()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[CrashableEnv]:
    e = CrashableEnv(tmp_path / "data")
    await e.start()
    await e.b.create_topic("orders", 1)
    yield e
    await e.stop()


async def test_a_new_group_and_its_nack_survive_a_crash(env: CrashableEnv) -> None:
    # The group is created by its first receive; the nack asks for a retry in 3 s.
    [sent] = await env.send("orders", "a")
    [d] = await env.recv()
    await env.nack(d, retry_after_ms=3000)
    await env.crash()
    assert "g" in env.b.groups.groups
    assert await env.recv() == []  # not delivered again at once as attempt 1
    await env.advance(2900)
    await env.release()
    assert await env.recv() == []  # the retry keeps its time
    await env.advance(200)
    await env.release()
    [again] = await env.recv()
    assert (again.message.origin_msg_id, again.attempt) == (sent.hex(), 2)
    await env.ack(again)
    await env.crash()
    await env.advance(INVISIBLE_MS + 3600 * S)
    await env.release()
    assert await env.recv() == []


async def test_a_group_created_by_the_api_survives_a_crash(env: CrashableEnv) -> None:
    await env.b.create_group("billing", fifo=True, max_attempts=5)
    await env.crash()
    stats = await env.b.group_stats("orders", "billing")
    assert (stats["fifo"], stats["max_attempts"]) == (True, 5)
    with pytest.raises(GroupNotFound):
        await env.b.group_stats("orders", "never-made")


async def test_deliveries_out_at_a_crash_come_back_one_attempt_further(env: CrashableEnv) -> None:
    await env.send("orders", "a", "b", "c")
    first = await env.recv()
    assert [d.attempt for d in first] == [1, 1, 1]
    await env.ack(first[0])
    await env.crash()
    assert await env.recv() == []  # still invisible: their deadline has not passed
    await env.advance(INVISIBLE_MS)
    await env.advance(10 * S)
    await env.release()
    again = await env.recv()
    assert sorted(bodies(again)) == [b"b", b"c"]
    assert [d.attempt for d in again] == [2, 2]


async def test_acknowledged_messages_are_never_delivered_after_a_crash(
    env: CrashableEnv,
) -> None:
    await env.send("orders", *[f"m{i}" for i in range(10)])
    got = await env.recv()
    await env.ack(*got)
    await env.crash()
    await env.advance(INVISIBLE_MS + 10 * S)
    await env.release()
    assert await env.recv() == []


async def test_a_message_that_crashes_the_server_reaches_the_dlq_once(tmp_path: Path) -> None:
    env = CrashableEnv(tmp_path / "data", max_attempts=3)
    await env.start()
    try:
        await env.b.create_topic("orders", 1)
        [sent] = await env.send("orders", "poison")
        attempts = []
        for _ in range(6):  # each delivery "crashes the server" before it is acked
            got = await env.recv()
            attempts += [d.attempt for d in got]
            await env.crash()
            await env.advance(INVISIBLE_MS)
            await env.advance(3600 * S)
            await env.release()
        assert attempts == [1, 2, 3]
        dead = env.dlq()
        assert [m.origin_msg_id for m in dead] == [sent.hex()]
    finally:
        await env.stop()


async def test_the_dead_letter_and_its_record_are_one_write(tmp_path: Path) -> None:
    env = CrashableEnv(tmp_path / "data", max_attempts=1)
    await env.start()
    try:
        await env.b.create_topic("orders", 1)
        await env.send("orders", "poison")
        [d] = await env.recv()
        await env.nack(d)  # the last attempt: dead-lettered
        assert len(env.dlq()) == 1
        for _ in range(2):
            await env.crash()
            await env.advance(INVISIBLE_MS + 3600 * S)
            await env.release()
            assert await env.recv() == []
            assert len(env.dlq()) == 1
    finally:
        await env.stop()


async def test_a_reset_survives_a_crash(env: CrashableEnv) -> None:
    await env.send("orders", "a", "b")
    got = await env.recv()
    await env.ack(*got)
    await env.b.reset("orders", "g", 0)
    await env.crash()
    assert bodies(await env.recv()) == [b"a", b"b"]


async def test_replay_after_a_snapshot_applies_only_later_records(env: CrashableEnv) -> None:
    # A snapshot is taken mid-way (as the flusher does); the crash then replays what follows.
    await env.send("orders", *[f"m{i}" for i in range(4)])
    first = await env.recv(n=2)
    snap = env.b.groups.snapshot()
    assert snap is not None
    env.b.groups.save(snap)
    await env.ack(first[0])
    second = await env.recv(n=2)
    await env.ack(second[1])
    await env.crash()
    await env.advance(INVISIBLE_MS)
    await env.advance(10 * S)
    await env.release()
    again = await env.recv()
    assert sorted(bodies(again)) == sorted([first[1].message.body, second[0].message.body])
    assert all(d.attempt == 2 for d in again)


async def test_a_deleted_group_stays_deleted_after_a_crash(env: CrashableEnv) -> None:
    await env.send("orders", "a", "b")
    [first, _] = await env.recv()
    await env.ack(first)
    await env.b.groups.delete_group("g")
    await env.crash()
    assert "g" not in env.b.groups.groups
    with pytest.raises(GroupNotFound):
        await env.b.groups.delete_group("g")
    # The name starts afresh: from the oldest message, every one a first attempt.
    got = await env.recv()
    assert [(d.message.body, d.attempt) for d in got] == [(b"a", 1), (b"b", 1)]


async def test_a_retry_handed_to_the_scheduler_before_a_crash_is_not_stored_twice(
    env: CrashableEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The retry copy reached the (durable) scheduler, then the server died before the record
    # that finishes the delivery was written. After the restart the delivery fails again, past
    # the copy's time: the copy must go through the scheduler again under the same id, not be
    # stored a second time under a new one.
    [sent] = await env.send("orders", "a")
    [d] = await env.recv()
    real = env.scheduler.schedule

    async def then_die(*args: object, **kw: object) -> list[int]:
        await real(*args, **kw)  # type: ignore[arg-type]
        raise ConnectionError("the server died here")

    monkeypatch.setattr(env.scheduler, "schedule", then_die)
    with pytest.raises(ConnectionError):
        await env.nack(d, retry_after_ms=1000)
    monkeypatch.setattr(env.scheduler, "schedule", real)
    await env.crash()
    await env.advance(INVISIBLE_MS)  # the delivery's deadline and the copy's time have passed
    await env.advance(1000)
    await env.release()
    got = await env.recv()
    assert [(x.message.origin_msg_id, x.attempt) for x in got] == [(sent.hex(), 2)]
    await env.ack(*got)
    await env.advance(INVISIBLE_MS + 3600 * S)
    await env.release()
    assert await env.recv() == []


async def test_an_unreadable_snapshot_is_rebuilt_from_the_records(env: CrashableEnv) -> None:
    await env.send("orders", "a", "b", "c")
    got = await env.recv()
    await env.ack(got[0])
    await env.stop()
    (env.data_dir / "groups.json").write_text("{garbage")
    await env.start()
    assert list(env.data_dir.glob("groups.json.unreadable-*"))
    await env.advance(INVISIBLE_MS)
    await env.advance(10 * S)
    await env.release()
    again = await env.recv()
    assert sorted(bodies(again)) == [b"b", b"c"]
    assert [d.attempt for d in again] == [2, 2]


async def test_restored_deliveries_wait_for_the_scheduler_and_survive_a_failed_redelivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A broker restarts with a delivery whose retry copy was already handed to the scheduler
    # and whose deadline has passed. Its timer must not fire before the scheduler is wired in
    # (as the app does, after the broker starts); and a redelivery that fails is tried again
    # rather than leaving the message out for good.
    env = CrashableEnv(tmp_path / "data")
    await env.start()
    try:
        await env.b.create_topic("orders", 1)
        [sent] = await env.send("orders", "a")
        [d] = await env.recv()
        real = env.scheduler.schedule

        async def then_die(*args: object, **kw: object) -> list[int]:
            await real(*args, **kw)  # type: ignore[arg-type]
            raise ConnectionError("the server died here")

        monkeypatch.setattr(env.scheduler, "schedule", then_die)
        with pytest.raises(ConnectionError):
            await env.nack(d, retry_after_ms=1000)
        monkeypatch.setattr(env.scheduler, "schedule", real)
        env.timers.advance(INVISIBLE_MS + 1000)  # everything is overdue when it comes back
        # Restart the way the app does: broker first, scheduler wired in afterwards.
        scheduler, env.scheduler = env.scheduler, None  # type: ignore[assignment]
        await env.crash()
        await env.advance(0)  # due timers run: none may act before the scheduler is wired in
        fails = {"n": 1}
        real_fail = env.b.groups._fail_delivery

        async def fail_once(*args: object, **kw: object) -> None:
            if fails["n"]:
                fails["n"] -= 1
                raise RuntimeError("a passing fault")
            await real_fail(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(env.b.groups, "_fail_delivery", fail_once)
        env.scheduler = scheduler
        env.b.scheduler = scheduler
        await env.advance(0)
        await env.advance(1000)  # the failed redelivery is tried again
        await env.release()
        got = await env.recv()
        assert [(x.message.origin_msg_id, x.attempt) for x in got] == [(sent.hex(), 2)]
        await env.ack(*got)
        # The original delivery was finished too (not left out for ever, holding the offset).
        stats = await env.b.group_stats("orders", "g")
        assert (stats["inflight"], stats["lag"]) == (0, 0)
        await env.advance(INVISIBLE_MS + 3600 * S)
        await env.release()
        assert await env.recv() == []
    finally:
        await env.stop()
