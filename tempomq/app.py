"""The one aiohttp application: broker, timers and routes wired together, and the server loop.

:func:`build_app` assembles the app without starting anything; ``cleanup_ctx`` starts the timer
service and then the broker when the server starts, and stops them in reverse order when it
stops, so the broker flushes everything it acknowledged while the timers it uses still run.

Errors become JSON in exactly one place, :func:`error_middleware`: domain errors
(:class:`~broker_core.errors.TempoError`) with their own status and code, aiohttp's HTTP
exceptions (unknown route, wrong method, body over the limit) with codes of the same shape, a
full or failing disk (``ENOSPC``, ``EIO``, ...) from a file write as ``503 store_unavailable``
with the cause, and anything unexpected as a 500 that points to the server log by request id
and never carries a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gc
import itertools
import logging
import re
import secrets
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs; types-PyYAML is not a dep
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest

from broker_core import http as broker_http
from broker_core.broker import Broker
from broker_core.errors import StoreUnavailable, TempoError
from broker_core.http import BROKER, unreadable_body, unreadable_body_code
from broker_core.http import routes as broker_routes
from delayserver.embedded import EmbeddedDelayStore
from delayserver.http import DELAY
from delayserver.http import routes as delay_routes
from delayserver.service import DelayService
from delayserver.store import DelayStoreUnavailable
from delayserver.targets import ReleaseTarget, make_target
from delayserver.timers import TimerService
from tempomq.auth import Auth, ConnectionGuard, GuardedSite, RateLimit, server_context
from tempomq.auth.principals import AuthFileError
from tempomq.config import HostPort, Settings, is_loopback
from tempomq.console import add_console
from tempomq.logs import bound, get_logger
from tempomq.probe import ProbeSchedule
from tempomq.wire_errors import ApiRunner
from txcoord.checkurl import CheckUrlPolicy
from txcoord.coordinator import Coordinator, TxSettings
from txcoord.http import TX
from txcoord.http import routes as tx_routes
from txcoord.store import SqliteTxStore, TxStore

if TYPE_CHECKING:
    from tempomq.grpc.server import GrpcEndpoint

log = get_logger(__name__)

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"

#: Header limits of aiohttp's request parser (its defaults, stated so they are visible). Over
#: them the parser answers 400 before any handler runs.
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 128

#: A client-supplied request id is echoed and logged, so only tame characters are accepted.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_READINESS_TIMEOUT_S = 2.0

ReadinessCheck = Callable[[], Awaitable[str | None]]


class Readiness:
    """Named checks behind ``/readyz``; each returns ``None`` when fine, else the reason.

    The broker registers one; later backends (Redis delay store, the transaction database) add
    theirs with :meth:`add`, and ``/readyz`` names whichever fail.
    """

    def __init__(self, *, timeout_s: float = _READINESS_TIMEOUT_S) -> None:
        self._checks: dict[str, ReadinessCheck] = {}
        self._timeout_s = timeout_s

    def add(self, name: str, check: ReadinessCheck) -> None:
        if name in self._checks:
            raise ValueError(f"readiness check {name!r} registered twice")
        self._checks[name] = check

    async def _run_one(self, check: ReadinessCheck) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await check()
        except TimeoutError:
            return f"no answer within {self._timeout_s:g}s"
        except Exception as exc:  # a failing check means "not ready", not a 500
            return f"check failed: {type(exc).__name__}: {exc}"

    async def failures(self) -> dict[str, str]:
        """Name -> reason for every failing check; empty when ready. Checks run concurrently."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._run_one(self._checks[n]) for n in names))
        return {name: reason for name, reason in zip(names, results, strict=True) if reason}


SETTINGS = web.AppKey("settings", Settings)
AUTH = web.AppKey("auth", Auth)
GUARD = web.AppKey("guard", ConnectionGuard)
TIMERS = web.AppKey("timers", TimerService)
TARGET: web.AppKey[ReleaseTarget] = web.AppKey("release_target")
READINESS = web.AppKey("readiness", Readiness)


def json_response(
    data: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data) + b"\n",
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": code, "message": message}, status=status, headers=headers)


# --------------------------------------------------------------------------------------------
# Errors and request context.

