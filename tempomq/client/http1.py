"""A lean HTTP/1.1 client for the SDK's own calls: kept-alive connections, one request at a time
on each, the answer read whole.

Why not :class:`aiohttp.ClientSession` for these: a single send is a small JSON request and a
small JSON answer, and aiohttp's general machinery (request and response objects, cookie jar,
tracing hooks, the timeout context, stream readers) cost the SDK about as much CPU per call as
the server spends handling it. Here a call is one ``transport.write`` of the prepared bytes and a
parser that finds ``Content-Length`` (or chunks) in the answer's head. A session the caller
passes in (``Client(session=...)``) still goes through aiohttp.

Errors are :class:`~tempomq.client.errors.ConnectionFailed` (``sent=False`` when the connection
never opened, ``sent=True`` when it broke after the request went out) and
:class:`~tempomq.client.errors.RequestTimedOut`, as the aiohttp path raises them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit

from tempomq.client.errors import ConnectionFailed, RequestTimedOut

#: Longest response head accepted (status line and headers).
MAX_HEAD_BYTES = 64 * 1024
#: Request heads kept per endpoint (one per method and path; emptied when full).
_MAX_CACHED_HEADS = 256


class _Answer(asyncio.Protocol):
    """One connection: writes requests, parses each answer into (status, body)."""

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.buf = bytearray()
        self.status = 0
        self.body_start = -1  # where the body begins in buf, once the head is in
        self.length = -1  # Content-Length; -1 while unknown
        self.chunked = False
        self.keep_alive = True
        self.closed = False
        # One timer per connection rather than one per request: it is armed for the earliest
        # deadline it must see, and when it fires for a request that has since been answered
        # it moves on to the current request's deadline (or lapses while the connection idles).
        self.loop = asyncio.get_running_loop()
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes | bytearray) -> None:
        if self.waiter is None:  # bytes nobody asked for: the connection is not reusable
            self._close()
            return
        buf = self.buf
        if buf:
            buf += data
            data = buf
        try:
            # Mostly the whole answer is in one piece: parsed as it came, copied nowhere.
            if not self._parse(data) and data is not buf:
                buf += data
        except ValueError as e:
            self._fail(ConnectionFailed(f"bad HTTP answer from {self.pool.netloc}: {e}", sent=True))

    def eof_received(self) -> bool | None:
        unbounded = self.body_start >= 0 and self.length < 0 and not self.chunked
        if self.waiter is not None and unbounded:
            # An answer without a length ends with the connection.
            self._done(bytes(self.buf[self.body_start :]))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.waiter is not None and not self.waiter.done():
            cause = exc or ConnectionResetError("the server closed the connection")
            err = ConnectionFailed(f"{self.pool.netloc}: {cause!r}", sent=True)
            err.__cause__ = cause
            self.waiter.set_exception(err)
        self.waiter = None

    def request(self, data: bytes, timeout_s: float) -> asyncio.Future[tuple[int, bytes]]:
        """Write one request; the future gets (status, body), or :class:`_Expired` once
        ``timeout_s`` passes without the whole answer."""
        assert self.transport is not None and self.waiter is None
        loop = self.loop
        waiter = self.waiter = loop.create_future()
        self.buf.clear()
        self.body_start = self.length = -1
        self.chunked = False
        self.keep_alive = True
        deadline = self.deadline = loop.time() + timeout_s
        timer = self.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_at(deadline, self._check_deadline)
        self.transport.write(data)
        return waiter

    def _check_deadline(self) -> None:
        timer, self.timer = self.timer, None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # idle: the next request arms the timer again
        if timer is not None and timer.when() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._check_deadline)
            return
        waiter.set_exception(_Expired())

    def _parse(self, buf: bytes | bytearray) -> bool:
        """Take what ``buf`` (the answer so far) holds; True once the answer is complete."""
        if self.body_start < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise ValueError("response head too large")
                return False
            self._head(bytes(buf[: end + 2]))
        start = self.body_start
        if self.chunked:
            body = _dechunk(buf, start)
            if body is None:
                return False
            self._done(body)
            return True
        if self.length >= 0 and len(buf) - start >= self.length:
            self._done(bytes(buf[start : start + self.length]))
            return True
        return False

    def _head(self, head: bytes) -> None:
        """Status and the headers that frame the body, from the head (up to the CRLF of its
        last line)."""
        eol = head.find(b"\r\n")
        if not head.startswith(b"HTTP/1.") or head[8:9] != b" ":
            raise ValueError(f"not an HTTP/1 status line: {head[: min(eol, 80)]!r}")
        self.status = status = int(head[9:12])
        self.keep_alive = not head.startswith(b"HTTP/1.0")
        # The header lines, lowercased, each between CRLFs: one search per framing header.
        fields = head[eol:].lower()
        value = _field(fields, b"\r\ncontent-length:")
        if value is not None:
            self.length = int(value)
        value = _field(fields, b"\r\ntransfer-encoding:")
        if value is not None:
            self.chunked = b"chunked" in value
        value = _field(fields, b"\r\nconnection:")
        if value is not None:
            self.keep_alive = value.strip() != b"close"
        self.body_start = len(head) + 2
        if status in (204, 304) or 100 <= status < 200:
            self.length = 0

    def _done(self, body: bytes) -> None:
        waiter, self.waiter = self.waiter, None
        if not self.keep_alive:
            self._close()
        else:
            self.pool.release(self)
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, body))

    def _fail(self, err: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        self._close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(err)

    def _close(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()


def _field(fields: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (``b"\\r\\nname:"``) in ``fields``; None when absent."""
    at = fields.find(name)
    if at < 0:
        return None
    start = at + len(name)
    return fields[start : fields.index(b"\r\n", start)]


