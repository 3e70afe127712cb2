"""The bookkeeping of a crash trial: what clients saw, and what of it the server broke.

Pure: the trial driver (:mod:`tests.chaos.trial`) records events with the times its own clock
read (epoch ms, the server's clock too: same machine) and the final audit of what is stored;
:func:`judge` turns them into :class:`Counts`. Every check only counts what is certain from the
client's side, so a slow machine cannot produce a false count:

- **lost**: an acknowledged send (``201``) whose ``msg_id`` is not in the topic after the
  restart, or that a working group never finished (acked, or dead-lettered into its DLQ). An
  ack the kill left unanswered may have been applied: its message counts as finished.
- **duplicated**: a ``msg_id`` stored in the topic more than once (a retried send, a release
  after a crash, ...), acknowledged or not.
- **early**: a delayed message in a response that came back before its ``deliver_at``, a
  release stamped before its time (``RELEASED_AT`` < ``DELIVER_AT``), or a redelivery answered
  before the ``retry_after_ms`` of the confirmed nack before it had passed since that nack was
  sent.
- **delivered after ack**: a delivery to a group of a message whose ack that group had
  confirmed before the receive was sent.
- **attempt resets**: a redelivery to a group whose ``delivery_attempt`` is not above that of
  an earlier delivery of the message to the group (each delivery is a new attempt, crash or
  not).
- **DLQ duplicates**: a ``msg_id`` more than once in a ``%DLQ%<group>`` topic.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields


@dataclass(frozen=True, slots=True)
class Delivery:
    group: str
    msg_id: str
    attempt: int
    #: When the receive was sent and when its answer arrived, by the client's clock.
    requested_ms: int
    answered_ms: int
    #: The DELIVER_AT and RELEASED_AT properties of a released delayed message.
    deliver_at_prop_ms: int | None = None
    released_at_prop_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Nack:
    group: str
    msg_id: str
    requested_ms: int
    retry_after_ms: int | None


@dataclass(slots=True)
class Ledger:
    """Everything one trial saw. Only confirmed acks and nacks are recorded."""

    #: msg_id -> deliver_at (None: not delayed) of every send answered 201.
    acknowledged: dict[str, int | None] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    #: (group, msg_id) -> when the first confirmed ack of it was answered.
    acked: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (group, msg_id) of acks sent whose answer the kill took: the server may have applied
    #: them, so the message may rightly never come back; neither lost nor confirmed.
    unsure_acks: set[tuple[str, str]] = field(default_factory=set)
    nacks: list[Nack] = field(default_factory=list)
    #: The working groups, each of which must finish every acknowledged message.
    groups: tuple[str, ...] = ()
    #: The audit after the restart: msg_id -> copies in the topic, and per group in its DLQ.
    stored: Counter[str] = field(default_factory=Counter)
    dead: dict[str, Counter[str]] = field(default_factory=dict)
    #: The groups had not finished when the trial stopped waiting for them.
    gave_up_waiting: bool = False

    def ack(self, group: str, msg_id: str, answered_ms: int) -> None:
        self.acked.setdefault((group, msg_id), answered_ms)


@dataclass(slots=True)
class Counts:
    trials: int = 0
    acknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    early: int = 0
    delivered_after_ack: int = 0
    attempt_resets: int = 0
    dlq_duplicates: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def failures(self) -> dict[str, int]:
        """The non-zero counts of things that must never happen."""
        ok = {"trials", "acknowledged"}
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ok and getattr(self, f.name)
        }

    def table(self) -> str:
        rows = [(f.name.replace("_", " "), str(getattr(self, f.name))) for f in fields(self)]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows)


def judge(ledger: Ledger) -> Counts:
    """The counts of one trial."""
    return Counts(
        trials=1,
        acknowledged=len(ledger.acknowledged),
        lost=len(lost(ledger)),
        duplicated=sum(1 for n in ledger.stored.values() if n > 1),
        early=len(early(ledger)),
        delivered_after_ack=len(delivered_after_ack(ledger)),
        attempt_resets=len(attempt_resets(ledger)),
        dlq_duplicates=sum(1 for dead in ledger.dead.values() for n in dead.values() if n > 1),
    )


def lost(ledger: Ledger) -> set[str]:
    missing = {m for m in ledger.acknowledged if ledger.stored[m] == 0}
    for group in ledger.groups:
        dead = ledger.dead.get(group, Counter())
        missing.update(m for m in ledger.acknowledged if not finished(ledger, group, m, dead))
    return missing


def finished(ledger: Ledger, group: str, msg_id: str, dead: Counter[str]) -> bool:
    """Acked by ``group`` (or an ack the kill left unanswered), or in its DLQ ``dead``."""
    key = (group, msg_id)
    return key in ledger.acked or key in ledger.unsure_acks or dead[msg_id] > 0


def early(ledger: Ledger) -> list[Delivery]:
    found = []
    # The confirmed nack just before each delivery, per message and group. A nack is sent after
    # the answer that delivered what it nacks, so deliveries go by their answer's time.
    by_message: dict[tuple[str, str], list[tuple[int, int, Delivery | Nack]]] = defaultdict(list)
    for d in ledger.deliveries:
        by_message[(d.group, d.msg_id)].append((d.answered_ms, 0, d))
    for n in ledger.nacks:  # at the same ms, the delivery came first (it is what was nacked)
        by_message[(n.group, n.msg_id)].append((n.requested_ms, 1, n))
    for (_group, msg_id), events in by_message.items():
        deliver_at = ledger.acknowledged.get(msg_id)
        last_nack: Nack | None = None
        for _t, _kind, event in sorted(events, key=lambda e: (e[0], e[1])):
            if isinstance(event, Nack):
                last_nack = event
                continue
            if (
                (deliver_at is not None and event.answered_ms < deliver_at)
                or (
                    event.deliver_at_prop_ms is not None
                    and event.released_at_prop_ms is not None
                    and event.released_at_prop_ms < event.deliver_at_prop_ms
                )
                or (
                    last_nack is not None
                    and last_nack.retry_after_ms is not None
                    and event.answered_ms < last_nack.requested_ms + last_nack.retry_after_ms
                )
            ):
                found.append(event)
            last_nack = None
    return found


def delivered_after_ack(ledger: Ledger) -> list[Delivery]:
    return [
        d
        for d in ledger.deliveries
        if (acked := ledger.acked.get((d.group, d.msg_id))) is not None and d.requested_ms > acked
    ]


def attempt_resets(ledger: Ledger) -> list[Delivery]:
    found = []
    highest: dict[tuple[str, str], int] = {}
    for d in sorted(ledger.deliveries, key=lambda d: d.answered_ms):
        key = (d.group, d.msg_id)
        before = highest.get(key)
        if before is not None and d.attempt <= before:
            found.append(d)
        highest[key] = max(d.attempt, before or 0)
    return found


def explain(ledger: Ledger, limit: int = 3) -> list[str]:
    """Up to ``limit`` examples of each broken promise, for a failing trial's report."""
    lines = (
        ["the groups never finished: the trial stopped waiting"] if ledger.gave_up_waiting else []
    )
    for m in sorted(lost(ledger))[:limit]:
        where = [f"stored {ledger.stored[m]}x"]
        where += [
            f"unfinished by {g}"
            for g in ledger.groups
            if not finished(ledger, g, m, ledger.dead.get(g, Counter()))
        ]
        lines.append(f"lost {m}: " + ", ".join(where))
        for g in ledger.groups:
            seen = [f"{x.attempt}@{x.answered_ms}" for x in _history(ledger, g, m)]
            nacks = [n.requested_ms for n in ledger.nacks if (n.group, n.msg_id) == (g, m)]
            lines.append(f"    {g}: delivered (attempt@ms) {seen}, nacked at {nacks}")
    dupes = [(m, n) for m, n in ledger.stored.items() if n > 1]
    lines += [f"duplicated {m}: stored {n}x" for m, n in dupes[:limit]]
    lines += [
        f"early {d.group} {d.msg_id} attempt {d.attempt}: answered at {d.answered_ms}, "
        f"deliver_at {ledger.acknowledged.get(d.msg_id)}, "
        f"DELIVER_AT {d.deliver_at_prop_ms} RELEASED_AT {d.released_at_prop_ms}"
        for d in early(ledger)[:limit]
    ]
    lines += [
        f"delivered after ack {d.group} {d.msg_id} attempt {d.attempt}: receive sent at "
        f"{d.requested_ms}, ack answered at {ledger.acked[(d.group, d.msg_id)]}"
        for d in delivered_after_ack(ledger)[:limit]
    ]
    for d in attempt_resets(ledger)[:limit]:
        attempts = [x.attempt for x in _history(ledger, d.group, d.msg_id)]
        lines.append(f"attempt reset {d.group} {d.msg_id}: attempts in order {attempts}")
    lines += [
        f"DLQ duplicate {g} {m}: {n} copies"
        for g, dead in ledger.dead.items()
        for m, n in list(dead.items())[:limit]
        if n > 1
    ]
    return lines


def _history(ledger: Ledger, group: str, msg_id: str) -> list[Delivery]:
    """The deliveries of ``msg_id`` to ``group``, in the order their answers came."""
    mine = [d for d in ledger.deliveries if (d.group, d.msg_id) == (group, msg_id)]
    return sorted(mine, key=lambda d: d.answered_ms)
