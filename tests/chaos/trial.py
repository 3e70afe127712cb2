"""One crash trial: a real ``tempomq serve --flush sync`` under load, killed with SIGKILL at a
random moment, restarted on the same data directory and drained; the events go into a
:class:`~tests.chaos.ledger.Ledger` for :func:`~tests.chaos.ledger.judge`.

The load, all of it running when the kill comes:

- producers send batches of 1-5 messages, each with its own client ``msg_id``, a quarter of
  them delayed by up to a few seconds; a batch answered with an error is sent again with the
  same ids, and one the kill left unanswered is sent again after the restart, as an SDK would;
- two consumer groups, both created by their first receive (the server runs with
  ``--max-attempts 3`` and a short backoff): ``work`` acks most messages, nacks some with a
  ``retry_after_ms`` and some without, and leaves some to time out; ``poison`` acks all but a
  fifth of the messages, which it nacks every time, so they end in ``%DLQ%poison``.

After the restart the same consumers go on until each group has finished every acknowledged
message (acked it, or seen it in its DLQ), or a guard time has passed; then fresh ``audit``
groups read the topic and the DLQs from the start. Every choice comes from the trial's seed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from tests.chaos.ledger import Delivery, Ledger, Nack, finished
from tests.e2e.server import Server, call, drain

TOPIC = "chaos"
GROUPS = ("work", "poison")
#: CHAOS_FLUSH=async runs the trials in async flush mode, whose promise under kill -9 is the
#: same (the OS has every acknowledged byte); sync is the default.
FLUSH = os.environ.get("CHAOS_FLUSH", "sync")
SERVER_ARGS = (
    "--flush", FLUSH, "--segment-bytes", "8MiB", "--max-attempts", "3",
    "--backoff", "100ms,200ms", "--log-level", "warning",
)  # fmt: skip
INVISIBLE_MS = 1500
#: Only ends a trial that would otherwise never finish (trials take 10-20 s on two busy
#: cores); what is unfinished then counts as lost.
FINISH_GUARD_S = 240.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Plan:
    """What a trial does, all drawn from its seed."""

    seed: int
    producers: int = 3
    consumers_per_group: int = 2
    delayed_share: float = 0.25
    max_delay_ms: int = 3000
    #: The kill comes this long after the load started.
    kill_after_s: tuple[float, float] = (0.2, 2.5)


@dataclass(slots=True)
class _Run:
    plan: Plan
    ledger: Ledger
    rng: random.Random
    #: Batches whose answer the kill took: sent again, same ids, after the restart.
    unanswered: list[list[dict[str, Any]]] = field(default_factory=list)
    #: msg_ids each group saw in its DLQ while running.
    dead_seen: dict[str, Counter[str]] = field(
        default_factory=lambda: {g: Counter() for g in GROUPS}
    )

    def choice(self, *parts: object) -> int:
        """A number in 0..99 fixed by the seed and ``parts`` (a consumer's decision)."""
        text = "/".join(map(str, (self.plan.seed, *parts)))
        return hashlib.blake2b(text.encode(), digest_size=2).digest()[0] * 100 // 256

    def finished(self) -> bool:
        return all(
            finished(self.ledger, group, m, self.dead_seen[group])
            for group in GROUPS
            for m in self.ledger.acknowledged
        )


def _topic_url(base: str, topic: str) -> str:
    return f"{base}/v1/topics/{quote(topic, safe='')}"


# -- producers ------------------------------------------------------------------------------------


def _new_batch(run: _Run) -> list[dict[str, Any]]:
    batch = []
    for _ in range(run.rng.randint(1, 5)):
        msg_id = run.rng.randbytes(16).hex()
        msg: dict[str, Any] = {"msg_id": msg_id, "body": msg_id}
        if run.rng.random() < run.plan.delayed_share:
            msg["deliver_at"] = now_ms() + run.rng.randint(200, run.plan.max_delay_ms)
        batch.append(msg)
    return batch


async def _send(session: aiohttp.ClientSession, base: str, run: _Run, batch: list[Any]) -> None:
    """Send until answered 201 (a 5xx answer: again, same ids); ClientError when the server
    is gone."""
    while True:
        async with session.post(
            f"{_topic_url(base, TOPIC)}/messages", json={"messages": batch}
        ) as r:
            if r.status == 201:
                for m in batch:
                    run.ledger.acknowledged[m["msg_id"]] = m.get("deliver_at")
                return
            if r.status < 500:  # the request is wrong: sending it again would not help
                raise AssertionError(f"send answered {r.status}: {await r.text()}")
            await r.read()
        await asyncio.sleep(0.05)


async def _producer(
    session: aiohttp.ClientSession, base: str, run: _Run, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        batch = _new_batch(run)
        try:
            await _send(session, base, run, batch)
        except (aiohttp.ClientError, TimeoutError):
            run.unanswered.append(batch)
            return


# -- consumers ------------------------------------------------------------------------------------


def _prop_ms(msg: dict[str, Any], name: str) -> int | None:
    value = (msg.get("properties") or {}).get(name)
    return None if value is None else int(value)


async def _handle(
    session: aiohttp.ClientSession, url: str, run: _Run, group: str, msgs: list[Any]
) -> None:
    """Act on one received batch as the group's policy says; record what was confirmed."""
    to_ack: dict[str, str] = {}
    for m in msgs:
        msg_id, attempt = m["msg_id"], m["delivery_attempt"]
        pick = run.choice(group, msg_id) if group == "poison" else run.choice(msg_id, attempt)
        if group == "poison":
            action = "nack" if pick < 20 else "ack"
        else:
            action = "ack" if pick < 70 else "nack" if pick < 95 else "ignore"
        if action == "ack":
            to_ack[m["receipt"]] = msg_id
        elif action == "nack":
            retry_after = 100 + 10 * run.choice("retry", msg_id, attempt) if pick % 2 else None
            body: dict[str, Any] = {"receipt": m["receipt"]}
            if retry_after is not None:
                body["retry_after_ms"] = retry_after
            sent = now_ms()
            status, _ = await call(session, "POST", f"{url}/nack", body)
            if status == 200:
                run.ledger.nacks.append(Nack(group, msg_id, sent, retry_after))
    if to_ack:
        try:
            status, data = await call(session, "POST", f"{url}/ack", {"receipts": list(to_ack)})
        except (aiohttp.ClientError, TimeoutError):
            run.ledger.unsure_acks.update((group, m) for m in to_ack.values())
            raise
        answered = now_ms()
        if status == 200:
            failed = {f["receipt"] for f in data.get("failed", [])}
            for receipt, msg_id in to_ack.items():
                if receipt not in failed:
                    run.ledger.ack(group, msg_id, answered)


async def _receive_once(session: aiohttp.ClientSession, url: str, run: _Run, group: str) -> None:
    body = {"max_messages": 16, "wait_ms": 200, "invisible_ms": INVISIBLE_MS}
    requested = now_ms()
    status, data = await call(session, "POST", f"{url}/receive", body)
    answered = now_ms()
    if status != 200:
        await asyncio.sleep(0.05)
        return
    msgs = data["messages"]
    run.ledger.deliveries.extend(
        Delivery(
            group,
            m["msg_id"],
            m["delivery_attempt"],
            requested,
            answered,
            _prop_ms(m, "DELIVER_AT"),
            _prop_ms(m, "RELEASED_AT"),
        )
        for m in msgs
    )
    await _handle(session, url, run, group, msgs)


async def _watch_dlq_once(session: aiohttp.ClientSession, url: str, run: _Run, group: str) -> None:
    status, data = await call(
        session, "POST", f"{url}/receive", {"max_messages": 100, "wait_ms": 200}
    )
    if status != 200:  # no such topic yet: nothing was dead-lettered
        await asyncio.sleep(0.1)
        return
    run.dead_seen[group].update(m["msg_id"] for m in data["messages"])
    if data["messages"]:
        receipts = [m["receipt"] for m in data["messages"]]
        await call(session, "POST", f"{url}/ack", {"receipts": receipts})


Step = Callable[[aiohttp.ClientSession, str, _Run, str], Awaitable[None]]


async def _repeat(
    step: Step,
    session: aiohttp.ClientSession,
    url: str,
    run: _Run,
    group: str,
    stop: asyncio.Event,
    *,
    until_error: bool,
) -> None:
    """Run ``step`` until ``stop``; with ``until_error``, also until a call fails (the kill
    came). Otherwise a failed call (a slow machine's timeout) is only tried again: after the
    restart a consumer that gave up would leave its group unfinished."""
    while not stop.is_set():
        try:
            await step(session, url, run, group)
        except (aiohttp.ClientError, TimeoutError):
            if until_error:
                return
            await asyncio.sleep(0.1)


def _consumers(
    session: aiohttp.ClientSession,
    base: str,
    run: _Run,
    stop: asyncio.Event,
    *,
    until_error: bool,
) -> list[asyncio.Task[None]]:
    return [
        asyncio.create_task(
            _repeat(
                _receive_once,
                session,
                f"{_topic_url(base, TOPIC)}/groups/{group}",
                run,
                group,
                stop,
                until_error=until_error,
            )
        )
        for group in GROUPS
        for _ in range(run.plan.consumers_per_group)
    ]


# -- the trial ------------------------------------------------------------------------------------


async def _load_until_killed(server: Server, run: _Run) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        status, data = await call(
            session, "POST", f"{server.url}/v1/topics", {"name": TOPIC, "queues": 4}
        )
        assert status == 201, data
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(_producer(session, server.url, run, stop))
            for _ in range(run.plan.producers)
        ]
        tasks += _consumers(session, server.url, run, stop, until_error=True)
        await asyncio.sleep(run.rng.uniform(*run.plan.kill_after_s))
        server.kill()
        stop.set()
        await asyncio.gather(*tasks)


async def _finish_after_restart(server: Server, run: _Run) -> None:
    timeout = aiohttp.ClientTimeout(total=120)  # no crash now: a slow answer is no failure
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for batch in run.unanswered:  # as a client would: again, same ids, until answered
            while True:
                try:
                    await _send(session, server.url, run, batch)
                    break
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.1)
        stop = asyncio.Event()
        tasks = _consumers(session, server.url, run, stop, until_error=False)
        tasks += [
            asyncio.create_task(
                _repeat(
                    _watch_dlq_once,
                    session,
                    f"{_topic_url(server.url, f'%DLQ%{group}')}/groups/dlq-watch",
                    run,
                    group,
                    stop,
                    until_error=False,
                )
            )
            for group in GROUPS
        ]
        deadline = time.monotonic() + FINISH_GUARD_S
        while not run.finished():
            if time.monotonic() >= deadline:
                run.ledger.gave_up_waiting = True
                break
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        run.ledger.stored = await _audit(session, server.url, TOPIC)
        for group in GROUPS:
            run.ledger.dead[group] = await _audit(session, server.url, f"%DLQ%{group}")


async def _audit(session: aiohttp.ClientSession, base: str, topic: str) -> Counter[str]:
    """msg_id -> copies in ``topic``, read from the start by a group that never read it."""
    status, _ = await call(session, "GET", _topic_url(base, topic))
    if status == 404:
        return Counter()
    got = await drain(session, base, quote(topic, safe=""), "audit")
    return Counter(m["msg_id"] for m in got)


async def run_trial(data_dir: Path, plan: Plan) -> Ledger:
    """Run one trial in ``data_dir`` (which must not exist yet); returns what it saw."""
    run = _Run(plan, Ledger(groups=GROUPS), random.Random(plan.seed))
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = Server(data_dir, *SERVER_ARGS)
    try:
        server.start()
        await _load_until_killed(server, run)
        server.start()
        await _finish_after_restart(server, run)
        code = server.terminate()
        assert code == 0, f"exit code {code} at SIGTERM: {server.log()}"
    finally:
        server.ensure_stopped()
    return run.ledger
