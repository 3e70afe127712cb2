"""Deleting topics and groups on the real app (embedded delay store, real clock), across
restarts: what a deleted topic held is unreachable, its groups' state and retry topics go, what
was due for it later (a delayed message, a retry, a committed transaction) is dropped and
counted, the deletion survives a restart, and the name can be created again, fresh. A group
(one made by a typo on receive, say) is listed and deleted with its retry topics, its empty
dead-letter topic and its metrics."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker_core.errors import StoreUnavailable, TopicExists
from broker_core.message import Message
from tempomq.app import build_app
from tempomq.config import Settings
from tests.unit.store_helpers import Stores

Client = TestClient[web.Request, web.Application]


class App:
    """The app on one data directory, restartable (a clean stop and a new start)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: Client | None = None

    async def start(self) -> Client:
        self.client = TestClient(TestServer(build_app(self.settings)))
        await self.client.start_server()
        return self.client

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def restart(self) -> Client:
        await self.stop()
        return await self.start()


def _app(data_dir: Path) -> App:
    return App(Settings(data_dir=data_dir, backoff_ms=(200,), max_attempts=2))


@pytest.fixture
async def app(tmp_data_dir: Path) -> AsyncIterator[App]:
    a = _app(tmp_data_dir)
    await a.start()
    yield a
    await a.stop()


async def call(client: Client, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    resp = await client.request(method, path, json=body)
    raw = await resp.read()
    return resp.status, orjson.loads(raw) if raw and resp.content_type.endswith("json") else raw


async def ok(client: Client, method: str, path: str, body: Any = None) -> Any:
    status, data = await call(client, method, path, body)
    assert status in (200, 201), data
    return data


async def error(client: Client, method: str, path: str, body: Any = None) -> tuple[int, str]:
    status, data = await call(client, method, path, body)
    return status, data["error"]


async def receive(client: Client, topic: str, group: str, n: int = 10, **kw: Any) -> list[Any]:
    data = await ok(
        client, "POST", f"/v1/topics/{topic}/groups/{group}/receive", {"max_messages": n, **kw}
    )
    return list(data["messages"])


async def metric(client: Client, name: str, **labels: str) -> float:
    """The value of one series on /metrics (0 when absent)."""
    resp = await client.get("/metrics")
    text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return 0.0


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_deleted_topic_is_gone_with_what_it_held(app: App) -> None:
    c = app.client
    assert c is not None
    await ok(c, "POST", "/v1/topics", {"name": "orders", "queues": 2})
    sent = await ok(c, "POST", "/v1/topics/orders/messages", {"body": "a", "keys": ["k1"]})
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "b"})
    out = await receive(c, "orders", "billing", n=1)
    assert await metric(c, "tempomq_consumer_lag", group="billing", topic="orders") == 2

    answer = await ok(c, "DELETE", "/v1/topics/orders")
    assert answer == {
        "deleted": "orders",
        "messages": 2,
        "groups": ["billing"],
        "retry_topics": ["%RETRY%billing+orders"],
    }
    assert await error(c, "GET", "/v1/topics/orders") == (404, "topic_not_found")
    assert await error(c, "POST", "/v1/topics/orders/messages", {"body": "x"}) == (
        404,
        "topic_not_found",
    )
    assert await error(c, "GET", f"/v1/messages/{sent['msg_id']}") == (404, "message_not_found")
    assert await error(c, "DELETE", "/v1/topics/orders") == (404, "topic_not_found")
    listed = await ok(c, "GET", "/v1/topics")
    assert "orders" not in [t["name"] for t in listed["topics"]]
    assert await error(c, "GET", "/v1/topics/%25RETRY%25billing%2Borders") == (
        404,
        "topic_not_found",
    )
    receipt = out[0]["receipt"]
    assert await error(
        c, "POST", "/v1/topics/orders/groups/billing/ack", {"receipts": [receipt]}
    ) == (404, "topic_not_found")
    # Its metrics go: no lag series for a topic that is not there.
    assert 'topic="orders"' not in await (await c.get("/metrics")).text()
    # Retry topics go with their topic or group, not on their own; a bad name is bad input.
    assert await error(c, "DELETE", "/v1/topics/%25RETRY%25billing%2Bother") == (
        400,
        "invalid_topic",
    )


