"""The release-target contract, one suite run against each target: the embedded broker core,
NATS JetStream (the shared nats-server, and a private one for down/back) and RabbitMQ (the
shared server, behind a TCP proxy this test controls for down/back).

Publish returns once the target has every message; a repeat of an id is dropped by JetStream
(``Nats-Msg-Id``) and by the embedded store, and reaches RabbitMQ consumers with the same
``message_id``; properties, tags, keys, ``DELIVER_AT`` and ``RELEASED_AT`` travel as headers; a
target that is down refuses with :class:`TargetUnavailable` naming it and why, shows in
``health``, and takes messages again once it is back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_core.config import BrokerConfig
from broker_core.message import Message, MsgIdGenerator
from broker_core.store import MessageStore
from delayserver.targets import (
    AmqpTarget,
    EmbeddedTarget,
    NatsTarget,
    ReleaseTarget,
    TargetUnavailable,
    message_headers,
)
from tests.integration.target_services import (
    JetStreamReader,
    NatsProcess,
    RabbitReader,
    Received,
    TcpProxy,
    require_nats,
    require_rabbitmq,
    unique,
)

pytestmark = pytest.mark.integration

_ids = MsgIdGenerator()


@dataclass
class Harness:
    """A started target and a way to read what it holds through the broker's own client."""

    target: ReleaseTarget
    read: Callable[[int], Awaitable[list[Received]]]
    dedups: bool  # does the target itself drop a repeated id?


def _msg(topic: str, body: bytes, **kw: object) -> Message:
    msg = Message(topic, body, msg_id=_ids.next(), born_at=int(time.time() * 1000))
    for name, value in kw.items():
        setattr(msg, name, value)
    return msg


