"""The app shell: service routes, error mapping, request ids, limits and lifecycle.

The broker, the timer service and the broker routes are replaced by small stand-ins, so these
tests pin down what ``tempomq.app`` itself does, whatever state the real components are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import importlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker_core import errors
from broker_core.config import BrokerConfig
from broker_core.errors import TempoError
from tempomq.config import HostPort, Settings
from tempomq.logs import configure_logging

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]

# -- stand-ins -----------------------------------------------------------------------------------


class FakeTimers:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def start(self) -> None:
        self.events.append("timers.start")

    async def stop(self) -> None:
        self.events.append("timers.stop")


class FakeDelay:
    def __init__(self, store: object, broker_store: object, timers: FakeTimers) -> None:
        self.events = timers.events

    async def start(self) -> None:
        self.events.append("delay.start")

    async def stop(self) -> None:
        self.events.append("delay.stop")

    async def health(self) -> str | None:
        return None

    def new_msg_id(self) -> bytes:
        return b"\x00" * 16


class FakeTx:
    def __init__(
        self, path: object, broker_store: object, delay: object, timers: FakeTimers, **kw: object
    ) -> None:
        self.events = timers.events

    async def start(self) -> None:
        self.events.append("tx.start")

    async def stop(self) -> None:
        self.events.append("tx.stop")

    async def health(self) -> str | None:
        return None

    def begin_shutdown(self) -> None:
        self.events.append("tx.begin_shutdown")


class FakeBroker:
    def __init__(self, config: BrokerConfig, *, timers: FakeTimers, scheduler: object) -> None:
        self.config = config
        self.events = timers.events
        self.reason: str | None = None
        self.store = object()
        self.scheduler = scheduler

    def begin_shutdown(self) -> None:
        self.events.append("broker.begin_shutdown")

    async def start(self) -> None:
        self.events.append("broker.start")

    async def stop(self) -> None:
        self.events.append("broker.stop")

    def health(self) -> str | None:
        return self.reason


stand_in_routes = web.RouteTableDef()


@stand_in_routes.get("/v1/boom")
async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail of the failure")


@stand_in_routes.get("/v1/raise/{name}")
async def raise_named(request: web.Request) -> web.Response:
    raise getattr(errors, request.match_info["name"])("what went wrong")


@stand_in_routes.get("/v1/oserror/{errno}")
async def os_error(request: web.Request) -> web.Response:
    code = int(request.match_info["errno"])
    raise OSError(code, os.strerror(code), "/data/topics.json.tmp")


@stand_in_routes.get("/v1/http-error")
async def http_error(request: web.Request) -> web.Response:
    raise web.HTTPBadRequest(text="body is not JSON")


@stand_in_routes.post("/v1/echo")
async def echo(request: web.Request) -> web.Response:
    return web.json_response({"bytes": len(await request.read())})


@stand_in_routes.get("/v1/slow")
async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(0.3)
    return web.json_response({"done": True})


@pytest.fixture
def events() -> list[str]:
    """What the stand-in timers and broker were asked to do, in order."""
    return []


@pytest.fixture
def app_module(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> Iterator[types.ModuleType]:
    """``tempomq.app`` with the stand-ins patched in.

    While a component module is still missing (they are written in parallel), an empty
    placeholder lets ``tempomq.app`` import; the stand-ins replace what it would provide.
    """
    placeholders: dict[str, dict[str, object]] = {
        "broker_core.broker": {"Broker": FakeBroker},
        "broker_core.http": {"routes": web.RouteTableDef(), "BROKER": web.AppKey("broker", object)},
        "delayserver.timers": {"TimerService": FakeTimers},
    }
    used_placeholder = False
    for name, attrs in placeholders.items():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
            used_placeholder = True
    if used_placeholder:
        monkeypatch.delitem(sys.modules, "tempomq.app", raising=False)
    module = importlib.import_module("tempomq.app")
    monkeypatch.setattr(module, "TimerService", lambda: FakeTimers(events))
    monkeypatch.setattr(module, "Broker", FakeBroker)
    monkeypatch.setattr(module, "DelayService", FakeDelay)
    monkeypatch.setattr(module, "Coordinator", FakeTx)
    monkeypatch.setattr(
        module,
        "make_delay_service",
        lambda settings, broker, timers, target=None: FakeDelay(None, broker.store, timers),
    )
    monkeypatch.setattr(module, "broker_routes", stand_in_routes)
    yield module
    if used_placeholder:
        # Do not leave a tempomq.app bound to placeholders for later test modules.
        sys.modules.pop("tempomq.app", None)


@pytest.fixture
def settings(tmp_data_dir: Path) -> Settings:
    return Settings(data_dir=tmp_data_dir, http=HostPort("127.0.0.1", 0))


@pytest.fixture
async def client(
    app_module: types.ModuleType, settings: Settings, aiohttp_client: ClientFactory
) -> Client:
    return await aiohttp_client(app_module.build_app(settings))


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Logs as JSON lines into a buffer; the default structlog setup is restored afterwards."""
    buf = io.StringIO()
    configure_logging(level="debug", fmt="json", stream=buf)
    yield buf
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "tempomq"]:
        root.removeHandler(handler)