async def test_a_long_poll_on_a_topic_being_deleted_returns(app: App) -> None:
    c = app.client
    assert c is not None
    await ok(c, "POST", "/v1/topics", {"name": "orders"})
    poll = asyncio.ensure_future(receive(c, "orders", "billing", wait_ms=20_000))
    await asyncio.sleep(0.3)
    await ok(c, "DELETE", "/v1/topics/orders")
    assert await asyncio.wait_for(poll, 5) == []


async def test_a_topic_created_again_starts_fresh_also_after_a_restart(app: App) -> None:
    c = app.client
    assert c is not None
    await ok(c, "POST", "/v1/topics", {"name": "orders", "queues": 1})
    msg_id = "0123456789abcdef0123456789abcdef"
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "old", "msg_id": msg_id})
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "old2"})
    assert [m["body"] for m in await receive(c, "orders", "billing", n=1)] == ["old"]
    await ok(c, "DELETE", "/v1/topics/orders")

    c = await app.restart()
    assert await error(c, "GET", "/v1/topics/orders") == (404, "topic_not_found")
    assert await error(c, "GET", f"/v1/messages/{msg_id}") == (404, "message_not_found")
    await ok(c, "POST", "/v1/topics", {"name": "orders", "queues": 1})
    topic = await ok(c, "GET", "/v1/topics/orders")
    assert topic["queue_offsets"] == [{"queue_id": 0, "min_offset": 0, "max_offset": 0}]
    # The same id again is a new message of the new topic, not a duplicate of the old one.
    again = await ok(c, "POST", "/v1/topics/orders/messages", {"body": "new", "msg_id": msg_id})
    assert again["queue_id"] == 0
    assert (await ok(c, "GET", f"/v1/messages/{msg_id}"))["body"] == "new"

    c = await app.restart()
    # The group's old cursor (past "old") does not apply: it gets the new topic's message.
    assert [m["body"] for m in await receive(c, "orders", "billing")] == ["new"]
    stats = await ok(c, "GET", "/v1/topics/orders/groups/billing")
    assert stats["queues"][0]["max_offset"] == 1


async def test_a_crash_between_tombstone_and_topic_list_keeps_the_deletion(
    tmp_data_dir: Path,
) -> None:
    app = _app(tmp_data_dir)
    c = await app.start()
    await ok(c, "POST", "/v1/topics", {"name": "orders"})
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "old"})
    before = (tmp_data_dir / "topics.json").read_bytes()
    await ok(c, "DELETE", "/v1/topics/orders")
    await app.stop()
    (tmp_data_dir / "topics.json").write_bytes(before)  # as if the crash came before its write
    c = await app.start()
    try:
        assert await error(c, "GET", "/v1/topics/orders") == (404, "topic_not_found")
    finally:
        await app.stop()


async def test_what_was_due_later_for_a_deleted_topic_is_dropped_and_counted(app: App) -> None:
    c = app.client
    assert c is not None
    await ok(c, "POST", "/v1/topics", {"name": "orders", "queues": 1})
    dropped_before = await metric(c, "tempomq_dropped_messages_total", source="delayed")
    tx_before = await metric(c, "tempomq_dropped_messages_total", source="transaction")
    delayed = await ok(c, "POST", "/v1/topics/orders/messages", {"body": "later", "delay_ms": 800})
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "now"})
    [got] = await receive(c, "orders", "billing")
    await ok(  # a retry of "now", due in 800 ms
        c,
        "POST",
        "/v1/topics/orders/groups/billing/nack",
        {"receipt": got["receipt"], "retry_after_ms": 800},
    )
    tx = await ok(
        c,
        "POST",
        "/v1/transactions",
        {"topic": "orders", "producer_group": "shop", "message": {"body": "half"}},
    )
    await ok(c, "DELETE", "/v1/topics/orders")
    await ok(c, "POST", "/v1/topics", {"name": "orders", "queues": 1})  # a new topic, same name
    committed = await ok(c, "POST", f"/v1/transactions/{tx['tx_id']}/commit")
    assert committed["state"] == "committed"

    async def dropped() -> bool:
        n = await metric(c, "tempomq_dropped_messages_total", source="delayed")
        return n >= dropped_before + 2  # the delayed message and the retry

    await until(dropped)
    assert await metric(c, "tempomq_dropped_messages_total", source="transaction") == tx_before + 1
    info = await ok(c, "GET", f"/v1/delayed/{delayed['msg_id']}")
    assert info["state"] == "cancelled"
    await asyncio.sleep(0.3)
    assert await receive(c, "orders", "billing") == []
    assert (await ok(c, "GET", "/v1/topics/orders"))["queue_offsets"][0]["max_offset"] == 0
    # A delayed message sent to the new topic is delivered as usual.
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "fresh", "delay_ms": 100})
    await until(lambda: _has(c, "orders", "audit", "fresh"))


