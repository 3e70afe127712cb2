"""DelayService on the embedded store: release on time into the real topic with the same id,
never early, exactly once across restarts and lost bookkeeping; cancel and reschedule inside and
beyond the loaded window; consumer retries through it."""

from __future__ import annotations

import asyncio
import gc
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.message import PROP_DELIVER_AT, PROP_RELEASED_AT, Message
from delayserver.embedded import EmbeddedDelayStore
from delayserver.service import DelayService
from delayserver.store import DelayState, DelayStoreUnavailable
from delayserver.timers import TimerService, epoch_ms
from tests.unit.broker_helpers import wait_for


class Node:
    """One broker + timers + delay service over a data directory, as the app wires them."""

    def __init__(self, data: Path, *, window_ms: int = 60_000, window_limit: int = 100_000) -> None:
        self.timers = TimerService(max_sleep_ms=None)
        self.broker = Broker(
            BrokerConfig(data_dir=data, segment_bytes=1 << 20, backoff_ms=(60_000,)),
            timers=self.timers,
        )
        self.delay = DelayService(
            EmbeddedDelayStore(data / "delay.db"),
            self.broker.store,
            self.timers,
            window_ms=window_ms,
            window_limit=window_limit,
        )

    async def start(self) -> Node:
        self.timers.start()
        await self.broker.start()
        await self.delay.start()
        self.broker.scheduler = self.delay
        return self

    async def stop(self) -> None:
        await self.delay.stop()
        await self.broker.stop()
        await self.timers.stop()

    def released(self, topic: str) -> list[tuple[bytes, int, int]]:
        """(body, deliver_at, released_at) of what is in ``topic``, in release order."""
        store = self.broker.store
        out = []
        for q in range(store.topic(topic).queues):
            lo, hi = store.queue_bounds(topic, q)
            cq = store.consume_queue(topic, q)
            for i in range(lo, hi):
                m = store.read(cq.get(i)[0])
                assert m is not None
                out.append(
                    (
                        m.body,
                        int(m.properties[PROP_DELIVER_AT]),
                        int(m.properties[PROP_RELEASED_AT]),
                    )
                )
        return sorted(out, key=lambda r: r[2])

    def bodies(self, topic: str) -> list[bytes]:
        return sorted(b for b, _, _ in self.released(topic))


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    running: list[Node] = []
    yield running
    for n in running:
        await n.stop()


async def _node(nodes: list[Node], data: Path, **kw: int) -> Node:
    node = await Node(data, **kw).start()
    nodes.append(node)
    return node


async def _stop(nodes: list[Node], node: Node) -> None:
    nodes.remove(node)
    await node.stop()