def _dechunk(buf: bytes | bytearray, pos: int) -> bytes | None:
    """The body of a complete chunked answer starting at ``pos``; None while incomplete."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            # Trailers (rare) end with an empty line.
            end = buf.find(b"\r\n\r\n", pos - 2)
            return bytes(out) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


class Http1Pool:
    """Kept-alive connections to one endpoint (``http://host:port`` or ``https://...``)."""

    def __init__(self, base_url: str, *, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.netloc = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self.ssl_context: ssl.SSLContext | None = None
        if self.tls:
            self.ssl_context = ssl_context or ssl.create_default_context()
        self._idle: list[_Answer] = []
        self._all: set[_Answer] = set()
        #: Request heads by (method, path, header lines), built once per kind of call.
        self._heads: dict[tuple[str, str, bytes], bytes] = {}

    def release(self, conn: _Answer) -> None:
        if not conn.closed:
            self._idle.append(conn)

    def forget(self, conn: _Answer) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    async def _connect(self, timeout_s: float) -> _Answer:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Answer(self),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.tls else None,
                )
        except TimeoutError as e:
            raise ConnectionFailed(f"connect to {self.netloc} timed out", sent=False) from e
        except (OSError, ssl.SSLError) as e:
            raise ConnectionFailed(f"cannot connect to {self.netloc}: {e}", sent=False) from e
        self._all.add(conn)
        return conn

    async def request(
        self,
        method: str,
        path: str,
        head: bytes,
        body: bytes | None,
        params: Mapping[str, str] | None,
        timeout_s: float,
    ) -> tuple[int, bytes]:
        """One call: ``head`` holds the header lines (each ending in CRLF) every call sends.
        Returns the status and the body bytes."""
        if params:
            target = f"{self.prefix}{path}?{urlencode(params)}"
            lines = self._lines(method, target, head)
        else:
            key = (method, path, head)
            cached = self._heads.get(key)
            if cached is not None:
                lines = cached
            else:
                if len(self._heads) >= _MAX_CACHED_HEADS:
                    self._heads.clear()  # ids in paths (GET /v1/messages/<id>) are unbounded
                lines = self._heads[key] = self._lines(method, self.prefix + path, head)
        if body is not None:
            data = b"%sContent-Length: %d\r\n\r\n%s" % (lines, len(body), body)
        else:
            data = lines + b"\r\n"
        conn = None
        while self._idle:
            candidate = self._idle.pop()
            if not candidate.closed:
                conn = candidate
                break
        if conn is None:
            conn = await self._connect(timeout_s)
        try:
            return await conn.request(data, timeout_s)
        except asyncio.CancelledError:
            conn._close()  # an answer may still come: this connection cannot be reused
            raise
        except _Expired:
            conn._close()
            target = self.prefix + path + (f"?{urlencode(params)}" if params else "")
            raise RequestTimedOut(
                f"{method} {self.netloc}{target}: no answer within the timeout"
            ) from None

    def _lines(self, method: str, target: str, head: bytes) -> bytes:
        """The request line, ``Host`` and ``head``: the request up to its body's length."""
        return f"{method} {target} HTTP/1.1\r\nHost: {self.netloc}\r\n".encode() + head

    def close(self) -> None:
        for conn in list(self._all):
            conn._close()
        self._idle.clear()
        self._all.clear()


class _Expired(Exception):
    pass
