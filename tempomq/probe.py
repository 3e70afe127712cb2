"""Reconciliation probe: send known messages through a running service and account for each one.

Kuaishou runs a monitor on every broker that produces a few messages with the business SDK,
consumes them, and records loss, duplicates and latency (seeds/000). This is that monitor for
tempomq. One run of :meth:`Probe.run` sends, at a bounded rate for a bounded time, a fixed mix of
four kinds of message to a dedicated topic (default ``tempomq-probe``; ``SYS_`` topics are closed
to clients) and consumes them with its own group:

===============  =========================================================  ==================
kind             how it is sent                                             must it arrive?
===============  =========================================================  ==================
``plain``        one send                                                   yes, once
``delayed``      one send with a random ``delay_ms`` (100 ms - 2 s)         yes, once, on time
``tx``           prepare, then commit                                       yes, once
``tx_rollback``  prepare, then rollback                                     never
===============  =========================================================  ==================

Every message carries its run id, kind and sequence number in properties, so the accounting
(:class:`Ledger`, pure: no IO, times passed in) knows what each delivery is. Deliveries of other
runs (an earlier run cut off, a probe in another process) are acked and counted as ``stale``.
A send whose outcome is unknown (it failed after the request went out) counts as an error and is
neither lost if missing nor unexpected if it arrives. A second delivery of a message is a
*duplicate* unless it is an announced redelivery (``delivery_attempt`` > 1, or the ack of the
first failed): delivery is at least once, so those are counted as ``redelivered`` instead.

After the last send the probe waits until every message that must arrive has arrived, plus
``settle_ms`` for duplicates and rolled-back messages to show up; or, at the latest, for the
longest delay plus ``grace_ms``. Transactions left open by a lost commit or rollback answer are
resolved by the check-back: the probe answers each from the message's kind property.

:class:`ProbeReport` has the counts, the send→receive latency of ``plain`` and ``tx``, and two
lateness figures of ``delayed``: receive - ``DELIVER_AT`` (what a consumer sees; includes any clock
difference between the probe's host and the server) and ``RELEASED_AT`` - ``DELIVER_AT`` (the
delay server's own release lateness, server clock only). :func:`publish_report` exports a report
as Prometheus gauges; :class:`ProbeSchedule` runs the probe every N seconds inside a process
that owns it (the server), publishing each report.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import secrets
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from tempomq.client import (
    BadRequest,
    CheckAnswer,
    CheckRequest,
    Client,
    GroupExists,
    NotFound,
    OutgoingMessage,
    ReceivedMessage,
    TempoClientError,
    TopicExists,
    TransactionalProducer,
)

#: stdlib logging, as in the SDK: the server's configure_logging renders it like its own lines,
#: and the CLI, which configures nothing, gets warnings on stderr, never in its stdout.
log = logging.getLogger("tempomq.probe")

Kind = Literal["plain", "delayed", "tx", "tx_rollback"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: Kinds that must arrive exactly once; ``tx_rollback`` must never arrive.
DELIVERABLE: frozenset[Kind] = frozenset({"plain", "delayed", "tx"})
#: One cycle of ten sends: 4 plain, 3 delayed, 2 committed, 1 rolled back. Fixed rather than
#: random, so a run of N messages has a predictable mix however short it is.
MIX: tuple[Kind, ...] = (
    "plain",
    "delayed",
    "tx",
    "plain",
    "delayed",
    "tx_rollback",
    "plain",
    "delayed",
    "tx",
    "plain",
)

PROP_RUN = "PROBE_RUN"
PROP_KIND = "PROBE_KIND"
PROP_SEQ = "PROBE_SEQ"
PROP_DELIVER_AT = "DELIVER_AT"
PROP_RELEASED_AT = "RELEASED_AT"

#: Bounds that keep one run's memory and load modest (about 200 bytes of ledger per message).
MAX_RATE = 5000.0
MAX_MESSAGES = 500_000
#: Falling further behind the schedule than this drops the backlog instead of bursting it.
MAX_CATCH_UP_S = 1.0
RECEIVE_WAIT_MS = 500
RECEIVE_BATCH = 256
#: How many message ids of each problem a report names, for looking them up.
SAMPLE_IDS = 20


def wall_ms() -> float:
    return time.time() * 1000.0


# --------------------------------------------------------------------------------------------
# The report.


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Nearest-rank percentiles of a list of milliseconds; all ``nan`` when it is empty."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Percentiles:
        ordered = sorted(values)
        n = len(ordered)
        if not n:
            nan = math.nan
            return cls(0, nan, nan, nan, nan)

        def rank(q: float) -> float:
            return ordered[max(0, math.ceil(q * n) - 1)]

        return cls(n, rank(0.50), rank(0.90), rank(0.99), ordered[-1])

    QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"), ("1", "max"))

    def to_json(self) -> dict[str, float | int | None]:
        # JSON has no NaN: an empty series shows as nulls.
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


@dataclass(frozen=True, slots=True)
class KindCounts:
    #: The server confirmed the send (or the commit / rollback).
    sent: int = 0
    #: Distinct messages received.
    received: int = 0
    #: Confirmed, must arrive, did not.
    lost: int = 0
    #: Received again without the server announcing a redelivery.
    duplicated: int = 0
    #: Received again as an announced redelivery (attempt > 1, or after our ack failed).
    redelivered: int = 0
    #: Rolled back and received all the same.
    unexpected: int = 0
    #: Sends (prepares, commits, rollbacks) whose outcome is unknown.
    errors: int = 0

    def __add__(self, other: KindCounts) -> KindCounts:
        mine, theirs = asdict(self), asdict(other)
        return KindCounts(**{k: mine[k] + theirs[k] for k in mine})


@dataclass(frozen=True, slots=True)
class ProbeReport:
    run_id: str
    started_at_ms: int
    #: How long the sending took and the rate asked for.
    duration_s: float
    rate: float
    kinds: Mapping[Kind, KindCounts]
    #: Send (plain) or commit (tx) call → receive, milliseconds.
    latency_ms: Mapping[str, Percentiles]
    #: ``receive``: receive - DELIVER_AT; ``release``: RELEASED_AT - DELIVER_AT.
    lateness_ms: Mapping[str, Percentiles]
    #: Deliveries of other runs drained from the group (not counted above).
    stale: int = 0
    #: Failed receive and ack calls (they make redeliveries, not losses).
    consume_errors: int = 0
    #: Up to SAMPLE_IDS message ids per problem: ``lost``, ``duplicated``, ``unexpected``.
    samples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def total(self) -> KindCounts:
        return sum(self.kinds.values(), KindCounts())

    @property
    def ok(self) -> bool:
        """No loss, no duplicate, no rolled-back message delivered."""
        t = self.total
        return t.lost == t.duplicated == t.unexpected == 0

    def problems(self) -> list[str]:
        t = self.total
        pairs = (("lost", t.lost), ("duplicated", t.duplicated), ("unexpected", t.unexpected))
        return [f"{n} {what}" for what, n in pairs if n]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "run_id": self.run_id,
            "started_at": self.started_at_ms,
            "duration_s": round(self.duration_s, 3),
            "rate": self.rate,
            "total": asdict(self.total),
            "kinds": {k: asdict(v) for k, v in self.kinds.items()},
            "latency_ms": {k: v.to_json() for k, v in self.latency_ms.items()},
            "lateness_ms": {k: v.to_json() for k, v in self.lateness_ms.items()},
            "stale": self.stale,
            "consume_errors": self.consume_errors,
            "samples": {k: list(v) for k, v in self.samples.items()},
        }


# --------------------------------------------------------------------------------------------
# The accounting: pure, fed what happened and when.


@dataclass(slots=True)
class _Entry:
    kind: Kind
    state: Literal["pending", "confirmed", "failed"] = "pending"
    msg_id: str = ""
    #: When the call that makes the message visible (send, commit) went out.
    sent_at_ms: float = 0.0
    deliveries: int = 0
    duplicated: int = 0
    redelivered: int = 0
    ack_failed: bool = False


class Ledger:
    """What one run sent and what came back; :meth:`report` reconciles the two."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._entries: dict[int, _Entry] = {}
        self._outstanding = 0  # confirmed, must arrive, not arrived yet
        self.stale = 0
        self.consume_errors = 0
        self._latency: dict[str, list[float]] = {"plain": [], "tx": []}
        self._lateness: dict[str, list[float]] = {"receive": [], "release": []}

    @property
    def sent(self) -> int:
        """Messages whose send has gone out."""
        return len(self._entries)

    @property
    def awaited(self) -> int:
        """Confirmed messages that must arrive and have not yet."""
        return self._outstanding

    def properties(self, seq: int, kind: Kind) -> dict[str, str]:
        return {PROP_RUN: self.run_id, PROP_KIND: kind, PROP_SEQ: str(seq)}

    def _entry(self, seq: int, kind: Kind) -> _Entry:
        entry = self._entries.get(seq)
        if entry is None:
            entry = self._entries[seq] = _Entry(kind)
        return entry

    def sending(self, seq: int, kind: Kind, now_ms: float) -> None:
        """The call that decides the message's fate (send, commit, rollback) goes out now."""
        self._entry(seq, kind).sent_at_ms = now_ms

    def confirmed(self, seq: int, kind: Kind, msg_id: str) -> None:
        entry = self._entry(seq, kind)
        entry.state, entry.msg_id = "confirmed", msg_id
        if kind in DELIVERABLE and not entry.deliveries:
            self._outstanding += 1

    def failed(self, seq: int, kind: Kind, msg_id: str = "") -> None:
        """The outcome is unknown: the message may or may not be (or become) visible."""
        entry = self._entry(seq, kind)
        entry.state, entry.msg_id = "failed", msg_id or entry.msg_id

    @property
    def outstanding(self) -> int:
        """Messages confirmed that must arrive and have not yet."""
        return self._outstanding

    def received(
        self, msg_id: str, properties: Mapping[str, str], attempt: int, now_ms: float
    ) -> int | None:
        """One delivery; returns its sequence number, or None for a delivery of another run."""
        seq = self._seq_of(properties)
        if seq is None:
            self.stale += 1
            return None
        entry = self._entries[seq]
        entry.msg_id = entry.msg_id or msg_id
        entry.deliveries += 1
        if entry.deliveries > 1:
            if attempt > 1 or entry.ack_failed:
                entry.redelivered += 1
            else:
                entry.duplicated += 1
            return seq
        if entry.state == "confirmed" and entry.kind in DELIVERABLE:
            self._outstanding -= 1
        self._time_first_delivery(entry, properties, now_ms)
        return seq

    def _seq_of(self, properties: Mapping[str, str]) -> int | None:
        if properties.get(PROP_RUN) != self.run_id:
            return None
        try:
            seq = int(properties.get(PROP_SEQ, ""))
        except ValueError:
            return None
        return seq if seq in self._entries else None

    def _time_first_delivery(
        self, entry: _Entry, properties: Mapping[str, str], now_ms: float
    ) -> None:
        if entry.kind in self._latency and entry.sent_at_ms:
            self._latency[entry.kind].append(now_ms - entry.sent_at_ms)
        if entry.kind != "delayed":
            return
        try:
            deliver_at = int(properties[PROP_DELIVER_AT])
        except (KeyError, ValueError):
            return
        self._lateness["receive"].append(now_ms - deliver_at)
        released = properties.get(PROP_RELEASED_AT, "")
        if released.isdigit():
            self._lateness["release"].append(float(int(released) - deliver_at))

    def ack_failed(self, seq: int) -> None:
        """Our ack of this message failed: a later redelivery is expected, not a duplicate."""
        self._entries[seq].ack_failed = True

    def report(self, *, started_at_ms: int, duration_s: float, rate: float) -> ProbeReport:
        counts: dict[Kind, dict[str, int]] = {k: dict.fromkeys(_COUNT_FIELDS, 0) for k in KINDS}
        samples: dict[str, list[str]] = {"lost": [], "duplicated": [], "unexpected": []}
        for entry in self._entries.values():
            c = counts[entry.kind]
            for problem in _tally(entry, c):
                if len(samples[problem]) < SAMPLE_IDS:
                    samples[problem].append(entry.msg_id)
        return ProbeReport(
            run_id=self.run_id,
            started_at_ms=started_at_ms,
            duration_s=duration_s,
            rate=rate,
            kinds={k: KindCounts(**c) for k, c in counts.items()},
            latency_ms={k: Percentiles.of(v) for k, v in self._latency.items()},
            lateness_ms={k: Percentiles.of(v) for k, v in self._lateness.items()},
            stale=self.stale,
            consume_errors=self.consume_errors,
            samples={k: tuple(v) for k, v in samples.items() if v},
        )


