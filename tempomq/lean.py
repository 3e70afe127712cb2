"""A lean HTTP/1.1 front for the hot routes; any other request goes to aiohttp with its connection.

Most of the server's CPU per single send went to aiohttp's request machinery (the request
object, the middleware chain, the router, response preparation and header serialization), not
to tempomq's own work. :class:`LeanProtocol` is the protocol of each connection of the HTTP
port: it reads a strict subset of HTTP/1.1 itself and answers

* ``POST /v1/topics/{topic}/messages`` (single and batch, plain and delayed),
* ``POST /v1/topics/{topic}/groups/{group}/receive`` (long polls too), ``.../ack``,
  ``.../nack`` and ``.../change-invisible``,
* ``GET /healthz``,

with the same work as the aiohttp routes: the shared functions of :mod:`broker_core.http`
for parsing, validation and rendering, :class:`~tempomq.auth.core.Auth` for authentication,
rate limit, the route's permission rule (:data:`tempomq.auth.routes.ROUTES`) and the audit
log, and :mod:`tempomq.app` for request ids, error bodies, the request metric and the debug
request log. So each answer is the one aiohttp would give: status, JSON body, Content-Type,
X-Request-Id, WWW-Authenticate / Retry-After, Date and Server.

What it parses: a request line ``METHOD SP target SP HTTP/1.1`` naming one of those routes
with plain path segments (letters, digits, ``._~-``), then header lines ``name: value`` of
printable ASCII ending in CRLF, then a body of exactly ``Content-Length`` bytes, at most
``--max-request-bytes``. Anything else (another route or method, a query string, a
percent-encoded path, HTTP/1.0, ``Transfer-Encoding``, ``Content-Encoding``, ``Expect``,
``Upgrade``, a missing, duplicate or malformed ``Content-Length``, an unusual ``Connection``,
obs-fold, bare LF, non-ASCII bytes, a head over 8 KiB, a larger body) hands the connection to
aiohttp's ``RequestHandler`` together with every byte not yet answered, starting at that request;
aiohttp then answers it (400, 413, 431, ... as it always did) and keeps the connection. The
parser is our own, not httptools (llhttp): a hand-over needs the byte offset where the
unanswered request starts, which httptools does not give, and aiohttp stays the parser for
everything unusual.

Connection handling as aiohttp's: requests on a connection are answered in order (pipelined
ones wait their turn), ``Connection: close`` is honoured, an idle kept-alive connection closes
after ``--keepalive-timeout``, reading pauses while more than :data:`HIGH_WATER` bytes wait
behind a request in flight or an answer the peer does not read, no answer is started while
the transport's writing is paused, and a client that hangs up cancels its request (an
abandoned long poll takes no messages).
The :class:`~tempomq.auth.limits.ConnectionGuard` wraps this protocol as it wraps aiohttp's:
its connection limit and header timeout hold (the timer stops once a request's headers are
in). On shutdown (:class:`tempomq.wire_errors.ApiRunner`) idle connections close, and a
request in flight gets ``shutdown_timeout`` to finish (long polls are answered by the app's
``on_shutdown`` hook first).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

import orjson
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_keepalive, tcp_nodelay
from structlog.contextvars import bind_contextvars

from broker_core import http as broker_http
from broker_core.broker import Broker
from broker_core.errors import TempoError
from broker_core.http import BROKER
from broker_core.message import validate_topic_name
from tempomq.app import (
    AUTH,
    GUARD,
    SETTINGS,
    TARGET,
    error_answer,
    log_request,
    observe,
    request_id,
)
from tempomq.auth.core import audit, audited
from tempomq.auth.policy import ANONYMOUS, Principal
from tempomq.auth.routes import ROUTES, Rule

if TYPE_CHECKING:
    from tempomq.auth.limits import _Guarded

#: Bytes waiting behind a request in flight above which reading pauses.
HIGH_WATER = 1 << 20
#: A request head (request line and headers) longer than this goes to aiohttp, which applies
#: its own limits (``MAX_LINE_BYTES``, ``MAX_FIELD_BYTES``, ``MAX_HEADERS``) and answers.
MAX_HEAD = 8190

Run = Callable[[Broker, dict[str, str], bytes], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class _Route:
    method: bytes
    #: The path pattern as aiohttp's router names it (the metric's ``route`` label).
    pattern: str
    rule: Rule
    run: Run
    status: int = 200
    #: Refused with ``409 consume_on_target`` when messages are kept in another broker.
    consuming: bool = False


async def _send(broker: Broker, params: dict[str, str], raw: bytes) -> object:
    return await broker_http.send(broker, validate_topic_name(params["topic"], client=True), raw)


def _in_group(work: Callable[[Broker, str, str, bytes], Awaitable[object]]) -> Run:
    async def run(broker: Broker, params: dict[str, str], raw: bytes) -> object:
        topic = params["topic"]
        broker.get_topic(topic)  # 404 before the body is looked at, as the aiohttp route does
        return await work(broker, topic, params["group"], raw)

    return run


async def _healthz(broker: Broker, params: dict[str, str], raw: bytes) -> object:
    return {"status": "ok"}


def _route(method: str, pattern: str, run: Run, **kw: Any) -> _Route:
    rule = ROUTES[(method, pattern)]
    return _Route(method.encode(), pattern, rule, run, **kw)


_GROUP = "/v1/topics/{topic}/groups/{group}/"
_ROUTES: dict[bytes, _Route] = {
    b"messages": _route("POST", "/v1/topics/{topic}/messages", _send, status=201),
    **{
        action.encode(): _route("POST", _GROUP + action, _in_group(work), consuming=True)
        for action, work in (
            ("receive", broker_http.receive_body),
            ("ack", broker_http.ack_body),
            ("nack", broker_http.nack_body),
            ("change-invisible", broker_http.change_invisible_body),
        )
    },
}
_HEALTHZ = _route("GET", "/healthz", _healthz)

_SEGMENT = rb"([A-Za-z0-9_.~-]+)"
_TARGET = re.compile(
    rb"/v1/topics/"
    + _SEGMENT
    + rb"/(?:(messages)|groups/"
    + _SEGMENT
    + rb"/(receive|ack|nack|change-invisible))"
)
#: Bytes a head may hold besides CRLF pairs: printable ASCII and tab.
_TEXT = bytes(range(0x20, 0x7F)) + b"\t"
#: Bytes of a header name (RFC 9110 token).
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: Headers the lean path reads; a second one of any of them goes to aiohttp.
_READ = frozenset({b"content-length", b"connection", b"authorization", b"x-request-id", b"host"})
#: Headers that mean framing or semantics the lean path does not do.
_HAND_OVER = frozenset(
    {b"transfer-encoding", b"content-encoding", b"expect", b"upgrade", b"te", b"trailer"}
)


class _Request:
    """One parsed request; ``match_info`` as aiohttp's, for the rules' resolvers."""

    __slots__ = (
        "authorization",
        "keep_alive",
        "length",
        "match_info",
        "path",
        "request_id",
        "route",
    )

    def __init__(
        self, route: _Route, path: str, match_info: dict[str, str], headers: dict[bytes, bytes]
    ) -> None:
        self.route = route
        self.path = path
        self.match_info = match_info
        length = headers.get(b"content-length")
        self.length = int(length) if length is not None else 0
        self.keep_alive = headers.get(b"connection", b"").lower() != b"close"
        auth = headers.get(b"authorization")
        self.authorization = auth.decode("ascii") if auth is not None else None
        rid = headers.get(b"x-request-id")
        self.request_id = rid.decode("ascii") if rid is not None else None


def parse_head(head: bytes, max_body: int) -> _Request | None:
    """The request whose head (request line and header lines, each ending with CRLF, without
    the blank line) is ``head``, or None when aiohttp is to answer it."""
    if head.translate(None, _TEXT) != b"\r\n" * head.count(b"\r\n"):
        return None  # control bytes, DEL, non-ASCII, or a CR or LF not in a CRLF pair
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.partition(b" ")
    if version != b"HTTP/1.1":
        return None
    matched = _match(target)
    if matched is None or method != matched[0].method:
        return None
    route, match_info = matched
    headers = _headers(lines)
    if headers is None:
        return None
    length = headers.get(b"content-length")
    if length is None:
        if route.method == b"POST":
            return None  # aiohttp reads such a body as empty; it answers
    elif not length.isdigit() or len(length) > 18 or int(length) > max_body:
        return None  # malformed, or over the limit: aiohttp answers 400 / 413
    connection = headers.get(b"connection")
    if connection is not None and connection.lower() not in (b"close", b"keep-alive"):
        return None
    return _Request(route, target.decode(), match_info, headers)


def _match(target: bytes) -> tuple[_Route, dict[str, str]] | None:
    """The lean route a request target names, with its path parameters."""
    if target == b"/healthz":
        return _HEALTHZ, {}
    m = _TARGET.fullmatch(target)
    if m is None:
        return None
    topic, messages, group, action = m.groups()
    if topic.strip(b".") == b"" or (group is not None and group.strip(b".") == b""):
        return None  # "." and ".." segments: left to aiohttp's URL handling
    match_info = {"topic": topic.decode()}
    if group is not None:
        match_info["group"] = group.decode()
    return _ROUTES[messages or action], match_info


def _headers(lines: list[bytes]) -> dict[bytes, bytes] | None:
    """The headers the lean path reads (lower-case names, values without surrounding blanks)
    from the head's lines (the request line first, an empty string last), or None for
    aiohttp: a line that is no ``token: value`` (obs-fold, no colon, a blank before the
    colon), a second one of a header read, or a header of framing the lean path leaves."""
    headers: dict[bytes, bytes] = {}
    for line in lines[1:-1]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN):
            return None
        key = name.lower()
        if key in _READ:
            if key in headers:
                return None
            headers[key] = value.strip(b" \t")
        elif key in _HAND_OVER:
            return None
    return headers


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_STATUS_LINES: dict[int, bytes] = {}
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()
_date_second = 0
_date_line = b""


def _date() -> bytes:
    """The ``Date`` header line, made once a second as aiohttp does."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
    return _date_line


