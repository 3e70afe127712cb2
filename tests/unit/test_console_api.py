"""The inspection routes the web console uses (``tempomq.console.api``), on the real app: a
queue browsed page by page and by time, a message traced through its groups, groups listed and
deleted, in-flight deliveries, the delay timeline by bucket, transactions paged with their
check-back history, and the console's pages themselves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tempomq.app import build_app
from tempomq.config import Settings

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]

MINUTE_MS = 60_000


@pytest.fixture
async def client(tmp_data_dir: Path, aiohttp_client: ClientFactory) -> Client:
    settings = Settings(
        data_dir=tmp_data_dir, tx_check_interval_ms=100, tx_check_max=2, tx_check_timeout_ms=500
    )
    return await aiohttp_client(build_app(settings))


async def call(client: Client, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    resp = await client.request(method, path, json=body)
    return resp.status, await resp.json()


async def ok(client: Client, method: str, path: str, body: Any = None) -> Any:
    status, data = await call(client, method, path, body)
    assert status in (200, 201), data
    return data


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    """Poll an async ``check`` until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def make_topic(client: Client, name: str = "orders", queues: int = 1) -> None:
    await ok(client, "POST", "/v1/topics", {"name": name, "queues": queues})


async def send(client: Client, topic: str, **message: Any) -> str:
    data = await ok(client, "POST", f"/v1/topics/{topic}/messages", message)
    return str(data["msg_id"])


# -- browsing a queue ----------------------------------------------------------------------------


async def test_a_queue_is_browsed_page_by_page_from_an_offset(client: Client) -> None:
    await make_topic(client)
    ids = [await send(client, "orders", body=f"m{i}", keys=[f"k{i}"]) for i in range(5)]
    page = await ok(client, "GET", "/v1/topics/orders/queues/0/messages?offset=1&limit=2")
    assert [m["msg_id"] for m in page["messages"]] == ids[1:3]
    assert [m["queue_offset"] for m in page["messages"]] == [1, 2]
    assert (page["offset"], page["next_offset"]) == (1, 3)
    assert (page["min_offset"], page["max_offset"]) == (0, 5)
    assert page["messages"][0]["body"] == "m1" and page["messages"][0]["keys"] == ["k1"]
    # Without an offset: the newest page.
    newest = await ok(client, "GET", "/v1/topics/orders/queues/0/messages?limit=2")
    assert [m["msg_id"] for m in newest["messages"]] == ids[3:]
    assert newest["next_offset"] == 5


async def test_a_queue_is_browsed_from_a_time(client: Client) -> None:
    await make_topic(client)
    await send(client, "orders", body="before")
    await asyncio.sleep(0.02)
    since = int(time.time() * 1000)
    await asyncio.sleep(0.02)
    after = await send(client, "orders", body="after")
    page = await ok(client, "GET", f"/v1/topics/orders/queues/0/messages?since={since}")
    assert [m["msg_id"] for m in page["messages"]] == [after]
    assert page["offset"] == 1


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/topics/nope/queues/0/messages", 404, "topic_not_found"),
        ("/v1/topics/orders/queues/1/messages", 404, "queue_not_found"),
        ("/v1/topics/orders/queues/x/messages", 400, "invalid_request"),
        ("/v1/topics/orders/queues/0/messages?limit=201", 400, "invalid_request"),
        ("/v1/topics/orders/queues/0/messages?offset=-1", 400, "invalid_request"),
        ("/v1/topics/orders/queues/0/messages?since=soon", 400, "invalid_request"),
    ],
)
async def test_browsing_refuses_what_it_cannot_answer(
    client: Client, path: str, status: int, code: str
) -> None:
    await make_topic(client)
    got_status, data = await call(client, "GET", path)
    assert (got_status, data["error"]) == (status, code), data


# -- a message's trace and the groups ------------------------------------------------------------


