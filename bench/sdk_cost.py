"""The SDK's own cost per call: client CPU (``time.process_time`` of this process, which runs
only the client) and server CPU (utime+stime of the server process from ``/proc``) per
sequential call, with the calls/s beside them. A server process (embedded store, defaults) runs
on a free port; this process is the client.

Phases, each ``--n`` calls, one after the other:

* ``plain``: ``await client.send(topic, body)`` one at a time;
* ``delayed``: ``await client.send(topic, body, delay_ms=3_600_000)`` one at a time;
* ``sync``: :class:`~tempomq.client.SyncClient` ``send`` one at a time (the calling thread and
  the client's loop thread both count);
* ``receive+ack``: ``--n`` messages are put first (batches, not counted), then
  ``receive(max_messages=32)`` + ``ack`` of what came, until all are acked; per message;
* ``consumer``: the same count through :class:`~tempomq.client.Consumer` with an empty
  handler; per message (the consumer's long poll idles at the end, not counted: the clock
  stops at the last ack's answer).

Prints, per phase, the median of ``--runs`` runs with [min-max], and the load average::

    python bench/sdk_cost.py [--n 3000] [--runs 3] [--phases plain,sync] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from _server import BenchServer, process_cpu_s

from tempomq.client import Client, Consumer, OutgoingMessage, SyncClient

TOPIC = "cost"
GROUP = "cost"
BODY = json.dumps({"due": 1_700_000_000_000.0, "pad": "x" * 40})
PHASES = ("plain", "delayed", "sync", "receive+ack", "consumer")


class _Meter:
    """Client CPU, server CPU and wall time across a block."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid

    def __enter__(self) -> _Meter:
        self.cpu0 = time.process_time()
        self.srv0 = process_cpu_s(self.pid)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        self.srv = process_cpu_s(self.pid) - self.srv0

    def figures(self, n: int) -> dict[str, float]:
        return {
            "client_us": self.cpu / n * 1e6,
            "server_us": self.srv / n * 1e6,
            "per_s": n / self.wall,
        }


async def _sends(url: str, n: int, pid: int, delay_ms: int | None) -> dict[str, float]:
    async with Client(url) as client:
        for _ in range(50):  # warm: connection, imports, caches
            await client.send(TOPIC, BODY, delay_ms=delay_ms)
        with _Meter(pid) as m:
            for _ in range(n):
                await client.send(TOPIC, BODY, delay_ms=delay_ms)
    return m.figures(n)


def _sync_sends(url: str, n: int, pid: int) -> dict[str, float]:
    with SyncClient(url) as client:
        for _ in range(50):
            client.send(TOPIC, BODY)
        with _Meter(pid) as m:
            for _ in range(n):
                client.send(TOPIC, BODY)
    return m.figures(n)


async def _filled_topic(client: Client, topic: str, n: int) -> str:
    """A new topic ``topic`` holding ``n`` messages (sent in batches, not measured)."""
    await client.create_topic(topic, queues=4)
    for start in range(0, n, 1000):
        await client.send_batch(topic, [OutgoingMessage(BODY)] * min(1000, n - start))
    return topic


async def _receive_ack(url: str, n: int, pid: int, run: int) -> dict[str, float]:
    async with Client(url) as client:
        topic = await _filled_topic(client, f"{TOPIC}-ra{run}", n)
        done = 0
        with _Meter(pid) as m:
            while done < n:
                msgs = await client.receive(topic, GROUP, max_messages=32, wait_ms=1000)
                if msgs:
                    done += await client.ack(topic, GROUP, msgs)
    return m.figures(n)


async def _consumer(url: str, n: int, pid: int, run: int) -> dict[str, float]:
    async with Client(url) as client:
        topic = await _filled_topic(client, f"{TOPIC}-c{run}", n)
        seen = 0
        all_seen = asyncio.Event()

        async def handle(msg: Any) -> None:
            nonlocal seen
            seen += 1
            if seen >= n:
                all_seen.set()

        consumer = Consumer(client, topic, GROUP, handle)
        with _Meter(pid) as m:
            consumer.start()
            await all_seen.wait()
            # Until the server holds no delivery in flight: every ack has arrived.
            while (await client.group_stats(topic, GROUP)).inflight:
                await asyncio.sleep(0.001)
        await consumer.stop()
    return m.figures(n)


def one_run(
    url: str, pid: int, phase: str, n: int, run: int, loop: str = "asyncio"
) -> dict[str, float]:
    if loop == "uvloop":
        import uvloop

        go: Callable[[Any], Any] = uvloop.run
    else:
        go = asyncio.run
    runners: dict[str, Callable[[], dict[str, float]]] = {
        "plain": lambda: go(_sends(url, n, pid, None)),
        "delayed": lambda: go(_sends(url, n, pid, 3_600_000)),
        "sync": lambda: _sync_sends(url, n, pid),
        "receive+ack": lambda: go(_receive_ack(url, n, pid, run)),
        "consumer": lambda: go(_consumer(url, n, pid, run)),
    }
    out = runners[phase]()
    out["load"] = os.getloadavg()[0]
    return out


def _fmt(values: list[float], digits: int = 0) -> str:
    return (
        f"{statistics.median(values):,.{digits}f} [{min(values):,.{digits}f}-"
        f"{max(values):,.{digits}f}]"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="calls (or messages) per phase and run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop of the async phases (the sync client keeps its own)",
    )
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    for p in phases:
        if p not in PHASES:
            raise SystemExit(f"unknown phase {p!r}; choose from {', '.join(PHASES)}")
    results: dict[str, list[dict[str, float]]] = {p: [] for p in phases}
    with BenchServer() as server:
        assert server.proc is not None
        pid = server.proc.pid

        async def setup() -> None:
            async with Client(server.url) as client:
                await client.create_topic(TOPIC, queues=8)
                await client.create_group(GROUP)

        asyncio.run(setup())
        for run in range(args.runs):
            for phase in phases:
                results[phase].append(one_run(server.url, pid, phase, args.n, run, args.loop))
    print(f"{args.n} calls per phase, {args.loop}, median of {args.runs} [min-max]")
    print(f"{'phase':<12} {'client us/call':>22} {'server us/call':>22} {'calls/s':>24}  load")
    for phase, runs in results.items():
        print(
            f"{phase:<12} {_fmt([r['client_us'] for r in runs]):>22} "
            f"{_fmt([r['server_us'] for r in runs]):>22} {_fmt([r['per_s'] for r in runs]):>24}"
            f"  {_fmt([r['load'] for r in runs], 1)}"
        )
    print(json.dumps({"bench": "sdk_cost", "n": args.n, "runs": results}))


if __name__ == "__main__":
    main()