async def _has(c: Client, topic: str, group: str, body: str) -> bool:
    return body in [m["body"] for m in await receive(c, topic, group)]


async def test_a_typo_group_is_listed_and_deleted_with_its_state(app: App) -> None:
    c = app.client
    assert c is not None
    await ok(c, "POST", "/v1/topics", {"name": "orders", "queues": 1})
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "m"})
    [got] = await receive(c, "orders", "billng")  # the typo makes a group
    groups = {g["name"]: g for g in (await ok(c, "GET", "/v1/groups"))["groups"]}
    assert groups["billng"]["topics"] == [{"topic": "orders", "lag": 1}]
    assert await metric(c, "tempomq_consumer_lag", group="billng", topic="orders") == 1
    await ok(  # a retry pending for it
        c,
        "POST",
        "/v1/topics/orders/groups/billng/nack",
        {"receipt": got["receipt"], "retry_after_ms": 600},
    )
    dropped_before = await metric(c, "tempomq_dropped_messages_total", source="delayed")

    answer = await ok(c, "DELETE", "/v1/groups/billng")
    assert answer == {
        "deleted": "billng",
        "retry_topics": ["%RETRY%billng+orders"],
        "dlq_topic": None,
        "dlq_messages": 0,
    }
    assert "billng" not in [g["name"] for g in (await ok(c, "GET", "/v1/groups"))["groups"]]
    assert 'group="billng"' not in await (await c.get("/metrics")).text()
    for internal in ("%25RETRY%25billng%2Borders", "%25DLQ%25billng"):
        assert await error(c, "GET", f"/v1/topics/{internal}") == (404, "topic_not_found")

    async def dropped() -> bool:
        n = await metric(c, "tempomq_dropped_messages_total", source="delayed")
        return n >= dropped_before + 1

    await until(dropped)  # the retry due for the deleted group went nowhere
    c = await app.restart()
    assert "billng" not in [g["name"] for g in (await ok(c, "GET", "/v1/groups"))["groups"]]
    assert await error(c, "GET", "/v1/topics/orders/groups/billng") == (404, "group_not_found")
    # The right group reads the message from the start.
    assert [m["body"] for m in await receive(c, "orders", "billing")] == ["m"]


async def test_deleting_a_group_keeps_a_dead_letter_topic_that_holds_dead_letters(
    app: App,
) -> None:
    c = app.client
    assert c is not None
    await ok(c, "POST", "/v1/topics", {"name": "orders", "queues": 1})
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "poison"})
    msgs: list[Any] = []

    async def got_one() -> bool:
        msgs[:] = await receive(c, "orders", "billing", n=1)
        return bool(msgs)

    for _ in range(2):  # max_attempts 2: the second nack dead-letters it
        await until(got_one)
        await ok(
            c,
            "POST",
            "/v1/topics/orders/groups/billing/nack",
            {"receipt": msgs[0]["receipt"], "retry_after_ms": 0},
        )
    answer = await ok(c, "DELETE", "/v1/groups/billing")
    assert (answer["dlq_topic"], answer["dlq_messages"]) == ("%DLQ%billing", 1)
    dlq = await ok(c, "GET", "/v1/topics/%25DLQ%25billing")
    assert dlq["queue_offsets"][0]["max_offset"] == 1
    # Once read, the kept dead letters can be deleted: the topic is not a dead end.
    answer = await ok(c, "DELETE", "/v1/topics/%25DLQ%25billing")
    assert (answer["deleted"], answer["messages"]) == ("%DLQ%billing", 1)
    assert await error(c, "GET", "/v1/topics/%25DLQ%25billing") == (404, "topic_not_found")
    c = await app.restart()
    assert await error(c, "GET", "/v1/topics/%25DLQ%25billing") == (404, "topic_not_found")