def log_lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]


# -- service routes ------------------------------------------------------------------------------


async def test_healthz(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_readyz_ready(client: Client) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready"}


async def test_readyz_names_the_failing_check(client: Client, app_module: types.ModuleType) -> None:
    client.app[app_module.BROKER].reason = "disk full"
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["error"] == "not_ready"
    assert body["message"] == "broker: disk full"
    assert body["checks"] == {"broker": "disk full"}


async def test_readyz_check_that_raises_or_hangs_is_not_ready(
    app_module: types.ModuleType, settings: Settings, aiohttp_client: ClientFactory
) -> None:
    app = app_module.build_app(settings)
    readiness = app_module.Readiness(timeout_s=0.05)
    app[app_module.READINESS] = readiness

    async def raises() -> str | None:
        raise ConnectionError("refused")

    async def hangs() -> str | None:
        await asyncio.sleep(10)
        return None

    readiness.add("redis", raises)
    readiness.add("mysql", hangs)
    resp = await (await aiohttp_client(app)).get("/readyz")
    assert resp.status == 503
    checks = (await resp.json())["checks"]
    assert "ConnectionError: refused" in checks["redis"]
    assert "no answer" in checks["mysql"]


async def test_metrics_is_prometheus_text(client: Client) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    assert "# HELP" in await resp.text()


async def test_openapi_json_served(client: Client) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    spec = await resp.json()
    assert spec["openapi"].startswith("3.1")
    assert "/healthz" in spec["paths"]


# -- errors --------------------------------------------------------------------------------------

ERROR_CLASSES = sorted(
    (c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, TempoError)),
    key=lambda c: c.__name__,
)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
async def test_domain_error_becomes_its_code_and_status(
    client: Client, cls: type[TempoError]
) -> None:
    resp = await client.get(f"/v1/raise/{cls.__name__}")
    assert resp.status == cls.status
    assert await resp.json() == {"error": cls.code, "message": "what went wrong"}


async def test_unknown_route_is_json_404(client: Client) -> None:
    resp = await client.get("/v1/nowhere")
    assert resp.status == 404
    body = await resp.json()
    assert body["error"] == "not_found"
    assert "/v1/nowhere" in body["message"]


async def test_wrong_method_is_json_405_with_allow(client: Client) -> None:
    resp = await client.delete("/healthz")
    assert resp.status == 405
    assert (await resp.json())["error"] == "method_not_allowed"
    assert "GET" in resp.headers["Allow"]


async def test_http_exception_from_route_keeps_its_text(client: Client) -> None:
    resp = await client.get("/v1/http-error")
    assert resp.status == 400
    assert await resp.json() == {"error": "bad_request", "message": "body is not JSON"}


async def test_unexpected_error_is_500_without_details(
    client: Client, json_log: io.StringIO
) -> None:
    resp = await client.get("/v1/boom", headers={"X-Request-Id": "req-42"})
    assert resp.status == 500
    text = await resp.text()
    assert "Traceback" not in text
    assert "secret detail" not in text
    assert json.loads(text) == {
        "error": "internal",
        "message": "internal error, see server log (request id req-42)",
    }
    [line] = [x for x in log_lines(json_log) if x["event"] == "unhandled error"]
    assert line["request_id"] == "req-42"
    assert line["level"] == "error"
    assert "RuntimeError: secret detail" in line["exception"]


