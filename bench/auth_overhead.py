"""What authentication and authorization cost per request.

1. In process: the auth middleware alone, called with a send request (``POST
   /v1/topics/bench/messages``) and a handler that does nothing, with auth off and with auth on
   (a bearer token of a principal granted ``produce`` on the topic: the token is hashed and
   looked up, the rate limit taken, the grant checked). Microseconds per call; the CPU cost
   a request pays, free of the noise of a loaded machine.
2. Over HTTP: produce with auth off and on, single messages from 32 clients (the per-request
   cost shows most there) and batches of 100 from 8 clients.

Off and on alternate, ``--runs`` times each (each HTTP run on a fresh server); the figures are
the median of the runs with their spread (min-max).

Prints a table and one JSON line. Usage: python bench/auth_overhead.py [--seconds S] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
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


async def one_run(
    url: str, clients: int, batch: int, seconds: float, admin: str | None, producer: str | None
) -> float:
    if admin is not None:
        # The topic is made by the admin; the measured sends are the producer's.
        await produce(url, 1, 1, 0.0, token=admin)
    rate, _ = await produce(url, clients, batch, seconds, token=producer)
    return rate


async def _nothing(request: web.Request) -> web.StreamResponse:
    return web.Response()


async def middleware_us(auth: Auth, token: str | None, calls: int) -> float:
    """Microseconds per call of the auth middleware on a send request."""
    app = web.Application()
    app.add_routes(broker_routes)
    path = "/v1/topics/bench/messages"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = make_mocked_request("POST", path, headers=headers, app=app)
    # As the server does before the middlewares run (the mock would stand in a fake route).
    request._match_info = await app.router.resolve(request)
    middleware = auth.middleware
    t0 = time.perf_counter()
    for _ in range(calls):
        await middleware(request, _nothing)
    return (time.perf_counter() - t0) / calls * 1e6


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread(s: dict[str, float]) -> str:
    return f"{s['median']:>9,.0f} msg/s ({s['min']:,.0f}-{s['max']:,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200_000, help="middleware calls per run")
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
    shapes = {"single": (32, 1), "batch100": (8, 100)}
    rates: dict[str, dict[str, list[float]]] = {s: {"off": [], "on": []} for s in shapes}
    with tempfile.TemporaryDirectory() as tmp:
        path = auth_file(Path(tmp), admin, producer)
        for _ in range(args.runs):
            for shape, (clients, batch) in shapes.items():
                for mode in ("off", "on"):
                    extra = ("--auth-file", str(path)) if mode == "on" else ()
                    with BenchServer(*extra) as server:
                        tokens = (admin, producer) if mode == "on" else (None, None)
                        run = one_run(server.url, clients, batch, args.seconds, *tokens)
                        rate = asyncio.run(run)
                    rates[shape][mode].append(rate)
    for shape in shapes:
        off, on = summary(rates[shape]["off"]), summary(rates[shape]["on"])
        cost = 1 - on["median"] / off["median"]
        print(
            f"{shape:>9}: auth off {spread(off)}   auth on {spread(on)}   cost {cost * 100:+.1f} %"
        )
        out[f"{shape}_off_msg_per_s"] = {k: round(v) for k, v in off.items()}
        out[f"{shape}_on_msg_per_s"] = {k: round(v) for k, v in on.items()}
        out[f"{shape}_cost_pct"] = round(cost * 100, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
