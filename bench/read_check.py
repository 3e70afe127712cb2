"""What checking a record's CRC on every read costs: in-process reads of 256-byte messages with
the check (``MessageStore.read``, what receive, lookup and replay use) and without it (the
record decoded straight from its mapping), in the same run. The difference is the per-message
price of never delivering a damaged record; bench/http_consume.py gives the per-message cost of
a whole receive + ack to compare it with.

Prints a table and one JSON line. Usage: python bench/read_check.py [--messages N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from broker_core import codec
from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.message import Message
from delayserver.timers import TimerService


async def measure(n: int, rounds: int, body: bytes) -> dict[str, float]:
    data = Path(tempfile.mkdtemp(prefix="tempomq-bench-"))
    timers = TimerService()
    timers.start()
    broker = Broker(BrokerConfig(data_dir=data, segment_bytes=256 << 20), timers=timers)  # type: ignore[arg-type]
    await broker.start()
    try:
        await broker.create_topic("bench", 8)
        for i in range(0, n, 1000):
            await broker.put(
                [Message(topic="bench", body=body) for _ in range(min(1000, n - i))],
                check_duplicate=False,
            )
        store = broker.store
        offsets = []
        for q in range(8):
            cq = store.consume_queue("bench", q)
            offsets += [cq.get(i)[0] for i in range(cq.min_offset, cq.max_offset)]
        view_at = store.commitlog.view_at
        checked, unchecked = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for phy in offsets:
                store.read(phy)
            checked.append((time.perf_counter() - t0) / len(offsets) * 1e9)
            t0 = time.perf_counter()
            for phy in offsets:
                codec.decode(*view_at(phy))
            unchecked.append((time.perf_counter() - t0) / len(offsets) * 1e9)
        return {
            "checked_ns": statistics.median(checked),
            "unchecked_ns": statistics.median(unchecked),
        }
    finally:
        await broker.stop()
        await timers.stop()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5, help="read passes; the median is shown")
    args = ap.parse_args()
    r = asyncio.run(measure(args.messages, args.rounds, b"x" * 256))
    cost = r["checked_ns"] - r["unchecked_ns"]
    print(f"{'read':<22}{'ns/message':>12}")
    print(f"{'with CRC check':<22}{r['checked_ns']:>12.0f}")
    print(f"{'without':<22}{r['unchecked_ns']:>12.0f}")
    print(f"{'cost of the check':<22}{cost:>12.0f}")
    print(json.dumps({"bench": "read_check", "messages": args.messages, **r, "check_ns": cost}))


if __name__ == "__main__":
    main()
