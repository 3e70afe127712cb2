"""Sequential sends, plain and delayed, with the lean HTTP front on and off.

One ``tempomq serve`` per setting (``--http-lean on|off``, async flush, embedded delay store).
Per run, ``--messages`` messages are sent one at a time on one kept-alive connection

* with the SDK, as issue 14's peer bench does: the server's CPU time per request and the
  sends a second;
* with a minimal blocking-socket client (the SDK's request bytes, msg_id included): the
  server's CPU time per request without the SDK client competing for the cores.

CPU time is utime + stime of the server process from /proc, which load on the machine
distorts far less than wall-clock time. Medians of ``--runs`` runs with [min-max], and the
load average.

Prints a table and one JSON line. Usage: python bench/lean_path.py [--messages N] [--runs R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
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


def raw_sends(port: int, n: int, delayed: bool) -> None:
    """``n`` sequential sends as the SDK frames them, over a plain socket."""
    delay = b',"delay_ms":600000' if delayed else b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            body = b'{"msg_id":"%s","body":"%s"%s}' % (
                secrets.token_hex(16).encode(),
                b"x" * 100,
                delay,
            )
            sock.sendall(
                b"POST /v1/topics/%s/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                b"Content-Type: application/json\r\nAccept: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (TOPIC.encode(), port, len(body), body)
            )
            answer = b""
            while not answer.endswith(b"}\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the server closed the connection")
                answer += chunk
            if not answer.startswith(b"HTTP/1.1 201"):
                raise RuntimeError(answer.decode(errors="replace"))


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
                raw_cpu_us: list[float] = []
                rates: list[float] = []
                for _ in range(args.runs):
                    before = cpu_s(pid)
                    rates.append(asyncio.run(sends(server.url, args.messages, delayed)))
                    cpu_us.append((cpu_s(pid) - before) / args.messages * 1e6)
                    before = cpu_s(pid)
                    raw_sends(server.port, args.messages, delayed)
                    raw_cpu_us.append((cpu_s(pid) - before) / args.messages * 1e6)
                results[f"{kind}/lean {lean}"] = {
                    "server_cpu_us": cpu_us,
                    "sends_per_s": rates,
                    "server_cpu_us_raw_client": raw_cpu_us,
                }
    load = os.getloadavg()
    print(
        f"{'mode':<20} {'SDK: server CPU us/req':>24} {'SDK sends/s':>24}"
        f" {'raw client: server CPU us/req':>30}"
    )
    for name, r in results.items():
        print(
            f"{name:<20} {spread(r['server_cpu_us']):>24} {spread(r['sends_per_s']):>24}"
            f" {spread(r['server_cpu_us_raw_client']):>30}"
        )
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
