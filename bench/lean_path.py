"""Sequential SDK sends, plain and delayed, with the lean HTTP front on and off.

One ``tempomq serve`` per setting (``--http-lean on|off``, async flush, embedded delay store);
one client sends ``--messages`` messages one at a time with the SDK, as issue 14's peer bench
does. Per run it prints the server's CPU time per request (utime + stime of the server
process from /proc, which load on the machine distorts far less than wall-clock time) and
the sends a second; medians of ``--runs`` runs with [min-max], and the load average.

Prints a table and one JSON line. Usage: python bench/lean_path.py [--messages N] [--runs R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from _server import BenchServer

from tempomq.client import Client

TOPIC = "lean"
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


async def sends(url: str, n: int, delayed: bool) -> float:
    """``n`` sequential sends; returns sends a second."""
    async with Client(url) as client:
        body = "x" * 100
        t0 = time.perf_counter()
        for _ in range(n):
            if delayed:
                await client.send(TOPIC, body, delay_ms=600_000)
            else:
                await client.send(TOPIC, body)
        return n / (time.perf_counter() - t0)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    for lean in ("on", "off"):
        with BenchServer("--http-lean", lean) as server:
            assert server.proc is not None
            pid = server.proc.pid

            async def setup(url: str) -> None:
                async with Client(url) as client:
                    await client.create_topic(TOPIC, queues=8)

            asyncio.run(setup(server.url))
            for kind in ("plain", "delayed"):
                delayed = kind == "delayed"
                asyncio.run(sends(server.url, min(args.messages, 500), delayed))  # warm up
                cpu_us: list[float] = []
                rates: list[float] = []
                for _ in range(args.runs):
                    before = cpu_s(pid)
                    rates.append(asyncio.run(sends(server.url, args.messages, delayed)))
                    cpu_us.append((cpu_s(pid) - before) / args.messages * 1e6)
                results[f"{kind}/lean {lean}"] = {"server_cpu_us": cpu_us, "sends_per_s": rates}
    load = os.getloadavg()
    print(f"{'mode':<20} {'server CPU us/request':>24} {'sends/s':>24}")
    for name, r in results.items():
        print(f"{name:<20} {spread(r['server_cpu_us']):>24} {spread(r['sends_per_s']):>24}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        json.dumps(
            {
                "bench": "lean_path",
                "messages": args.messages,
                "runs": args.runs,
                "load": load[0],
                **{
                    name: {k: statistics.median(v) for k, v in r.items()}
                    for name, r in results.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