async def test_released_on_time_into_the_real_topic_with_the_same_id(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = await _node(nodes, tmp_path / "d")
    await node.broker.create_topic("orders", 2)
    msg = Message("orders", b"later", keys=("k1",))
    at = node.timers.now_ms() + 300
    await node.delay.schedule([msg], [at])
    assert msg.msg_id, "the service assigns the id the client gets back"
    info = await node.delay.get(msg.msg_id)
    assert info is not None and info.state is DelayState.SCHEDULED and info.deliver_at_ms == at
    assert node.bodies("orders") == []
    await wait_for(lambda: node.bodies("orders") == [b"later"])
    released = node.broker.get_message(msg.msg_id)
    assert released.topic == "orders" and released.keys == ("k1",)
    assert int(released.properties[PROP_DELIVER_AT]) == at
    assert int(released.properties[PROP_RELEASED_AT]) >= at  # never early
    for _ in range(200):  # the mark lands just after the put
        info = await node.delay.get(msg.msg_id)
        if info is not None and info.state is DelayState.DELIVERED:
            break
        await asyncio.sleep(0.01)
    assert info is not None and info.state is DelayState.DELIVERED
    await asyncio.sleep(0.05)
    assert await node.delay.store.pending() == 0


async def test_windows_load_ahead_and_release_in_order_never_early(
    nodes: list[Node], tmp_path: Path
) -> None:
    # A tiny window and page: most messages start outside the wheel and come in by loads.
    node = await _node(nodes, tmp_path / "d", window_ms=200, window_limit=3)
    await node.broker.create_topic("t", 1)
    now = node.timers.now_ms()
    times = [now + 100 + 40 * i for i in range(25)]
    await node.delay.schedule([Message("t", str(i).encode()) for i in range(25)], times)
    assert node.delay.in_window < 25
    await wait_for(lambda: len(node.bodies("t")) == 25)
    for _body, deliver_at, released_at in node.released("t"):
        assert released_at >= deliver_at


async def test_the_window_adds_nothing_the_cyclic_collector_tracks(
    nodes: list[Node], tmp_path: Path
) -> None:
    # A full collection walks every tracked object: a window of n messages must not add
    # objects in proportion to n (a TimerEntry and a callback per message did).
    node = await _node(nodes, tmp_path / "d", window_ms=600_000)
    await node.broker.create_topic("t", 1)
    now = node.timers.now_ms()
    # The first message so far ahead makes the timing wheel's next level (once for all).
    await node.delay.schedule([Message("t", b"x")], [now + 60_000])
    gc.collect()
    before = len(gc.get_objects())
    n = 5000
    await node.delay.schedule(
        [Message("t", b"x") for _ in range(n)], [now + 60_000 + i for i in range(n)]
    )
    assert node.delay.in_window == n + 1
    gc.collect()
    assert len(gc.get_objects()) - before < n // 10


async def test_a_burst_due_in_one_millisecond_goes_out_whole_never_early(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = await _node(nodes, tmp_path / "d")
    await node.broker.create_topic("t", 2)
    at = node.timers.now_ms() + 500
    n = 3 * 1024 + 5  # several chunks of the release queue
    msgs = [Message("t", str(i).encode()) for i in range(n)]
    await node.delay.schedule(msgs, [at] * n)
    # Cancelled and moved ones leave stale items in the queue, skipped when they come up.
    for m in msgs[::500]:
        info = await node.delay.cancel(m.msg_id)
        assert info is not None and info.state is DelayState.CANCELLED
    moved = msgs[1]
    await node.delay.reschedule(moved.msg_id, at + 50)
    kept = {m.body for m in msgs} - {m.body for m in msgs[::500]}
    await wait_for(lambda: len(node.bodies("t")) == len(kept), timeout_s=10)
    released = node.released("t")
    assert sorted(b for b, _, _ in released) == sorted(kept)
    assert all(r >= d for _b, d, r in released)
    assert {d for b, d, _r in released if b != moved.body} == {at}
    assert [d for b, d, _r in released if b == moved.body] == [at + 50]
    await asyncio.sleep(0.1)
    assert len(node.bodies("t")) == len(kept)  # each once


async def test_cancel_inside_and_beyond_the_window(nodes: list[Node], tmp_path: Path) -> None:
    node = await _node(nodes, tmp_path / "d", window_ms=1000)
    await node.broker.create_topic("t", 1)
    now = node.timers.now_ms()
    near, far, kept = Message("t", b"near"), Message("t", b"far"), Message("t", b"kept")
    await node.delay.schedule([near, far, kept], [now + 300, now + 1800, now + 400])
    for m in (near, far):
        info = await node.delay.cancel(m.msg_id)
        assert info is not None and info.state is DelayState.CANCELLED
    again = await node.delay.cancel(near.msg_id)  # idempotent
    assert again is not None and again.state is DelayState.CANCELLED
    await wait_for(lambda: node.bodies("t") == [b"kept"])
    await asyncio.sleep(2.0)  # past the far one's time, through a window load
    assert node.bodies("t") == [b"kept"]
    late = await node.delay.cancel(kept.msg_id)
    assert late is not None and late.state is DelayState.DELIVERED
    assert await node.delay.cancel(b"\x01" * 16) is None


async def test_reschedule_earlier_and_later(nodes: list[Node], tmp_path: Path) -> None:
    node = await _node(nodes, tmp_path / "d", window_ms=1000)
    await node.broker.create_topic("t", 1)
    now = node.timers.now_ms()
    sooner, later = Message("t", b"sooner"), Message("t", b"later")
    await node.delay.schedule([sooner, later], [now + 5_000, now + 200])
    new_sooner, new_later = now + 300, now + 1200
    info = await node.delay.reschedule(sooner.msg_id, new_sooner)
    assert info is not None and info.deliver_at_ms == new_sooner
    await node.delay.reschedule(later.msg_id, new_later)
    await wait_for(lambda: node.bodies("t") == [b"sooner"])
    assert node.timers.now_ms() < new_later
    await wait_for(lambda: node.bodies("t") == [b"later", b"sooner"])
    by_body = {b: (d, r) for b, d, r in node.released("t")}
    assert by_body[b"sooner"][0] == new_sooner and by_body[b"later"][0] == new_later
    assert all(r >= d for d, r in by_body.values())
    done = await node.delay.reschedule(sooner.msg_id, now + 10_000)
    assert done is not None and done.state is DelayState.DELIVERED


async def test_pending_messages_survive_a_restart(nodes: list[Node], tmp_path: Path) -> None:
    data = tmp_path / "d"
    node = await _node(nodes, data)
    await node.broker.create_topic("orders", 1)
    now = node.timers.now_ms()
    await node.delay.schedule(
        [Message("orders", b"a"), Message("orders", b"b")], [now + 200, now + 900]
    )
    await wait_for(lambda: node.bodies("orders") == [b"a"])
    await _stop(nodes, node)

    again = await _node(nodes, data)
    assert await again.delay.store.pending() == 1
    assert again.bodies("orders") == [b"a"]
    await wait_for(lambda: again.bodies("orders") == [b"a", b"b"])
    await asyncio.sleep(0.2)
    assert again.bodies("orders") == [b"a", b"b"]


async def test_a_release_does_not_wait_for_the_mark_of_the_one_before(
    nodes: list[Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await _node(nodes, tmp_path / "d")
    await node.broker.create_topic("t", 1)
    gate = asyncio.Event()
    mark = node.delay.store.mark_delivered
    marked: list[bytes] = []

    async def slow_mark(msg_ids: list[bytes], released_at_ms: int) -> None:
        await gate.wait()  # the store's commit takes its time
        await mark(msg_ids, released_at_ms)
        marked.extend(msg_ids)

    monkeypatch.setattr(node.delay.store, "mark_delivered", slow_mark)
    now = node.timers.now_ms()
    first, second = Message("t", b"first"), Message("t", b"second")
    await node.delay.schedule([first, second], [now + 100, now + 300])
    await wait_for(lambda: node.bodies("t") == [b"first", b"second"])
    assert marked == []  # both released while the first mark was still under way
    stored = await node.delay.store.get(first.msg_id)
    assert stored is not None and stored.state is DelayState.SCHEDULED
    # In its topic: the API says delivered though the store's mark is not done, and a cancel
    # or a reschedule is too late.
    for answer in (
        await node.delay.get(first.msg_id),
        await node.delay.cancel(first.msg_id),
        await node.delay.reschedule(first.msg_id, now + 60_000),
    ):
        assert answer is not None and answer.state is DelayState.DELIVERED, answer
    gate.set()
    await wait_for(lambda: len(marked) == 2)
    for m in (first, second):
        info = await node.delay.get(m.msg_id)
        assert info is not None and info.state is DelayState.DELIVERED
    assert await node.delay.store.pending() == 0


async def test_a_failed_mark_is_tried_again_and_nothing_goes_out_twice(
    nodes: list[Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await _node(nodes, tmp_path / "d")
    await node.broker.create_topic("t", 1)
    mark = node.delay.store.mark_delivered
    failures = [DelayStoreUnavailable("disk I/O error")]

    async def flaky_mark(msg_ids: list[bytes], released_at_ms: int) -> None:
        if failures:
            raise failures.pop()
        await mark(msg_ids, released_at_ms)

    monkeypatch.setattr(node.delay.store, "mark_delivered", flaky_mark)
    msg = Message("t", b"once")
    await node.delay.schedule([msg], [node.timers.now_ms() + 100])
    await wait_for(lambda: node.bodies("t") == [b"once"])

    async def delivered() -> bool:  # in the store (the API says so from the release on)
        info = await node.delay.store.get(msg.msg_id)
        return info is not None and info.state is DelayState.DELIVERED

    for _ in range(300):
        if await delivered():
            break
        await asyncio.sleep(0.01)
    assert await delivered() and failures == []
    assert node.bodies("t") == [b"once"]
    assert await node.delay.cancel(msg.msg_id) is not None  # too late: stays delivered
    assert await delivered()


async def test_stop_waits_for_the_marks_of_what_was_released(
    nodes: list[Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await _node(nodes, tmp_path / "d")
    await node.broker.create_topic("t", 1)
    store = node.delay.store
    mark = store.mark_delivered

    async def slow_mark(msg_ids: list[bytes], released_at_ms: int) -> None:
        await asyncio.sleep(0.3)  # stop() comes meanwhile
        await mark(msg_ids, released_at_ms)

    monkeypatch.setattr(store, "mark_delivered", slow_mark)
    await node.delay.schedule([Message("t", b"x")], [node.timers.now_ms() + 50])
    await wait_for(lambda: node.bodies("t") == [b"x"])
    await _stop(nodes, node)
    assert await (await _node(nodes, tmp_path / "d")).delay.store.pending() == 0


async def test_a_release_whose_bookkeeping_was_lost_is_not_delivered_twice(
    nodes: list[Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d"
    node = await _node(nodes, data)
    await node.broker.create_topic("orders", 1)

    async def lost(msg_ids: object, released_at_ms: int) -> None:
        return None  # the process "dies" before the store hears of the release

    monkeypatch.setattr(node.delay.store, "mark_delivered", lost)
    [msg] = [Message("orders", b"once")]
    await node.delay.schedule([msg], [node.timers.now_ms() + 100])
    await wait_for(lambda: node.bodies("orders") == [b"once"])
    await _stop(nodes, node)

    again = await _node(nodes, data)
    for _ in range(300):  # re-released at start (the put finds the copy), then marked
        info = await again.delay.get(msg.msg_id)
        if info is not None and info.state is DelayState.DELIVERED:
            break
        await asyncio.sleep(0.01)
    assert info is not None and info.state is DelayState.DELIVERED
    assert again.bodies("orders") == [b"once"]


async def test_consumer_retry_with_a_backoff_survives_a_restart(
    nodes: list[Node], tmp_path: Path
) -> None:
    data = tmp_path / "d"
    node = await _node(nodes, data)
    await node.broker.create_topic("orders", 1)
    [put] = await node.broker.put([Message("orders", b"job")], check_duplicate=False)
    [d] = await node.broker.receive(
        "orders", "workers", max_messages=1, wait_ms=0, invisible_ms=30_000, tags=None
    )
    await node.broker.nack("orders", "workers", d.receipt, retry_after_ms=700)
    await _stop(nodes, node)

    again = await _node(nodes, data)
    early = await again.broker.receive(
        "orders", "workers", max_messages=1, wait_ms=0, invisible_ms=30_000, tags=None
    )
    assert early == []
    [d2] = await again.broker.receive(
        "orders", "workers", max_messages=1, wait_ms=3000, invisible_ms=30_000, tags=None
    )
    assert d2.message.origin_msg_id == put.msg_id.hex()
    assert d2.attempt == 2
    assert await again.broker.ack("orders", "workers", [d2.receipt]) == 1


async def test_copying_a_live_data_dir_keeps_scheduled_messages(
    nodes: list[Node], tmp_path: Path
) -> None:
    """What kill -9 leaves: files as written, no clean-stop marker."""
    live = tmp_path / "live"
    node = await _node(nodes, live)
    await node.broker.create_topic("orders", 1)
    now = node.timers.now_ms()
    await node.delay.schedule(
        [Message("orders", str(i).encode()) for i in range(50)], [now + 600 + i for i in range(50)]
    )
    crash = tmp_path / "crash"
    shutil.copytree(live, crash)
    (crash / "commitlog" / "clean_shutdown").unlink(missing_ok=True)
    again = await _node(nodes, crash)
    await wait_for(lambda: len(again.bodies("orders")) == 50)
    assert again.bodies("orders") == sorted(str(i).encode() for i in range(50))


async def test_a_resend_answers_the_time_it_was_first_scheduled_for(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = await _node(nodes, tmp_path / "d")
    now = node.timers.now_ms()
    first = Message("orders", b"once", msg_id=b"client-chosen-id")
    assert await node.delay.schedule([first], [now + 60_000]) == [now + 60_000]
    again = Message("orders", b"once", msg_id=b"client-chosen-id")
    fresh = Message("orders", b"other")
    times = await node.delay.schedule([again, fresh], [now + 90_000, now + 70_000])
    assert times == [now + 60_000, now + 70_000]  # the resend keeps its first time
    info = await node.delay.get(b"client-chosen-id")
    assert info is not None and info.deliver_at_ms == now + 60_000


async def test_after_the_wall_clock_steps_back_releases_wait_for_it_without_spinning(
    tmp_path: Path,
) -> None:
    """The timers hold a time as past once reached, even when the wall clock then steps back: a
    message due at such a time must wait for the clock (never early) without the timer firing
    again and again meanwhile."""
    t0 = epoch_ms()
    clock = [t0]
    timers = TimerService(clock=lambda: clock[0], max_sleep_ms=None)
    broker = Broker(BrokerConfig(data_dir=tmp_path / "d", segment_bytes=1 << 20), timers=timers)
    delay = DelayService(EmbeddedDelayStore(tmp_path / "d" / "delay.db"), broker.store, timers)
    fires = []
    fire = delay._fire

    def counted(*fired_for: int) -> None:
        fires.append(fired_for)
        fire(*fired_for)

    delay._fire = counted  # type: ignore[method-assign,assignment]
    timers.start()
    await broker.start()
    await delay.start()
    try:
        await broker.create_topic("orders", 1)
        clock[0] = t0 + 10_000
        reached = asyncio.get_running_loop().create_future()
        timers.call_at(clock[0], lambda: reached.set_result(None))
        await reached
        clock[0] = t0  # stepped back 10 s
        msg = Message("orders", b"at five")
        await delay.schedule([msg], [t0 + 5_000])
        await asyncio.sleep(0.1)
        assert broker.store.queue_bounds("orders", 0) == (0, 0)  # never early
        assert len(fires) < 5  # waiting, not spinning
        clock[0] = t0 + 5_000
        await wait_for(lambda: broker.store.queue_bounds("orders", 0) == (0, 1))
        released = broker.get_message(msg.msg_id)
        assert int(released.properties[PROP_RELEASED_AT]) >= t0 + 5_000
    finally:
        await delay.stop()
        await broker.stop()
        await timers.stop()


async def test_a_resend_whose_read_went_stale_during_the_release_is_not_released_twice(
    nodes: list[Node], tmp_path: Path
) -> None:
    """A resend of a scheduled id reads the stored message and arms it again; if the message
    was released and marked delivered while that read ran, the stale copy must not put it into
    its topic a second time (a consumer retry scheduled again after a crash did that: its
    copy then reached the dead-letter topic twice)."""
    node = await _node(nodes, tmp_path / "d")
    await node.broker.create_topic("orders", 1)
    msg_id = node.delay.new_msg_id()
    at = node.timers.now_ms() + 200
    await node.delay.schedule([Message("orders", b"once", msg_id=msg_id)], [at])
    store = node.delay.store
    read_due = store.due
    go = asyncio.Event()

    async def stale_due(msg_id: bytes) -> Any:
        due = await read_due(msg_id)  # read while still scheduled ...
        await go.wait()  # ... and handed back after the release and its mark
        return due

    store.due = stale_due  # type: ignore[method-assign]
    resend = asyncio.create_task(
        node.delay.schedule([Message("orders", b"once", msg_id=msg_id)], [at])
    )
    await asyncio.sleep(0.05)
    await wait_for(lambda: node.bodies("orders") == [b"once"])
    await wait_for(lambda: not node.delay._releasing)  # marked delivered in the store
    go.set()
    assert await resend == [at]
    await asyncio.sleep(0.3)
    assert node.bodies("orders") == [b"once"]
