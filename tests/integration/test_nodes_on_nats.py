"""Several tempomq nodes in front of NATS JetStream.

Three nodes share a private Redis (delays, shard leases) and release into one JetStream stream;
under a steady load of delayed sends spread over all nodes, one node is SIGKILLed: every
message a node acknowledged arrives in the stream exactly once, none before its time.

One node releases into a local three-node JetStream cluster (a stream with three replicas);
the node leading the stream is SIGKILLed while releases go on: no message is lost, none is
stored twice, none early.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.server import Server, call, until_ready
from tests.integration.redis_process import RedisProcess
from tests.integration.target_services import (
    JetStreamReader,
    Received,
    nats_cluster,
    require_nats,
    unique,
)

pytestmark = pytest.mark.e2e


async def _all_arrived(reader: JetStreamReader, want: set[str], timeout_s: float) -> list[Received]:
    """The stream's messages once every id in ``want`` is among them (or the time is out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        try:
            if await reader.count() < len(want):
                continue
            if want <= {r.msg_id for r in await reader.read_all()}:
                break
        except Exception:  # the stream is electing a leader (a cluster node was killed)
            continue
    await asyncio.sleep(1.0)  # anything released twice would show now
    return await reader.read_all()


def _check_once_and_on_time(
    got: list[Received], sent: dict[str, int], unanswered: set[int] | None = None
) -> None:
    """Every acknowledged message once, none early. A batch whose answer never came (its node
    was killed mid-request) may or may not have been stored: its messages may arrive, once."""
    counts = Counter(r.msg_id for r in got)
    missing = set(sent) - set(counts)
    assert not missing, f"{len(missing)} acknowledged messages lost"
    assert max(counts.values()) == 1, "stored twice"
    for r in got:
        if r.msg_id not in sent:
            batch = int(r.body.decode().split("-")[0])
            assert batch in (unanswered or set()), f"a message nobody sent: {r.body!r}"
        deliver_at = int(r.headers["DELIVER_AT"])
        assert deliver_at == sent.get(r.msg_id, deliver_at)
        assert int(r.headers["RELEASED_AT"]) >= deliver_at, "released early"
        # The stream's own clock (same machine): stored no earlier than its time.
        assert r.stored_ms >= deliver_at - 1, (r.stored_ms, deliver_at)


async def _send_load(
    session: aiohttp.ClientSession,
    bases: list[str],
    sent: dict[str, int],
    unanswered: set[int],
    *,
    batches: int,
    per_batch: int,
    every_s: float,
    delay_ms: tuple[int, int],
) -> int:
    """Delayed sends round-robin over ``bases``; what a node acknowledged goes into ``sent``
    (msg_id -> deliver_at), the numbers of batches that got no answer into ``unanswered`` (a
    node killed mid-request may have stored them). Returns the number not acknowledged."""
    refused = 0
    lo, hi = delay_ms
    nodes = itertools.cycle(bases)
    for b in range(batches):
        base = next(nodes)
        msgs = [
            {"body": f"{b}-{i}", "delay_ms": lo + (hi - lo) * i // per_batch}
            for i in range(per_batch)
        ]
        try:
            status, data = await call(
                session, "POST", f"{base}/v1/topics/load/messages", {"messages": msgs}
            )
        except aiohttp.ClientError:
            refused += 1
            unanswered.add(b)
            continue
        if status == 201:
            sent.update({r["msg_id"]: r["deliver_at"] for r in data["results"]})
        else:
            refused += 1
        await asyncio.sleep(every_s)
    return refused


async def test_three_nodes_on_redis_and_nats_one_killed(
    redis_process: RedisProcess, tmp_path: Path
) -> None:
    reader = JetStreamReader(require_nats(), unique("TQN"), unique("tqn"))
    await reader.open()
    common = (
        "--redis-url",
        redis_process.url,
        "--delay-lease-ttl",
        "1s",
        "--release-to",
        reader.url,
        "--release-topic",
        reader.subject_template,
    )
    nodes = [Server(tmp_path / name, *common) for name in "abc"]
    try:
        for node in nodes:
            node.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for node in nodes:
                await until_ready(session, node.url)
            sent: dict[str, int] = {}
            unanswered: set[int] = set()
            load = asyncio.create_task(
                _send_load(
                    session,
                    [n.url for n in nodes],
                    sent,
                    unanswered,
                    batches=120,
                    per_batch=25,
                    every_s=0.025,
                    delay_ms=(300, 3000),
                )
            )
            await asyncio.sleep(1.5)
            nodes[1].kill()
            await load
            assert len(sent) >= 1500, len(sent)  # a third of the batches go to the killed node
            got = await _all_arrived(reader, set(sent), 40)
            _check_once_and_on_time(got, sent, unanswered)
            # The survivors release what the killed node had accepted (ids in its shards).
            assert int(time.time() * 1000) >= max(sent.values())
    finally:
        for node in nodes:
            node.ensure_stopped()
        await reader.close()


async def test_jetstream_cluster_node_killed_during_releases(tmp_path: Path) -> None:
    cluster = nats_cluster(tmp_path / "nats")
    for member in cluster:
        member.start(wait=False)
    for member in cluster:
        member.wait_listening()
    urls = ",".join(m.url for m in cluster)
    reader = JetStreamReader(urls, unique("TQC"), unique("tqc"), replicas=3)
    server = Server(
        tmp_path / "d", "--release-to", urls, "--release-topic", reader.subject_template
    )
    try:
        await _open_when_cluster_ready(reader)
        server.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await until_ready(session, server.url)
            sent: dict[str, int] = {}
            load = asyncio.create_task(
                _send_load(
                    session,
                    [server.url],
                    sent,
                    set(),
                    batches=60,
                    per_batch=40,
                    every_s=0.03,
                    delay_ms=(200, 2500),
                )
            )
            await asyncio.sleep(1.0)
            info = await reader.nc.jetstream(timeout=10).stream_info(reader.stream)
            leader = info.cluster.leader
            victim = next(m for m in cluster if m.name == leader)
            victim.kill()  # the stream's leader: the others elect a new one
            await load
            assert len(sent) == 2400
            got = await _all_arrived(reader, set(sent), 60)
            _check_once_and_on_time(got, sent)
    finally:
        server.ensure_stopped()
        await reader.close()
        for member in cluster:
            member.kill()


async def _open_when_cluster_ready(reader: JetStreamReader, timeout_s: float = 30) -> None:
    """The cluster takes a moment to elect its JetStream meta leader: retry the stream."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            await reader.open()
            return
        except Exception as exc:
            last = exc
            if reader.nc is not None:
                await reader.nc.close()
            await asyncio.sleep(0.5)
    raise AssertionError(f"no JetStream cluster: {last!r}")
