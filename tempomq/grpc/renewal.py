"""Receipt renewal for push consumers: their messages stay invisible until they are acked.

A RocketMQ push consumer receives with ``auto_renew`` and no invisible duration: the server
picks one and keeps renewing it while the listener works, however long that takes. Here each
such delivery is *held*: shortly before its deadline (a third of ``slice_ms`` ahead) the
renewer moves it on by another ``slice_ms`` with the consumer group's change-invisible, which
issues a new receipt. The client keeps the receipt it was first given; :meth:`release` maps it
to the current one when the client acks, nacks (ChangeInvisibleDuration) or dead-letters it.

Renewal stops when the message is finished, when its client goes away (its Telemetry stream
ends or it says goodbye), or after ``max_hold_ms``; the message then becomes visible again at
its current deadline and is redelivered with the next attempt, as any expired delivery is.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial

import structlog

from broker_core.broker import Broker
from broker_core.errors import TempoError
from broker_core.protocols import TimerHandle
from broker_core.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

#: RocketMQ's proxy renews a push consumer's message for at most this long by default.
DEFAULT_MAX_HOLD_MS = 3 * 3600_000


@dataclass(slots=True, eq=False)
class Held:
    client_id: str
    topic: str
    group: str
    #: The receipt that is valid now (the client still holds the first one).
    receipt: str
    since_ms: int
    timer: TimerHandle | None = None


class ReceiptRenewer:
    def __init__(
        self, broker: Broker, *, slice_ms: int, max_hold_ms: int = DEFAULT_MAX_HOLD_MS
    ) -> None:
        self.broker = broker
        self.slice_ms = slice_ms
        self.max_hold_ms = max_hold_ms
        self._held: dict[str, Held] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, client_id: str, topic: str, group: str, receipt: str, deadline_ms: int) -> None:
        """Keep renewing the delivery given out under ``receipt`` (due at ``deadline_ms``)."""
        held = Held(client_id, topic, group, receipt, self.broker.timers.now_ms())
        self._held[receipt] = held
        self._arm(receipt, held, deadline_ms)

    def release(self, receipt: str) -> str:
        """Stop renewing; the receipt valid now for the one the client holds."""
        held = self._held.pop(receipt, None)
        if held is None:
            return receipt
        if held.timer is not None:
            held.timer.cancel()
        return held.receipt

    def drop_client(self, client_id: str) -> None:
        """The client is gone: its messages expire at their current deadlines."""
        for first in [r for r, h in self._held.items() if h.client_id == client_id]:
            self.release(first)

    async def stop(self) -> None:
        for first in list(self._held):
            self.release(first)
        await cancel_and_wait(self._tasks)

    def _arm(self, first: str, held: Held, deadline_ms: int) -> None:
        ahead_ms = self.slice_ms // 3
        held.timer = self.broker.timers.call_at(deadline_ms - ahead_ms, partial(self._due, first))

    def _due(self, first: str) -> None:
        task = asyncio.get_running_loop().create_task(self._renew(first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew(self, first: str) -> None:
        held = self._held.get(first)
        if held is None:
            return
        now = self.broker.timers.now_ms()
        if now - held.since_ms >= self.max_hold_ms:
            self._held.pop(first, None)
            log.info(
                "grpc.renewal_ended",
                topic=held.topic,
                group=held.group,
                held_ms=now - held.since_ms,
            )
            return
        try:
            receipt = await self.broker.change_invisible(
                held.topic, held.group, held.receipt, self.slice_ms
            )
        except TempoError:
            self._held.pop(first, None)  # finished meanwhile, or its group was reset
            return
        if self._held.get(first) is held:
            held.receipt = receipt
            self._arm(first, held, now + self.slice_ms)
