"""The :class:`Auth` service: authenticate a request, authorize what it touches, limit its rate.

One instance serves every listener. The HTTP API uses it through :meth:`Auth.middleware`;
another protocol front (the RocketMQ 5 gRPC endpoint) uses the same four calls directly:

``Auth.enabled: bool``
    False when neither ``--auth-file`` nor ``TEMPOMQ_ADMIN_TOKEN`` is given; every
    ``authenticate_*`` call then returns :data:`~tempomq.auth.policy.ANONYMOUS`, which may do
    everything (the server only binds loopback addresses then, see :func:`check_bind`).
``Auth.authenticate_bearer(token: str) -> Principal``
    A service token, as sent in ``Authorization: Bearer <token>``; raises
    :class:`~tempomq.auth.errors.Unauthenticated` (401) if it names no principal.
``Auth.authenticate_rocketmq(metadata: Mapping[str, str]) -> Principal``
    The official RocketMQ client's ``authorization`` / ``x-mq-date-time`` metadata
    (lower-case keys), verified against the principal's secret key
    (:mod:`tempomq.auth.rocketmq`); raises ``Unauthenticated`` (401).
``Auth.authorize(principal, action: str, resource: str) -> None``
    ``resource`` is ``topic:NAME``, ``group:NAME``, ``producer_group:NAME`` or ``cluster``;
    raises :class:`~tempomq.auth.errors.Forbidden` (403) naming the missing permission.
    On gRPC, map 401 to ``UNAUTHORIZED``, 403 to ``FORBIDDEN`` and 429 to
    ``TOO_MANY_REQUESTS`` (:meth:`Auth.check_rate` raises the 429).

The principals are reloaded from the auth file by :meth:`Auth.reload` (the server calls it on
SIGHUP); a file that does not load leaves the previous principals in force.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from broker_core.errors import TempoError
from broker_core.http import VISIBLE
from tempomq.auth import rocketmq
from tempomq.auth.errors import Forbidden, TooManyRequests, Unauthenticated
from tempomq.auth.policy import ANONYMOUS, Principal, RateLimit, split_resource
from tempomq.auth.principals import Directory, load_directory, new_token
from tempomq.auth.ratelimit import RateLimiter
from tempomq.auth.routes import LIST_ACTIONS, Rule, rule_for
from tempomq.auth.tls import peer_subject
from tempomq.logs import get_logger

log = get_logger(__name__)

#: Where the middleware leaves the request's principal for handlers that want it.
PRINCIPAL = web.RequestKey("principal", Principal)

_BEARER = "bearer "


class Auth:
    """Principals, the checks on them, and the per-principal rate limiter."""

    def __init__(
        self,
        *,
        auth_file: Path | None = None,
        admin_token: str | None = None,
        rate_limit: RateLimit | None = None,
        metrics_public: bool = False,
        clock_s: Callable[[], float] = time.monotonic,
        wall_clock_s: Callable[[], float] = time.time,
    ) -> None:
        self.enabled = auth_file is not None or admin_token is not None
        self.auth_file = auth_file
        self._admin_token = admin_token
        #: name -> token of admins the server makes for itself (the in-server probe)
        self._internal: dict[str, str] = {}
        self.directory = self._load() if self.enabled else Directory()
        self.limiter = RateLimiter(rate_limit)
        self.metrics_public = metrics_public
        self._clock_s = clock_s
        self._rules: dict[web.AbstractRoute, Rule | None] = {}
        self._wall_clock_s = wall_clock_s

    def reload(self) -> bool:
        """Read the auth file again; on any error keep the principals in force. True if loaded."""
        if not self.enabled:
            return False
        try:
            self.directory = self._load()
        except Exception as exc:
            log.error("auth reload failed; previous principals stay in force", error=str(exc))
            return False
        log.info("auth reloaded", principals=len(self.directory.principals))
        return True

    def _load(self) -> Directory:
        return load_directory(self.auth_file, self._admin_token, internal=self._internal)

    def internal_token(self, name: str) -> str | None:
        """A token for a client inside this process (the probe), valid until it exits; it
        names an admin principal ``name``. None when auth is off (no token needed)."""
        if not self.enabled:
            return None
        token = self._internal.get(name) or new_token()
        self._internal[name] = token
        self.directory = self._load()
        return token

    # -- authentication ------------------------------------------------------------------------

    def authenticate_bearer(self, token: str) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        principal = self.directory.find_token(token)
        if principal is None:
            raise Unauthenticated("the bearer token is not valid")
        return principal

    def authenticate_rocketmq(self, metadata: Mapping[str, str]) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        value = metadata.get("authorization")
        date_time = metadata.get(rocketmq.SIGNED_HEADER)
        if not value or not date_time:
            raise Unauthenticated(
                f"credentials required: authorization and {rocketmq.SIGNED_HEADER} metadata"
            )
        try:
            header = rocketmq.parse_authorization(value)
            found = self.directory.by_access_key.get(header.access_key)
            if found is None:
                raise rocketmq.SignatureError("unknown access key")
            principal, secret_key = found
            rocketmq.check_skew(date_time, self._wall_clock_s())
            rocketmq.verify(header, date_time, secret_key)
        except rocketmq.SignatureError as exc:
            raise Unauthenticated(str(exc)) from None
        return principal

    def authenticate_subject(self, subject: str) -> Principal | None:
        """The principal a verified client certificate's subject maps to, if any."""
        return self.directory.by_cert_subject.get(subject)

    def authenticate_request(self, request: web.Request) -> Principal:
        """Bearer token if one is sent, else a mapped client certificate, else 401."""
        return self.authenticate_http(request.headers.get("Authorization"), request.transport)

    def authenticate_http(
        self, header: str | None, transport: asyncio.BaseTransport | None
    ) -> Principal:
        """The ``Authorization`` header's bearer token if one is sent, else the connection's
        mapped client certificate, else 401."""
        if header is not None:
            if header[: len(_BEARER)].lower() != _BEARER:
                raise Unauthenticated("use Authorization: Bearer <token>")
            return self.authenticate_bearer(header[len(_BEARER) :].strip())
        subject = peer_subject(transport)
        if subject is not None:
            principal = self.authenticate_subject(subject)
            if principal is not None:
                return principal
            raise Unauthenticated(f"client certificate {subject!r} is not mapped to a principal")
        raise Unauthenticated("credentials required: send Authorization: Bearer <token>")

    # -- authorization -------------------------------------------------------------------------

    def authorize(self, principal: Principal, action: str, resource: str) -> None:
        try:
            kind, name = split_resource(resource)
        except ValueError as exc:
            raise Forbidden(str(exc)) from None
        if not principal.allows(action, kind, name):
            raise Forbidden(f"principal {principal.name!r} lacks {action} on {resource}")

    def check_rate(self, principal: Principal, key: str | None = None) -> None:
        """Take one request from the principal's bucket (``key``: who, when auth is off)."""
        wait_s = self.limiter.take(key or principal.name, principal.rate_limit, self._clock_s())
        if wait_s > 0:
            raise TooManyRequests(
                f"rate limit of {principal.name!r} reached; retry in {wait_s:.3f}s",
                retry_after_s=wait_s,
            )

    # -- the HTTP middleware -------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authenticate, rate-limit and authorize every request before its handler runs."""
        if not self.enabled:
            # Everyone may do everything; only the rate limit applies, per client address.
            self.check_rate(ANONYMOUS, key=request.remote or "")
            return await handler(request)
        rule = rule_for(request, self._rules)
        if rule is None:
            log.error("route has no permission rule; refused", path=request.path)
            raise Forbidden(f"{request.method} {request.path} has no permission rule")
        if rule.public or (self.metrics_public and request.path == "/metrics"):
            return await handler(request)
        principal = self.authenticate_request(request)
        self.check_rate(principal)
        await self.check_needs(rule, principal, request)
        if rule.lists is not None and not principal.admin:
            actions = LIST_ACTIONS[rule.lists]
            request[VISIBLE] = lambda name: principal.allows_any(actions, rule.lists or "", name)
        request[PRINCIPAL] = principal
        if not audited(rule, principal, request.method):
            return await handler(request)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except TempoError as exc:
            status = exc.status
            raise
        finally:
            audit(principal, request.method, request.path, status)

    async def check_needs(self, rule: Rule, principal: Principal, request: Any) -> None:
        """Raise ``Forbidden`` (403) unless ``principal`` holds what ``rule`` needs of the
        request (anything with the ``match_info`` the rule's resolvers read)."""
        if rule.needs is not None and not principal.admin:
            for need in await rule.needs(request):
                if not principal.allows_any(need.actions, need.kind, need.name):
                    raise Forbidden(f"principal {principal.name!r} lacks {need.describe()}")


def audited(rule: Rule, principal: Principal, method: str) -> bool:
    """Whether a request goes to the audit log: an admin route, or a change by an admin."""
    return rule.admin or (principal.admin and method not in ("GET", "HEAD"))


def audit(principal: Principal, method: str, path: str, status: int) -> None:
    log.info("audit", principal=principal.name, method=method, path=path, status=status)