@pytest.fixture(params=["embedded", "nats", "amqp"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    kind = request.param
    if kind == "embedded":
        store = MessageStore(BrokerConfig(data_dir=tmp_path, segment_bytes=1 << 20))
        await store.start()
        target = EmbeddedTarget(store)

        async def read_store(want: int) -> list[Received]:
            out = []
            for topic in sorted(store.topics):
                for q in range(store.topic(topic).queues):
                    lo, hi = store.queue_bounds(topic, q)
                    cq = store.consume_queue(topic, q)
                    for i in range(lo, hi):
                        entry = cq.get(i)
                        assert entry is not None
                        m = store.read(entry[0])
                        headers = dict(m.properties)
                        if m.tags:
                            headers["TEMPOMQ-Tags"] = m.tags
                        if m.keys:
                            headers["TEMPOMQ-Keys"] = json.dumps(list(m.keys))
                        out.append(Received(m.body, headers, m.msg_id.hex()))
            return out

        yield Harness(target, read_store, dedups=True)
        await store.stop()
    elif kind == "nats":
        reader = JetStreamReader(require_nats(), unique("TQT"), unique("tqt"))
        await reader.open()
        target = NatsTarget(reader.url, subject=reader.subject_template, publish_timeout_s=3)
        await target.start()

        async def read_js(want: int) -> list[Received]:
            return await reader.read_all()

        yield Harness(target, read_js, dedups=True)
        await target.stop()
        await reader.close()
    else:
        rabbit = RabbitReader(require_rabbitmq(), unique("tqt-"))
        await rabbit.open("orders", "audit")
        target = AmqpTarget(rabbit.url, route=rabbit.route_template, publish_timeout_s=3)
        await target.start()
        yield Harness(target, rabbit.read, dedups=False)
        await target.stop()
        await rabbit.close()


async def test_publish_returns_once_every_message_is_held(harness: Harness) -> None:
    assert await harness.target.health() is None
    msgs = [_msg("orders", f"m{i}".encode()) for i in range(50)]
    await harness.target.publish(msgs, check_duplicate=False)
    got = await harness.read(50)
    assert sorted(r.body for r in got) == sorted(m.body for m in msgs)
    assert {r.msg_id for r in got} == {m.msg_id.hex() for m in msgs}


async def test_a_repeated_id_is_dropped_or_carries_the_same_id(harness: Harness) -> None:
    first = _msg("orders", b"once")
    await harness.target.publish([first], check_duplicate=False)
    again = Message("orders", b"once", msg_id=first.msg_id)
    await harness.target.publish([again], check_duplicate=True)
    await harness.target.publish([_msg("orders", b"other")], check_duplicate=False)
    got = await harness.read(3)
    ids = [r.msg_id for r in got]
    if harness.dedups:
        assert ids.count(first.msg_id.hex()) == 1, ids
        assert len(got) == 2
    else:  # RabbitMQ keeps no de-duplication: both copies, one id for the consumer to drop
        assert ids.count(first.msg_id.hex()) == 2, ids
        assert len({r.msg_id for r in got}) == 2


async def test_properties_tags_keys_and_times_travel_as_headers(harness: Harness) -> None:
    msg = _msg(
        "audit",
        b"\x00\xffbinary",
        tags="paid",
        keys=("order-7", "user 9"),
        properties={"DELIVER_AT": "1700000000000", "RELEASED_AT": "1700000000003", "k": "v"},
    )
    await harness.target.publish([msg], check_duplicate=False)
    [got] = await harness.read(1)
    assert got.body == b"\x00\xffbinary"
    assert got.msg_id == msg.msg_id.hex()
    for name in ("DELIVER_AT", "RELEASED_AT", "k"):
        assert got.headers[name] == msg.properties[name]
    assert got.headers["TEMPOMQ-Tags"] == "paid"
    assert json.loads(got.headers["TEMPOMQ-Keys"]) == ["order-7", "user 9"]


def test_headers_never_carry_a_jetstream_instruction_or_a_broken_line() -> None:
    msg = _msg(
        "t",
        b"",
        properties={"Nats-Expected-Stream": "x", "a b": "1", "multi": "l1\r\nl2"},
    )
    headers = message_headers(msg)
    assert "Nats-Expected-Stream" not in headers
    assert headers["X-Nats-Expected-Stream"] == "x"
    assert headers["a%20b"] == "1"
    assert headers["multi"] == "l1%0D%0Al2"
    assert headers["TEMPOMQ-Msg-Id"] == msg.msg_id.hex()
    assert headers["TEMPOMQ-Topic"] == "t"


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def _until_accepted(target: ReleaseTarget, msg: Message, why: str) -> None:
    """Publish ``msg`` again and again until the target takes it (within 30 s), then healthy."""

    async def accepts() -> bool:
        try:
            await target.publish([msg], check_duplicate=True)
        except TargetUnavailable:
            return False
        return True

    await _until(accepts, 30, f"publishes still refused: {why}")
    assert await target.health() is None


async def _down_and_back(
    target: ReleaseTarget,
    down: Callable[[], Awaitable[None]],
    up: Callable[[], Awaitable[None]],
    read: Callable[[int], Awaitable[list[Received]]],
    name: str,
) -> None:
    before = _msg("orders", b"before")
    await target.publish([before], check_duplicate=False)
    await down()

    async def refuses() -> bool:
        try:
            await target.publish([_msg("orders", b"lost?")], check_duplicate=False)
        except TargetUnavailable as e:
            assert name in e.message, e.message
            assert e.status == 503 and e.code == "target_unavailable"
            return True
        return False

    await _until(refuses, 15, "publishes still accepted with the target down")
    reason = await target.health()
    assert reason is not None and name in reason, reason
    await up()
    await _until_accepted(target, _msg("orders", b"after"), "after the target came back")
    bodies = [r.body for r in await read(2)]
    assert b"before" in bodies and b"after" in bodies, bodies
    assert bodies.count(b"after") == 1


async def test_nats_down_and_back(tmp_path: Path) -> None:
    server = NatsProcess(tmp_path)
    server.start()
    reader = JetStreamReader(server.url, unique("TQD"), unique("tqd"))
    target = NatsTarget(server.url, subject=reader.subject_template, publish_timeout_s=2)
    try:
        await reader.open()
        await target.start()

        async def down() -> None:
            await reader.nc.close()
            server.kill()

        async def up() -> None:
            server.start()  # same port, same store: the stream is still there
            await reader.open(create=False)

        await _down_and_back(
            target, down, up, lambda n: reader.read_all(), f"NATS JetStream at {server.url}"
        )
    finally:
        await target.stop()
        await reader.close(delete=False)
        server.kill()


async def test_nats_down_at_start_then_up(tmp_path: Path) -> None:
    server = NatsProcess(tmp_path)
    target = NatsTarget(server.url, subject="x.{topic}", stream=unique("TQS"))
    try:
        await target.start()  # nothing listens yet: the server still starts
        reason = await target.health()
        assert reason is not None and "cannot connect" in reason, reason
        with pytest.raises(TargetUnavailable):
            await target.publish([_msg("orders", b"x")], check_duplicate=False)
        server.start()

        async def healthy() -> bool:
            return await target.health() is None

        await _until(healthy, 15, "the target never connected")
        await target.publish([_msg("orders", b"x")], check_duplicate=False)  # stream created
    finally:
        await target.stop()
        server.kill()


async def test_rabbitmq_down_and_back() -> None:
    rabbit = RabbitReader(require_rabbitmq(), unique("tqd-"))
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.up()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.listen_port}/"
    target = AmqpTarget(url, route=rabbit.route_template, publish_timeout_s=2)
    try:
        await rabbit.open("orders")
        await target.start()
        await _down_and_back(
            target,
            proxy.down,
            proxy.up,
            rabbit.read,
            f"RabbitMQ at amqp://guest:***@127.0.0.1:{proxy.listen_port}/",
        )
    finally:
        await target.stop()
        await proxy.down()
        await rabbit.close()


async def test_rabbitmq_refuses_a_message_no_queue_would_get() -> None:
    rabbit = RabbitReader(require_rabbitmq(), unique("tqn-"))
    target = AmqpTarget(rabbit.url, route=rabbit.route_template, publish_timeout_s=3)
    try:
        await rabbit.open("orders")  # nothing bound for "nobody"
        await target.start()
        with pytest.raises(TargetUnavailable, match="no queue bound"):
            await target.publish([_msg("nobody", b"x")], check_duplicate=False)
    finally:
        await target.stop()
        await rabbit.close()


async def test_a_batch_partly_returned_says_which_were_confirmed() -> None:
    """One message no queue would get in a batch: the error names its route (not the first
    message's) and carries the ids RabbitMQ confirmed, so the caller repeats only the rest."""
    rabbit = RabbitReader(require_rabbitmq(), unique("tqp-"))
    target = AmqpTarget(rabbit.url, route=rabbit.route_template, publish_timeout_s=3)
    try:
        await rabbit.open("orders")
        await target.start()
        ok, nobody = _msg("orders", b"ok"), _msg("nobody", b"x")
        with pytest.raises(TargetUnavailable) as caught:
            await target.publish([ok, nobody], check_duplicate=False)
        assert "1 of 2 not confirmed" in caught.value.message
        assert "for key nobody" in caught.value.message, caught.value.message
        assert caught.value.acknowledged == frozenset({ok.msg_id})
        assert [r.body for r in await rabbit.read(1)] == [b"ok"]
    finally:
        await target.stop()
        await rabbit.close()


async def test_nats_back_without_its_data_gets_the_stream_again(tmp_path: Path) -> None:
    """With --release-stream, a NATS server that comes back with an empty store (a container
    without its volume) has the stream created again: releases do not stay refused for good."""
    import shutil

    server = NatsProcess(tmp_path)
    server.start()
    stream = unique("TQR")
    target = NatsTarget(server.url, subject="tqr.{topic}", stream=stream, publish_timeout_s=2)
    try:
        await target.start()
        await target.publish([_msg("orders", b"before")], check_duplicate=False)
        server.kill()
        shutil.rmtree(tmp_path / f"js-{server.name}")
        server.start()
        await _until_accepted(target, _msg("orders", b"after"), "the stream was not created again")
    finally:
        await target.stop()
        server.kill()


async def test_a_message_over_the_nats_max_payload_fails_alone() -> None:
    """A body over the NATS server's max_payload fails that message only (named, with its
    size); the others of the batch are acknowledged and said to be."""
    reader = JetStreamReader(require_nats(), unique("TQM"), unique("tqm"))
    await reader.open()
    target = NatsTarget(reader.url, subject=reader.subject_template, publish_timeout_s=3)
    try:
        await target.start()
        assert target._nc is not None
        big = _msg("orders", b"x" * (target._nc.max_payload + 1))
        small = [_msg("orders", b"small-1"), _msg("orders", b"small-2")]
        with pytest.raises(TargetUnavailable) as caught:
            await target.publish([small[0], big, small[1]], check_duplicate=False)
        assert "1 of 3 not acknowledged" in caught.value.message, caught.value.message
        assert big.msg_id.hex() in caught.value.message and "max_payload" in caught.value.message
        assert caught.value.acknowledged == frozenset(m.msg_id for m in small)
        assert sorted(r.body for r in await reader.read_all()) == [b"small-1", b"small-2"]
    finally:
        await target.stop()
        await reader.close()