_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "message_too_large"}
_BODY_HEADERS = frozenset({"content-type", "content-length"})


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own HTTP errors (routing, body size, route code) in the API's error shape."""
    status = exc.status
    if status == 404:
        message = f"no route for {request.method} {request.path}"
    elif status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    elif status == 413:
        limit = request.app[SETTINGS].max_request_bytes
        message = f"request body is larger than {limit} bytes (--max-request-bytes)"
    else:
        # Route code may raise e.g. HTTPBadRequest(text="...") on purpose; keep its text.
        message = exc.text or exc.reason
    try:
        code = _HTTP_ERROR_CODES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:  # a status outside the standard table
        code = "http_error"
    # Keep headers such as Allow; the body and its length are ours now.
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    return error_response(status, code, message, headers=headers)


#: Per route (the path pattern, so ids in paths add no series) and status: the count of requests
#: is the histogram's ``_count``.
HTTP_REQUESTS = Histogram(
    "tempomq_http_request_seconds",
    "HTTP requests served, by method, route pattern and status, and how long each took",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0),
)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


#: What a full or failing disk raises from a file write (topics.json, groups.json, ...):
#: the store cannot take writes for now, which is ``503 store_unavailable``, not a bug.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


def _is_storage_error(exc: Exception) -> bool:
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


#: Request ids this process makes: a random prefix per process and a counter, as unique as
#: random ids across restarts without a system call per request.
_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)


def request_id(given: str | None) -> str:
    """The client's ``X-Request-Id`` when it is tame, else a new id of this process."""
    if given is not None and _REQUEST_ID_RE.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ids):08x}"


#: The histogram's child per (method, route, status): ``labels()`` takes a lock and builds a
#: key each call; the few children there are stay here.
_REQUEST_SERIES: dict[tuple[str, str, int], Any] = {}
#: configure_logging sets the root logger's level; asking it is a cached lookup.
_ROOT_LOG = logging.getLogger()


def observe(method: str, route: str, status: int, elapsed_s: float) -> None:
    """Count one request in ``tempomq_http_request_seconds`` and log it at debug level."""
    key = (method, route, status)
    child = _REQUEST_SERIES.get(key)
    if child is None:
        child = _REQUEST_SERIES[key] = HTTP_REQUESTS.labels(method, route, str(status))
    child.observe(elapsed_s)


def log_request(method: str, path: str, status: int, elapsed_s: float) -> None:
    if _ROOT_LOG.isEnabledFor(logging.DEBUG):  # skip building the call otherwise
        log.debug(
            "request",
            method=method,
            path=path,
            status=status,
            duration_ms=round(elapsed_s * 1000, 3),
        )


def error_answer(
    exc: Exception, method: str, path: str, request_id: str
) -> tuple[int, dict[str, str], Mapping[str, str] | None]:
    """(status, JSON body, extra headers) for an error a handler raised: a
    :class:`TempoError` as its own status and code (some carry headers: WWW-Authenticate,
    Retry-After), a full or failing disk as ``503 store_unavailable``, anything else as a
    logged ``500 internal`` naming the request id. Call it inside the ``except`` block."""
    if isinstance(exc, TempoError):
        return (
            exc.status,
            {"error": exc.code, "message": exc.message},
            getattr(exc, "headers", None),
        )
    if _is_storage_error(exc):
        log.error("storage.write_failed", path=path, error=str(exc))
        message = f"storage write failed: {exc}"
        return StoreUnavailable.status, {"error": StoreUnavailable.code, "message": message}, None
    log.exception("unhandled error", method=method, path=path)
    message = f"internal error, see server log (request id {request_id})"
    return 500, {"error": "internal", "message": message}, None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind the request id to every log line and turn every error into the API's JSON shape."""
    rid = request_id(request.headers.get("X-Request-Id"))
    started = time.perf_counter()
    with bound(request_id=rid):
        response: web.StreamResponse
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:  # redirects and 204/304 raised on purpose pass through
                raise
            response = _http_error(request, exc)
        except RequestPayloadError as exc:
            # The body could not be read as sent: a Content-Encoding it is not in, say.
            code = unreadable_body_code(request.method, request.path)
            response = error_response(400, code, unreadable_body(exc))
        except Exception as exc:
            status, body, headers = error_answer(exc, request.method, request.path, rid)
            response = json_response(body, status=status, headers=headers)
        response.headers["X-Request-Id"] = rid
        elapsed_s = time.perf_counter() - started
        observe(request.method, _route(request), response.status, elapsed_s)
        log_request(request.method, request.path, response.status, elapsed_s)
        return response


# --------------------------------------------------------------------------------------------
# Service routes.

