"""What authentication and authorization cost per request: produce over HTTP with auth off and
with auth on (a bearer token of a principal granted ``produce`` on the topic, so every request
is hashed, looked up, rate-limited and checked against the grant).

Single messages from 32 clients (the per-request cost shows most there) and batches of 100
from 8 clients. Off and on alternate, ``--runs`` times each, each run on a fresh server; the
figures are the median of the runs with their spread (min-max).

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
from pathlib import Path

import yaml  # type: ignore[import-untyped]
from _server import BenchServer
from http_produce import produce


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


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread(s: dict[str, float]) -> str:
    return f"{s['median']:>9,.0f} msg/s ({s['min']:,.0f}-{s['max']:,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    admin, producer = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
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
    out: dict[str, object] = {"bench": "auth_overhead", "runs": args.runs}
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
