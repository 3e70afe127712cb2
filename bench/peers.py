"""tempomq beside arq, RQ and Celery on Redis, through the same method, in one run; prints one
table with the median of the runs and the spread (min-max) of each figure.

    python bench/peers.py [--runs 3] [--jobs 5000] [--due 2000] [--quick]   (or make bench-peers)

For each run and each system, in this order:

* enqueue, one call per job: ``--jobs`` jobs deferred 2 s, enqueued one after the other by one
  client (arq ``enqueue_job(_defer_by=2)``, RQ ``enqueue_in``, Celery ``apply_async(countdown=2)``,
  tempomq ``send(delay_ms=2000)``); then the same for jobs due now (plain).
* concurrent: the same deferred jobs, 100 at a time through ``asyncio.gather`` (the asyncio
  clients: arq and tempomq).
* lateness: the system's own worker/consumer runs; ``--due`` jobs due uniformly over 3-8 s from
  the start of their enqueue (about 400/s) are enqueued in shuffled order; each handler takes
  ``now - due`` first thing. p50/p99/max in ms, and how many ran early.

arq 0.28, RQ 3.0 and Celery 5.7 (Redis transport) are installed from PyPI into a bench-only venv,
bench/.peers-venv (made on the first run). A private ``redis-server`` on a free port is started
and stopped by this script; it keeps nothing on disk (``--save ''``). tempomq runs as its own
server process with the embedded store and with that Redis as its delay store (its SDK's
consumer as the worker). Every process is on this machine; the load average is printed with each
run. Prints the table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis
from _server import BenchServer, PrivateRedis, percentile

HERE = Path(__file__).resolve().parent
VENV = HERE / ".peers-venv"
#: Two venvs: Celery 5.7's Redis transport needs redis-py >= 6.1, arq 0.28 redis-py < 6.
PEER_VENVS = {"celery": ("celery[redis]==5.7.0",), "arq-rq": ("arq==0.28.0", "rq==3.0.0")}
SYSTEMS = ("arq", "rq", "celery", "tempomq", "tempomq-redis")
LATENESS_KEY = "peers:lateness"


def ensure_venv() -> None:
    for name, packages in PEER_VENVS.items():
        python = VENV / name / "bin" / "python"
        if python.exists():
            continue
        print(f"making {VENV / name} with {', '.join(packages)} from PyPI (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPOMQ_")}
    env.update(PEERS_REDIS_URL=redis_url, PYTHONPATH=str(HERE), **extra)
    return env


def _python(system: str) -> str:
    if system == "tempomq":
        return sys.executable
    return str(VENV / ("celery" if system == "celery" else "arq-rq") / "bin" / "python")


def enqueue(system: str, mode: str, n: int, env: dict[str, str], url: str = "") -> float:
    out = subprocess.run(
        [_python(system), str(HERE / "_peers_run.py"), "enqueue", system, mode, str(n),
         "--url", url],
        env=env, capture_output=True, text=True, timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{system} {mode} enqueue failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["rate"])


def lateness(
    system: str, n: int, env: dict[str, str], r: redis.Redis, url: str = ""
) -> dict[str, float]:
    """Start the worker, wait until it runs a job, enqueue ``n`` due over 3-8 s, collect."""
    r.delete(LATENESS_KEY)
    worker = subprocess.Popen(
        [_python(system), str(HERE / "_peers_run.py"), "worker", system, "--url", url],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while r.llen(LATENESS_KEY) == 0:  # one job due now: the worker is up when it ran
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {system} worker ran nothing within 60 s")
            enqueue(system, "plain", 1, env, url)
            time.sleep(0.5)
        time.sleep(0.5)
        r.delete(LATENESS_KEY)
        enqueue(system, "due:3:8", n, env, url)
        deadline = time.monotonic() + 120
        while r.llen(LATENESS_KEY) < n and time.monotonic() < deadline:
            time.sleep(0.25)
        values = sorted(float(v) for v in r.lrange(LATENESS_KEY, 0, -1))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    return {
        "got": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": values[-1] if values else float("nan"),
        "early": sum(1 for v in values if v < 0),
    }


def run_system(system: str, args: argparse.Namespace, rd: PrivateRedis) -> dict[str, Any]:
    r = redis.Redis(port=rd.port)
    r.flushall()
    out: dict[str, Any] = {}
    if system.startswith("tempomq"):
        extra = ("--redis-url", rd.url(1)) if system == "tempomq-redis" else ()
        with BenchServer(*extra) as server:
            for topic in ("peers", "peers-late"):
                req = urllib.request.Request(
                    f"{server.url}/v1/topics",
                    data=json.dumps({"name": topic, "queues": 8}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                urllib.request.urlopen(req, timeout=10).close()
            env = _env(rd.url(), PEERS_TOPIC="peers")
            out["delayed"] = enqueue("tempomq", "delayed", args.jobs, env, server.url)
            out["plain"] = enqueue("tempomq", "plain", args.jobs, env, server.url)
            out["gather"] = enqueue("tempomq", "gather", args.jobs, env, server.url)
            time.sleep(DRAIN_S)  # the deferred jobs fall due and are released first
            env = _env(rd.url(), PEERS_TOPIC="peers-late")
            out["lateness"] = lateness("tempomq", args.due, env, r, server.url)
        return out
    env = _env(rd.url(), **({"PEERS_CELERY": "1"} if system == "celery" else {}))
    out["delayed"] = enqueue(system, "delayed", args.jobs, env)
    r.flushall()
    out["plain"] = enqueue(system, "plain", args.jobs, env)
    r.flushall()
    if system == "arq":
        out["gather"] = enqueue(system, "gather", args.jobs, env)
        r.flushall()
    out["lateness"] = lateness(system, args.due, env, r)
    return out


DRAIN_S = 3.0


def _fmt_rate(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):,.0f}/s [{min(values):,.0f}-{max(values):,.0f}]"


def _fmt_ms(values: list[float]) -> str:
    med = statistics.median(values)
    if med >= 1000:
        return f"{med / 1000:.1f} s [{min(values) / 1000:.1f}-{max(values) / 1000:.1f}]"
    return f"{med:.1f} [{min(values):.1f}-{max(values):.1f}]"


def table(runs: list[dict[str, dict[str, Any]]], systems: list[str]) -> str:
    head = (
        "| | enqueue delayed, one call per job | enqueue plain, one call per job "
        "| concurrent delayed (gather x100) | lateness p50 ms | p99 ms | max ms | early |"
    )
    lines = [head, "|---" * 8 + "|"]
    for s in systems:
        got = [run[s] for run in runs if s in run]
        lat = [g["lateness"] for g in got]
        lines.append(
            f"| {s} | {_fmt_rate([g['delayed'] for g in got])} "
            f"| {_fmt_rate([g['plain'] for g in got])} "
            f"| {_fmt_rate([g['gather'] for g in got if 'gather' in g])} "
            f"| {_fmt_ms([x['p50'] for x in lat])} | {_fmt_ms([x['p99'] for x in lat])} "
            f"| {_fmt_ms([x['max'] for x in lat])} "
            f"| {statistics.median([x['early'] for x in lat]):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--jobs", type=int, default=5000, help="jobs per enqueue phase")
    p.add_argument("--due", type=int, default=2000, help="jobs in the lateness phase")
    p.add_argument("--quick", action="store_true", help="1 run, 1000 jobs, 400 due")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    args = p.parse_args()
    if args.quick:
        args.runs, args.jobs, args.due = 1, 1000, 400
    systems = [s for s in args.systems.split(",") if s]
    ensure_venv()
    runs: list[dict[str, dict[str, Any]]] = []
    with PrivateRedis() as rd:
        for i in range(args.runs):
            load = os.getloadavg()
            run: dict[str, dict[str, Any]] = {}
            for system in systems:
                run[system] = run_system(system, args, rd)
                lat = run[system]["lateness"]
                print(
                    f"run {i + 1} {system}: delayed {run[system]['delayed']:,.0f}/s, plain "
                    f"{run[system]['plain']:,.0f}/s, gather {run[system].get('gather', 0):,.0f}/s,"
                    f" lateness p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} max {lat['max']:.1f} ms"
                    f" ({lat['got']} of {args.due}, {lat['early']} early)",
                    flush=True,
                )
            run["_load"] = {"before": load, "after": os.getloadavg()}  # type: ignore[assignment]
            after = os.getloadavg()[0]
            print(f"run {i + 1}: load average {load[0]:.1f} -> {after:.1f}", flush=True)
            runs.append(run)
    print()
    print(f"{args.runs} runs, {args.jobs} jobs per enqueue phase, {args.due} due over 3-8 s; "
          "median [min-max]")
    print(table(runs, systems))
    print(json.dumps({"bench": "peers", "runs": runs}))


if __name__ == "__main__":
    main()
