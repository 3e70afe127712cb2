"""Consumer groups on a real store with a manual clock and an in-memory scheduler: receipts,
invisibility, ack / nack, retries and dead letters, FIFO, tag filters, long polling, lag, replay
and offsets across restarts."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_core.broker import Broker
from broker_core.errors import (
    GroupExists,
    GroupNotFound,
    InvalidGroup,
    InvalidReceipt,
    InvalidRequest,
    ReceiptExpired,
    ReceiptMismatch,
    TopicNotFound,
)
from broker_core.groups import Delivery, Pending, ReceiptFailure, parse_tags
from broker_core.message import (
    PROP_DELIVERY_ATTEMPT,
    PROP_DLQ_ORIGIN_TOPIC,
    PROP_ORIGIN_MSG_ID,
    PROP_RETRY_TOPIC,
)
from delayserver.timers import TimerService
from tests.unit.broker_helpers import (
    T0_MS,
    FakeScheduler,
    FakeTimers,
    RealTimers,
    msg,
    no_hang,
    settle,
    small_config,
)

S = 1000
INVISIBLE_MS = 30 * S


class Env:
    """One broker on a tmp dir with a manual clock and a recording scheduler; restartable."""

    def __init__(self, data_dir: Path, timers: Any = None, **config: Any) -> None:
        self.data_dir = data_dir
        self.config = config
        self.timers = timers if timers is not None else FakeTimers()
        self.scheduler = FakeScheduler()
        self.broker: Broker | None = None

    async def start(self) -> Broker:
        self.broker = Broker(
            small_config(self.data_dir, **self.config),
            timers=self.timers,
            scheduler=self.scheduler,
        )
        await self.broker.start()
        return self.broker

    async def stop(self) -> None:
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await broker.stop()

    async def restart(self) -> Broker:
        await self.stop()
        return await self.start()

    @property
    def b(self) -> Broker:
        assert self.broker is not None
        return self.broker

    async def advance(self, ms: int) -> None:
        """Move the clock, run due timers and let the redeliveries they start finish."""
        self.timers.advance(ms)
        await settle(self.b)

    async def release(self) -> int:
        """The scheduler puts every retry that is due by now into its topic."""
        return await self.scheduler.release(self.b.store, self.timers.now_ms())

    async def send(self, topic: str, *bodies: str, **kw: Any) -> list[bytes]:
        results = await self.b.put([msg(topic, b, **kw) for b in bodies], check_duplicate=False)
        return [r.msg_id for r in results]

    async def recv(
        self,
        topic: str = "orders",
        group: str = "g",
        n: int = 32,
        *,
        invisible_ms: int = INVISIBLE_MS,
        tags: str | None = None,
        wait_ms: int = 0,
    ) -> list[Delivery]:
        return await self.b.receive(
            topic,
            group,
            max_messages=n,
            wait_ms=wait_ms,
            invisible_ms=invisible_ms,
            tags=parse_tags(tags),
        )

    async def ack(self, *ds: Delivery, topic: str = "orders", group: str = "g") -> int:
        return await self.b.ack(topic, group, [d.receipt for d in ds])

    async def nack(
        self,
        d: Delivery,
        retry_after_ms: int | None = None,
        topic: str = "orders",
        group: str = "g",
    ) -> None:
        await self.b.nack(topic, group, d.receipt, retry_after_ms)

    def dlq(self, group: str = "g") -> list[Any]:
        """Messages in ``%DLQ%<group>``, read straight from the store."""
        store = self.b.store
        name = f"%DLQ%{group}"
        if name not in store.topics:
            return []
        cq = store.consume_queue(name, 0)
        return [store.read(cq.get(i)[0]) for i in range(cq.min_offset, cq.max_offset)]


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    with no_hang(10):
        yield


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path / "data")
    await e.start()
    await e.b.create_topic("orders", 1)
    yield e
    await e.stop()


def bodies(ds: list[Delivery]) -> list[bytes]:
    return [d.message.body for d in ds]


def ids(ds: list[Delivery]) -> list[str]:
    return [d.message.origin_msg_id for d in ds]


# -- receive / ack -------------------------------------------------------------------------------


async def test_receive_returns_receipts_and_first_attempt(env: Env) -> None:
    sent = await env.send("orders", "a", "b", "c")
    got = await env.recv()
    assert bodies(got) == [b"a", b"b", b"c"]
    assert ids(got) == [m.hex() for m in sent]
    assert all(d.attempt == 1 for d in got)
    assert len({d.receipt for d in got}) == 3
    assert all(isinstance(d.receipt, str) and d.receipt for d in got)


async def test_max_messages_limits_a_batch(env: Env) -> None:
    await env.send("orders", *[f"m{i}" for i in range(10)])
    assert bodies(await env.recv(n=4)) == [b"m0", b"m1", b"m2", b"m3"]
    assert bodies(await env.recv(n=4)) == [b"m4", b"m5", b"m6", b"m7"]


async def test_messages_out_are_invisible_to_a_second_receive(env: Env) -> None:
    await env.send("orders", "a", "b")
    first = await env.recv()
    assert len(first) == 2
    assert await env.recv() == []
    await env.send("orders", "c")
    assert bodies(await env.recv()) == [b"c"]


async def test_receive_on_unknown_topic(env: Env) -> None:
    with pytest.raises(TopicNotFound):
        await env.recv(topic="nope")


async def test_ack_removes_and_double_ack_is_expired(env: Env) -> None:
    await env.send("orders", "a", "b")
    a, b = await env.recv()
    assert await env.ack(a) == 1
    with pytest.raises(ReceiptExpired):
        await env.ack(a)
    # The same receipt twice in one call counts once.
    assert await env.b.ack("orders", "g", [b.receipt, b.receipt]) == 1
    # Nothing comes back, even after the invisibility time.
    await env.advance(INVISIBLE_MS + 1)
    await env.release()
    assert await env.recv() == []
    assert env.scheduler.scheduled == []


async def test_ack_with_one_malformed_receipt_acks_none(env: Env) -> None:
    await env.send("orders", "a")
    [a] = await env.recv()
    with pytest.raises(InvalidReceipt, match="garbage"):
        await env.b.ack("orders", "g", [a.receipt, "garbage"])
    assert await env.ack(a) == 1


async def test_ack_with_stale_receipts_acks_the_others_and_says_why_per_receipt(env: Env) -> None:
    await env.send("orders", "a", "b", "c")
    a, b, c = await env.recv()
    other, *_ = await env.recv(group="g2")
    assert await env.ack(a) == 1
    failed: list[ReceiptFailure] = []
    receipts: list[object] = [a.receipt, b.receipt, other.receipt, c.receipt]
    assert await env.b.ack("orders", "g", receipts, failed=failed) == 2
    assert [(f.receipt, f.error) for f in failed] == [
        (a.receipt, "receipt_expired"),
        (other.receipt, "receipt_mismatch"),
    ]
    assert "'g2'" in failed[1].message and "'orders'" in failed[1].message
    await env.advance(INVISIBLE_MS + 1)
    await env.release()
    assert await env.recv() == []  # b and c were acked


async def test_nack_all_gives_back_what_it_can(env: Env) -> None:
    await env.send("orders", "a", "b")
    a, b = await env.recv()
    assert await env.ack(a) == 1
    failed: list[ReceiptFailure] = []
    assert await env.b.nack_all("orders", "g", [a.receipt, b.receipt], 0, failed) == 1
    assert [(f.receipt, f.error) for f in failed] == [(a.receipt, "receipt_expired")]
    await env.release()
    [again] = await env.recv()
    assert (again.message.body, again.attempt) == (b"b", 2)


@pytest.mark.parametrize(
    "receipt", ["", "garbage", "1-2-3", "zz-0-0-1", "1-0-0-1-5", "a-b-c-d", "1--2-3", " 1-0-0-1"]
)
async def test_malformed_receipt_is_invalid(env: Env, receipt: str) -> None:
    await env.send("orders", "a")
    await env.recv()
    with pytest.raises(InvalidReceipt):
        await env.b.ack("orders", "g", [receipt])
    with pytest.raises(InvalidReceipt):
        await env.b.nack("orders", "g", receipt, None)


@pytest.mark.parametrize("receipt", ["0-0-0-0", "ffffffff-99-0-1"])
async def test_well_formed_unknown_receipt_is_expired(env: Env, receipt: str) -> None:
    await env.send("orders", "a")
    await env.recv()
    with pytest.raises(ReceiptExpired):
        await env.b.ack("orders", "g", [receipt])
    with pytest.raises(ReceiptExpired):
        await env.b.nack("orders", "g", receipt, None)


async def test_non_string_receipt_is_invalid(env: Env) -> None:
    await env.recv()
    with pytest.raises(InvalidReceipt):
        await env.b.ack("orders", "g", [17])


async def test_receipt_of_another_group_names_its_group(env: Env) -> None:
    await env.send("orders", "a")
    [a] = await env.recv(group="g1")
    [also] = await env.recv(group="g2")  # each group gets every message
    assert also.message.body == b"a"
    await env.ack(also, group="g2")
    with pytest.raises(ReceiptMismatch, match="group 'g1' on topic 'orders'"):
        await env.ack(a, group="g2")
    assert await env.ack(a, group="g1") == 1


# -- nack / retries ------------------------------------------------------------------------------


async def test_nack_schedules_a_retry_after_the_backoff(env: Env) -> None:
    [sent] = await env.send("orders", "a")
    [d] = await env.recv()
    now = env.timers.now_ms()
    await env.nack(d)
    [(copy, at)] = env.scheduler.scheduled
    assert at == now + 10 * S
    assert copy.topic == "%RETRY%g+orders"
    assert copy.properties[PROP_ORIGIN_MSG_ID] == sent.hex()
    assert copy.reconsume_count == 1
    with pytest.raises(ReceiptExpired):
        await env.ack(d)
    assert await env.recv() == []  # not before the backoff
    assert await env.release() == 0
    await env.advance(10 * S)
    assert await env.release() == 1
    [again] = await env.recv()
    assert again.message.origin_msg_id == sent.hex()
    assert again.message.body == b"a"
    assert again.attempt == 2
    assert again.message.properties[PROP_RETRY_TOPIC] == "orders"
    assert await env.ack(again) == 1
    assert await env.recv() == []


async def test_nack_with_retry_after_ms(env: Env) -> None:
    await env.send("orders", "a")
    [d] = await env.recv()
    now = env.timers.now_ms()
    await env.nack(d, retry_after_ms=2500)
    [(_, at)] = env.scheduler.scheduled
    assert at == now + 2500


async def test_nack_with_zero_retry_after_is_back_at_once(env: Env) -> None:
    [sent] = await env.send("orders", "a")
    [d] = await env.recv()
    await env.nack(d, retry_after_ms=0)
    assert env.scheduler.scheduled == []  # nothing to wait for
    [again] = await env.recv()
    assert (again.message.origin_msg_id, again.attempt) == (sent.hex(), 2)


async def test_double_nack_is_expired(env: Env) -> None:
    await env.send("orders", "a")
    [d] = await env.recv()
    await env.nack(d)
    with pytest.raises(ReceiptExpired):
        await env.nack(d)
    assert len(env.scheduler.scheduled) == 1


async def test_backoff_grows_with_each_attempt(env: Env) -> None:
    await env.send("orders", "a")
    waits = []
    for attempt in (1, 2, 3):
        [d] = await env.recv()
        assert d.attempt == attempt
        now = env.timers.now_ms()
        await env.nack(d)
        [(_, at)] = env.scheduler.scheduled
        waits.append(at - now)
        await env.advance(at - now)
        assert await env.release() == 1
    assert waits == [10 * S, 30 * S, 60 * S]


async def test_invisibility_timeout_redelivers(env: Env) -> None:
    [sent] = await env.send("orders", "a")
    [d] = await env.recv(invisible_ms=5 * S)
    await env.advance(5 * S - 1)
    assert env.scheduler.scheduled == []
    await env.advance(1)
    [(copy, at)] = env.scheduler.scheduled
    assert at == env.timers.now_ms() + 10 * S
    assert copy.properties[PROP_ORIGIN_MSG_ID] == sent.hex()
    with pytest.raises(ReceiptExpired):
        await env.ack(d)  # too late
    await env.advance(10 * S)
    await env.release()
    [again] = await env.recv()
    assert (again.message.origin_msg_id, again.attempt) == (sent.hex(), 2)


async def test_acked_before_timeout_is_not_redelivered(env: Env) -> None:
    await env.send("orders", "a")
    [d] = await env.recv(invisible_ms=5 * S)
    await env.ack(d)
    await env.advance(60 * S)
    assert env.scheduler.scheduled == []


def _deliveries_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Pending)


async def test_acknowledged_deliveries_leave_nothing_for_the_collector(env: Env) -> None:
    """An acked delivery's state is freed at once, not kept until its invisibility deadline:
    kept, every message received in the last ``invisible_ms`` was walked by each full
    collection (40-70 ms pauses of the event loop at 4,000 messages a second)."""
    # Counted in the whole process: an earlier test in this worker may have left some alive.
    before = _deliveries_alive()
    await env.send("orders", *[f"m{i}" for i in range(300)])
    got = []
    for _ in range(10):
        got += await env.recv(n=30)
    assert len(got) == 300
    assert _deliveries_alive() == before + 300
    await env.ack(*got)
    del got
    assert _deliveries_alive() == before
    await env.advance(INVISIBLE_MS + 1)
    assert env.scheduler.scheduled == []


async def test_invisibility_deadlines_fire_in_time_order_whatever_the_receive_order(
    env: Env,
) -> None:
    await env.send("orders", "late", "early", "middle")
    [late] = await env.recv(n=1, invisible_ms=9 * S)
    [early] = await env.recv(n=1, invisible_ms=2 * S)
    [middle] = await env.recv(n=1, invisible_ms=5 * S)
    order = []
    for step in (2 * S, 3 * S, 4 * S):
        await env.advance(step)
        order += [c.body for c, _ in env.scheduler.scheduled[len(order) :]]
    assert order == [b"early", b"middle", b"late"]
    for d in (late, early, middle):
        with pytest.raises(ReceiptExpired):
            await env.ack(d)


async def test_part_of_a_batch_acked_only_the_rest_times_out(env: Env) -> None:
    await env.send("orders", "a", "b", "c")
    a, _b, c = await env.recv(invisible_ms=5 * S)
    await env.ack(a, c)
    await env.advance(5 * S)
    assert [m.body for m, _ in env.scheduler.scheduled] == [b"b"]


async def test_a_delivery_given_more_time_does_not_time_out_at_its_first_deadline(
    env: Env,
) -> None:
    await env.send("orders", "a")
    [d] = await env.recv(invisible_ms=2 * S)
    receipt = await env.b.change_invisible("orders", "g", d.receipt, 20 * S)
    await env.advance(2 * S)
    await env.release()
    assert env.scheduler.scheduled == []
    assert await env.recv() == []
    await env.advance(18 * S)
    await env.release()
    [again] = await env.recv()
    assert (again.message.body, again.attempt) == (b"a", 2)
    with pytest.raises(ReceiptExpired):
        await env.b.ack("orders", "g", [receipt])


async def test_deadlines_of_a_deleted_group_do_nothing(env: Env) -> None:
    await env.b.create_group("gone", fifo=False, max_attempts=16)
    await env.send("orders", "a")
    await env.recv(group="gone", invisible_ms=2 * S)
    await env.b.delete_group("gone")
    await env.advance(3 * S)
    assert env.scheduler.scheduled == []


async def test_deadlines_follow_the_timers_after_the_wall_clock_stepped_back(
    tmp_path: Path,
) -> None:
    """The timers hold a time as past once they reached it, even if the wall clock then steps
    back: a deadline at such a time fires at once, and must expire its deliveries then rather
    than arm the timer again at a time that is due at once, without end."""
    clock = [T0_MS]
    timers = TimerService(clock=lambda: clock[0])
    e = Env(tmp_path / "data", timers=timers)
    await e.start()
    timers.start()
    try:
        await e.b.create_topic("orders", 1)
        await e.send("orders", "a")
        clock[0] = T0_MS + 10 * S
        reached = asyncio.get_running_loop().create_future()
        timers.call_at(clock[0], lambda: reached.set_result(None))
        await reached
        clock[0] = T0_MS  # stepped back 10 s
        [d] = await e.recv(invisible_ms=2 * S)  # due by the timers' time already
        for _ in range(50):
            if e.scheduler.scheduled:
                break
            await asyncio.sleep(0)
        assert [m.body for m, _ in e.scheduler.scheduled] == [b"a"]
        assert timers.pending == 0  # no timer armed again and again
        with pytest.raises(ReceiptExpired):
            await e.ack(d)
    finally:
        await timers.stop()
        await e.stop()


async def test_a_stopped_broker_leaves_no_deadline_acting_on_its_closed_store(env: Env) -> None:
    """The timers outlive a stopped broker: its invisibility deadlines must not fire on its
    closed store (each failure there armed a retry a second later, forever); the deliveries
    come back once, from the broker that restored them."""
    await env.send("orders", "a", "b")
    await env.recv(invisible_ms=2 * S)
    old = env.b
    await env.restart()
    await env.advance(3 * S)
    await settle(old)
    assert sorted(m.body for m, _ in env.scheduler.scheduled) == [b"a", b"b"]
    assert env.timers.pending() == []
    await env.advance(5 * S)
    assert len(env.scheduler.scheduled) == 2


async def test_dead_letter_after_max_attempts(env: Env) -> None:
    await env.b.create_group("three", fifo=False, max_attempts=3)
    [sent] = await env.send("orders", "a", keys=["order-1"])
    for attempt in (1, 2, 3):
        [d] = await env.recv(group="three")
        assert d.attempt == attempt
        assert d.message.origin_msg_id == sent.hex()
        await env.nack(d, group="three")
        if attempt < 3:
            await env.advance(3600 * S)
            assert await env.release() == 1
    assert env.scheduler.scheduled == []
    assert await env.recv(group="three") == []
    [dead] = env.dlq("three")
    assert dead.topic == "%DLQ%three"
    assert dead.body == b"a"
    assert dead.keys == ("order-1",)
    assert dead.properties[PROP_ORIGIN_MSG_ID] == sent.hex()
    assert dead.properties[PROP_DLQ_ORIGIN_TOPIC] == "orders"
    assert dead.origin_msg_id == sent.hex()
    # The message is still found by its id, in its own topic.
    assert env.b.get_message(sent).topic == "orders"


async def test_a_group_reading_a_dlq_starts_at_its_own_first_attempt(env: Env) -> None:
    """Dead letters are read "like any topic": another group's deliveries count from 1 (the
    dead group's count stays in DELIVERY_ATTEMPT), so its first nack is a retry, not a dead
    letter of its own."""
    await env.b.create_group("two", fifo=False, max_attempts=2)
    await env.b.create_group("inspect", fifo=False, max_attempts=2)
    await env.send("orders", "a")
    for _ in range(2):
        [d] = await env.recv(group="two")
        await env.nack(d, retry_after_ms=0, group="two")
    [dead] = env.dlq("two")
    assert dead.properties[PROP_DELIVERY_ATTEMPT] == "2"
    [d] = await env.recv("%DLQ%two", group="inspect")
    assert d.attempt == 1
    await env.nack(d, retry_after_ms=0, topic="%DLQ%two", group="inspect")
    assert env.dlq("inspect") == []
    [again] = await env.recv("%DLQ%two", group="inspect")
    assert again.attempt == 2


async def test_invisibility_timeouts_also_lead_to_the_dlq(env: Env) -> None:
    await env.b.create_group("two", fifo=False, max_attempts=2)
    [sent] = await env.send("orders", "a")
    [d] = await env.recv(group="two", invisible_ms=1000)
    await env.advance(1000)
    await env.advance(10 * S)
    assert await env.release() == 1
    [d] = await env.recv(group="two", invisible_ms=1000)
    assert d.attempt == 2
    await env.advance(1000)
    [dead] = env.dlq("two")
    assert dead.properties[PROP_ORIGIN_MSG_ID] == sent.hex()


async def test_a_slow_message_does_not_block_the_others(env: Env) -> None:
    await env.send("orders", "slow", "m1", "m2", "m3")
    [slow] = await env.recv(n=1)
    assert slow.message.body == b"slow"
    for expected in (b"m1", b"m2", b"m3"):
        [d] = await env.recv(n=1)
        assert d.message.body == expected
        await env.ack(d)
    stats = await env.b.group_stats("orders", "g")
    assert stats["inflight"] == 1
    assert await env.ack(slow) == 1


# -- FIFO ----------------------------------------------------------------------------------------


@pytest.fixture
async def fifo(env: Env) -> Env:
    await env.b.create_group("f", fifo=True, max_attempts=3)
    return env


async def test_fifo_yields_the_next_message_only_after_an_ack(fifo: Env) -> None:
    await fifo.send("orders", "m0", "m1", "m2")
    [d0] = await fifo.recv(group="f")
    assert d0.message.body == b"m0"
    assert await fifo.recv(group="f") == []
    await fifo.ack(d0, group="f")
    [d1] = await fifo.recv(group="f")
    assert d1.message.body == b"m1"
    await fifo.ack(d1, group="f")
    assert bodies(await fifo.recv(group="f")) == [b"m2"]


async def test_fifo_queues_are_independent(tmp_path: Path) -> None:
    e = Env(tmp_path / "data")
    await e.start()
    try:
        await e.b.create_topic("orders", 2)
        await e.b.create_group("f", fifo=True, max_attempts=3)
        await e.send("orders", "q0-a", "q0-b", queue_id=0)
        await e.send("orders", "q1-a", "q1-b", queue_id=1)
        got = await e.recv(group="f")
        assert sorted(bodies(got)) == [b"q0-a", b"q1-a"]
        await e.ack(*[d for d in got if d.message.body == b"q1-a"], group="f")
        assert bodies(await e.recv(group="f")) == [b"q1-b"]
    finally:
        await e.stop()


async def test_fifo_failure_is_redelivered_in_place_before_later_messages(fifo: Env) -> None:
    [m0, _m1] = await fifo.send("orders", "m0", "m1")
    [d] = await fifo.recv(group="f")
    await fifo.nack(d, group="f")
    assert fifo.scheduler.scheduled == []  # FIFO keeps it in place, no retry topic
    assert await fifo.recv(group="f") == []
    await fifo.advance(10 * S - 1)
    assert await fifo.recv(group="f") == []
    await fifo.advance(1)
    [again] = await fifo.recv(group="f")
    assert (again.message.msg_id, again.message.body, again.attempt) == (m0, b"m0", 2)
    with pytest.raises(ReceiptExpired):
        await fifo.ack(d, group="f")
    assert await fifo.recv(group="f") == []
    await fifo.ack(again, group="f")
    assert bodies(await fifo.recv(group="f")) == [b"m1"]


async def test_fifo_invisibility_timeout_redelivers_in_place(fifo: Env) -> None:
    await fifo.send("orders", "m0", "m1")
    [d] = await fifo.recv(group="f", invisible_ms=2000)
    await fifo.advance(2000)
    with pytest.raises(ReceiptExpired):
        await fifo.ack(d, group="f")
    assert await fifo.recv(group="f") == []
    await fifo.advance(10 * S)
    [again] = await fifo.recv(group="f")
    assert (again.message.body, again.attempt) == (b"m0", 2)


async def test_fifo_nack_with_retry_after_ms(fifo: Env) -> None:
    await fifo.send("orders", "m0")
    [d] = await fifo.recv(group="f")
    await fifo.nack(d, retry_after_ms=500, group="f")
    assert await fifo.recv(group="f") == []
    await fifo.advance(500)
    [again] = await fifo.recv(group="f")
    assert again.attempt == 2


async def test_fifo_dead_letter_unblocks_the_queue(fifo: Env) -> None:
    [m0, _] = await fifo.send("orders", "m0", "m1")
    for attempt in (1, 2, 3):
        [d] = await fifo.recv(group="f")
        assert (d.message.body, d.attempt) == (b"m0", attempt)
        await fifo.nack(d, group="f")
        await fifo.advance(3600 * S)
    [dead] = fifo.dlq("f")
    assert dead.properties[PROP_ORIGIN_MSG_ID] == m0.hex()
    assert bodies(await fifo.recv(group="f")) == [b"m1"]


# -- tags ----------------------------------------------------------------------------------------


async def test_tag_filter(env: Env) -> None:
    await env.send("orders", "created-1", tags="created")
    await env.send("orders", "paid-1", tags="paid")
    await env.send("orders", "shipped-1", tags="shipped")
    await env.send("orders", "untagged")
    await env.send("orders", "created-2", tags="created")
    got = await env.recv(tags="created || paid")
    assert bodies(got) == [b"created-1", b"paid-1", b"created-2"]
    await env.ack(*got)
    # Skipped messages were consumed for this group: they never come back, filter or not.
    assert await env.recv() == []
    assert await env.recv(tags="shipped") == []
    await env.send("orders", "shipped-2", tags="shipped")
    assert bodies(await env.recv(tags="shipped")) == [b"shipped-2"]


async def test_tag_filter_star_and_empty_mean_everything(env: Env) -> None:
    await env.send("orders", "a", tags="x")
    await env.send("orders", "b")
    assert bodies(await env.recv(tags="*")) == [b"a", b"b"]


def test_parse_tags() -> None:
    assert parse_tags(None) is None
    assert parse_tags("") is None
    assert parse_tags("*") is None
    assert parse_tags("a || *") is None
    assert parse_tags("a") == frozenset({"a"})
    assert parse_tags(" a ||b|| c ") == frozenset({"a", "b", "c"})
    for bad in ("a ||", "|| a", "a |||| b", 5, ["a"]):
        with pytest.raises(InvalidRequest):
            parse_tags(bad)


# -- long polling (real clock) -------------------------------------------------------------------


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path / "live", timers=RealTimers())
    await e.start()
    await e.b.create_topic("orders", 2)
    yield e
    await e.stop()


async def test_long_poll_returns_when_a_message_arrives(live: Env) -> None:
    assert await live.recv() == []  # subscribe
    task = asyncio.create_task(live.recv(wait_ms=30_000))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    [sent] = await live.send("orders", "late")
    got = await asyncio.wait_for(task, 5)  # far sooner than wait_ms
    assert ids(got) == [sent.hex()]


async def test_long_poll_cancelled_as_a_message_arrives_takes_nothing(
    live: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that hangs up cancels its receive. When the cancel lands in the same loop turn as
    the wake-up (the message is in, the poll has not resumed yet), the poll must still end
    cancelled: Python 3.11's ``asyncio.wait_for`` returned the result instead and swallowed the
    cancel, so the abandoned poll took the message and hid it for ``invisible_ms``."""
    assert await live.recv() == []  # subscribe
    task = asyncio.create_task(live.recv(wait_ms=30_000))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    wake = live.b.store.on_dispatch
    assert wake is not None

    def wake_then_hang_up(topics: set[str]) -> None:
        wake(topics)
        task.cancel()

    monkeypatch.setattr(live.b.store, "on_dispatch", wake_then_hang_up)
    [sent] = await live.send("orders", "late")
    monkeypatch.undo()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()
    # Not hidden: the next receive gets it at once, as its first delivery.
    [d] = await live.recv(invisible_ms=INVISIBLE_MS)
    assert (d.message.origin_msg_id, d.attempt) == (sent.hex(), 1)