service_routes = web.RouteTableDef()


@service_routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@service_routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    failures = await request.app[READINESS].failures()
    if not failures:
        return json_response({"status": "ready"})
    message = "; ".join(f"{name}: {reason}" for name, reason in failures.items())
    return json_response({"error": "not_ready", "message": message, "checks": failures}, status=503)


@service_routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    # Passed as a header: aiohttp's content_type argument refuses a charset parameter.
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@functools.cache
def openapi_json() -> bytes:
    """docs/openapi.yaml as JSON, read once, ending with a newline like every JSON answer.
    Non-string keys (e.g. unquoted 200) are allowed."""
    with OPENAPI_PATH.open(encoding="utf-8") as f:
        spec: Any = yaml.safe_load(f)
    return orjson.dumps(spec, option=orjson.OPT_NON_STR_KEYS) + b"\n"


@service_routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    try:
        body = openapi_json()
    except FileNotFoundError:
        # An install without the repository's docs/ (a plain wheel) has no spec to serve.
        raise TempoError(
            f"API spec not found at {OPENAPI_PATH}", code="not_found", status=404
        ) from None
    return web.Response(body=body, content_type="application/json")


# --------------------------------------------------------------------------------------------
# Assembly and lifecycle.


async def _run_timers(app: web.Application) -> AsyncIterator[None]:
    timers = app[TIMERS]
    timers.start()
    yield
    await timers.stop()


async def _run_broker(app: web.Application) -> AsyncIterator[None]:
    broker = app[BROKER]
    await broker.start()
    # The release target connects before anything is released into it (a target that is down
    # does not stop the start: it shows in /readyz, and releases wait for it).
    target = app[TARGET]
    await target.start()
    # The delay service releases into the started broker; consumer retries with a backoff and
    # every delayed send go through it.
    delay = app[DELAY]
    await delay.start()
    broker.scheduler = delay
    tx = app[TX]
    await tx.start()
    # What start-up loaded lives as long as the process: keep it out of the collector's scans,
    # whose full passes over a large heap would otherwise show as release lateness.
    gc.collect()
    gc.freeze()
    yield
    await tx.stop()
    await delay.stop()
    await target.stop()  # after the release under way
    # stop() flushes everything acknowledged; the timers it may still use stop after it.
    await broker.stop()


async def _answer_long_polls(app: web.Application) -> None:
    # on_shutdown runs before the server waits for in-flight requests: answer long polls now.
    app[BROKER].begin_shutdown()
    app[TX].begin_shutdown()


def make_delay_service(
    settings: Settings, broker: Broker, timers: TimerService, target: ReleaseTarget | None = None
) -> DelayService:
    """Redis when ``--redis-url`` is given (shared with any other servers on it through shard
    leases), else the embedded store in the data directory; releasing into ``target`` (this
    broker's topics when None)."""
    if settings.redis_url:
        from delayserver.leases import ShardLeases, new_owner_id
        from delayserver.redis_store import RedisDelayStore

        store = RedisDelayStore(settings.redis_url, owner=new_owner_id())
        leases = ShardLeases(store, ttl_ms=settings.delay_lease_ttl_ms)
        return DelayService(store, broker.store, timers, leases=leases, target=target)
    embedded = EmbeddedDelayStore(
        settings.data_dir / "delay" / "delay.db", sync=settings.flush == "sync"
    )
    return DelayService(embedded, broker.store, timers, target=target)


#: Routes that consume from this server's topics: with another broker as the release target
#: they answer ``409 consume_on_target`` naming it.
_CONSUMING = frozenset(
    {
        broker_http.receive,
        broker_http.ack,
        broker_http.nack,
        broker_http.change_invisible,
        broker_http.group_stats,
        broker_http.reset,
    }
)


def consume_on_target_middleware(broker: Broker) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Refuse the consuming routes (after auth, so a stranger still gets 401/403)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.route.handler in _CONSUMING:
            broker.check_consumable()
        return await handler(request)

    return middleware


def make_tx_store(settings: Settings) -> TxStore:
    """The SQLite file in the data directory (or at a ``sqlite:///`` URL), else the shared SQL
    database of ``--tx-store``."""
    sync = settings.flush == "sync"
    url = settings.tx_store
    if url is None:
        return SqliteTxStore(settings.data_dir / "tx" / "tx.db", sync=sync)
    if url.startswith("sqlite:///"):
        return SqliteTxStore(Path(url.removeprefix("sqlite:///")), sync=sync)
    from txcoord.sql_store import SqlTxStore

    return SqlTxStore(url)


