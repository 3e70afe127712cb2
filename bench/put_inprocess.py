"""In-process broker put throughput: 256-byte bodies into an 8-queue topic, async or sync flush.

Two shapes, both through ``Broker.put`` on one event loop with no HTTP:
- ``single``: ``--producers`` coroutines, each awaiting one put at a time (group commit batches
  whatever is in flight);
- ``batch``: four coroutines putting lists of ``--batch`` messages (so one batch is being
  encoded while the previous one is written).

Prints a table and one JSON line. Usage: python bench/put_inprocess.py [--messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from broker_core.broker import Broker
from broker_core.config import BrokerConfig
from broker_core.message import Message
from delayserver.timers import TimerService


async def run(mode: str, n: int, producers: int, batch: int, flush: str, body: bytes) -> float:
    data = Path(tempfile.mkdtemp(prefix="tempomq-bench-"))
    timers = TimerService()
    timers.start()
    broker = Broker(
        BrokerConfig(data_dir=data, flush=flush, segment_bytes=256 << 20), timers=timers
    )  # type: ignore[arg-type]
    await broker.start()
    await broker.create_topic("bench", 8)
    try:
        t0 = time.perf_counter()
        if mode == "single":
            per = n // producers

            async def producer() -> None:
                put = broker.put
                for _ in range(per):
                    await put([Message("bench", body)], check_duplicate=False)

            await asyncio.gather(*(producer() for _ in range(producers)))
            done = per * producers
        else:
            per = n // (4 * batch)

            async def batch_producer() -> None:
                put = broker.put
                for _ in range(per):
                    await put([Message("bench", body) for _ in range(batch)], check_duplicate=False)

            await asyncio.gather(*(batch_producer() for _ in range(4)))
            done = per * 4 * batch
        elapsed = time.perf_counter() - t0
    finally:
        await broker.stop()
        await timers.stop()
        shutil.rmtree(data, ignore_errors=True)
    return done / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=300_000)
    ap.add_argument("--producers", type=int, default=64)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--flush", default="async", choices=["async", "sync"])
    args = ap.parse_args()
    body = b"x" * 256
    results = {}
    for mode in ("batch", "single"):
        rate = asyncio.run(run(mode, args.messages, args.producers, args.batch, args.flush, body))
        results[mode] = round(rate)
        print(f"put {mode:<6} flush={args.flush}: {rate:>10,.0f} msg/s")
    print(
        json.dumps(
            {
                "bench": "put_inprocess",
                "flush": args.flush,
                "msg_per_s": results,
                "messages": args.messages,
                "producers": args.producers,
                "batch": args.batch,
            }
        )
    )


if __name__ == "__main__":
    main()
