"""HTTP calls with failover across endpoints and retries only where repeating is harmless.

Endpoints are alternatives (several servers, or several addresses of one service). The transport
sticks to the endpoint that last answered and moves on to the next when it stops answering, as
the Kuaishou SDK switches to its second cluster; there is no automatic fail-back.

What is retried, and why:

* A connection that never opened (refused, DNS, connect timeout): the server saw nothing, so
  *every* call moves to the next endpoint and tries again.
* No usable answer after the request went out (timeout, reset, 502/503/504): only
  ``idempotent`` calls are repeated; any other call raises, because the server may have acted.
* Any other answer (2xx, 4xx, 500) is final.

A call *pinned* to an endpoint (an ack of a receipt that server issued, the commit of a
transaction it holds) never moves elsewhere; it is repeated there under the same rules.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from tempomq.client.errors import (
    UNAVAILABLE_STATUSES,
    ConnectionFailed,
    RequestTimedOut,
    TempoClientError,
    Unavailable,
    error_from_response,
)
from tempomq.client.http1 import Http1Pool

log = logging.getLogger("tempomq.client")

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def normalize_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    """``"a:8080, http://b:8080/"`` or a list → ``("http://a:8080", "http://b:8080")``."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = []
    for item in items:
        url = item.strip().rstrip("/")
        if not url:
            continue
        url = url if "://" in url else f"http://{url}"
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// endpoint")
        out.append(url)
    if not out:
        raise ValueError("at least one endpoint is needed, like http://127.0.0.1:8080")
    return tuple(dict.fromkeys(out))


class Transport:
    """One keep-alive :class:`aiohttp.ClientSession` shared by every call of a client."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout_s: float,
        retries: int,
        session: aiohttp.ClientSession | None,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.endpoints = normalize_endpoints(endpoints)
        # Built once: every call sends the same credentials.
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._headers = {**auth, "Accept": "application/json"}
        self._json_headers = {**auth, **_JSON_HEADERS}
        self._ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.retries = retries
        self._session = session
        self._owns_session = session is None
        self._current = 0
        # Without a session of the caller's, calls go over the SDK's own lean connections: by
        # endpoint and lane (see _lane).
        self._pools: dict[tuple[str, bool], Http1Pool] | None = None if session is not None else {}
        self._head = b"".join(f"{k}: {v}\r\n".encode() for k, v in self._headers.items())
        self._json_head = b"".join(f"{k}: {v}\r\n".encode() for k, v in self._json_headers.items())

    @property
    def current(self) -> str:
        """The endpoint the next unpinned call goes to: the last one that answered."""
        return self.endpoints[self._current]

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or (self._owns_session and self._session.closed):
            connector = (
                aiohttp.TCPConnector(ssl=self._ssl_context)
                if self._ssl_context is not None
                else None
            )
            self._session = aiohttp.ClientSession(connector=connector)
            self._owns_session = True
        return self._session

    async def close(self) -> None:
        if self._pools:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _failed(self, endpoint: str) -> None:
        # Compare first: several calls failing at once must move on by one, not by several.
        if self.endpoints[self._current] == endpoint:
            self._current = (self._current + 1) % len(self.endpoints)
            if len(self.endpoints) > 1:
                log.warning("tempomq endpoint %s failed, switching to %s", endpoint, self.current)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        idempotent: bool,
        params: Mapping[str, str] | None = None,
        endpoint: str | None = None,
        extra_timeout_s: float = 0.0,
        retries: int | None = None,
    ) -> tuple[str, Any]:
        """Do the call; returns the endpoint that answered and the decoded JSON answer."""
        data = None if body is None else orjson.dumps(body)
        attempts = 1 + (self.retries if retries is None else retries)
        error: TempoClientError | None = None
        for attempt in range(attempts):
            base = endpoint or self.current
            # Straight on to an endpoint not yet tried in this call; wait before coming back.
            if attempt and (endpoint is not None or attempt >= len(self.endpoints)):
                await asyncio.sleep(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempt - 1)))
            try:
                pools = self._pools
                if pools is None:
                    url = base + path
                    return base, await self._once(method, url, data, params, extra_timeout_s)
                key = (base, _lane(method, path, params))
                pool = pools.get(key)
                if pool is None:
                    pool = pools[key] = Http1Pool(base, ssl_context=self._ssl_context)
                status, raw = await pool.request(
                    method,
                    path,
                    self._head if data is None else self._json_head,
                    data,
                    params,
                    self.timeout_s + extra_timeout_s,
                )
                return base, _answer(status, raw)
            except Unavailable as e:
                error = e
            if endpoint is None:
                self._failed(base)
            never_sent = isinstance(error, ConnectionFailed) and not error.sent
            if not (idempotent or never_sent):
                raise error
            log.debug("tempomq %s %s%s failed (%s), retrying", method, base, path, error)
        assert error is not None
        raise error

    async def _once(
        self,
        method: str,
        url: str,
        data: bytes | None,
        params: Mapping[str, str] | None,
        extra_timeout_s: float,
    ) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s + extra_timeout_s)
        headers = self._json_headers if data is not None else self._headers
        try:
            async with self._http().request(
                method, url, data=data, params=params, headers=headers, timeout=timeout
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError as e:  # the connection never opened
            raise ConnectionFailed(f"cannot connect to {url}: {e}", sent=False) from e
        except aiohttp.ConnectionTimeoutError as e:
            raise ConnectionFailed(f"connect to {url} timed out", sent=False) from e
        except TimeoutError as e:
            raise RequestTimedOut(f"{method} {url}: no answer within the timeout") from e
        except aiohttp.ClientError as e:
            raise ConnectionFailed(f"{method} {url}: {e!r}", sent=True) from e
        return _answer(status, raw)


#: Paths of the calls the server's lean HTTP front answers itself (POST, no query string).
_LEAN_SUFFIXES = ("/messages", "/receive", "/ack", "/nack", "/change-invisible")


def _lane(method: str, path: str, params: Mapping[str, str] | None) -> bool:
    """Whether a call goes on the connections kept for sends, receives and acks.

    The server's lean front hands a connection to its general HTTP stack for good at the first
    request it does not serve itself (docs/operations.md, "The lean HTTP path"): a
    ``create_topic`` on the connection the sends then use would make every later send cost the
    full stack. So those calls have connections of their own, and everything else others."""
    return method == "POST" and not params and "%" not in path and path.endswith(_LEAN_SUFFIXES)


def _answer(status: int, raw: bytes) -> Any:
    """The decoded answer; an error status raises its error."""
    payload = _decode(raw)
    if status >= 400:
        err = error_from_response(status, payload)
        if status in UNAVAILABLE_STATUSES and not isinstance(err, Unavailable):
            err = Unavailable(err.message, status=status, code=err.code)
        raise err
    return payload


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")  # a proxy's error page, say
