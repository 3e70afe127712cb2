"""tempomq.client.Client against small in-test HTTP servers: failover, which calls are retried,
idempotent resends, error mapping, bodies, batching; and that the SDK imports no server code."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tempomq.client import (
    AlreadyDelivered,
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    GroupNotFound,
    InvalidMessage,
    MessageNotFound,
    MessageTooLarge,
    MsgIdConflict,
    NotFound,
    OutgoingMessage,
    ReceiptExpired,
    RequestTimedOut,
    ServerError,
    StoreUnavailable,
    TempoClientError,
    TopicExists,
    TopicNotFound,
    Unavailable,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServerFactory = Callable[..., Awaitable[TestServer]]
MSG_ID = re.compile(r"^[0-9a-f]{32}$")
STORED = {
    "msg_id": "0" * 32,
    "topic": "orders",
    "queue_id": 1,
    "body": "hello",
    "tags": "created",
    "keys": ["k1"],
    "properties": {"a": "b"},
    "born_at": 1,
    "stored_at": 2,
}


class Fake:
    """An HTTP server whose every request goes to one handler; it records what it was asked."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, str, Any]] = []
        self.server: TestServer | None = None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path_qs, body))
        return await self.handler(request)

    async def start(self, aiohttp_server: ServerFactory) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.server = await aiohttp_server(app)
        return str(self.server.make_url("/"))

    @property
    def hits(self) -> int:
        return len(self.requests)


def answer(status: int, payload: Any) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(payload, status=status)

    return handler


def unavailable(times: int, then: Handler) -> Handler:
    """503 store_unavailable for the first ``times`` requests, then ``then``."""
    left = [times]

    async def handler(request: web.Request) -> web.StreamResponse:
        if left[0] > 0:
            left[0] -= 1
            return web.json_response({"error": "store_unavailable", "message": "x"}, status=503)
        return await then(request)

    return handler


def sent(status: int = 201) -> Handler:
    """Answers a send the way the server does, echoing the ids it was given."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "messages" in body:
            results = [{"msg_id": m["msg_id"], "queue_id": 0} for m in body["messages"]]
            return web.json_response({"results": results}, status=status)
        return web.json_response({"msg_id": body["msg_id"], "queue_id": 3}, status=status)

    return handler


def closed_port_url() -> str:
    """An address nobody listens on: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def fake(aiohttp_server: ServerFactory, handler: Handler) -> tuple[Fake, str]:
    f = Fake(handler)
    return f, await f.start(aiohttp_server)


# -- failover --------------------------------------------------------------------------------


async def test_fails_over_to_the_second_endpoint_when_the_first_is_down(
    aiohttp_server: ServerFactory,
) -> None:
    good, url = await fake(aiohttp_server, sent())
    async with Client([closed_port_url(), url], retries=1) as client:
        first = await client.send("orders", "a")
        assert client.current_endpoint == url.rstrip("/")
        await client.send("orders", "b")
    assert MSG_ID.match(first.msg_id) and first.queue_id == 3
    assert good.hits == 2


async def test_fails_over_on_503_and_sticks_to_the_healthy_endpoint(
    aiohttp_server: ServerFactory,
) -> None:
    sick, sick_url = await fake(aiohttp_server, unavailable(100, sent()))
    good, good_url = await fake(aiohttp_server, answer(200, STORED))
    async with Client([sick_url, good_url]) as client:
        for _ in range(3):
            assert (await client.get_message("0" * 32)).text == "hello"
    assert (sick.hits, good.hits) == (1, 3)


async def test_comma_separated_endpoints_without_scheme(aiohttp_server: ServerFactory) -> None:
    _, url = await fake(aiohttp_server, answer(200, STORED))
    host_port = url.removeprefix("http://").rstrip("/")
    client = Client(f" {host_port}/ , {host_port}")
    assert client.endpoints == (f"http://{host_port}",)
    await client.close()
    with pytest.raises(ValueError):
        Client(" , ")


# -- what is retried -------------------------------------------------------------------------


