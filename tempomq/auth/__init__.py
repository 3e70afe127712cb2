"""Authentication, authorization, TLS and connection/rate limits of the service's listeners.

:class:`Auth` (in :mod:`tempomq.auth.core`) is the one entry point: the HTTP middleware uses it
and another protocol front calls ``Auth.enabled``, ``authenticate_bearer``,
``authenticate_rocketmq``, ``authorize`` and ``check_rate`` directly (see that module).
The pure parts: :mod:`~tempomq.auth.policy` (principals, grants, the check),
:mod:`~tempomq.auth.rocketmq` (the RocketMQ client's signature), :mod:`~tempomq.auth.ratelimit`
(token buckets); the file: :mod:`~tempomq.auth.principals`; the per-route permission table:
:mod:`~tempomq.auth.routes`; sockets: :mod:`~tempomq.auth.limits`, :mod:`~tempomq.auth.tls`.
The broker, delay and transaction cores never import this package.
"""

from __future__ import annotations

from tempomq.auth.core import PRINCIPAL, Auth
from tempomq.auth.errors import Forbidden, TooManyRequests, Unauthenticated
from tempomq.auth.limits import ConnectionGuard, GuardedSite
from tempomq.auth.policy import ANONYMOUS, Principal, RateLimit
from tempomq.auth.principals import AuthFileError, hash_token, new_token
from tempomq.auth.tls import server_context

__all__ = [
    "ANONYMOUS",
    "PRINCIPAL",
    "Auth",
    "AuthFileError",
    "ConnectionGuard",
    "Forbidden",
    "GuardedSite",
    "Principal",
    "RateLimit",
    "TooManyRequests",
    "Unauthenticated",
    "hash_token",
    "new_token",
    "server_context",
]
