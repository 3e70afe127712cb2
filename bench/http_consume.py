"""Receive + ack over HTTP against a spawned server: the topic is pre-filled, then
``--consumers`` concurrent consumers of one group receive batches of 32 and ack each batch.

Prints a table and one JSON line. Usage: python bench/http_consume.py [--messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import orjson
from _server import BenchServer


async def fill(session: aiohttp.ClientSession, url: str, n: int) -> None:
    await session.post(f"{url}/v1/topics", json={"name": "bench", "queues": 8})
    payload = orjson.dumps({"messages": [{"body": "x" * 256} for _ in range(1000)]})
    headers = {"Content-Type": "application/json"}

    async def one() -> None:
        async with session.post(
            f"{url}/v1/topics/bench/messages", data=payload, headers=headers
        ) as r:
            assert r.status == 201, await r.text()

    for _ in range(0, n, 4000):
        await asyncio.gather(*(one() for _ in range(4)))


async def consume(url: str, n: int, consumers: int, batch: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=consumers)) as session:
        await fill(session, url, n)
        got = 0
        receive = f"{url}/v1/topics/bench/groups/bench/receive"
        ack = f"{url}/v1/topics/bench/groups/bench/ack"
        req = orjson.dumps({"max_messages": batch, "wait_ms": 200})
        headers = {"Content-Type": "application/json"}

        async def consumer() -> None:
            nonlocal got
            while got < n:
                async with session.post(receive, data=req, headers=headers) as r:
                    msgs = orjson.loads(await r.read())["messages"]
                if not msgs:
                    continue
                receipts = orjson.dumps({"receipts": [m["receipt"] for m in msgs]})
                async with session.post(ack, data=receipts, headers=headers) as r:
                    assert r.status == 200
                    await r.read()
                got += len(msgs)

        t0 = time.perf_counter()
        await asyncio.gather(*(consumer() for _ in range(consumers)))
        return got / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--consumers", type=int, default=8)
    args = ap.parse_args()
    with BenchServer() as server:
        rate = asyncio.run(consume(server.url, args.messages, args.consumers, 32))
    print(f"receive+ack, batches of 32, {args.consumers} consumers: {rate:>10,.0f} msg/s")
    print(
        json.dumps(
            {
                "bench": "http_consume",
                "batch": 32,
                "consumers": args.consumers,
                "msg_per_s": round(rate),
            }
        )
    )


if __name__ == "__main__":
    main()
