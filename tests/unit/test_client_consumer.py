"""tempomq.client.Consumer against an in-test broker: acks, nacks, bounded concurrency, batched
acks, graceful stop. Every wait is bounded by ``eventually``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tempomq.client import Client, Consumer, ReceivedMessage

ServerFactory = Callable[..., Awaitable[TestServer]]
WAIT_MS = 200  # the consumer's long poll in these tests


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class FakeBroker:
    """Just enough of a broker for a consumer: a ready list, long-poll receive, ack, nack."""

    def __init__(self) -> None:
        self.ready: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.receive_sizes: list[int] = []
        self.ack_requests: list[list[str]] = []
        self.acked: list[str] = []
        self.nacked: list[str] = []
        self.expired: set[str] = set()
        self.failing_receives = 0
        self.missing_topic_receives = 0
        self.waiting = 0  # long polls parked right now
        self.asked = 0  # messages the receives under way asked for, together
        self.most_asked_at_once = 0

    def put(self, *bodies: str) -> None:
        for body in bodies:
            self.ready.append(
                {
                    "msg_id": f"{len(self.receive_sizes):016x}{abs(hash(body)):016x}"[:32],
                    "topic": "orders",
                    "queue_id": 0,
                    "body": body,
                    "tags": None,
                    "keys": [],
                    "properties": {},
                    "born_at": 0,
                    "stored_at": 0,
                    "receipt": f"r-{body}",
                    "delivery_attempt": 1,
                }
            )
        self.arrived.set()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        action = request.path.rsplit("/", 1)[1]
        if action == "receive":
            return await self._receive(body)
        if action == "ack":
            receipts = body["receipts"]
            self.ack_requests.append(receipts)
            if self.expired.intersection(receipts):  # all or nothing, as the server does
                return web.json_response({"error": "receipt_expired", "message": "x"}, status=409)
            self.acked.extend(receipts)
            return web.json_response({"acked": len(receipts)})
        assert action == "nack"
        self.nacked.append(body["receipt"])
        return web.json_response({"nacked": 1})

    async def _receive(self, body: dict[str, Any]) -> web.Response:
        self.receive_sizes.append(body["max_messages"])
        if self.missing_topic_receives:
            self.missing_topic_receives -= 1
            error = {"error": "topic_not_found", "message": "topic 'orders' does not exist"}
            return web.json_response(error, status=404)
        if self.failing_receives:
            self.failing_receives -= 1
            return web.json_response({"error": "store_unavailable", "message": "x"}, status=503)
        n = body["max_messages"]
        self.asked += n
        self.most_asked_at_once = max(self.most_asked_at_once, self.asked)
        deadline = time.monotonic() + body["wait_ms"] / 1000
        try:
            # As the server does: a poll woken for messages another took waits on.
            while not self.ready and time.monotonic() < deadline:
                self.arrived.clear()
                self.waiting += 1
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.arrived.wait(), deadline - time.monotonic())
                finally:
                    self.waiting -= 1
            out, self.ready = self.ready[:n], self.ready[n:]
        finally:
            self.asked -= n
        return web.json_response({"messages": out})


@pytest.fixture
async def broker(aiohttp_server: ServerFactory) -> AsyncIterator[tuple[FakeBroker, Client]]:
    fake = FakeBroker()
    app = web.Application()
    app.router.add_post("/v1/topics/{topic}/groups/{group}/{action}", fake.handle)
    server = await aiohttp_server(app)
    async with Client(str(server.make_url("/")), timeout_s=5) as client:
        yield fake, client


def consumer(
    client: Client, handler: Callable[[ReceivedMessage], Awaitable[None]], **kw: Any
) -> Consumer:
    kw.setdefault("wait_ms", WAIT_MS)
    return Consumer(client, "orders", "billing", handler, **kw)


async def test_acks_what_the_handler_finished_and_nacks_what_it_raised_on(
    broker: tuple[FakeBroker, Client], caplog: pytest.LogCaptureFixture
) -> None:
    fake, client = broker
    seen: list[str] = []

    async def handler(msg: ReceivedMessage) -> None:
        seen.append(msg.text)
        if msg.text.startswith("bad"):
            raise RuntimeError(f"cannot handle {msg.text}")

    fake.put("ok-1", "bad-1", "ok-2", "bad-2", "ok-3")
    c = consumer(client, handler)
    c.start()
    try:
        await eventually(lambda: len(fake.acked) + len(fake.nacked) == 5)
    finally:
        await c.stop(drain_timeout_s=5)
    assert sorted(seen) == ["bad-1", "bad-2", "ok-1", "ok-2", "ok-3"]
    assert sorted(fake.acked) == ["r-ok-1", "r-ok-2", "r-ok-3"]
    assert sorted(fake.nacked) == ["r-bad-1", "r-bad-2"]
    assert "cannot handle bad-1" in caplog.text


async def test_never_runs_more_handlers_than_its_concurrency(
    broker: tuple[FakeBroker, Client],
) -> None:
    fake, client = broker
    gate = asyncio.Event()
    running = [0]
    most = [0]

    async def handler(msg: ReceivedMessage) -> None:
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            await gate.wait()
        finally:
            running[0] -= 1

    fake.put(*(f"m{i}" for i in range(20)))
    c = consumer(client, handler, concurrency=4, batch=32)
    c.start()
    try:
        await eventually(lambda: running[0] == 4)
        await asyncio.sleep(0.2)  # room for a wrong consumer to start more
        assert most[0] == 4 and len(fake.ready) == 16
        gate.set()
        await eventually(lambda: len(fake.acked) == 20)
    finally:
        await c.stop(drain_timeout_s=5)
    assert most[0] == 4
    # It only ever asked for as many messages as it had free handlers, shared by its polls.
    assert max(fake.most_asked_at_once, *fake.receive_sizes) <= 4


async def test_a_long_poll_waits_on_the_server_while_the_other_answer_is_handled(
    broker: tuple[FakeBroker, Client],
) -> None:
    """Two long polls are out at once, so while one poll's answer travels back and its
    messages start, the other already waits on the server for the next message."""
    fake, client = broker
    seen: list[str] = []
    two_parked_while_handling: list[bool] = []

    async def handler(msg: ReceivedMessage) -> None:
        seen.append(msg.text)
        two_parked_while_handling.append(fake.waiting >= 1)

    c = consumer(client, handler, wait_ms=5000)
    c.start()
    try:
        await eventually(lambda: fake.waiting == 2)
        for i in range(3):
            fake.put(f"m{i}")
            await eventually(lambda i=i: len(seen) == i + 1)
    finally:
        await c.stop(drain_timeout_s=5)
    assert seen == ["m0", "m1", "m2"]
    assert all(two_parked_while_handling)  # the other poll was waiting when each one started
    assert sorted(fake.acked) == ["r-m0", "r-m1", "r-m2"]


def test_polls_are_checked() -> None:
    async def handler(msg: ReceivedMessage) -> None:
        return None

    with pytest.raises(ValueError):
        Consumer(Client("http://127.0.0.1:1"), "orders", "billing", handler, polls=0)


async def test_handlers_that_finish_together_are_acked_in_one_request(
    broker: tuple[FakeBroker, Client],
) -> None:
    fake, client = broker
    gate = asyncio.Event()
    started = [0]

    async def handler(msg: ReceivedMessage) -> None:
        started[0] += 1
        await gate.wait()

    fake.put(*(f"m{i}" for i in range(8)))
    c = consumer(client, handler, concurrency=8)
    c.start()
    try:
        await eventually(lambda: started[0] == 8)
        gate.set()
        await eventually(lambda: len(fake.acked) == 8)
    finally:
        await c.stop(drain_timeout_s=5)
    assert len(fake.ack_requests) == 1 and sorted(fake.ack_requests[0]) == sorted(fake.acked)


async def test_stop_waits_for_running_handlers_and_acks_them(
    broker: tuple[FakeBroker, Client],
) -> None:
    fake, client = broker
    gate = asyncio.Event()
    started = [0]

    async def handler(msg: ReceivedMessage) -> None:
        started[0] += 1
        await gate.wait()

    fake.put("a", "b", "c")
    c = consumer(client, handler, concurrency=3)
    c.start()
    await eventually(lambda: started[0] == 3)
    stopping = asyncio.create_task(c.stop(drain_timeout_s=30))
    await asyncio.sleep(0.2)
    assert not stopping.done()  # the handlers are still running
    receives = len(fake.receive_sizes)
    fake.put("late")
    gate.set()
    await asyncio.wait_for(stopping, 10)
    assert sorted(fake.acked) == ["r-a", "r-b", "r-c"]
    assert len(fake.receive_sizes) == receives and fake.ready  # nothing received after stop
    assert not c.running


async def test_stop_cancels_handlers_past_the_drain_timeout_without_acking(
    broker: tuple[FakeBroker, Client],
) -> None:
    fake, client = broker
    cancelled: list[str] = []

    async def handler(msg: ReceivedMessage) -> None:
        if msg.text == "slow":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(msg.text)
                raise

    fake.put("quick", "slow")
    c = consumer(client, handler, concurrency=2)
    c.start()
    await eventually(lambda: fake.acked == ["r-quick"] and not fake.ready)
    await asyncio.wait_for(c.stop(drain_timeout_s=0.2), 10)
    assert cancelled == ["slow"]
    assert fake.acked == ["r-quick"] and fake.nacked == []  # redelivered after invisible_ms


async def test_one_expired_receipt_does_not_lose_the_other_acks(
    broker: tuple[FakeBroker, Client], caplog: pytest.LogCaptureFixture
) -> None:
    fake, client = broker
    gate = asyncio.Event()
    started = [0]

    async def handler(msg: ReceivedMessage) -> None:
        started[0] += 1
        await gate.wait()

    fake.expired.add("r-b")
    fake.put("a", "b", "c")
    c = consumer(client, handler, concurrency=3)
    c.start()
    try:
        await eventually(lambda: started[0] == 3)
        gate.set()
        await eventually(lambda: len(fake.ack_requests) == 4)
    finally:
        await c.stop(drain_timeout_s=5)
    assert sorted(fake.acked) == ["r-a", "r-c"]
    assert "it will be redelivered" in caplog.text


async def test_receive_failures_back_off_and_the_consumer_recovers(
    broker: tuple[FakeBroker, Client], caplog: pytest.LogCaptureFixture
) -> None:
    fake, client = broker
    fake.failing_receives = 2
    caplog.set_level(logging.WARNING)

    async def handler(msg: ReceivedMessage) -> None:
        return None

    fake.put("a")
    c = consumer(client, handler)
    c.start()
    try:
        await eventually(lambda: fake.acked == ["r-a"])
    finally:
        await c.stop(drain_timeout_s=5)
    assert "receive from orders/billing failed" in caplog.text


async def test_start_twice_is_refused_and_stop_twice_is_harmless(
    broker: tuple[FakeBroker, Client],
) -> None:
    _, client = broker

    async def handler(msg: ReceivedMessage) -> None:
        return None

    async with consumer(client, handler) as c:
        with pytest.raises(RuntimeError):
            c.start()
    await c.stop()
    assert not c.running


async def test_a_missing_topic_is_said_once_and_retried_rarely_until_it_exists(
    broker: tuple[FakeBroker, Client], caplog: pytest.LogCaptureFixture
) -> None:
    fake, client = broker
    fake.missing_topic_receives = 5
    seen: list[str] = []

    async def handler(msg: ReceivedMessage) -> None:
        seen.append(msg.text)

    caplog.set_level(logging.WARNING, logger="tempomq.client.consumer")
    async with consumer(client, handler, permanent_retry_s=0.01) as c:
        await eventually(lambda: fake.missing_topic_receives == 0)
        fake.put("finally")
        await eventually(lambda: seen == ["finally"])
        assert c.blocked_by is None
    said = [r for r in caplog.records if "topic_not_found" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert said[0].levelno == logging.ERROR
    assert "asks again every 0.01s" in said[0].getMessage()
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_a_permanent_error_is_retried_at_a_long_interval_by_default() -> None:
    from tempomq.client import consumer as consumer_module

    assert consumer_module.PERMANENT_RETRY_S >= 30