async def test_long_poll_returns_empty_after_wait_ms(live: Env) -> None:
    assert await asyncio.wait_for(live.recv(wait_ms=50), 5) == []


async def test_long_poll_is_woken_by_a_retry(live: Env) -> None:
    [sent] = await live.send("orders", "a")
    [d] = await live.recv()
    task = asyncio.create_task(live.recv(wait_ms=30_000))
    await asyncio.sleep(0)
    await live.nack(d, retry_after_ms=0)
    got = await asyncio.wait_for(task, 5)
    assert [(x.message.origin_msg_id, x.attempt) for x in got] == [(sent.hex(), 2)]


async def test_long_poll_ignores_messages_its_filter_skips(live: Env) -> None:
    task = asyncio.create_task(live.recv(wait_ms=30_000, tags="wanted"))
    await asyncio.sleep(0.01)
    await live.send("orders", "other", tags="other")
    await asyncio.sleep(0.01)
    assert not task.done()
    await live.send("orders", "yes", tags="wanted")
    assert bodies(await asyncio.wait_for(task, 5)) == [b"yes"]


async def test_fifo_long_poll_is_woken_by_the_ack(live: Env) -> None:
    await live.b.create_group("f", fifo=True, max_attempts=3)
    await live.send("orders", "m0", "m1", queue_id=0)
    [d0] = await live.recv(group="f")
    task = asyncio.create_task(live.recv(group="f", wait_ms=30_000))
    await asyncio.sleep(0.01)
    assert not task.done()
    await live.ack(d0, group="f")
    assert bodies(await asyncio.wait_for(task, 5)) == [b"m1"]


