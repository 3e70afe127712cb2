"""The lean HTTP front (tempomq.lean) on a real listening socket, driven with raw bytes.

The differential part sends the same requests, good and bad, to a server with the lean path
on and to one with it off, and asserts the same status, JSON body (ids and times aside) and
headers that matter. The framing part checks what the lean path hands to aiohttp and what it
keeps: pipelining, split and chunked requests, Expect, HTTP/1.0, oversized heads and bodies,
Connection: close, the guard's header timeout and connection limit, keep-alive, a client that
hangs up on a long poll, graceful shutdown, and a connection that mixes lean and aiohttp
requests. Bounds are generous: a test waits for the server to act, it never times it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gzip
import io
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from broker_core import http as broker_http
from tempomq.app import GUARD, build_app, make_runner, make_site
from tempomq.client import Client
from tempomq.config import HostPort, Settings
from tempomq.lean import LeanFront
from tests.auth_helpers import (
    ADMIN_TOKEN,
    OWNER_TOKEN,
    STRANGER_TOKEN,
    WRONG_TOKEN,
    write_auth_file,
)
from tests.unit.test_app_service import json_log, log_lines

__all__ = ["json_log"]  # a fixture used here

MAX_REQUEST = 128 * 1024


@dataclasses.dataclass
class Served:
    port: int
    app: web.Application
    runner: web.AppRunner
    front: LeanFront | None


@asynccontextmanager
async def serving(path: Path, lean: bool, **overrides: Any) -> AsyncIterator[Served]:
    settings = Settings(
        http=HostPort("127.0.0.1", 0),
        data_dir=path / ("lean" if lean else "aiohttp"),
        http_lean=lean,
        max_body_bytes=4096,
        max_request_bytes=MAX_REQUEST,
        **overrides,
    )
    app = build_app(settings)
    runner = make_runner(app, settings)
    await runner.setup()
    site = make_site(app, runner, settings)
    await site.start()
    front = site.factory if isinstance(site.factory, LeanFront) else None
    served = Served(runner.addresses[0][1], app, runner, front)
    try:
        yield served
    finally:
        await runner.cleanup()


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, timeout_s: float = 10) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if status == 100:
        return await read_answer(reader, timeout_s)
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), timeout_s)
    return Answer(status, headers, body)


async def exchange(port: int, raw: bytes) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


def request(
    method: str,
    path: str,
    body: bytes | object = b"",
    headers: dict[str, str] | None = None,
    version: str = "1.1",
) -> bytes:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    head = f"{method} {path} HTTP/{version}\r\nHost: test\r\n"
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if "Transfer-Encoding" not in all_headers:
        all_headers.setdefault("Content-Length", str(len(raw)))
    head += "".join(f"{k}: {v}\r\n" for k, v in all_headers.items())
    return head.encode() + b"\r\n" + raw


def send(topic: str, body: object, headers: dict[str, str] | None = None) -> bytes:
    return request("POST", f"/v1/topics/{topic}/messages", body, headers)


def consume(action: str, body: object, headers: dict[str, str] | None = None) -> bytes:
    return request("POST", f"/v1/topics/t/groups/g/{action}", body, headers)


_IDS = re.compile(
    rb'"[0-9a-f]{32}"|\b1[0-9]{12}\b|"[0-9a-f]{1,8}-[0-9]+-[0-9]+-[0-9a-f]+"|[0-9]+\.[0-9]+s\b'
)


def comparable(answer: Answer) -> tuple[int, bytes, dict[str, str]]:
    """Status, body with ids, times and receipts blanked, and the headers that matter."""
    kept = {
        k: v
        for k, v in answer.headers.items()
        if k in ("content-type", "www-authenticate", "retry-after", "connection", "allow")
    }
    rid = answer.headers.get("x-request-id")  # none on aiohttp's parser errors
    kept["x-request-id"] = "given" if rid == "req-1.a:b" else "made" if rid else "none"
    assert "date" in answer.headers and "server" in answer.headers
    return answer.status, _IDS.sub(b"ID", answer.body), kept


async def setup_topic(port: int, token: str | None = None) -> None:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    for raw in (
        request("POST", "/v1/topics", {"name": "t", "queues": 2}, auth),
        request("POST", "/v1/topics", {"name": "orders", "queues": 2}, auth),
    ):
        assert (await exchange(port, raw)).status == 201


BIG = {"body": "x" * 100}
CASES: dict[str, bytes] = {
    "send": send("t", {"body": "hi"}, {"X-Request-Id": "req-1.a:b"}),
    "send delayed": send("t", {"body": "later", "delay_ms": 60_000}),
    "send deliver_at in the past": send("t", {"body": "x", "deliver_at": 1_000_000_000_000}),
    "send batch": send("t", {"messages": [{"body": "a"}, {"body_b64": "YWI="}, BIG]}),
    "send invalid JSON": send("t", b"{nope"),
    "send empty body": send("t", b""),
    "send not an object": send("t", b"[1, 2]"),
    "send unknown field": send("t", {"bod": "hi"}),
    "send bad body_b64": send("t", {"body_b64": "%%%"}),
    "send reserved property": send("t", {"body": "x", "properties": {"DELAY_AT": "1"}}),
    "send body over max-body-bytes": send("t", {"body": "x" * 5000}),
    "send batch over the limit": send("t", {"messages": [{"body": ""}] * 1001}),
    "send empty batch": send("t", {"messages": []}),
    "send unknown topic": send("nope", {"body": "x"}),
    "send reserved topic": send("SYS_x", {"body": "x"}),
    "send bad topic name": send("a%20b", {"body": "x"}),
    "send dot topic": send("..", {"body": "x"}),
    "send trailing slash": request("POST", "/v1/topics/t/messages/", {"body": "x"}),
    "send query string": request("POST", "/v1/topics/t/messages?x=1", {"body": "x"}),
    "send body over max-request-bytes": send("t", {"body": "x" * (MAX_REQUEST + 10)}),
    "send invalid request id": send("t", {"body": "x"}, {"X-Request-Id": "bad id!"}),
    "send wrong method": request("PUT", "/v1/topics/t/messages", {"body": "x"}),
    "send chunked": request(
        "POST",
        "/v1/topics/t/messages",
        b'e\r\n{"body": "hi"}\r\n0\r\n\r\n',
        {"Transfer-Encoding": "chunked"},
    ),
    "send HTTP/1.0": request("POST", "/v1/topics/t/messages", {"body": "x"}, version="1.0"),
    "send bad content-length": send("t", {"body": "x"}, {"Content-Length": "1x"}),
    "send huge content-length": send("t", {"body": "x"}, {"Content-Length": "9" * 5000}),
    "send bare LF": b"POST /v1/topics/t/messages HTTP/1.1\nContent-Length: 2\n\n{}",
    "send without Host (refused by aiohttp)": b"POST /v1/topics/t/messages HTTP/1.1\r\n"
    b'Content-Length: 12\r\n\r\n{"body":"x"}',
    "send two Content-Types (refused by aiohttp)": send("t", {"body": "x"}).replace(
        b"Host: test\r\n", b"Host: test\r\nContent-Type: text/plain\r\n"
    ),
    "send two User-Agents (refused by aiohttp)": send(
        "t", {"body": "x"}, {"User-Agent": "a\r\nUser-Agent: b"}
    ),
    "send Sec-WebSocket-Key1 (refused by aiohttp)": send(
        "t", {"body": "x"}, {"Sec-WebSocket-Key1": "x"}
    ),
    "send Proxy-Connection: close": send("t", {"body": "x"}, {"Proxy-Connection": "close"}),
    "send 128 headers": send("t", {"body": "x"}, {f"X-{i}": "y" for i in range(125)}),
    "send 129 headers (refused by aiohttp)": send(
        "t", {"body": "x"}, {f"X-{i}": "y" for i in range(126)}
    ),
    "receive": consume("receive", {"max_messages": 1}),
    "receive wait": consume("receive", {"max_messages": 5, "wait_ms": 50}),
    "receive bad field": consume("receive", {"max": 1}),
    "receive bad value": consume("receive", {"max_messages": 0}),
    "receive not an object": consume("receive", b'"x"'),
    "receive unknown topic": request("POST", "/v1/topics/nope/groups/g/receive", {}),
    "receive wrong method": request("GET", "/v1/topics/t/groups/g/receive"),
    "ack stale receipt": consume("ack", {"receipts": ["0-0-0-1"]}),
    "ack no receipts": consume("ack", {"receipts": []}),
    "nack neither": consume("nack", {}),
    "nack stale": consume("nack", {"receipt": "0-0-0-1"}),
    "change-invisible no receipt": consume("change-invisible", {"invisible_ms": 100}),
    "change-invisible stale": consume("change-invisible", {"receipt": "x", "invisible_ms": 1}),
    "healthz": request("GET", "/healthz"),
    "topic list (aiohttp's)": request("GET", "/v1/topics"),
}


async def answers(
    tmp_path: Path, lean: bool, cases: dict[str, bytes], *, token: str | None = None, **kw: Any
) -> tuple[dict[str, tuple[int, bytes, dict[str, str]]], int]:
    async with serving(tmp_path, lean, **kw) as served:
        await setup_topic(served.port, token)
        out = {name: comparable(await exchange(served.port, raw)) for name, raw in cases.items()}
        return out, served.front.handed_over if served.front else -1


async def test_lean_and_aiohttp_give_the_same_answers(tmp_path: Path) -> None:
    lean, handed_over = await answers(tmp_path, True, CASES)
    plain, _ = await answers(tmp_path, False, CASES)
    for name in CASES:
        assert lean[name] == plain[name], name
    assert lean["send"][0] == 201 and lean["send"][2]["x-request-id"] == "given"
    assert lean["send invalid request id"][2]["x-request-id"] == "made"
    assert lean["send body over max-request-bytes"][0] == 413
    # The setup's two topic creations, and every case aiohttp answers, went to aiohttp.
    to_aiohttp = (
        "trailing slash",
        "query string",
        "bad topic name",
        "dot topic",
        "body over max-request-bytes",
        "wrong method",
        "chunked",
        "HTTP/1.0",
        "content-length",
        "bare LF",
        "topic list",
        "refused by aiohttp",
        "Proxy-Connection",
    )
    assert handed_over == 2 + sum(1 for n in CASES if any(t in n for t in to_aiohttp))


AUTH_CASES = {
    "no token": send("orders", {"body": "x"}),
    "wrong token": send("orders", {"body": "x"}, {"Authorization": f"Bearer {WRONG_TOKEN}"}),
    "not bearer": send("orders", {"body": "x"}, {"Authorization": "Basic eDp5"}),
    "owner": send("orders", {"body": "x"}, {"Authorization": f"Bearer {OWNER_TOKEN}"}),
    "stranger": send("orders", {"body": "x"}, {"Authorization": f"Bearer {STRANGER_TOKEN}"}),
    "admin": send("orders", {"body": "x"}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}),
    "stranger receives": request(
        "POST",
        "/v1/topics/orders/groups/billing/receive",
        {},
        {"Authorization": f"Bearer {STRANGER_TOKEN}"},
    ),
    "owner receives": request(
        "POST",
        "/v1/topics/orders/groups/billing/receive",
        {},
        {"Authorization": f"Bearer {OWNER_TOKEN}"},
    ),
    "healthz without a token": request("GET", "/healthz"),
}


async def test_auth_answers_are_the_same(tmp_path: Path) -> None:
    auth_file = write_auth_file(tmp_path / "auth.yaml")
    kw = {"auth_file": auth_file}
    lean, _ = await answers(tmp_path, True, AUTH_CASES, token=ADMIN_TOKEN, **kw)
    plain, _ = await answers(tmp_path, False, AUTH_CASES, token=ADMIN_TOKEN, **kw)
    for name in AUTH_CASES:
        assert lean[name] == plain[name], name
    assert lean["no token"][0] == 401 and "www-authenticate" in lean["no token"][2]
    assert lean["stranger"][0] == 403
    assert lean["owner"][0] == 201


async def test_rate_limited_answers_are_the_same(tmp_path: Path) -> None:
    cases = {f"send {i}": send("t", {"body": "x"}) for i in range(4)}
    kw = {"rate_limit": 0.001, "rate_burst": 4.0}  # the setup's two requests take two
    lean, _ = await answers(tmp_path, True, cases, **kw)
    plain, _ = await answers(tmp_path, False, cases, **kw)
    assert lean == plain
    assert [lean[n][0] for n in cases] == [201, 201, 429, 429]
    assert "retry-after" in lean["send 3"][2]


async def test_consume_on_target_answers_the_same(tmp_path: Path) -> None:
    cases = {"receive": consume("receive", {}), "ack": consume("ack", {"receipts": ["x"]})}
    kw = {"release_to": "nats://127.0.0.1:1"}  # nothing listens: the start does not wait
    lean, _ = await answers(tmp_path, True, cases, **kw)
    plain, _ = await answers(tmp_path, False, cases, **kw)
    assert lean == plain
    assert lean["receive"][0] == 409


# -- framing ------------------------------------------------------------------------------------


#: The framing tests run with the lean path on and off: aiohttp's behaviour is the reference.
BOTH = pytest.mark.parametrize("lean", [True, False], ids=["lean", "aiohttp"])


@pytest.fixture(params=[True, False], ids=["lean", "aiohttp"])
async def lean_server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    async with serving(tmp_path, request.param) as served:
        await setup_topic(served.port)
        if served.front is not None:
            served.front.handed_over = 0  # the setup's topic creations went to aiohttp
        yield served


def handed_over(served: Served) -> int | None:
    """Connections the lean path handed to aiohttp; None with the lean path off."""
    return served.front.handed_over if served.front is not None else None


async def test_pipelined_requests_are_answered_in_order(lean_server: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", lean_server.port)
    ids = [f"pipe-{i}" for i in range(5)]
    writer.write(b"".join(send("t", {"body": i}, {"X-Request-Id": i}) for i in ids))
    got = [await read_answer(reader) for _ in ids]
    assert [a.headers["x-request-id"] for a in got] == ids
    assert all(a.status == 201 for a in got)
    writer.close()


async def test_a_client_that_pipelines_megabytes_before_reading_gets_every_answer(
    lean_server: Served,
) -> None:
    # More than HIGH_WATER behind the request in flight: reading pauses and resumes, and the
    # answers, which the client reads only later, fill the socket: writing pauses too.
    reader, writer = await asyncio.open_connection("127.0.0.1", lean_server.port)
    n = 3000
    writer.write(b"".join(send("t", {"body": f"{i:04}" + "x" * 1000}) for i in range(n)))
    got = [await read_answer(reader, 60) for _ in range(n)]
    assert all(a.status == 201 for a in got)
    received = await exchange(lean_server.port, consume("receive", {"max_messages": 1}))
    assert received.json()["messages"][0]["body"].startswith("0000")
    writer.close()


async def test_a_request_split_byte_by_byte(lean_server: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", lean_server.port)
    for i in range(2):  # twice: the second on the kept-alive connection
        for byte in send("t", {"body": "slow"}, {"X-Request-Id": f"split-{i}"}):
            writer.write(bytes([byte]))
            await writer.drain()
        answer = await read_answer(reader)
        assert (answer.status, answer.headers["x-request-id"]) == (201, f"split-{i}")
    assert handed_over(lean_server) in (0, None)
    writer.close()


async def test_expect_100_continue(lean_server: Served) -> None:
    raw = send("t", {"body": "x"}, {"Expect": "100-continue"})
    reader, writer = await asyncio.open_connection("127.0.0.1", lean_server.port)
    head, _, body = raw.partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert first.startswith(b"HTTP/1.1 100")
    writer.write(body)
    assert (await read_answer(reader)).status == 201
    writer.close()


async def test_a_compressed_body_is_read_as_its_content_encoding_says(
    lean_server: Served,
) -> None:
    """aiohttp decodes a gzip or deflate body; the lean path leaves such requests to it rather
    than read compressed bytes as JSON. A body that is not what its encoding says is 400
    ``invalid_message``, the send route's code for a body it cannot read (API.md)."""
    body = gzip.compress(orjson.dumps({"body": "zipped"}))
    answer = await exchange(lean_server.port, send("t", body, {"Content-Encoding": "gzip"}))
    assert answer.status == 201, answer.body
    got = await exchange(lean_server.port, consume("receive", {"max_messages": 1}))
    assert [m["body"] for m in orjson.loads(got.body)["messages"]] == ["zipped"]
    bad = await exchange(lean_server.port, send("t", b"not gzip", {"Content-Encoding": "gzip"}))
    error = orjson.loads(bad.body)
    assert (bad.status, error["error"]) == (400, "invalid_message"), error
    assert error["message"] == "request body unreadable: Can not decode content-encoding: gzip"


