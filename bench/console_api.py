"""Latency of the web console's API calls on a big store: none may grow with what is stored.

A server in its own process is filled over HTTP with ``--messages`` plain messages (batches of
1000, topic ``bench``, 8 queues, one key each), ``--pending`` delayed messages spread over 60
days, ``--transactions`` open transactions, and a group with 1000 messages in flight. Then each
call a console page makes is timed: ``--runs`` runs of ``--calls`` sequential calls each; a run's
figure is its median latency, and the figure printed is the median over the runs with their
spread (min-max of the run medians).

Prints a table and one JSON line. Usage: python bench/console_api.py [--messages N] [--pending N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp
from _server import BenchServer

TOPIC = "bench"
GROUP = "console-bench"
DAY_MS = 24 * 3600 * 1000


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> Any:
    async with session.post(url, json=body) as r:
        data = await r.json()
        assert r.status in (200, 201), data
        return data


async def _fill(session: aiohttp.ClientSession, base: str, args: argparse.Namespace) -> str:
    """Store everything; returns the id of a message in the middle of the topic."""
    await _post(session, f"{base}/v1/topics", {"name": TOPIC, "queues": 8})
    url = f"{base}/v1/topics/{TOPIC}/messages"
    middle = ""
    batch = 1000
    for start in range(0, args.messages, batch):
        n = min(batch, args.messages - start)
        msgs = [{"body": f"message {start + i}", "keys": [f"k{start + i}"]} for i in range(n)]
        got = await _post(session, url, {"messages": msgs})
        if start <= args.messages // 2 < start + n:
            middle = got["results"][args.messages // 2 - start]["msg_id"]
    for start in range(0, args.pending, batch):
        n = min(batch, args.pending - start)
        msgs = [
            {"body": "later", "delay_ms": 60_000 + (start + i) * 60 * DAY_MS // args.pending}
            for i in range(n)
        ]
        await _post(session, url, {"messages": msgs})
    for i in range(args.transactions):
        tx = {"topic": TOPIC, "message": {"body": f"tx {i}"}, "producer_group": "bench"}
        await _post(session, f"{base}/v1/transactions", tx)
    group_url = f"{base}/v1/topics/{TOPIC}/groups/{GROUP}/receive"
    await _post(session, group_url, {"max_messages": 1000, "invisible_ms": 3_600_000})
    return middle


def _calls(middle: str, since_ms: int) -> dict[str, str]:
    g = f"/v1/topics/{TOPIC}/groups/{GROUP}"
    return {
        "overview": "/v1/overview",
        "topics": "/v1/topics",
        "topic": f"/v1/topics/{TOPIC}",
        "browse newest": f"/v1/topics/{TOPIC}/queues/3/messages?limit=50",
        "browse by time": f"/v1/topics/{TOPIC}/queues/3/messages?limit=50&since={since_ms}",
        "message trace": f"/v1/messages/{middle}/trace",
        "by key": f"/v1/topics/{TOPIC}/messages?key=k7",
        "groups": "/v1/groups",
        "group": g,
        "in flight": f"{g}/inflight?limit=100",
        "delay timeline": "/v1/delay/timeline?limit=20",
        "transactions": "/v1/transactions?state=prepared&limit=100",
    }


async def _time(session: aiohttp.ClientSession, url: str, calls: int) -> float:
    """Median latency in ms of ``calls`` sequential GETs."""
    took = []
    for _ in range(calls):
        t0 = time.perf_counter()
        async with session.get(url) as r:
            await r.read()
            assert r.status == 200, await r.text()
        took.append((time.perf_counter() - t0) * 1000)
    return statistics.median(took)


async def run(base: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        since_ms = int(time.time() * 1000)
        middle = await _fill(session, base, args)
        print(f"filled in {time.perf_counter() - t0:.1f} s")
        out = {}
        for name, path in _calls(middle, since_ms).items():
            medians = [await _time(session, base + path, args.calls) for _ in range(args.runs)]
            out[name] = {
                "median_ms": round(statistics.median(medians), 2),
                "min_ms": round(min(medians), 2),
                "max_ms": round(max(medians), 2),
            }
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--pending", type=int, default=100_000)
    ap.add_argument("--transactions", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    with BenchServer("--log-level", "warning") as server:
        results = asyncio.run(run(server.url, args))
    print(f"{'call':<18}{'median ms':>12}{'spread ms':>18}")
    for name, r in results.items():
        spread = f"{r['min_ms']:.2f}-{r['max_ms']:.2f}"
        print(f"{name:<18}{r['median_ms']:>12.2f}{spread:>18}")
    print(
        json.dumps(
            {
                "bench": "console_api",
                "latency": results,
                "messages": args.messages,
                "pending": args.pending,
                "transactions": args.transactions,
                "runs": args.runs,
                "calls": args.calls,
            }
        )
    )


if __name__ == "__main__":
    main()