async def test_a_trace_says_per_group_whether_the_message_was_acked_is_out_or_waits(
    client: Client,
) -> None:
    await make_topic(client)
    msg_id = await send(client, "orders", body="hello", keys=["order-1"])
    base = "/v1/topics/orders/groups"
    got = await ok(client, "POST", f"{base}/acked/receive", {"max_messages": 1})
    receipt = got["messages"][0]["receipt"]
    await ok(client, "POST", f"{base}/acked/ack", {"receipts": [receipt]})
    await ok(client, "POST", f"{base}/busy/receive", {"max_messages": 1})
    await ok(client, "POST", "/v1/groups", {"name": "idle"})
    await ok(client, "GET", f"{base}/idle")  # reading its lag does not subscribe it
    await ok(client, "POST", f"{base}/idle/receive", {"max_messages": 1, "tags": "other"})
    trace = await ok(client, "GET", f"/v1/messages/{msg_id}/trace")
    assert trace["message"]["body"] == "hello" and trace["message"]["queue_offset"] == 0
    states = {g["group"]: (g["state"], g.get("delivery_attempt")) for g in trace["groups"]}
    # "idle" filtered the message out by tag: finished for that group, as RocketMQ counts it.
    assert states == {"acked": ("acked", None), "busy": ("inflight", 1), "idle": ("acked", None)}
    assert trace["delayed"] is None
    assert [r["topic"] for r in trace["records"]] == ["orders"]


async def test_a_delayed_message_is_traced_before_it_reaches_its_topic(client: Client) -> None:
    await make_topic(client)
    msg_id = await send(client, "orders", body="later", delay_ms=10 * MINUTE_MS)
    trace = await ok(client, "GET", f"/v1/messages/{msg_id}/trace")
    assert trace["message"] is None and trace["records"] == []
    assert trace["delayed"]["state"] == "scheduled" and trace["delayed"]["topic"] == "orders"
    status, data = await call(client, "GET", "/v1/messages/" + "0" * 32 + "/trace")
    assert (status, data["error"]) == (404, "message_not_found")
    status, data = await call(client, "GET", "/v1/messages/xyz/trace")
    assert (status, data["error"]) == (404, "message_not_found")


async def test_groups_are_listed_with_lag_and_dead_letters_and_can_be_deleted(
    client: Client,
) -> None:
    await make_topic(client)
    for i in range(3):
        await send(client, "orders", body=f"m{i}")
    await ok(client, "POST", "/v1/topics/orders/groups/billing/receive", {"max_messages": 1})
    await ok(client, "POST", "/v1/groups", {"name": "audit", "fifo": True})
    groups = {g["name"]: g for g in (await ok(client, "GET", "/v1/groups"))["groups"]}
    assert groups["billing"]["topics"] == [{"topic": "orders", "lag": 3}]
    assert groups["billing"]["dlq_topic"] == "%DLQ%billing"
    assert groups["billing"]["dlq_messages"] == 0
    assert groups["audit"]["fifo"] is True and groups["audit"]["topics"] == []

    assert await ok(client, "DELETE", "/v1/groups/billing") == {
        "deleted": "billing",
        "retry_topics": ["%RETRY%billing+orders"],
        "dlq_topic": None,  # it was empty: deleted with the group
        "dlq_messages": 0,
    }
    names = [g["name"] for g in (await ok(client, "GET", "/v1/groups"))["groups"]]
    assert names == ["audit"]
    status, data = await call(client, "DELETE", "/v1/groups/billing")
    assert (status, data["error"]) == (404, "group_not_found")
    # A group of that name starts afresh: at the oldest message, nothing in flight.
    again = await ok(
        client, "POST", "/v1/topics/orders/groups/billing/receive", {"max_messages": 5}
    )
    assert [m["body"] for m in again["messages"]] == ["m0", "m1", "m2"]


async def test_dead_letters_are_counted_and_browsed(client: Client) -> None:
    await make_topic(client)
    msg_id = await send(client, "orders", body="poison")
    await ok(client, "POST", "/v1/groups", {"name": "strict", "max_attempts": 1})
    got = await ok(client, "POST", "/v1/topics/orders/groups/strict/receive", {})
    await ok(
        client,
        "POST",
        "/v1/topics/orders/groups/strict/nack",
        {"receipt": got["messages"][0]["receipt"]},
    )

    async def dead_lettered() -> bool:
        groups = (await ok(client, "GET", "/v1/groups"))["groups"]
        return bool(groups[0]["dlq_messages"] == 1)

    await until(dead_lettered)
    dlq = await ok(client, "GET", "/v1/topics/%25DLQ%25strict/queues/0/messages")
    assert dlq["topic"] == "%DLQ%strict"
    assert [m["msg_id"] for m in dlq["messages"]] == [msg_id]
    assert dlq["messages"][0]["body"] == "poison"


