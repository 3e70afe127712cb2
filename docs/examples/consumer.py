"""Receive the messages of the topic ``orders`` as the consumer group ``example`` and print them.

    python docs/examples/consumer.py                # until Ctrl-C or SIGTERM
    python docs/examples/consumer.py --seconds 10   # for ten seconds, then exit

A new group starts at the oldest message of the topic, so what was sent before the consumer
started arrives too. Each message prints one line, ``<msg_id> attempt=<n> tags=<tags> <body>``,
and is acked when the handler returns (had it raised, the message would be nacked and
redelivered after the group's backoff). A delayed message also shows how late it was released.

With auth on (as in the compose stack), the token comes from ``TEMPOMQ_TOKEN``, or from the file
``TEMPOMQ_TOKEN_FILE`` names (a Docker secret); ``TEMPOMQ_CA_FILE`` verifies an https:// server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence

from tempomq.client import Client, Consumer, ReceivedMessage, TopicExists

DEFAULT_URL = "http://127.0.0.1:8080"


def describe(msg: ReceivedMessage) -> str:
    body = msg.body.decode("utf-8", errors="replace")
    line = f"{msg.msg_id} attempt={msg.delivery_attempt} tags={msg.tags or '-'} {body}"
    # The delay server stamps released messages with the time asked for and the time released.
    deliver_at, released_at = msg.properties.get("DELIVER_AT"), msg.properties.get("RELEASED_AT")
    if deliver_at and released_at:
        line += f"  (delayed, released {int(released_at) - int(deliver_at)} ms after its time)"
    return line


async def ensure_topic(client: Client, topic: str) -> None:
    # The consumer may start before the producer has created the topic.
    with contextlib.suppress(TopicExists):
        await client.create_topic(topic, queues=4)


async def consume(url: str, topic: str, group: str, seconds: float | None) -> int:
    """Print and ack messages until ``seconds`` have passed (or a signal); returns how many."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    received = 0

    async def handle(msg: ReceivedMessage) -> None:
        nonlocal received
        print(describe(msg), flush=True)
        received += 1

    async with Client(url) as client:
        await ensure_topic(client, topic)
        print(f"consuming {topic} as group {group} from {url}", flush=True)
        # On leaving the block the consumer stops receiving, lets running handlers finish and
        # sends their acks.
        async with Consumer(client, topic, group, handle, concurrency=8, wait_ms=5000):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
    print(f"received {received} messages", flush=True)
    return received


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Receive, print and ack tempomq messages.")
    parser.add_argument(
        "--url",
        default=os.environ.get("TEMPOMQ_URL", DEFAULT_URL),
        help="tempomq endpoint [env TEMPOMQ_URL; default %(default)s]",
    )
    parser.add_argument("--topic", default="orders", help="topic to receive from [%(default)s]")
    parser.add_argument("--group", default="example", help="consumer group [%(default)s]")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="stop after this many seconds [default: run until a signal]",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(consume(args.url, args.topic, args.group, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
