"""The delay service, the broker and the coordinator with a release target other than the
embedded one: releases go to the target (with DELIVER_AT/RELEASED_AT), a target that refuses
keeps them waiting and they are retried until it takes them, plain sends go to the target, and
receiving here is refused naming the target."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.errors import ConsumeOnTarget
from broker_core.message import Message
from delayserver.embedded import EmbeddedDelayStore
from delayserver.service import DelayService
from delayserver.store import DelayState
from delayserver.targets import TargetUnavailable
from delayserver.timers import TimerService
from txcoord.coordinator import Coordinator


class FlakyTarget:
    """Refuses while ``down``; otherwise keeps what it is given."""

    kind = "fake"

    def __init__(self) -> None:
        self.down = False
        self.refused = 0
        self.got: list[Message] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, messages: Sequence[Message], *, check_duplicate: bool) -> None:
        if self.down:
            self.refused += 1
            raise TargetUnavailable("fake target: down for the test")
        self.got.extend(messages)

    async def health(self) -> str | None:
        return "fake target: down for the test" if self.down else None

    def describe(self, topic: str) -> str:
        return f"fake subject x.{topic}"


class Node:
    def __init__(self, data: Path) -> None:
        self.timers = TimerService(max_sleep_ms=None)
        self.broker = Broker(BrokerConfig(data_dir=data, segment_bytes=1 << 20), timers=self.timers)
        self.target = FlakyTarget()
        self.delay = DelayService(
            EmbeddedDelayStore(data / "delay.db"),
            self.broker.store,
            self.timers,
            target=self.target,
        )
        self.broker.outlet = self.target
        self.tx = Coordinator(data / "tx.db", self.broker.store, self.delay, self.timers)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(tmp_path)
    n.timers.start()
    await n.broker.start()
    await n.delay.start()
    n.broker.scheduler = n.delay
    await n.tx.start()
    yield n
    await n.tx.stop()
    await n.delay.stop()
    await n.broker.stop()
    await n.timers.stop()


async def _until(check: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_releases_go_to_the_target_and_wait_while_it_is_down(node: Node) -> None:
    now = node.timers.now_ms()
    msgs = [Message("orders", f"m{i}".encode()) for i in range(10)]
    await node.delay.schedule(msgs, [now + 100] * 10)
    node.target.down = True
    await _until(lambda: node.target.refused >= 2, 5)  # tried, refused, tried again
    assert node.target.got == []
    info = await node.delay.get(msgs[0].msg_id)
    assert info is not None and info.state is DelayState.SCHEDULED  # still waiting, not lost
    node.target.down = False
    await _until(lambda: len(node.target.got) == 10, 5)
    assert sorted(m.body for m in node.target.got) == sorted(m.body for m in msgs)
    for m in node.target.got:
        assert int(m.properties["RELEASED_AT"]) >= int(m.properties["DELIVER_AT"]) == now + 100
    deadline = time.monotonic() + 5  # marked delivered right after the publish
    while (
        info := await node.delay.get(msgs[-1].msg_id)
    ) and info.state is not DelayState.DELIVERED:
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.01)
    assert node.broker.store.topics.get("orders") is None  # nothing kept here


async def test_plain_sends_go_to_the_target_and_receiving_here_is_refused(node: Node) -> None:
    topic = await node.broker.resolve_topic("fresh")  # exists in the target, not here
    assert topic.name == "fresh" and "fresh" not in node.broker.store.topics
    [result] = await node.broker.put([Message("fresh", b"now")], check_duplicate=False)
    assert node.target.got[0].msg_id == result.msg_id != b""
    node.target.down = True
    with pytest.raises(TargetUnavailable, match="down for the test"):
        await node.broker.put([Message("fresh", b"refused")], check_duplicate=False)
    with pytest.raises(ConsumeOnTarget, match=r"fake subject x\.<topic>"):
        await node.broker.receive("fresh", "g", max_messages=1, wait_ms=0, invisible_ms=1000)


async def test_a_committed_transaction_goes_to_the_target(node: Node) -> None:
    await node.broker.create_topic("orders")  # the prepare step checks the local topic
    msg = Message("orders", b"paid")
    msg.msg_id = node.delay.new_msg_id()
    row = await node.tx.prepare(
        msg, deliver_at_ms=0, producer_group="shop", check_url=None, check_immunity_ms=None
    )
    await node.tx.commit(row.tx_id)
    await _until(lambda: len(node.target.got) == 1, 5)
    assert node.target.got[0].body == b"paid"


class PickyTarget(FlakyTarget):
    """Takes every message but those for topic ``nowhere`` (a subject no stream captures),
    saying which it took, as the NATS and RabbitMQ targets do."""

    async def publish(self, messages: Sequence[Message], *, check_duplicate: bool) -> None:
        taken = [m for m in messages if m.topic != "nowhere"]
        self.got.extend(taken)
        if len(taken) < len(messages):
            self.refused += 1
            raise TargetUnavailable(
                "fake target: nothing captures nowhere",
                acknowledged=frozenset(m.msg_id for m in taken),
            )


async def test_a_message_the_target_refuses_holds_back_no_other(node: Node) -> None:
    """One due message the target will not take (its topic routed nowhere) keeps waiting; the
    others released with it are recorded delivered and published once, not at every retry."""
    node.target = node.delay.target = PickyTarget()
    now = node.timers.now_ms()
    stuck = Message("nowhere", b"stuck")
    msgs = [Message("orders", f"m{i}".encode()) for i in range(5)]
    await node.delay.schedule([stuck, *msgs], [now + 50] * 6)
    await _until(lambda: node.target.refused >= 3, 10)  # retried a few times meanwhile
    later = Message("orders", b"later")
    await node.delay.schedule([later], [node.timers.now_ms() + 50])
    await _until(lambda: any(m.body == b"later" for m in node.target.got), 10)
    assert sorted(m.body for m in node.target.got) == [b"later", b"m0", b"m1", b"m2", b"m3", b"m4"]
    for m in [*msgs, later]:
        info = await node.delay.get(m.msg_id)
        assert info is not None and info.state is DelayState.DELIVERED, info
    info = await node.delay.get(stuck.msg_id)
    assert info is not None and info.state is DelayState.SCHEDULED  # waiting, not lost