async def test_in_flight_deliveries_are_listed_with_attempt_and_deadline(client: Client) -> None:
    await make_topic(client, queues=2)
    for i in range(4):
        await send(client, "orders", body=f"m{i}")
    before = int(time.time() * 1000)
    await ok(
        client,
        "POST",
        "/v1/topics/orders/groups/billing/receive",
        {"max_messages": 3, "invisible_ms": 60_000},
    )
    after = int(time.time() * 1000)
    page = await ok(client, "GET", "/v1/topics/orders/groups/billing/inflight")
    assert len(page["messages"]) == 3
    for m in page["messages"]:
        assert m["delivery_attempt"] == 1
        assert before + 60_000 <= m["invisible_until"] <= after + 60_000
        assert m["redeliver_at"] is None
    limited = await ok(client, "GET", "/v1/topics/orders/groups/billing/inflight?limit=2")
    assert len(limited["messages"]) == 2
    status, data = await call(client, "GET", "/v1/topics/orders/groups/nobody/inflight")
    assert (status, data["error"]) == (404, "group_not_found")


# -- delayed messages ----------------------------------------------------------------------------


async def test_the_timeline_counts_what_falls_due_per_bucket(client: Client) -> None:
    await make_topic(client)
    delays = [30_000, 10 * MINUTE_MS, 2 * 60 * MINUTE_MS, 3 * 24 * 60 * MINUTE_MS]
    delays += [60 * 24 * 60 * MINUTE_MS, 61 * 24 * 60 * MINUTE_MS]
    ids = [await send(client, "orders", body=f"d{i}", delay_ms=d) for i, d in enumerate(delays)]
    t = await ok(client, "GET", "/v1/delay/timeline?limit=3")
    counts = {b["label"]: b["count"] for b in t["buckets"]}
    assert counts == {
        "overdue": 0,
        "next minute": 1,
        "next hour": 1,
        "next day": 1,
        "next month": 1,
        "later": 2,
    }
    assert t["pending"] == 6
    assert [d["msg_id"] for d in t["next"]] == ids[:3]
    assert t["next"][0]["topic"] == "orders"
    # A cancelled message leaves its bucket.
    await ok(client, "DELETE", f"/v1/delayed/{ids[0]}")
    t = await ok(client, "GET", "/v1/delay/timeline")
    assert {b["label"]: b["count"] for b in t["buckets"]}["next minute"] == 0
    assert t["pending"] == 5


async def test_the_timeline_carries_the_lateness_histogram_of_releases(client: Client) -> None:
    await make_topic(client)
    before = (await ok(client, "GET", "/v1/delay/timeline"))["lateness"]
    await send(client, "orders", body="soon", delay_ms=50)

    async def released() -> bool:
        t = await ok(client, "GET", "/v1/delay/timeline")
        return bool(t["lateness"]["count"] > before["count"])

    await until(released)
    after = (await ok(client, "GET", "/v1/delay/timeline"))["lateness"]
    assert sum(b["count"] for b in after["buckets"]) == after["count"]
    assert after["buckets"][-1]["le"] is None  # the overflow bucket
    grew = [
        a["count"] - b["count"] for a, b in zip(after["buckets"], before["buckets"], strict=True)
    ]
    assert sum(grew) == after["count"] - before["count"] >= 1


async def test_an_embedded_delay_store_has_no_shard_leases(client: Client) -> None:
    data = await ok(client, "GET", "/v1/delay/servers")
    assert data == {"store": "embedded", "this_server": None, "shards": [], "servers": []}


# -- transactions --------------------------------------------------------------------------------