async def test_oversized_body_is_413_message_too_large(
    app_module: types.ModuleType, tmp_data_dir: Path, aiohttp_client: ClientFactory
) -> None:
    small = Settings(data_dir=tmp_data_dir, max_body_bytes=1024, max_request_bytes=100_000)
    client = await aiohttp_client(app_module.build_app(small))
    ok = await client.post("/v1/echo", data=b"x" * 1000)
    assert ok.status == 200
    resp = await client.post("/v1/echo", data=b"x" * 200_000)
    assert resp.status == 413
    body = await resp.json()
    assert body["error"] == "message_too_large"
    assert "100000" in body["message"]


async def test_a_body_that_cannot_be_decoded_is_400(client: Client) -> None:
    """A body its Content-Encoding does not describe, arriving after the headers (so the route
    is already reading it), is the client's mistake: 400 naming the encoding, not a 500."""

    async def late_body() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.05)  # the route runs and waits for the body
        yield b'{"body": "x"}'

    resp = await client.post(
        "/v1/echo", data=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"}
    )
    assert resp.status == 200 and (await resp.json())["bytes"] == 2  # a real one is read
    resp = await client.post("/v1/echo", data=late_body(), headers={"Content-Encoding": "gzip"})
    assert resp.status == 400, await resp.text()
    body = await resp.json()
    assert body["error"] == "invalid_request"
    assert "gzip" in body["message"], body


# -- request ids ---------------------------------------------------------------------------------


async def test_request_id_is_echoed(client: Client) -> None:
    resp = await client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"


async def test_request_id_generated_when_missing_or_unsafe(client: Client) -> None:
    plain = await client.get("/healthz")
    assert len(plain.headers["X-Request-Id"]) == 16
    unsafe = await client.get("/healthz", headers={"X-Request-Id": "a b\tc"})
    assert unsafe.headers["X-Request-Id"] != "a b\tc"


async def test_request_id_bound_on_request_log_lines(client: Client, json_log: io.StringIO) -> None:
    await client.get("/healthz", headers={"X-Request-Id": "trace-me"})
    [line] = [x for x in log_lines(json_log) if x["event"] == "request"]
    assert line["request_id"] == "trace-me"
    assert line["status"] == 200


# -- server: limits, lifecycle, shutdown ---------------------------------------------------------


def status_of(raw_response: bytes) -> int:
    # aiohttp answers parser errors as HTTP/1.0, so only the code is compared.
    return int(raw_response.split(b" ", 2)[1])


async def _raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def serving(app_module: types.ModuleType, settings: Settings) -> AsyncIterator[int]:
    """The real app behind its real runner on a free port, which this yields."""
    runner = app_module.make_runner(app_module.build_app(settings), settings)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_huge_header_is_400_and_server_keeps_serving(
    app_module: types.ModuleType, settings: Settings
) -> None:
    async with serving(app_module, settings) as port:
        huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        assert status_of(await _raw_request(port, huge)) == 400
        long_line = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        assert status_of(await _raw_request(port, long_line)) in (400, 414)
        many = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500))
        assert status_of(await _raw_request(port, many + b"\r\n")) == 400
        ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert status_of(await _raw_request(port, ok)) == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/topics/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/topics HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"NOT A REQUEST\r\n\r\n",
    ],
)
async def test_requests_aiohttp_refuses_are_answered_with_the_api_error(
    app_module: types.ModuleType, settings: Settings, raw: bytes
) -> None:
    async with serving(app_module, settings) as port:
        answer = await _raw_request(port, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) in (400, 414, 431), answer[:300]
    assert b"content-type: application/json" in head.lower()
    error = orjson.loads(body)
    assert set(error) == {"error", "message"} and error["message"], error
    assert body.endswith(b"\n")


async def test_errors_of_the_app_end_with_a_newline(client: Any) -> None:
    resp = await client.get("/v1/nowhere")
    assert resp.status == 404
    assert (await resp.read()).endswith(b"}\n")


@pytest.mark.parametrize("path", ["/openapi.json", "/healthz", "/readyz"])
async def test_json_answers_of_the_service_routes_end_with_a_newline(
    client: Any, path: str
) -> None:
    resp = await client.get(path)
    assert resp.content_type == "application/json"
    body = await resp.read()
    assert body.endswith(b"}\n"), body[-40:]
    orjson.loads(body)


