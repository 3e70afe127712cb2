"""Several delay servers on one Redis store: shard leases split the shards fairly, each server
releases what it accepted into its own broker, changes made on another server reach the shard's
holder, and a dead server's shards and messages move to the survivors.

Runs on fakeredis (one FakeServer shared by every node), with short leases.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import structlog.testing

from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.message import PROP_DELIVER_AT, PROP_RELEASED_AT, Message
from broker_core.tasks import cancel_and_wait
from delayserver import service as service_module
from delayserver.leases import ShardLeases, new_owner_id
from delayserver.redis_store import RedisDelayStore
from delayserver.service import DelayService
from delayserver.store import DelayState, DelayStoreUnavailable
from delayserver.timers import TimerService
from tests.unit.broker_helpers import wait_for

TTL_MS = 600


class Node:
    """A broker + timers + delay service on a shared fakeredis server, as the app wires them."""

    def __init__(self, data: Path, server: fakeredis.FakeServer) -> None:
        self.timers = TimerService(max_sleep_ms=None)
        self.broker = Broker(
            BrokerConfig(data_dir=data, segment_bytes=1 << 20, backoff_ms=(60_000,)),
            timers=self.timers,
        )
        self.client = fakeredis.aioredis.FakeRedis(server=server)
        self.store = RedisDelayStore("redis://fake", client=self.client, owner=new_owner_id())
        self.leases = ShardLeases(self.store, ttl_ms=TTL_MS)
        self.delay = DelayService(self.store, self.broker.store, self.timers, leases=self.leases)
        self.running = False

    async def start(self) -> Node:
        self.timers.start()
        await self.broker.start()
        await self.delay.start()
        self.broker.scheduler = self.delay
        self.running = True
        return self

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self.delay.stop()
            await self.broker.stop()
            await self.timers.stop()
        await self.client.aclose()

    async def crash(self) -> None:
        """What ``kill -9`` leaves behind: leases unrenewed but not given up, nothing marked."""
        self.running = False
        svc = self.delay
        svc._running = False
        assert self.leases._task is not None and svc._releaser_task is not None
        # Stop the loops between two calls to the store (fakeredis does not like a call
        # cancelled half-way), without any of the goodbyes of stop().
        svc._stopping.set()
        self.leases._stopping.set()
        tasks = [self.leases._task, svc._releaser_task, *svc._polls, *svc._tasks, *svc._takeovers]
        await asyncio.wait(tasks, timeout=1.0)
        await cancel_and_wait(tasks)
        await self.timers.stop()
        await self.broker.stop()

    def released(self, topic: str) -> dict[bytes, tuple[int, int]]:
        """body -> (deliver_at, released_at) of what is in ``topic`` on this node."""
        store = self.broker.store
        if topic not in store.topics:
            return {}
        out = {}
        for q in range(store.topic(topic).queues):
            lo, hi = store.queue_bounds(topic, q)
            cq = store.consume_queue(topic, q)
            for i in range(lo, hi):
                m = store.read(cq.get(i)[0])
                assert m is not None
                assert m.body not in out, f"{m.body!r} is in {topic} twice"
                props = m.properties
                out[m.body] = (int(props[PROP_DELIVER_AT]), int(props[PROP_RELEASED_AT]))
        return out


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Callable[[], Node]]:
    server = fakeredis.FakeServer()
    nodes: list[Node] = []
    names = itertools.count()

    def make() -> Node:
        node = Node(tmp_path / f"n{next(names)}", server)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.stop()


async def _split(*nodes: Node) -> None:
    """Until the nodes hold their fair shares of the shards, disjoint and covering all."""
    total = nodes[0].store.shards
    share = -(-total // len(nodes))

    def settled() -> bool:
        owned = [n.leases.owned for n in nodes]
        return sum(map(len, owned)) == total and all(share - 1 <= len(o) <= share for o in owned)

    await wait_for(settled, timeout_s=10 * TTL_MS / 1000)
    union: set[int] = set()
    for node in nodes:
        assert not union & node.leases.owned, "a shard held by two servers"
        union |= node.leases.owned
    assert union == set(range(total))


def _id_in(node: Node, n: int = 0) -> bytes:
    """A client-chosen id that falls in a shard ``node`` holds."""
    for i in itertools.count(n):
        msg_id = b"client-%08d" % i
        if node.store.shard_of(msg_id) in node.leases.owned:
            return msg_id
    raise AssertionError


async def _schedule(node: Node, bodies: Sequence[bytes], at: int, topic: str = "t") -> list[bytes]:
    msgs = [Message(topic, b) for b in bodies]
    await node.delay.schedule(msgs, [at] * len(msgs))
    return [m.msg_id for m in msgs]


async def test_a_lone_server_holds_every_shard(cluster: Callable[[], Node]) -> None:
    a = await cluster().start()
    assert a.leases.owned == frozenset(range(a.store.shards))
    holders = await a.store.lease_holders()
    assert set(holders) == {a.store.owner}


async def test_two_servers_split_the_shards_and_release_what_each_accepted(
    cluster: Callable[[], Node],
) -> None:
    a = await cluster().start()
    b = await cluster().start()
    await _split(a, b)
    at = a.timers.now_ms() + 300
    ids_a = await _schedule(a, [b"a%d" % i for i in range(40)], at)
    ids_b = await _schedule(b, [b"b%d" % i for i in range(40)], at)
    # Ids the servers made fall in their own shards.
    assert {a.store.shard_of(i) for i in ids_a} <= a.leases.owned
    assert {b.store.shard_of(i) for i in ids_b} <= b.leases.owned
    await wait_for(lambda: len(a.released("t")) == 40 and len(b.released("t")) == 40)
    assert set(a.released("t")) == {b"a%d" % i for i in range(40)}
    assert set(b.released("t")) == {b"b%d" % i for i in range(40)}
    for node in (a, b):
        assert all(rel >= due == at for due, rel in node.released("t").values())  # never early
    for msg_id in ids_a + ids_b:
        info = await a.delay.get(msg_id)
        assert info is not None and info.state is DelayState.DELIVERED


async def test_the_lease_table_shows_each_shards_holder_and_each_servers_heartbeat(
    cluster: Callable[[], Node],
) -> None:
    a = await cluster().start()
    b = await cluster().start()
    await _split(a, b)
    shards, servers = await a.store.lease_table()
    assert len(shards) == a.store.shards
    for shard, (holder, ttl_ms) in enumerate(shards):
        owner = a if shard in a.leases.owned else b
        assert holder == owner.store.owner
        assert 0 < ttl_ms <= TTL_MS
    now = a.timers.now_ms()
    assert sorted(name for name, _ in servers) == sorted([a.store.owner, b.store.owner])
    assert all(now < until <= now + TTL_MS for _, until in servers)
    await b.stop()
    shards, servers = await a.store.lease_table()
    assert [name for name, _ in servers] == [a.store.owner]
    # What b held is free (it gave its leases up) until a takes it.
    assert {h for h, _ in shards} <= {a.store.owner, None}
    assert all(ttl == -2 for h, ttl in shards if h is None)


async def test_a_client_id_in_another_servers_shard_is_released_on_time_by_its_holder(
    cluster: Callable[[], Node],
) -> None:
    a = await cluster().start()
    b = await cluster().start()
    await _split(a, b)
    msg = Message("t", b"handed-over", msg_id=_id_in(b))
    at = a.timers.now_ms() + 250
    await a.delay.schedule([msg], [at])  # sent to a, due inside b's loaded window
    await wait_for(lambda: b"handed-over" in b.released("t"))
    deliver_at, released_at = b.released("t")[b"handed-over"]
    # Through the inbox: the sweep only arms what is more than a second overdue.
    assert deliver_at == at and at <= released_at < at + 1000
    assert a.released("t") == {}
    # Sent again to either server (a client retry): still stored once, released once.
    again = Message("t", b"handed-over", msg_id=msg.msg_id)
    await b.delay.schedule([again], [at])
    await asyncio.sleep(0.3)
    assert list(b.released("t")) == [b"handed-over"] and a.released("t") == {}


async def test_cancel_and_reschedule_on_another_server_reach_the_holder(
    cluster: Callable[[], Node],
) -> None:
    a = await cluster().start()
    b = await cluster().start()
    await _split(a, b)
    now = b.timers.now_ms()
    cancelled, moved = await _schedule(b, [b"cancelled", b"moved"], now + 400)
    assert b.delay.in_window == 2  # armed on b
    info = await a.delay.cancel(cancelled)
    assert info is not None and info.state is DelayState.CANCELLED
    later = now + 900
    info = await a.delay.reschedule(moved, later)
    assert info is not None and info.deliver_at_ms == later
    await wait_for(lambda: b"moved" in b.released("t"))
    assert b.released("t")[b"moved"][1] >= later  # not at its old time
    assert set(b.released("t")) == {b"moved"}
    assert a.released("t") == {}
    info = await b.delay.get(cancelled)
    assert info is not None and info.state is DelayState.CANCELLED


async def test_a_dead_servers_shards_and_messages_move_to_the_survivor(
    cluster: Callable[[], Node],
) -> None:
    a = await cluster().start()
    b = await cluster().start()
    await _split(a, b)
    now = b.timers.now_ms()
    # Some fall due while b is dead and nobody holds its shards, some after the takeover.
    early = await _schedule(b, [b"early%d" % i for i in range(30)], now + 200)
    late = await _schedule(b, [b"late%d" % i for i in range(30)], now + 3000)
    b_shards = b.leases.owned
    await b.crash()
    await wait_for(lambda: len(a.leases.owned) == a.store.shards, timeout_s=5 * TTL_MS / 1000)
    assert b_shards <= a.leases.owned
    await wait_for(lambda: len(a.released("t")) == 60, timeout_s=6.0)
    released = a.released("t")
    assert set(released) == {b"early%d" % i for i in range(30)} | {b"late%d" % i for i in range(30)}
    assert all(rel >= due for due, rel in released.values())  # never early
    for msg_id in early + late:
        info = await a.delay.get(msg_id)
        assert info is not None and info.state is DelayState.DELIVERED


async def test_a_server_that_stops_hands_its_shards_on_at_once(
    cluster: Callable[[], Node],
) -> None:
    a = await cluster().start()
    b = await cluster().start()
    await _split(a, b)
    ids = await _schedule(b, [b"m%d" % i for i in range(20)], b.timers.now_ms() + 1500)
    await b.stop()
    assert set(await a.store.lease_holders()) <= {a.store.owner, None}
    # b gave them up (none is b's in Redis any more, before they could expire); a takes them.
    await wait_for(lambda: len(a.leases.owned) == a.store.shards)
    await wait_for(lambda: len(a.released("t")) == 20)
    assert len(ids) == 20


async def test_three_servers_rebalance_when_one_joins_and_one_leaves(
    cluster: Callable[[], Node],
) -> None:
    a = await cluster().start()
    b = await cluster().start()
    await _split(a, b)
    c = await cluster().start()
    await _split(a, b, c)
    assert sorted(len(n.leases.owned) for n in (a, b, c)) == [5, 5, 6]
    await c.stop()
    await _split(a, b)


# -- ShardLeases alone, on a scripted store and clock ----------------------------------------------


class ScriptedStore:
    """A LeaseStore whose answers the test sets."""

    shards = 16

    def __init__(self) -> None:
        self.owner = "me"
        self.servers = ["me"]
        self.holders: list[str | None] = [None] * self.shards
        self.down = False
        self.calls: list[str] = []

    def _check(self) -> None:
        if self.down:
            raise DelayStoreUnavailable("redis unavailable: scripted")

    async def heartbeat(self, ttl_ms: int, now_ms: int) -> list[str]:
        self._check()
        return self.servers

    async def leave(self) -> None:
        self.calls.append("leave")

    async def lease_holders(self) -> list[str | None]:
        self._check()
        return list(self.holders)

    async def acquire(self, shards: Sequence[int], ttl_ms: int) -> list[bool]:
        self._check()
        out = []
        for s in shards:
            free = self.holders[s] is None
            if free:
                self.holders[s] = self.owner
            out.append(free)
        return out

    async def renew(self, shards: Sequence[int], ttl_ms: int) -> list[bool]:
        self._check()
        return [self.holders[s] == self.owner for s in shards]

    async def give_up(self, shards: Sequence[int]) -> None:
        self._check()
        self.calls.append(f"give_up {sorted(shards)}")
        for s in shards:
            if self.holders[s] == self.owner:
                self.holders[s] = None


async def test_leases_keep_the_fair_share_and_disarm_before_giving_up() -> None:
    store = ScriptedStore()
    clock = [100.0]
    leases = ShardLeases(store, ttl_ms=3000, monotonic=lambda: clock[0])
    events: list[str] = []

    async def gained(shards: frozenset[int]) -> None:
        events.append(f"gained {len(shards)}")

    async def lost(shards: frozenset[int]) -> None:
        assert all(store.holders[s] is not None for s in shards), "lost after giving up"
        events.append(f"lost {len(shards)}")

    leases.on_gained, leases.on_lost = gained, lost
    await leases.step()
    assert len(leases.owned) == 16 and events == ["gained 16"]
    store.servers = ["a", "b", "me"]
    await leases.step()
    assert len(leases.owned) == 5  # 16 // 3; "a" holds the remaining one
    assert events[-1] == "lost 11" and store.calls[-1].startswith("give_up")
    store.holders[next(iter(leases.owned))] = "other"  # expired and taken meanwhile
    await leases.step()
    assert events[-2:] == ["lost 1", "gained 1"] and len(leases.owned) == 5
    store.servers = ["me", "x", "y"]
    await leases.step()
    assert events[-1] == "gained 1" and len(leases.owned) == 6  # first in id order


async def test_a_server_cut_off_from_redis_stops_releasing_before_its_leases_expire() -> None:
    store = ScriptedStore()
    clock = [100.0]
    leases = ShardLeases(store, ttl_ms=3000, monotonic=lambda: clock[0])
    await leases.step()
    assert leases.holds(0)
    store.down = True
    with pytest.raises(DelayStoreUnavailable):
        await leases.step()
    clock[0] += (3000 - leases.margin_ms) / 1000 - 0.01
    assert leases.holds(0)  # still inside the last renewal's validity
    clock[0] += 0.02
    assert not leases.holds(0)  # before Redis lets the lease go (3 s after the renewal)
    assert leases.margin_ms > 0


def test_leases_refuse_a_store_without_owner_and_a_tiny_ttl() -> None:
    store = ScriptedStore()
    with pytest.raises(ValueError, match="at least 300 ms"):
        ShardLeases(store, ttl_ms=100)
    store.owner = ""
    with pytest.raises(ValueError, match="owner"):
        ShardLeases(store)


# -- what a review of the design found, kept fixed -------------------------------------------------


async def test_a_time_in_the_past_is_released_at_once_and_breaks_nothing(
    cluster: Callable[[], Node],
) -> None:
    a = await cluster().start()
    now = a.timers.now_ms()
    past, other = await _schedule(a, [b"past", b"other"], now + 60_000)
    # Stored as asked: the Lua steps must read a negative time too.
    info = await a.delay.reschedule(past, -1)
    assert info is not None and info.deliver_at_ms == -1
    await a.delay.reschedule(other, now + 300)
    await wait_for(lambda: set(a.released("t")) == {b"past", b"other"})


async def test_the_releaser_outlives_an_unexpected_error(
    cluster: Callable[[], Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await cluster().start()
    real_claim = a.store.claim
    failures = [RuntimeError("boom")]

    async def claim(msg_ids: Sequence[bytes], now_ms: int) -> list[bool]:
        if failures:
            raise failures.pop()
        return await real_claim(msg_ids, now_ms)

    monkeypatch.setattr(a.store, "claim", claim)
    await _schedule(a, [b"m"], a.timers.now_ms() + 100)
    await wait_for(lambda: b"m" in a.released("t"))
    assert failures == []


async def test_shards_given_up_mid_release_are_not_released_twice(
    cluster: Callable[[], Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await cluster().start()
    real_put = a.broker.store.put_many
    putting = asyncio.Event()

    async def slow_put(msgs: Sequence[Message], *, check_duplicate: bool = False) -> Any:
        putting.set()
        await asyncio.sleep(0.5)  # b joins and a gives shards up meanwhile
        return await real_put(msgs, check_duplicate=check_duplicate)

    monkeypatch.setattr(a.broker.store, "put_many", slow_put)
    await _schedule(a, [b"m%d" % i for i in range(100)], a.timers.now_ms() + 100)
    await asyncio.wait_for(putting.wait(), 5)
    b = await cluster().start()
    await _split(a, b)
    await wait_for(lambda: len(a.released("t")) + len(b.released("t")) >= 100)
    await asyncio.sleep(0.5)
    assert not set(a.released("t")) & set(b.released("t")), "released by both"
    assert len(a.released("t")) + len(b.released("t")) == 100


async def test_a_reschedule_from_elsewhere_survives_a_failed_read(
    cluster: Callable[[], Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await cluster().start()
    b = await cluster().start()
    await _split(a, b)
    msg = Message("t", b"moved", msg_id=_id_in(b))
    now = b.timers.now_ms()
    await b.delay.schedule([msg], [now + 8000])
    real_due = b.store.due
    failures = [DelayStoreUnavailable("redis unavailable: once")]

    async def due(msg_id: bytes) -> Any:
        if failures:
            raise failures.pop()
        return await real_due(msg_id)

    monkeypatch.setattr(b.store, "due", due)
    at = now + 500
    await a.delay.reschedule(msg.msg_id, at)
    await wait_for(lambda: b"moved" in b.released("t"), timeout_s=4.0)
    assert failures == []
    assert b.released("t")[b"moved"][0] == at and b.released("t")[b"moved"][1] < at + 2000


async def test_a_resend_whose_first_reply_was_lost_is_released_on_time(
    cluster: Callable[[], Node],
) -> None:
    a = await cluster().start()
    msg_id = _id_in(a)
    at = a.timers.now_ms() + 300
    # The first attempt reached Redis but its answer never came back: stored, not armed.
    await a.store.schedule([(Message("t", b"retried", msg_id=msg_id), at)])
    assert await a.delay.schedule([Message("t", b"retried", msg_id=msg_id)], [at]) == [at]
    await wait_for(lambda: b"retried" in a.released("t"))
    released_at = a.released("t")[b"retried"][1]
    assert at <= released_at < at + 900  # armed by the resend, not found by the sweeper


async def test_the_sweep_reports_only_what_it_armed_not_a_batch_armed_meanwhile(
    cluster: Callable[[], Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch scheduled (and armed on time) while the sweep's read is in flight is no find of
    the sweep: counting it would report a whole batch as missed and released late. The sweep
    still arms, and counts, a message nobody armed."""
    monkeypatch.setattr(service_module, "_SWEEP_EVERY_S", 0.05)
    a = await cluster().start()
    now = a.timers.now_ms()
    # In the store, overdue, in a shard ``a`` holds, and in nobody's wheel: the store was
    # written directly, past the service (a lost notice, say).
    missed = Message("t", b"missed", msg_id=_id_in(a))
    assert await a.store.schedule([(missed, now - 5000)]) == [True]
    assert missed.msg_id not in a.delay._entries

    real_window = a.store.window
    in_sweep, go = asyncio.Event(), asyncio.Event()

    async def window(from_ms: int, to_ms: int, limit: int, **kw: Any) -> Any:
        # The sweep's read, the first time: held until a batch has been scheduled meanwhile.
        if to_ms <= a.timers.now_ms() - service_module._SWEEP_GRACE_MS and not in_sweep.is_set():
            in_sweep.set()
            await go.wait()
        return await real_window(from_ms, to_ms, limit, **kw)

    monkeypatch.setattr(a.store, "window", window)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(in_sweep.wait(), 5)
        ids = await _schedule(a, [b"on-time-%d" % i for i in range(100)], now + 30_000)
        assert all(i in a.delay._entries for i in ids)  # armed by schedule itself
        go.set()
        await wait_for(lambda: b"missed" in a.released("t"))
        await asyncio.sleep(0.2)  # a few more sweeps: they find nothing
    found = [e["armed"] for e in logs if e["event"] == "delay.sweep_found"]
    assert found == [1]
    assert all(i in a.delay._entries for i in ids)


