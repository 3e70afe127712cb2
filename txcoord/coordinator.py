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
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
import structlog
from prometheus_client import Counter

from broker_core.errors import StoreUnavailable, TempoError
from broker_core.message import Message
from broker_core.protocols import Scheduler
from broker_core.store import MessageStore
from broker_core.tasks import cancel_and_wait
from delayserver.sqlite import SqliteRunner
from delayserver.store import decode_message, encode_message
from txcoord.checkurl import SIGNATURE_HEADER, AllowListResolver, CheckUrlPolicy
from txcoord.states import Step, TxEvent, TxState, step

log = structlog.get_logger(__name__)

CHECKS = Counter("tempomq_tx_checks", "Check-backs asked", ["answer"])
OUTCOMES = Counter("tempomq_tx_outcomes", "Transactions finished", ["state"])

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tx (
    tx_id          TEXT PRIMARY KEY,
    msg_id         BLOB NOT NULL,
    topic          TEXT NOT NULL,
    producer_group TEXT NOT NULL,
    check_url      TEXT,
    state          TEXT NOT NULL,
    check_count    INTEGER NOT NULL DEFAULT 0,
    next_check_at  INTEGER NOT NULL,
    deliver_at     INTEGER NOT NULL,
    delivered      INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    record         BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS tx_msg_id ON tx (msg_id);
CREATE INDEX IF NOT EXISTS tx_open ON tx (state) WHERE state IN ('prepared', 'check_max');
CREATE INDEX IF NOT EXISTS tx_undelivered ON tx (delivered) WHERE delivered = 0;
CREATE INDEX IF NOT EXISTS tx_finished ON tx (updated_at)
    WHERE state IN ('committed', 'rolled_back');
-- Counting and paging transactions by state reads this index only.
CREATE INDEX IF NOT EXISTS tx_state ON tx (state, created_at, tx_id);
-- Every check-back asked and how it was answered, for operators (bounded: check_max per tx).
CREATE TABLE IF NOT EXISTS tx_check (
    tx_id  TEXT NOT NULL,
    at     INTEGER NOT NULL,
    answer TEXT NOT NULL,
    via    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tx_check_tx ON tx_check (tx_id, at);
CREATE INDEX IF NOT EXISTS tx_check_at ON tx_check (at);
"""
_COLUMNS = (
    "tx_id, msg_id, topic, producer_group, check_url, state, check_count, next_check_at, "
    "deliver_at, delivered, created_at, updated_at, record"
)


class TxNotFound(TempoError):
    status, code = 404, "transaction_not_found"


class TxStoreUnavailable(StoreUnavailable):
    code = "transaction_store_unavailable"


@dataclass(slots=True)
class TxRow:
    tx_id: str
    msg_id: bytes
    topic: str
    producer_group: str
    check_url: str | None
    state: TxState
    check_count: int
    next_check_at: int
    deliver_at: int
    delivered: bool
    created_at: int
    updated_at: int
    record: bytes | None

    @classmethod
    def from_sql(cls, r: Sequence[Any]) -> TxRow:
        return cls(
            r[0],
            bytes(r[1]),
            r[2],
            r[3],
            r[4],
            TxState(r[5]),
            r[6],
            r[7],
            r[8],
            bool(r[9]),
            r[10],
            r[11],
            None if r[12] is None else bytes(r[12]),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "tx_id": self.tx_id,
            "msg_id": self.msg_id.hex(),
            "topic": self.topic,
            "producer_group": self.producer_group,
            "state": self.state.value,
            "check_count": self.check_count,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


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


class Coordinator:
    def __init__(
        self,
        path: Path,
        broker_store: MessageStore,
        scheduler: Scheduler,
        timers: Clock,
        *,
        settings: TxSettings = TxSettings(),
        sync: bool = False,
        new_msg_id: Callable[[], bytes] | None = None,
    ) -> None:
        self.db = SqliteRunner(
            path, schema=_SCHEMA, sync=sync, name="tx-store", unavailable=TxStoreUnavailable
        )
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._closing = False
        #: Further check channels (see :class:`CheckChannel`), wired in by the app.
        self.check_channels: list[CheckChannel] = []

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.db.open()
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.check_timeout_ms / 1000),
            connector=aiohttp.TCPConnector(resolver=AllowListResolver(self.settings.check_url)),
        )
        rows = await self.db.read(
            lambda db: [
                TxRow.from_sql(r)
                for r in db.execute(
                    f"SELECT {_COLUMNS} FROM tx WHERE state = 'prepared' OR delivered = 0"
                )
            ]
        )
        now = self.timers.now_ms()
        for row in rows:
            if row.state is TxState.COMMITTED and not row.delivered:
                self._spawn(self._deliver(row))  # decided before a crash, not yet visible
            elif row.state is TxState.PREPARED:
                self._arm(row.tx_id, max(row.next_check_at, now))
        self._spawn(self._housekeeper())
        log.info("tx.started", open=sum(r.state is TxState.PREPARED for r in rows))

    def begin_shutdown(self) -> None:
        """Answer every producer's long poll now (empty): the server is stopping."""
        self._closing = True
        for group in list(self._waiters):
            self.wake(group)

    async def stop(self) -> None:
        self.begin_shutdown()
        await cancel_and_wait(self._tasks)
        if self._http is not None:
            await self._http.close()
        await self.db.close()

    async def health(self) -> str | None:
        """None when the transaction DB takes writes (tried again after a failed one)."""
        return await self.db.check()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arm(self, tx_id: str, when_ms: int) -> None:
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
        )
        values = (
            row.tx_id,
            row.msg_id,
            row.topic,
            row.producer_group,
            row.check_url,
            row.state.value,
            0,
            row.next_check_at,
            row.deliver_at,
            0,
            now,
            now,
            row.record,
        )

        def run(db: sqlite3.Connection) -> TxRow | None:
            prior = db.execute(f"SELECT {_COLUMNS} FROM tx WHERE msg_id = ?", (row.msg_id,))
            found = prior.fetchone()
            if found is not None:
                return TxRow.from_sql(found)
            db.execute(f"INSERT INTO tx ({_COLUMNS}) VALUES ({','.join('?' * 13)})", values)
            return None

        first = await self.db.write(run)
        if first is not None:
            return first
        self._arm(row.tx_id, row.next_check_at)
        return row

    async def get(self, tx_id: str) -> TxRow:
        row = await self.db.read(partial(_select, tx_id=tx_id))
        if row is None:
            raise TxNotFound(f"no transaction {tx_id}")
        return row

    async def list_state(self, state: TxState, limit: int = 1000) -> list[TxRow]:
        return await self.list_page(state, limit=limit)

    async def list_page(
        self, state: TxState, *, limit: int, after: tuple[int, str] | None = None
    ) -> list[TxRow]:
        """Up to ``limit`` transactions in ``state``, oldest first, after the (created_at,
        tx_id) of the last one of the previous page: one range of the ``tx_state`` index."""
        at, tx_id = after if after is not None else (-1, "")
        return await self.db.read(
            lambda db: [
                TxRow.from_sql(r)
                for r in db.execute(
                    f"SELECT {_COLUMNS} FROM tx INDEXED BY tx_state WHERE state = ? "
                    "AND (created_at, tx_id) > (?, ?) ORDER BY created_at, tx_id LIMIT ?",
                    (state.value, at, tx_id, limit),
                )
            ]
        )

    async def count_states(self) -> dict[str, int]:
        """How many transactions are in each state (finished ones until they are purged)."""
        rows = await self.db.read(
            lambda db: db.execute(
                "SELECT state, COUNT(*) FROM tx INDEXED BY tx_state GROUP BY state"
            ).fetchall()
        )
        counts = dict.fromkeys((s.value for s in TxState), 0)
        counts.update({state: int(n) for state, n in rows})
        return counts

    async def check_history(self, tx_id: str, limit: int = 100) -> list[dict[str, object]]:
        """The check-backs of ``tx_id``, oldest first: when, the answer, and who answered."""
        rows = await self.db.read(
            lambda db: db.execute(
                "SELECT at, answer, via FROM tx_check WHERE tx_id = ? ORDER BY at LIMIT ?",
                (tx_id, limit),
            ).fetchall()
        )
        return [{"at": at, "answer": answer, "via": via} for at, answer, via in rows]

    async def _record_check(self, tx_id: str, answer: str, via: str) -> None:
        CHECKS.labels(answer).inc()
        now = self.timers.now_ms()
        await self.db.write(
            lambda db: db.execute(
                "INSERT INTO tx_check (tx_id, at, answer, via) VALUES (?, ?, ?, ?)",
                (tx_id, now, answer, via),
            )
        )

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
        now = self.timers.now_ms()
        settings = self.settings

        def run(db: sqlite3.Connection) -> tuple[TxRow, Step]:
            row = _select(db, tx_id=tx_id)
            if row is None:
                raise TxNotFound(f"no transaction {tx_id}")
            s = step(row.state, event, check_count=row.check_count, check_max=settings.check_max)
            if s.state is not row.state or s.check_count != row.check_count:
                row.state, row.check_count, row.updated_at = s.state, s.check_count, now
                if s.check_again:
                    row.next_check_at = now + settings.check_interval_ms
                if s.state is TxState.ROLLED_BACK:
                    row.record = None  # nothing will ever need it
                    row.delivered = True  # nothing left to deliver either
                db.execute(
                    "UPDATE tx SET state = ?, check_count = ?, next_check_at = ?, updated_at = ?, "
                    "record = ?, delivered = ? WHERE tx_id = ?",
                    (
                        row.state.value,
                        row.check_count,
                        row.next_check_at,
                        now,
                        row.record,
                        int(row.delivered),
                        tx_id,
                    ),
                )
            return row, s

        row, s = await self.db.write(run)
        if s.deliver:
            OUTCOMES.labels("committed").inc()
            await self._deliver(row)
        elif s.state is TxState.ROLLED_BACK and event is TxEvent.ROLLBACK:
            OUTCOMES.labels("rolled_back").inc()
        if s.check_again:
            self._arm(tx_id, row.next_check_at)
        if s.state is TxState.CHECK_MAX and event is TxEvent.UNKNOWN:
            log.warning("tx.check_max", tx_id=tx_id, group=row.producer_group, checks=s.check_count)
        return row

    async def _deliver(self, row: TxRow) -> None:
        """Make a committed message visible (idempotent), then record that it is."""
        assert row.record is not None
        msg = decode_message(row.record)
        try:
            if row.deliver_at > self.timers.now_ms():
                await self.scheduler.schedule([msg], [row.deliver_at])
            else:
                await self.scheduler.release_now([msg])  # the release target, idempotent
        except StoreUnavailable as e:
            # The decision is durable: try again shortly; a restart would deliver it too.
            log.error("tx.deliver_failed", tx_id=row.tx_id, error=str(e))
            self._later(1000, self._deliver, row)
            return
        await self.db.write(
            lambda db: db.execute(
                "UPDATE tx SET delivered = 1, record = NULL WHERE tx_id = ?", (row.tx_id,)
            )
        )
        row.delivered, row.record = True, None

    # -- check-back ------------------------------------------------------------------------------

    async def _check(self, tx_id: str) -> None:
        row = await self.db.read(partial(_select, tx_id=tx_id))
        if row is None or row.state is not TxState.PREPARED:
            return
        if tx_id in self._handed or tx_id in self._asks.get(row.producer_group, {}):
            return  # already asked, answer pending
        request = self._check_request(row)
        if row.check_url:
            answer = await self._ask_url(row.check_url, request)
            await self._record_check(tx_id, answer.value, "check_url")
            await self._apply(tx_id, answer)
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
        if self._withdraw(tx_id):
            await self._record_check(tx_id, "unanswered", "producer")
            await self._apply(tx_id, TxEvent.UNKNOWN)

    def _withdraw(self, tx_id: str) -> bool:
        """Take an outstanding check request back; True if there was one."""
        if self._handed.pop(tx_id, None) is not None:
            return True
        return any(asks.pop(tx_id, None) is not None for asks in self._asks.values())

    async def poll_checks(self, group: str, *, max_n: int, wait_ms: int) -> list[dict[str, object]]:
        """The long poll of an SDK producer: check requests for its group, up to ``max_n``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
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
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(group)
                if waiters and fut in waiters:
                    waiters.remove(fut)

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
        before = self.timers.now_ms() - self.settings.history_ms

        def run(db: sqlite3.Connection) -> int:
            # Checks of transactions still kept stay, however old (a parked one's history).
            db.execute(
                "DELETE FROM tx_check WHERE at < ? AND tx_id NOT IN (SELECT tx_id FROM tx)",
                (before,),
            )
            return db.execute(
                "DELETE FROM tx WHERE state IN ('committed', 'rolled_back') AND delivered = 1 "
                "AND updated_at < ?",
                (before,),
            ).rowcount

        return await self.db.write(run)


def _select(db: sqlite3.Connection, *, tx_id: str) -> TxRow | None:
    r = db.execute(f"SELECT {_COLUMNS} FROM tx WHERE tx_id = ?", (tx_id,)).fetchone()
    return None if r is None else TxRow.from_sql(r)