async def test_the_sdk_keeps_its_sends_on_lean_connections(tmp_path: Path) -> None:
    """The SDK's other calls (create_topic, get_topic) go on connections of their own: on the
    connection its sends use, the first of them would have handed it to aiohttp for good."""
    async with serving(tmp_path, True) as served:
        assert served.front is not None
        async with Client(f"http://127.0.0.1:{served.port}") as client:
            await client.create_topic("sdk", queues=1)
            for i in range(3):
                await client.send("sdk", f"m{i}")
                await client.get_topic("sdk")
            got = await client.receive("sdk", "g", max_messages=10)
            await client.ack("sdk", "g", [m.receipt for m in got])
            assert sorted(m.body for m in got) == [b"m0", b"m1", b"m2"]
            # One connection for the rest went to aiohttp; the sends' one is still lean.
            assert served.front.handed_over == 1
            assert len(served.front.connections) == 1


async def test_connection_close_is_honoured(lean_server: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", lean_server.port)
    writer.write(send("t", {"body": "x"}, {"Connection": "close"}))
    answer = await read_answer(reader)
    assert answer.status == 201 and answer.headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
    writer.close()


async def test_bytes_after_a_connection_close_request_are_refused(lean_server: Served) -> None:
    # aiohttp's parser refuses the whole chunk (400); the lean path hands it over.
    reader, writer = await asyncio.open_connection("127.0.0.1", lean_server.port)
    writer.write(send("t", {"body": "x"}, {"Connection": "close"}) + send("t", {"body": "y"}))
    answer = await read_answer(reader)
    assert (answer.status, answer.json()["error"]) == (400, "bad_request")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_oversized_head_goes_to_aiohttp(tmp_path: Path) -> None:
    raw = send("t", {"body": "x"}, {"X-Big": "y" * 9000})
    async with serving(tmp_path, True) as on, serving(tmp_path, False) as off:
        a, b = await exchange(on.port, raw), await exchange(off.port, raw)
    assert a.status == b.status and a.status >= 400
    assert a.json() == b.json()


@BOTH
async def test_the_header_timeout_cuts_a_slow_client(tmp_path: Path, lean: bool) -> None:
    async with serving(tmp_path, lean, header_timeout_ms=300) as served:
        await setup_topic(served.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        # A first request, then the head of a second one that never completes.
        writer.write(send("t", {"body": "x"}))
        assert (await read_answer(reader)).status == 201
        writer.write(b"POST /v1/topics/t/messages HTTP/1.1\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert served.app[GUARD].timed_out == 1


async def test_the_header_timeout_cuts_an_incomplete_pipelined_head(tmp_path: Path) -> None:
    # Only the lean path: aiohttp's guard middleware cannot see bytes its parser holds, so a
    # head that came with the request before it is left to the keep-alive timeout there.
    async with serving(tmp_path, True, header_timeout_ms=300) as served:
        await setup_topic(served.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(send("t", {"body": "x"}) + b"POST /v1/topics/t/messages HTTP/1.1\r\n")
        assert (await read_answer(reader)).status == 201
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert served.app[GUARD].timed_out == 1


@BOTH
async def test_the_connection_limit_holds(tmp_path: Path, lean: bool) -> None:
    async with serving(tmp_path, lean, max_connections=2) as served:
        await setup_topic(served.port)
        held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(2)]
        for reader, writer in held:
            writer.write(send("t", {"body": "x"}))
            assert (await read_answer(reader)).status == 201
        answer = await exchange(served.port, send("t", {"body": "x"}))
        assert (answer.status, answer.json()["error"]) == (503, "too_many_connections")
        for _, writer in held:
            writer.close()


@BOTH
async def test_an_idle_connection_closes_after_the_keepalive_timeout(
    tmp_path: Path, lean: bool
) -> None:
    async with serving(tmp_path, lean, keepalive_timeout_ms=300) as served:
        await setup_topic(served.port)
        if served.front is not None:
            served.front.handed_over = 0
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(send("t", {"body": "x"}))
        assert (await read_answer(reader)).status == 201
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert handed_over(served) in (0, None)


async def test_a_client_that_hangs_up_on_a_long_poll_takes_no_message(lean_server: Served) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", lean_server.port)
    writer.write(consume("receive", {"wait_ms": 30_000, "invisible_ms": 600_000}))
    await writer.drain()
    await asyncio.sleep(0.2)  # the poll is waiting
    writer.close()
    await asyncio.sleep(0.2)  # the server has seen the hang-up
    assert (await exchange(lean_server.port, send("t", {"body": "kept"}))).status == 201
    got = await exchange(lean_server.port, consume("receive", {"wait_ms": 5000}))
    assert [m["body"] for m in got.json()["messages"]] == ["kept"]


@BOTH
async def test_shutdown_answers_an_open_long_poll(tmp_path: Path, lean: bool) -> None:
    async with serving(tmp_path, lean, shutdown_timeout_ms=5000) as served:
        await setup_topic(served.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", served.port)
        idle_writer.write(request("GET", "/healthz"))
        assert (await read_answer(idle_reader)).status == 200
        writer.write(consume("receive", {"wait_ms": 60_000}))
        await writer.drain()
        await asyncio.sleep(0.2)
        cleanup = asyncio.create_task(served.runner.cleanup())
        answer = await read_answer(reader)
        assert (answer.status, answer.json()) == (200, {"messages": []})
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""  # idle: closed
        await asyncio.wait_for(cleanup, 10)


async def test_a_mixed_connection(lean_server: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", lean_server.port)
    steps: list[tuple[bytes, Callable[[Answer], bool]]] = [
        (send("t", {"body": "1"}), lambda a: a.status == 201),
        (request("GET", "/v1/topics"), lambda a: a.status == 200 and "topics" in a.json()),
        (send("t", {"body": "2"}), lambda a: a.status == 201),
        (request("GET", "/metrics"), lambda a: b"tempomq_http_request_seconds" in a.body),
    ]
    for raw, ok in steps:
        writer.write(raw)
        answer = await read_answer(reader)
        assert ok(answer), answer
    assert handed_over(lean_server) in (1, None)
    writer.close()


async def test_a_pipelined_mix_is_answered_in_order(lean_server: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", lean_server.port)
    writer.write(
        send("t", {"body": "1"}, {"X-Request-Id": "one"})
        + request("GET", "/v1/topics", headers={"X-Request-Id": "two"})
        + send("t", {"body": "3"}, {"X-Request-Id": "three"})
    )
    got = [await read_answer(reader) for _ in range(3)]
    assert [(a.status, a.headers["x-request-id"]) for a in got] == [
        (201, "one"),
        (200, "two"),
        (201, "three"),
    ]
    writer.close()


async def test_lean_requests_are_counted_in_the_request_metric(lean_server: Served) -> None:
    assert (await exchange(lean_server.port, send("t", {"body": "x"}))).status == 201
    metrics = (await exchange(lean_server.port, request("GET", "/metrics"))).body.decode()
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith("tempomq_http_request_seconds_count")
        and 'route="/v1/topics/{topic}/messages"' in x
        and 'status="201"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 503, "store_unavailable"),
        (RuntimeError("a bug"), 500, "internal"),
    ],
)
async def test_unexpected_errors_answer_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, status: int, code: str
) -> None:
    async def failing(*args: object) -> dict[str, object]:
        raise error

    monkeypatch.setattr(broker_http, "send", failing)
    cases = {"send": send("t", {"body": "x"}, {"X-Request-Id": "req-1.a:b"})}
    lean, _ = await answers(tmp_path, True, cases)
    plain, _ = await answers(tmp_path, False, cases)
    assert lean == plain
    assert lean["send"][0] == status and orjson.loads(lean["send"][1])["error"] == code


async def test_audit_and_request_log_lines_are_the_same(
    tmp_path: Path, json_log: io.StringIO
) -> None:
    auth_file = write_auth_file(tmp_path / "auth.yaml")
    cases = {
        "admin send": send("orders", {"body": "x"}, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    }
    lines = {}
    for lean in (True, False):
        json_log.truncate(0)
        json_log.seek(0)
        await answers(tmp_path, lean, cases, token=ADMIN_TOKEN, auth_file=auth_file)
        lines[lean] = [
            {k: v for k, v in line.items() if k not in ("timestamp", "request_id", "duration_ms")}
            for line in log_lines(json_log)
            if line.get("event") in ("audit", "request")
            and line.get("path", "").endswith("/messages")
        ]
    assert lines[True] == lines[False]
    assert [line["event"] for line in lines[True]] == ["audit", "request"]
    assert lines[True][0]["principal"] == "ops" and lines[True][0]["status"] == 201


@BOTH
@pytest.mark.parametrize("refusal", ["no token", "rate limit"])
async def test_a_refused_request_is_answered_before_its_large_body_is_in(
    tmp_path: Path, lean: bool, refusal: str
) -> None:
    """aiohttp authenticates and rate-limits a request once its head is in and reads no more of
    a body it refuses; the lean path, which reads a body whole first, leaves a large one to it,
    so a client without credentials cannot make the server hold a large body per connection."""
    auth = refusal == "no token"
    kw: dict[str, Any] = (
        {"auth_file": write_auth_file(tmp_path / "auth.yaml")}
        if auth
        else {"rate_limit": 0.001, "rate_burst": 2.0}  # the setup's two requests take both
    )
    async with serving(tmp_path, lean, **kw) as served:
        await setup_topic(served.port, ADMIN_TOKEN if auth else None)
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        head = send("t", b"").replace(b"Content-Length: 0", b"Content-Length: 100000")
        writer.write(head + b"x" * 1000)  # the rest of the body never comes
        answer = await read_answer(reader)
        assert answer.status == (401 if auth else 429)
        writer.close()


async def test_the_header_timeout_cuts_a_client_that_dribbles_a_body(tmp_path: Path) -> None:
    # The lean path authenticates a request once its body is in: until then the guard's timer
    # runs, so a client without credentials cannot hold a connection with a body that never
    # ends (aiohttp answers such a client 401 after the head and closes after lingering).
    auth_file = write_auth_file(tmp_path / "auth.yaml")
    async with serving(tmp_path, True, header_timeout_ms=300, auth_file=auth_file) as served:
        await setup_topic(served.port, ADMIN_TOKEN)
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        for _ in range(2):  # twice: the second on the kept-alive connection
            writer.write(send("t", {"body": "x"}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}))
            assert (await read_answer(reader)).status == 201
        head = send("t", b"").replace(b"Content-Length: 0", b"Content-Length: 1000")
        writer.write(head + b"{")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert served.app[GUARD].timed_out == 1
        writer.close()