async def test_a_resent_send_carries_the_same_msg_id(aiohttp_server: ServerFactory) -> None:
    server, url = await fake(aiohttp_server, unavailable(2, sent()))
    async with Client(url) as client:
        result = await client.send("orders", "a", keys=["order-1"])
    ids = {body["msg_id"] for _, _, body in server.requests}
    assert server.hits == 3
    assert ids == {result.msg_id}


async def test_a_send_that_timed_out_is_resent_with_the_same_msg_id(
    aiohttp_server: ServerFactory,
) -> None:
    calls = [0]

    async def slow_first(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        if calls[0] == 1:
            await asyncio.sleep(5)  # the client gives up long before; the request did arrive
        return await sent()(request)

    server, url = await fake(aiohttp_server, slow_first)
    async with Client(url, timeout_s=0.2) as client:
        result = await client.send("orders", b"\x00\x01")
    first, second = (body for _, _, body in server.requests)
    assert first == second and first["msg_id"] == result.msg_id


async def test_a_batch_resend_keeps_every_msg_id(aiohttp_server: ServerFactory) -> None:
    server, url = await fake(aiohttp_server, unavailable(1, sent()))
    messages = [OutgoingMessage(f"m{i}") for i in range(3)]
    async with Client(url) as client:
        results = await client.send_batch("orders", messages)
    first, second = (body for _, _, body in server.requests)
    assert first == second
    assert [r.msg_id for r in results] == [m["msg_id"] for m in first["messages"]]
    assert len(set(r.msg_id for r in results)) == 3


async def test_a_message_with_its_own_msg_id_keeps_it(aiohttp_server: ServerFactory) -> None:
    server, url = await fake(aiohttp_server, sent())
    async with Client(url) as client:
        result = await client.send("orders", "a", msg_id="ab" * 16)
    assert result.msg_id == "ab" * 16 == server.requests[0][2]["msg_id"]


async def test_idempotent_calls_are_retried_a_bounded_number_of_times(
    aiohttp_server: ServerFactory,
) -> None:
    server, url = await fake(aiohttp_server, unavailable(100, answer(200, STORED)))
    async with Client(url, retries=2) as client:
        with pytest.raises(StoreUnavailable):
            await client.get_message("0" * 32)
    assert server.hits == 3


DELAYED = {"msg_id": "0" * 32, "topic": "orders", "deliver_at": 5, "state": "cancelled"}


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_delayed("0" * 32),
        lambda c: c.cancel_delayed("0" * 32),
        lambda c: c.reschedule_delayed("0" * 32, deliver_at=5),
    ],
    ids=["get", "cancel", "reschedule"],
)
async def test_delayed_message_calls_are_retried(
    aiohttp_server: ServerFactory, call: Callable[[Client], Awaitable[Any]]
) -> None:
    server, url = await fake(aiohttp_server, unavailable(1, answer(200, DELAYED)))
    async with Client(url) as client:
        assert (await call(client)).deliver_at == 5
    assert server.hits == 2


NOT_REPEATED: dict[str, Callable[[Client], Awaitable[Any]]] = {
    "receive": lambda c: c.receive("orders", "g", wait_ms=0),
    "ack": lambda c: c.ack("orders", "g", ["r1"]),
    "nack": lambda c: c.nack("orders", "g", "r1"),
    "create_topic": lambda c: c.create_topic("orders"),
    "create_group": lambda c: c.create_group("g"),
}


@pytest.mark.parametrize("name", sorted(NOT_REPEATED))
async def test_non_idempotent_calls_are_not_repeated_once_sent(
    aiohttp_server: ServerFactory, name: str
) -> None:
    sick, sick_url = await fake(aiohttp_server, unavailable(100, answer(200, {})))
    other, other_url = await fake(aiohttp_server, answer(200, {}))
    async with Client([sick_url, other_url]) as client:
        with pytest.raises(Unavailable):
            await NOT_REPEATED[name](client)
        # Not repeated anywhere, but the next call goes to the other endpoint.
        assert (sick.hits, other.hits) == (1, 0)
        assert client.current_endpoint == other_url.rstrip("/")


