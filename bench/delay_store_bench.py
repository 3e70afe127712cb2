"""Delay store throughput: schedule in batches, read windows, mark released; each store.

Stores: the embedded SQLite store (``sync=False``, in a temp dir) and RedisDelayStore on a real
Redis (``--redis-url``, default db 15, a unique key prefix removed afterwards). A store that is
not importable or not reachable is reported as skipped.

Per store, on one event loop, wall-clock time:

- **schedule**: ``--messages`` messages (256-byte bodies, times spread over a 10-minute window)
  stored by ``--concurrency`` coroutines, each awaiting batches of ``--batch``;
- **window**: all of them read back in time order by one reader, ``--page`` per call, each page
  asked from the last time of the previous one (repeats at that time dropped by id, as the
  service does);
- **release**: ``mark_delivered`` in batches of ``--batch`` by ``--concurrency`` coroutines.

Prints a table and one JSON line. Usage: python bench/delay_store_bench.py [--messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import redis.asyncio

from broker_core.message import Message, MsgIdGenerator
from delayserver.redis_store import RedisDelayStore
from delayserver.store import DelayStore

T0_MS = 1_700_000_000_000
SPREAD_MS = 10 * 60 * 1000

T = TypeVar("T")


async def _concurrently(
    chunks: Sequence[T], concurrency: int, step: Callable[[T], Awaitable[object]]
) -> float:
    """Run ``step`` over ``chunks`` with ``concurrency`` workers; returns the seconds taken."""
    queue = iter(chunks)

    async def worker() -> None:
        for chunk in queue:
            await step(chunk)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def _read_all(store: DelayStore, page: int) -> tuple[int, float]:
    seen: set[bytes] = set()
    from_ms, after = T0_MS, b""
    t0 = time.perf_counter()
    while True:
        got = await store.window(from_ms, T0_MS + SPREAD_MS + 1, page, after_msg_id=after)
        seen.update(d.msg_id for d in got)
        if len(got) < page:
            break
        from_ms, after = got[-1].deliver_at_ms, got[-1].msg_id  # the next page follows it
    return len(seen), time.perf_counter() - t0


async def measure(store: DelayStore, args: argparse.Namespace) -> dict[str, float]:
    ids = MsgIdGenerator()
    body = b"x" * 256
    n, batch = args.messages, args.batch
    items = [
        (Message("bench", body, msg_id=ids.next()), T0_MS + (i * 7919) % SPREAD_MS)
        for i in range(n)
    ]
    batches = [items[i : i + batch] for i in range(0, n, batch)]
    schedule_s = await _concurrently(batches, args.concurrency, store.schedule)
    assert await store.pending() == n

    read, window_s = await _read_all(store, args.page)
    assert read == n, f"window read {read} of {n}"

    id_batches = [[m.msg_id for m, _at in chunk] for chunk in batches]
    release_s = await _concurrently(
        id_batches, args.concurrency, lambda ids_: store.mark_delivered(ids_, T0_MS)
    )
    assert await store.window(T0_MS, T0_MS + SPREAD_MS + 1, 1) == [], "release left some"
    return {
        "schedule": n / schedule_s,
        "window": n / window_s,
        "release": n / release_s,
    }


async def bench_embedded(args: argparse.Namespace) -> dict[str, float] | str:
    try:
        embedded = importlib.import_module("delayserver.embedded")
    except ModuleNotFoundError:
        return "delayserver.embedded not present"
    data = Path(tempfile.mkdtemp(prefix="tempomq-bench-delay-"))
    store: DelayStore = embedded.EmbeddedDelayStore(data / "delay.db")
    await store.open()
    try:
        return await measure(store, args)
    finally:
        await store.close()
        shutil.rmtree(data, ignore_errors=True)


async def bench_redis(args: argparse.Namespace) -> dict[str, float] | str:
    prefix = f"tempomq-bench-{uuid.uuid4().hex[:8]}"
    store = RedisDelayStore(args.redis_url, prefix=prefix)
    try:
        await store.open()
    except Exception as e:  # any reason to skip is reported, never fatal to the other store
        return f"redis at {urlsplit(args.redis_url).netloc} unavailable: {e}"
    try:
        return await measure(store, args)
    finally:
        await store.close()
        client = redis.asyncio.Redis.from_url(args.redis_url)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--page", type=int, default=1000)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = ap.parse_args()

    results: dict[str, dict[str, int] | str] = {}
    print(f"{'store':<10}{'schedule':>14}{'window':>14}{'release':>14}   msg/s")
    for name, bench in (("embedded", bench_embedded), ("redis", bench_redis)):
        outcome = asyncio.run(bench(args))
        if isinstance(outcome, str):
            results[name] = f"skipped: {outcome}"
            print(f"{name:<10}skipped: {outcome}")
            continue
        rates = {k: round(v) for k, v in outcome.items()}
        results[name] = rates
        print(f"{name:<10}{rates['schedule']:>14,}{rates['window']:>14,}{rates['release']:>14,}")
    print(
        json.dumps(
            {
                "bench": "delay_store",
                "msg_per_s": results,
                "messages": args.messages,
                "batch": args.batch,
                "concurrency": args.concurrency,
                "page": args.page,
            }
        )
    )


if __name__ == "__main__":
    main()
