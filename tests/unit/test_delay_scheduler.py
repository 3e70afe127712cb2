"""DelayScheduler: durable release at a time, idempotent by msg_id, surviving restarts; and the
consumer retries that go through it."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.message import PROP_DELIVER_AT, PROP_RELEASED_AT, Message
from delayserver.scheduler import DelayScheduler
from delayserver.timers import TimerService


class Node:
    """One broker + timers + scheduler over a data directory, as the app wires them."""

    def __init__(self, data: Path) -> None:
        self.timers = TimerService()
        self.broker = Broker(
            BrokerConfig(data_dir=data, segment_bytes=1 << 20, backoff_ms=(60_000,)),
            timers=self.timers,
        )
        self.scheduler = DelayScheduler(self.broker.store, self.timers)

    async def start(self) -> Node:
        self.timers.start()
        await self.broker.start()
        await self.scheduler.start()
        self.broker.scheduler = self.scheduler
        return self

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.broker.stop()
        await self.timers.stop()

    def bodies(self, topic: str) -> list[bytes]:
        store = self.broker.store
        out = []
        for q in range(store.topic(topic).queues):
            lo, hi = store.queue_bounds(topic, q)
            cq = store.consume_queue(topic, q)
            for i in range(lo, hi):
                m = store.read(cq.get(i)[0])
                assert m is not None
                out.append(m.body)
        return sorted(out)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    running: list[Node] = []
    yield running
    for n in running:
        await n.stop()


async def _node(nodes: list[Node], data: Path) -> Node:
    node = await Node(data).start()
    nodes.append(node)
    return node


async def _wait_for(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_released_on_time_into_the_real_topic_with_the_same_id(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = await _node(nodes, tmp_path / "d")
    await node.broker.create_topic("orders", 2)
    msg = Message("orders", b"later", keys=("k1",))
    at = node.timers.now_ms() + 300
    await node.scheduler.schedule([msg], [at])
    assert msg.msg_id, "the scheduler assigns the id the client gets back"
    assert node.bodies("orders") == []
    await _wait_for(lambda: node.bodies("orders") == [b"later"])
    released = node.broker.get_message(msg.msg_id)
    assert released.topic == "orders" and released.keys == ("k1",)
    assert int(released.properties[PROP_DELIVER_AT]) == at
    assert int(released.properties[PROP_RELEASED_AT]) >= at  # never early
    assert node.scheduler.pending == 0


async def test_pending_messages_survive_a_restart(nodes: list[Node], tmp_path: Path) -> None:
    data = tmp_path / "d"
    node = await _node(nodes, data)
    await node.broker.create_topic("orders", 1)
    now = node.timers.now_ms()
    await node.scheduler.schedule(
        [Message("orders", b"a"), Message("orders", b"b")], [now + 200, now + 900]
    )
    await _wait_for(lambda: node.bodies("orders") == [b"a"])
    nodes.remove(node)
    await node.stop()

    again = await _node(nodes, data)
    assert again.scheduler.pending == 1
    assert again.bodies("orders") == [b"a"]
    await _wait_for(lambda: again.bodies("orders") == [b"a", b"b"])
    await asyncio.sleep(0.2)
    assert again.bodies("orders") == [b"a", b"b"]


async def test_a_release_whose_bookkeeping_was_lost_is_not_delivered_twice(
    nodes: list[Node], tmp_path: Path
) -> None:
    data = tmp_path / "d"
    node = await _node(nodes, data)
    await node.broker.create_topic("orders", 1)
    await node.scheduler.schedule([Message("orders", b"once")], [node.timers.now_ms() + 100])
    await _wait_for(lambda: node.bodies("orders") == [b"once"])
    nodes.remove(node)
    await node.stop()
    # As if the process died after the release but before the watermark moved.
    (data / "delay_state.json").write_text('{"watermark": 0}')
    again = await _node(nodes, data)
    await asyncio.sleep(0.3)
    assert again.bodies("orders") == [b"once"]
    assert again.scheduler.pending == 0


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
    nodes.remove(node)
    await node.stop()

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
    """What kill -9 leaves: files as written, no clean-stop marker, watermark possibly behind."""
    live = tmp_path / "live"
    node = await _node(nodes, live)
    await node.broker.create_topic("orders", 1)
    now = node.timers.now_ms()
    await node.scheduler.schedule(
        [Message("orders", str(i).encode()) for i in range(50)], [now + 400 + i for i in range(50)]
    )
    crash = tmp_path / "crash"
    shutil.copytree(live, crash)
    (crash / "commitlog" / "clean_shutdown").unlink(missing_ok=True)
    again = await _node(nodes, crash)
    await _wait_for(lambda: len(again.bodies("orders")) == 50)
    assert again.bodies("orders") == sorted(str(i).encode() for i in range(50))
