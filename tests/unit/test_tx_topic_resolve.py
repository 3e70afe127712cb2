"""A prepare resolves its topic as a plain send does (the real app, embedded target): a topic
that does not exist is ``404 topic_not_found`` saying how to create it, or is created when the
server runs with ``--auto-create-topics``; a bad name is ``400``. (With another broker as the
target only the name is checked: tests/integration/test_nodes_tx_targets.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tempomq.app import build_app
from tempomq.config import Settings

Client = TestClient[web.Request, web.Application]


async def _prepare(settings: Settings, topic: str) -> tuple[int, Any, list[str]]:
    """Prepare on ``topic``, commit when accepted; the answer and the topics then listed."""
    async with TestClient(TestServer(build_app(settings))) as client:
        body = {"topic": topic, "message": {"body": "x"}, "producer_group": "svc"}
        resp = await client.post("/v1/transactions", json=body)
        out = orjson.loads(await resp.read())
        if resp.status == 201:
            commit = await client.post(f"/v1/transactions/{out['tx_id']}/commit")
            assert commit.status == 200
        listed = orjson.loads(await (await client.get("/v1/topics")).read())
        return resp.status, out, [t["name"] for t in listed["topics"]]


async def test_a_prepare_for_a_missing_topic_says_how_to_create_it(tmp_path: Path) -> None:
    status, out, topics = await _prepare(Settings(data_dir=tmp_path), "nope")
    assert (status, out["error"]) == (404, "topic_not_found"), out
    assert "tempomq topic create nope" in out["message"]
    assert "nope" not in topics


async def test_a_prepare_creates_its_topic_with_auto_create(tmp_path: Path) -> None:
    status, out, topics = await _prepare(
        Settings(data_dir=tmp_path, auto_create_topics=True), "fresh"
    )
    assert status == 201, out
    assert "fresh" in topics


async def test_a_prepare_with_a_bad_topic_name_is_refused(tmp_path: Path) -> None:
    status, out, _ = await _prepare(Settings(data_dir=tmp_path, auto_create_topics=True), "a b")
    assert (status, out["error"]) == (400, "invalid_topic"), out
