"""Check-backs through a :class:`~txcoord.coordinator.CheckChannel` (how the RocketMQ protocol's
Telemetry streams reach producers): the channel gets the claimed transactions with their half
message, other groups stay on the SDK long poll, answers decide, and an unanswered push counts
and parks at ``check_max`` exactly like the other channels."""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker_core.message import Message
from tests.unit import test_coordinator
from tests.unit.broker_helpers import wait_for
from tests.unit.test_coordinator import FAST, Node, _node
from txcoord.coordinator import TxRow
from txcoord.states import TxEvent, TxState

#: The coordinator tests' fixture: started nodes, stopped after the test.
nodes = test_coordinator.nodes


class Channel:
    def __init__(self) -> None:
        self.pushed: list[tuple[TxRow, Message | None]] = []
        self.arrived = asyncio.Event()

    def claims(self, producer_group: str) -> bool:
        return producer_group.startswith("stream:")

    def push(self, row: TxRow, message: Message | None) -> None:
        self.pushed.append((row, message))
        self.arrived.set()

    async def next(self) -> tuple[TxRow, Message | None]:
        await asyncio.wait_for(self.arrived.wait(), 5)
        self.arrived.clear()
        return self.pushed[-1]


async def with_channel(nodes: list[Node], tmp_path: Path) -> tuple[Node, Channel]:
    node = await _node(nodes, tmp_path / "d")
    channel = Channel()
    node.tx.check_channels.append(channel)
    return node, channel


async def test_claimed_checks_are_pushed_with_the_half_message(
    nodes: list[Node], tmp_path: Path
) -> None:
    node, channel = await with_channel(nodes, tmp_path)
    tx_id = await node.prepare(b"pushed", group="stream:client-1", keys=("k1",))
    row, message = await channel.next()
    assert (row.tx_id, row.topic, row.check_count) == (tx_id, "orders", 0)
    assert message is not None and (message.body, message.keys) == (b"pushed", ("k1",))
    # Not on the SDK's long poll as well.
    assert await node.tx.poll_checks("stream:client-1", max_n=10, wait_ms=50) == []
    assert (await node.tx.answer(tx_id, TxEvent.COMMIT)).state is TxState.COMMITTED
    assert node.bodies("orders") == [b"pushed"]


async def test_unclaimed_groups_stay_on_the_long_poll(nodes: list[Node], tmp_path: Path) -> None:
    node, channel = await with_channel(nodes, tmp_path)
    tx_id = await node.prepare(b"polled", group="svc")
    checks = await node.tx.poll_checks("svc", max_n=10, wait_ms=3000)
    assert [c["tx_id"] for c in checks] == [tx_id]
    assert channel.pushed == []


async def test_unanswered_pushes_count_and_park_at_check_max(
    nodes: list[Node], tmp_path: Path
) -> None:
    node, channel = await with_channel(nodes, tmp_path)
    tx_id = await node.prepare(b"ignored", group="stream:gone")
    # Each unanswered push counts once the check timeout (300 ms) has passed.
    await wait_for(lambda: len(channel.pushed) >= FAST.check_max, timeout_s=15)
    row = await node.tx.get(tx_id)
    for _ in range(100):  # the last count is being written
        if row.state is TxState.CHECK_MAX:
            break
        await asyncio.sleep(0.05)
        row = await node.tx.get(tx_id)
    assert (row.state, row.check_count) == (TxState.CHECK_MAX, FAST.check_max)
    # Asked once per count, each time with the count so far; never two at once.
    assert [r.check_count for r, _ in channel.pushed] == list(range(FAST.check_max))
    assert node.bodies("orders") == []


async def test_an_unknown_answer_counts_and_asks_again(nodes: list[Node], tmp_path: Path) -> None:
    node, channel = await with_channel(nodes, tmp_path)
    tx_id = await node.prepare(b"later", group="stream:c")
    await channel.next()
    assert (await node.tx.answer(tx_id, TxEvent.UNKNOWN)).check_count == 1
    row, _ = await channel.next()
    assert row.check_count == 1
    assert (await node.tx.answer(tx_id, TxEvent.ROLLBACK)).state is TxState.ROLLED_BACK
    assert node.bodies("orders") == []