# -- stats, reset ----------------------------------------------------------------------------------


async def test_lag_and_inflight(env: Env) -> None:
    await env.b.create_group("g", fifo=False, max_attempts=None)
    await env.send("orders", *[f"m{i}" for i in range(5)])
    stats = await env.b.group_stats("orders", "g")
    assert (stats["lag"], stats["inflight"]) == (5, 0)
    got = await env.recv(n=2)
    stats = await env.b.group_stats("orders", "g")
    assert (stats["lag"], stats["inflight"]) == (5, 2)
    await env.ack(*got)
    stats = await env.b.group_stats("orders", "g")
    assert (stats["lag"], stats["inflight"]) == (3, 0)
    [q] = [q for q in stats["queues"] if q["topic"] == "orders"]  # type: ignore[attr-defined]
    assert (q["min_offset"], q["max_offset"], q["committed_offset"], q["next_offset"]) == (
        0,
        5,
        2,
        2,
    )
    assert stats["fifo"] is False and stats["max_attempts"] == 16


async def test_nacked_message_leaves_lag_and_inflight(env: Env) -> None:
    await env.send("orders", "a")
    [d] = await env.recv()
    await env.nack(d)
    stats = await env.b.group_stats("orders", "g")
    assert (stats["lag"], stats["inflight"]) == (0, 0)