async def test_deleting_a_live_groups_dead_letter_topic_empties_it(app: App) -> None:
    c = app.client
    assert c is not None
    await ok(c, "POST", "/v1/topics", {"name": "orders", "queues": 1})
    await ok(c, "POST", "/v1/groups", {"name": "billing", "max_attempts": 1})
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "poison"})
    [m] = await receive(c, "orders", "billing", n=1)
    await ok(c, "POST", "/v1/topics/orders/groups/billing/nack", {"receipt": m["receipt"]})
    [dead] = await receive(c, "%25DLQ%25billing", "inspect", n=1)
    assert dead["body"] == "poison"
    answer = await ok(c, "DELETE", "/v1/topics/%25DLQ%25billing")
    assert (answer["messages"], answer["groups"]) == (1, ["inspect"])
    # The group lives on, so its dead-letter topic is there again at once, empty.
    dlq = await ok(c, "GET", "/v1/topics/%25DLQ%25billing")
    assert dlq["queue_offsets"][0]["max_offset"] == 0
    assert await receive(c, "%25DLQ%25billing", "inspect") == []
    # Only dead-letter topics: retry and system topics stay refused.
    for internal in ("%25RETRY%25billing%2Borders", "SYS_X"):
        assert await error(c, "DELETE", f"/v1/topics/{internal}") == (400, "invalid_topic")


async def test_store_drops_the_tombstoned_records_when_rebuilding(tmp_data_dir: Path) -> None:
    """Derived files lost: the rebuild from the CommitLog leaves the deleted topic out."""
    app = _app(tmp_data_dir)
    c = await app.start()
    await ok(c, "POST", "/v1/topics", {"name": "orders"})
    await ok(c, "POST", "/v1/topics/orders/messages", {"body": "old"})
    await ok(c, "DELETE", "/v1/topics/orders")
    await app.stop()
    for name in ("topics.json", "checkpoint.json"):
        (tmp_data_dir / name).unlink()
    c = await app.start()
    try:
        assert await error(c, "GET", "/v1/topics/orders") == (404, "topic_not_found")
    finally:
        await app.stop()


async def test_a_topic_is_not_created_again_while_it_is_being_deleted(
    tmp_path: Path, stores: Stores
) -> None:
    """Its queue files are removed during the delete: a create in between would lose its own.
    The create is refused (409), and succeeds, fresh, once the delete is done; puts staged
    before the delete never reach the new topic."""
    store = await stores.start(tmp_path / "data")
    await store.create_topic("t", 1)
    staged = asyncio.ensure_future(store.put(Message("t", b"old")))
    deleting = asyncio.ensure_future(store.delete_topic("t"))
    await asyncio.sleep(0)
    with pytest.raises(TopicExists, match="being deleted"):
        await store.create_topic("t", 1)
    with pytest.raises(StoreUnavailable, match="being deleted"):
        await store.ensure_topic("t", 1)
    await deleting
    await staged  # written (it was staged first), but of the deleted topic
    await store.create_topic("t", 1)
    assert store.queue_bounds("t", 0) == (0, 0)
    new = await store.put(Message("t", b"new"))
    assert (new.queue_offset, store.queue_bounds("t", 0)) == (0, (0, 1))
    assert [m.body for m in store.lookup_id(new.msg_id)] == [b"new"]


async def test_an_unreadable_tombstone_file_stops_the_start(tmp_path: Path, stores: Stores) -> None:
    """Without its tombstones a deleted topic would come back from its records: no start."""
    data = tmp_path / "data"
    store = await stores.start(data)
    await store.create_topic("t", 1)
    await store.put(Message("t", b"old"))
    await store.delete_topic("t")
    await stores.stop(store)
    (data / "deleted-topics.json").write_bytes(b'[{"name": "t"')
    with pytest.raises(StoreUnavailable, match=r"deleted-topics\.json is unreadable"):
        await stores.start(data)
