"""Operator commands of the ``tempomq`` CLI: one table of operations on a running service.

Every operation talks HTTP through the SDK (:class:`~tempomq.client.Client`) and imports no
server code, so ``tempomq topic list`` works from any host that reaches the service. An
operation is data in :data:`OPERATIONS`: its help, its arguments and an async function
``(client, args) -> Output``. What they share lives once, in :meth:`Op.execute`: the client from
``--url`` / ``TEMPOMQ_URL`` (several comma-separated URLs fail over; the token from
``TEMPOMQ_TOKEN``, the CA from ``--ca-file`` / ``TEMPOMQ_CA_FILE``), a table or one JSON
document (``--json``) on stdout, and the exit code scripts can rely on:

====  ========================================================================================
0     done
1     the server failed or could not be reached (500, 502-504, refused, timed out); also a
      probe whose sends partly failed but that found nothing lost
2     usage: bad arguments (argparse), or the server refused the request as malformed (400, 413)
3     not found (404): topic, message, group, transaction, delayed message
4     conflict (409): exists already, already delivered / cancelled / committed / rolled back,
      receipt expired
5     the probe found lost, duplicated or unexpected messages
6     not allowed: no or a wrong token (401), or the token lacks a permission (403)
130   interrupted (Ctrl-C)
====  ========================================================================================

Errors go to stderr as ``tempomq: error: <code>: <message>`` with the API's error code.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import quote

import orjson

from tempomq import config
from tempomq.client import (
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    DelayedState,
    Forbidden,
    Message,
    NotFound,
    OutgoingMessage,
    ReceivedMessage,
    SendResult,
    TempoClientError,
    TooLarge,
    Topic,
    Unauthenticated,
)
from tempomq.client.client import CA_FILE_ENV, TOKEN_ENV
from tempomq.client.client import CLIENT_ENV_VARS as SDK_ENV_VARS
from tempomq.probe import (
    DELIVERABLE,
    MAX_RATE,
    KindCounts,
    Probe,
    ProbeConfig,
    ProbeProgress,
    ProbeReport,
    check_bounds,
)

URL_ENV = "TEMPOMQ_URL"
DEFAULT_URL = "http://127.0.0.1:8080"
#: Variables the client commands read; ``serve`` must not call them misspelt options.
CLIENT_ENV_VARS = frozenset({URL_ENV, *SDK_ENV_VARS})

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_PROBE_FAILED = 5
EXIT_DENIED = 6
EXIT_INTERRUPTED = 130

#: First match wins; any other SDK error (5xx, unavailable, no connection) is EXIT_FAILURE.
_ERROR_EXITS: tuple[tuple[type[TempoClientError], int], ...] = (
    (NotFound, EXIT_NOT_FOUND),
    (Conflict, EXIT_CONFLICT),
    (BadRequest, EXIT_USAGE),
    (TooLarge, EXIT_USAGE),
    (Unauthenticated, EXIT_DENIED),
    (Forbidden, EXIT_DENIED),
)

#: ``send --count``: messages per request, and bytes of bodies per request.
SEND_CHUNK = 500
SEND_CHUNK_BYTES = 8 * 1024 * 1024
MAX_COUNT = 1_000_000
PREVIEW_CHARS = 60

T = TypeVar("T")


def exit_code_for(error: TempoClientError) -> int:
    for cls, code in _ERROR_EXITS:
        if isinstance(error, cls):
            return code
    return EXIT_FAILURE


class UsageError(Exception):
    """Bad input found after parsing (an unreadable file, a bad URL): exit 2."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _print(text: str) -> None:
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): what it wanted it got. Point stdout at devnull
        # so the interpreter's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def fail(code: str, message: str, exit_code: int) -> int:
    print(f"tempomq: error: {code}: {message}", file=sys.stderr)
    return exit_code


# --------------------------------------------------------------------------------------------
# Argument types: the config module's parsers, reporting errors the argparse way (exit 2).


def _typed(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds (``1714564800000``) or ISO 8601 (``2024-05-01T12:00:00Z``; a time
    without an offset is local time) to epoch milliseconds."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither epoch milliseconds nor ISO 8601 (2024-05-01T12:00:00Z)"
        ) from None
    return round(moment.timestamp() * 1000)


def parse_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"must be above 0 and at most {MAX_RATE:g} per second, got {text}")
    return rate


