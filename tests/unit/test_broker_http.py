"""The broker core's HTTP routes (API.md: Messages, Consuming) on a real broker in a tmp dir.

The app here holds only ``broker_core.http.routes`` and a minimal error middleware that renders a
``TempoError`` the way the API promises; the real app's middleware is tested with the app.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker_core.broker import Broker
from broker_core.errors import TempoError
from broker_core.http import BROKER, MAX_DELAY_MS, routes
from tests.unit.broker_helpers import FakeScheduler, FakeTimers, settle, small_config

Client = TestClient[web.Request, web.Application]
MAX_BODY = 1024


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except TempoError as e:
        return web.json_response({"error": e.code, "message": e.message}, status=e.status)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    b = Broker(
        small_config(tmp_path / "data", max_body_bytes=MAX_BODY, default_queues=4),
        timers=FakeTimers(),
        scheduler=FakeScheduler(),
    )
    await b.start()
    await b.create_topic("orders", 4)
    yield b
    await b.stop()


@pytest.fixture
async def client(broker: Broker, aiohttp_client: Any) -> Client:
    app = web.Application(middlewares=[errors])
    app.add_routes(routes)
    app[BROKER] = broker
    return await aiohttp_client(app)  # type: ignore[no-any-return]


def total_messages(broker: Broker, topic: str = "orders") -> int:
    store = broker.store
    bounds = [store.queue_bounds(topic, q) for q in range(store.topic(topic).queues)]
    return sum(hi - lo for lo, hi in bounds)


async def send(client: Client, payload: Any, topic: str = "orders") -> tuple[int, Any]:
    resp = await client.post(f"/v1/topics/{topic}/messages", json=payload)
    return resp.status, await resp.json()


async def expect_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    body = await resp.json()
    assert resp.status == status, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return body  # type: ignore[no-any-return]


# -- send: happy paths ---------------------------------------------------------------------------


async def test_send_text_and_read_it_back(client: Client, broker: Broker) -> None:
    status, r = await send(
        client,
        {
            "body": "héllo",
            "tags": "created",
            "keys": ["order-17", "ключ"],
            "properties": {"k": "v"},
        },
    )
    assert status == 201
    assert set(r) == {"msg_id", "queue_id"}
    assert len(r["msg_id"]) == 32 and 0 <= r["queue_id"] < 4
    resp = await client.get(f"/v1/messages/{r['msg_id']}")
    assert resp.status == 200
    m = await resp.json()
    assert m["msg_id"] == r["msg_id"]
    assert m["topic"] == "orders"
    assert m["queue_id"] == r["queue_id"]
    assert m["body"] == "héllo"
    assert "body_b64" not in m
    assert m["tags"] == "created"
    assert m["keys"] == ["order-17", "ключ"]
    assert m["properties"] == {"k": "v"}
    assert m["stored_at"] >= m["born_at"] > 0


async def test_body_b64_roundtrips_as_body_b64(client: Client) -> None:
    raw = bytes(range(256))
    status, r = await send(client, {"body_b64": base64.b64encode(raw).decode()})
    assert status == 201
    m = await (await client.get(f"/v1/messages/{r['msg_id']}")).json()
    assert base64.b64decode(m["body_b64"]) == raw
    assert "body" not in m


async def test_empty_body_is_fine(client: Client) -> None:
    status, r = await send(client, {"body": ""})
    assert status == 201
    m = await (await client.get(f"/v1/messages/{r['msg_id']}")).json()
    assert m["body"] == ""


async def test_batch_returns_results_in_order(client: Client, broker: Broker) -> None:
    status, r = await send(client, {"messages": [{"body": f"m{i}"} for i in range(10)]})
    assert status == 201
    assert len(r["results"]) == 10
    for i, res in enumerate(r["results"]):
        m = await (await client.get(f"/v1/messages/{res['msg_id']}")).json()
        assert m["body"] == f"m{i}"
        assert m["queue_id"] == res["queue_id"]
    assert total_messages(broker) == 10


async def test_batch_of_1000_is_accepted(client: Client, broker: Broker) -> None:
    status, r = await send(client, {"messages": [{"body": "x"}] * 1000})
    assert status == 201 and len(r["results"]) == 1000
    assert total_messages(broker) == 1000


async def test_sharding_key_picks_a_stable_queue(client: Client) -> None:
    queues = set()
    for _ in range(8):
        _, r = await send(client, {"body": "x", "sharding_key": "user-7"})
        queues.add(r["queue_id"])
    assert len(queues) == 1
    spread = set()
    for _ in range(8):
        _, r = await send(client, {"body": "x"})
        spread.add(r["queue_id"])
    assert len(spread) > 1  # without a key, sends spread over the queues


async def test_delayed_send_goes_to_the_scheduler(client: Client, broker: Broker) -> None:
    now = broker.timers.now_ms()
    status, r = await send(client, {"body": "later", "delay_ms": 30_000})
    assert status == 201
    assert r["deliver_at"] == now + 30_000
    status, r2 = await send(client, {"body": "at", "deliver_at": now + 5000})
    assert (status, r2["deliver_at"]) == (201, now + 5000)
    scheduler = broker.scheduler
    assert isinstance(scheduler, FakeScheduler)
    assert [(m.body, at) for m, at in scheduler.scheduled] == [
        (b"later", now + 30_000),
        (b"at", now + 5000),
    ]
    assert total_messages(broker) == 0


async def test_deliver_at_in_the_past_means_now_and_is_answered(
    client: Client, broker: Broker
) -> None:
    now = broker.timers.now_ms()
    status, r = await send(client, {"body": "now", "deliver_at": now - 60_000})
    assert (status, r["deliver_at"]) == (201, now)
    status, r = await send(client, {"body": "now", "delay_ms": 0})
    assert (status, r["deliver_at"]) == (201, now)
    status, r = await send(client, {"body": "plain"})
    assert status == 201 and "deliver_at" not in r
    assert total_messages(broker) == 3


async def test_every_timed_message_of_a_batch_answers_its_deliver_at(
    client: Client, broker: Broker
) -> None:
    now = broker.timers.now_ms()
    messages = [{"body": "a", "delay_ms": 5000}, {"body": "b"}, {"body": "c", "delay_ms": 0}]
    status, r = await send(client, {"messages": messages})
    assert status == 201
    assert [x.get("deliver_at") for x in r["results"]] == [now + 5000, None, now]


@pytest.mark.parametrize("at", [1_796_026_867, 1, 0, 978_307_199_999])
async def test_deliver_at_in_seconds_is_refused_saying_so(
    client: Client, broker: Broker, at: int
) -> None:
    resp = await client.post("/v1/topics/orders/messages", json={"body": "x", "deliver_at": at})
    body = await expect_error(resp, 400, "invalid_message")
    assert "looks like seconds" in body["message"]
    assert total_messages(broker) == 0
    assert broker.scheduler.scheduled == []  # type: ignore[union-attr]


async def test_too_long_a_delay_states_the_maximum(client: Client) -> None:
    resp = await client.post("/v1/topics/orders/messages", json={"body": "x", "delay_ms": 10**20})
    body = await expect_error(resp, 400, "invalid_message")
    assert str(MAX_DELAY_MS) in body["message"]


async def test_whole_number_floats_are_integers(client: Client, broker: Broker) -> None:
    now = broker.timers.now_ms()
    status, r = await send(client, {"body": "x", "delay_ms": 1000.0})
    assert (status, r["deliver_at"]) == (201, now + 1000)
    resp = await client.post("/v1/topics", json={"name": "floaty", "queues": 2.0})
    assert resp.status == 201 and (await resp.json())["queues"] == 2
    got = await receive(client, max_messages=5.0)
    assert got == []


@pytest.mark.parametrize(
    ("path", "payload", "field", "closest"),
    [
        ("/v1/topics/orders/messages", {"body": "x", "delay": 5000}, "delay", "delay_ms"),
        ("/v1/topics/orders/messages", {"body": "x", "tag": "a"}, "tag", "tags"),
        ("/v1/topics/orders/messages", {"body": "x", "key": "k"}, "key", "keys"),
        ("/v1/topics/orders/messages", {"messages": [{"body": "x", "boyd": 1}]}, "boyd", "body"),
        ("/v1/topics/orders/messages", {"messages": [], "delay_ms": 5}, "delay_ms", None),
        ("/v1/topics", {"name": "t2", "queue": 2}, "queue", "queues"),
        ("/v1/groups", {"name": "g2", "max_attempt": 2}, "max_attempt", "max_attempts"),
        ("/v1/topics/orders/groups/g/receive", {"wait": 5}, "wait", "wait_ms"),
        ("/v1/topics/orders/groups/g/ack", {"receipt": "x"}, "receipt", "receipts"),
        ("/v1/topics/orders/groups/g/nack", {"receipt": "x", "retry": 1}, "retry", None),
        ("/v1/topics/orders/groups/g/reset", {"time": 5}, "time", None),
    ],
)
async def test_an_unknown_field_is_refused_naming_it_and_the_closest_known_one(
    client: Client,
    broker: Broker,
    path: str,
    payload: dict[str, Any],
    field: str,
    closest: str | None,
) -> None:
    await receive(client)  # group g exists
    resp = await client.post(path, json=payload)
    body = await resp.json()
    assert resp.status == 400, body
    assert f"unknown field {field!r}" in body["message"]
    if closest is not None:
        assert f"did you mean {closest!r}" in body["message"]
    assert total_messages(broker) == 0
    assert broker.scheduler.scheduled == []  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/topics", {"name": "t2", "queues": None}),
        ("/v1/groups", {"name": "g2", "max_attempts": None}),
        ("/v1/topics/orders/messages", {"body": "x", "deliver_at": None}),
        ("/v1/topics/orders/messages", {"body": "x", "tags": None}),
        ("/v1/topics/orders/groups/g/receive", {"wait_ms": None}),
    ],
)
async def test_null_is_not_a_value(client: Client, path: str, payload: dict[str, Any]) -> None:
    resp = await client.post(path, json=payload)
    body = await resp.json()
    assert resp.status == 400, body
    assert "null" in body["message"]


async def test_json_answers_end_with_a_newline(client: Client) -> None:
    for resp in (
        await client.post("/v1/topics/orders/messages", json={"body": "x"}),
        await client.get("/v1/topics"),
    ):
        assert (await resp.read()).endswith(b"}\n")


async def test_resend_with_the_same_msg_id_returns_the_first_result(
    client: Client, broker: Broker
) -> None:
    msg_id = "0123456789abcdef0123456789abcdef"
    _, first = await send(client, {"body": "once", "msg_id": msg_id})
    _, again = await send(client, {"body": "once", "msg_id": msg_id})
    assert first["msg_id"] == again["msg_id"] == msg_id
    assert total_messages(broker) == 1
    stored = await (await client.get(f"/v1/messages/{msg_id}")).json()
    assert again["queue_id"] == first["queue_id"] == stored["queue_id"]


# -- send: bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"body": "x",}', b"\xff\xfe"])
async def test_malformed_json(client: Client, broker: Broker, raw: bytes) -> None:
    resp = await client.post(
        "/v1/topics/orders/messages", data=raw, headers={"Content-Type": "application/json"}
    )
    await expect_error(resp, 400, "invalid_message")
    assert total_messages(broker) == 0


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"tags": "x"},
        {"body": "a", "body_b64": "YQ=="},
        {"body": 5},
        {"body": None},
        {"body_b64": 5},
        [],
        "just a string",
        17,
        {"messages": []},
        {"messages": "nope"},
        {"messages": [5]},
        {"body": "x", "tags": 5},
        {"body": "x", "tags": "a|b"},
        {"body": "x", "keys": [1]},
        {"body": "x", "keys": [""]},
        {"body": "x", "keys": ["k" * 129]},
        {"body": "x", "properties": {"a": 1}},
        {"body": "x", "properties": ["a"]},
        {"body": "x", "properties": {"ORIGIN_MSG_ID": "forged"}},
        {"body": "x", "properties": {"DELIVER_AT": "1"}},
        {"body": "x", "sharding_key": ""},
        {"body": "x", "sharding_key": 7},
        {"body": "x", "msg_id": "not-an-id"},
    ],
)
async def test_invalid_messages(client: Client, broker: Broker, payload: Any) -> None:
    resp = await client.post("/v1/topics/orders/messages", json=payload)
    await expect_error(resp, 400, "invalid_message")
    assert total_messages(broker) == 0


@pytest.mark.parametrize("b64", ["YQ", "!!!!", "YQ==YQ==x", "é", "Y Q = ="])
async def test_bad_base64(client: Client, b64: str) -> None:
    resp = await client.post("/v1/topics/orders/messages", json={"body_b64": b64})
    await expect_error(resp, 400, "invalid_message")


@pytest.mark.parametrize(
    "payload",
    [
        {"body": "x" * (MAX_BODY + 1)},
        {"body": "é" * (MAX_BODY // 2 + 1)},  # the limit is in bytes, not characters
        {"body_b64": base64.b64encode(b"x" * (MAX_BODY + 1)).decode()},
        {"body_b64": "A" * (MAX_BODY * 10)},
        {"messages": [{"body": "ok"}, {"body": "x" * (MAX_BODY + 1)}]},
    ],
)
async def test_body_over_the_limit(client: Client, broker: Broker, payload: Any) -> None:
    resp = await client.post("/v1/topics/orders/messages", json=payload)
    await expect_error(resp, 413, "message_too_large")
    assert total_messages(broker) == 0


async def test_body_at_the_limit(client: Client) -> None:
    status, _ = await send(client, {"body": "x" * MAX_BODY})
    assert status == 201
    status, _ = await send(client, {"body_b64": base64.b64encode(b"\0" * MAX_BODY).decode()})
    assert status == 201


async def test_unknown_topic(client: Client) -> None:
    resp = await client.post("/v1/topics/nope/messages", json={"body": "x"})
    await expect_error(resp, 404, "topic_not_found")


@pytest.mark.parametrize("topic", ["SYS_x", "SYS_TRANS_HALF", "%25DLQ%25x", "%25RETRY%25g+orders"])
async def test_send_to_internal_topics_is_refused(
    client: Client, broker: Broker, topic: str
) -> None:
    await broker.store.ensure_topic("SYS_TRANS_HALF", 1)
    await broker.store.ensure_topic("%DLQ%x", 1)
    resp = await client.post(f"/v1/topics/{topic}/messages", json={"body": "x"})
    await expect_error(resp, 400, "invalid_topic")
    assert total_messages(broker, "SYS_TRANS_HALF") == 0
    assert total_messages(broker, "%DLQ%x") == 0


async def test_1001_messages_are_refused_and_none_stored(client: Client, broker: Broker) -> None:
    resp = await client.post(
        "/v1/topics/orders/messages", json={"messages": [{"body": "x"}] * 1001}
    )
    await expect_error(resp, 400, "invalid_message")
    assert total_messages(broker) == 0


async def test_a_batch_with_one_bad_message_stores_none(client: Client, broker: Broker) -> None:
    messages: list[dict[str, Any]] = [{"body": f"m{i}"} for i in range(20)]
    messages[13] = {"body": "bad", "body_b64": "YQ=="}
    resp = await client.post("/v1/topics/orders/messages", json={"messages": messages})
    await expect_error(resp, 400, "invalid_message")
    assert total_messages(broker) == 0
    # Nor is a delayed message of a failed batch scheduled.
    messages = [{"body": "later", "delay_ms": 1000}, {"body": "x", "delay_ms": -1}]
    resp = await client.post("/v1/topics/orders/messages", json={"messages": messages})
    await expect_error(resp, 400, "invalid_message")
    assert broker.scheduler.scheduled == []  # type: ignore[union-attr]


async def test_a_bad_message_of_a_batch_is_named_by_its_place(client: Client) -> None:
    messages: list[dict[str, Any]] = [{"body": f"m{i}"} for i in range(5)]
    messages[3] = {"body": 5}
    resp = await client.post("/v1/topics/orders/messages", json={"messages": messages})
    body = await expect_error(resp, 400, "invalid_message")
    assert body["message"] == "messages[3]: 'body' must be a string (use 'body_b64' for bytes)"
    resp = await client.post("/v1/topics/orders/messages", json={"body": 5})
    body = await expect_error(resp, 400, "invalid_message")  # one message: no place to name
    assert body["message"] == "'body' must be a string (use 'body_b64' for bytes)"


@pytest.mark.parametrize(
    ("given", "told"),
    [
        (
            "0123456789ABCDEF0123456789ABCDEF",
            "msg_id must be 32 lowercase hex digits (uppercase is not accepted),"
            " got '0123456789ABCDEF0123456789ABCDEF'",
        ),
        ("not-an-id", "msg_id must be 32 lowercase hex digits, got 'not-an-id'"),
        ("f" * 100, f"msg_id must be 32 lowercase hex digits, got '{'f' * 38}…"),
        (17, "msg_id must be 32 lowercase hex digits, got 17"),
    ],
)
async def test_a_bad_msg_id_is_told_what_an_id_is_quoting_what_was_given(
    client: Client, given: object, told: str
) -> None:
    resp = await client.post("/v1/topics/orders/messages", json={"body": "x", "msg_id": given})
    assert (await expect_error(resp, 400, "invalid_message"))["message"] == told


@pytest.mark.parametrize(
    ("raw", "told"),
    [
        (
            b'{"body": "x", "delay_ms": 100000000000000000000000000000}',
            "got 100000000000000000000000000000",
        ),
        (b'{"body": "x", "delay_ms": 18446744073709551617}', "got 18446744073709551617"),
        (
            b'{"messages": [{"body": "x"}, {"body": "x", "deliver_at": 99999999999999999999999}]}',
            "messages[1]: 'deliver_at' is more than 10 years ahead",
        ),
        (b'{"body": "x", "delay_ms": 1e29}', "got 1e+29"),
    ],
)
async def test_a_huge_number_is_quoted_as_it_was_written(
    client: Client, raw: bytes, told: str
) -> None:
    resp = await client.post(
        "/v1/topics/orders/messages", data=raw, headers={"Content-Type": "application/json"}
    )
    assert told in (await expect_error(resp, 400, "invalid_message"))["message"]


@pytest.mark.parametrize(
    "payload",
    [
        {"body": "x", "delay_ms": -1},
        {"body": "x", "delay_ms": 10, "deliver_at": 2_000_000_000_000},
        {"body": "x", "delay_ms": "10"},
        {"body": "x", "delay_ms": 1.5},
        {"body": "x", "delay_ms": True},
        {"body": "x", "deliver_at": "tomorrow"},
        {"body": "x", "delay_ms": 11 * 365 * 24 * 3600 * 1000},
    ],
)
async def test_bad_delays(client: Client, broker: Broker, payload: Any) -> None:
    resp = await client.post("/v1/topics/orders/messages", json=payload)
    await expect_error(resp, 400, "invalid_message")
    assert total_messages(broker) == 0
    assert broker.scheduler.scheduled == []  # type: ignore[union-attr]


# -- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg_id", ["0123456789abcdef0123456789abcdef", "nope", "0123456789ABCDEF0123456789ABCDEF"]
)
async def test_get_unknown_message(client: Client, msg_id: str) -> None:
    await expect_error(await client.get(f"/v1/messages/{msg_id}"), 404, "message_not_found")


async def test_query_by_key(client: Client) -> None:
    _, a = await send(client, {"body": "a", "keys": ["order-17"]})
    _, b = await send(client, {"body": "b", "keys": ["order-17", "other"]})
    await send(client, {"body": "c", "keys": ["order-18"]})
    resp = await client.get("/v1/topics/orders/messages", params={"key": "order-17"})
    assert resp.status == 200
    found = (await resp.json())["messages"]
    assert sorted(m["msg_id"] for m in found) == sorted([a["msg_id"], b["msg_id"]])
    assert sorted(m["body"] for m in found) == ["a", "b"]
    resp = await client.get("/v1/topics/orders/messages", params={"key": "missing"})
    assert (resp.status, await resp.json()) == (200, {"messages": []})


async def test_query_by_key_errors(client: Client) -> None:
    resp = await client.get("/v1/topics/nope/messages", params={"key": "k"})
    await expect_error(resp, 404, "topic_not_found")
    resp = await client.get("/v1/topics/orders/messages")
    assert resp.status == 400


# -- topics --------------------------------------------------------------------------------------


async def test_create_topic(client: Client) -> None:
    resp = await client.post("/v1/topics", json={"name": "payments", "queues": 3})
    assert resp.status == 201
    t = await resp.json()
    assert (t["name"], t["queues"]) == ("payments", 3)
    assert len(t["queue_offsets"]) == 3
    resp = await client.get("/v1/topics/payments")
    assert resp.status == 200 and (await resp.json())["queues"] == 3
    names = [t["name"] for t in (await (await client.get("/v1/topics")).json())["topics"]]
    assert "payments" in names and "orders" in names


async def test_create_topic_default_queues(client: Client) -> None:
    resp = await client.post("/v1/topics", json={"name": "dflt"})
    assert resp.status == 201 and (await resp.json())["queues"] == 4


async def test_create_topic_twice(client: Client) -> None:
    await expect_error(
        await client.post("/v1/topics", json={"name": "orders", "queues": 4}),
        409,
        "topic_exists",
    )


@pytest.mark.parametrize(
    "name", ["", "a b", "SYS_x", "%DLQ%x", "x" * 101, None, 5, "orders\n", "a/b"]
)
async def test_create_topic_bad_name(client: Client, name: object) -> None:
    await expect_error(
        await client.post("/v1/topics", json={"name": name, "queues": 2}), 400, "invalid_topic"
    )


@pytest.mark.parametrize("queues", [0, -1, 257, "8", 2.5, True])
async def test_create_topic_bad_queue_count(client: Client, queues: object) -> None:
    await expect_error(
        await client.post("/v1/topics", json={"name": "fine", "queues": queues}),
        400,
        "invalid_topic",
    )
    await expect_error(await client.get("/v1/topics/fine"), 404, "topic_not_found")


async def test_create_topic_malformed_body(client: Client) -> None:
    resp = await client.post("/v1/topics", data=b"{", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    resp = await client.post("/v1/topics", json=["orders"])
    assert resp.status == 400


async def test_get_unknown_topic(client: Client) -> None:
    await expect_error(await client.get("/v1/topics/nope"), 404, "topic_not_found")


async def test_internal_topics_are_not_listed(client: Client, broker: Broker) -> None:
    await broker.store.ensure_topic("%DLQ%g", 1)
    names = [t["name"] for t in (await (await client.get("/v1/topics")).json())["topics"]]
    assert "%DLQ%g" not in names


# -- consuming -----------------------------------------------------------------------------------


async def receive(client: Client, group: str = "g", **body: Any) -> list[dict[str, Any]]:
    resp = await client.post(f"/v1/topics/orders/groups/{group}/receive", json=body)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["messages"]  # type: ignore[no-any-return]


async def test_receive_ack(client: Client) -> None:
    _, a = await send(client, {"body": "a", "tags": "t", "keys": ["k"]})
    _, b = await send(client, {"body_b64": base64.b64encode(b"\x00b").decode()})
    got = await receive(client, max_messages=10)
    assert sorted(m["msg_id"] for m in got) == sorted([a["msg_id"], b["msg_id"]])
    for m in got:
        assert m["delivery_attempt"] == 1
        assert isinstance(m["receipt"], str) and m["receipt"]
        assert m["topic"] == "orders"
    by_id = {m["msg_id"]: m for m in got}
    assert by_id[a["msg_id"]]["body"] == "a"
    assert by_id[a["msg_id"]]["keys"] == ["k"]
    assert base64.b64decode(by_id[b["msg_id"]]["body_b64"]) == b"\x00b"
    assert await receive(client) == []
    resp = await client.post(
        "/v1/topics/orders/groups/g/ack", json={"receipts": [m["receipt"] for m in got]}
    )
    assert (resp.status, await resp.json()) == (200, {"acked": 2, "failed": []})
    resp = await client.post(
        "/v1/topics/orders/groups/g/ack", json={"receipts": [got[0]["receipt"]]}
    )
    assert resp.status == 200
    answer = await resp.json()
    assert answer["acked"] == 0
    assert [(f["receipt"], f["error"]) for f in answer["failed"]] == [
        (got[0]["receipt"], "receipt_expired")
    ]


async def test_receive_empty(client: Client) -> None:
    assert await receive(client) == []
    assert await receive(client, wait_ms=0, max_messages=1, invisible_ms=100) == []


async def test_receive_tag_filter(client: Client) -> None:
    await send(client, {"body": "a", "tags": "a"})
    await send(client, {"body": "b", "tags": "b"})
    await send(client, {"body": "c", "tags": "c"})
    got = await receive(client, tags="a || c", max_messages=10)
    assert sorted(m["body"] for m in got) == ["a", "c"]


@pytest.mark.parametrize(
    "body",
    [
        {"max_messages": 0},
        {"max_messages": 1001},
        {"max_messages": "5"},
        {"wait_ms": -1},
        {"wait_ms": 60_001},
        {"invisible_ms": 99},
        {"invisible_ms": True},
        {"tags": "a ||"},
        {"tags": 5},
    ],
)
async def test_receive_bad_request(client: Client, body: dict[str, Any]) -> None:
    resp = await client.post("/v1/topics/orders/groups/g/receive", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"


async def test_receive_unknown_topic_and_bad_group(client: Client) -> None:
    resp = await client.post("/v1/topics/nope/groups/g/receive", json={})
    await expect_error(resp, 404, "topic_not_found")
    resp = await client.post("/v1/topics/orders/groups/bad%20name/receive", json={})
    await expect_error(resp, 400, "invalid_group")


@pytest.mark.parametrize("receipts", [["garbage"], ["ffff-0-0-1", "also-bad"], [5]])
async def test_a_malformed_receipt_is_a_bad_request_naming_it(
    client: Client, receipts: list[str]
) -> None:
    await send(client, {"body": "a"})
    [m] = await receive(client)
    for verb in ("ack", "nack"):
        resp = await client.post(
            f"/v1/topics/orders/groups/g/{verb}", json={"receipts": [m["receipt"], *receipts]}
        )
        body = await expect_error(resp, 400, "invalid_receipt")
        assert repr(receipts[-1]) in body["message"]
    # Nothing was done: the good receipt still acks.
    resp = await client.post("/v1/topics/orders/groups/g/ack", json={"receipts": [m["receipt"]]})
    assert (await resp.json())["acked"] == 1


async def test_ack_of_a_batch_with_stale_receipts_acks_the_rest(client: Client) -> None:
    for body in ("a", "b", "c"):
        await send(client, {"body": body})
    a, b, c = await receive(client, max_messages=3)
    [other, *_] = await receive(client, group="g2", max_messages=3)
    resp = await client.post("/v1/topics/orders/groups/g/ack", json={"receipts": [a["receipt"]]})
    assert (await resp.json())["acked"] == 1
    receipts = [a["receipt"], b["receipt"], "0-0-0-1", other["receipt"], c["receipt"]]
    resp = await client.post("/v1/topics/orders/groups/g/ack", json={"receipts": receipts})
    answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["acked"] == 2
    assert [(f["receipt"], f["error"]) for f in answer["failed"]] == [
        (a["receipt"], "receipt_expired"),
        ("0-0-0-1", "receipt_expired"),
        (other["receipt"], "receipt_mismatch"),
    ]
    assert "group 'g2'" in answer["failed"][2]["message"]


async def test_nack_takes_a_list_of_receipts_too(client: Client) -> None:
    for body in ("a", "b"):
        await send(client, {"body": body})
    a, b = await receive(client, max_messages=2)
    await client.post("/v1/topics/orders/groups/g/ack", json={"receipts": [a["receipt"]]})
    resp = await client.post(
        "/v1/topics/orders/groups/g/nack", json={"receipts": [a["receipt"], b["receipt"]]}
    )
    answer = await resp.json()
    assert (resp.status, answer["nacked"]) == (200, 1), answer
    assert [f["error"] for f in answer["failed"]] == ["receipt_expired"]
    # One receipt alone keeps its error as the answer.
    resp = await client.post("/v1/topics/orders/groups/g/nack", json={"receipt": b["receipt"]})
    await expect_error(resp, 409, "receipt_expired")
    resp = await client.post("/v1/topics/orders/groups/g/nack", json={"receipt": "bogus"})
    await expect_error(resp, 400, "invalid_receipt")


@pytest.mark.parametrize("body", [{}, {"receipts": []}, {"receipts": "r"}, {"receipts": [5]}])
async def test_ack_bad_request(client: Client, body: dict[str, Any]) -> None:
    await receive(client)
    resp = await client.post("/v1/topics/orders/groups/g/ack", json=body)
    assert resp.status == 400


async def test_nack_then_retry(client: Client, broker: Broker) -> None:
    _, a = await send(client, {"body": "a"})
    [m] = await receive(client)
    resp = await client.post(
        "/v1/topics/orders/groups/g/nack", json={"receipt": m["receipt"], "retry_after_ms": 0}
    )
    assert resp.status == 200
    [again] = await receive(client)
    assert again["msg_id"] == a["msg_id"]
    assert again["topic"] == "orders"
    assert again["body"] == "a"
    assert again["delivery_attempt"] == 2
    # Internal bookkeeping stays internal.
    assert "ORIGIN_MSG_ID" not in again["properties"]
    assert "RETRY_TOPIC" not in again["properties"]
    resp = await client.post("/v1/topics/orders/groups/g/nack", json={"receipt": m["receipt"]})
    await expect_error(resp, 409, "receipt_expired")


async def test_nack_with_backoff_goes_to_the_scheduler(client: Client, broker: Broker) -> None:
    await send(client, {"body": "a"})
    [m] = await receive(client)
    now = broker.timers.now_ms()
    resp = await client.post(
        "/v1/topics/orders/groups/g/nack", json={"receipt": m["receipt"], "retry_after_ms": 5000}
    )
    assert resp.status == 200
    [(_, at)] = broker.scheduler.scheduled  # type: ignore[union-attr]
    assert at == now + 5000


@pytest.mark.parametrize(
    "body", [{}, {"receipt": "x", "retry_after_ms": -1}, {"receipt": "x", "retry_after_ms": "5"}]
)
async def test_nack_bad_request(client: Client, body: dict[str, Any]) -> None:
    await receive(client)
    resp = await client.post("/v1/topics/orders/groups/g/nack", json=body)
    assert resp.status == 400


async def test_change_invisible_swaps_the_receipt(client: Client, broker: Broker) -> None:
    _, a = await send(client, {"body": "a"})
    [m] = await receive(client)
    path = "/v1/topics/orders/groups/g/change-invisible"
    resp = await client.post(path, json={"receipt": m["receipt"], "invisible_ms": 0})
    assert resp.status == 200
    new = (await resp.json())["receipt"]
    assert new != m["receipt"]
    resp = await client.post(path, json={"receipt": m["receipt"], "invisible_ms": 1000})
    await expect_error(resp, 409, "receipt_expired")
    broker.timers.advance(0)  # type: ignore[attr-defined]
    await settle(broker)  # the redelivery's record is written by the store's writer thread
    [again] = await receive(client)
    assert (again["msg_id"], again["delivery_attempt"]) == (a["msg_id"], 2)


@pytest.mark.parametrize(
    "body", [{}, {"receipt": "x"}, {"receipt": "x", "invisible_ms": -1}, {"invisible_ms": 5}]
)
async def test_change_invisible_bad_request(client: Client, body: dict[str, Any]) -> None:
    await receive(client)
    resp = await client.post("/v1/topics/orders/groups/g/change-invisible", json=body)
    assert resp.status == 400


async def test_group_stats(client: Client) -> None:
    await send(client, {"messages": [{"body": "x"}] * 5})
    got = await receive(client, max_messages=2)
    resp = await client.get("/v1/topics/orders/groups/g")
    assert resp.status == 200
    stats = await resp.json()
    assert (stats["lag"], stats["inflight"]) == (5, 2)
    assert isinstance(stats["queues"], list) and stats["queues"]
    await client.post(
        "/v1/topics/orders/groups/g/ack", json={"receipts": [m["receipt"] for m in got]}
    )
    stats = await (await client.get("/v1/topics/orders/groups/g")).json()
    assert (stats["lag"], stats["inflight"]) == (3, 0)


async def test_group_stats_unknown_topic(client: Client) -> None:
    await expect_error(await client.get("/v1/topics/nope/groups/g"), 404, "topic_not_found")


async def test_unknown_group_is_not_found(client: Client) -> None:
    await expect_error(await client.get("/v1/topics/orders/groups/ghost"), 404, "group_not_found")
    resp = await client.post("/v1/topics/orders/groups/ghost/reset", json={"timestamp": 0})
    await expect_error(resp, 404, "group_not_found")
    # The read created nothing: the group can still be created with its own settings.
    resp = await client.post("/v1/groups", json={"name": "ghost", "fifo": True})
    assert resp.status == 201


async def test_reset_replays(client: Client, broker: Broker) -> None:
    timers = broker.timers
    assert isinstance(timers, FakeTimers)
    await send(client, {"body": "old"})
    timers.advance(1000)
    cut = timers.now_ms()
    await send(client, {"body": "new"})
    got = await receive(client, max_messages=10)
    await client.post(
        "/v1/topics/orders/groups/g/ack", json={"receipts": [m["receipt"] for m in got]}
    )
    resp = await client.post("/v1/topics/orders/groups/g/reset", json={"timestamp": cut})
    assert resp.status == 200
    assert len((await resp.json())["queues"]) == 4
    assert [m["body"] for m in await receive(client, max_messages=10)] == ["new"]


@pytest.mark.parametrize("body", [{}, {"timestamp": "yesterday"}, {"timestamp": -5}])
async def test_reset_bad_request(client: Client, body: dict[str, Any]) -> None:
    await receive(client)
    resp = await client.post("/v1/topics/orders/groups/g/reset", json=body)
    assert resp.status == 400


async def test_create_group(client: Client) -> None:
    resp = await client.post(
        "/v1/groups", json={"name": "billing", "fifo": True, "max_attempts": 5}
    )
    assert resp.status == 201
    g = await resp.json()
    assert (g["name"], g["fifo"], g["max_attempts"]) == ("billing", True, 5)
    resp = await client.post("/v1/groups", json={"name": "billing"})
    await expect_error(resp, 409, "group_exists")
    resp = await client.post("/v1/groups", json={"name": "plain"})
    assert resp.status == 201
    assert (await resp.json())["fifo"] is False
    stats = await (await client.get("/v1/topics/orders/groups/billing")).json()
    assert (stats["fifo"], stats["max_attempts"]) == (True, 5)


@pytest.mark.parametrize(
    "body",
    [{}, {"name": ""}, {"name": "a b"}, {"name": "ok", "fifo": "yes"},
     {"name": "ok", "max_attempts": 0}, {"name": "ok", "max_attempts": "3"}],
)  # fmt: skip
async def test_create_group_bad(client: Client, body: dict[str, Any]) -> None:
    await expect_error(await client.post("/v1/groups", json=body), 400, "invalid_group")


async def test_dead_letters_are_readable_by_id_as_the_original(
    client: Client, broker: Broker
) -> None:
    await client.post("/v1/groups", json={"name": "once", "max_attempts": 1})
    _, a = await send(client, {"body": "doomed", "keys": ["k-dead"]})
    [m] = await receive(client, group="once")
    resp = await client.post("/v1/topics/orders/groups/once/nack", json={"receipt": m["receipt"]})
    assert resp.status == 200
    store = broker.store
    lo, hi = store.queue_bounds("%DLQ%once", 0)
    assert hi - lo == 1
    got = await (await client.get(f"/v1/messages/{a['msg_id']}")).json()
    assert (got["topic"], got["body"]) == ("orders", "doomed")
    found = (await (await client.get("/v1/topics/orders/messages?key=k-dead")).json())["messages"]
    assert [x["msg_id"] for x in found] == [a["msg_id"]]
    # The dead-letter topic is readable like any topic, by a group of its own.
    resp = await client.post("/v1/topics/%25DLQ%25once/groups/dlq-reader/receive", json={})
    assert resp.status == 200
    [dead] = (await resp.json())["messages"]
    assert (dead["msg_id"], dead["body"], dead["topic"]) == (a["msg_id"], "doomed", "%DLQ%once")
    assert dead["properties"]["DLQ_ORIGIN_TOPIC"] == "orders"


async def test_a_damaged_record_is_skipped_on_receive_and_listed(
    client: Client, broker: Broker
) -> None:
    sent = [(await send(client, {"body": f"m{i}"}))[1]["msg_id"] for i in range(3)]
    resp = await client.get("/v1/admin/damage")
    assert (resp.status, await resp.json()) == (200, {"damage": [], "count": 0})
    # Damage the middle record under the running server (a bad sector appearing).
    [m] = broker.store.lookup_id(bytes.fromhex(sent[1]))
    _view, pos = broker.store.commitlog.view_at(m.phy_offset)
    with open(broker.store.commitlog.dir / f"{m.phy_offset - pos:020d}", "r+b") as f:
        f.seek(pos + 80)
        f.write(b"\xde\xad")
    resp = await client.post("/v1/topics/orders/groups/g/receive", json={"max_messages": 10})
    got = [x["msg_id"] for x in (await resp.json())["messages"]]
    assert sorted(got) == sorted([sent[0], sent[2]])
    resp = await client.get("/v1/admin/damage")
    body = await resp.json()
    assert body["count"] == 1
    assert (body["damage"][0]["offset"], body["damage"][0]["found_by"]) == (m.phy_offset, "read")
    resp = await client.get(f"/v1/messages/{sent[1]}")
    assert resp.status == 404


async def test_a_send_to_a_missing_topic_says_how_to_create_it(client: Client) -> None:
    resp = await client.post("/v1/topics/nope/messages", json={"body": "x"})
    body = await expect_error(resp, 404, "topic_not_found")
    assert "tempomq topic create nope" in body["message"]
    assert "--auto-create-topics" in body["message"]


@pytest.mark.parametrize("name", ["x" * 101, "x" * 200])
async def test_a_long_topic_name_is_refused_as_long_not_reserved(client: Client, name: str) -> None:
    resp = await client.post("/v1/topics", json={"name": name})
    body = await expect_error(resp, 400, "invalid_topic")
    assert "1-100 characters" in body["message"] and "reserved" not in body["message"]


async def test_the_dead_letter_topic_exists_as_soon_as_its_group(client: Client) -> None:
    resp = await client.post("/v1/groups", json={"name": "billing"})
    assert resp.status == 201
    resp = await client.get("/v1/topics/%25DLQ%25billing")
    assert resp.status == 200, await resp.text()
    await receive(client, group="auto")  # a group created by its first receive too
    resp = await client.get("/v1/topics/%25DLQ%25auto")
    assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/topics/%25DLQ%25auto/groups/reader/receive", json={})
    assert (resp.status, await resp.json()) == (200, {"messages": []})
