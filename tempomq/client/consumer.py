"""A long-polling consumer: runs a handler per message with bounded concurrency, acks in batches.

Receive loops (``polls`` of them, two by default) each ask for free handler slots, all but one
for each other poll (never more than are free, so no message waits out its invisibility in a
local buffer), start a task per message, and go back to the long poll. With two, one long poll
is always waiting on the server while the other's answer travels back and its messages are
dispatched, so a message released in that gap is handed out at once instead of waiting for the
next poll. A handler that returns acks its message; one that raises nacks it (the server
redelivers after the group's backoff). Acks are sent by one flusher: whatever finished while the
previous ack request was out goes in the next, so batches grow with load and add no latency.

``stop()`` stops receiving (a receive cut off mid-poll may have handed out messages: they come
back after ``invisible_ms``), waits for running handlers up to the drain timeout, cancels the
rest (unacked, so redelivered), and sends the acks of everything that finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from tempomq.client.client import MAX_BATCH, Client
from tempomq.client.errors import BadRequest, NotFound, ReceiptExpired, TempoClientError
from tempomq.client.models import ReceivedMessage

log = logging.getLogger("tempomq.client.consumer")

Handler = Callable[[ReceivedMessage], Awaitable[None]]
RECEIVE_BACKOFF_MAX_S = 5.0
#: After an error no retry can fix by itself (a missing topic, a bad group name): how long the
#: receive loop waits before asking again, so the topic may still be created meanwhile.
PERMANENT_RETRY_S = 60.0
#: Answers to a receive that will be the same however often it is repeated.
_PERMANENT = (BadRequest, NotFound)


class Consumer:
    def __init__(
        self,
        client: Client,
        topic: str,
        group: str,
        handler: Handler,
        *,
        concurrency: int = 64,
        batch: int = 64,
        invisible_ms: int = 30000,
        wait_ms: int = 20000,
        tags: str | None = None,
        permanent_retry_s: float = PERMANENT_RETRY_S,
        polls: int = 2,
    ) -> None:
        if concurrency < 1 or batch < 1 or polls < 1:
            raise ValueError("concurrency, batch and polls must be >= 1")
        self.client = client
        self.topic = topic
        self.group = group
        self._handler = handler
        self._concurrency = concurrency
        self._batch = min(batch, MAX_BATCH)
        self._polls = min(polls, concurrency)
        #: Slots one long poll takes at most: all free ones (up to a batch) but what the other
        #: polls need to stay out with one each, so a busy consumer's receives stay as large
        #: as with one poll.
        self._per_poll = max(1, min(self._batch, concurrency - self._polls + 1))
        self._invisible_ms = invisible_ms
        self._wait_ms = wait_ms
        self._tags = tags
        self._permanent_retry_s = permanent_retry_s
        #: The error that keeps receive from working (a missing topic, ...), None when it works.
        self.blocked_by: TempoClientError | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._handlers: set[asyncio.Task[None]] = set()
        self._to_ack: list[ReceivedMessage] = []
        self._ack_wanted = asyncio.Event()
        self._drained = False  # set by stop() once no handler runs: the flusher may end
        self._receivers: list[asyncio.Task[None]] = []
        self._acker: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return bool(self._receivers)

    def start(self) -> None:
        """Start receiving (call from within the event loop)."""
        if self._receivers:
            raise RuntimeError("the consumer is already running")
        self._drained = False
        self._receivers = [
            asyncio.create_task(self._receive_loop(), name=f"consume {self.topic} #{i}")
            for i in range(self._polls)
        ]
        self._acker = asyncio.create_task(self._ack_loop(), name=f"ack {self.topic}")

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop receiving, let handlers finish for up to ``drain_timeout_s``, send their acks."""
        receivers, acker = self._receivers, self._acker
        if not receivers or acker is None:
            return
        for receiver in receivers:
            receiver.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        if self._handlers:
            _, late = await asyncio.wait(self._handlers, timeout=drain_timeout_s)
            if late:
                log.warning(
                    "%d handlers still running after %ss: cancelled", len(late), drain_timeout_s
                )
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        self._drained = True
        self._ack_wanted.set()  # the flusher sends what is left, then returns
        await acker
        self._receivers, self._acker = [], None

    async def __aenter__(self) -> Consumer:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- receiving ----------------------------------------------------------------------------

    async def _free_slots(self) -> int:
        """Wait for one free handler slot, then take every other free one, up to a poll's
        share."""
        await self._slots.acquire()
        taken = 1
        while taken < self._per_poll and not self._slots.locked():
            await self._slots.acquire()  # free: returns at once
            taken += 1
        return taken

    async def _receive_loop(self) -> None:
        failures = 0
        while True:
            slots = await self._free_slots()
            messages: list[ReceivedMessage] = []
            try:
                messages = await self.client.receive(
                    self.topic,
                    self.group,
                    max_messages=slots,
                    wait_ms=self._wait_ms,
                    invisible_ms=self._invisible_ms,
                    tags=self._tags,
                )
            except _PERMANENT as e:
                pause_s = self._permanent_retry_s
                self._blocked(e)
            except Exception as e:  # the loop must outlive any one failure; it backs off
                failures += 1
                pause_s = min(RECEIVE_BACKOFF_MAX_S, 0.1 * 2 ** min(failures, 10))
                log.warning("receive from %s/%s failed: %r", self.topic, self.group, e)
            else:
                failures, pause_s = 0, 0.0
                if self.blocked_by is not None:
                    log.warning("receive from %s/%s works again", self.topic, self.group)
                    self.blocked_by = None
            finally:
                # Cancelled or not, the slots no message arrived for go back.
                for _ in range(slots - len(messages)):
                    self._slots.release()
            # No await from here to the end of the loop body: stop() cannot cut in between a
            # received message and the start of its handler.
            for msg in messages:
                task = asyncio.create_task(self._run(msg), name=f"handle {msg.msg_id}")
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
            if pause_s:
                await asyncio.sleep(pause_s)

    def _blocked(self, error: TempoClientError) -> None:
        """Say once (per kind of error) that receiving cannot work as things are."""
        if self.blocked_by is None or self.blocked_by.code != error.code:
            log.error(
                "receive from %s/%s cannot succeed until this is fixed: %s: %s"
                " (the consumer asks again every %gs)",
                self.topic,
                self.group,
                error.code,
                error.message,
                self._permanent_retry_s,
            )
        self.blocked_by = error

    async def _run(self, msg: ReceivedMessage) -> None:
        try:
            await self._handler(msg)
        except Exception:
            log.exception(
                "handler failed for message %s (attempt %d): nack", msg.msg_id, msg.delivery_attempt
            )
            await self._nack(msg)
        else:
            self._to_ack.append(msg)
            self._ack_wanted.set()
        finally:
            self._slots.release()

    async def _nack(self, msg: ReceivedMessage) -> None:
        try:
            await self.client.nack(self.topic, self.group, msg)
        except Exception as e:  # it comes back after invisible_ms anyway
            log.warning("nack of %s failed: %r", msg.msg_id, e)

    # -- acking -------------------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            while self._to_ack:
                # At most a receive batch per request: the server caps both alike.
                done, self._to_ack = self._to_ack[: self._batch], self._to_ack[self._batch :]
                await self._ack(done)
            if self._drained:
                return

    async def _ack(self, messages: list[ReceivedMessage]) -> None:
        try:
            await self.client.ack(self.topic, self.group, messages)
        except ReceiptExpired:
            # The server acks all of a request or nothing; ack one by one to save the rest.
            for msg in messages:
                try:
                    await self.client.ack(self.topic, self.group, [msg])
                except Exception as e:
                    log.warning("ack of %s failed, it will be redelivered: %r", msg.msg_id, e)
        except Exception as e:  # the flusher must outlive any one failure
            log.warning("ack of %d messages failed, they will be redelivered: %r", len(messages), e)