def parse_property(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"{text!r} is not NAME=VALUE")
    return name, value


def parse_timeout_ms(text: str) -> int:
    ms = config.parse_duration_ms(text)
    if ms <= 0:
        raise ValueError(f"must be above 0, got {text!r}")  # no request could be answered
    return ms


DURATION = _typed(config.parse_duration_ms, "duration")
TIMEOUT = _typed(parse_timeout_ms, "duration")
TIME = _typed(parse_time_ms, "time")
RATE = _typed(parse_rate, "rate")
PROPERTY = _typed(parse_property, "property")


def count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    return _typed(config.count(minimum, maximum).parse, "count")


# --------------------------------------------------------------------------------------------
# The registry's shapes.


@dataclass(frozen=True, slots=True)
class Arg:
    """One ``add_argument`` call, as data."""

    flags: tuple[str, ...]
    options: Mapping[str, Any]

    def add_to(self, parser: argparse._ActionsContainer) -> None:
        parser.add_argument(*self.flags, **self.options)


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True, slots=True)
class OneOf:
    """Mutually exclusive arguments."""

    args: tuple[Arg, ...]
    required: bool = False

    def add_to(self, parser: argparse._ActionsContainer) -> None:
        group = parser.add_mutually_exclusive_group(required=self.required)
        for a in self.args:
            a.add_to(group)


@dataclass(frozen=True, slots=True)
class Output:
    """What an operation produced: ``data`` for ``--json``, ``text`` for people."""

    data: Any
    text: str
    exit_code: int = EXIT_OK
    #: (code, message) printed to stderr as an error line, for a non-zero exit code.
    error: tuple[str, str] | None = None

    def render(self, as_json: bool) -> str:
        if as_json:
            return orjson.dumps(self.data, option=orjson.OPT_INDENT_2).decode()
        return self.text


Call = Callable[["OpsClient", argparse.Namespace], Awaitable[Output]]

COMMON: tuple[Arg, ...] = (
    arg(
        "--url",
        metavar="URL[,URL...]",
        help=f"the service; several, comma-separated, fail over "
        f"[env {URL_ENV}; default {DEFAULT_URL}]",
    ),
    arg(
        "--ca-file",
        metavar="PATH",
        help=f"CA certificates (PEM) that verify an https:// server [env {CA_FILE_ENV}; "
        f"default the system's]. The token comes from {TOKEN_ENV} (or {TOKEN_ENV}_FILE)",
    ),
    arg("--json", action="store_true", help="print one JSON document instead of a table"),
    arg(
        "--timeout",
        type=TIMEOUT,
        default=10_000,
        metavar="DURATION",
        help="limit of each HTTP request [default 10s]",
    ),
)


@dataclass(frozen=True, slots=True)
class Op:
    """One operator command: ``tempomq <name> ...`` or ``tempomq <group> <name> ...``."""

    help: str
    call: Call
    args: tuple[Arg | OneOf, ...] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for a in self.args:
            a.add_to(parser)
        common = parser.add_argument_group("connection and output")
        for a in COMMON:
            a.add_to(common)

    def run(self, args: argparse.Namespace) -> int:
        try:
            return asyncio.run(self.execute(args))
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    async def execute(self, args: argparse.Namespace) -> int:
        url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
        try:
            client = OpsClient(url, timeout_s=args.timeout / 1000, ca_file=args.ca_file)
        except ValueError as e:
            return fail("invalid_url", str(e), EXIT_USAGE)
        except OSError as e:  # an unreadable CA file or token file
            return fail("invalid_credentials", str(e), EXIT_USAGE)
        try:
            async with client:
                output = await self.call(client, args)
        except ConnectionFailed as e:
            if e.sent:  # it answered once: the connection broke, the server is there
                return fail(e.code, e.message, exit_code_for(e))
            at = ", ".join(client.endpoints)
            hint = f"no tempomq server answers at {at}: is `tempomq serve` running?"
            return fail(e.code, f"{hint} ({e.message})", exit_code_for(e))
        except TempoClientError as e:
            return fail(e.code, e.message, exit_code_for(e))
        except UsageError as e:
            return fail(e.code, str(e), EXIT_USAGE)
        _print(output.render(args.json))
        if output.error is not None:
            fail(*output.error, output.exit_code)
        return output.exit_code