async def test_non_idempotent_calls_are_not_repeated_after_a_timeout(
    aiohttp_server: ServerFactory,
) -> None:
    async def stuck(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response({"acked": 1})

    server, url = await fake(aiohttp_server, stuck)
    async with Client(url, timeout_s=0.2) as client:
        with pytest.raises(RequestTimedOut):
            await client.ack("orders", "g", ["r1"])
    assert server.hits == 1


@pytest.mark.parametrize("name", sorted(NOT_REPEATED))
async def test_non_idempotent_calls_move_on_when_the_connection_never_opened(
    aiohttp_server: ServerFactory, name: str
) -> None:
    payloads = {"receive": {"messages": []}, "ack": {"acked": 1}}
    payload = payloads.get(name, {"name": "orders", "queues": 8, "nacked": 1})
    good, url = await fake(aiohttp_server, answer(200, payload))
    async with Client([closed_port_url(), url]) as client:
        await NOT_REPEATED[name](client)
    assert good.hits == 1


async def test_every_endpoint_down_raises_connection_failed() -> None:
    async with Client([closed_port_url(), closed_port_url()], retries=3) as client:
        with pytest.raises(ConnectionFailed) as info:
            await client.ack("orders", "g", ["r1"])
    assert info.value.sent is False and info.value.status == 0


async def test_a_server_error_is_final(aiohttp_server: ServerFactory) -> None:
    server, url = await fake(aiohttp_server, answer(500, {"error": "internal", "message": "r-1"}))
    async with Client(url) as client:
        with pytest.raises(ServerError):
            await client.get_message("0" * 32)
    assert server.hits == 1


# -- receipts go back to the server that issued them -----------------------------------------


def delivery(receipt: str) -> dict[str, Any]:
    return {**STORED, "receipt": receipt, "delivery_attempt": 1}


async def test_acks_and_nacks_go_to_the_endpoint_that_issued_the_receipt(
    aiohttp_server: ServerFactory,
) -> None:
    issued = [False]

    async def first(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/receive") and not issued[0]:
            issued[0] = True
            return web.json_response({"messages": [delivery("r-a1"), delivery("r-a2")]})
        if request.path.endswith("/ack"):
            return web.json_response({"acked": len((await request.json())["receipts"])})
        if request.path.endswith("/nack"):
            return web.json_response({"nacked": 1})
        return web.json_response({"error": "store_unavailable", "message": "x"}, status=503)

    a, a_url = await fake(aiohttp_server, first)
    b, b_url = await fake(aiohttp_server, answer(200, STORED))
    async with Client([a_url, b_url]) as client:
        m1, m2 = await client.receive("orders", "g", wait_ms=0)
        await client.get_message("0" * 32)  # a answers 503: the client moves to b
        assert client.current_endpoint == b_url.rstrip("/")
        assert await client.ack("orders", "g", [m1]) == 1
        await client.nack("orders", "g", m2, retry_after_ms=10)
    assert [path for _, path, _ in a.requests][-2:] == [
        "/v1/topics/orders/groups/g/ack",
        "/v1/topics/orders/groups/g/nack",
    ]
    assert a.requests[-2][2] == {"receipts": ["r-a1"]}
    assert a.requests[-1][2] == {"receipt": "r-a2", "retry_after_ms": 10}
    assert all(path == "/v1/messages/" + "0" * 32 for _, path, _ in b.requests)


async def test_change_invisible_goes_to_the_issuer_and_returns_the_new_receipt(
    aiohttp_server: ServerFactory,
) -> None:
    async def issuer(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/receive"):
            return web.json_response({"messages": [delivery("r-1")]})
        if request.path.endswith("/change-invisible"):
            return web.json_response({"receipt": "r-2"})
        return web.json_response({"error": "store_unavailable", "message": "x"}, status=503)

    a, a_url = await fake(aiohttp_server, issuer)
    _, b_url = await fake(aiohttp_server, answer(200, STORED))
    async with Client([a_url, b_url]) as client:
        [m] = await client.receive("orders", "g", wait_ms=0)
        await client.get_message("0" * 32)  # a answers 503: the client moves to b
        changed = await client.change_invisible("orders", "g", m, 60_000)
        assert (changed.receipt, changed.endpoint, changed.msg_id) == ("r-2", m.endpoint, m.msg_id)
        assert m.receipt == "r-1"
    assert a.requests[-1][1] == "/v1/topics/orders/groups/g/change-invisible"
    assert a.requests[-1][2] == {"receipt": "r-1", "invisible_ms": 60_000}


async def test_a_long_poll_gets_its_wait_on_top_of_the_timeout(
    aiohttp_server: ServerFactory,
) -> None:
    async def long_poll(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep((await request.json())["wait_ms"] / 1000)
        return web.json_response({"messages": []})

    _, url = await fake(aiohttp_server, long_poll)
    async with Client(url, timeout_s=1.0) as client:
        assert await client.receive("orders", "g", wait_ms=1500) == []


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (404, "topic_not_found", TopicNotFound),
        (404, "message_not_found", MessageNotFound),
        (404, "group_not_found", GroupNotFound),
        (404, "some_new_code", NotFound),
        (409, "topic_exists", TopicExists),
        (409, "receipt_expired", ReceiptExpired),
        (409, "already_delivered", AlreadyDelivered),
        (409, "msg_id_conflict", MsgIdConflict),
        (409, "something_else", Conflict),
        (400, "invalid_message", InvalidMessage),
        (400, "bad_request", BadRequest),
        (413, "message_too_large", MessageTooLarge),
        (405, "method_not_allowed", TempoClientError),
    ],
)
async def test_errors_map_to_their_classes(
    aiohttp_server: ServerFactory, status: int, code: str, cls: type[TempoClientError]
) -> None:
    _, url = await fake(aiohttp_server, answer(status, {"error": code, "message": "why"}))
    async with Client(url) as client:
        with pytest.raises(cls) as info:
            await client.get_message("0" * 32)
    assert type(info.value) is cls
    assert (info.value.status, info.value.code, info.value.message) == (status, code, "why")


async def test_a_proxy_error_page_is_unavailable_and_retried(
    aiohttp_server: ServerFactory,
) -> None:
    calls = [0]

    async def gateway(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        if calls[0] == 1:
            return web.Response(status=502, text="<html>Bad Gateway</html>")
        return web.json_response(STORED)

    _, url = await fake(aiohttp_server, gateway)
    async with Client(url) as client:
        assert (await client.get_message("0" * 32)).msg_id == "0" * 32
    async with Client(url, retries=0) as client:
        calls[0] = 0
        with pytest.raises(Unavailable) as info:
            await client.get_message("0" * 32)
    assert info.value.status == 502 and "Bad Gateway" in info.value.message


# -- bodies and shapes -----------------------------------------------------------------------


async def test_str_goes_as_body_bytes_as_body_b64(aiohttp_server: ServerFactory) -> None:
    server, url = await fake(aiohttp_server, sent())
    async with Client(url) as client:
        await client.send("orders", "héllo", tags="t", keys=["k"], properties={"p": "1"})
        await client.send("orders", b"\xff\x00", sharding_key="u-7", delay_ms=30000)
    text, raw = (body for _, _, body in server.requests)
    assert text["body"] == "héllo" and "body_b64" not in text
    assert (text["tags"], text["keys"], text["properties"]) == ("t", ["k"], {"p": "1"})
    assert raw["body_b64"] == base64.b64encode(b"\xff\x00").decode() and "body" not in raw
    assert (raw["sharding_key"], raw["delay_ms"]) == ("u-7", 30000)


async def test_received_bodies_are_bytes_with_text(aiohttp_server: ServerFactory) -> None:
    as_b64 = {**delivery("r2"), "body_b64": base64.b64encode(b"\xff").decode()}
    del as_b64["body"]
    _, url = await fake(aiohttp_server, answer(200, {"messages": [delivery("r1"), as_b64]}))
    async with Client(url) as client:
        text, raw = await client.receive("orders", "g", wait_ms=0)
    assert (text.body, text.text, text.receipt, text.keys) == (b"hello", "hello", "r1", ("k1",))
    assert raw.body == b"\xff"


async def test_a_big_batch_goes_as_several_requests_in_order(
    aiohttp_server: ServerFactory,
) -> None:
    server, url = await fake(aiohttp_server, sent())
    messages = [OutgoingMessage(str(i)) for i in range(2500)]
    async with Client(url) as client:
        results = await client.send_batch("orders", messages)
    sizes = [len(body["messages"]) for _, _, body in server.requests]
    bodies = [m["body"] for _, _, body in server.requests for m in body["messages"]]
    assert sizes == [1000, 1000, 500]
    assert bodies == [str(i) for i in range(2500)]
    assert len(results) == 2500 and len({r.msg_id for r in results}) == 2500


def test_outgoing_message_rejects_contradictions() -> None:
    with pytest.raises(ValueError):
        OutgoingMessage("x", delay_ms=1, deliver_at=2)
    with pytest.raises(TypeError):
        OutgoingMessage(17)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        OutgoingMessage("x", keys="one-key")


async def test_reschedule_needs_exactly_one_time() -> None:
    async with Client("http://127.0.0.1:1") as client:
        with pytest.raises(ValueError):
            await client.reschedule_delayed("0" * 32)
        with pytest.raises(ValueError):
            await client.reschedule_delayed("0" * 32, deliver_at=1, delay_ms=1)


async def test_topic_names_are_escaped_in_paths(aiohttp_server: ServerFactory) -> None:
    server, url = await fake(aiohttp_server, answer(200, {"lag": 0, "inflight": 0, "queues": []}))
    async with Client(url) as client:
        await client.group_stats("%DLQ%billing", "ops")
    assert server.requests[0][1] == "/v1/topics/%25DLQ%25billing/groups/ops"


async def test_a_session_passed_in_is_left_open(aiohttp_server: ServerFactory) -> None:
    _, url = await fake(aiohttp_server, answer(200, STORED))
    async with aiohttp.ClientSession() as session:
        async with Client(url, session=session) as client:
            await client.get_message("0" * 32)
        assert not session.closed


# -- no server code --------------------------------------------------------------------------


def test_the_sdk_imports_no_server_code() -> None:
    script = textwrap.dedent(
        """
        import sys
        import tempomq.client

        def server_code(name):
            top, _, rest = name.partition(".")
            if top in ("broker_core", "delayserver", "txcoord"):
                return True
            # tempomq.app, .cli, .config, ... are the server; only tempomq.client is the SDK.
            return top == "tempomq" and rest != "" and rest.split(".")[0] != "client"

        print(sorted(m for m in sys.modules if server_code(m)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_sqlalchemy_loads_only_for_a_barrier() -> None:
    """Plain clients, the CLI and the probe start without SQLAlchemy (a third of a second);
    asking for the barrier brings it in, and both names stay importable from the package."""
    script = textwrap.dedent(
        """
        import sys
        import tempomq.cli
        from tempomq.client import TransactionalProducer
        before = "sqlalchemy" in sys.modules
        from tempomq.client import Barrier
        print(before, "sqlalchemy" in sys.modules, Barrier.__module__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["False", "True", "tempomq.client.barrier"], out.stdout


# -- concurrent sends coalesce into batches (linger) -------------------------------------------


@pytest.fixture(params=["ready-queue-seen", "ready-queue-unseen"])
def ready_queue(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test as on asyncio's loop (a lone send goes at once when nothing else is due) and
    as on a loop whose ready queue cannot be seen (uvloop: the send lets the turn end first)."""
    if request.param == "ready-queue-unseen":
        monkeypatch.setattr("tempomq.client.client._turn_ends_here", lambda: False)


@pytest.mark.usefixtures("ready_queue")
async def test_concurrent_sends_leave_as_one_batch_and_each_gets_its_own_result(
    aiohttp_server: ServerFactory,
) -> None:
    server, url = await fake(aiohttp_server, sent())
    async with Client(url) as client:
        results = await asyncio.gather(*(client.send("orders", f"m{i}") for i in range(100)))
    assert server.hits == 1
    ((_, path, body),) = server.requests
    assert path == "/v1/topics/orders/messages"
    assert [m["body"] for m in body["messages"]] == [f"m{i}" for i in range(100)]
    assert [r.msg_id for r in results] == [m["msg_id"] for m in body["messages"]]


@pytest.mark.usefixtures("ready_queue")
async def test_a_lone_send_goes_as_a_single_message(aiohttp_server: ServerFactory) -> None:
    server, url = await fake(aiohttp_server, sent())
    async with Client(url) as client:
        for i in range(3):
            await client.send("orders", f"m{i}")
    assert server.hits == 3
    assert all("messages" not in body for _, _, body in server.requests)


@pytest.mark.usefixtures("ready_queue")
async def test_batches_are_cut_at_batch_max_and_per_topic(aiohttp_server: ServerFactory) -> None:
    server, url = await fake(aiohttp_server, sent())
    async with Client(url, batch_max=10) as client:
        await asyncio.gather(
            *(client.send("orders", f"m{i}") for i in range(25)),
            *(client.send("billing", f"b{i}") for i in range(3)),
        )
    sizes = sorted(
        (path.split("/")[3], len(body["messages"]) if "messages" in body else 1)
        for _, path, body in server.requests
    )
    assert sizes == [("billing", 3), ("orders", 5), ("orders", 10), ("orders", 10)]


async def test_linger_ms_gathers_sends_made_one_after_another(
    aiohttp_server: ServerFactory,
) -> None:
    server, url = await fake(aiohttp_server, sent())
    async with Client(url, linger_ms=50) as client:
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(client.send("orders", f"m{i}")))
            await asyncio.sleep(0.001)  # later turns of the loop, within the linger
        await asyncio.gather(*tasks)
    assert server.hits == 1 and len(server.requests[0][2]["messages"]) == 5


@pytest.mark.usefixtures("ready_queue")
async def test_a_bad_message_in_a_batch_fails_only_its_own_caller(
    aiohttp_server: ServerFactory,
) -> None:
    async def strict(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        items = body.get("messages", [body])
        if any(m.get("tags") == "bad" for m in items):
            return web.json_response(
                {"error": "invalid_message", "message": "tags 'bad' refused"}, status=400
            )
        return await sent()(request)

    server, url = await fake(aiohttp_server, strict)
    async with Client(url) as client:
        outcomes = await asyncio.gather(
            *(client.send("orders", f"m{i}", tags="bad" if i == 3 else None) for i in range(6)),
            return_exceptions=True,
        )
    assert isinstance(outcomes[3], InvalidMessage)
    assert all(MSG_ID.match(r.msg_id) for i, r in enumerate(outcomes) if i != 3)  # type: ignore[union-attr]
    stored = [b for _, _, b in server.requests if "messages" not in b and b.get("tags") != "bad"]
    assert sorted(b["body"] for b in stored) == ["m0", "m1", "m2", "m4", "m5"]


@pytest.mark.usefixtures("ready_queue")
async def test_an_id_used_in_another_topic_fails_only_its_own_caller(
    aiohttp_server: ServerFactory,
) -> None:
    taken = "0123456789abcdef0123456789abcdef"

    async def ids_checked(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        items = body.get("messages", [body])
        if any(m.get("msg_id") == taken for m in items):
            message = f"msg_id {taken} is already used by a message of topic 'payments'"
            return web.json_response({"error": "msg_id_conflict", "message": message}, status=409)
        return await sent()(request)

    server, url = await fake(aiohttp_server, ids_checked)
    async with Client(url) as client:
        outcomes = await asyncio.gather(
            *(client.send("orders", f"m{i}", msg_id=taken if i == 2 else None) for i in range(5)),
            return_exceptions=True,
        )
    assert isinstance(outcomes[2], MsgIdConflict) and isinstance(outcomes[2], Conflict)
    assert "'payments'" in outcomes[2].message
    assert all(MSG_ID.match(r.msg_id) for i, r in enumerate(outcomes) if i != 2)  # type: ignore[union-attr]
    stored = [b for _, _, b in server.requests if "messages" not in b and b.get("msg_id") != taken]
    assert sorted(b["body"] for b in stored) == ["m0", "m1", "m3", "m4"]


@pytest.mark.usefixtures("ready_queue")
async def test_an_error_of_the_whole_batch_reaches_every_caller(
    aiohttp_server: ServerFactory,
) -> None:
    server, url = await fake(
        aiohttp_server, answer(404, {"error": "topic_not_found", "message": "no topic"})
    )
    async with Client(url) as client:
        outcomes = await asyncio.gather(
            *(client.send("orders", f"m{i}") for i in range(4)), return_exceptions=True
        )
    assert all(isinstance(o, TopicNotFound) for o in outcomes)
    assert server.hits == 1  # not repeated one by one: it is about the topic


@pytest.mark.usefixtures("ready_queue")
async def test_sends_from_tasks_started_one_by_one_share_a_batch(
    aiohttp_server: ServerFactory,
) -> None:
    server, url = await fake(aiohttp_server, sent())
    async with Client(url) as client:
        tasks = [asyncio.create_task(client.send("orders", f"m{i}")) for i in range(5)]
        results = await asyncio.gather(*tasks)
    assert server.hits == 1
    assert [m["msg_id"] for m in server.requests[0][2]["messages"]] == [r.msg_id for r in results]


async def test_a_send_cancelled_while_its_batch_is_open_still_lets_the_others_go(
    aiohttp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempomq.client.client._turn_ends_here", lambda: False)
    server, url = await fake(aiohttp_server, sent())
    async with Client(url) as client:
        first = asyncio.create_task(client.send("orders", "m0"))
        await asyncio.sleep(0)  # it opened the batch and lets the turn end
        second = asyncio.create_task(client.send("orders", "m1"))
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert MSG_ID.match((await second).msg_id)
        for _ in range(100):  # the cancelled one's message still goes out, as it did in a batch
            if server.hits == 2:
                break
            await asyncio.sleep(0.01)
    assert sorted(b["body"] for _, _, b in server.requests) == ["m0", "m1"]


async def test_batch_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:1", linger_ms=-1)
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:1", batch_max=0)


# -- the SDK's own HTTP/1.1 connections --------------------------------------------------------


async def test_chunked_answers_and_kept_alive_connections(aiohttp_server: ServerFactory) -> None:
    peers: set[object] = set()

    async def chunked(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        payload = b'{"text": "hello"}'
        await resp.write(payload[:5])
        await resp.write(payload[5:])
        await resp.write_eof()
        return resp

    _, url = await fake(aiohttp_server, chunked)
    async with Client(url) as client:
        for _ in range(3):
            assert await client._call("GET", "/x", idempotent=True) == {"text": "hello"}
    assert len(peers) == 1  # one connection, kept alive


async def test_a_connection_the_server_closed_is_replaced(aiohttp_server: ServerFactory) -> None:
    async def close_after(request: web.Request) -> web.StreamResponse:
        resp = web.json_response({"ok": True})
        resp.force_close()
        return resp

    server, url = await fake(aiohttp_server, close_after)
    async with Client(url) as client:
        for _ in range(3):
            assert await client._call("GET", "/x", idempotent=False) == {"ok": True}
    assert server.hits == 3


async def test_each_request_gets_its_own_timeout_on_a_reused_connection(
    aiohttp_server: ServerFactory,
) -> None:
    """The connection's timer, armed for the first request, must not cut the second short:
    the second is answered 0.5 s in, after the first one's deadline but well within its own."""
    calls = []

    async def slow_second(request: web.Request) -> web.StreamResponse:
        calls.append(request.path)
        if len(calls) == 2:
            await asyncio.sleep(0.5)
        return web.json_response({"n": len(calls)})

    _, url = await fake(aiohttp_server, slow_second)
    async with Client(url, timeout_s=1.0, retries=0) as client:
        assert await client._call("GET", "/a", idempotent=False) == {"n": 1}
        await asyncio.sleep(0.6)
        assert await client._call("GET", "/b", idempotent=False) == {"n": 2}


async def test_a_long_poll_then_a_short_call_on_one_connection_times_out_on_time(
    aiohttp_server: ServerFactory,
) -> None:
    """A long poll arms the connection's timer far out; the next call's shorter deadline must
    still be kept (it is cut within its own timeout, not the long poll's)."""

    async def hang_after_first(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            await asyncio.sleep(30)
        return web.json_response({})

    _, url = await fake(aiohttp_server, hang_after_first)
    async with Client(url, timeout_s=0.3, retries=0) as client:
        await client._http.call("GET", "/poll", idempotent=False, extra_timeout_s=60)
        with pytest.raises(RequestTimedOut):
            await asyncio.wait_for(client._call("GET", "/slow", idempotent=False), 10)
