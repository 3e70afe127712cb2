"""How late the service's timers run, with the realtime alarm (Linux timerfd) and without it.

One ``TimerService`` on uvloop (as the server runs); ``--timers`` timers one after another, each
due 2-9 ms ahead at a whole millisecond, as delayed messages are. Lateness is the epoch time the
callback ran minus its due time, in microseconds. Medians of ``--runs`` runs with [min-max], and
the load average. Prints a table and one JSON line.

    python bench/timer_precision.py [--timers 500] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import uvloop
from _server import percentile

from delayserver.timers import TimerService


async def one_run(n: int, alarm: bool) -> dict[str, float]:
    service = TimerService(alarm=alarm)
    service.start()
    loop = asyncio.get_running_loop()
    late: list[float] = []
    rng = random.Random(7)
    try:
        for _ in range(n):
            due = service.now_ms() + rng.randint(2, 9)
            fired: asyncio.Future[None] = loop.create_future()

            def run(due: int = due, fired: asyncio.Future[None] = fired) -> None:
                late.append(time.time_ns() / 1000 - due * 1000)
                fired.set_result(None)

            service.call_at(due, run)
            await fired
    finally:
        await service.stop()
    late.sort()
    return {
        "p50": percentile(late, 50),
        "p90": percentile(late, 90),
        "p99": percentile(late, 99),
        "max": late[-1],
        "early": sum(1 for v in late if v < 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timers", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    results: dict[str, list[dict[str, float]]] = {"alarm": [], "loop timer only": []}
    for _ in range(args.runs):
        for name in results:
            results[name].append(uvloop.run(one_run(args.timers, name == "alarm")))
    print(f"{args.timers} timers per run, {args.runs} runs, load {load:.1f}; lateness in us,")
    print("median [min-max]")
    print("| | p50 | p90 | p99 | max | early |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, runs in results.items():
        cells = []
        summary[name] = {}
        for k in ("p50", "p90", "p99", "max", "early"):
            vals = [r[k] for r in runs]
            med = statistics.median(vals)
            summary[name][k] = med
            cells.append(f"{med:.0f} [{min(vals):.0f}-{max(vals):.0f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")
    out = {"bench": "timer_precision", "load": load, "runs": results, "median": summary}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
