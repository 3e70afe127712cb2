"""The real app on a disk that refuses writes of its small files (topics.json): creating a topic
and the first receive of a new group answer ``503 store_unavailable`` with the cause, never
``500``, and work again once the disk takes writes, without a restart."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import broker_core.store
from tempomq.app import build_app
from tempomq.config import HostPort, Settings

Client = TestClient[web.Request, web.Application]


class Disk:
    """Replaces the store's JSON writer: while ``full``, every write fails with ENOSPC."""

    def __init__(self, real: Callable[[Path, object], None]) -> None:
        self.real = real
        self.full = False

    def write_json_atomic(self, path: Path, data: object) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")
        self.real(path, data)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    d = Disk(broker_core.store.write_json_atomic)
    monkeypatch.setattr(broker_core.store, "write_json_atomic", d.write_json_atomic)
    return d


@pytest.fixture
async def client(
    tmp_data_dir: Path, aiohttp_client: Callable[[web.Application], Awaitable[Client]]
) -> Client:
    settings = Settings(data_dir=tmp_data_dir, http=HostPort("127.0.0.1", 0))
    return await aiohttp_client(build_app(settings))


async def post(client: Client, path: str, body: Any) -> tuple[int, Any]:
    resp = await client.post(path, json=body)
    return resp.status, await resp.json()


def assert_out_of_space(status: int, body: Any) -> None:
    assert status == 503, body
    assert body["error"] == "store_unavailable"
    assert "No space left on device" in body["message"]


async def test_create_topic_on_a_full_disk_is_503_with_the_cause(
    client: Client, disk: Disk
) -> None:
    disk.full = True
    assert_out_of_space(*await post(client, "/v1/topics", {"name": "a", "queues": 1}))
    disk.full = False
    # The topic that could not be saved does not exist: creating it again works.
    status, body = await post(client, "/v1/topics", {"name": "a", "queues": 1})
    assert status == 201, body


async def test_first_receive_of_a_new_group_on_a_full_disk_is_503_with_the_cause(
    client: Client, disk: Disk
) -> None:
    status, _ = await post(client, "/v1/topics", {"name": "t", "queues": 1})
    assert status == 201
    status, _ = await post(client, "/v1/topics/t/messages", {"body": "hello"})
    assert status == 201
    disk.full = True
    assert_out_of_space(*await post(client, "/v1/topics/t/groups/g/receive", {"wait_ms": 0}))
    disk.full = False
    status, body = await post(client, "/v1/topics/t/groups/g/receive", {"wait_ms": 0})
    assert status == 200, body
    assert [m["body"] for m in body["messages"]] == ["hello"]
