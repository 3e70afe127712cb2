"""The official RocketMQ Python client against tempomq's gRPC endpoint, beside HTTP, in one run.

Per run, on a fresh server (async flush, 256-byte bodies):

- ``rmq send``: one ``Producer`` shared by ``--threads`` threads, each calling the synchronous
  ``send`` in a loop (what an application does);
- ``http send``: the same number of concurrent HTTP clients, one message per request;
- ``rmq receive+ack``: a ``SimpleConsumer`` draining what was sent, ``receive(32)`` then one
  ``ack`` per message (the client has no batch ack), from ``--threads`` threads;
- ``http receive+ack``: the same with HTTP, 32 per receive and one ack request per batch.

Besides msg/s it prints the CPU time per 1000 messages of the load generator process and of the
server process, which shows where the cost is. ``--runs`` repeats everything and reports the
median with the min-max spread. Prints a table and one JSON line.
Usage: python bench/rocketmq_bench.py [--seconds S] [--threads N] [--runs R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from _server import BenchServer, free_port, process_cpu_s

BODY = b"x" * 256
TOPIC = "bench"


class Meter:
    """Messages, wall time and the CPU of both processes over one phase."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> Meter:
        self.t0, self.c0, self.s0 = (
            time.perf_counter(),
            time.process_time(),
            process_cpu_s(self.pid),
        )
        self.n = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.client_cpu = time.process_time() - self.c0
        self.server_cpu = process_cpu_s(self.pid) - self.s0

    def result(self) -> dict[str, float]:
        per_k = 1000 / max(self.n, 1)
        return {
            "msg_per_s": self.n / self.wall,
            "client_cpu_ms_per_1k": self.client_cpu * 1000 * per_k,
            "server_cpu_ms_per_1k": self.server_cpu * 1000 * per_k,
        }


def in_threads(threads: int, work: Callable[[], int]) -> int:
    counts: list[int] = []
    lock = threading.Lock()

    def run() -> None:
        n = work()
        with lock:
            counts.append(n)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts)


def rmq_send(port: int, threads: int, seconds: float, meter: Meter) -> None:
    from rocketmq import ClientConfiguration, Credentials, Message, Producer

    producer = Producer(ClientConfiguration(f"127.0.0.1:{port}", Credentials()), (TOPIC,))
    producer.startup()
    try:
        producer.send(_message(Message))  # routes and channel warm
        with meter:
            deadline = time.perf_counter() + seconds

            def work() -> int:
                n = 0
                while time.perf_counter() < deadline:
                    producer.send(_message(Message))
                    n += 1
                return n

            meter.n = in_threads(threads, work)
    finally:
        producer.shutdown()


def _message(cls: Any) -> Any:
    m = cls()
    m.topic = TOPIC
    m.body = BODY
    return m


def rmq_consume(port: int, threads: int, total: int, seconds: float, meter: Meter) -> None:
    from rocketmq import ClientConfiguration, Credentials, FilterExpression, SimpleConsumer

    config = ClientConfiguration(f"127.0.0.1:{port}", Credentials())
    consumer = SimpleConsumer(config, "rmq", {TOPIC: FilterExpression()}, await_duration=1)
    consumer.startup()
    done = [0]
    lock = threading.Lock()
    try:
        with meter:
            deadline = time.perf_counter() + seconds

            def work() -> int:
                n = 0
                while time.perf_counter() < deadline and done[0] < total:
                    got = consumer.receive(32, 30)
                    for m in got:
                        consumer.ack(m)
                    n += len(got)
                    with lock:
                        done[0] += len(got)
                return n

            meter.n = in_threads(threads, work)
    finally:
        consumer.shutdown()


async def http_send(url: str, clients: int, seconds: float, meter: Meter) -> None:
    payload = orjson.dumps({"body": BODY.decode()})
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        target = f"{url}/v1/topics/{TOPIC}/messages"
        with meter:
            deadline = time.perf_counter() + seconds

            async def client() -> int:
                n = 0
                while time.perf_counter() < deadline:
                    async with session.post(target, data=payload, headers=headers) as r:
                        await r.read()
                        if r.status != 201:
                            raise RuntimeError(f"status {r.status}")
                    n += 1
                return n

            meter.n = sum(await asyncio.gather(*(client() for _ in range(clients))))


async def http_consume(url: str, clients: int, total: int, seconds: float, meter: Meter) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        base = f"{url}/v1/topics/{TOPIC}/groups/http"
        done = [0]
        with meter:
            deadline = time.perf_counter() + seconds

            async def client() -> int:
                n = 0
                while time.perf_counter() < deadline and done[0] < total:
                    async with session.post(
                        f"{base}/receive", json={"max_messages": 32, "wait_ms": 1000}
                    ) as r:
                        got = (await r.json())["messages"]
                    if got:
                        receipts = [m["receipt"] for m in got]
                        async with session.post(f"{base}/ack", json={"receipts": receipts}) as r:
                            await r.read()
                    n += len(got)
                    done[0] += len(got)
                return n

            meter.n = sum(await asyncio.gather(*(client() for _ in range(clients))))


async def create_topic(url: str) -> None:
    body = {"name": TOPIC, "queues": 8}
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/topics", json=body) as r:
        if r.status != 201:
            raise RuntimeError(f"topic: {r.status} {await r.text()}")


def one_run(threads: int, seconds: float) -> dict[str, dict[str, float]]:
    port = free_port()
    out: dict[str, dict[str, float]] = {}
    with BenchServer("--grpc", f"127.0.0.1:{port}") as server:
        assert server.proc is not None
        pid = server.proc.pid
        asyncio.run(create_topic(server.url))
        m = Meter(pid)
        rmq_send(port, threads, seconds, m)
        out["rmq_send"] = m.result()
        sent_rmq = m.n
        m = Meter(pid)
        asyncio.run(http_send(server.url, threads, seconds, m))
        out["http_send"] = m.result()
        total = sent_rmq + m.n + 1
        m = Meter(pid)
        rmq_consume(port, threads, total, seconds, m)
        out["rmq_receive_ack"] = m.result()
        m = Meter(pid)
        asyncio.run(http_consume(server.url, threads, total, seconds, m))
        out["http_receive_ack"] = m.result()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    logging.getLogger("rocketmq-python-client").setLevel(logging.WARNING)
    runs = [one_run(args.threads, args.seconds) for _ in range(args.runs)]
    summary: dict[str, Any] = {"bench": "rocketmq", "threads": args.threads, "runs": args.runs}
    print(f"{args.threads} threads / clients, 256-byte bodies, {args.runs} runs: median [min-max]")
    for phase in runs[0]:
        for key in runs[0][phase]:
            values = [r[phase][key] for r in runs]
            med = statistics.median(values)
            summary[f"{phase}_{key}"] = round(med, 1)
            summary[f"{phase}_{key}_spread"] = [round(min(values), 1), round(max(values), 1)]
            print(f"  {phase:<18} {key:<22} {med:>10,.1f}  [{min(values):,.1f}-{max(values):,.1f}]")
    for what in ("send", "receive_ack"):
        ratios = [r[f"rmq_{what}"]["msg_per_s"] / r[f"http_{what}"]["msg_per_s"] for r in runs]
        summary[f"{what}_rmq_over_http"] = round(statistics.median(ratios), 2)
        print(
            f"  rmq/http {what}: {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}-{max(ratios):.2f}]"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
