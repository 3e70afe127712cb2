"""A message id makes a send idempotent wherever the first send of that id went, on the real app
(embedded delay store, both flush modes, real clock): stored in its topic at once or held by
the delay server, in one request or several, concurrently or not. Only the first is stored; a
later one answers what the first did (its queue, and its delivery time); a cancelled delayed
message sent again stays cancelled; an id used in another topic is a conflict."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from delayserver.http import DELAY
from delayserver.store import DelayedInfo
from tempomq.config import Settings
from tests.unit.test_topic_delete import App

Client = TestClient[web.Request, web.Application]
MSG_ID = "0123456789abcdef0123456789abcdef"
HOUR_MS = 3600_000


@pytest.fixture(params=["async", "sync"])
async def app(tmp_data_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[App]:
    a = App(Settings(data_dir=tmp_data_dir, flush=request.param))
    c = await a.start()
    for topic in ("orders", "other"):
        await ok(c, "POST", "/v1/topics", {"name": topic, "queues": 4})
    yield a
    await a.stop()


async def call(c: Client, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    resp = await c.request(method, path, json=body)
    return resp.status, orjson.loads(await resp.read())


async def ok(c: Client, method: str, path: str, body: Any = None) -> Any:
    status, data = await call(c, method, path, body)
    assert status in (200, 201), data
    return data


async def send(c: Client, body: Any, topic: str = "orders") -> Any:
    return await ok(c, "POST", f"/v1/topics/{topic}/messages", body)


async def in_topic(c: Client, topic: str = "orders") -> int:
    """How many messages the topic holds."""
    data = await ok(c, "GET", f"/v1/topics/{topic}")
    return sum(q["max_offset"] - q["min_offset"] for q in data["queue_offsets"])


async def delayed_state(c: Client, msg_id: str = MSG_ID) -> str | None:
    status, data = await call(c, "GET", f"/v1/delayed/{msg_id}")
    return data["state"] if status == 200 else None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def timed(kind: str) -> dict[str, int]:
    """The time fields of a message: ``plain`` none, ``past`` a deliver_at an hour ago (now),
    ``later`` a delay of an hour, ``future`` a deliver_at an hour ahead."""
    return {
        "plain": {},
        "past": {"deliver_at": now_ms() - HOUR_MS},
        "later": {"delay_ms": HOUR_MS},
        "future": {"deliver_at": now_ms() + HOUR_MS},
    }[kind]


def same_as_first(again: dict[str, Any], first: dict[str, Any]) -> None:
    """A resend answers the first send's result: the same queue, and the same delivery time
    when the first answered one."""
    assert again["msg_id"] == first["msg_id"]
    assert again["queue_id"] == first["queue_id"], (first, again)
    if "deliver_at" in first:
        assert again["deliver_at"] == first["deliver_at"], (first, again)


async def stored_once(c: Client, first_kind: str, first: dict[str, Any]) -> None:
    """The id is stored once, where its first send put it: a delayed one waits (not in the
    topic: never early), any other is in the topic and unknown to the delay server."""
    if first_kind in ("later", "future"):
        assert await in_topic(c) == 0
        info = await ok(c, "GET", f"/v1/delayed/{MSG_ID}")
        assert (info["state"], info["deliver_at"]) == ("scheduled", first["deliver_at"])
    else:
        assert await in_topic(c) == 1
        assert await delayed_state(c) is None
        stored = await ok(c, "GET", f"/v1/messages/{MSG_ID}")
        assert stored["queue_id"] == first["queue_id"]


PAIRS = [
    ("later", "plain"),
    ("plain", "later"),
    ("future", "past"),
    ("past", "future"),
    ("later", "past"),
    ("plain", "future"),
]


@pytest.mark.parametrize(("first_kind", "then_kind"), PAIRS)
async def test_a_resend_in_another_request_is_stored_once_where_the_first_went(
    app: App, first_kind: str, then_kind: str
) -> None:
    c = app.client
    assert c is not None
    first = await send(c, {"body": "once", "msg_id": MSG_ID, **timed(first_kind)})
    again = await send(c, {"body": "once", "msg_id": MSG_ID, **timed(then_kind)})
    same_as_first(again, first)
    if then_kind != "plain":  # every send with a time answers one: the first's
        expected = first.get("deliver_at")
        if expected is None:  # sent plain first: delivered when it was sent
            stored = await ok(c, "GET", f"/v1/messages/{MSG_ID}")
            expected = stored["born_at"]
        assert again["deliver_at"] == expected
    await stored_once(c, first_kind, first)
    # A server restarted knows every id again (the delay store's id filter is loaded anew).
    c = await app.restart()
    same_as_first(await send(c, {"body": "once", "msg_id": MSG_ID, **timed(then_kind)}), first)
    await stored_once(c, first_kind, first)


@pytest.mark.parametrize(("first_kind", "then_kind"), PAIRS)
async def test_the_same_id_twice_in_one_batch_is_stored_once(
    app: App, first_kind: str, then_kind: str
) -> None:
    c = app.client
    assert c is not None
    other = {"body": "other", **timed(then_kind)}
    batch = [
        {"body": "once", "msg_id": MSG_ID, **timed(first_kind)},
        other,
        {"body": "once", "msg_id": MSG_ID, **timed(then_kind)},
    ]
    first, _other, again = (await send(c, {"messages": batch}))["results"]
    same_as_first(again, first)
    if first_kind in ("later", "future"):
        assert await in_topic(c) == (0 if then_kind in ("later", "future") else 1)
        assert await delayed_state(c) == "scheduled"
    else:
        assert await in_topic(c) == (1 if then_kind in ("later", "future") else 2)
        assert await delayed_state(c) is None


@pytest.mark.parametrize("then_kind", ["plain", "later", "past"])
async def test_a_cancelled_delayed_message_sent_again_stays_cancelled(
    app: App, then_kind: str
) -> None:
    c = app.client
    assert c is not None
    first = await send(c, {"body": "once", "msg_id": MSG_ID, "delay_ms": 300})
    assert (await ok(c, "DELETE", f"/v1/delayed/{MSG_ID}"))["state"] == "cancelled"
    again = await send(c, {"body": "once", "msg_id": MSG_ID, **timed(then_kind)})
    assert again == first  # a resend of a cancelled message: its first answer, nothing stored
    c = await app.restart()
    assert await send(c, {"body": "once", "msg_id": MSG_ID, **timed(then_kind)}) == first
    await asyncio.sleep(0.5)  # past its time: it was not delivered
    assert await in_topic(c) == 0
    assert await delayed_state(c) == "cancelled"


@pytest.mark.parametrize("first_kind", ["plain", "later"])
async def test_concurrent_sends_of_one_id_store_it_once(app: App, first_kind: str) -> None:
    """A plain and a delayed send of one id at the same time: the one that looks first holds
    the id until it stored its message; the other then finds it stored. The first one's look
    is held up here, in the delay store (its id filter answering "maybe", as it does for a
    resend or a false positive), to let the other run meanwhile."""
    c = app.client
    assert c is not None
    service = c.server.app[DELAY]
    store = service.store
    real_find = store.find
    go = asyncio.Event()
    asked: list[int] = []

    async def held_up(msg_ids: Any) -> list[DelayedInfo | None]:
        asked.append(len(msg_ids))
        if len(asked) == 1:
            await go.wait()
        return await real_find(msg_ids)

    store.find = held_up  # type: ignore[method-assign]
    store.may_hold = lambda msg_id: True  # type: ignore[method-assign]
    then_kind = "plain" if first_kind == "later" else "later"
    first_task = asyncio.create_task(
        send(c, {"body": "once", "msg_id": MSG_ID, **timed(first_kind)})
    )
    while not asked:
        await asyncio.sleep(0.005)
    then_task = asyncio.create_task(send(c, {"body": "once", "msg_id": MSG_ID, **timed(then_kind)}))
    await asyncio.sleep(0.1)
    assert not then_task.done()  # waiting for the first one, not storing it beside it
    go.set()
    first, again = await asyncio.gather(first_task, then_task)
    same_as_first(again, first)
    await stored_once(c, first_kind, first)


async def test_resends_of_a_delayed_id_answer_the_queue_it_is_released_to(app: App) -> None:
    c = app.client
    assert c is not None
    first = await send(c, {"body": "once", "msg_id": MSG_ID, "delay_ms": 1500})
    for _ in range(5):  # sends without a sharding key go round the queues
        same_as_first(await send(c, {"body": "once", "msg_id": MSG_ID, "delay_ms": 1500}), first)
        await send(c, {"body": "another"})
    c = await app.restart()
    same_as_first(await send(c, {"body": "once", "msg_id": MSG_ID}), first)
    deadline = time.monotonic() + 10
    while await delayed_state(c) != "delivered":
        assert time.monotonic() < deadline, "not released in time"
        await asyncio.sleep(0.05)
    released = await ok(c, "GET", f"/v1/messages/{MSG_ID}")
    assert released["queue_id"] == first["queue_id"]
    same_as_first(await send(c, {"body": "once", "msg_id": MSG_ID, "delay_ms": 5}), first)


@pytest.mark.parametrize("first_kind", ["plain", "later"])
@pytest.mark.parametrize("then_kind", ["plain", "later"])
async def test_an_id_used_in_another_topic_is_a_conflict_naming_that_topic(
    app: App, first_kind: str, then_kind: str
) -> None:
    c = app.client
    assert c is not None
    await send(c, {"body": "once", "msg_id": MSG_ID, **timed(first_kind)})
    for body in (
        {"body": "elsewhere", "msg_id": MSG_ID, **timed(then_kind)},
        {"messages": [{"body": "new"}, {"body": "elsewhere", "msg_id": MSG_ID}]},
    ):
        status, error = await call(c, "POST", "/v1/topics/other/messages", body)
        assert (status, error["error"]) == (409, "msg_id_conflict"), error
        assert MSG_ID in error["message"] and "'orders'" in error["message"], error
    assert await in_topic(c, "other") == 0  # none of the batch either


async def test_a_resend_with_a_time_already_come_answers_the_first_deliver_at(app: App) -> None:
    c = app.client
    assert c is not None
    at = now_ms() - 60_000
    first = await send(c, {"body": "once", "msg_id": MSG_ID, "deliver_at": at})
    await asyncio.sleep(0.02)
    assert await send(c, {"body": "once", "msg_id": MSG_ID, "deliver_at": at}) == first
    assert await send(c, {"body": "once", "msg_id": MSG_ID, "delay_ms": 0}) == first
    assert await in_topic(c) == 1


async def test_a_batch_of_many_ids_with_resends_among_them(app: App) -> None:
    """Through the SDK's usual shape: a batch of new ids, some of them sent before (plain or
    delayed); only the new ones are stored, each resend answers its first result."""
    c = app.client
    assert c is not None
    ids = [f"{i:032x}" for i in range(1, 41)]
    earlier = {
        msg_id: await send(c, {"body": msg_id, "msg_id": msg_id, **timed(kind)})
        for msg_id, kind in zip(ids[::4], ["plain", "later"] * 5, strict=True)
    }
    batch = [
        {"body": m, "msg_id": m, **timed("later" if i % 3 else "plain")} for i, m in enumerate(ids)
    ]
    results = (await send(c, {"messages": batch}))["results"]
    for msg_id, result in zip(ids, results, strict=True):
        if msg_id in earlier:
            same_as_first(result, earlier[msg_id])
    states = await asyncio.gather(*(delayed_state(c, m) for m in ids))
    in_delay = sum(s == "scheduled" for s in states)
    assert await in_topic(c) + in_delay == len(ids)


async def test_a_huge_delay_in_a_reschedule_is_quoted_as_written(app: App) -> None:
    c = app.client
    assert c is not None
    await send(c, {"body": "once", "msg_id": MSG_ID, "delay_ms": HOUR_MS})
    resp = await c.patch(
        f"/v1/delayed/{MSG_ID}",
        data=b'{"delay_ms": 100000000000000000000000000000}',
        headers={"Content-Type": "application/json"},
    )
    error = orjson.loads(await resp.read())
    assert (resp.status, error["error"]) == (400, "invalid_message"), error
    assert error["message"].endswith("got 100000000000000000000000000000"), error