class LeanFront:
    """The lean path's share of one app: what its requests need, and its open connections.

    Called, it makes the protocol of one new connection; ``server`` (the runner's aiohttp
    server) makes the ``RequestHandler`` a connection is handed to.
    """

    def __init__(self, app: web.Application, server: Callable[[], asyncio.Protocol]) -> None:
        settings = app[SETTINGS]
        self.broker = app[BROKER]
        self.auth = app[AUTH]
        self.guard = app[GUARD]
        self.server = server
        self.elsewhere = app[TARGET].kind != "embedded"
        self.max_body = settings.max_request_bytes
        self.keepalive_s = settings.keepalive_timeout_ms / 1000
        self.connections: set[LeanProtocol] = set()
        #: Connections handed to aiohttp (they are aiohttp's to count from then on).
        self.handed_over = 0

    def __call__(self) -> LeanProtocol:
        return LeanProtocol(self)

    def close_idle(self) -> None:
        """Stop taking requests: close idle connections now, the others after their answer."""
        for conn in list(self.connections):
            conn.close()

    async def shutdown(self, timeout_s: float | None) -> None:
        """Give requests in flight up to ``timeout_s`` to finish, then cancel them and close."""
        await asyncio.gather(*(conn.shutdown(timeout_s) for conn in list(self.connections)))


