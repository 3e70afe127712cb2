"""A real server with ``--release-to`` NATS JetStream or RabbitMQ: delayed sends arrive in the
broker on time (never early) with their headers, plain sends go straight there, tempomq's
receive API answers ``409 consume_on_target`` naming where to consume, and a target that goes
down makes sends answer 503 with the reason and ``/readyz`` name it, while delayed messages wait
and are released once it is back, none lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.server import Server, call, until_ready
from tests.integration.target_services import (
    JetStreamReader,
    NatsProcess,
    RabbitReader,
    Received,
    require_nats,
    require_rabbitmq,
    unique,
)

pytestmark = pytest.mark.e2e


async def _until_count(reader: JetStreamReader, want: int, timeout_s: float) -> list[Received]:
    deadline = time.monotonic() + timeout_s
    while await reader.count() < want:
        assert time.monotonic() < deadline, f"{await reader.count()} of {want} arrived"
        await asyncio.sleep(0.05)
    return await reader.read_all()


def _check_on_time(got: Received, sent_at_ms: int, delay_ms: int) -> None:
    deliver_at = int(got.headers["DELIVER_AT"])
    released_at = int(got.headers["RELEASED_AT"])
    assert deliver_at >= sent_at_ms + delay_ms - 5
    assert released_at >= deliver_at, "released early"


async def test_nats_delayed_and_plain_sends_arrive_with_headers(tmp_path: Path) -> None:
    reader = JetStreamReader(require_nats(), unique("TQE"), unique("tqe"))
    await reader.open()
    server = Server(
        tmp_path / "d", "--release-to", reader.url, "--release-topic", reader.subject_template
    )
    try:
        server.start()
        async with aiohttp.ClientSession() as session:
            await until_ready(session, server.url)
            sent_at = int(time.time() * 1000)
            status, data = await call(
                session,
                "POST",
                f"{server.url}/v1/topics/orders/messages",
                {
                    "messages": [
                        {
                            "body": "later",
                            "delay_ms": 800,
                            "tags": "paid",
                            "keys": ["o-1"],
                            "properties": {"region": "eu"},
                        },
                        {"body": "now"},
                    ]
                },
            )
            assert status == 201, data
            later_id, now_id = (r["msg_id"] for r in data["results"])
            [first] = await _until_count(reader, 1, 5)
            assert first.body == b"now" and first.msg_id == now_id
            assert "DELIVER_AT" not in first.headers
            got = await _until_count(reader, 2, 10)
            delayed = next(r for r in got if r.msg_id == later_id)
            assert delayed.body == b"later"
            assert int(time.time() * 1000) >= sent_at + 800
            _check_on_time(delayed, sent_at, 800)
            assert delayed.headers["TEMPOMQ-Tags"] == "paid"
            assert delayed.headers["TEMPOMQ-Keys"] == '["o-1"]'
            assert delayed.headers["region"] == "eu"
            assert delayed.headers["TEMPOMQ-Topic"] == "orders"

            # A cancel made in time keeps a message out of the stream.
            status, data = await call(
                session,
                "POST",
                f"{server.url}/v1/topics/orders/messages",
                {"body": "cancelled", "delay_ms": 1500},
            )
            assert status == 201
            status, info = await call(
                session, "DELETE", f"{server.url}/v1/delayed/{data['msg_id']}"
            )
            assert status == 200, info

            for path in ("receive", "ack"):
                body: dict[str, Any] = {} if path == "receive" else {"receipts": ["x"]}
                status, err = await call(
                    session, "POST", f"{server.url}/v1/topics/orders/groups/g/{path}", body
                )
                assert status == 409, err
                assert err["error"] == "consume_on_target"
                assert f"{reader.prefix}.<topic>" in err["message"]
            await asyncio.sleep(2.0)
            assert await reader.count() == 2
    finally:
        server.ensure_stopped()
        await reader.close()


async def test_nats_down_sends_503_readyz_names_it_and_releases_wait(tmp_path: Path) -> None:
    nats_server = NatsProcess(tmp_path / "nats")
    nats_server.start()
    reader = JetStreamReader(nats_server.url, unique("TQW"), unique("tqw"))
    await reader.open()
    server = Server(
        tmp_path / "d",
        "--release-to",
        nats_server.url,
        "--release-topic",
        reader.subject_template,
    )
    try:
        server.start()
        async with aiohttp.ClientSession() as session:
            await until_ready(session, server.url)
            send = f"{server.url}/v1/topics/orders/messages"
            batch = {"messages": [{"body": f"d{i}", "delay_ms": 1500} for i in range(20)]}
            status, data = await call(session, "POST", send, batch)
            assert status == 201, data
            delayed = {r["msg_id"] for r in data["results"]}
            await reader.nc.close()
            nats_server.kill()

            deadline = time.monotonic() + 10
            while True:
                status, err = await call(session, "POST", send, {"body": "plain"})
                if status == 503:
                    break
                assert time.monotonic() < deadline, (status, err)
                await asyncio.sleep(0.1)
            assert err["error"] == "target_unavailable"
            assert nats_server.url in err["message"]
            async with session.get(f"{server.url}/readyz") as r:
                assert r.status == 503
                ready = await r.json()
            assert "release_target" in ready["checks"]
            assert nats_server.url in ready["checks"]["release_target"]

            await asyncio.sleep(2.5)  # the delayed ones fall due while the target is down
            nats_server.start()
            await reader.open(create=False)
            got = await _until_count(reader, 20, 20)
            assert {r.msg_id for r in got} == delayed
            for r in got:
                assert int(r.headers["RELEASED_AT"]) >= int(r.headers["DELIVER_AT"])
            await until_ready(session, server.url)
            status, data = await call(session, "POST", send, {"body": "plain again"})
            assert status == 201, data
            assert len(await _until_count(reader, 21, 5)) == 21
    finally:
        server.ensure_stopped()
        await reader.close(delete=False)
        nats_server.kill()


async def test_rabbitmq_delayed_and_plain_sends_arrive_with_headers(tmp_path: Path) -> None:
    rabbit = RabbitReader(require_rabbitmq(), unique("tqe-"))
    await rabbit.open("orders")
    server = Server(
        tmp_path / "d", "--release-to", rabbit.url, "--release-topic", rabbit.route_template
    )
    try:
        server.start()
        async with aiohttp.ClientSession() as session:
            await until_ready(session, server.url)
            sent_at = int(time.time() * 1000)
            status, data = await call(
                session,
                "POST",
                f"{server.url}/v1/topics/orders/messages",
                {"messages": [{"body": "later", "delay_ms": 600, "tags": "t"}, {"body": "now"}]},
            )
            assert status == 201, data
            later_id, now_id = (r["msg_id"] for r in data["results"])
            [first] = await rabbit.read(1, 5)
            assert (first.body, first.msg_id) == (b"now", now_id)
            [second] = await rabbit.read(1, 10)
            assert (second.body, second.msg_id) == (b"later", later_id)
            assert int(time.time() * 1000) >= sent_at + 600
            _check_on_time(second, sent_at, 600)
            assert second.headers["TEMPOMQ-Tags"] == "t"
            status, err = await call(
                session, "POST", f"{server.url}/v1/topics/orders/groups/g/receive", {}
            )
            assert status == 409 and err["error"] == "consume_on_target"
            assert f"exchange {rabbit.exchange}" in err["message"]
    finally:
        server.ensure_stopped()
        await rabbit.close()
