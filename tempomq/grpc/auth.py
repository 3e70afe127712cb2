"""The one authentication and authorisation hook every RocketMQ-protocol call goes through.

The servicer calls :meth:`GrpcAuth.check` first in every RPC with the call's metadata (the
client's ``authorization``, ``x-mq-date-time``, ``x-mq-client-id``, ...), the RPC's name and the
topics and groups it touches. Refusing is raising a :class:`~broker_core.errors.TempoError`:
status 401 answers the RPC with RocketMQ's ``UNAUTHORIZED``, 403 with ``FORBIDDEN`` (see
:func:`tempomq.grpc.convert.code_for`). The default lets everything through, as the HTTP API
does without auth configured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

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
