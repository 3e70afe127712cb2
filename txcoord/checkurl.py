"""Which ``check_url`` a transaction may register, and how the coordinator calls it safely.

A check-back makes the server POST a transaction's id, keys and properties to a URL the client
chose, so an unchecked ``check_url`` lets any client make the server call anything it can reach.
:class:`CheckUrlPolicy` allows only hosts on an allow-list of host names (``hooks.internal``,
or ``*.internal`` for any name under it) and networks (``10.0.0.0/8``); the empty list means
loopback only. A URL is checked when the transaction is prepared (refused with 400
``check_url_not_allowed``) and again on every call, where :class:`AllowListResolver` admits only
allowed addresses, so a name that later resolves elsewhere (DNS rebinding) is not called.
Calls follow no redirects and carry, when a secret is configured, ``X-Tempomq-Signature:
t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` so the producer can tell the
call came from this service.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from broker_core.errors import InvalidRequest, TempoError

MAX_URL_CHARS = 2048
SIGNATURE_HEADER = "X-Tempomq-Signature"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_LOOPBACK = ("127.0.0.0/8", "::1/128", "localhost")


class CheckUrlRefused(TempoError):
    """The URL is well formed but names a host this server may not call."""

    status, code = 400, "check_url_not_allowed"


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class CheckUrlPolicy:
    """The allow-list (host names and CIDRs; empty: loopback only) and the call's signing key."""

    allow: tuple[str, ...] = ()
    secret: bytes | None = field(default=None, repr=False)
    max_url_chars: int = MAX_URL_CHARS
    networks: tuple[IPNetwork, ...] = field(init=False, default=())
    names: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        networks, names = [], set()
        for item in self.allow or _LOOPBACK:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                names.add(item.lower().rstrip("."))
        object.__setattr__(self, "networks", tuple(networks))
        object.__setattr__(self, "names", frozenset(names))

    def allows_name(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if host in self.names:
            return True
        return any(n.startswith("*.") and host.endswith(n[1:]) for n in self.names)

    def allows_address(self, host: str) -> bool:
        addr = _address(host)
        return addr is not None and any(addr in net for net in self.networks)

    def allows_host(self, host: str) -> bool:
        return self.allows_name(host) or self.allows_address(host)

    def _host(self, url: str) -> str:
        if len(url) > self.max_url_chars:
            raise InvalidRequest(f"'check_url' is longer than {self.max_url_chars} characters")
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:  # e.g. an unclosed [ of an IPv6 address
            host = None
        if host is None or parts.scheme not in ("http", "https"):
            raise InvalidRequest("'check_url' must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise CheckUrlRefused("'check_url' must not carry credentials")
        return host

    async def validate(self, url: str) -> str:
        """The URL if it may be called; else :class:`CheckUrlRefused` saying why."""
        host = self._host(url)
        if self.allows_host(host):
            return url
        if _address(host) is None and self.networks:
            # A name off the name list is fine if everything it resolves to is allowed.
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, None, type=socket.SOCK_STREAM
                )
            except OSError:
                infos = []
            addrs = {str(info[4][0]) for info in infos}
            if addrs and all(self.allows_address(a) for a in addrs):
                return url
        raise CheckUrlRefused(
            f"'check_url' host {host!r} is not on this server's allow-list "
            "(--check-url-allow; by default loopback only)"
        )

    def check_now(self, url: str) -> bool:
        """The call-time check of a stored URL (names resolve through the resolver below)."""
        try:
            host = self._host(url)
        except TempoError:
            return False
        return self.allows_host(host) or (_address(host) is None and bool(self.networks))

    def signature(self, body: bytes, now_s: int) -> str | None:
        if self.secret is None:
            return None
        mac = hmac.new(self.secret, f"{now_s}.".encode() + body, hashlib.sha256)
        return f"t={now_s},v1={mac.hexdigest()}"


class AllowListResolver(AbstractResolver):
    """Resolves names as usual, then keeps only addresses the policy allows."""

    def __init__(self, policy: CheckUrlPolicy) -> None:
        self.policy = policy
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self.policy.allows_name(host):
            return results
        allowed = [r for r in results if self.policy.allows_address(r["host"])]
        if not allowed:
            raise OSError(f"{host} resolves to no address on the check_url allow-list")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