_COUNT_FIELDS = tuple(KindCounts.__dataclass_fields__)


def _tally(entry: _Entry, c: dict[str, int]) -> list[str]:
    """Add one entry to its kind's counts; returns the problems it shows."""
    problems = []
    c["received"] += entry.deliveries > 0
    c["redelivered"] += entry.redelivered
    if entry.duplicated:
        c["duplicated"] += entry.duplicated
        problems.append("duplicated")
    if entry.state == "failed":
        c["errors"] += 1
        return problems
    if entry.state != "confirmed":  # never decided: cut off before its answer
        return problems
    c["sent"] += 1
    if entry.kind not in DELIVERABLE and entry.deliveries:
        c["unexpected"] += 1
        problems.append("unexpected")
    elif entry.kind in DELIVERABLE and not entry.deliveries:
        c["lost"] += 1
        problems.append("lost")
    return problems


# --------------------------------------------------------------------------------------------
# The probe: the IO around the ledger.


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeConfig:
    topic: str = "tempomq-probe"
    group: str = "tempomq-probe"
    #: Producer group of the probe's transactions; check-backs are answered from the kind.
    producer_group: str = "tempomq-probe"
    delay_min_ms: int = 100
    delay_max_ms: int = 2000
    #: After the last send: the longest delay plus this at most, for the last arrivals.
    grace_ms: int = 5000
    #: Once everything arrived: this long more, for duplicates and rolled-back arrivals.
    settle_ms: int = 1000
    consumers: int = 2
    #: Sends out at once; a slow server lowers the rate rather than growing a queue.
    max_in_flight: int = 32
    #: Longer than a run's tail, so a slow ack does not turn into a redelivery mid-run.
    invisible_ms: int = 60_000

    def __post_init__(self) -> None:
        if not 0 <= self.delay_min_ms <= self.delay_max_ms:
            raise ValueError("delays must satisfy 0 <= delay_min_ms <= delay_max_ms")
        if min(self.consumers, self.max_in_flight) < 1:
            raise ValueError("consumers and max_in_flight must be at least 1")
        if min(self.grace_ms, self.settle_ms) < 0:
            raise ValueError("grace_ms and settle_ms must not be negative")

    @property
    def tail_s(self) -> float:
        """Longest wait after the last send."""
        return (self.delay_max_ms + self.grace_ms + self.settle_ms) / 1000