async def test_unknown_group_is_not_found_and_not_created(env: Env) -> None:
    # A read must not create durable state: the group would get default settings, and the
    # application's later explicit create (FIFO, say) would fail with group_exists.
    with pytest.raises(GroupNotFound):
        await env.b.group_stats("orders", "newcomer")
    with pytest.raises(GroupNotFound):
        await env.b.reset("orders", "newcomer", 0)
    with pytest.raises(GroupNotFound):
        await env.b.ack("orders", "newcomer", ["0-0-0-1"])
    with pytest.raises(GroupNotFound):
        await env.b.nack("orders", "newcomer", "0-0-0-1", None)
    g = await env.b.create_group("newcomer", fifo=True, max_attempts=3)
    assert g.fifo is True
    stats = await env.b.group_stats("orders", "newcomer")
    assert (stats["fifo"], stats["lag"], stats["inflight"]) == (True, 0, 0)


async def test_reset_to_a_timestamp_replays(env: Env) -> None:
    times = []
    for i in range(6):
        times.append(env.timers.now_ms())
        await env.send("orders", f"m{i}")
        await env.advance(1000)
    got = await env.recv()
    await env.ack(*got)
    assert await env.recv() == []
    positions = await env.b.reset("orders", "g", times[3])
    assert positions == [{"queue_id": 0, "offset": 3}]
    replay = await env.recv()
    assert bodies(replay) == [b"m3", b"m4", b"m5"]
    assert all(d.attempt == 1 for d in replay)


