"""Connection limits aiohttp lacks: a header read timeout and a maximum of open connections.

aiohttp closes an idle keep-alive connection after ``keepalive_timeout``, but has no timeout
for reading a request's headers: a client sending one byte every half second holds its
connection, and its memory, for as long as it likes. :class:`ConnectionGuard` wraps the
protocol factory of the runner's server (each connection's ``RequestHandler``) and

* closes a connection whose request headers are not complete within ``header_timeout_s`` of
  its first byte (or of the connection opening, for the first request); the middleware tells
  the guard when a request's headers are in, since aiohttp calls the handler only then;
* answers ``503`` and closes a new connection at once when ``max_connections`` are open.

:class:`GuardedSite` is a ``TCPSite`` whose server socket uses the guard; its TLS handshake
has the same timeout.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from tempomq.logs import get_logger

log = get_logger(__name__)


def _busy_response() -> bytes:
    body = orjson.dumps(
        {"error": "too_many_connections", "message": "the server has too many open connections"}
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_BUSY = _busy_response()


class _Guarded(asyncio.Protocol):
    """Stands between the transport and aiohttp's handler for one connection."""

    def __init__(self, guard: ConnectionGuard, inner: Any) -> None:
        self.guard = guard
        #: The connection's protocol; a lean front that hands the connection to aiohttp puts
        #: aiohttp's handler here (and under it in ``guard.open``).
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.in_request = False
        #: When the request now being read must have its headers in (loop time); None: no
        #: request is being read. The timer fires at or before it and is moved on lazily, so
        #: a request costs no timer of its own.
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.admitted = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not a subclass of asyncio.Transport, but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        if len(self.guard.open) >= self.guard.max_connections:
            self.guard.refused += 1
            self.transport.write(_BUSY)
            self.transport.close()
            return
        self.admitted = True
        self.guard.open[self.inner] = self
        self.arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        if self.deadline is None and not self.in_request:
            self.arm()  # the first byte of a next request on a kept-alive connection
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.admitted:
            self.guard.open.pop(self.inner, None)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    # -- the header timer ----------------------------------------------------------------------

    def arm(self) -> None:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.guard.header_timeout_s
        if self.timer is None:
            self.timer = loop.call_at(self.deadline, self._expired)

    def disarm(self) -> None:
        self.deadline = None

    def _expired(self) -> None:
        self.timer = None
        if self.deadline is None or self.in_request or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self.deadline:  # armed again since: wait for the new deadline
            self.timer = loop.call_at(self.deadline, self._expired)
        else:
            self.guard.timed_out += 1
            log.info(
                "connection closed: request headers not complete in time",
                peer=str(self.transport.get_extra_info("peername")),
            )
            self.transport.abort()


class ConnectionGuard:
    """Wraps a protocol factory; see the module docstring."""

    def __init__(self, *, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open: dict[object, _Guarded] = {}
        self.refused = 0
        self.timed_out = 0
        self.factory: Any = None

    def __call__(self) -> asyncio.Protocol:
        assert self.factory is not None, "GuardedSite sets the factory"
        return _Guarded(self, self.factory())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Headers are in once a handler runs: stop the timer until the response is out."""
        conn = self.open.get(request.protocol)
        if conn is None:
            return await handler(request)
        conn.in_request = True
        conn.disarm()
        try:
            return await handler(request)
        finally:
            conn.in_request = False


class GuardedSite(web.TCPSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        ssl_context: ssl.SSLContext | None = None,
        factory: Callable[[], asyncio.Protocol] | None = None,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self.guard = guard
        #: Makes each connection's protocol (the lean front); None: aiohttp's handler.
        self.factory = factory

    async def start(self) -> None:
        # TCPSite.start with the guard as the protocol factory and a handshake timeout.
        await web.BaseSite.start(self)
        self.guard.factory = self.factory or self._runner.server
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self.guard.header_timeout_s if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
        )