def check_bounds(duration_s: float, rate: float) -> int:
    """The number of messages a run sends; ValueError when the run is out of bounds."""
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"rate must be above 0 and at most {MAX_RATE:g} per second")
    if duration_s <= 0:
        raise ValueError("duration must be longer than 0")
    total = max(1, round(duration_s * rate))
    if total > MAX_MESSAGES:
        raise ValueError(f"duration x rate is {total} messages; at most {MAX_MESSAGES} per run")
    return total


async def answer_check(request: CheckRequest) -> CheckAnswer:
    """A probe transaction's local outcome is its kind: any probe process can answer for any."""
    kind = request.properties.get(PROP_KIND)
    if kind == "tx":
        return "commit"
    if kind == "tx_rollback":
        return "rollback"
    return "unknown"


@dataclass(frozen=True, slots=True)
class ProbeProgress:
    """Where a run stands, as :meth:`Probe.run` reports it every ``progress_every_s``."""

    elapsed_s: float
    duration_s: float
    sent: int
    #: Confirmed sends whose message has not arrived yet.
    awaited: int

    def line(self) -> str:
        phase = "sending" if self.elapsed_s < self.duration_s else "waiting for arrivals"
        return (
            f"probe: {self.elapsed_s:.0f} s of {self.duration_s:g} s ({phase}): "
            f"{self.sent} sent, {self.awaited} not received yet"
        )