LIFECYCLE = [
    "timers.start",
    "broker.start",
    "delay.start",
    "tx.start",
    "broker.begin_shutdown",
    "tx.begin_shutdown",
    "tx.stop",
    "delay.stop",
    "broker.stop",
    "timers.stop",
]


async def test_components_start_in_order_and_stop_in_reverse(
    app_module: types.ModuleType, settings: Settings, events: list[str]
) -> None:
    runner = app_module.make_runner(app_module.build_app(settings), settings)
    await runner.setup()
    assert events == LIFECYCLE[:4]
    await runner.cleanup()
    assert events == LIFECYCLE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_sigterm_drains_in_flight_requests_then_stops(
    app_module: types.ModuleType, tmp_data_dir: Path, json_log: io.StringIO, events: list[str]
) -> None:
    port = _free_port()
    settings = Settings(data_dir=tmp_data_dir, http=HostPort("127.0.0.1", port), grpc=None)
    server = asyncio.create_task(app_module.serve(settings))
    for _ in range(100):  # wait until it listens
        await asyncio.sleep(0.02)
        if any(x["event"] == "listening" for x in log_lines(json_log)):
            break
    slow = asyncio.create_task(
        _raw_request(port, b"GET /v1/slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    await asyncio.sleep(0.1)  # the slow request is in its handler now
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(server, 10) == 0
    response = await slow
    assert status_of(response) == 200
    assert response.endswith(b'{"done": true}')
    assert events == LIFECYCLE  # broker.stop (the flush) ran
    logged = [x["event"] for x in log_lines(json_log)]
    assert logged.index("stopping") < logged.index("stopped")


async def test_busy_port_exits_1_after_stopping_what_started(
    app_module: types.ModuleType, tmp_data_dir: Path, json_log: io.StringIO, events: list[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(data_dir=tmp_data_dir, http=HostPort("127.0.0.1", port), grpc=None)
        assert await app_module.serve(settings) == 1
    assert events == LIFECYCLE
    assert any(x["event"] == "cannot listen" for x in log_lines(json_log))


async def test_metrics_count_and_time_requests_per_route(client: Any) -> None:
    for _ in range(3):
        assert (await client.get("/healthz")).status == 200
    assert (await client.get("/no/such/path")).status == 404
    text = await (await client.get("/metrics")).text()
    assert 'route="unmatched",status="404"' in text  # unknown paths add no series of their own
    labels = 'method="GET",route="/healthz",status="200"'
    count = next(
        line
        for line in text.splitlines()
        if line.startswith("tempomq_http_request_seconds_count") and labels in line
    )
    assert float(count.rsplit(" ", 1)[1]) >= 3
    assert f"tempomq_http_request_seconds_sum{{{labels}}}" in text


def test_metrics_of_the_embedded_delay_store_have_no_shard_gauges(tmp_path: Path) -> None:
    # A fresh process: the registry is process-wide, and Redis lease tests register the gauges.
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from aiohttp.test_utils import TestClient, TestServer\n"
        "from tempomq.app import build_app\n"
        "from tempomq.config import Settings\n"
        "async def main():\n"
        "    app = build_app(Settings(data_dir=Path(sys.argv[1])))\n"
        "    async with TestClient(TestServer(app)) as c:\n"
        "        print(await (await c.get('/metrics')).text())\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tempomq_put_messages_total" in done.stdout
    assert "tempomq_delay_shards_owned" not in done.stdout
    assert "tempomq_delay_servers" not in done.stdout


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS])
async def test_a_storage_os_error_is_503_store_unavailable_with_the_cause(
    client: Client, code: int
) -> None:
    resp = await client.get(f"/v1/oserror/{code}")
    assert resp.status == 503
    assert await resp.json() == {
        "error": "store_unavailable",
        "message": f"storage write failed: [Errno {code}] {os.strerror(code)}: "
        "'/data/topics.json.tmp'",
    }


async def test_any_other_os_error_is_still_an_internal_error(client: Client) -> None:
    resp = await client.get(f"/v1/oserror/{errno.ECONNREFUSED}")
    assert resp.status == 500
    assert (await resp.json())["error"] == "internal"
