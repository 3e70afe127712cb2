"""Transactions on a shared MySQL/MariaDB or PostgreSQL database (``--tx-store URL``).

SQLAlchemy 2 Core on its asyncio engine (drivers aiomysql and asyncpg): one dialect layer for
both databases' SQL differences (types, ``FOR UPDATE SKIP LOCKED``, row tuples), a connection
pool with pre-ping, and no ORM on the hot path.

Schema (created on start, idempotent; names carry the URL's ``table_prefix``, default
``tempomq_``): ``tx`` (one row per transaction, like the SQLite store's plus ``owner`` and
``due_at``), ``tx_check`` (check history) and ``schema`` (``version``: a server refuses a
database whose schema is newer than it knows).

Statements per transaction (docs/deployment.md, "SQL statements per transaction"): prepare is one
``INSERT`` (its own transaction); commit or rollback one ``SELECT ... FOR UPDATE`` and one
``UPDATE`` in one transaction; delivery one ``UPDATE``; each check-back one ``INSERT`` into the
history and one ``SELECT ... FOR UPDATE`` + ``UPDATE``. Claims are batched: one
``SELECT ... FOR UPDATE SKIP LOCKED`` + one ``UPDATE`` per poll for up to ``limit`` rows.

Every database failure (refused connection, lost connection, timeout, a missing table) raises
:class:`~txcoord.store.TxStoreUnavailable`, which the API answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import Awaitable, Callable, Collection
from functools import partial
from typing import Any, TypeVar

import structlog
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from txcoord.states import TxState
from txcoord.store import COLUMNS, MUTABLE, SharedTxStore, TxNotFound, TxRow, TxStoreUnavailable

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: The schema this code writes; a database with a higher one was made by a newer server.
SCHEMA_VERSION = 1
#: URL schemes (SQLAlchemy dialect+driver) the store takes.
DRIVERS = ("mysql+aiomysql", "mariadb+aiomysql", "postgresql+asyncpg")
DEFAULT_PREFIX = "tempomq_"
_PREFIX_RE = re.compile(r"[A-Za-z0-9_]{0,40}")
#: One database operation (pool wait, connect and statements) may take this long, else 503.
OP_TIMEOUT_S = 5.0
#: Most prepares (or changes, or deliveries) one group commit writes.
BATCH = 500
#: Times a transaction chosen as a deadlock victim is run again before it is a 503.
DEADLOCK_RETRIES = 3
#: MySQL/MariaDB: deadlock, lock wait timeout; PostgreSQL: deadlock_detected.
_DEADLOCK_CODES = {1213, 1205}
_DEADLOCK_SQLSTATE = "40P01"


def _is_deadlock(e: DBAPIError) -> bool:
    orig = e.orig
    if getattr(orig, "sqlstate", None) == _DEADLOCK_SQLSTATE:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return len(args) > 0 and args[0] in _DEADLOCK_CODES


class TxStoreUrlError(ValueError):
    """A ``--tx-store`` URL this server cannot use; the message says what is wrong."""


def parse_url(url: str) -> tuple[URL, str]:
    """The SQLAlchemy URL (without ``table_prefix``) and the table prefix of a store URL such as
    ``mysql+aiomysql://user:pw@host:3306/db?table_prefix=tmq_``; raises TxStoreUrlError."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        raise TxStoreUrlError(f"not a database URL: {e}") from None
    if parsed.drivername not in DRIVERS:
        raise TxStoreUrlError(
            f"unsupported scheme {parsed.drivername!r}: use sqlite:///PATH, "
            + ", ".join(f"{d}://" for d in DRIVERS)
        )
    if not parsed.database:
        raise TxStoreUrlError("the URL must name a database (…/DBNAME)")
    prefix = parsed.query.get("table_prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise TxStoreUrlError("table_prefix must be up to 40 letters, digits or '_'")
    return parsed.difference_update_query(["table_prefix"]), prefix


def _tables(prefix: str) -> tuple[MetaData, Table, Table, Table]:
    md = MetaData()
    # BLOB holds 64 KiB in MySQL: a half message may be larger.
    record = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
    msg_id = LargeBinary().with_variant(mysql.VARBINARY(64), "mysql", "mariadb")
    tx = Table(
        f"{prefix}tx",
        md,
        Column("tx_id", String(64), primary_key=True),
        Column("msg_id", msg_id, nullable=False),
        Column("topic", String(255), nullable=False),
        Column("producer_group", String(128), nullable=False),
        Column("check_url", Text),
        Column("state", String(16), nullable=False),
        Column("check_count", Integer, nullable=False),
        Column("next_check_at", BigInteger, nullable=False),
        Column("deliver_at", BigInteger, nullable=False),
        Column("delivered", Boolean, nullable=False),
        Column("created_at", BigInteger, nullable=False),
        Column("updated_at", BigInteger, nullable=False),
        Column("record", record),
        # The node holding the row's lease (a check or a delivery in progress), and when the
        # row next needs a node: a check due, or a lease's end. NULL: nothing to do.
        Column("owner", String(64)),
        Column("due_at", BigInteger),
        Index(f"{prefix}tx_msg_id", "msg_id", unique=True),
        Index(f"{prefix}tx_due", "due_at"),
        Index(f"{prefix}tx_state", "state", "created_at", "tx_id"),
        Index(f"{prefix}tx_finished", "updated_at"),
    )
    checks = Table(
        f"{prefix}tx_check",
        md,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("tx_id", String(64), nullable=False),
        Column("at", BigInteger, nullable=False),
        Column("answer", String(16), nullable=False),
        Column("via", String(16), nullable=False),
        Index(f"{prefix}tx_check_tx", "tx_id", "at"),
        Index(f"{prefix}tx_check_at", "at"),
    )
    version = Table(
        f"{prefix}schema",
        md,
        Column("name", String(32), primary_key=True),
        Column("version", Integer, nullable=False),
    )
    return md, tx, checks, version


#: A queued :meth:`SqlTxStore.change`: the row, the function, and the caller's future.
_Change = tuple[str, Callable[[TxRow], Any], asyncio.Future[Any]]

#: What a changed row writes back: the store's mutable columns and the lease.
_WRITTEN = (*MUTABLE, "owner", "due_at")


async def _execute(stmt: Any, params: Any, conn: AsyncConnection) -> Any:
    return await conn.execute(stmt, params)


def _values(row: TxRow) -> dict[str, object]:
    out: dict[str, object] = {name: getattr(row, name) for name in COLUMNS}
    out["state"] = row.state.value
    out["owner"], out["due_at"] = row.owner, row.due_at
    return out


class SqlTxStore(SharedTxStore):
    """Transactions in MySQL/MariaDB (``mysql+aiomysql://``) or PostgreSQL
    (``postgresql+asyncpg://``), shared by every node given the same URL."""

    def __init__(
        self, url: str, *, op_timeout_s: float = OP_TIMEOUT_S, pool_size: int = 10
    ) -> None:
        self.url, self.prefix = parse_url(url)
        self.name = f"transaction store ({self.url.render_as_string(hide_password=True)})"
        self.op_timeout_s = op_timeout_s
        self.pool_size = pool_size
        self.metadata, self.tx, self.checks, self.version = _tables(self.prefix)
        self._cols = [self.tx.c[name] for name in (*COLUMNS, "owner", "due_at")]
        self._engine: AsyncEngine | None = None
        #: Group commit of prepares and of deliveries (see _drain_inserts, _drain_marks).
        self._inserts: list[tuple[TxRow, asyncio.Future[TxRow | None]]] = []
        self._inserter: asyncio.Task[None] | None = None
        self._marks: list[tuple[str, asyncio.Future[None]]] = []
        self._marker: asyncio.Task[None] | None = None
        self._changes: list[_Change] = []
        self._changer: asyncio.Task[None] | None = None

    # -- plumbing --------------------------------------------------------------------------------

    def _make_engine(self) -> AsyncEngine:
        timeout = self.op_timeout_s
        if self.url.drivername.startswith("postgresql"):
            connect_args: dict[str, Any] = {"timeout": timeout}
        else:
            connect_args = {"connect_timeout": max(1, int(timeout))}
        return create_async_engine(
            self.url,
            # Read committed: a claim's SKIP LOCKED scan takes no gap locks (MySQL's default,
            # repeatable read, would make concurrent claims and inserts wait on each other).
            isolation_level="READ COMMITTED",
            pool_size=self.pool_size,
            max_overflow=self.pool_size,
            pool_timeout=timeout,
            # A connection the database dropped (a restart, a proxy) is found and replaced
            # before use instead of failing the next request.
            pool_pre_ping=False,
            pool_recycle=3600,
            connect_args=connect_args,
        )

    def _unavailable(self, e: BaseException) -> TxStoreUnavailable:
        if isinstance(e, TimeoutError):
            reason = f"no answer within {self.op_timeout_s:g}s"
        else:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return TxStoreUnavailable(f"{self.name} unavailable: {reason[:300]}")

    async def _run(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``fn`` in one database transaction, bounded by ``op_timeout_s``; database failures
        become TxStoreUnavailable, the store's own errors (TxNotFound, 409s) pass. A transaction
        the database chose as a deadlock victim is run again (``fn`` must allow that)."""
        engine = self._engine
        if engine is None:
            raise TxStoreUnavailable(f"{self.name} is not open")
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    async with engine.begin() as conn:
                        return await fn(conn)
            except IntegrityError:
                raise
            except DBAPIError as e:
                if attempt < DEADLOCK_RETRIES and _is_deadlock(e):
                    continue
                raise self._unavailable(e) from e
            except (SQLAlchemyError, OSError, TimeoutError) as e:
                raise self._unavailable(e) from e
        raise AssertionError("unreachable")

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the tables and indexes that are missing, check the schema version.
        Raises TxStoreUnavailable (unreachable, refused) or RuntimeError (schema too new)."""
        if self._engine is None:
            self._engine = self._make_engine()
        version = self.version

        async def migrate(conn: AsyncConnection) -> int | None:
            await conn.run_sync(self.metadata.create_all, checkfirst=True)
            return (
                await conn.execute(select(version.c.version).where(version.c.name == "tx"))
            ).scalar()

        for attempt in range(3):
            try:
                found = await self._run(migrate)
                break
            except TypeError as e:  # the driver's connect() refused an option of the URL's query
                await self.close()
                raise TxStoreUnavailable(
                    f"{self.name}: an option in the URL is not one its driver takes ({e})"
                ) from None
            except (TxStoreUnavailable, IntegrityError) as e:
                # Two nodes starting at once may both create a table; the loser sees "exists"
                # (PostgreSQL: a duplicate key in its catalog) and finds it the next time.
                if attempt == 2:
                    await self.close()
                    raise e if isinstance(e, TxStoreUnavailable) else self._unavailable(e) from e
                await asyncio.sleep(0.2)
        if found is None:
            with contextlib.suppress(IntegrityError):  # another node wrote it first
                await self._run(
                    lambda c: c.execute(insert(version).values(name="tx", version=SCHEMA_VERSION))
                )
        elif found > SCHEMA_VERSION:
            await self.close()
            raise TxStoreUnavailable(
                f"{self.name} has schema version {found}; this server knows up to "
                f"{SCHEMA_VERSION}: upgrade the server"
            )
        log.info("tx.store_open", store=self.name, schema=SCHEMA_VERSION)

    async def close(self) -> None:
        for task in (self._inserter, self._changer, self._marker):
            if task is not None and not task.done():
                await task  # what is queued is written (or failed) first
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    async def health(self) -> str | None:
        try:
            await self._run(lambda c: c.execute(select(func.count()).select_from(self.version)))
        except TxStoreUnavailable as e:
            return str(e)
        return None

    async def drop(self) -> None:
        """Drop this prefix's tables (tests and benchmarks clean up with it)."""
        await self._run(lambda c: c.run_sync(self.metadata.drop_all, checkfirst=True))

    # -- rows ------------------------------------------------------------------------------------

    def _select(self) -> Any:
        return select(*self._cols)

    async def insert(self, row: TxRow) -> TxRow | None:
        fut: asyncio.Future[TxRow | None] = asyncio.get_running_loop().create_future()
        self._inserts.append((row, fut))
        if self._inserter is None or self._inserter.done():
            self._inserter = asyncio.create_task(self._drain_inserts())
        return await fut

    async def _drain_inserts(self) -> None:
        """Group commit: the prepares queued meanwhile go in one multi-row INSERT (one
        transaction, one log flush); a batch with a taken ``msg_id`` is redone row by row."""
        while self._inserts:
            batch, self._inserts = self._inserts[:BATCH], self._inserts[BATCH:]
            values = [_values(row) for row, _ in batch]
            try:
                await self._run(partial(_execute, insert(self.tx), values))
                outcomes: list[TxRow | BaseException | None] = [None] * len(batch)
            except IntegrityError:
                outcomes = [await self._insert_one(row) for row, _ in batch]
            except TxStoreUnavailable as e:
                outcomes = [e] * len(batch)
            for (_, fut), out in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if isinstance(out, BaseException):
                    fut.set_exception(out)
                else:
                    fut.set_result(out)

    async def _insert_one(self, row: TxRow) -> TxRow | BaseException | None:
        try:
            await self._run(lambda c: c.execute(insert(self.tx).values(**_values(row))))
            return None
        except IntegrityError:
            pass  # the msg_id is taken: a resent prepare
        except TxStoreUnavailable as e:
            return e
        stmt = self._select().where(self.tx.c.msg_id == row.msg_id)
        try:
            first = (await self._run(lambda c: c.execute(stmt))).first()
        except TxStoreUnavailable as e:
            return e
        if first is None:
            return TxStoreUnavailable(f"{self.name}: insert of {row.tx_id} refused")
        return TxRow.from_sql(first)

    async def get(self, tx_id: str) -> TxRow | None:
        stmt = self._select().where(self.tx.c.tx_id == tx_id)
        r = (await self._run(lambda c: c.execute(stmt))).first()
        return None if r is None else TxRow.from_sql(r)

    async def change(self, tx_id: str, fn: Callable[[TxRow], T]) -> T:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._changes.append((tx_id, fn, fut))
        if self._changer is None or self._changer.done():
            self._changer = asyncio.create_task(self._drain_changes())
        result: T = await fut
        return result

    async def _drain_changes(self) -> None:
        """Group commit of state changes: the changes queued meanwhile run in one transaction
        (their rows locked in ``tx_id`` order, so two servers' batches cannot deadlock), each
        function on its own copy of its row, applied in arrival order."""
        while self._changes:
            batch, self._changes = self._changes[:BATCH], self._changes[BATCH:]
            outcomes: list[tuple[bool, Any]]
            try:
                outcomes = await self._run(partial(self._change_batch, batch))
            except TxStoreUnavailable as e:
                outcomes = [(False, e)] * len(batch)
            for (_, _, fut), (ok, value) in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    async def _change_batch(
        self, batch: list[_Change], conn: AsyncConnection
    ) -> list[tuple[bool, Any]]:
        tx = self.tx
        ids = sorted({tx_id for tx_id, _, _ in batch})
        stmt = self._select().where(tx.c.tx_id.in_(ids)).order_by(tx.c.tx_id).with_for_update()
        rows = {r.tx_id: r for r in map(TxRow.from_sql, await conn.execute(stmt))}
        before = {tx_id: _values(r) for tx_id, r in rows.items()}
        outcomes: list[tuple[bool, Any]] = []
        for tx_id, fn, _ in batch:
            current = rows.get(tx_id)
            if current is None:
                outcomes.append((False, TxNotFound(f"no transaction {tx_id}")))
                continue
            row = dataclasses.replace(current)
            try:
                outcomes.append((True, fn(row)))
            except Exception as e:  # this change is refused (a 409, say); the others stand
                outcomes.append((False, e))
                continue
            rows[tx_id] = row
        for tx_id, row in rows.items():
            after, was = _values(row), before[tx_id]
            changed = {k: after[k] for k in _WRITTEN if after[k] != was[k]}
            if changed:
                await conn.execute(update(tx).where(tx.c.tx_id == tx_id).values(**changed))
        return outcomes

    async def mark_delivered(self, tx_id: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._marks.append((tx_id, fut))
        if self._marker is None or self._marker.done():
            self._marker = asyncio.create_task(self._drain_marks())
        await fut

    async def _drain_marks(self) -> None:
        """Group commit of deliveries: one UPDATE for those queued meanwhile."""
        tx = self.tx
        while self._marks:
            batch, self._marks = self._marks[:BATCH], self._marks[BATCH:]
            stmt = (
                update(tx)
                .where(tx.c.tx_id.in_([t for t, _ in batch]))
                .values(delivered=True, record=None, owner=None, due_at=None)
            )
            error: TxStoreUnavailable | None = None
            try:
                await self._run(partial(_execute, stmt, None))
            except TxStoreUnavailable as e:
                error = e
            for _, fut in batch:
                if not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)

    async def open_rows(self) -> list[TxRow]:
        tx = self.tx
        stmt = self._select().where(
            or_(tx.c.state == TxState.PREPARED.value, tx.c.delivered.is_(False))
        )
        return [TxRow.from_sql(r) for r in await self._run(lambda c: c.execute(stmt))]

    async def list_page(
        self, state: TxState, *, limit: int, after: tuple[int, str] | None
    ) -> list[TxRow]:
        tx = self.tx
        at, tx_id = after if after is not None else (-1, "")
        stmt = (
            self._select()
            .where(tx.c.state == state.value)
            .where(tuple_(tx.c.created_at, tx.c.tx_id) > tuple_(at, tx_id))
            .order_by(tx.c.created_at, tx.c.tx_id)
            .limit(limit)
        )
        return [TxRow.from_sql(r) for r in await self._run(lambda c: c.execute(stmt))]

    async def count_states(self) -> dict[str, int]:
        tx = self.tx
        stmt = select(tx.c.state, func.count()).group_by(tx.c.state)
        return {s: int(n) for s, n in await self._run(lambda c: c.execute(stmt))}

    async def record_check(self, tx_id: str, at: int, answer: str, via: str) -> None:
        stmt = insert(self.checks).values(tx_id=tx_id, at=at, answer=answer, via=via)
        await self._run(lambda c: c.execute(stmt))

    async def check_history(self, tx_id: str, limit: int) -> list[tuple[int, str, str]]:
        ch = self.checks
        stmt = (
            select(ch.c.at, ch.c.answer, ch.c.via)
            .where(ch.c.tx_id == tx_id)
            .order_by(ch.c.at, ch.c.id)
            .limit(limit)
        )
        return [(int(a), b, v) for a, b, v in await self._run(lambda c: c.execute(stmt))]

    async def purge(self, before: int) -> int:
        tx, ch = self.tx, self.checks

        async def run(conn: AsyncConnection) -> int:
            # Checks of transactions still kept stay, however old (a parked one's history).
            await conn.execute(
                delete(ch).where(ch.c.at < before).where(ch.c.tx_id.not_in(select(tx.c.tx_id)))
            )
            gone = await conn.execute(
                delete(tx)
                .where(tx.c.state.in_((TxState.COMMITTED.value, TxState.ROLLED_BACK.value)))
                .where(tx.c.delivered.is_(True))
                .where(tx.c.updated_at < before)
            )
            return int(gone.rowcount)

        return await self._run(run)

    # -- claims ----------------------------------------------------------------------------------

    async def claim_due(
        self,
        *,
        now: int,
        until: int,
        owner: str,
        groups: Collection[str],
        others_after: int,
        limit: int,
    ) -> list[TxRow]:
        tx = self.tx
        anyone = or_(
            tx.c.state != TxState.PREPARED.value,
            tx.c.check_url.is_not(None),
            tx.c.due_at <= others_after,
        )
        if groups:
            anyone = or_(anyone, tx.c.producer_group.in_(list(groups)))
        stmt = (
            self._select()
            .where(and_(tx.c.due_at <= now, anyone))
            .order_by(tx.c.due_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

        async def run(conn: AsyncConnection) -> list[TxRow]:
            rows = [TxRow.from_sql(r) for r in await conn.execute(stmt)]
            if rows:
                await conn.execute(
                    update(tx)
                    .where(tx.c.tx_id.in_([r.tx_id for r in rows]))
                    .values(owner=owner, due_at=until)
                )
            for r in rows:
                r.owner, r.due_at = owner, until
            return rows

        return await self._run(run)

    async def renew(self, owner: str, tx_ids: Collection[str], until: int) -> int:
        if not tx_ids:
            return 0
        tx = self.tx
        stmt = (
            update(tx)
            .where(tx.c.tx_id.in_(list(tx_ids)))
            .where(tx.c.owner == owner)
            .where(tx.c.due_at.is_not(None))
            .values(due_at=until)
        )
        return int((await self._run(lambda c: c.execute(stmt))).rowcount)
