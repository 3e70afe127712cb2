"""A blocking client for code without an event loop (Django, Flask, scripts): :class:`SyncClient`.

It runs the asyncio :class:`~tempomq.client.Client` on an event loop of its own, in a thread it
starts and stops, so every call has the async client's behaviour (endpoints, failover, retries
only where idempotent, errors) and any thread may call it. Each method blocks until the answer.

Transactional messages tie to a SQLAlchemy :class:`~sqlalchemy.orm.Session` (a plain, blocking
one) through the same barrier table as the async producer::

    with client.transaction(session, "orders", OutgoingMessage("created"), producer_group="shop"):
        session.add(order)          # the message is sent if and only if this commits

``answer_checks(group, engine)`` answers the coordinator's check-backs of the group from that
barrier, in the client's thread, until the client closes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from tempomq.client.client import Client
from tempomq.client.errors import AlreadyRolledBack
from tempomq.client.models import CheckAnswer, CheckRequest, OutgoingMessage, Transaction

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from tempomq.client.transactions import TransactionalProducer

log = logging.getLogger("tempomq.client.sync")

P = ParamSpec("P")
R = TypeVar("R")


def _blocking(
    method: Callable[Concatenate[Client, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncClient, P], R]:
    """``Client.method`` as a method of :class:`SyncClient` that waits for its result."""

    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._client, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


def _new_loop() -> asyncio.AbstractEventLoop:
    """The client's own event loop: uvloop's where it is installed (its loop and transports
    take about a third less CPU per call than asyncio's), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class SyncClient:
    """Blocking calls to a tempomq service; ``with SyncClient(url) as client:``. Takes the
    arguments of :class:`~tempomq.client.Client` (one URL or several, ``timeout_s``,
    ``retries``) and has its methods, each returning its result instead of a coroutine."""

    def __init__(self, endpoints: str | list[str], **client_kw: Any) -> None:
        self._loop = _new_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tempomq-sync-client", daemon=True
        )
        self._thread.start()
        self._producers: list[TransactionalProducer] = []
        self._closed = False

        async def make() -> Client:  # its aiohttp session belongs to the client's loop
            return Client(endpoints, **client_kw)

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run ``coro`` on the client's loop; wait for and return its result (or raise).

        Leaner than :func:`asyncio.run_coroutine_threadsafe` and its
        :class:`concurrent.futures.Future`: the task's end releases a lock this thread waits on.
        """
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        done = threading.Lock()
        done.acquire()
        ended: list[asyncio.Task[R]] = []

        def finished(task: asyncio.Task[R]) -> None:
            ended.append(task)
            done.release()

        def start() -> None:
            self._loop.create_task(coro).add_done_callback(finished)

        self._loop.call_soon_threadsafe(start)
        done.acquire()
        return ended[0].result()

    def close(self) -> None:
        """Stop answering check-backs, close the HTTP session, stop the thread. Idempotent."""
        if self._closed:
            return

        async def shut() -> None:
            for producer in self._producers:
                await producer.stop()
            await self._client.close()

        try:
            self._run(shut())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._client.endpoints

    create_topic = _blocking(Client.create_topic)
    get_topic = _blocking(Client.get_topic)
    create_group = _blocking(Client.create_group)
    send = _blocking(Client.send)
    send_message = _blocking(Client.send_message)
    send_batch = _blocking(Client.send_batch)
    get_message = _blocking(Client.get_message)
    query_by_key = _blocking(Client.query_by_key)
    get_delayed = _blocking(Client.get_delayed)
    cancel_delayed = _blocking(Client.cancel_delayed)
    reschedule_delayed = _blocking(Client.reschedule_delayed)
    receive = _blocking(Client.receive)
    ack = _blocking(Client.ack)
    nack = _blocking(Client.nack)
    group_stats = _blocking(Client.group_stats)
    reset_group = _blocking(Client.reset_group)
    prepare_transaction = _blocking(Client.prepare_transaction)
    commit_transaction = _blocking(Client.commit_transaction)
    rollback_transaction = _blocking(Client.rollback_transaction)
    get_transaction = _blocking(Client.get_transaction)

    # -- transactional messages with a blocking SQLAlchemy session -----------------------------

    @contextmanager
    def transaction(
        self,
        session: Session,
        topic: str,
        message: OutgoingMessage,
        *,
        producer_group: str,
        barrier_table: str | None = None,
    ) -> Iterator[Transaction]:
        """Send ``message`` to ``topic`` if and only if ``session``'s transaction commits, as
        :meth:`TransactionalProducer.transaction` does for an async session: prepare, the
        block's work, the barrier row, the local commit, then the message's commit (which
        never raises: the check-back reads the barrier). Leave committing to the block's end.
        """
        from tempomq.client.barrier import DEFAULT_TABLE, insert_commit_sync

        tx = self.prepare_transaction(topic, message, producer_group=producer_group)
        try:
            yield tx
            insert_commit_sync(session, tx.tx_id, barrier_table or DEFAULT_TABLE)
        except BaseException:
            self._abort(tx, session)
            raise
        try:
            session.commit()
        except BaseException:
            log.warning("local commit of transaction %s failed; the check-back decides", tx.tx_id)
            raise
        try:
            self.commit_transaction(tx)
        except AlreadyRolledBack:
            log.error("transaction %s committed locally but its message was rolled back", tx.tx_id)
        except Exception as e:  # the database committed: never raise from here
            log.warning("commit of transaction %s not confirmed, left to the check-back: %r", tx, e)

    def _abort(self, tx: Transaction, session: Session) -> None:
        try:
            session.rollback()
        except Exception:  # nothing was committed either way
            log.exception("local rollback of transaction %s failed", tx.tx_id)
        try:
            self.rollback_transaction(tx)
        except Exception as e:  # never hide the exception that got us here
            log.warning("rollback of transaction %s failed, left to the check-back: %s", tx, e)

    def answer_checks(
        self, producer_group: str, engine: Engine, *, barrier_table: str | None = None
    ) -> None:
        """Answer the check-backs of ``producer_group`` from the barrier table in ``engine``'s
        database (blocking SQLAlchemy), in the client's thread, until :meth:`close`."""
        from tempomq.client.barrier import DEFAULT_TABLE, check_sync
        from tempomq.client.transactions import TransactionalProducer

        table = barrier_table or DEFAULT_TABLE

        async def check(request: CheckRequest) -> CheckAnswer:
            # The blocking query may wait on a row lock: off the loop, so other calls go on.
            return await asyncio.to_thread(check_sync, engine, request.tx_id, table)

        async def start() -> TransactionalProducer:
            producer = TransactionalProducer(self._client, producer_group, check=check)
            producer.start()
            return producer

        self._producers.append(self._run(start()))