@dataclass(frozen=True, slots=True)
class OpGroup:
    """Commands under one noun: ``tempomq topic create``, ``tempomq topic list``."""

    help: str
    ops: Mapping[str, Op]


class OpsClient(Client):
    """The SDK client, plus the calls the operator commands need that it does not offer."""

    async def create_topic(self, name: str, queues: int | None = None) -> Topic:
        """Without ``queues`` the server's ``--default-queues`` applies (the SDK sends 8)."""
        body: dict[str, Any] = {"name": name}
        if queues is not None:
            body["queues"] = queues
        return Topic.from_json(await self._call("POST", "/v1/topics", body, idempotent=False))

    async def list_topics(self) -> list[Topic]:
        answer = await self._call("GET", "/v1/topics", idempotent=True)
        return [Topic.from_json(t) for t in answer["topics"]]

    async def delete_topic(self, name: str) -> dict[str, Any]:
        """``DELETE /v1/topics/{topic}``: what went with it (messages, groups, retry topics)."""
        return dict(
            await self._call("DELETE", f"/v1/topics/{quote(name, safe='')}", idempotent=False)
        )

    async def list_groups(self) -> list[dict[str, Any]]:
        answer = await self._call("GET", "/v1/groups", idempotent=True)
        return list(answer["groups"])

    async def delete_group(self, name: str) -> dict[str, Any]:
        """``DELETE /v1/groups/{group}``: what went with it (retry topics, an empty DLQ)."""
        return dict(
            await self._call("DELETE", f"/v1/groups/{quote(name, safe='')}", idempotent=False)
        )

    async def list_transactions(self, state: str) -> list[dict[str, Any]]:
        answer = await self._call(
            "GET", "/v1/transactions", params={"state": state}, idempotent=True
        )
        return list(answer["transactions"])

    async def group_status(self, topic: str, group: str) -> dict[str, Any]:
        """The API's answer as is: unlike ``GroupStats`` it names each queue's topic, which
        tells the group's retry queue from the topic's queue 0."""
        answer = await self._call("GET", self._group_path(topic, group), idempotent=True)
        return dict(answer)


# --------------------------------------------------------------------------------------------
# Formatting.