def make_auth(settings: Settings) -> Auth:
    rate = RateLimit(settings.rate_limit, settings.rate_burst) if settings.rate_limit > 0 else None
    return Auth(
        auth_file=settings.auth_file,
        admin_token=settings.admin_token,
        rate_limit=rate,
        metrics_public=settings.metrics_public,
    )


def build_app(settings: Settings) -> web.Application:
    """The application with all components constructed; nothing runs until the server starts."""
    timers = TimerService()
    broker = Broker(settings.broker_config(), timers=timers, scheduler=None)
    target = make_target(
        settings.release_to,
        broker.store,
        topic_template=settings.release_topic,
        stream=settings.release_stream,
        replicas=settings.release_replicas,
    )
    delay = make_delay_service(settings, broker, timers, target)
    tx = Coordinator(
        make_tx_store(settings),
        broker.store,
        delay,
        timers,
        new_msg_id=delay.new_msg_id,
        settings=TxSettings(
            check_immunity_ms=settings.tx_check_immunity_ms,
            check_interval_ms=settings.tx_check_interval_ms,
            check_max=settings.tx_check_max,
            check_timeout_ms=settings.tx_check_timeout_ms,
            check_url=CheckUrlPolicy(
                settings.check_url_allow,
                secret=settings.check_url_secret.encode() if settings.check_url_secret else None,
            ),
            lease_ms=settings.tx_lease_ms,
        ),
    )

    async def broker_ready() -> str | None:
        return broker.health()

    readiness = Readiness()
    readiness.add("broker", broker_ready)
    readiness.add("delay_store", delay.health)
    readiness.add("transactions", tx.health)
    elsewhere = target.kind != "embedded"  # messages kept in another broker
    if elsewhere:
        broker.outlet = target  # plain sends go there too
        readiness.add("release_target", target.health)

    auth = make_auth(settings)
    guard = ConnectionGuard(
        max_connections=settings.max_connections,
        header_timeout_s=settings.header_timeout_ms / 1000,
    )
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        # The guard first, so a request's headers count as in whatever comes after; auth
        # inside the error middleware, so its 401/403/429 get the API's error shape.
        middlewares=[guard.middleware, error_middleware, auth.middleware]
        + ([consume_on_target_middleware(broker)] if elsewhere else []),
    )
    app[SETTINGS] = settings
    app[AUTH] = auth
    app[GUARD] = guard
    app[TIMERS] = timers
    app[TARGET] = target
    app[BROKER] = broker
    app[READINESS] = readiness
    # Started in this order, stopped in reverse.
    app.cleanup_ctx.append(_run_timers)
    app.cleanup_ctx.append(_run_broker)
    app.on_shutdown.append(_answer_long_polls)
    app.add_routes(service_routes)
    app.add_routes(broker_routes)
    app.add_routes(delay_routes)
    app.add_routes(tx_routes)
    add_console(app)
    app[DELAY] = delay
    app[TX] = tx
    return app


def make_runner(app: web.Application, settings: Settings) -> ApiRunner:
    return ApiRunner(
        app,
        # Per-request access lines would cost more than the request at broker rates; the
        # middleware logs each request at debug level instead.
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout_ms / 1000,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_FIELD_BYTES,
        max_headers=MAX_HEADERS,
        # A client that hangs up cancels its request: a long poll it abandoned must not go on
        # to take messages (and hide them for invisible_ms) with nobody to hand them to.
        handler_cancellation=True,
        keepalive_timeout=settings.keepalive_timeout_ms / 1000,
    )


