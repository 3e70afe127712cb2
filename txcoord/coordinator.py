"""The transaction coordinator: half messages, outcomes, check-back, delivery.

Every transaction is a row in a SQLite database in the data directory (its own thread, group
commit: see :class:`~delayserver.sqlite.SqliteRunner`). The half message lives only there, so
no consumer and no query by key can see it. A state change is one read-modify-write in one
transaction, decided by the pure table in :mod:`txcoord.states`, so concurrent commits, rollbacks
and check answers cannot both win.

Commit is decision first, effect second: the row becomes ``committed`` (durably) and only then is
the message put into its topic (or handed to the delay service when it carries a delivery time),
idempotently by ``msg_id``, and the row marked delivered. A crash in between leaves a committed,
undelivered row that the next start delivers. So a message is visible if and only if its
transaction committed, and exactly once.

Check-back: each open transaction has a timer in the service's timing wheel for its next check
(``check_immunity_ms`` after prepare, then every ``check_interval_ms``). A check asks the
producer group at its ``check_url``, or, for SDK producers, hands the request to a long poll the
producer holds open (``GET /v1/producers/{group}/checks``), or pushes it down another protocol's
stream (a :class:`CheckChannel`, e.g. RocketMQ's Telemetry), and waits ``check_timeout_ms`` for the
answer. No answer, an error or ``unknown`` counts one check; after ``check_max`` the transaction
is parked as ``check_max``, logged, listed, and still resolvable by hand. A restart re-arms every
open transaction's timer from the database.

Several nodes on one shared store (:class:`~txcoord.store.SharedTxStore`, ``--tx-store
mysql+aiomysql://…`` or ``postgresql+asyncpg://…``): any node takes any prepare, commit,
rollback and check answer, since the state is only in the database. Work that needs a node, a
check-back due or a committed message to hand over, is claimed instead of timed: every
``poll`` each node claims the due rows nobody holds (``SELECT … FOR UPDATE SKIP LOCKED``) under a
lease of ``lease_ms``, renews the leases of the work it is still doing, and lets go when done.
A node that dies stops renewing; its rows fall due at the lease's end and another node claims
them. So each check-back is asked by one node, and a committed message is handed to the broker
or delay service by one node (the put is idempotent by ``msg_id`` besides). This is the lease
scheme of :mod:`delayserver.leases` (delay shards on Redis) applied per row.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
import structlog
from prometheus_client import Counter

from broker_core.errors import StoreUnavailable
from broker_core.message import Message
from broker_core.metrics import DROPPED_MESSAGES
from broker_core.protocols import Scheduler
from broker_core.store import MessageStore
from broker_core.tasks import cancel_and_wait
from delayserver.store import decode_message, encode_message
from txcoord.checkurl import SIGNATURE_HEADER, AllowListResolver, CheckUrlPolicy
from txcoord.states import Step, TxEvent, TxState, step
from txcoord.store import (
    SharedTxStore,
    SqliteTxStore,
    TxNotFound,
    TxRow,
    TxStore,
    TxStoreUnavailable,
)

__all__ = ["Coordinator", "TxNotFound", "TxRow", "TxSettings", "TxStoreUnavailable"]

log = structlog.get_logger(__name__)

CHECKS = Counter("tempomq_tx_checks", "Check-backs asked", ["answer"])
OUTCOMES = Counter("tempomq_tx_outcomes", "Transactions finished", ["state"])

#: How many due rows one claim round takes at most.
CLAIM_BATCH = 200


class Clock(Protocol):
    def now_ms(self) -> int: ...

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> object: ...


class CheckChannel(Protocol):
    """A third way to ask producers, beside ``check_url`` and the SDK's long poll: streams the
    producers hold open in another protocol (the RocketMQ clients' Telemetry). A channel claims
    the transactions whose ``producer_group`` it recognises; a check is pushed to it and then
    counted exactly like an SDK check: the answer comes through :meth:`Coordinator.answer`,
    none within ``check_timeout_ms`` counts as unknown."""

    def claims(self, producer_group: str) -> bool: ...

    def push(self, row: TxRow, message: Message | None) -> None:
        """Hand the check of ``row`` (its half message: ``message``) to a producer; must not
        block. Nothing to hand it to is fine: the check then times out like any other."""
        ...


@dataclass(slots=True, frozen=True)
class TxSettings:
    check_immunity_ms: int = 6_000
    check_interval_ms: int = 30_000
    check_max: int = 15
    check_timeout_ms: int = 5_000
    history_ms: int = 72 * 3600_000
    check_url: CheckUrlPolicy = field(default_factory=CheckUrlPolicy)
    #: Shared stores: how long a node's claim on a row lasts unrenewed (a dead node's check-backs
    #: and deliveries move to the others within this time).
    lease_ms: int = 10_000

    @property
    def poll_ms(self) -> int:
        """Shared stores: how often a node claims due rows and renews its leases."""
        return max(50, min(1000, self.lease_ms // 5))


class Coordinator:
    def __init__(
        self,
        store: TxStore | Path,
        broker_store: MessageStore,
        scheduler: Scheduler,
        timers: Clock,
        *,
        settings: TxSettings = TxSettings(),
        sync: bool = False,
        new_msg_id: Callable[[], bytes] | None = None,
        node_id: str | None = None,
    ) -> None:
        """``store``: a :class:`TxStore`, or the path of a SQLite file (``sync``: fsync each
        commit)."""
        self.store = SqliteTxStore(store, sync=sync) if isinstance(store, Path) else store
        #: Several nodes share the store: work is claimed under leases, not timed locally.
        self.shared = isinstance(self.store, SharedTxStore)
        #: This node's name on its leases (unique per process).
        self.node_id = node_id or f"{os.uname().nodename[:40]}-{os.urandom(6).hex()}"
        self.broker_store = broker_store
        #: Ids for half messages; the delay service's, so a delayed one stays on this server.
        self.new_msg_id = broker_store.new_msg_id if new_msg_id is None else new_msg_id
        self.scheduler = scheduler
        self.timers = timers
        self.settings = settings
        #: Check requests for SDK producers, per group: not yet handed out, and handed out.
        self._asks: dict[str, dict[str, dict[str, object]]] = {}
        self._handed: dict[str, str] = {}  # tx_id -> group, while its answer is awaited
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        #: Shared stores: when each group last long-polled here; rows this node holds a lease on.
        self._polled: dict[str, int] = {}
        self._claimed: set[str] = set()
        self._delivering: set[str] = set()  # of those, committed ones being put
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._closing = False
        #: Further check channels (see :class:`CheckChannel`), wired in by the app.
        self.check_channels: list[CheckChannel] = []

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.check_timeout_ms / 1000),
            connector=aiohttp.TCPConnector(resolver=AllowListResolver(self.settings.check_url)),
        )
        if self.shared:
            self._spawn(self._claimer())
            log.info("tx.started", store=self.store.name, node=self.node_id)
        else:
            rows = await self.store.open_rows()
            now = self.timers.now_ms()
            for row in rows:
                if row.state is TxState.COMMITTED and not row.delivered:
                    self._spawn(self._deliver(row))  # decided before a crash, not yet visible
                elif row.state is TxState.PREPARED:
                    self._arm(row.tx_id, max(row.next_check_at, now))
            log.info("tx.started", open=sum(r.state is TxState.PREPARED for r in rows))
        self._spawn(self._housekeeper())

    def begin_shutdown(self) -> None:
        """Answer every producer's long poll now (empty): the server is stopping."""
        self._closing = True
        for group in list(self._waiters):
            self.wake(group)

    async def stop(self) -> None:
        self.begin_shutdown()
        await cancel_and_wait(self._tasks)
        # Check-backs awaiting an answer are let go at once rather than at the leases' end, so
        # the others ask again now. Deliveries are not: one stopped between its put and its
        # mark would be put again elsewhere; they pass on when their leases end.
        checks = self._claimed - self._delivering
        if isinstance(self.store, SharedTxStore) and checks:
            try:
                await self.store.renew(self.node_id, checks, self.timers.now_ms())
            except TxStoreUnavailable as e:
                log.warning("tx.release_failed", error=str(e))
        self._claimed.clear()
        if self._http is not None:
            await self._http.close()
        await self.store.close()

    async def health(self) -> str | None:
        """None when the transaction store takes writes (tried again after a failed one)."""
        return await self.store.health()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arm(self, tx_id: str, when_ms: int) -> None:
        if not self.shared:  # a shared store's due rows are claimed by _claimer
            self.timers.call_at(when_ms, partial(self._spawn_check, tx_id))

    def _spawn_check(self, tx_id: str) -> None:
        self._later_now(self._check, tx_id)

    def _later_now(self, fn: Callable[..., Any], *args: Any) -> None:
        """Timer callback: run coroutine function ``fn(*args)`` as an owned task."""
        if not self._closing:
            self._spawn(fn(*args))

    def _later(self, delay_ms: int, fn: Callable[..., Any], *args: Any) -> None:
        self.timers.call_at(self.timers.now_ms() + delay_ms, partial(self._later_now, fn, *args))

    # -- prepare, outcome, query -----------------------------------------------------------------

    async def prepare(
        self,
        msg: Message,
        *,
        deliver_at_ms: int,
        producer_group: str,
        check_url: str | None,
        check_immunity_ms: int | None,
    ) -> TxRow:
        """Store the half message durably; returns its transaction. Idempotent by the message's
        ``msg_id``: a prepare resent with the same id (a client retry) returns the first one."""
        if not msg.msg_id:
            msg.msg_id = self.new_msg_id()
        now = self.timers.now_ms()
        immunity = (
            self.settings.check_immunity_ms if check_immunity_ms is None else check_immunity_ms
        )
        row = TxRow(
            os.urandom(16).hex(),
            msg.msg_id,
            msg.topic,
            producer_group,
            check_url,
            TxState.PREPARED,
            0,
            now + immunity,
            deliver_at_ms,
            False,
            now,
            now,
            encode_message(msg),
            due_at=now + immunity,
        )
        first = await self.store.insert(row)
        if first is not None:
            return first
        self._arm(row.tx_id, row.next_check_at)
        return row

    async def get(self, tx_id: str) -> TxRow:
        row = await self.store.get(tx_id)
        if row is None:
            raise TxNotFound(f"no transaction {tx_id}")
        return row

    async def list_state(self, state: TxState, limit: int = 1000) -> list[TxRow]:
        return await self.list_page(state, limit=limit)

    async def list_page(
        self, state: TxState, *, limit: int, after: tuple[int, str] | None = None
    ) -> list[TxRow]:
        """Up to ``limit`` transactions in ``state``, oldest first, after the (created_at,
        tx_id) of the last one of the previous page."""
        return await self.store.list_page(state, limit=limit, after=after)

    async def count_states(self) -> dict[str, int]:
        """How many transactions are in each state (finished ones until they are purged)."""
        counts = dict.fromkeys((s.value for s in TxState), 0)
        counts.update(await self.store.count_states())
        return counts

    async def check_history(self, tx_id: str, limit: int = 100) -> list[dict[str, object]]:
        """The check-backs of ``tx_id``, oldest first: when, the answer, and who answered."""
        rows = await self.store.check_history(tx_id, limit)
        return [{"at": at, "answer": answer, "via": via} for at, answer, via in rows]

    async def _record_check(self, tx_id: str, answer: str, via: str) -> None:
        CHECKS.labels(answer).inc()
        await self.store.record_check(tx_id, self.timers.now_ms(), answer, via)

    async def commit(self, tx_id: str) -> TxRow:
        return await self._apply(tx_id, TxEvent.COMMIT)

    async def rollback(self, tx_id: str) -> TxRow:
        return await self._apply(tx_id, TxEvent.ROLLBACK)

    async def answer(self, tx_id: str, event: TxEvent) -> TxRow:
        """A producer's answer to a check-back (over the SDK's connection)."""
        self._withdraw(tx_id)
        await self._record_check(tx_id, event.value, "producer")
        return await self._apply(tx_id, event)

    async def _apply(self, tx_id: str, event: TxEvent) -> TxRow:
        return (await self._step(tx_id, event))[0]

    async def _step(self, tx_id: str, event: TxEvent) -> tuple[TxRow, Step, bool]:
        """Apply ``event``; returns the row after it, the step, and whether the row changed."""
        now = self.timers.now_ms()
        settings = self.settings
        shared = self.shared

        def run(row: TxRow) -> tuple[TxRow, Step, bool]:
            s = step(row.state, event, check_count=row.check_count, check_max=settings.check_max)
            changed = s.state is not row.state or s.check_count != row.check_count
            if changed:
                row.state, row.check_count, row.updated_at = s.state, s.check_count, now
                if s.check_again:
                    row.next_check_at = now + settings.check_interval_ms
                if s.state is TxState.ROLLED_BACK:
                    row.record = None  # nothing will ever need it
                    row.delivered = True  # nothing left to deliver either
                if shared:
                    self._lease_after(row, s, now)
            return row, s, changed

        row, s, changed = await self.store.change(tx_id, run)
        if s.deliver:
            OUTCOMES.labels("committed").inc()
            await self._deliver(row)
        elif s.state is TxState.ROLLED_BACK and event is TxEvent.ROLLBACK:
            OUTCOMES.labels("rolled_back").inc()
        if s.check_again:
            self._arm(tx_id, row.next_check_at)
        if s.state is TxState.CHECK_MAX and event is TxEvent.UNKNOWN:
            log.warning("tx.check_max", tx_id=tx_id, group=row.producer_group, checks=s.check_count)
        return row, s, changed

    def _lease_after(self, row: TxRow, s: Step, now: int) -> None:
        """Shared stores: who holds ``row`` after a state change, and when it is next due."""
        if s.deliver:  # this node hands the message over, under a lease
            row.owner, row.due_at = self.node_id, now + self.settings.lease_ms
            self._claimed.add(row.tx_id)
        elif row.state is TxState.PREPARED:  # the next check-back, by whichever node
            row.owner, row.due_at = None, row.next_check_at
        else:  # parked or finished: nothing to do
            row.owner, row.due_at = None, None

    async def _deliver(self, row: TxRow) -> None:
        """Make a committed message visible (idempotent), then record that it is."""
        assert row.record is not None
        self._delivering.add(row.tx_id)
        msg = decode_message(row.record)
        try:
            if self.broker_store.is_orphan(msg):  # its topic was deleted since the prepare
                DROPPED_MESSAGES.labels("transaction").inc()
                log.warning("tx.dropped", tx_id=row.tx_id, reason="topic_deleted")
            elif row.deliver_at > self.timers.now_ms():
                await self.scheduler.schedule([msg], [row.deliver_at])
            else:
                await self.scheduler.release_now([msg])  # the release target, idempotent
        except StoreUnavailable as e:
            # The decision is durable: try again shortly; a restart would deliver it too.
            log.error("tx.deliver_failed", tx_id=row.tx_id, error=str(e))
            self._later(1000, self._deliver, row)
            return
        await self._mark_delivered(row)

    async def _mark_delivered(self, row: TxRow, *, again: bool = False) -> None:
        try:
            await self.store.mark_delivered(row.tx_id)
        except TxStoreUnavailable as e:
            if not self.shared:
                raise  # the next start delivers it again, idempotently, into the same broker
            # Another node would hand it over again once this node's lease ran out: keep the
            # lease and retry the mark (only the mark) until the store answers.
            log.error("tx.mark_delivered_failed", tx_id=row.tx_id, error=str(e))
            self._later(1000, partial(self._mark_delivered, again=True), row)
            if not again:
                raise
            return
        row.delivered, row.record, row.owner, row.due_at = True, None, None, None
        self._claimed.discard(row.tx_id)
        self._delivering.discard(row.tx_id)

    # -- claims (shared stores) ------------------------------------------------------------------

    async def _claimer(self) -> None:
        """Every ``poll_ms``: renew this node's leases, then claim and start the due work."""
        poll_s = self.settings.poll_ms / 1000
        while True:
            try:
                await self.claim_round()
            except TxStoreUnavailable as e:
                log.warning("tx.claim_failed", error=str(e))
            await asyncio.sleep(poll_s)

    async def claim_round(self) -> int:
        """One renewal and one claim; returns how many rows were claimed."""
        store = self.store
        assert isinstance(store, SharedTxStore)
        settings = self.settings
        now = self.timers.now_ms()
        until = now + settings.lease_ms
        if self._claimed:
            await store.renew(self.node_id, list(self._claimed), until)
        if self._closing:
            return 0  # stopping: take on nothing new
        # Groups whose SDK producers long-poll this node: their checks are asked here first.
        recent = now - settings.check_timeout_ms - 2 * settings.poll_ms
        groups = set(self._waiters) | {g for g, at in self._polled.items() if at >= recent}
        for g in [g for g, at in self._polled.items() if at < recent]:
            del self._polled[g]
        rows = await store.claim_due(
            now=now,
            until=until,
            owner=self.node_id,
            groups=groups,
            others_after=now - 3 * settings.poll_ms,
            limit=CLAIM_BATCH,
        )
        for row in rows:
            self._claimed.add(row.tx_id)
            if row.state is TxState.PREPARED:
                self._spawn(self._ask(row))
            elif row.state is TxState.COMMITTED and not row.delivered and row.record is not None:
                self._spawn(self._deliver(row))
            else:
                self._spawn(self._release(row.tx_id))
        return len(rows)

    async def _release(self, tx_id: str) -> None:
        """Let go of a claimed row that needs nothing (it changed meanwhile)."""

        def run(row: TxRow) -> None:
            if row.owner == self.node_id:
                needs = row.state is TxState.PREPARED
                row.owner, row.due_at = None, (row.next_check_at if needs else None)

        try:
            await self.store.change(tx_id, run)
        finally:
            self._claimed.discard(tx_id)

    # -- check-back ------------------------------------------------------------------------------

    async def _check(self, tx_id: str) -> None:
        row = await self.store.get(tx_id)
        if row is None or row.state is not TxState.PREPARED:
            return
        await self._ask(row)

    async def _ask(self, row: TxRow) -> None:
        """Ask the producer of the open transaction ``row`` (claimed, on a shared store)."""
        tx_id = row.tx_id
        if tx_id in self._handed or tx_id in self._asks.get(row.producer_group, {}):
            return  # already asked, answer pending
        request = self._check_request(row)
        if row.check_url:
            try:
                answer = await self._ask_url(row.check_url, request)
                await self._record_check(tx_id, answer.value, "check_url")
                await self._apply(tx_id, answer)
            except asyncio.CancelledError:
                raise  # stopping: the claim stays listed for stop() to let go of
            except BaseException:
                self._claimed.discard(tx_id)  # the lease runs out; then it is asked again
                raise
            self._claimed.discard(tx_id)
            return
        channel = next((c for c in self.check_channels if c.claims(row.producer_group)), None)
        if channel is not None:
            self._handed[tx_id] = row.producer_group
            channel.push(row, decode_message(row.record) if row.record is not None else None)
        else:
            self._asks.setdefault(row.producer_group, {})[tx_id] = request
            self.wake(row.producer_group)
        self._later(self.settings.check_timeout_ms, self._no_answer, tx_id)

    def _check_request(self, row: TxRow) -> dict[str, object]:
        msg = decode_message(row.record) if row.record is not None else None
        return {
            "tx_id": row.tx_id,
            "msg_id": row.msg_id.hex(),
            "topic": row.topic,
            "keys": list(msg.keys) if msg else [],
            "properties": msg.properties if msg else {},
            # One meaning with the transaction's check_count: check-backs asked, this one
            # included (1 on the first). The transaction reports it once this one is over.
            "check_count": row.check_count + 1,
        }

    async def _ask_url(self, url: str, request: dict[str, object]) -> TxEvent:
        assert self._http is not None
        policy = self.settings.check_url
        if not policy.check_now(url):
            # Stored before the allow-list changed: never called, the check counts unanswered.
            log.warning("tx.check_url_refused", url=url[:200])
            return TxEvent.UNKNOWN
        body = orjson.dumps(request)
        headers = {"Content-Type": "application/json"}
        signature = policy.signature(body, int(time.time()))
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature
        try:
            async with self._http.post(url, data=body, headers=headers, allow_redirects=False) as r:
                if r.status != 200:
                    return TxEvent.UNKNOWN
                answer = orjson.loads(await r.read()).get("state")
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, AttributeError) as e:
            log.info("tx.check_url_failed", url=url, error=str(e))
            return TxEvent.UNKNOWN
        try:
            return TxEvent(answer)
        except ValueError:
            return TxEvent.UNKNOWN

    async def _no_answer(self, tx_id: str) -> None:
        if not self._withdraw(tx_id):
            return
        # Counted only if still open: on a shared store the answer may have come to another
        # node, which then decided the transaction.
        if (await self._step(tx_id, TxEvent.UNKNOWN))[2]:
            await self._record_check(tx_id, "unanswered", "producer")

    def _withdraw(self, tx_id: str) -> bool:
        """Take an outstanding check request back; True if there was one."""
        self._claimed.discard(tx_id)
        if self._handed.pop(tx_id, None) is not None:
            return True
        return any(asks.pop(tx_id, None) is not None for asks in self._asks.values())

    async def poll_checks(self, group: str, *, max_n: int, wait_ms: int) -> list[dict[str, object]]:
        """The long poll of an SDK producer: check requests for its group, up to ``max_n``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        if self.shared:
            self._polled[group] = self.timers.now_ms()
        try:
            while True:
                asks = self._asks.get(group)
                if asks:
                    out = []
                    for tx_id in list(asks)[:max_n]:
                        out.append(asks.pop(tx_id))
                        self._handed[tx_id] = group
                    return out
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closing:
                    return []
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.setdefault(group, []).append(fut)
                try:
                    async with asyncio.timeout(remaining):
                        await fut
                except TimeoutError:
                    pass
                finally:
                    waiters = self._waiters.get(group)
                    if waiters and fut in waiters:
                        waiters.remove(fut)
        finally:
            if self.shared:
                self._polled[group] = self.timers.now_ms()

    def wake(self, group: str) -> None:
        for f in self._waiters.pop(group, []):
            if not f.done():
                f.set_result(None)

    async def _housekeeper(self, every_s: float = 600.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.purge()
            except TxStoreUnavailable as e:
                log.warning("tx.purge_failed", error=str(e))

    async def purge(self) -> int:
        """Forget finished transactions older than ``history_ms``."""
        return await self.store.purge(self.timers.now_ms() - self.settings.history_ms)
