"""One phase of bench/peers.py for one system, in its own process (see that script).

    python _peers_run.py enqueue SYSTEM MODE N --redis PORT [--url URL]
    python _peers_run.py worker SYSTEM --redis PORT [--url URL]

SYSTEM is arq, rq, celery or tempomq. MODE is ``delayed`` (each job 2 s ahead), ``plain`` (due
now) or ``gather`` (delayed, 100 at a time through asyncio.gather; arq and tempomq only), or
``due:FROM:TO`` (N jobs due uniformly between FROM and TO seconds from now, in shuffled order,
for the lateness phase). ``enqueue`` prints one JSON line: {"rate": jobs per second}. The worker
runs the system's own consumer; its handler pushes ``now - due`` in ms to the Redis list
``peers:lateness`` on the bench's private Redis, first thing. The arq, RQ and Celery phases run in
the bench-only venv; the tempomq phases in the project's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import Any

LATENESS_KEY = "peers:lateness"
QUEUE = "peers"
#: tempomq's topic: the lateness phase uses a topic of its own, whose group starts empty.
TOPIC = os.environ.get("PEERS_TOPIC", QUEUE)
DEFER_S = 2.0
BODY = "x" * 64


def _redis_url() -> str:
    return os.environ["PEERS_REDIS_URL"]  # the private redis-server bench/peers.py started


def _record(due_ms: float) -> None:
    lateness = time.time() * 1000 - due_ms
    _sync_redis().rpush(LATENESS_KEY, f"{lateness:.3f}")


_REDIS: Any = None


def _sync_redis() -> Any:
    global _REDIS
    if _REDIS is None:
        import redis

        _REDIS = redis.Redis.from_url(_redis_url())
    return _REDIS


# -- the jobs each system runs ----------------------------------------------------------------


async def arq_job(ctx: dict[str, Any], due_ms: float) -> None:
    await ctx["redis"].rpush(LATENESS_KEY, f"{time.time() * 1000 - due_ms:.3f}")


def rq_job(due_ms: float) -> None:
    _record(due_ms)


celery_app: Any = None
celery_job: Any = None
if os.environ.get("PEERS_CELERY"):
    from celery import Celery

    celery_app = Celery("peers", broker=_redis_url())
    celery_app.conf.update(task_default_queue=QUEUE, worker_hijack_root_logger=False)

    @celery_app.task(name="peers.job")
    def _celery_job(due_ms: float) -> None:
        _record(due_ms)

    celery_job = _celery_job


# -- enqueue ----------------------------------------------------------------------------------


def _plan(mode: str, n: int) -> list[float]:
    """Each job's due time (epoch ms), in the order they are enqueued."""
    now = time.time() * 1000
    if mode.startswith("due:"):
        _, lo, hi = mode.split(":")
        dues = [int(now + (float(lo) + (float(hi) - float(lo)) * i / n) * 1000) for i in range(n)]
        random.Random(7).shuffle(dues)
        return dues
    return [now] * n  # times of "delayed" and "plain" are set at each call


def _delay_s(mode: str, due_ms: float) -> float:
    if mode == "plain":
        return 0.0
    if mode in ("delayed", "gather"):
        return DEFER_S
    return max(0.0, (due_ms - time.time() * 1000) / 1000)


async def enqueue_arq(mode: str, n: int) -> float:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(_redis_url()), default_queue_name=QUEUE)
    plan = _plan(mode, n)
    t0 = time.perf_counter()
    if mode == "gather":
        for start in range(0, n, 100):
            await asyncio.gather(
                *(
                    pool.enqueue_job(
                        "arq_job", time.time() * 1000 + DEFER_S * 1000, _defer_by=DEFER_S
                    )
                    for _ in plan[start : start + 100]
                )
            )
    else:
        for due in plan:
            delay = _delay_s(mode, due)
            due = due if mode.startswith("due:") else time.time() * 1000 + delay * 1000
            if delay:
                await pool.enqueue_job("arq_job", due, _defer_by=delay)
            else:
                await pool.enqueue_job("arq_job", due)
    elapsed = time.perf_counter() - t0
    await pool.aclose()
    return n / elapsed


