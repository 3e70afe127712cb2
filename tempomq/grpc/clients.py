"""The live RocketMQ clients: one Telemetry stream each, and the check-backs pushed down them.

A client opens one bidirectional ``Telemetry`` stream per broker endpoint and writes its
settings first (its type, the topics it publishes, or its group). :class:`ClientRegistry`
keeps, per client id (``x-mq-client-id``), the latest stream with an outbox of commands to
write to it. It is also the coordinator's third check channel
(:class:`txcoord.coordinator.CheckChannel`): a transactional message sent over this protocol
records ``rocketmq:<client id>`` as its producer group, and its check-back is written as a
``recover_orphaned_transaction_command`` to that client's stream, or when that client is gone,
to any live producer stream that publishes the topic. The producer's checker answers with an
``EndTransaction`` of source ``SOURCE_SERVER_CHECK``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from broker_core.message import Message
from tempomq.grpc.convert import half_message_to_pb
from tempomq.grpc.protocol import definition_pb2 as pb
from tempomq.grpc.protocol import service_pb2 as spb
from txcoord.coordinator import TxRow

log = structlog.get_logger(__name__)

#: Producer group of transactions sent over the RocketMQ protocol: this + the client id.
PRODUCER_GROUP_PREFIX = "rocketmq:"


@dataclass(slots=True, eq=False)
class ClientSession:
    """One client's Telemetry stream: what it said it is, and what to write to it."""

    client_id: str
    client_type: int
    topics: frozenset[str] = frozenset()
    group: str = ""
    #: Commands to write to the stream; ``None`` ends it.
    outbox: asyncio.Queue[spb.TelemetryCommand | None] = field(default_factory=asyncio.Queue)

    @property
    def is_producer(self) -> bool:
        return self.client_type == pb.ClientType.PRODUCER


class ClientRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, ClientSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, client_id: str) -> ClientSession | None:
        return self._sessions.get(client_id)

    def open(self, session: ClientSession) -> None:
        """Register a stream; a client that reconnects replaces its earlier one."""
        old = self._sessions.get(session.client_id)
        self._sessions[session.client_id] = session
        if old is not None and old is not session:
            old.outbox.put_nowait(None)

    def close(self, session: ClientSession) -> None:
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    def terminate(self, client_id: str) -> None:
        """``NotifyClientTermination``: end the client's stream."""
        session = self._sessions.pop(client_id, None)
        if session is not None:
            session.outbox.put_nowait(None)

    def close_all(self) -> None:
        for session in self._sessions.values():
            session.outbox.put_nowait(None)
        self._sessions.clear()

    # -- the coordinator's check channel ----------------------------------------------------------

    def claims(self, producer_group: str) -> bool:
        return producer_group.startswith(PRODUCER_GROUP_PREFIX)

    def push(self, row: TxRow, message: Message | None) -> None:
        if message is None:
            return
        session = self._producer_for(row.producer_group[len(PRODUCER_GROUP_PREFIX) :], row.topic)
        if session is None:
            log.info("grpc.check_no_producer", tx_id=row.tx_id, topic=row.topic)
            return
        command = spb.TelemetryCommand()
        command.recover_orphaned_transaction_command.transaction_id = row.tx_id
        command.recover_orphaned_transaction_command.message.CopyFrom(half_message_to_pb(message))
        session.outbox.put_nowait(command)

    def _producer_for(self, client_id: str, topic: str) -> ClientSession | None:
        session = self._sessions.get(client_id)
        if session is not None and session.is_producer:
            return session
        for other in self._sessions.values():
            if other.is_producer and topic in other.topics:
                return other
        return None