async def test_a_batch_written_after_its_shards_moved_is_released_on_time_by_the_new_holder(
    cluster: Callable[[], Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone server picks ids in shards it holds; a second one joins, and before the batch's
    write lands the shards have moved and the new holder has loaded them (without it). The
    write then tells the new holder through the shard's inbox: on time, not at the sweep."""
    a = await cluster().start()
    real_schedule = a.store.schedule
    held, go = asyncio.Event(), asyncio.Event()

    async def schedule(items: Any) -> list[bool]:
        held.set()
        await go.wait()
        return await real_schedule(items)

    monkeypatch.setattr(a.store, "schedule", schedule)
    at = a.timers.now_ms() + 2000
    msgs = [Message("t", b"m%d" % i) for i in range(100)]
    with structlog.testing.capture_logs() as logs:
        sending = asyncio.create_task(a.delay.schedule(msgs, [at] * len(msgs)))
        await asyncio.wait_for(held.wait(), 5)
        b = await cluster().start()
        await _split(a, b)
        await wait_for(lambda: not b.delay._takeovers)  # b loaded its shards: the batch not in
        moved = {m.msg_id for m in msgs if a.store.shard_of(m.msg_id) in b.leases.owned}
        assert moved, "some of the batch's shards went to b"
        go.set()
        await sending
        await wait_for(lambda: len(a.released("t")) + len(b.released("t")) == 100, timeout_s=6.0)
    released = {**a.released("t"), **b.released("t")}
    assert all(at <= rel < at + 500 for _due, rel in released.values())  # on time, none early
    assert {b"m%d" % i for i in range(100)} == set(released)
    assert {m.body for m in msgs if m.msg_id in moved} == set(b.released("t"))
    assert not [e for e in logs if e["event"] == "delay.sweep_found"]