async def test_reset_drops_receipts_out(env: Env) -> None:
    t0 = env.timers.now_ms()
    await env.send("orders", "a", "b")
    got = await env.recv()
    await env.b.reset("orders", "g", t0)
    with pytest.raises(ReceiptExpired):
        await env.ack(got[0])
    replay = await env.recv()
    assert bodies(replay) == [b"a", b"b"]
    await env.ack(*replay)
    await env.advance(INVISIBLE_MS + 1)  # the old batch's timer finds nothing to redeliver
    assert env.scheduler.scheduled == []
    assert await env.recv() == []


async def test_reset_to_the_future_skips_everything(env: Env) -> None:
    assert await env.recv() == []  # the group exists from its first receive
    await env.send("orders", "a", "b")
    await env.b.reset("orders", "g", env.timers.now_ms() + 1)
    assert await env.recv() == []
    await env.send("orders", "c")
    assert bodies(await env.recv()) == [b"c"]


# -- persistence ---------------------------------------------------------------------------------


async def test_committed_offsets_survive_a_restart(env: Env) -> None:
    await env.send("orders", *[f"m{i}" for i in range(6)])
    got = await env.recv(n=4)
    await env.ack(*got[:2])  # m2 and m3 are out, unacked, at the restart
    await env.restart()
    fresh = await env.recv()
    assert bodies(fresh) == [b"m4", b"m5"]
    assert all(d.attempt == 1 for d in fresh)
    # Receipts of the previous run are dead.
    with pytest.raises(ReceiptExpired):
        await env.ack(got[2])
    await env.ack(*fresh)
    # What was out at the restart comes back once its deadline passes, one attempt further:
    # never as attempt 1 again.
    await env.advance(INVISIBLE_MS)
    await env.advance(10 * S)
    await env.release()
    again = await env.recv()
    assert sorted(bodies(again)) == [b"m2", b"m3"]
    assert all(d.attempt == 2 for d in again)
    await env.ack(*again)
    await env.restart()
    await env.advance(INVISIBLE_MS)
    await env.advance(10 * S)
    await env.release()
    assert await env.recv() == []


