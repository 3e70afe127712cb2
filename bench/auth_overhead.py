"""What authentication and authorization cost per request.

1. In process: the auth middleware alone, called with a send request (``POST
   /v1/topics/bench/messages``) and a handler that does nothing, with auth off and with auth on
   (a bearer token of a principal granted ``produce`` on the topic: the token is hashed and
   looked up, the rate limit taken, the grant checked). CPU microseconds per call: the cost a
   request pays, less disturbed by a loaded machine than the HTTP figures.
2. Over HTTP: produce with auth off and on, single messages from 32 clients (the per-request
   cost shows most there) and batches of 100 from 8 clients: messages/s, and the server
   process's CPU time per request (from /proc, Linux), which a busy machine disturbs less
   than the throughput.

Off and on alternate, ``--runs`` times each, which goes first alternating too (each HTTP run on
a fresh server); the figures are the median of the runs with their spread (min-max).

Prints a table and one JSON line. Usage: python bench/auth_overhead.py [--seconds S] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import yaml  # type: ignore[import-untyped]
from _server import BenchServer
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from http_produce import produce

from broker_core.http import routes as broker_routes
from tempomq.auth import Auth


def auth_file(directory: Path, admin: str, producer: str) -> Path:
    def sha(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    path = directory / "auth.yaml"
    principals = {
        "ops": {"admin": True, "tokens_sha256": [sha(admin)]},
        "producer": {"tokens_sha256": [sha(producer)], "allow": {"topic:bench": ["produce"]}},
    }
    path.write_text(yaml.safe_dump({"principals": principals}))
    path.chmod(0o600)
    return path


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the server process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_run(
    server: BenchServer,
    clients: int,
    batch: int,
    seconds: float,
    admin: str | None,
    producer: str | None,
) -> tuple[float, float]:
    """(messages/s, server CPU microseconds per request) of one run."""
    if admin is not None:
        # The topic is made by the admin; the measured sends are the producer's.
        await produce(server.url, 1, 1, 0.0, token=admin)
    assert server.proc is not None
    cpu_before = server_cpu_s(server.proc.pid)
    rate, latencies = await produce(server.url, clients, batch, seconds, token=producer)
    cpu_us = (server_cpu_s(server.proc.pid) - cpu_before) / len(latencies) * 1e6
    return rate, cpu_us


async def _nothing(request: web.Request) -> web.StreamResponse:
    return web.Response()


async def middleware_us(auth: Auth, token: str | None, calls: int) -> float:
    """CPU microseconds per call of the auth middleware on a send request (process time, so a
    busy machine stretches it less than it stretches wall time)."""
    app = web.Application()
    app.add_routes(broker_routes)
    path = "/v1/topics/bench/messages"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = make_mocked_request("POST", path, headers=headers, app=app)
    # As the server does before the middlewares run (the mock would stand in a fake route).
    request._match_info = await app.router.resolve(request)
    middleware = auth.middleware
    t0 = time.process_time()
    for _ in range(calls):
        await middleware(request, _nothing)
    return (time.process_time() - t0) / calls * 1e6


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread(s: dict[str, float], unit: str, digits: int = 0) -> str:
    return f"{s['median']:>9,.{digits}f} {unit} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200_000, help="middleware calls per run")
    ap.add_argument("--middleware-only", action="store_true", help="skip the HTTP runs")
    args = ap.parse_args()
    admin, producer = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    out: dict[str, object] = {"bench": "auth_overhead", "runs": args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        path = auth_file(Path(tmp), admin, producer)
        # No rate limit here: the bucket would empty after its burst and the calls would
        # measure the refusal instead.
        on, off = Auth(auth_file=path), Auth()
        us: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.runs):
            us["off"].append(asyncio.run(middleware_us(off, None, args.calls)))
            us["on"].append(asyncio.run(middleware_us(on, producer, args.calls)))
    for mode in ("off", "on"):
        s_us = summary(us[mode])
        print(
            f"middleware, auth {mode:>3}: {s_us['median']:6.2f} us/request "
            f"({s_us['min']:.2f}-{s_us['max']:.2f})"
        )
        out[f"middleware_{mode}_us"] = {k: round(v, 2) for k, v in s_us.items()}
    shapes = {} if args.middleware_only else {"single": (32, 1), "batch100": (8, 100)}
    rates: dict[str, dict[str, list[float]]] = {s: {"off": [], "on": []} for s in shapes}
    cpu: dict[str, dict[str, list[float]]] = {s: {"off": [], "on": []} for s in shapes}
    with tempfile.TemporaryDirectory() as tmp:
        path = auth_file(Path(tmp), admin, producer)
        for i in range(args.runs):
            for shape, (clients, batch) in shapes.items():
                # Alternate which goes first, so a machine getting busier or quieter during
                # the bench does not favour one side.
                for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    extra = ("--auth-file", str(path)) if mode == "on" else ()
                    with BenchServer(*extra) as server:
                        tokens = (admin, producer) if mode == "on" else (None, None)
                        run = one_run(server, clients, batch, args.seconds, *tokens)
                        rate, cpu_us = asyncio.run(run)
                    rates[shape][mode].append(rate)
                    cpu[shape][mode].append(cpu_us)
    for shape in shapes:
        off, on = summary(rates[shape]["off"]), summary(rates[shape]["on"])
        cpu_off, cpu_on = summary(cpu[shape]["off"]), summary(cpu[shape]["on"])
        print(f"{shape:>9}: auth off {spread(off, 'msg/s')}   auth on {spread(on, 'msg/s')}")
        print(
            f"{'':>9}  server CPU per request: off {spread(cpu_off, 'us', 1)}   "
            f"on {spread(cpu_on, 'us', 1)}"
        )
        for mode, rate_s, cpu_s in (("off", off, cpu_off), ("on", on, cpu_on)):
            out[f"{shape}_{mode}_msg_per_s"] = {k: round(v) for k, v in rate_s.items()}
            out[f"{shape}_{mode}_server_cpu_us_per_request"] = {
                k: round(v, 1) for k, v in cpu_s.items()
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