def enqueue_rq(mode: str, n: int) -> float:
    from datetime import timedelta

    from rq import Queue

    q = Queue(QUEUE, connection=_sync_redis())
    plan = _plan(mode, n)
    t0 = time.perf_counter()
    for due in plan:
        delay = _delay_s(mode, due)
        due = due if mode.startswith("due:") else time.time() * 1000 + delay * 1000
        if delay:
            q.enqueue_in(timedelta(seconds=delay), "_peers_run.rq_job", due)
        else:
            q.enqueue("_peers_run.rq_job", due)
    return n / (time.perf_counter() - t0)


def enqueue_celery(mode: str, n: int) -> float:
    assert celery_job is not None
    plan = _plan(mode, n)
    t0 = time.perf_counter()
    for due in plan:
        delay = _delay_s(mode, due)
        due = due if mode.startswith("due:") else time.time() * 1000 + delay * 1000
        if delay:
            celery_job.apply_async(args=(due,), countdown=delay)
        else:
            celery_job.apply_async(args=(due,))
    return n / (time.perf_counter() - t0)


async def enqueue_tempomq(mode: str, n: int, url: str) -> float:
    from tempomq.client import Client

    plan = _plan(mode, n)
    async with Client(url) as client:
        await client.send(TOPIC, json.dumps({"due": time.time() * 1000}), delay_ms=60_000)
        t0 = time.perf_counter()
        if mode == "gather":
            for start in range(0, n, 100):
                await asyncio.gather(
                    *(
                        client.send(
                            TOPIC,
                            json.dumps({"due": time.time() * 1000 + DEFER_S * 1000}),
                            delay_ms=int(DEFER_S * 1000),
                        )
                        for _ in plan[start : start + 100]
                    )
                )
        else:
            for due in plan:
                if mode.startswith("due:"):
                    await client.send(TOPIC, json.dumps({"due": due}), deliver_at=int(due))
                elif mode == "plain":
                    await client.send(TOPIC, json.dumps({"due": time.time() * 1000}))
                else:
                    due = time.time() * 1000 + DEFER_S * 1000
                    await client.send(TOPIC, json.dumps({"due": due}), delay_ms=int(DEFER_S * 1000))
        return n / (time.perf_counter() - t0)


# -- workers ----------------------------------------------------------------------------------


def work_arq() -> None:
    from arq.connections import RedisSettings
    from arq.worker import run_worker

    class Settings:
        functions = [arq_job]
        redis_settings = RedisSettings.from_dsn(_redis_url())
        queue_name = QUEUE
        max_jobs = 16

    run_worker(Settings)  # type: ignore[arg-type]


def work_rq() -> None:
    from rq import Queue, Worker

    conn = _sync_redis()
    Worker([Queue(QUEUE, connection=conn)], connection=conn).work(with_scheduler=True)


def work_celery() -> None:
    assert celery_app is not None
    celery_app.worker_main(["worker", "-Q", QUEUE, "-c", "2", "--loglevel", "WARNING"])


async def work_tempomq(url: str) -> None:
    import redis.asyncio as aredis

    from tempomq.client import Client, Consumer, ReceivedMessage

    r = aredis.Redis.from_url(_redis_url())

    async def handle(msg: ReceivedMessage) -> None:
        lateness = time.time() * 1000 - json.loads(msg.body)["due"]
        await r.rpush(LATENESS_KEY, f"{lateness:.3f}")

    async with Client(url) as client, Consumer(client, TOPIC, "peers", handle):
        await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["enqueue", "worker"])
    p.add_argument("system", choices=["arq", "rq", "celery", "tempomq"])
    p.add_argument("mode", nargs="?", default="delayed")
    p.add_argument("n", nargs="?", type=int, default=5000)
    p.add_argument("--url", default="")
    args = p.parse_args()
    if args.what == "worker":
        if args.system == "arq":
            work_arq()
        elif args.system == "rq":
            work_rq()
        elif args.system == "celery":
            work_celery()
        else:
            asyncio.run(work_tempomq(args.url))
        return
    if args.system == "arq":
        rate = asyncio.run(enqueue_arq(args.mode, args.n))
    elif args.system == "rq":
        rate = enqueue_rq(args.mode, args.n)
    elif args.system == "celery":
        rate = enqueue_celery(args.mode, args.n)
    else:
        rate = asyncio.run(enqueue_tempomq(args.mode, args.n, args.url))
    print(json.dumps({"rate": rate}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