async def test_retries_are_not_redelivered_from_the_original_after_restart(env: Env) -> None:
    [sent] = await env.send("orders", "a")
    [d] = await env.recv()
    await env.nack(d)  # the copy is with the scheduler; the original is finished
    await env.restart()
    assert await env.recv() == []
    await env.advance(10 * S)
    await env.release()
    [again] = await env.recv()
    assert (again.message.origin_msg_id, again.attempt) == (sent.hex(), 2)


async def test_acked_retries_stay_acked_after_a_restart(env: Env) -> None:
    await env.send("orders", "a", "b")
    got = await env.recv()
    await env.nack(got[0], retry_after_ms=0)
    await env.ack(got[1])
    [retry] = await env.recv()
    assert retry.attempt == 2
    await env.ack(retry)
    await env.restart()
    assert await env.recv() == []


async def test_groups_survive_a_restart(env: Env) -> None:
    await env.b.create_group("f", fifo=True, max_attempts=5)
    await env.restart()
    with pytest.raises(GroupExists):
        await env.b.create_group("f", fifo=False, max_attempts=16)
    stats = await env.b.group_stats("orders", "f")
    assert (stats["fifo"], stats["max_attempts"]) == (True, 5)


# -- groups --------------------------------------------------------------------------------------


async def test_create_group_twice(env: Env) -> None:
    g = await env.b.create_group("billing", fifo=False, max_attempts=4)
    assert (g.name, g.fifo, g.max_attempts) == ("billing", False, 4)
    with pytest.raises(GroupExists):
        await env.b.create_group("billing", fifo=False, max_attempts=4)