@pytest.fixture
async def unsure_producer() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A check_url that answers every check-back with "unknown", and the checks it got."""
    asked: list[dict[str, Any]] = []

    async def check(request: web.Request) -> web.Response:
        asked.append(await request.json())
        return web.json_response({"state": "unknown"})

    app = web.Application()
    app.router.add_post("/check", check)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("/check")), asked
    await server.close()


async def test_a_parked_transaction_shows_its_check_back_history(
    client: Client, unsure_producer: tuple[str, list[dict[str, Any]]]
) -> None:
    url, asked = unsure_producer
    await make_topic(client)
    prepared = await ok(
        client,
        "POST",
        "/v1/transactions",
        {
            "topic": "orders",
            "message": {"body": "tx"},
            "producer_group": "shop",
            "check_url": url,
            "check_immunity_ms": 0,
        },
    )
    tx_id = prepared["tx_id"]

    async def parked() -> bool:
        return bool((await ok(client, "GET", f"/v1/transactions/{tx_id}"))["state"] == "check_max")

    await until(parked)
    history = await ok(client, "GET", f"/v1/transactions/{tx_id}/checks")
    assert history["state"] == "check_max" and len(asked) == 2
    assert [(c["answer"], c["via"]) for c in history["checks"]] == [("unknown", "check_url")] * 2
    assert history["checks"][0]["at"] <= history["checks"][1]["at"]
    overview = await ok(client, "GET", "/v1/overview")
    assert overview["transactions"]["check_max"] == 1
    await ok(client, "POST", f"/v1/transactions/{tx_id}/commit")
    overview = await ok(client, "GET", "/v1/overview")
    assert overview["transactions"]["check_max"] == 0
    assert overview["transactions"]["committed"] == 1
    status, data = await call(client, "GET", "/v1/transactions/nope/checks")
    assert (status, data["error"]) == (404, "transaction_not_found")


async def test_transactions_are_listed_page_by_page(client: Client) -> None:
    await make_topic(client)
    tx_ids = []
    for i in range(3):
        prepared = await ok(
            client,
            "POST",
            "/v1/transactions",
            {"topic": "orders", "message": {"body": f"t{i}"}, "producer_group": "shop"},
        )
        tx_ids.append(prepared["tx_id"])
    first = await ok(client, "GET", "/v1/transactions?state=prepared&limit=2")
    second = await ok(
        client, "GET", f"/v1/transactions?state=prepared&limit=2&after={first['next']}"
    )
    listed = [t["tx_id"] for t in first["transactions"] + second["transactions"]]
    assert sorted(listed) == sorted(tx_ids) and len(set(listed)) == 3
    assert "next" not in second
    for bad in ("limit=0", "limit=1001", "after=nocolon", "after=x:y"):
        status, data = await call(client, "GET", f"/v1/transactions?state=prepared&{bad}")
        assert (status, data["error"]) == (400, "invalid_request"), bad


# -- overview and the pages ----------------------------------------------------------------------


async def test_the_overview_counts_what_happened(client: Client) -> None:
    await make_topic(client)
    before = await ok(client, "GET", "/v1/overview")
    await send(client, "orders", body="a")
    await send(client, "orders", body="b", delay_ms=10 * MINUTE_MS)
    got = await ok(client, "POST", "/v1/topics/orders/groups/g/receive", {"max_messages": 1})
    await ok(
        client,
        "POST",
        "/v1/topics/orders/groups/g/ack",
        {"receipts": [got["messages"][0]["receipt"]]},
    )
    after = await ok(client, "GET", "/v1/overview")
    grew = {k: after["counters"][k] - before["counters"][k] for k in after["counters"]}
    assert grew["stored"] >= 1 and grew["received"] == 1 and grew["acked"] == 1
    assert grew["delayed_scheduled"] == 1
    assert after["delayed_pending"] == 1 and after["lag"] == 0
    assert after["topics"] == 1 and after["groups"] == 1
    assert after["probe"] is None  # no probe runs in this server
    assert after["now"] >= before["now"]


async def test_the_console_pages_are_served(client: Client) -> None:
    resp = await client.get("/console", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/console/"
    resp = await client.get("/console/")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert 'src="static/console.js"' in await resp.text()
    for asset, kind in (("console.js", "javascript"), ("console.css", "text/css")):
        resp = await client.get(f"/console/static/{asset}")
        assert resp.status == 200 and kind in resp.content_type, asset
    resp = await client.get("/console/static/../../app.py")
    assert resp.status in (403, 404)
