"""Lateness at the consumer's handler with many pending: a server process (embedded store, async
flush), ``--pending`` delayed messages scheduled a day or two ahead (batches of 1000 over HTTP),
then ``--rate`` x ``--seconds`` messages due evenly from 5 s on, sent in batches ahead of time;
the SDK's :class:`~tempomq.client.Consumer` (default settings) runs in a process of its own and
takes ``now - due`` first thing in its handler, split into release (``RELEASED_AT - DELIVER_AT``)
and delivery (handler start - ``RELEASED_AT``). Prints p50/p99/max in ms per run, the median of
the runs with the spread, and one JSON line.

    python bench/consumer_lateness.py [--pending 1000000] [--rate 4000] [--seconds 20] [--runs 3]
    python bench/consumer_lateness.py --quick      # 20,000 pending, 1 run of 5 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _server import BenchServer, percentile

from tempomq.client import Client, OutgoingMessage

HERE = Path(__file__).resolve().parent
TOPIC = "late"
START_S = 5.0


async def _fill(url: str, pending: int) -> None:
    rng = random.Random(3)
    day = 86_400_000
    async with Client(url, timeout_s=60) as client:
        await client.create_topic(TOPIC)

        async def one(start: int) -> None:
            now = int(time.time() * 1000)
            msgs = [
                OutgoingMessage("p" * 64, deliver_at=now + day + rng.randrange(day))
                for _ in range(min(1000, pending - start))
            ]
            await client.send_batch(TOPIC, msgs)

        for start in range(0, pending, 4000):
            await asyncio.gather(*(one(s) for s in range(start, min(pending, start + 4000), 1000)))


async def _schedule(url: str, rate: int, seconds: float) -> float:
    """Schedule the measured messages; returns the epoch ms the first is due."""
    n = int(rate * seconds)
    # Lead time: enough to send them all first (batches of 1000, four at a time).
    first = time.time() * 1000 + (START_S + n / 10_000) * 1000
    dues = [int(first + i * 1000 / rate) for i in range(n)]
    async with Client(url, timeout_s=60) as client:

        async def one(chunk: list[int]) -> None:
            await client.send_batch(
                TOPIC, [OutgoingMessage(json.dumps({"due": d}), deliver_at=d) for d in chunk]
            )

        for start in range(0, n, 4000):
            await asyncio.gather(
                *(one(dues[s : s + 1000]) for s in range(start, min(n, start + 4000), 1000))
            )
    if time.time() * 1000 > first:
        raise SystemExit("scheduling took longer than the lead time; lower --rate or --seconds")
    return first


def _consumer(url: str, out: Path, expect: int, kw: str) -> subprocess.Popen[bytes]:
    code = f"""
import asyncio, json, sys, time
from tempomq.client import Client, Consumer
async def main():
    got = []
    done = asyncio.Event()
    async def handle(msg):
        now = time.time() * 1000
        released = int(msg.properties["RELEASED_AT"])
        due = json.loads(msg.body)["due"]
        got.append((now - due, released - int(msg.properties["DELIVER_AT"]), now - released))
        if len(got) >= {expect}:
            done.set()
    async with Client({url!r}) as client, Consumer(client, {TOPIC!r}, "late", handle, **{kw}):
        try:
            await asyncio.wait_for(done.wait(), {expect} / 100 + 120)
        finally:
            open({str(out)!r}, "w").write(json.dumps(got))
asyncio.run(main())
"""
    return subprocess.Popen([sys.executable, "-c", code])


def one_run(args: argparse.Namespace) -> dict[str, float]:
    with BenchServer() as server:
        asyncio.run(_fill(server.url, args.pending))
        out = Path(server.data_dir) / "lateness.json"
        expect = int(args.rate * args.seconds)
        consumer = _consumer(server.url, out, expect, args.consumer_kw)
        time.sleep(1.0)
        load = os.getloadavg()[0]
        try:
            asyncio.run(_schedule(server.url, args.rate, args.seconds))
        except BaseException:
            consumer.kill()
            raise
        try:
            consumer.wait(timeout=START_S + expect / 10_000 + args.seconds + 180)
        finally:
            if consumer.poll() is None:  # never leave it behind
                consumer.kill()
                consumer.wait()
        rows = json.loads(out.read_text())
    values = sorted(r[0] for r in rows)
    release = sorted(r[1] for r in rows)
    delivery = sorted(r[2] for r in rows)
    return {
        "got": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": values[-1],
        "early": sum(1 for v in values if v < 0),
        "load": load,
        # The split: release (RELEASED_AT - DELIVER_AT, the server's delay service) and
        # delivery (handler start - RELEASED_AT: the release's write, the long poll's wake,
        # the answer, the SDK consumer's dispatch).
        "release_p50": percentile(release, 50),
        "release_p99": percentile(release, 99),
        "release_max": release[-1],
        "delivery_p50": percentile(delivery, 50),
        "delivery_p99": percentile(delivery, 99),
        "delivery_max": delivery[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pending", type=int, default=1_000_000)
    ap.add_argument("--rate", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="20,000 pending, 1 run of 5 s")
    ap.add_argument(
        "--consumer-kw",
        default="{}",
        help="Consumer arguments as a Python dict, e.g. \"{'polls': 1}\"",
    )
    args = ap.parse_args()
    if args.quick:
        args.pending, args.seconds, args.runs = 20_000, 5, 1
    runs = []
    for i in range(args.runs):
        r = one_run(args)
        runs.append(r)
        print(
            f"run {i + 1}: {r['got']} at the handler, lateness p50 {r['p50']:.1f} p99 "
            f"{r['p99']:.1f} max {r['max']:.1f} ms, {r['early']} early (load {r['load']:.1f});"
            f" release p50/p99/max {r['release_p50']:.1f}/{r['release_p99']:.1f}/"
            f"{r['release_max']:.1f}, delivery {r['delivery_p50']:.1f}/{r['delivery_p99']:.1f}/"
            f"{r['delivery_max']:.1f} ms",
            flush=True,
        )
    keys = (
        "p50",
        "p99",
        "max",
        *(f"{part}_{k}" for part in ("release", "delivery") for k in ("p50", "p99", "max")),
    )
    summary = {
        k: (statistics.median(r[k] for r in runs), min(r[k] for r in runs), max(r[k] for r in runs))
        for k in keys
    }
    print(
        f"{args.pending:,} pending, {args.rate:,}/s due for {args.seconds:g} s, {args.runs} runs: "
        + ", ".join(f"{k} {m:.1f} ms [{lo:.1f}-{hi:.1f}]" for k, (m, lo, hi) in summary.items())
    )
    print(
        json.dumps(
            {
                "bench": "consumer_lateness",
                "pending": args.pending,
                "rate": args.rate,
                "runs": runs,
                "median": {k: v[0] for k, v in summary.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
