"""Which ``check_url`` a transaction may register, and how the coordinator calls it safely.

A check-back makes the server POST a transaction's id, keys and properties to a URL the client
chose, so an unchecked ``check_url`` lets any client make the server call anything it can reach.
:class:`CheckUrlPolicy` allows only hosts on an allow-list of host names (``hooks.internal``,
or ``*.internal`` for any name under it) and networks (``10.0.0.0/8``); the empty list means
loopback only. An entry may name a port (``10.0.0.5:8080``, ``[::1]:9000``,
``hooks.internal:443``) to allow that port only. A URL is checked when the transaction is
prepared (refused with 400 ``check_url_not_allowed``) and again on every call, where
:class:`AllowListResolver` admits only allowed addresses, so a name that later resolves
elsewhere (DNS rebinding) is not called.
Calls follow no redirects and carry, when a secret is configured, ``X-Tempomq-Signature:
t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` so the producer can tell the
call came from this service.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from broker_core.errors import InvalidRequest, TempoError

MAX_URL_CHARS = 2048
SIGNATURE_HEADER = "X-Tempomq-Signature"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)|\*")
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
class AllowEntry:
    """One allow-list entry: a network or a host name pattern, on one port or (None) on all."""

    network: IPNetwork | None
    name: str | None
    port: int | None

    def allows(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            addr = _address(host)
            return addr is not None and addr in self.network
        assert self.name is not None
        host = host.lower().rstrip(".")
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name


def parse_allow_entry(text: str) -> AllowEntry:
    """``10.0.0.0/8``, ``10.0.0.5:8080``, ``[::1]:9000``, ``::1``, ``hooks.internal[:443]``,
    ``*.internal``; ValueError names what is wrong."""
    item = text.strip().lower()
    host, port_text = item, ""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [address]:port")
        port_text = rest[1:]
    elif item.count(":") == 1:  # an IPv4 address, a network or a name, with a port
        host, _, port_text = item.partition(":")
    port = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: {port_text!r} is not a port")
        port = int(port_text)
    try:
        return AllowEntry(ipaddress.ip_network(host, strict=False), None, port)
    except ValueError:
        pass
    name = host.rstrip(".")
    label = name.removeprefix("*.")
    if not label or not all(part and _LABEL.fullmatch(part) for part in label.split(".")):
        raise ValueError(f"{text!r} is neither a host name nor a network (CIDR)")
    if label.replace(".", "").isdigit():
        raise ValueError(f"{text!r} is not a valid address")
    return AllowEntry(None, name, port)


@dataclass(frozen=True, slots=True)
class CheckUrlPolicy:
    """The allow-list (see :func:`parse_allow_entry`; empty: loopback only) and the call's
    signing key."""

    allow: tuple[str, ...] = ()
    secret: bytes | None = field(default=None, repr=False)
    max_url_chars: int = MAX_URL_CHARS
    entries: tuple[AllowEntry, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        entries = tuple(parse_allow_entry(item) for item in self.allow or _LOOPBACK)
        object.__setattr__(self, "entries", entries)

    def allows_name(self, host: str, port: int) -> bool:
        """Allowed by a name entry, whatever the name resolves to."""
        return any(e.name is not None and e.allows(host, port) for e in self.entries)

    def allows_address(self, host: str, port: int) -> bool:
        return any(e.network is not None and e.allows(host, port) for e in self.entries)

    def allows_host(self, host: str, port: int) -> bool:
        return self.allows_name(host, port) or self.allows_address(host, port)

    def _target(self, url: str) -> tuple[str, int]:
        if len(url) > self.max_url_chars:
            raise InvalidRequest(f"'check_url' is longer than {self.max_url_chars} characters")
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError:  # e.g. an unclosed [ of an IPv6 address, or port 99999
            host = port = None
        if host is None or parts.scheme not in ("http", "https"):
            raise InvalidRequest("'check_url' must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise CheckUrlRefused("'check_url' must not carry credentials")
        return host, port or (443 if parts.scheme == "https" else 80)

    async def validate(self, url: str) -> str:
        """The URL if it may be called; else :class:`CheckUrlRefused` saying why."""
        host, port = self._target(url)
        if self.allows_host(host, port):
            return url
        if _address(host) is None:
            # A name off the name list is fine if everything it resolves to is allowed.
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except OSError:
                infos = []
            addrs = {str(info[4][0]) for info in infos}
            if addrs and all(self.allows_address(a, port) for a in addrs):
                return url
        raise CheckUrlRefused(
            f"'check_url' {host!r} port {port} is not on this server's allow-list "
            "(--check-url-allow; by default loopback only)"
        )

    def check_now(self, url: str) -> bool:
        """The call-time check of a stored URL; a name not allowed as such is let through
        here because :class:`AllowListResolver` then admits only allowed addresses."""
        try:
            host, port = self._target(url)
        except TempoError:
            return False
        return self.allows_host(host, port) or _address(host) is None

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
        if self.policy.allows_name(host, port):
            return results
        allowed = [r for r in results if self.policy.allows_address(r["host"], port)]
        if not allowed:
            raise OSError(f"{host} resolves to no address on the check_url allow-list")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
