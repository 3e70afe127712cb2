"""Capabilities the broker core needs from higher layers, wired in by the app.

The broker core must not import the delay server, yet consumer retries wait for a backoff and
receipts expire after an invisibility time. It states what it needs here; ``delayserver``
implements it and ``tempomq.app`` connects the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from broker_core.message import Message


class TimerHandle(Protocol):
    def cancel(self) -> None:
        """Stop the timer; a no-op when it already fired or was cancelled."""


class Timers(Protocol):
    """One-shot timers in epoch milliseconds (the service's single timing wheel)."""

    def now_ms(self) -> int: ...

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` on the event loop at ``when_ms`` (at once if that has passed)."""
        ...


class FirstSend(NamedTuple):
    """Where the first send of a message id went: what a resend of that id answers."""

    topic: str
    #: The queue the message is in, or is to be released to; -1 when none is recorded.
    queue_id: int
    #: When it is (or was) delivered, epoch ms: its delivery time if it was delayed, else the
    #: time it was sent.
    deliver_at_ms: int
    #: Sent with a time still to come (it went through the scheduler).
    delayed: bool


class Scheduler(Protocol):
    """Durably keeps messages and puts each into its topic at its time.

    ``schedule`` returns once the messages are stored durably, with the delivery time each one
    has: the one given, or for an id already scheduled (a resend), the one it was stored with;
    a resend's ``queue_id`` is set to the queue its stored message will be released to (-1
    when none is recorded).
    Release must be idempotent by ``(topic, msg_id)`` so a crash between release and
    bookkeeping never delivers twice.
    """

    async def schedule(
        self, messages: Sequence[Message], deliver_at_ms: Sequence[int]
    ) -> list[int]: ...

    def new_msg_id(self) -> bytes:
        """A fresh id for a message this scheduler will keep (one it releases itself)."""
        ...

    def may_hold(self, msg_id: bytes) -> bool:
        """False when this scheduler certainly holds no message with this id: answered from
        memory (an id filter), at (almost) no cost; True when :meth:`held` must be asked."""
        ...

    async def held(self, msg_ids: Sequence[bytes]) -> list[FirstSend | None]:
        """For each id, the message this scheduler holds under it (scheduled, or delivered or
        cancelled and not yet forgotten), else None. Raises ``StoreUnavailable`` when the
        store cannot tell."""
        ...

    async def release_now(self, messages: Sequence[Message]) -> None:
        """Put ``messages`` into their topics now, where released messages go (the release
        target), idempotently by ``msg_id``; raises ``StoreUnavailable`` when it cannot."""
        ...


class Outlet(Protocol):
    """Where this server's messages go when they are kept in another broker (NATS JetStream,
    RabbitMQ: ``delayserver.targets``) instead of this one's topics."""

    async def publish(self, messages: Sequence[Message], *, check_duplicate: bool) -> None:
        """Return once the other broker acknowledged every message; ``StoreUnavailable`` (503)
        with the reason when it cannot take them."""
        ...

    def describe(self, topic: str) -> str:
        """Where ``topic``'s messages go and are consumed, for people."""
        ...