async def test_create_group_defaults(env: Env) -> None:
    g = await env.b.create_group("defaults", fifo=False, max_attempts=None)
    assert (g.fifo, g.max_attempts) == (False, 16)


async def test_group_created_by_first_receive(env: Env) -> None:
    await env.recv(group="auto")
    with pytest.raises(GroupExists):
        await env.b.create_group("auto", fifo=False, max_attempts=None)


@pytest.mark.parametrize("name", ["", "a b", "a/b", "x" * 101, "%DLQ%", "a+b", "g\n", None, 5, "é"])
async def test_bad_group_names(env: Env, name: object) -> None:
    with pytest.raises(InvalidGroup):
        await env.b.create_group(name, fifo=False, max_attempts=None)


@pytest.mark.parametrize(
    ("fifo", "max_attempts"), [("yes", None), (1, None), (False, 0), (False, 1001), (False, True),
                               (False, "3"), (False, 2.5)]
)  # fmt: skip
async def test_bad_group_settings(env: Env, fifo: object, max_attempts: object) -> None:
    with pytest.raises(InvalidGroup):
        await env.b.create_group("ok-name", fifo=fifo, max_attempts=max_attempts)


async def test_receive_with_a_bad_group_name(env: Env) -> None:
    with pytest.raises(InvalidGroup):
        await env.recv(group="bad name")
