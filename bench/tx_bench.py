"""Transactional send through the SDK against a spawned server, at the same concurrency (32
producers) as plain sends, in the same run:

- ``plain``: ``Client.send``, one message (256 B) per call; the baseline.
- ``sqlite``: ``TransactionalProducer.transaction`` with SQLite as the producer's local database
  (aiosqlite): per transaction an HTTP prepare, a local transaction with one business row in
  ``orders`` plus the barrier row, the local commit, and an HTTP commit of the message (same
  256 B body). SQLite takes one writer at a time, so the engine runs in WAL mode
  (``synchronous=NORMAL``: a commit is durable against a process crash, not a power loss, and
  does not fsync) with a pool of one connection: the local transactions queue for it (in
  asyncio, without busy-waiting on the database lock) while the HTTP calls of the 32 producers
  overlap. So this case measures the price of the transaction protocol itself (two HTTP round
  trips and the coordinator's durable half message instead of one send) plus a short, cheap,
  serialized local transaction; it is not a measure of SQLite's write throughput.
- ``mariadb``: the same transactions against the real MariaDB (InnoDB, a pool of 32 + 8
  connections for the check-back listener), reporting tx/s and per-transaction latency
  (the whole ``async with`` block: prepare, two inserts, commit, message commit). Skipped when
  no MariaDB answers at ``--mysql-url`` (default as in the integration tests:
  ``TEMPOMQ_TEST_MYSQL_URL`` or ``mysql+aiomysql://root@127.0.0.1:3306/test``).

Each case gets a fresh server (default settings, async flush; ``--tx-store URL`` puts its
transactions in that database instead of its SQLite file) and a check-back listener running
as a producer service would; a warm-up second is not counted. Tables are created with names of
their own and dropped at the end. Bars: transactional with SQLite >= 40 % of plain; MariaDB
>= 500 tx/s.

``--nodes``: the coordinator's own store instead, SDK prepare + commit per transaction (no
producer database) from the same producers spread over servers: the tx store in each server's
SQLite file on 1 server (reference), then the shared ``--tx-store`` (default: MariaDB at
``--mysql-url``) on 1 and on 2 servers. Each case runs ``--runs`` times (3) on fresh servers
and tables; the median and the spread (min-max) are printed. Every transaction counted must be
committed in the store at the end (checked).

Prints a table and one JSON line. Usage: python bench/tx_bench.py [--seconds S] [--producers N]
[--tx-store URL] [--nodes [--runs N]]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _server import BenchServer, percentile
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from tempomq.client import Barrier, Client, OutgoingMessage, TransactionalProducer
from txcoord.sql_store import SqlTxStore

BODY = "x" * 256
GROUP = "bench-tx"
DEFAULT_MYSQL_URL = "mysql+aiomysql://root@127.0.0.1:3306/test"


async def load(
    op: Callable[[int], Awaitable[None]], producers: int, seconds: float, warmup_s: float
) -> tuple[float, list[float], int]:
    """``producers`` concurrent loops of ``op(n)``; the rate and latencies (s) of the calls
    that ended within the measured window, and how many calls ended in all."""
    ids = itertools.count()
    latencies: list[float] = []
    done = 0
    start = time.perf_counter() + warmup_s
    end = start + seconds

    async def producer() -> None:
        nonlocal done
        while (t0 := time.perf_counter()) < end:
            await op(next(ids))
            t1 = time.perf_counter()
            done += 1
            if start <= t1 <= end:
                latencies.append(t1 - t0)

    await asyncio.gather(*(producer() for _ in range(producers)))
    return len(latencies) / seconds, sorted(latencies), done


def orders_table(name: str) -> Table:
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("state", String(16), nullable=False),
        mysql_engine="InnoDB",
    )


async def plain(url: str, producers: int, seconds: float, warmup_s: float) -> dict[str, Any]:
    async with Client(url) as client:
        await client.create_topic("plain", 8)

        async def op(n: int) -> None:
            await client.send("plain", BODY)

        rate, lat, _ = await load(op, producers, seconds, warmup_s)
    return summary(rate, lat)


async def transactional(
    url: str, engine: AsyncEngine, producers: int, seconds: float, warmup_s: float
) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:8]
    barrier = Barrier(engine, table=f"bench_barrier_{suffix}")
    orders = orders_table(f"bench_orders_{suffix}")
    await barrier.create_table()
    async with engine.begin() as conn:
        await conn.run_sync(orders.create)
    try:
        async with Client(url) as client:
            await client.create_topic("orders", 8)
            async with TransactionalProducer(client, GROUP, barrier=barrier) as producer:

                async def op(n: int) -> None:
                    async with AsyncSession(engine) as session:
                        message = OutgoingMessage(BODY, keys=[f"order-{n}"])
                        async with producer.transaction("orders", message, session):
                            await session.execute(orders.insert().values(id=n, state="paid"))

                rate, lat, done = await load(op, producers, seconds, warmup_s)
        async with engine.connect() as conn:
            rows = (await conn.execute(select(func.count()).select_from(orders))).scalar_one()
        if rows != done:
            raise RuntimeError(f"{done} transactions ran but {rows} orders rows committed")
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(orders.drop, checkfirst=True)
            await conn.run_sync(barrier.table.drop, checkfirst=True)
    return summary(rate, lat)


async def protocol_only(
    url: str, producers: int, seconds: float, warmup_s: float
) -> dict[str, Any]:
    """Reference: prepare + commit of each message, no local database at all."""
    async with Client(url) as client:
        await client.create_topic("orders", 8)

        async def op(n: int) -> None:
            message = OutgoingMessage(BODY, keys=[f"order-{n}"])
            tx = await client.prepare_transaction("orders", message, producer_group=GROUP)
            await client.commit_transaction(tx)

        rate, lat, _ = await load(op, producers, seconds, warmup_s)
    return summary(rate, lat)


async def local_only(
    engine: AsyncEngine, producers: int, seconds: float, warmup_s: float
) -> dict[str, Any]:
    """Reference: the local transaction of the SQLite case (business row + barrier row,
    commit) through the same engine and AsyncSession, no messages."""
    suffix = uuid.uuid4().hex[:8]
    barrier = Barrier(engine, table=f"bench_barrier_{suffix}")
    orders = orders_table(f"bench_orders_{suffix}")
    await barrier.create_table()
    async with engine.begin() as conn:
        await conn.run_sync(orders.create)

    async def op(n: int) -> None:
        async with AsyncSession(engine) as session:
            await session.execute(orders.insert().values(id=n, state="paid"))
            await barrier.insert_commit(session, uuid.uuid4().hex)
            await session.commit()

    rate, lat, _ = await load(op, producers, seconds, warmup_s)
    return summary(rate, lat)


def sqlite_engine(path: Path, pool: int) -> AsyncEngine:
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{path}",
        pool_size=pool,
        max_overflow=0,
        connect_args={"timeout": 30},  # busy timeout, should several connections contend
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 3306), 1):
            return True
    except OSError:
        return False


def summary(rate: float, lat: list[float]) -> dict[str, Any]:
    return {
        "per_s": round(rate),
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p99_ms": round(percentile(lat, 99) * 1000, 2),
    }


async def sqlite_case(
    url: str | None, pool: int, producers: int, seconds: float, warmup_s: float
) -> dict[str, Any]:
    """The transactional case, or with ``url=None`` the local transactions alone."""
    with tempfile.TemporaryDirectory(prefix="tempomq-txbench-") as tmp:
        engine = sqlite_engine(Path(tmp) / "app.db", pool)
        try:
            if url is None:
                return await local_only(engine, producers, seconds, warmup_s)
            return await transactional(url, engine, producers, seconds, warmup_s)
        finally:
            await engine.dispose()


async def mysql_case(
    url: str, mysql_url: str, producers: int, seconds: float, warmup_s: float
) -> dict[str, Any]:
    engine = create_async_engine(mysql_url, pool_size=producers, max_overflow=8)
    try:
        return await transactional(url, engine, producers, seconds, warmup_s)
    finally:
        await engine.dispose()


async def protocol_on_nodes(
    urls: list[str], producers: int, seconds: float, warmup_s: float
) -> tuple[dict[str, Any], int]:
    """Prepare + commit through the SDK, producer ``i`` on server ``i % len(urls)``; the
    summary and how many transactions were committed in all (warm-up included)."""
    clients = [Client(u) for u in urls]
    try:
        for c in clients:
            await c.create_topic("orders", 8)

        async def op(n: int) -> None:
            client = clients[n % len(clients)]
            message = OutgoingMessage(BODY, keys=[f"order-{n}"])
            tx = await client.prepare_transaction("orders", message, producer_group=GROUP)
            await client.commit_transaction(tx)

        rate, lat, done = await load(op, producers, seconds, warmup_s)
    finally:
        for c in clients:
            await c.close()
    return summary(rate, lat), done


def unique_store(url: str) -> str:
    """``url`` with a table prefix of its own."""
    return (
        make_url(url)
        .update_query_dict({"table_prefix": f"bench{uuid.uuid4().hex[:8]}_"})
        .render_as_string(hide_password=False)
    )


async def committed_and_drop(store_url: str) -> int:
    """How many transactions the store holds committed; then its tables are dropped."""
    store = SqlTxStore(store_url)
    await store.open()
    try:
        return (await store.count_states()).get("committed", 0)
    finally:
        await store.drop()
        await store.close()


def nodes_case(
    tx_store: str | None, nodes: int, producers: int, seconds: float, warmup_s: float
) -> dict[str, Any]:
    """One run on ``nodes`` fresh servers sharing ``tx_store`` (None: each its SQLite file)."""
    store_url = unique_store(tx_store) if tx_store else None
    extra = ("--tx-store", store_url) if store_url else ()
    servers = [BenchServer(*extra) for _ in range(nodes)]
    committed = 0
    try:
        for srv in servers:
            srv.__enter__()
        result, done = asyncio.run(
            protocol_on_nodes([srv.url for srv in servers], producers, seconds, warmup_s)
        )
    finally:
        for srv in servers:
            srv.__exit__(None, None, None)
        if store_url is not None:
            committed = asyncio.run(committed_and_drop(store_url))
    if store_url is not None and committed != done:
        raise RuntimeError(f"{done} transactions committed by producers, {committed} in store")
    return result


def median_spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = sorted(r["per_s"] for r in runs)
    p50s = sorted(r["p50_ms"] for r in runs)
    return {
        "per_s": statistics.median(rates),
        "min": rates[0],
        "max": rates[-1],
        "p50_ms": statistics.median(p50s),
        "runs": rates,
    }


def nodes_main(args: argparse.Namespace) -> None:
    n, secs, warm = args.producers, args.seconds, args.warmup
    shared = args.tx_store or args.mysql_url
    if not reachable(shared):
        print(f"nothing answers at {shared}: no shared tx store to measure")
        print(json.dumps({"bench": "tx_bench_nodes", "skipped": shared}))
        return
    cases = [("sqlite", None, 1), ("shared_1", shared, 1), ("shared_2", shared, 2)]
    results = {
        name: median_spread([nodes_case(url, k, n, secs, warm) for _ in range(args.runs)])
        for name, url, k in cases
    }
    shown = make_url(shared).render_as_string(hide_password=True)
    print(f"SDK prepare + commit, {n} producers, {secs:g} s x {args.runs} runs; shared: {shown}")
    print(f"{'case':<40} {'median tx/s':>12} {'spread (min-max)':>18} {'p50':>10}")
    labels = {
        "sqlite": "tx store SQLite, 1 server (reference)",
        "shared_1": "tx store shared, 1 server",
        "shared_2": "tx store shared, 2 servers",
    }
    for name, r in results.items():
        spread = f"{r['min']:,}-{r['max']:,}"
        print(f"{labels[name]:<40} {r['per_s']:>12,} {spread:>18} {r['p50_ms']:>7.2f} ms")
    out: dict[str, Any] = {"bench": "tx_bench_nodes", "producers": n, "runs": args.runs}
    for name, r in results.items():
        out |= {f"{name}_tx_{k}": v for k, v in r.items()}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--producers", type=int, default=32)
    ap.add_argument("--sqlite-pool", type=int, default=1, help="SQLite connections (one writer)")
    ap.add_argument(
        "--mysql-url", default=os.environ.get("TEMPOMQ_TEST_MYSQL_URL", DEFAULT_MYSQL_URL)
    )
    ap.add_argument(
        "--tx-store",
        default=None,
        help="the servers' --tx-store (default: each its SQLite file; with --nodes: --mysql-url)",
    )
    ap.add_argument(
        "--nodes", action="store_true", help="the tx store on 1 and 2 servers (see the docstring)"
    )
    ap.add_argument("--runs", type=int, default=3, help="with --nodes: runs per case")
    args = ap.parse_args()
    if args.nodes:
        nodes_main(args)
        return
    n, secs, warm = args.producers, args.seconds, args.warmup
    store_url = unique_store(args.tx_store) if args.tx_store else None
    extra = ("--tx-store", store_url) if store_url else ()

    with BenchServer(*extra) as server:
        base = asyncio.run(plain(server.url, n, secs, warm))
    with BenchServer(*extra) as server:
        lite = asyncio.run(sqlite_case(server.url, args.sqlite_pool, n, secs, warm))
    with BenchServer(*extra) as server:
        proto = asyncio.run(protocol_only(server.url, n, secs, warm))
    local = asyncio.run(sqlite_case(None, args.sqlite_pool, n, secs, warm))
    maria: dict[str, Any] | None = None
    if reachable(args.mysql_url):
        with BenchServer(*extra) as server:
            maria = asyncio.run(mysql_case(server.url, args.mysql_url, n, secs, warm))
    if store_url is not None:
        asyncio.run(committed_and_drop(store_url))
    ratio = lite["per_s"] / base["per_s"]

    rows = [
        ("plain send, 1 message per call", base, "msg/s", ""),
        ("transactional send, SQLite local DB", lite, "tx/s", f"{ratio:.0%} of plain (bar >= 40%)"),
        (
            "  ref: prepare + commit, no local DB",
            proto,
            "tx/s",
            f"{proto['per_s'] / base['per_s']:.0%} of plain",
        ),
        ("  ref: SQLite local tx only, no messages", local, "tx/s", ""),
    ]
    if maria is not None:
        rows.append(("transactional send, MariaDB", maria, "tx/s", "bar >= 500 tx/s"))
    print(f"{n} concurrent producers, {secs:g} s each (after {warm:g} s warm-up)")
    print(f"{'case':<42} {'rate':>14} {'p50':>10} {'p99':>10}  note")
    for name, r, unit, note in rows:
        print(
            f"{name:<42} {r['per_s']:>8,} {unit:<5} {r['p50_ms']:>7.2f} ms {r['p99_ms']:>7.2f} ms"
            f"  {note}"
        )
    if maria is None:
        print(f"transactional send, MariaDB: skipped, nothing answers at {args.mysql_url}")

    out: dict[str, Any] = {"bench": "tx_bench", "producers": n, "tx_store": bool(store_url)}
    out |= {f"plain_msg_{k}": v for k, v in base.items()}
    out |= {f"sqlite_tx_{k}": v for k, v in lite.items()}
    out["sqlite_ratio"] = round(ratio, 3)
    out["sqlite_pool"] = args.sqlite_pool
    out |= {f"ref_protocol_tx_{k}": v for k, v in proto.items()}
    out |= {f"ref_sqlite_local_tx_{k}": v for k, v in local.items()}
    out |= {f"mariadb_tx_{k}": v for k, v in (maria or {}).items()} or {"mariadb_tx_per_s": None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
