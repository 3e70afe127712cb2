"""Schedule delayed messages over HTTP in batches of 100 against a spawned server, with the
embedded delay store and with Redis (``--redis-url``; by default a private ``redis-server`` on
a free port that the bench starts and stops; a given one has its database cleared first). Delays
are spread over the next day, so nothing is released while it runs.

Prints a table and one JSON line. Usage: python bench/http_schedule.py [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import aiohttp
import orjson
from _server import BenchServer, PrivateRedis, percentile


async def schedule(url: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    rng = random.Random(1)
    headers = {"Content-Type": "application/json"}
    payloads = [
        orjson.dumps(
            {
                "messages": [
                    {"body": "x" * 256, "delay_ms": rng.randint(60_000, 86_400_000)}
                    for _ in range(100)
                ]
            }
        )
        for _ in range(64)
    ]
    latencies: list[float] = []
    sent = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await session.post(f"{url}/v1/topics", json={"name": "bench", "queues": 8})
        deadline = time.perf_counter() + seconds

        async def client(k: int) -> None:
            nonlocal sent
            target = f"{url}/v1/topics/bench/messages"
            i = k
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.post(target, data=payloads[i % 64], headers=headers) as r:
                    body = await r.read()
                    if r.status != 201:
                        raise RuntimeError(f"status {r.status}: {body[:200]!r}")
                latencies.append(time.perf_counter() - t0)
                sent += 100
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
    return sent / elapsed, sorted(latencies)


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--redis-url", default=None, help="default: a private redis-server")
    args = ap.parse_args()
    if args.redis_url is None:
        with PrivateRedis() as rd:
            args.redis_url = rd.url()
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    out: dict[str, object] = {"bench": "http_schedule", "batch": 100}
    for name, extra in (("embedded", ()), ("redis", ("--redis-url", args.redis_url))):
        if name == "redis":
            flush_redis(args.redis_url)
        with BenchServer(*extra) as server:
            rate, lat = asyncio.run(schedule(server.url, args.clients, args.seconds))
        p50, p99 = percentile(lat, 50) * 1000, percentile(lat, 99) * 1000
        print(
            f"schedule, batches of 100, {name:<8}: {rate:>10,.0f} msg/s  "
            f"p50 {p50:.1f} ms  p99 {p99:.1f} ms per request"
        )
        out[f"{name}_msg_per_s"] = round(rate)
        out[f"{name}_p99_ms"] = round(p99, 1)
    if name == "redis":
        flush_redis(args.redis_url)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
