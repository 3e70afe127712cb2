"""Release targets (``--release-to``): schedule and release throughput into each target with
1, 2 and 3 tempomq nodes, and release lateness into JetStream measured at a JetStream consumer.

Every node is a real ``tempomq serve`` process on a private redis-server (started here on a
free port, so the shared Redis is never touched), all releasing into the same target:

- ``embedded``: each node's own topics (counted over HTTP);
- ``nats``: a JetStream stream of its own on the shared nats-server (127.0.0.1:4222);
- ``amqp``: an exchange and queue of their own on the shared RabbitMQ (127.0.0.1:5672).

Throughput, per run: ``--messages`` delayed sends (batches of 100, 2 clients, round robin over the
nodes) all due at one moment after the last is stored; schedule = messages / time to store them,
release = messages / time from their due moment until the target holds all of them. Also the CPU
the nodes used (user + system, from /proc) per thousand messages scheduled and released, and the
Redis commands per message (Redis's own INFO commandstats).

Lateness: one node, ``--rate`` messages a second due evenly over ``--seconds``, stored before
the first is due; a JetStream push consumer takes each as it arrives: lateness = arrival time -
DELIVER_AT (same machine clock), p50/p99/max.

Each figure is the median of ``--runs`` runs with min-max. Prints a table and one JSON line.
Usage: python bench/release_targets.py [--messages 20000] [--runs 3] [--nodes 1,2,3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _server import BenchServer, PrivateRedis, percentile

NATS_URL = "nats://127.0.0.1:4222"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Sink:
    """The target's side: set up, count what arrived, take it down."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        tag = uuid.uuid4().hex[:8]
        self.prefix, self.stream, self.exchange = f"tqb{tag}", f"TQB{tag}", f"tqb-{tag}"
        self.nc: Any = None
        self.conn: Any = None
        self.channel: Any = None
        self.nodes: list[BenchServer] = []

    def args(self) -> list[str]:
        if self.kind == "nats":
            return ["--release-to", NATS_URL, "--release-topic", self.prefix + ".{topic}"]
        if self.kind == "amqp":
            return ["--release-to", AMQP_URL, "--release-topic", self.exchange + "/{topic}"]
        return []

    async def open(self) -> None:
        if self.kind == "nats":
            import nats

            self.nc = await nats.connect(NATS_URL)
            await self.nc.jetstream().add_stream(name=self.stream, subjects=[self.prefix + ".>"])
        elif self.kind == "amqp":
            import aio_pika

            self.conn = await aio_pika.connect(AMQP_URL)
            self.channel = await self.conn.channel()
            ex = await self.channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
            queue = await self.channel.declare_queue(self.exchange + ".q", durable=True)
            await queue.bind(ex, "bench")

    async def count(self, session: aiohttp.ClientSession) -> int:
        if self.kind == "nats":
            info = await self.nc.jetstream().stream_info(self.stream)
            return int(info.state.messages)
        if self.kind == "amqp":
            queue = await self.channel.declare_queue(self.exchange + ".q", passive=True)
            return int(queue.declaration_result.message_count or 0)
        total = 0
        for node in self.nodes:
            async with session.get(f"{node.url}/v1/topics/bench") as r:
                if r.status == 404:
                    continue
                topic = await r.json()
            total += sum(q["max_offset"] - q["min_offset"] for q in topic["queue_offsets"])
        return total

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.jetstream().delete_stream(self.stream)
            await self.nc.close()
        if self.conn is not None:
            await self.channel.queue_delete(self.exchange + ".q")
            await self.channel.exchange_delete(self.exchange)
            await self.conn.close()


async def _schedule(
    session: aiohttp.ClientSession, urls: list[str], times: list[int], clients: int = 2
) -> None:
    bodies = [
        orjson.dumps(
            {"messages": [{"body": "x" * 256, "deliver_at": t} for t in times[i : i + 100]]}
        )
        for i in range(0, len(times), 100)
    ]
    queue = list(zip(bodies, itertools.cycle(urls), strict=False))
    headers = {"Content-Type": "application/json"}

    async def client() -> None:
        while queue:
            body, url = queue.pop()
            async with session.post(
                f"{url}/v1/topics/bench/messages", data=body, headers=headers
            ) as r:
                if r.status != 201:
                    raise RuntimeError(f"{r.status}: {(await r.read())[:300]!r}")

    await asyncio.gather(*(client() for _ in range(clients)))


