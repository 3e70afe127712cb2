"""A real server under load, killed with SIGKILL in sync flush mode: every acknowledged message
is there after the restart, exactly once; derived files deleted from a stopped server are
rebuilt; SIGTERM stops cleanly."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.server import Server, call, drain

pytestmark = pytest.mark.e2e


@pytest.fixture
def server_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    servers: list[Server] = []

    def make(*extra: str) -> Server:
        s = Server(tmp_path / "data", *extra)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.ensure_stopped()


async def _producer(
    session: aiohttp.ClientSession, base: str, worker: int, acked: list[str], stop: asyncio.Event
) -> None:
    seq = 0
    while not stop.is_set():
        batch = worker % 2 == 0
        bodies = [f"w{worker}-{seq + i}" for i in range(10 if batch else 1)]
        seq += len(bodies)
        payload = {"messages": [{"body": b} for b in bodies]} if batch else {"body": bodies[0]}
        try:
            async with session.post(f"{base}/v1/topics/crash/messages", json=payload) as r:
                if r.status == 201:
                    acked.extend(bodies)
                else:
                    raise AssertionError(f"unexpected {r.status}: {await r.text()}")
        except (TimeoutError, aiohttp.ClientError):
            return  # the server died under us: whatever was not answered is not acknowledged


async def test_sigkill_in_sync_mode_loses_no_acknowledged_message(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--flush", "sync", "--segment-bytes", "8MiB")
    server.start()
    acked: list[str] = []
    async with aiohttp.ClientSession() as session:
        status, _ = await call(
            session, "POST", f"{server.url}/v1/topics", {"name": "crash", "queues": 4}
        )
        assert status == 201
        stop = asyncio.Event()
        producers = [
            asyncio.create_task(_producer(session, server.url, w, acked, stop)) for w in range(16)
        ]
        # Let the load run until plenty is acknowledged, then kill mid-flight.
        for _ in range(200):
            await asyncio.sleep(0.05)
            if len(acked) >= 3000:
                break
        server.kill()
        stop.set()
        await asyncio.gather(*producers)
    assert len(acked) >= 500, "the load never got going"

    server.start()
    async with aiohttp.ClientSession() as session:
        got = await drain(session, server.url, "crash", "audit")
        status, stats = await call(session, "GET", f"{server.url}/v1/topics/crash/groups/audit")
    counts = Counter(m["body"] for m in got)
    missing = set(acked) - set(counts)
    dupes = [b for b, n in counts.items() if n > 1]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    assert not dupes, f"duplicated after recovery: {dupes[:5]}"
    assert stats["lag"] == 0 and stats["inflight"] == 0


async def test_rebuilds_consumequeue_and_index_of_a_stopped_server(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--segment-bytes", "8MiB")
    server.start()
    async with aiohttp.ClientSession() as session:
        await call(session, "POST", f"{server.url}/v1/topics", {"name": "orders", "queues": 3})
        ids = []
        for i in range(0, 600, 100):
            status, data = await call(
                session,
                "POST",
                f"{server.url}/v1/topics/orders/messages",
                {"messages": [{"body": f"o-{i + j}", "keys": [f"k-{i + j}"]} for j in range(100)]},
            )
            assert status == 201
            ids.extend(r["msg_id"] for r in data["results"])
    assert server.terminate() == 0

    shutil.rmtree(server.data_dir / "consumequeue")
    shutil.rmtree(server.data_dir / "index")
    server.start()
    async with aiohttp.ClientSession() as session:
        status, msg = await call(session, "GET", f"{server.url}/v1/messages/{ids[417]}")
        assert status == 200 and msg["body"] == "o-417"
        status, found = await call(
            session, "GET", f"{server.url}/v1/topics/orders/messages?key=k-42"
        )
        assert status == 200 and [m["body"] for m in found["messages"]] == ["o-42"]
        got = await drain(session, server.url, "orders", "g")
    assert sorted(m["body"] for m in got) == sorted(f"o-{i}" for i in range(600))


async def test_sigterm_stops_cleanly_and_keeps_everything(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    server.start()
    async with aiohttp.ClientSession() as session:
        await call(session, "POST", f"{server.url}/v1/topics", {"name": "t", "queues": 2})
        status, data = await call(
            session, "POST", f"{server.url}/v1/topics/t/messages", {"body": "kept"}
        )
        assert status == 201
    assert server.terminate() == 0
    assert "stopped" in server.log()
    server.start()
    async with aiohttp.ClientSession() as session:
        status, msg = await call(session, "GET", f"{server.url}/v1/messages/{data['msg_id']}")
    assert status == 200 and msg["body"] == "kept"


async def test_sigkill_after_a_new_groups_nack_keeps_the_group_and_the_retry_time(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    # A group created by its first receive, a nack asking for a retry in 3 s, then kill -9
    # 0.3 s later (--flush sync): the group, the delivery's attempt count and the retry's time
    # survive; the message comes back once, as attempt 2, not before its time.
    # A long flush interval: no periodic snapshot can hide what the crash would lose.
    server = server_factory("--flush", "sync", "--max-attempts", "3", "--flush-interval", "60s")
    server.start()
    async with aiohttp.ClientSession() as session:
        base = server.url
        await call(session, "POST", f"{base}/v1/topics", {"name": "t", "queues": 1})
        status, sent = await call(session, "POST", f"{base}/v1/topics/t/messages", {"body": "x"})
        assert status == 201
        status, got = await call(
            session, "POST", f"{base}/v1/topics/t/groups/fresh/receive", {"max_messages": 1}
        )
        [m] = got["messages"]
        status, _ = await call(
            session,
            "POST",
            f"{base}/v1/topics/t/groups/fresh/nack",
            {"receipt": m["receipt"], "retry_after_ms": 3000},
        )
        assert status == 200
        nacked_at = asyncio.get_running_loop().time()
        await asyncio.sleep(0.3)
        server.kill()
    server.start()
    async with aiohttp.ClientSession() as session:
        base = server.url
        status, group = await call(session, "GET", f"{base}/v1/topics/t/groups/fresh")
        assert status == 200 and group["lag"] >= 0
        deliveries = []
        while asyncio.get_running_loop().time() - nacked_at < 6:
            status, got = await call(
                session,
                "POST",
                f"{base}/v1/topics/t/groups/fresh/receive",
                {"max_messages": 10, "wait_ms": 500},
            )
            for d in got["messages"]:
                deliveries.append((asyncio.get_running_loop().time() - nacked_at, d))
                await call(
                    session,
                    "POST",
                    f"{base}/v1/topics/t/groups/fresh/ack",
                    {"receipts": [d["receipt"]]},
                )
        assert [d["delivery_attempt"] for _, d in deliveries] == [2]
        assert deliveries[0][0] >= 2.9  # the retry kept its time
        assert deliveries[0][1]["msg_id"] == sent["msg_id"]


async def test_sigkill_right_after_a_topic_delete_keeps_it_deleted_and_the_new_one_fresh(  # type: ignore[no-untyped-def]
    server_factory,
) -> None:
    """No clean stop and no checkpoint after the delete: the restart replays the CommitLog and
    the group records of the old topic, and must still leave them out."""
    # No periodic snapshot of the groups either: their records are replayed from the start.
    server = server_factory("--flush", "sync", "--flush-interval", "1h", "--segment-bytes", "8MiB")
    server.start()
    base = server.url
    async with aiohttp.ClientSession() as session:
        await call(session, "POST", f"{base}/v1/topics", {"name": "gone", "queues": 2})
        msgs = {"messages": [{"body": f"old{i}", "keys": ["k"]} for i in range(20)]}
        status, sent = await call(session, "POST", f"{base}/v1/topics/gone/messages", msgs)
        assert status == 201, sent
        old_id = sent["results"][0]["msg_id"]
        got = await drain(session, base, "gone", "billing", timeout_s=10)
        assert len(got) == 20
        status, _ = await call(session, "DELETE", f"{base}/v1/topics/gone")
        assert status == 200
        await call(session, "POST", f"{base}/v1/topics", {"name": "gone", "queues": 1})
        status, _ = await call(session, "POST", f"{base}/v1/topics/gone/messages", {"body": "new"})
        assert status == 201
    server.kill()

    server.start()
    async with aiohttp.ClientSession() as session:
        status, topic = await call(session, "GET", f"{base}/v1/topics/gone")
        assert status == 200 and topic["queues"] == 1, topic
        assert topic["queue_offsets"] == [{"queue_id": 0, "min_offset": 0, "max_offset": 1}]
        status, _ = await call(session, "GET", f"{base}/v1/messages/{old_id}")
        assert status == 404
        status, found = await call(session, "GET", f"{base}/v1/topics/gone/messages?key=k")
        assert status == 200 and found["messages"] == []
        got = await drain(session, base, "gone", "billing", timeout_s=10)
    assert [m["body"] for m in got] == ["new"]
