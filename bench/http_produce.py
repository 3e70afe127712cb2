"""Produce over HTTP against a spawned server (async flush, 256-byte bodies).

- ``batch``: ``--clients`` concurrent connections each POSTing batches of 100 messages;
- ``single``: 32 concurrent clients each POSTing one message per request, with per-request
  latency percentiles.

Prints a table and one JSON line. Usage: python bench/http_produce.py [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import orjson
from _server import BenchServer, percentile


async def produce(
    url: str, clients: int, batch: int, seconds: float, token: str | None = None
) -> tuple[float, list[float]]:
    body = "x" * 256
    payload = orjson.dumps(
        {"messages": [{"body": body} for _ in range(batch)]} if batch > 1 else {"body": body}
    )
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    headers = {"Content-Type": "application/json", **auth}
    latencies: list[float] = []
    sent = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await session.post(f"{url}/v1/topics", json={"name": "bench", "queues": 8}, headers=auth)
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal sent
            target = f"{url}/v1/topics/bench/messages"
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.post(target, data=payload, headers=headers) as r:
                    await r.read()
                    if r.status != 201:
                        raise RuntimeError(f"status {r.status}")
                latencies.append(time.perf_counter() - t0)
                sent += batch

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return sent / elapsed, sorted(latencies)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    out: dict[str, object] = {"bench": "http_produce"}
    with BenchServer() as server:
        rate, lat = asyncio.run(produce(server.url, args.clients, 100, args.seconds))
        print(
            f"batches of 100, {args.clients} clients: {rate:>10,.0f} msg/s  "
            f"p50 {percentile(lat, 50) * 1000:.2f} ms  p99 {percentile(lat, 99) * 1000:.2f} ms"
        )
        out["batch100_msg_per_s"] = round(rate)
    with BenchServer() as server:
        rate, lat = asyncio.run(produce(server.url, 32, 1, args.seconds))
        p50, p99 = percentile(lat, 50) * 1000, percentile(lat, 99) * 1000
        print(
            f"single messages, 32 clients: {rate:>10,.0f} msg/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms"
        )
        out.update(
            single_msg_per_s=round(rate), single_p50_ms=round(p50, 2), single_p99_ms=round(p99, 2)
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