async def throughput_run(kind: str, nodes: int, messages: int) -> dict[str, float]:
    sink = Sink(kind)
    await sink.open()
    try:
        with PrivateRedis() as redis:
            servers = [
                BenchServer("--redis-url", redis.url(), "--auto-create-topics", *sink.args())
                for _ in range(nodes)
            ]
            for s in servers:
                s.__enter__()
            sink.nodes = servers
            try:
                async with aiohttp.ClientSession() as session:
                    await _ready(session, [s.url for s in servers], nodes)
                    pids = [s.proc.pid for s in servers if s.proc is not None]
                    cpu0, cmd0 = sum(cpu_s(p) for p in pids), redis.commands()
                    # Due after the schedule is over: estimated at 4k/s, at least 3 s ahead.
                    due = int(time.time() * 1000) + max(3000, messages // 4)
                    t0 = time.perf_counter()
                    await _schedule(session, [s.url for s in servers], [due] * messages)
                    scheduled_s = time.perf_counter() - t0
                    if time.time() * 1000 >= due:
                        raise RuntimeError("scheduling took past the due time: raise the margin")
                    while (n := await sink.count(session)) < messages:
                        await asyncio.sleep(0.02)
                    released_s = time.time() - due / 1000
                    cpu = sum(cpu_s(p) for p in pids) - cpu0
                    commands = redis.commands() - cmd0
                    assert n == messages, (n, messages)
            finally:
                for s in servers:
                    s.__exit__(None, None, None)
    finally:
        await sink.close()
    return {
        "schedule_per_s": messages / scheduled_s,
        "release_per_s": messages / released_s,
        "cpu_ms_per_1k": cpu * 1000 / (messages / 1000),
        "redis_cmds_per_msg": commands / messages,
    }


async def _ready(session: aiohttp.ClientSession, urls: list[str], nodes: int) -> None:
    deadline = time.monotonic() + 30
    for url in urls:
        while True:
            async with session.get(f"{url}/readyz") as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready")
            await asyncio.sleep(0.1)
    # The 16 delay shards spread over every node before the load starts.
    while True:
        owned = []
        for url in urls:
            async with session.get(f"{url}/metrics") as r:
                text = await r.text()
            line = next(x for x in text.splitlines() if x.startswith("tempomq_delay_shards_owned "))
            owned.append(int(float(line.split()[1])))
        if sum(owned) == 16 and max(owned) - min(owned) <= 1:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"shards owned {owned}")
        await asyncio.sleep(0.2)


async def lateness_run(rate: int, seconds: float) -> dict[str, float]:
    sink = Sink("nats")
    await sink.open()
    late: list[float] = []
    try:
        with (
            PrivateRedis() as redis,
            BenchServer("--redis-url", redis.url(), "--auto-create-topics", *sink.args()) as server,
        ):
            async with aiohttp.ClientSession() as session:
                await _ready(session, [server.url], 1)
                total = int(rate * seconds)
                start = int(time.time() * 1000) + 4000 + total // 4
                times = [start + i * 1000 // rate for i in range(total)]
                await _schedule(session, [server.url], times)
                if time.time() * 1000 >= start:
                    raise RuntimeError("scheduling took past the first due time")
                done = asyncio.Event()

                async def on_msg(msg: Any) -> None:
                    late.append(time.time() * 1000 - int(msg.headers["DELIVER_AT"]))
                    if len(late) >= total:
                        done.set()

                sub = await sink.nc.jetstream().subscribe(
                    sink.prefix + ".bench", cb=on_msg, ordered_consumer=True
                )
                await asyncio.wait_for(done.wait(), seconds + 60 + total / 1000)
                await sub.unsubscribe()
    finally:
        await sink.close()
    late.sort()
    return {"p50_ms": percentile(late, 50), "p99_ms": percentile(late, 99), "max_ms": late[-1]}


def summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "median": statistics.median(r[key] for r in runs),
            "min": min(r[key] for r in runs),
            "max": max(r[key] for r in runs),
        }
        for key in runs[0]
    }


def fmt(s: dict[str, float], digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--nodes", default="1,2,3")
    p.add_argument("--targets", default="embedded,nats,amqp")
    p.add_argument("--rate", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    load = os.getloadavg()
    print(
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs"
    )
    results: dict[str, Any] = {"bench": "release_targets", "load_avg": load[:3], "throughput": {}}
    heads = ("schedule/s", 24), ("release/s", 24), ("CPU ms/1k", 20), ("Redis cmds/msg", 16)
    print(f"{'target':9} {'nodes':>5}" + "".join(f"  {h:>{w}}" for h, w in heads))
    for kind in args.targets.split(","):
        for nodes in (int(n) for n in args.nodes.split(",")):
            runs = [await throughput_run(kind, nodes, args.messages) for _ in range(args.runs)]
            s = summary(runs)
            results["throughput"][f"{kind}/{nodes}"] = s
            print(
                f"{kind:9} {nodes:>5}  {fmt(s['schedule_per_s']):>24}"
                f"  {fmt(s['release_per_s']):>24}  {fmt(s['cpu_ms_per_1k']):>20}"
                f"  {fmt(s['redis_cmds_per_msg'], 1):>16}",
                flush=True,
            )
    if args.rate > 0:
        runs = [await lateness_run(args.rate, args.seconds) for _ in range(args.runs)]
        s = summary(runs)
        results["lateness_jetstream"] = {"rate": args.rate, "seconds": args.seconds, **s}
        print(
            f"lateness into JetStream at {args.rate}/s (ms, at a consumer):"
            f" p50 {fmt(s['p50_ms'], 1)}  p99 {fmt(s['p99_ms'], 1)}  max {fmt(s['max_ms'], 1)}"
        )
    results["load_avg_end"] = os.getloadavg()[:3]
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
