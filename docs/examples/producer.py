"""Send plain, delayed and transactional messages with the tempomq SDK, then exit.

    python docs/examples/producer.py
    TEMPOMQ_URL=http://127.0.0.1:8080 DATABASE_URL=mysql+aiomysql://shop:shop@127.0.0.1/shop \\
        python docs/examples/producer.py

All messages go to the topic ``orders``, created if it is missing. The transactional part
keeps an ``orders`` table in ``DATABASE_URL`` (default: the SQLite file ``example.db`` in the
working directory): a paid order's row and its message commit together, and a declined
payment leaves neither. Each line printed is ``<kind> <msg_id> <body>``, kind being
``plain``, ``delayed``, ``committed`` or ``rolled-back``.

Then run ``docs/examples/consumer.py`` to watch them arrive.

With auth on (as in the compose stack), the token comes from ``TEMPOMQ_TOKEN``, or from the file
``TEMPOMQ_TOKEN_FILE`` names (a Docker secret); ``TEMPOMQ_CA_FILE`` verifies an https:// server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence

from sqlalchemy import Column, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from tempomq.client import Barrier, Client, OutgoingMessage, TopicExists, TransactionalProducer

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///example.db"
PRODUCER_GROUP = "order-service"

orders = Table(
    "orders",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("number", Integer, nullable=False),
    Column("state", String(16), nullable=False),
)


class PaymentDeclined(Exception):
    """Raised inside a transaction: the order row and its message are both rolled back."""

    def __init__(self, msg_id: str) -> None:
        super().__init__(f"payment declined (message {msg_id} rolled back)")
        self.msg_id = msg_id


def report(kind: str, msg_id: str, body: str, note: str = "") -> None:
    print(f"{kind:<11} {msg_id}  {body}" + (f"  ({note})" if note else ""), flush=True)


async def ensure_topic(client: Client, topic: str) -> None:
    with contextlib.suppress(TopicExists):
        await client.create_topic(topic, queues=4)


async def send_plain(client: Client, topic: str) -> None:
    for number in (1, 2, 3):
        body = f"order {number} created"
        sent = await client.send(topic, body, tags="created", keys=[f"order-{number}"])
        report("plain", sent.msg_id, body)


async def send_delayed(client: Client, topic: str, delay_ms: int) -> None:
    body = "order 1: remind the customer"
    sent = await client.send(topic, body, tags="reminder", delay_ms=delay_ms)
    report("delayed", sent.msg_id, body, f"in {delay_ms} ms")

    # Or at a point in time (epoch milliseconds); the delayed message can still be cancelled
    # or moved until then: client.cancel_delayed(msg_id), client.reschedule_delayed(...).
    deliver_at = int(time.time() * 1000) + 2 * delay_ms
    body = "order 2: cancel if still unpaid"
    sent = await client.send(topic, body, tags="timeout", deliver_at=deliver_at)
    report("delayed", sent.msg_id, body, f"at {deliver_at}")


async def pay_order(
    producer: TransactionalProducer,
    engine: AsyncEngine,
    topic: str,
    number: int,
    *,
    declined: bool = False,
) -> str:
    """Record order ``number`` as paid and send ``order <number> paid``, both or neither."""
    message = OutgoingMessage(f"order {number} paid", tags="paid", keys=[f"order-{number}"])
    async with (
        AsyncSession(engine) as session,
        producer.transaction(topic, message, session) as tx,
    ):
        await session.execute(orders.insert().values(number=number, state="paid"))
        if declined:
            raise PaymentDeclined(tx.msg_id)  # undoes the insert, and the message
    return tx.msg_id


async def send_transactional(client: Client, topic: str, database_url: str) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(orders.metadata.create_all)
        barrier = Barrier(engine)
        await barrier.create_table()  # or run docs/barrier.sql in your migrations

        # While it runs, the producer answers the server's check-backs from the barrier table.
        async with TransactionalProducer(client, PRODUCER_GROUP, barrier=barrier) as producer:
            for number in (1, 2):
                msg_id = await pay_order(producer, engine, topic, number)
                report("committed", msg_id, f"order {number} paid")
            try:
                await pay_order(producer, engine, topic, 3, declined=True)
            except PaymentDeclined as e:
                report("rolled-back", e.msg_id, "order 3 paid", "payment declined")
    finally:
        await engine.dispose()


async def produce(url: str, database_url: str, topic: str, delay_ms: int) -> None:
    async with Client(url) as client:
        await ensure_topic(client, topic)
        await send_plain(client, topic)
        await send_delayed(client, topic, delay_ms)
        await send_transactional(client, topic, database_url)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send plain, delayed and transactional messages to tempomq, then exit."
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("TEMPOMQ_URL", DEFAULT_URL),
        help="tempomq endpoint(s), comma-separated [env TEMPOMQ_URL; default %(default)s]",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
        help="SQLAlchemy async URL of the local database [env DATABASE_URL; default %(default)s]",
    )
    parser.add_argument("--topic", default="orders", help="topic to send to [%(default)s]")
    parser.add_argument(
        "--delay-ms", type=int, default=2000, help="delay of the delayed messages [%(default)s]"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(produce(args.url, args.database_url, args.topic, args.delay_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