def make_site(
    app: web.Application,
    runner: ApiRunner,
    settings: Settings,
    ssl_context: ssl.SSLContext | None = None,
) -> GuardedSite:
    """The HTTP port (after ``runner.setup()``): every connection through the app's
    :class:`ConnectionGuard`, and through the lean front (:mod:`tempomq.lean`) unless
    ``--http-lean off``."""
    factory = None
    if settings.http_lean:
        from tempomq.lean import LeanFront  # it builds on this module

        assert runner.server is not None, "runner.setup() first"
        factory = LeanFront(app, runner.server)
        runner.add_front(factory)
    return GuardedSite(
        runner,
        settings.http.host,
        settings.http.port,
        guard=app[GUARD],
        ssl_context=ssl_context,
        factory=factory,
    )


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, then drain and stop. Returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        log.info("stopping", signal=signum.name)
        stop.set()
        # A second signal during the drain takes the default action (exit at once).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    try:
        app = build_app(settings)
        ssl_context = (
            server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            if settings.tls_cert is not None and settings.tls_key is not None
            else None
        )
    except (OSError, ValueError, AuthFileError) as exc:
        log.error("startup failed", error=str(exc))
        return 1
    auth = app[AUTH]
    if auth.enabled:
        log.info("auth on", principals=len(auth.directory.principals))
        loop.add_signal_handler(signal.SIGHUP, auth.reload)
    elif settings.insecure_no_auth and not is_loopback(settings.http.host):
        log.warning("auth is off on a non-loopback address (--insecure-no-auth)")
    runner = make_runner(app, settings)
    probe: ProbeSchedule | None = None
    rocketmq: GrpcEndpoint | None = None
    try:
        try:
            await runner.setup()
        except (OSError, RuntimeError, TempoError, DelayStoreUnavailable) as exc:
            log.error("startup failed", error=str(exc))
            return 1
        site = make_site(app, runner, settings, ssl_context)
        try:
            rocketmq = await listen(settings, runner, site, tls=ssl_context is not None)
        except OSError:
            return 1
        # The probe goes through HTTP like any client, so it starts once the port listens and
        # stops before the server does.
        probe = start_probe(settings, runner, auth, tls=ssl_context is not None)
        await stop.wait()
    finally:
        if probe is not None:
            await probe.stop()
        if rocketmq is not None:
            await rocketmq.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        # Stops accepting, waits up to shutdown_timeout for in-flight requests, then runs the
        # cleanup contexts: broker.stop() (flush) and timers.stop().
        await runner.cleanup()
    log.info("stopped")
    return 0


async def listen(
    settings: Settings, runner: web.AppRunner, site: web.BaseSite, *, tls: bool
) -> GrpcEndpoint | None:
    """Open the HTTP port, then the RocketMQ one; raises ``OSError`` (logged) if either fails."""
    address: HostPort | None = settings.http
    try:
        await site.start()
        scheme = "https" if tls else "http"
        for host, port, *_ in runner.addresses:
            log.info("listening", url=f"{scheme}://{HostPort(host, port)}")
        address = settings.grpc
        return await start_rocketmq(settings, runner.app)
    except OSError as exc:
        log.error("cannot listen", address=str(address), error=str(exc))
        raise


async def start_rocketmq(settings: Settings, app: web.Application) -> GrpcEndpoint | None:
    """The RocketMQ 5 gRPC endpoint on the started cores, unless ``--grpc off``."""
    if settings.grpc is None:
        return None
    # grpcio loads only when the endpoint is on.
    from tempomq.grpc.auth import PrincipalAuth
    from tempomq.grpc.server import TlsFiles, start_grpc

    auth = app[AUTH]
    tls = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return await start_grpc(
        settings.grpc,
        settings.grpc_advertise,
        broker=app[BROKER],
        delay=app[DELAY],
        tx=app[TX],
        auth=PrincipalAuth(auth) if auth.enabled else None,
        tls=tls,
    )


def start_probe(
    settings: Settings, runner: web.AppRunner, auth: Auth, *, tls: bool
) -> ProbeSchedule | None:
    """The in-server reconciliation probe, when ``--probe-interval`` asks for one. With auth
    on it holds a token of its own, made now and known only to this process."""
    if settings.probe_interval_ms <= 0:
        return None
    host, port = runner.addresses[0][:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    client_tls: ssl.SSLContext | None = None
    if tls:
        # The probe calls this very process over loopback: the certificate names the public
        # host, not the loopback address, and there is nobody in between to verify away.
        client_tls = ssl.create_default_context()
        client_tls.check_hostname = False
        client_tls.verify_mode = ssl.CERT_NONE
    probe = ProbeSchedule(
        f"{'https' if tls else 'http'}://{HostPort(host, port)}",
        interval_s=settings.probe_interval_ms / 1000,
        duration_s=settings.probe_duration_ms / 1000,
        rate=settings.probe_rate,
        token=auth.internal_token("probe"),
        ssl_context=client_tls,
    )
    probe.start()
    return probe


def run(settings: Settings) -> int:
    """Serve on uvloop where it is installed (Linux, macOS): its event loop and transports
    take about a fifth off the cost of each request; else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))
