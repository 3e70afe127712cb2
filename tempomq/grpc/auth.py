"""The one authentication and authorisation hook every RocketMQ-protocol call goes through.

The servicer calls :meth:`GrpcAuth.check` first in every RPC with the call's metadata (the
client's ``authorization``, ``x-mq-date-time``, ``x-mq-client-id``, ...), the RPC's name and the
topics and groups it touches. Refusing is raising a :class:`~broker_core.errors.TempoError`:
status 401 answers the RPC with RocketMQ's ``UNAUTHORIZED``, 403 with ``FORBIDDEN`` (see
:func:`tempomq.grpc.convert.code_for`). The default lets everything through, as the HTTP API
does without auth configured; with principals configured the server uses
:class:`PrincipalAuth`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from broker_core.errors import TempoError
from tempomq.auth import Auth
from tempomq.auth.policy import CONSUME, PRODUCE, Principal, resource

ResourceKind = Literal["topic", "group"]
#: What a call touches: ("topic", "orders"), ("group", "billing").
Resource = tuple[ResourceKind, str]


class GrpcAuth(Protocol):
    async def check(
        self, metadata: Mapping[str, str], rpc: str, resources: Sequence[Resource]
    ) -> None:
        """Return to allow the call; raise a 401/403 ``TempoError`` to refuse it."""
        ...


class AllowAll:
    """No authentication: every call is allowed."""

    async def check(
        self, metadata: Mapping[str, str], rpc: str, resources: Sequence[Resource]
    ) -> None:
        return None


#: What each RPC needs on the topics and groups it names (tempomq.auth's actions).
_PRODUCE_RPCS = frozenset({"SendMessage", "EndTransaction", "RecallMessage"})
_CONSUME_RPCS = frozenset(
    {
        "ReceiveMessage",
        "AckMessage",
        "ChangeInvisibleDuration",
        "ForwardMessageToDeadLetterQueue",
        "QueryAssignment",
    }
)


class PrincipalAuth:
    """The server's principals (:mod:`tempomq.auth`) on the RocketMQ protocol.

    The client's ``authorization`` signature (access key / secret key, over ``x-mq-date-time``)
    names a principal; its rate limit applies as over HTTP; and each RPC needs, on what it
    names: ``produce`` on the topic to send, end a transaction or recall; ``consume`` on topic
    and group to receive, ack, change invisibility, dead-letter or be assigned queues; either
    to ask for a route; a producer's Telemetry needs ``produce`` on its topics, a consumer's
    ``consume`` on its group and topics. Heartbeats and goodbyes need a valid signature only.
    """

    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    async def check(
        self, metadata: Mapping[str, str], rpc: str, resources: Sequence[Resource]
    ) -> None:
        auth = self.auth
        principal = auth.authenticate_rocketmq(metadata)
        auth.check_rate(principal, metadata.get("x-mq-client-id"))
        consumer = any(kind == "group" for kind, _ in resources)
        if rpc in _PRODUCE_RPCS or (rpc == "Telemetry" and not consumer):
            action = PRODUCE
        elif rpc in _CONSUME_RPCS or rpc in ("Telemetry", "Heartbeat"):
            action = CONSUME
        elif rpc == "QueryRoute":
            self._route(principal, resources)
            return
        else:
            return
        for kind, name in resources:
            auth.authorize(principal, action, resource(kind, name))

    def _route(self, principal: Principal, resources: Sequence[Resource]) -> None:
        for kind, name in resources:
            target = resource(kind, name)
            try:
                self.auth.authorize(principal, PRODUCE, target)
            except TempoError:
                self.auth.authorize(principal, CONSUME, target)
