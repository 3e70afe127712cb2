"""What one-message schedules cost the embedded delay store (async flush mode), in one process:
no HTTP, no server. ``--n`` schedules one after the other, each ``await store.schedule([...])``
of one message followed by one turn of the event loop (as a server's request would give),
then everything applied (timed apart, not counted per schedule).

Prints per run and as medians [min-max] over ``--runs``: wall time per schedule, the event
loop thread's CPU time per schedule (``time.thread_time``: what a send costs the loop), and
the process's CPU time per schedule including the database's thread (``time.process_time``,
up to the point where all rows are in the table)::

    python bench/schedule_one.py [--n 20000] [--runs 3]

To compare two versions of the code, run it with ``PYTHONPATH`` set to each checkout.
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

from broker_core.message import Message, MsgIdGenerator
from delayserver.embedded import EmbeddedDelayStore

BODY = b'{"due": 1700000000000.0, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'
AT_MS = 1_800_000_000_000


async def one_run(n: int) -> dict[str, float]:
    ids = MsgIdGenerator()
    data = Path(tempfile.mkdtemp(prefix="tempomq-bench-schedule-"))
    store = EmbeddedDelayStore(data / "delay.db")
    await store.open()
    try:
        for _ in range(500):  # warm: the file, the caches
            await store.schedule([(Message("cost", BODY, msg_id=ids.next()), AT_MS)])
        await store.window(0, AT_MS + 1, 1)
        cpu0, loop0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
        for _ in range(n):
            await store.schedule([(Message("cost", BODY, msg_id=ids.next()), AT_MS)])
            await asyncio.sleep(0)
        wall = time.perf_counter() - t0
        loop_cpu = time.thread_time() - loop0
        await store.window(0, AT_MS + 1, 1)  # every row in the table
        cpu = time.process_time() - cpu0
    finally:
        await store.close()
        shutil.rmtree(data, ignore_errors=True)
    return {"wall_us": wall / n * 1e6, "loop_cpu_us": loop_cpu / n * 1e6, "cpu_us": cpu / n * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    runs = []
    for i in range(args.runs):
        r = asyncio.run(one_run(args.n))
        runs.append(r)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"{key}: {statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]")
    print(json.dumps({"bench": "schedule_one", "n": args.n, "runs": runs}))


if __name__ == "__main__":
    main()