def when(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC; tables show this, ``--json`` keeps the number."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _numeric(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, header: bool = True) -> str:
    """Aligned columns, two spaces apart; a column of numbers is right-aligned."""
    raw = [list(r) for r in rows]
    width = len(headers)
    right = [
        any(_numeric(r[i]) for r in raw) and all(_numeric(r[i]) or r[i] is None for r in raw)
        for i in range(width)
    ]
    cells = [[cell(v) for v in r] for r in raw]
    if header:
        cells.insert(0, list(headers))
    sizes = [max((len(r[i]) for r in cells), default=0) for i in range(width)]
    lines = []
    for r in cells:
        parts = [v.rjust(sizes[i]) if right[i] else v.ljust(sizes[i]) for i, v in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def record(pairs: Iterable[tuple[str, object]]) -> str:
    """One object as ``name  value`` lines."""
    return table(("", ""), pairs, header=False)


def preview(body: bytes, limit: int = PREVIEW_CHARS) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(body)} bytes>"
    flat = "".join(c if c.isprintable() else " " for c in " ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def message_json(m: Message) -> dict[str, Any]:
    """A message as the API shows it: ``body`` when it is UTF-8, else ``body_b64``."""
    out: dict[str, Any] = {
        "msg_id": m.msg_id,
        "topic": m.topic,
        "queue_id": m.queue_id,
        "tags": m.tags,
        "keys": list(m.keys),
        "properties": m.properties,
        "born_at": m.born_at,
        "stored_at": m.stored_at,
    }
    try:
        out["body"] = m.body.decode("utf-8")
    except UnicodeDecodeError:
        out["body_b64"] = base64.b64encode(m.body).decode("ascii")
    if isinstance(m, ReceivedMessage):
        out["receipt"] = m.receipt
        out["delivery_attempt"] = m.delivery_attempt
    return out


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A one-line progress bar (``\\r`` redraws) for a terminal; does nothing when disabled."""

    WIDTH = 28
    REDRAW_S = 0.1

    def __init__(
        self,
        total: int,
        *,
        bytes_each: int,
        stream: TextIO,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(1, total)
        self.done = 0
        self._bytes_each = bytes_each
        self._stream = stream
        self.enabled = enabled
        self._clock = clock
        self._started = clock()
        self._drawn = -math.inf

    def line(self) -> str:
        frac = self.done / self.total
        filled = int(frac * self.WIDTH)
        elapsed = max(self._clock() - self._started, 1e-9)
        return (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} "
            f"{frac:4.0%}  {_human_bytes(self.done * self._bytes_each)}  "
            f"{self.done / elapsed:.0f} msg/s"
        )

    def advance(self, n: int) -> None:
        self.done += n
        if self.enabled and (self.done >= self.total or self._clock() - self._drawn >= 0.1):
            self._drawn = self._clock()
            self._stream.write("\r" + self.line())
            self._stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._stream.write("\r" + self.line() + "\n")
            self._stream.flush()


# --------------------------------------------------------------------------------------------
# The operations.


def _topic_json(t: Topic) -> dict[str, Any]:
    return asdict(t)


async def _topic_create(client: OpsClient, args: argparse.Namespace) -> Output:
    t = await client.create_topic(args.name, args.queues)
    pairs = (("name", t.name), ("queues", t.queues), ("created_at", when(t.created_at)))
    return Output(_topic_json(t), record(pairs))


async def _topic_list(client: OpsClient, args: argparse.Namespace) -> Output:
    topics = await client.list_topics()
    rows = [(t.name, t.queues, when(t.created_at)) for t in topics]
    return Output(
        {"topics": [_topic_json(t) for t in topics]}, table(("NAME", "QUEUES", "CREATED"), rows)
    )


def _read_body(args: argparse.Namespace) -> tuple[str | bytes, bool]:
    """The body and whether it came from a file or stdin; UTF-8 goes as text, else bytes."""
    source = args.file if args.file is not None else args.body
    if args.file is None and source != "-":
        return source, False
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise UsageError("unreadable_file", f"cannot read {source}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw, True


def _send_result_json(r: SendResult) -> dict[str, Any]:
    out: dict[str, Any] = {"msg_id": r.msg_id, "queue_id": r.queue_id}
    if r.deliver_at is not None:
        out["deliver_at"] = r.deliver_at
    return out


async def _send(client: OpsClient, args: argparse.Namespace) -> Output:
    body, from_file = _read_body(args)
    message = OutgoingMessage(
        body,
        tags=args.tags,
        keys=tuple(args.key or ()),
        properties=dict(args.prop or ()),
        sharding_key=args.sharding_key,
        delay_ms=args.delay,
        deliver_at=args.at,
    )
    size = len(body) if isinstance(body, bytes) else len(body.encode())
    n = args.count
    progress = Progress(
        n,
        bytes_each=size,
        stream=sys.stderr,
        enabled=(n > 1 or from_file) and sys.stderr.isatty(),
    )
    results: list[SendResult] = []
    try:
        if n == 1:
            results.append(await client.send_message(args.topic, message))
            progress.advance(1)
        else:
            # Requests stay well under the server's request limit whatever the body size.
            chunk = max(1, min(SEND_CHUNK, SEND_CHUNK_BYTES // max(size, 1)))
            for start in range(0, n, chunk):
                k = min(chunk, n - start)
                results.extend(await client.send_batch(args.topic, [message] * k))
                progress.advance(k)
    finally:
        progress.close()
    first = results[0]
    if n == 1:
        pairs: list[tuple[str, object]] = [("msg_id", first.msg_id), ("queue", first.queue_id)]
        data: dict[str, Any] = _send_result_json(first)
    else:
        pairs = [("sent", len(results)), ("first", first.msg_id), ("last", results[-1].msg_id)]
        data = {"results": [_send_result_json(r) for r in results]}
    pairs.append(("deliver_at", when(first.deliver_at)))
    return Output(data, record(pairs))


async def _receive(client: OpsClient, args: argparse.Namespace) -> Output:
    messages = await client.receive(
        args.topic,
        args.group,
        max_messages=args.max,
        wait_ms=args.wait,
        invisible_ms=args.invisible,
        tags=args.tags,
    )
    acked = await client.ack(args.topic, args.group, messages) if args.ack and messages else 0
    headers = ["MSG_ID", "ATTEMPT", "QUEUE", "TAGS", "KEYS", "STORED", "BODY"]
    rows: list[list[object]] = [
        [
            m.msg_id,
            m.delivery_attempt,
            m.queue_id,
            m.tags,
            m.keys,
            when(m.stored_at),
            preview(m.body),
        ]
        for m in messages
    ]
    if not args.ack:  # the receipts are what an ack needs
        headers.append("RECEIPT")
        for row, m in zip(rows, messages, strict=True):
            row.append(m.receipt)
    summary = f"{len(messages)} received" + (f", {acked} acked" if args.ack else "")
    text = table(headers, rows) + "\n" + summary if messages else summary
    data = {"messages": [message_json(m) for m in messages], "acked": acked}
    return Output(data, text)


async def _ack(client: OpsClient, args: argparse.Namespace) -> Output:
    acked = await client.ack(args.topic, args.group, args.receipts)
    return Output({"acked": acked}, f"{acked} acked")


async def _message(client: OpsClient, args: argparse.Namespace) -> Output:
    m = await client.get_message(args.msg_id)
    pairs: list[tuple[str, object]] = [
        ("msg_id", m.msg_id),
        ("topic", m.topic),
        ("queue", m.queue_id),
        ("tags", m.tags),
        ("keys", m.keys),
        ("born_at", when(m.born_at)),
        ("stored_at", when(m.stored_at)),
    ]
    pairs += [(f"property {k}", v) for k, v in sorted(m.properties.items())]
    pairs.append(("body", preview(m.body, 2000)))
    return Output(message_json(m), record(pairs))


def _delayed_op(
    help: str,
    act: Callable[[OpsClient, argparse.Namespace], Awaitable[DelayedState]],
    *extra: Arg | OneOf,
) -> Op:
    async def call(client: OpsClient, args: argparse.Namespace) -> Output:
        d = await act(client, args)
        pairs = (
            ("msg_id", d.msg_id),
            ("topic", d.topic),
            ("deliver_at", when(d.deliver_at)),
            ("state", d.state),
        )
        return Output(asdict(d), record(pairs))

    return Op(help, call, (MSG_ID, *extra))


async def _tx_list(client: OpsClient, args: argparse.Namespace) -> Output:
    txs = await client.list_transactions(args.state)
    headers = ("TX_ID", "MSG_ID", "TOPIC", "PRODUCER_GROUP", "STATE", "CHECKS", "CREATED")
    rows = [
        (
            t.get("tx_id"),
            t.get("msg_id"),
            t.get("topic"),
            t.get("producer_group"),
            t.get("state"),
            t.get("check_count"),
            when(t.get("created_at")),
        )
        for t in txs
    ]
    states = "prepared, committed, rolled_back, check_max"
    note = f"transactions in state {args.state} (--state: {states})"
    return Output({"state": args.state, "transactions": txs}, f"{note}\n{table(headers, rows)}")


async def _tx_get(client: OpsClient, args: argparse.Namespace) -> Output:
    t = await client.get_transaction(args.tx_id)
    pairs = (
        ("tx_id", t.tx_id),
        ("msg_id", t.msg_id),
        ("topic", t.topic),
        ("state", t.state),
        ("check_count", t.check_count),
    )
    return Output(asdict(t), record(pairs))


def _tx_end_op(help: str, state: str, act: Callable[[OpsClient, str], Awaitable[None]]) -> Op:
    async def call(client: OpsClient, args: argparse.Namespace) -> Output:
        await act(client, args.tx_id)
        # A 200 means the transaction is in this state now (repeating answers the same).
        data = {"tx_id": args.tx_id, "state": state}
        return Output(data, record(data.items()))

    return Op(help, call, (TX_ID,))


async def _topic_delete(client: OpsClient, args: argparse.Namespace) -> Output:
    d = await client.delete_topic(args.name)
    pairs = [
        ("deleted", d["deleted"]),
        ("messages", d["messages"]),
        ("groups", " ".join(d["groups"]) or None),
        ("retry_topics", " ".join(d["retry_topics"]) or None),
    ]
    return Output(d, record(pairs))


async def _group_list(client: OpsClient, args: argparse.Namespace) -> Output:
    groups = await client.list_groups()
    rows = [
        (
            g["name"],
            "yes" if g["fifo"] else "no",
            g["max_attempts"],
            " ".join(t["topic"] for t in g["topics"]) or None,
            g["dlq_messages"],
            when(g.get("created_at")),
        )
        for g in groups
    ]
    headers = ("NAME", "FIFO", "MAX_ATTEMPTS", "TOPICS", "DEAD_LETTERS", "CREATED")
    return Output({"groups": groups}, table(headers, rows))


async def _group_delete(client: OpsClient, args: argparse.Namespace) -> Output:
    d = await client.delete_group(args.name)
    pairs = [
        ("deleted", d["deleted"]),
        ("retry_topics", " ".join(d["retry_topics"]) or None),
        ("dlq_topic", d["dlq_topic"]),
        ("dlq_messages", d["dlq_messages"]),
    ]
    return Output(d, record(pairs))


async def _group_create(client: OpsClient, args: argparse.Namespace) -> Output:
    await client.create_group(args.name, fifo=args.fifo, max_attempts=args.max_attempts)
    data = {"name": args.name, "fifo": args.fifo, "max_attempts": args.max_attempts}
    return Output(data, record(data.items()))


_LAG_COLUMNS = (
    ("TOPIC", "topic"),
    ("QUEUE", "queue_id"),
    ("MIN", "min_offset"),
    ("MAX", "max_offset"),
    ("COMMITTED", "committed_offset"),
    ("NEXT", "next_offset"),
    ("INFLIGHT", "inflight"),
    ("LAG", "lag"),
)


async def _group_lag(client: OpsClient, args: argparse.Namespace) -> Output:
    status = await client.group_status(args.topic, args.group)
    total = {"topic": "total", "inflight": status.get("inflight"), "lag": status.get("lag")}
    rows = [[q.get(key) for _, key in _LAG_COLUMNS] for q in (*status.get("queues", ()), total)]
    return Output(status, table([h for h, _ in _LAG_COLUMNS], rows))


async def _group_reset(client: OpsClient, args: argparse.Namespace) -> Output:
    offsets = await client.reset_group(args.topic, args.group, args.to)
    queues = [{"queue_id": q, "offset": o} for q, o in sorted(offsets.items())]
    data = {"topic": args.topic, "group": args.group, "timestamp": args.to, "queues": queues}
    text = f"{args.group} on {args.topic} replays from {when(args.to)}\n" + table(
        ("QUEUE", "OFFSET"), [(q["queue_id"], q["offset"]) for q in queues]
    )
    return Output(data, text)


def format_report(report: ProbeReport) -> str:
    """The probe's report for people: counts per kind, timing percentiles, the verdict."""
    names = KindCounts.__dataclass_fields__
    rows: list[list[object]] = []
    for kind, counts in (*report.kinds.items(), ("total", report.total)):
        values: dict[str, object] = asdict(counts)
        # "-" where a count cannot apply: a rolled-back message cannot be lost, nor can one
        # that must arrive be unexpected.
        if kind in DELIVERABLE:
            values["unexpected"] = None
        elif kind != "total":
            values["lost"] = None
        rows.append([kind, *values.values()])
    headers = ["KIND", *(n.upper() for n in names)]
    timing = [
        *((f"latency {k}", p) for k, p in report.latency_ms.items()),
        *((f"lateness delayed {k}", p) for k, p in report.lateness_ms.items()),
    ]
    timing_rows = [(name, p.count, p.p50, p.p90, p.p99, p.max) for name, p in timing]
    verdict = "OK" if report.ok else "FAILED: " + ", ".join(report.problems())
    lines = [
        f"probe run {report.run_id}: {report.duration_s:.1f} s of sending at {report.rate:g}/s",
        "",
        table(headers, rows),
        "",
        table(("MILLISECONDS", "COUNT", "P50", "P90", "P99", "MAX"), timing_rows),
        "",
        f"stale deliveries of other runs: {report.stale}; failed receives/acks: "
        f"{report.consume_errors}",
    ]
    lines += [f"{what}: {' '.join(ids)}" for what, ids in report.samples.items()]
    lines.append(f"result: {verdict}")
    return "\n".join(lines)


async def _probe(client: OpsClient, args: argparse.Namespace) -> Output:
    try:
        cfg = ProbeConfig(
            topic=args.topic,
            group=args.group,
            producer_group=args.group,
            delay_min_ms=args.delay_min,
            delay_max_ms=args.delay_max,
            grace_ms=args.grace,
        )
        check_bounds(args.duration / 1000, args.rate)
    except ValueError as e:
        raise UsageError("invalid_probe", str(e)) from None

    def progress(where: ProbeProgress) -> None:
        print(where.line(), file=sys.stderr, flush=True)

    report = await Probe(client, cfg).run(
        args.duration / 1000,
        args.rate,
        progress=progress if args.progress > 0 else None,
        progress_every_s=args.progress / 1000,
    )
    code, error = probe_verdict(report)
    return Output(report.to_json(), format_report(report), code, error)


def probe_verdict(report: ProbeReport) -> tuple[int, tuple[str, str] | None]:
    """The exit code of a probe run, and the error line to print with it."""
    if not report.ok:
        return EXIT_PROBE_FAILED, ("probe_failed", ", ".join(report.problems()))
    errors = report.total.errors
    if errors or report.consume_errors:
        message = (
            f"{errors} sends with an unknown outcome, {report.consume_errors} failed receives/acks"
        )
        return EXIT_FAILURE, ("probe_errors", message)
    return EXIT_OK, None


# -- the registry ------------------------------------------------------------------------------

TOPIC = arg("topic", metavar="TOPIC")
GROUP = arg("group", metavar="GROUP")
MSG_ID = arg("msg_id", metavar="MSG_ID")
TX_ID = arg("tx_id", metavar="TX_ID")
_PROBE = ProbeConfig()  # its defaults, shown in --help
DELIVERY_TIME = (
    arg("--delay", type=DURATION, metavar="DURATION", help="deliver after this long (30s, 5m)"),
    arg("--at", type=TIME, metavar="TIME", help="deliver at epoch ms or ISO 8601"),
)

OPERATIONS: dict[str, Op | OpGroup] = {
    "topic": OpGroup(
        "create, list and delete topics",
        {
            "create": Op(
                "create a topic",
                _topic_create,
                (
                    arg("name", metavar="NAME"),
                    arg(
                        "--queues",
                        type=count(1),
                        metavar="N",
                        help="queues of the topic [default: the server's --default-queues]",
                    ),
                ),
            ),
            "list": Op("list the topics", _topic_list),
            "delete": Op(
                "delete a topic: its messages become unreachable, its groups' offsets and"
                " retries go, messages due for it later are dropped (docs/concepts.md)",
                _topic_delete,
                (arg("name", metavar="NAME"),),
            ),
        },
    ),
    "send": Op(
        "send a message (or --count copies of it)",
        _send,
        (
            TOPIC,
            OneOf(
                (
                    arg("body", nargs="?", metavar="BODY", help="the body; - reads stdin"),
                    arg("--file", metavar="PATH", help="read the body from a file (- is stdin)"),
                ),
                required=True,
            ),
            OneOf(DELIVERY_TIME),
            arg("--tags", metavar="TAG", help="the message's tag"),
            arg("--key", action="append", metavar="KEY", help="a key to find it by (repeatable)"),
            arg(
                "--prop",
                action="append",
                type=PROPERTY,
                metavar="NAME=VALUE",
                help="a property (repeatable)",
            ),
            arg("--sharding-key", metavar="KEY", help="same key, same queue (FIFO order)"),
            arg(
                "--count",
                type=count(1, MAX_COUNT),
                default=1,
                metavar="N",
                help="send N copies, in batches, with a progress bar on a terminal [default 1]",
            ),
        ),
    ),
    "receive": Op(
        "receive messages as a consumer group (long poll)",
        _receive,
        (
            TOPIC,
            GROUP,
            arg(
                "--max",
                type=count(1, 1000),
                default=32,
                metavar="N",
                help="most messages [default 32]",
            ),
            arg(
                "--wait",
                type=DURATION,
                default=1000,
                metavar="DURATION",
                help="how long to wait for the first message [default 1s]",
            ),
            arg(
                "--invisible",
                type=DURATION,
                default=30_000,
                metavar="DURATION",
                help="how long they stay invisible to the group unless acked [default 30s]",
            ),
            arg("--tags", metavar="FILTER", help="tag filter, e.g. 'a || b'"),
            arg("--ack", action="store_true", help="acknowledge what was received"),
        ),
    ),
    "ack": Op(
        "acknowledge received messages by receipt",
        _ack,
        (TOPIC, GROUP, arg("receipts", nargs="+", metavar="RECEIPT")),
    ),
    "message": Op("show a stored message by id", _message, (MSG_ID,)),
    "delayed": OpGroup(
        "query, cancel or move a delayed message",
        {
            "get": _delayed_op(
                "show a delayed message's time and state", lambda c, a: c.get_delayed(a.msg_id)
            ),
            "cancel": _delayed_op(
                "cancel a delayed message", lambda c, a: c.cancel_delayed(a.msg_id)
            ),
            "reschedule": _delayed_op(
                "move a delayed message to a new time",
                lambda c, a: c.reschedule_delayed(a.msg_id, delay_ms=a.delay, deliver_at=a.at),
                OneOf(DELIVERY_TIME, required=True),
            ),
        },
    ),
    "tx": OpGroup(
        "list and resolve transactions",
        {
            "list": Op(
                "list transactions in a state",
                _tx_list,
                (
                    arg(
                        "--state",
                        default="check_max",
                        choices=("prepared", "committed", "rolled_back", "check_max"),
                        help="[default check_max: parked after the last check-back]",
                    ),
                ),
            ),
            "get": Op("show a transaction", _tx_get, (TX_ID,)),
            "commit": _tx_end_op(
                "commit a transaction: its message becomes visible",
                "committed",
                lambda c, tx: c.commit_transaction(tx),
            ),
            "rollback": _tx_end_op(
                "roll a transaction back: its message is discarded",
                "rolled_back",
                lambda c, tx: c.rollback_transaction(tx),
            ),
        },
    ),
    "group": OpGroup(
        "create, list and delete consumer groups, show their lag, replay",
        {
            "create": Op(
                "create a consumer group (receive creates plain ones by itself)",
                _group_create,
                (
                    arg("name", metavar="NAME"),
                    arg("--fifo", action="store_true", help="one message per queue at a time"),
                    arg(
                        "--max-attempts",
                        type=count(1, 1000),
                        default=16,
                        metavar="N",
                        help="deliveries before the dead-letter topic [default 16]",
                    ),
                ),
            ),
            "list": Op(
                "list the consumer groups with their topics and dead letters", _group_list
            ),
            "delete": Op(
                "delete a consumer group: its offsets, receipts and retries go; a DLQ holding"
                " dead letters stays",
                _group_delete,
                (arg("name", metavar="NAME"),),
            ),
            "lag": Op(
                "show a group's lag and in-flight messages per queue", _group_lag, (TOPIC, GROUP)
            ),
            "reset": Op(
                "replay: move a group on a topic back (or forward) to a point in time",
                _group_reset,
                (
                    TOPIC,
                    GROUP,
                    arg(
                        "--to",
                        type=TIME,
                        required=True,
                        metavar="TIME",
                        help="epoch ms or ISO 8601",
                    ),
                ),
            ),
        },
    ),
    "probe": Op(
        "send, receive and reconcile probe messages: loss, duplicates, latency",
        _probe,
        (
            arg(
                "--duration",
                type=DURATION,
                default=60_000,
                metavar="DURATION",
                help="how long to send [default 60s]",
            ),
            arg(
                "--rate",
                type=RATE,
                default=200.0,
                metavar="PER_SECOND",
                help="messages per second [default 200]",
            ),
            arg(
                "--progress",
                type=DURATION,
                default=5_000,
                metavar="DURATION",
                help="how often to print where the run stands, on stderr; 0: never [default 5s]",
            ),
            arg("--topic", default=_PROBE.topic, help="[default %(default)s]"),
            arg(
                "--group",
                default=_PROBE.group,
                help="consumer and producer group [default %(default)s]",
            ),
            arg(
                "--delay-min",
                type=DURATION,
                default=_PROBE.delay_min_ms,
                metavar="DURATION",
                help="shortest delay of delayed probes [default 100ms]",
            ),
            arg(
                "--delay-max",
                type=DURATION,
                default=_PROBE.delay_max_ms,
                metavar="DURATION",
                help="longest delay of delayed probes [default 2s]",
            ),
            arg(
                "--grace",
                type=DURATION,
                default=_PROBE.grace_ms,
                metavar="DURATION",
                help="wait this much past the longest delay for the last arrivals [default 5s]",
            ),
        ),
    ),
}
