"""The broker core's facade: the store, consumer groups and the background work that keeps
them durable (periodic flush and checkpoint, offsets, retention), started and stopped as one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from broker_core import metrics
from broker_core.claims import IdClaims
from broker_core.config import BrokerConfig
from broker_core.errors import ConsumeOnTarget, MessageNotFound, TopicNotFound
from broker_core.groups import Delivery, GroupConfig, GroupManager, ReceiptFailure
from broker_core.message import DLQ_PREFIX, Message, StoredMessage, is_system_topic
from broker_core.protocols import Outlet, Scheduler, Timers
from broker_core.retry import dlq_topic, retry_of
from broker_core.store import MessageStore, PutResult, TopicConfig
from broker_core.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

_RETENTION_EVERY_S = 60.0


class Broker:
    def __init__(
        self, config: BrokerConfig, *, timers: Timers, scheduler: Scheduler | None = None
    ) -> None:
        self.config = config
        self.timers = timers
        self.store = MessageStore(config, clock=timers.now_ms)
        self.groups = GroupManager(self.store, config, timers=timers, scheduler=scheduler)
        self._tasks: list[asyncio.Task[None]] = []
        #: Ids being sent now (:mod:`broker_core.claims`): one send per id at a time.
        self.claims = IdClaims()
        #: Set when messages are kept in another broker (``--release-to``): sends go there,
        #: and receiving here answers :class:`ConsumeOnTarget`.
        self.outlet: Outlet | None = None

    @property
    def scheduler(self) -> Scheduler | None:
        return self.groups.scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Scheduler | None) -> None:
        # The delay server is built on top of a started store, so it is wired in afterwards;
        # only then may the deliveries restored at start fail over to their retries.
        self.groups.scheduler = scheduler
        if scheduler is not None and self._tasks:
            self.groups.resume()

    async def start(self) -> None:
        await self.store.start()
        await self.groups.restore()
        if self.groups.scheduler is not None:
            self.groups.resume()
        self.store.on_dispatch = self.groups.wake
        self._tasks = [
            asyncio.create_task(self._flusher(), name="tempomq-flusher"),
            asyncio.create_task(self._retention(), name="tempomq-retention"),
        ]
        metrics.LAG.sources.append(self.groups.lag_by_group)
        log.info("broker.started", data_dir=str(self.config.data_dir), flush=self.config.flush)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):  # never added: start() failed early
            metrics.LAG.sources.remove(self.groups.lag_by_group)
        await cancel_and_wait(self._tasks)
        self._tasks = []
        await self.groups.stop()
        await self.store.stop()
        snapshot = self.groups.snapshot()
        if snapshot is not None:
            self.groups.save(snapshot)
        log.info("broker.stopped")

    def begin_shutdown(self) -> None:
        """The server stops accepting requests: let long polls return at once."""
        self.groups.begin_shutdown()

    def health(self) -> str | None:
        """None when the broker can take writes, else why not."""
        return self.store.failure

    async def _flusher(self) -> None:
        interval_s = self.config.flush_interval_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.store.flush()
                snapshot = self.groups.snapshot()
                if snapshot is not None:
                    await loop.run_in_executor(None, self.groups.save, snapshot)
            except OSError as e:
                log.error("broker.flush_failed", error=str(e))

    async def _retention(self) -> None:
        while True:
            await asyncio.sleep(_RETENTION_EVERY_S)
            try:
                n = await self.store.enforce_retention()
                if n:
                    log.info("broker.retention", segments_deleted=n)
            except OSError as e:
                log.error("broker.retention_failed", error=str(e))

    # -- topics and messages -------------------------------------------------------------------

    async def create_topic(self, name: str, queues: int | None = None) -> TopicConfig:
        return await self.store.create_topic(
            name, self.config.default_queues if queues is None else queues
        )

    async def delete_topic(self, name: str) -> dict[str, object]:
        """Delete topic ``name`` and its groups' retry topics (docs/concepts.md, "Deleting a
        topic"): what it holds becomes unreachable at once, groups forget their cursors and
        deliveries out on it, and a delayed message, retry or committed transaction meant for
        it is dropped when due (:meth:`MessageStore.is_orphan`). Dead letters that came from it
        stay in their group's ``%DLQ%<group>``. Deleting a ``%DLQ%<group>`` removes its dead
        letters; while the group exists its dead-letter topic is there again at once, empty.
        Returns what was deleted: ``{"deleted", "messages", "groups", "retry_topics"}``.
        Raises ``TopicNotFound``."""
        topic = self.store.topic(name)
        messages = self._held(topic)
        groups = self.groups.forget_topic(name)
        retries = self._retry_topics(lambda group, topic: topic == name)
        await self.store.delete_topic(name)
        for retry in retries:
            await self.store.delete_topic(retry)
        if name.startswith(DLQ_PREFIX) and name[len(DLQ_PREFIX) :] in self.groups.groups:
            await self.store.ensure_topic(name, 1)  # as it is from the moment its group is
        return {"deleted": name, "messages": messages, "groups": groups, "retry_topics": retries}

    async def delete_group(self, name: str) -> dict[str, object]:
        """Delete consumer group ``name`` (docs/concepts.md, "Deleting a group"): its config,
        cursors, offsets and deliveries out are forgotten, its retry topics deleted (a retry
        due for it later is dropped), and its dead-letter topic deleted when empty; one that
        holds dead letters is kept for inspection. Returns ``{"deleted", "retry_topics",
        "dlq_topic", "dlq_messages"}`` (``dlq_topic`` None when it was deleted).
        Raises ``GroupNotFound``."""
        await self.groups.delete_group(name)
        retries = self._retry_topics(lambda group, topic: group == name)
        for retry in retries:
            await self.store.delete_topic(retry)
        dlq = self.store.topics.get(dlq_topic(name))
        kept = 0 if dlq is None else self._held(dlq)
        if dlq is not None and not kept:
            await self.store.delete_topic(dlq.name)
        return {
            "deleted": name,
            "retry_topics": retries,
            "dlq_topic": dlq_topic(name) if kept else None,
            "dlq_messages": kept,
        }

    def _retry_topics(self, match: Callable[[str, str], bool]) -> list[str]:
        """Retry topics whose (group, topic) ``match`` accepts."""
        return sorted(t for t in self.store.topics if (r := retry_of(t)) is not None and match(*r))

    def _held(self, topic: TopicConfig) -> int:
        """Messages ``topic`` holds now (its queues' ranges)."""
        return sum(
            hi - lo
            for lo, hi in (self.store.queue_bounds(topic.name, q) for q in range(topic.queues))
        )

    def list_topics(self, *, include_system: bool = False) -> list[TopicConfig]:
        return sorted(
            (
                t
                for t in self.store.topics.values()
                if include_system or not is_system_topic(t.name)
            ),
            key=lambda t: t.name,
        )

    def get_topic(self, name: str) -> TopicConfig:
        return self.store.topic(name)

    async def resolve_topic(self, name: str) -> TopicConfig:
        """The topic to send to, auto-created when the config allows. With an outlet the topic
        lives in the other broker: one queue, nothing created here."""
        if self.outlet is not None:
            return TopicConfig(name, 1, 0)
        topic = self.store.topics.get(name)
        if topic is None:
            if not self.config.auto_create_topics:
                raise TopicNotFound(
                    f"topic {name!r} does not exist: create it with `tempomq topic create {name}`"
                    " (POST /v1/topics), or start the server with --auto-create-topics"
                )
            topic = await self.store.ensure_topic(name, self.config.default_queues)
        return topic

    async def put(
        self, messages: Sequence[Message], *, check_duplicate: bool, checked: bool = False
    ) -> list[PutResult]:
        """Store ``messages`` in their topics, here or in the other broker (see
        :meth:`MessageStore.put_many` for ``check_duplicate`` and ``checked``)."""
        outlet = self.outlet
        if outlet is None:
            return await self.store.put_many(
                messages, check_duplicate=check_duplicate, checked=checked
            )
        for msg in messages:
            if not msg.msg_id:
                msg.msg_id = self.store.new_msg_id()
        await outlet.publish(messages, check_duplicate=check_duplicate)
        # Where it is in the other broker is that broker's business: no offsets here.
        return [PutResult(m.msg_id, m.topic, max(m.queue_id, 0), -1, -1) for m in messages]

    def check_consumable(self) -> None:
        """Raise :class:`ConsumeOnTarget` when messages are kept in another broker."""
        if self.outlet is not None:
            raise ConsumeOnTarget(
                "this server keeps messages in another broker: consume them with its own "
                f"clients ({self.outlet.describe('<topic>')}); tempomq's receive, ack, nack "
                "and change-invisible do not apply"
            )

    def get_message(self, msg_id: bytes) -> StoredMessage:
        """The message as its topic holds it (not a copy parked in a system topic)."""
        found = [m for m in self.store.lookup_id(msg_id) if not is_system_topic(m.topic)]
        if not found:
            raise MessageNotFound(f"no message {msg_id.hex()}")
        return found[0]

    def query_key(self, topic: str, key: str, limit: int = 64) -> list[StoredMessage]:
        self.store.topic(topic)
        return self.store.lookup_key(topic, key, limit)

    # -- consumption ---------------------------------------------------------------------------

    async def create_group(
        self, name: object, *, fifo: object, max_attempts: object
    ) -> GroupConfig:
        return await self.groups.create_group(name, fifo=fifo, max_attempts=max_attempts)

    def group_config(self, name: str) -> GroupConfig | None:
        """The group's settings, or None for a group not created yet."""
        return self.groups.groups.get(name)

    async def receive(self, topic: str, group: str, **kw: Any) -> list[Delivery]:
        self.check_consumable()
        return await self.groups.receive(topic, group, **kw)

    async def ack(
        self,
        topic: str,
        group: str,
        receipts: list[object],
        *,
        failed: list[ReceiptFailure] | None = None,
    ) -> int:
        return await self.groups.ack(topic, group, receipts, failed=failed)

    async def nack_all(
        self,
        topic: str,
        group: str,
        receipts: list[object],
        retry_after_ms: int | None,
        failed: list[ReceiptFailure],
    ) -> int:
        return await self.groups.nack_all(topic, group, receipts, retry_after_ms, failed)

    async def nack(
        self, topic: str, group: str, receipt: object, retry_after_ms: int | None
    ) -> None:
        await self.groups.nack(topic, group, receipt, retry_after_ms)

    async def change_invisible(
        self, topic: str, group: str, receipt: object, invisible_ms: int
    ) -> str:
        """Keep a delivery out for ``invisible_ms`` from now under the returned new receipt."""
        return await self.groups.change_invisible(topic, group, receipt, invisible_ms)

    async def group_stats(self, topic: str, group: str) -> dict[str, object]:
        return await self.groups.stats(topic, group)

    async def reset(self, topic: str, group: str, timestamp_ms: int) -> list[dict[str, int]]:
        return await self.groups.reset(topic, group, timestamp_ms)
