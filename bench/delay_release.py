"""Delay server, in process (broker + timing wheel + embedded store, no HTTP), four figures:

1. release lateness: ``--pending`` messages scheduled days ahead, then ``--rate`` x
   ``--seconds`` messages due evenly over the measuring period; lateness = RELEASED_AT -
   DELIVER_AT of each released message (the property every consumer sees), p50/p99/max;
2. burst: ``--burst`` messages due in the same millisecond; time from that millisecond until the
   last one is in its topic (readable by consumers);
3. restart: stop cleanly with everything above still pending, start again on the same data;
   time until the service is serving, and the lateness of a message due 500 ms after start;
4. memory (``--memory N``, separate run): RSS growth per pending message with N scheduled.

Prints a table and one JSON line. Usage: python bench/delay_release.py [--pending 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from _stalls import StallProbe

from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.message import PROP_DELIVER_AT, PROP_RELEASED_AT, Message
from delayserver.embedded import EmbeddedDelayStore
from delayserver.service import DelayService
from delayserver.timers import TimerService

BODY = b"x" * 256


class Node:
    def __init__(self, data: Path, window_ms: int = 10_000) -> None:
        self.timers = TimerService()
        self.broker = Broker(BrokerConfig(data_dir=data), timers=self.timers)
        # A 10 s window (the server's is 60 s): the loader brings every measured message in,
        # several times during the run, as it would for messages scheduled long before.
        self.delay = DelayService(
            EmbeddedDelayStore(data / "delay.db"),
            self.broker.store,
            self.timers,
            window_ms=window_ms,
        )

    async def start(self) -> None:
        self.timers.start()
        await self.broker.start()
        await self.delay.start()
        self.broker.scheduler = self.delay

    async def stop(self) -> None:
        await self.delay.stop()
        await self.broker.stop()
        await self.timers.stop()

    def in_topic(self, topic: str) -> int:
        store = self.broker.store
        return sum(store.queue_bounds(topic, q)[1] for q in range(store.topic(topic).queues))

    def lateness_ms(self, topic: str) -> list[int]:
        store = self.broker.store
        out = []
        for q in range(store.topic(topic).queues):
            lo, hi = store.queue_bounds(topic, q)
            cq = store.consume_queue(topic, q)
            for i in range(lo, hi):
                m = store.read(cq.get(i)[0])
                assert m is not None
                out.append(int(m.properties[PROP_RELEASED_AT]) - int(m.properties[PROP_DELIVER_AT]))
        return sorted(out)


async def schedule_many(node: Node, topic: str, times: list[int], batch: int = 1000) -> None:
    sem = asyncio.Semaphore(4)

    async def one(chunk: list[int]) -> None:
        async with sem:
            await node.delay.schedule([Message(topic, BODY) for _ in chunk], chunk)

    await asyncio.gather(*(one(times[i : i + batch]) for i in range(0, len(times), batch)))


async def wait_in_topic(node: Node, topic: str, n: int, timeout_s: float) -> float:
    """Seconds (perf_counter) at which ``n`` messages were in ``topic``."""
    deadline = time.perf_counter() + timeout_s
    while node.in_topic(topic) < n:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"only {node.in_topic(topic)} of {n} in {topic} after {timeout_s}s")
        await asyncio.sleep(0.002)
    return time.perf_counter()


def pct(values: list[int], p: float) -> int:
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def bench(args: argparse.Namespace, data: Path) -> dict[str, object]:
    out: dict[str, object] = {"pending": args.pending}
    node = Node(data, args.window_ms)
    await node.start()
    for t in ("lateness", "burst", "restart"):
        await node.broker.create_topic(t, 8)
    now = node.timers.now_ms()
    rng = random.Random(3)
    t0 = time.perf_counter()
    await schedule_many(
        node, "far", [now + 86_400_000 + rng.randrange(86_400_000) for _ in range(args.pending)]
    ) if args.pending else None
    out["preload_msg_per_s"] = (
        round(args.pending / (time.perf_counter() - t0)) if args.pending else 0
    )
    gc.collect()
    gc.freeze()  # as the server does after loading: long-lived objects leave the young GC

    # 1. lateness at a steady release rate
    n = args.rate * args.seconds
    # Beyond the first window: the loader brings them in.
    start = node.timers.now_ms() + args.window_ms + 2000
    await schedule_many(node, "lateness", [start + i * 1000 // args.rate for i in range(n)])
    probe = StallProbe()
    probe.start()
    await wait_in_topic(node, "lateness", n, args.seconds + 30)
    out["stalls"] = probe.stop()
    late = node.lateness_ms("lateness")
    out["lateness_histogram_ms"] = {str(k): v for k, v in sorted(Counter(late).items())}
    out.update(
        lateness_p50_ms=pct(late, 50),
        lateness_p99_ms=pct(late, 99),
        lateness_max_ms=late[-1],
        lateness_messages=n,
        rate_per_s=args.rate,
    )

    # 2. burst: all due in one millisecond
    burst_at = node.timers.now_ms() + 2000 + args.burst // 20
    await schedule_many(node, "burst", [burst_at] * args.burst)
    await asyncio.sleep(max(0, (burst_at - node.timers.now_ms()) / 1000))
    t_due = time.perf_counter()
    done = await wait_in_topic(node, "burst", args.burst, 60)
    out.update(burst=args.burst, burst_all_in_topic_s=round(done - t_due, 3))
    await node.stop()

    # 3. restart with everything still pending
    node = Node(data, args.window_ms)
    t0 = time.perf_counter()
    await node.start()
    out["restart_serving_s"] = round(time.perf_counter() - t0, 3)
    out["restart_pending"] = await node.delay.store.pending()
    probe_at = node.timers.now_ms() + 500
    await node.delay.schedule([Message("restart", BODY)], [probe_at])
    await wait_in_topic(node, "restart", 1, 10)
    out["restart_probe_lateness_ms"] = node.lateness_ms("restart")[0]
    await node.stop()
    return out


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def memory(n: int, data: Path) -> dict[str, object]:
    node = Node(data)
    await node.start()
    await node.broker.create_topic("far", 8)
    gc.collect()
    before = rss_bytes()
    now = node.timers.now_ms()
    rng = random.Random(5)
    step = 200_000
    for i in range(0, n, step):
        await schedule_many(
            node,
            "far",
            [now + 3_600_000 + rng.randrange(30 * 86_400_000) for _ in range(min(step, n - i))],
        )
    await asyncio.sleep(1)
    gc.collect()
    after = rss_bytes()
    pending = await node.delay.store.pending()
    await node.stop()
    return {
        "memory_pending": pending,
        "rss_before_mb": before >> 20,
        "rss_after_mb": after >> 20,
        "bytes_per_pending": round((after - before) / pending, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pending", type=int, default=1_000_000)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--burst", type=int, default=200_000)
    ap.add_argument("--memory", type=int, default=0, help="only measure RSS with N pending")
    ap.add_argument("--window-ms", type=int, default=10_000, help="the delay service's window")
    ap.add_argument(
        "--save",
        type=Path,
        help="also write the JSON result (with the lateness "
        "histogram) to this file, for bench/plots.py",
    )
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="tempomq-delay-bench-"))
    try:
        if args.memory:
            out = asyncio.run(memory(args.memory, data))
            print(
                f"memory: {out['memory_pending']:,} pending, RSS {out['rss_before_mb']} -> "
                f"{out['rss_after_mb']} MiB: {out['bytes_per_pending']} B per pending message"
            )
        else:
            out = asyncio.run(bench(args, data))
            print(f"preload: {args.pending:,} pending at {out['preload_msg_per_s']:,} msg/s")
            print(
                f"lateness at {args.rate}/s with {args.pending:,} pending: "
                f"p50 {out['lateness_p50_ms']} ms, p99 {out['lateness_p99_ms']} ms, "
                f"max {out['lateness_max_ms']} ms"
            )
            print(f"stalls while releasing: {out['stalls']}")
            print(
                f"burst: {args.burst:,} due in one ms, "
                f"all in topic after {out['burst_all_in_topic_s']} s"
            )
            print(
                f"restart with {out['restart_pending']:,} pending: serving after "
                f"{out['restart_serving_s']} s, probe due 500 ms later released "
                f"{out['restart_probe_lateness_ms']} ms late"
            )
    finally:
        shutil.rmtree(data, ignore_errors=True)
    result = {"bench": "delay_release", **out}
    if args.save:
        args.save.write_text(json.dumps(result) + "\n")
    result.pop("lateness_histogram_ms", None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
