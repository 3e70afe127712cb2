"""Transactional messages tied to a local SQLAlchemy transaction, and the check-back listener.

``async with producer.transaction(topic, message, session) as tx`` does, in this order:

1. prepare: the coordinator stores a half message (invisible) and returns ``tx.tx_id``;
2. the body of the block does its work in ``session``;
3. the barrier row ``(tx_id, 'commit')`` goes into the same database transaction;
4. the session commits: from here on the message *will* be delivered;
5. the message is committed (retried; if the coordinator cannot be told, its check-back reads
   the barrier and commits it later, so this step logs and never raises).

An exception in 2-3 rolls the session back, rolls the half message back (best effort: the
check-back would answer ``rollback`` from the barrier anyway) and re-raises. If step 4 itself
fails, the database may or may not have committed, so the message is left to the check-back,
which reads the truth from the barrier.

SDK producers open no port: :meth:`TransactionalProducer.start` long-polls each endpoint for
check-backs of the group and answers each from the barrier (or a callback of your own).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING

from tempomq.client.client import Client
from tempomq.client.errors import AlreadyRolledBack
from tempomq.client.models import CheckAnswer, CheckRequest, OutgoingMessage, Transaction

if TYPE_CHECKING:  # SQLAlchemy only when the caller uses a barrier, never for a check callback
    from sqlalchemy.ext.asyncio import AsyncSession

    from tempomq.client.barrier import Barrier

log = logging.getLogger("tempomq.client.transactions")

CheckCallback = Callable[[CheckRequest], Awaitable[CheckAnswer]]
POLL_WAIT_MS = 20000
POLL_MAX = 100
CHECK_CONCURRENCY = 16
POLL_BACKOFF_MAX_S = 5.0


class TransactionalProducer:
    """Sends transactional messages for producer group ``group`` and answers its check-backs.

    Give a ``barrier`` (the usual case) and/or a ``check`` callback; when both are given the
    callback answers check-backs and the barrier row is still written on commit.
    """

    def __init__(
        self,
        client: Client,
        group: str,
        *,
        barrier: Barrier | None = None,
        check: CheckCallback | None = None,
        check_immunity_ms: int | None = None,
    ) -> None:
        if barrier is None and check is None:
            raise ValueError("a transactional producer needs a barrier or a check callback")
        self.client = client
        self.group = group
        self._barrier = barrier
        self._check = check
        self._check_immunity_ms = check_immunity_ms
        self._pollers: list[asyncio.Task[None]] = []
        #: Check-backs being answered, by tx_id: one stuck on a database lock (its local
        #: transaction still open) must not keep the others waiting.
        self._answers: dict[str, asyncio.Task[None]] = {}

    # -- sending ------------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(
        self, topic: str, message: OutgoingMessage, session: AsyncSession
    ) -> AsyncIterator[Transaction]:
        """Send ``message`` to ``topic`` if and only if ``session``'s transaction commits.

        Do the database work of the block in ``session`` and leave committing to the block's
        end (a commit inside the block would commit without the barrier row). Raises
        :class:`TransactionRolledBack` when a check-back decided ``rollback`` first.
        """
        tx = await self.client.prepare_transaction(
            topic,
            message,
            producer_group=self.group,
            check_immunity_ms=self._check_immunity_ms,
        )
        try:
            yield tx
            if self._barrier is not None:
                await self._barrier.insert_commit(session, tx.tx_id)
        except BaseException:
            await self._abort(tx, session)
            raise
        try:
            await session.commit()
        except BaseException:
            log.warning("local commit of transaction %s failed; the check-back decides", tx.tx_id)
            raise
        await self._commit_message(tx)

    async def _abort(self, tx: Transaction, session: AsyncSession) -> None:
        try:
            await session.rollback()
        except Exception:  # nothing was committed either way; the message must still go
            log.exception("local rollback of transaction %s failed", tx.tx_id)
        try:
            await self.client.rollback_transaction(tx)
        except Exception as e:  # never hide the exception that got us here
            log.warning(
                "rollback of transaction %s failed, left to the check-back: %s", tx.tx_id, e
            )

    async def _commit_message(self, tx: Transaction) -> None:
        try:
            await self.client.commit_transaction(tx)
        except AlreadyRolledBack:
            # Only an operator (or a check callback answering rollback) can get here.
            log.error(
                "transaction %s committed locally but its message %s was rolled back",
                tx.tx_id,
                tx.msg_id,
            )
        except Exception as e:  # the database committed: never raise from here
            log.warning(
                "commit of transaction %s not confirmed, left to the check-back: %r", tx.tx_id, e
            )

    # -- check-backs --------------------------------------------------------------------------

    def start(self) -> None:
        """Start answering check-backs: one long poll per endpoint (call within the loop)."""
        if self._pollers:
            raise RuntimeError("the producer is already running")
        self._pollers = [
            asyncio.create_task(self._poll(endpoint), name=f"checks {self.group} {endpoint}")
            for endpoint in self.client.endpoints
        ]

    async def stop(self) -> None:
        """Stop answering; a check-back cut off here is asked again by the coordinator."""
        pollers, self._pollers = self._pollers, []
        tasks = pollers + list(self._answers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> TransactionalProducer:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _poll(self, endpoint: str) -> None:
        failures = 0
        while True:
            free = CHECK_CONCURRENCY - len(self._answers)
            if free <= 0:  # as many answers under way as allowed: wait for one to finish
                await asyncio.wait(
                    list(self._answers.values()), return_when=asyncio.FIRST_COMPLETED
                )
                continue
            try:
                checks = await self.client.poll_checks(
                    endpoint, self.group, wait_ms=POLL_WAIT_MS, max_checks=min(POLL_MAX, free)
                )
            except Exception as e:  # the listener must outlive any one failure; it backs off
                failures += 1
                log.warning("check-back poll of %s failed: %r", endpoint, e)
                await asyncio.sleep(min(POLL_BACKOFF_MAX_S, 0.1 * 2 ** min(failures, 10)))
                continue
            failures = 0
            for request in checks:
                if request.tx_id in self._answers:
                    continue  # asked again while the first answer is still being worked out
                task = asyncio.create_task(self._answer(endpoint, request))
                self._answers[request.tx_id] = task
                task.add_done_callback(partial(self._answered, request.tx_id))

    def _answered(self, tx_id: str, task: asyncio.Task[None]) -> None:
        if self._answers.get(tx_id) is task:
            del self._answers[tx_id]

    async def decide(self, request: CheckRequest) -> CheckAnswer:
        """The answer to one check-back; ``unknown`` when it cannot be decided now (the
        coordinator asks again)."""
        try:
            if self._check is not None:
                return await self._check(request)
            assert self._barrier is not None
            return await self._barrier.check(request.tx_id)
        except Exception:
            log.exception("check-back of transaction %s failed: answering unknown", request.tx_id)
            return "unknown"

    async def _answer(self, endpoint: str, request: CheckRequest) -> None:
        answer = await self.decide(request)
        try:
            await self.client.answer_check(endpoint, request.tx_id, answer)
        except Exception as e:  # asked again later; the poller must go on
            log.warning("answer %s to check of %s failed: %r", answer, request.tx_id, e)