class Probe:
    """One probe against ``client``'s service. :meth:`run` may be called again for a new run."""

    def __init__(
        self,
        client: Client,
        config: ProbeConfig | None = None,
        *,
        rng: random.Random | None = None,
        clock_ms: Callable[[], float] = wall_ms,
    ) -> None:
        self.client = client
        self.config = config or ProbeConfig()
        self._rng = rng or random.Random()
        self._clock_ms = clock_ms

    async def run(
        self,
        duration_s: float,
        rate: float,
        *,
        progress: Callable[[ProbeProgress], None] | None = None,
        progress_every_s: float = 5.0,
    ) -> ProbeReport:
        """Send for ``duration_s`` at ``rate`` messages/s, receive, reconcile. Bounded: it
        returns at the latest ``duration_s`` + the slowest send + ``config.tail_s`` later.
        ``progress`` is called every ``progress_every_s`` until then."""
        total = check_bounds(duration_s, rate)
        await self._prepare()
        ledger = Ledger(secrets.token_hex(8))
        started_at_ms = int(self._clock_ms())
        stop = asyncio.Event()
        checks = TransactionalProducer(self.client, self.config.producer_group, check=answer_check)
        checks.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                for _ in range(self.config.consumers):
                    tasks.create_task(self._consume(ledger, stop))
                loop = asyncio.get_running_loop()
                began = loop.time()
                if progress is not None:
                    report = functools.partial(_progress, ledger, loop, began, duration_s, progress)
                    tasks.create_task(_every(progress_every_s, stop, report))
                await self._produce(ledger, total, duration_s, rate)
                sending_s = loop.time() - began
                await self._await_arrivals(ledger)
                stop.set()
        finally:
            await checks.stop()
        return ledger.report(started_at_ms=started_at_ms, duration_s=sending_s, rate=rate)

    async def _prepare(self) -> None:
        cfg = self.config
        try:
            await self.client.get_topic(cfg.topic)
        except NotFound:
            with contextlib.suppress(TopicExists):  # another probe was first
                await self.client.create_topic(cfg.topic, queues=4)
        with contextlib.suppress(GroupExists):
            await self.client.create_group(cfg.group)

    # -- sending --------------------------------------------------------------------------

    async def _produce(self, ledger: Ledger, total: int, duration_s: float, rate: float) -> None:
        loop = asyncio.get_running_loop()
        interval_s = 1.0 / rate
        start = loop.time()
        deadline = start + duration_s
        slots = asyncio.Semaphore(self.config.max_in_flight)
        sends: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            sends.discard(task)
            slots.release()

        try:
            for seq in range(total):
                now = loop.time()
                target = start + seq * interval_s
                if now - target > MAX_CATCH_UP_S:
                    start = now - seq * interval_s  # behind: drop the backlog, keep the pace
                elif target > now:
                    await asyncio.sleep(target - now)
                await slots.acquire()
                if loop.time() > deadline + MAX_CATCH_UP_S:
                    slots.release()
                    break  # a slow server: stop near on time rather than send the rest late
                task = asyncio.create_task(self._send(ledger, seq, MIX[seq % len(MIX)]))
                sends.add(task)
                task.add_done_callback(done)
            if sends:
                await asyncio.gather(*sends)
        finally:
            for task in list(sends):
                task.cancel()

    async def _send(self, ledger: Ledger, seq: int, kind: Kind) -> None:
        props = ledger.properties(seq, kind)
        body = f"tempomq probe {ledger.run_id} #{seq} {kind}"
        msg_id = ""
        try:
            if kind in ("plain", "delayed"):
                delay = None
                if kind == "delayed":
                    delay = self._rng.randint(self.config.delay_min_ms, self.config.delay_max_ms)
                ledger.sending(seq, kind, self._clock_ms())
                sent = await self.client.send(
                    self.config.topic, body, properties=props, delay_ms=delay
                )
                msg_id = sent.msg_id
            else:
                tx = await self.client.prepare_transaction(
                    self.config.topic,
                    OutgoingMessage(body, properties=props),
                    producer_group=self.config.producer_group,
                )
                msg_id = tx.msg_id
                ledger.sending(seq, kind, self._clock_ms())
                if kind == "tx":
                    await self.client.commit_transaction(tx)
                else:
                    await self.client.rollback_transaction(tx)
        except TempoClientError as e:
            # Per message at debug: an outage would flood; the report counts them as errors.
            log.debug("probe send #%d (%s) failed: %s", seq, kind, e)
            ledger.failed(seq, kind, msg_id)
        else:
            ledger.confirmed(seq, kind, msg_id)

    # -- receiving ------------------------------------------------------------------------

    async def _consume(self, ledger: Ledger, stop: asyncio.Event) -> None:
        cfg = self.config
        size, wait_ms = RECEIVE_BATCH, RECEIVE_WAIT_MS
        while not stop.is_set():
            try:
                batch = await self.client.receive(
                    cfg.topic,
                    cfg.group,
                    max_messages=size,
                    wait_ms=wait_ms,
                    invisible_ms=cfg.invisible_ms,
                )
            except TempoClientError as e:
                if isinstance(e, BadRequest) and (size > 1 or wait_ms):
                    # Above the server's --max-receive-batch or --max-wait: ask for less.
                    size, wait_ms = (size // 2, wait_ms) if size > 1 else (1, 0)
                    continue
                ledger.consume_errors += 1
                log.debug("probe receive failed: %s", e)
                await asyncio.sleep(0.2)
                continue
            if batch:
                await self._account(ledger, batch)

    async def _account(self, ledger: Ledger, batch: Sequence[ReceivedMessage]) -> None:
        now = self._clock_ms()
        seqs = [ledger.received(m.msg_id, m.properties, m.delivery_attempt, now) for m in batch]
        try:
            await self.client.ack(self.config.topic, self.config.group, batch)
        except TempoClientError as e:
            ledger.consume_errors += 1
            log.debug("probe ack of %d messages failed: %s", len(batch), e)
            for seq in seqs:
                if seq is not None:
                    ledger.ack_failed(seq)

    async def _await_arrivals(self, ledger: Ledger) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (cfg.delay_max_ms + cfg.grace_ms) / 1000
        while ledger.outstanding and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(cfg.settle_ms / 1000)


# --------------------------------------------------------------------------------------------
# Prometheus export and the schedule.


class ProbeMetrics:
    """Gauges of the last probe run (and a counter of runs), registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def per_kind(name: str, doc: str) -> Gauge:
            return Gauge(f"tempomq_probe_{name}", doc, ["kind"], registry=registry)

        self.counts = {
            "sent": per_kind("sent", "Probe messages the server confirmed, last run"),
            "received": per_kind("received", "Distinct probe messages received, last run"),
            "lost": per_kind("lost", "Probe messages confirmed and never received, last run"),
            "duplicated": per_kind(
                "duplicated", "Probe messages received again without a redelivery, last run"
            ),
            "redelivered": per_kind(
                "redelivered", "Announced redeliveries of probe messages, last run"
            ),
            "unexpected": per_kind(
                "unexpected", "Rolled-back probe messages that were delivered, last run"
            ),
            "errors": per_kind("errors", "Probe sends with an unknown outcome, last run"),
        }
        self.latency = Gauge(
            "tempomq_probe_latency_seconds",
            "Probe send (or commit) to receive, last run",
            ["kind", "quantile"],
            registry=registry,
        )
        self.lateness = Gauge(
            "tempomq_probe_lateness_seconds",
            "Delayed probe messages: receive (measure=receive) or release (measure=release) "
            "minus DELIVER_AT, last run",
            ["measure", "quantile"],
            registry=registry,
        )
        self.ok = Gauge(
            "tempomq_probe_ok",
            "1 when the last probe run found no loss, duplicate or unexpected delivery",
            registry=registry,
        )
        # NaN until a run ends: a fresh 0 would read as "failed" to an alert on == 0.
        self.ok.set(math.nan)
        self.last_run = Gauge(
            "tempomq_probe_last_run_timestamp_seconds",
            "When the last probe run started",
            registry=registry,
        )
        self.runs = Counter(
            "tempomq_probe_runs",
            "Probe runs by result: ok, failed, error",
            ["result"],
            registry=registry,
        )

    def publish(self, report: ProbeReport) -> None:
        for kind, counts in report.kinds.items():
            values = asdict(counts)
            for name, gauge in self.counts.items():
                gauge.labels(kind=kind).set(values[name])
        for label, gauge, series in (
            ("kind", self.latency, report.latency_ms),
            ("measure", self.lateness, report.lateness_ms),
        ):
            for key, pct in series.items():
                for quantile, attr in Percentiles.QUANTILES:
                    # NaN (no samples) replaces the last run's figure rather than keeping it.
                    value = getattr(pct, attr) / 1000
                    gauge.labels(**{label: key, "quantile": quantile}).set(value)
        self.ok.set(1 if report.ok else 0)
        self.last_run.set(report.started_at_ms / 1000)
        self.runs.labels(result="ok" if report.ok else "failed").inc()


@functools.cache
def default_metrics() -> ProbeMetrics:
    """The probe's metrics in the default registry (what the server's ``/metrics`` shows)."""
    return ProbeMetrics()


def publish_report(report: ProbeReport, metrics: ProbeMetrics | None = None) -> None:
    """Export ``report`` as the ``tempomq_probe_*`` gauges (the default registry unless given)."""
    (metrics or default_metrics()).publish(report)


class ProbeSchedule:
    """Runs a probe every ``interval_s`` (start to start; never two at once) and publishes each
    report. The owner calls :meth:`start` within its event loop and awaits :meth:`stop`.

    ``endpoints`` is where the service answers, e.g. the server's own listening address: the
    probe goes through HTTP and the SDK like any client, so it checks the whole path.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        interval_s: float,
        duration_s: float,
        rate: float,
        config: ProbeConfig | None = None,
        metrics: ProbeMetrics | None = None,
        first_delay_s: float | None = None,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        check_bounds(duration_s, rate)
        # "" rather than None: the probe must not pick up a TEMPOMQ_TOKEN meant for others.
        self._token = token or ""
        self._ssl_context = ssl_context
        if interval_s <= 0:
            raise ValueError("interval_s must be above 0")
        self.endpoints = endpoints
        self.interval_s = interval_s
        self.duration_s = duration_s
        self.rate = rate
        self.config = config or ProbeConfig()
        # Resolved now, so the metrics exist (empty) from the start, not from the first run.
        self._metrics = metrics or default_metrics()
        self._first_delay_s = interval_s if first_delay_s is None else first_delay_s
        self._task: asyncio.Task[None] | None = None
        self.last_report: ProbeReport | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the probe schedule is already running")
        self._task = asyncio.create_task(self._loop(), name="probe schedule")

    async def stop(self) -> None:
        """Stop, cutting a run short (its report is dropped)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        # A bound per run: every call is bounded, this only guards against a wedged server.
        limit_s = self.duration_s + self.config.tail_s + 60
        async with Client(
            self.endpoints,
            timeout_s=10,
            retries=2,
            token=self._token,
            ssl_context=self._ssl_context,
        ) as client:
            await asyncio.sleep(self._first_delay_s)
            while True:
                began = loop.time()
                await self._run_once(client, limit_s)
                await asyncio.sleep(max(0.0, began + self.interval_s - loop.time()))

    async def _run_once(self, client: Client, limit_s: float) -> None:
        metrics = self._metrics
        try:
            async with asyncio.timeout(limit_s):
                report = await Probe(client, self.config).run(self.duration_s, self.rate)
        except Exception as e:  # the schedule outlives a failed run; it is counted and logged
            metrics.runs.labels(result="error").inc()
            log.warning("probe run could not complete: %r", e)
            return
        self.last_report = report
        metrics.publish(report)
        t = report.total
        summary = (
            f"probe run {report.run_id}: {t.sent} sent, {t.received} received, {t.errors} "
            f"errors, {report.consume_errors} failed receives/acks"
        )
        if report.ok:
            log.info("%s: ok", summary)
        else:
            log.error("%s: %s", summary, ", ".join(report.problems()))


def _progress(
    ledger: Ledger,
    loop: asyncio.AbstractEventLoop,
    began: float,
    duration_s: float,
    report: Callable[[ProbeProgress], None],
) -> None:
    report(ProbeProgress(loop.time() - began, duration_s, ledger.sent, ledger.awaited))


async def _every(interval_s: float, stop: asyncio.Event, call: Callable[[], None]) -> None:
    """``call()`` every ``interval_s`` until ``stop`` is set."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()
        if stop.is_set():
            return
        call()