class LeanProtocol(asyncio.Protocol):
    """One connection: see the module docstring."""

    def __init__(self, front: LeanFront) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.guarded: _Guarded | None = None
        self.remote = ""
        self.buf = bytearray()
        #: The request whose headers are in and whose body is awaited, with its end in buf.
        self.pending: tuple[_Request, int] | None = None
        self.task: asyncio.Task[None] | None = None
        self.keepalive: asyncio.TimerHandle | None = None
        #: Loop time since when the connection is idle; None while a request is under way.
        self.idle_since: float | None = None
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        self.handed = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # As aiohttp's handler: answers go out at once, dead peers are found.
        tcp_nodelay(self.transport, True)
        tcp_keepalive(self.transport)
        self.guarded = self.front.guard.open.get(self)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer or "")
        self.front.connections.add(self)
        self._arm_keepalive()

    def data_received(self, data: bytes) -> None:
        if self.handed or self.transport is None:
            return
        self.idle_since = None
        self.buf += data
        if self.task is None and not self.writing_paused:
            self._next()
        elif len(self.buf) > HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; a request in flight is cancelled (connection_lost)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.transport = None
        if self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None
        if self.task is not None:
            # aiohttp's handler_cancellation: an abandoned request (a long poll) stops here.
            self.task.cancel()
            self.task = None

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.task is None and not self.handed and self.transport is not None:
            self._next()

    # -- requests ------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start on the next complete request in the buffer, or wait for more bytes."""
        transport = self.transport
        assert transport is not None
        if self.writing_paused or self.closing:
            if self.closing and self.task is None:
                transport.close()
            return
        buf = self.buf
        if self.reading_paused and len(buf) <= HIGH_WATER:
            self.reading_paused = False
            transport.resume_reading()
        if self.pending is None:
            if not buf:
                self._arm_keepalive()
                return
            self.pending = self._read_head()
            if self.pending is None:
                return
        request, total = self.pending
        if len(buf) < total:
            return
        self.pending = None
        if not request.keep_alive and len(buf) > total:
            self._hand_over()  # aiohttp answers bytes after a Connection: close request: 400
            return
        body = bytes(buf[total - request.length : total])
        del buf[:total]
        self.task = asyncio.get_running_loop().create_task(self._serve(request, body))

    def _read_head(self) -> tuple[_Request, int] | None:
        """The request whose head starts the buffer, with where its body ends; None while the
        head is incomplete, or when the connection went to aiohttp."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buf) > MAX_HEAD or buf.count(b"\n") != buf.count(b"\r\n"):
                self._hand_over()  # too long, or a bare LF: aiohttp reads such heads
            elif self.guarded is not None and self.guarded.deadline is None:
                self.guarded.arm()  # a pipelined request's head is not complete yet
            return None
        request = parse_head(bytes(buf[: end + 2]), self.front.max_body)
        if request is None:
            self._hand_over()
            return None
        guarded = self.guarded
        if guarded is not None:  # headers in: the guard's timer stops
            guarded.in_request = True
            guarded.disarm()
        return request, end + 4 + request.length

    async def _serve(self, request: _Request, body: bytes) -> None:
        started = time.perf_counter()
        route = request.route
        front = self.front
        rid = request_id(request.request_id)
        method = route.method.decode()
        # The task runs in a copy of the context: what is bound here goes with it.
        bind_contextvars(request_id=rid)
        extra = None
        try:
            audited_by = await self._admit(request, method)
            status = 500
            try:
                if route.consuming and front.elsewhere:
                    front.broker.check_consumable()
                payload = orjson.dumps(await route.run(front.broker, request.match_info, body))
                status = route.status
            except TempoError as exc:
                status = exc.status
                raise
            finally:
                if audited_by is not None:
                    audit(audited_by, method, request.path, status)
        except Exception as exc:
            status, answer, extra = error_answer(exc, method, request.path, rid)
            payload = orjson.dumps(answer)
        self._respond(status, payload, extra, rid, request.keep_alive)
        elapsed_s = time.perf_counter() - started
        observe(method, route.pattern, status, elapsed_s)
        log_request(method, request.path, status, elapsed_s)
        self.task = None
        if self.guarded is not None:
            self.guarded.in_request = False
        if self.transport is not None:
            self._next()

    async def _admit(self, request: _Request, method: str) -> Principal | None:
        """As :meth:`Auth.middleware`: authenticate, rate-limit, authorize. Returns the
        principal when the request goes to the audit log."""
        auth = self.front.auth
        if not auth.enabled:
            auth.check_rate(ANONYMOUS, key=self.remote)
            return None
        rule = request.route.rule
        if rule.public:
            return None
        principal = auth.authenticate_http(request.authorization, self.transport)
        auth.check_rate(principal)
        await auth.check_needs(rule, principal, request)
        return principal if audited(rule, principal, method) else None

    def _respond(
        self,
        status: int,
        payload: bytes,
        extra: Any,
        rid: str,
        keep_alive: bool,
    ) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        line = _STATUS_LINES.get(status)
        if line is None:
            line = _STATUS_LINES[status] = _status_line(status)
        parts = [line]
        if extra:  # before Content-Type, in aiohttp's order
            parts.extend(f"{k}: {v}\r\n".encode() for k, v in extra.items())
        close = not keep_alive or self.closing
        parts.append(
            b"Content-Type: application/json\r\n"
            b"X-Request-Id: %s\r\nContent-Length: %d\r\n%s%s%s\r\n%s\n"
            % (
                rid.encode(),
                len(payload) + 1,
                _date(),
                _SERVER,
                b"Connection: close\r\n" if close else b"",
                payload,
            )
        )
        transport.write(b"".join(parts))
        if close:
            self.closing = True
            transport.close()

    # -- keep-alive, hand-over, shutdown -------------------------------------------------------

    def _arm_keepalive(self) -> None:
        """Idle from now: close after ``--keepalive-timeout`` unless a byte comes. The timer
        is moved on lazily, so a request costs no timer of its own."""
        loop = asyncio.get_running_loop()
        self.idle_since = loop.time()
        if self.keepalive is None:
            self.keepalive = loop.call_at(self.idle_since + self.front.keepalive_s, self._idle)

    def _idle(self) -> None:
        self.keepalive = None
        if self.idle_since is None or self.transport is None or self.handed:
            return  # busy: armed again when idle
        loop = asyncio.get_running_loop()
        due = self.idle_since + self.front.keepalive_s
        if loop.time() < due:
            self.keepalive = loop.call_at(due, self._idle)
        else:
            self.transport.close()

    def _hand_over(self) -> None:
        """aiohttp's ``RequestHandler`` takes the connection, with every unanswered byte."""
        transport = self.transport
        assert transport is not None and self.task is None
        self.handed = True
        self.front.connections.discard(self)
        self.front.handed_over += 1
        if self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None
        handler = self.front.server()
        guarded = self.guarded
        if guarded is not None:
            guarded.in_request = False  # aiohttp's guard middleware takes it from here
            guard = self.front.guard
            guard.open.pop(self, None)
            guard.open[handler] = guarded
            guarded.inner = handler
        else:
            transport.set_protocol(handler)
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        handler.connection_made(transport)
        if self.writing_paused:
            handler.pause_writing()
        data = bytes(self.buf)
        self.buf.clear()
        if data:
            handler.data_received(data)

    def close(self) -> None:
        """Take no further request; close now when idle (shutdown's first step)."""
        self.closing = True
        if self.task is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout_s: float | None) -> None:
        self.closing = True
        task = self.task
        if task is not None:
            await asyncio.wait({task}, timeout=timeout_s)
            if not task.done():
                task.cancel()
        if self.transport is not None:
            self.transport.close()
