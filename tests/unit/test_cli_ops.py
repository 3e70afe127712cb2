"""Operator commands (tempomq.ops) and the probe's accounting, against a fake API in a thread.

The fake answers canned JSON per ``(method, path)`` and records every request, so a test shows
both what the CLI asked and what it printed. ``cli.main`` runs as it does for a user (its own
``asyncio.run``), which is why the fake serves from a thread of its own.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from tempomq import cli, ops, probe
from tempomq.client import (
    AlreadyDelivered,
    BadRequest,
    ConnectionFailed,
    GroupNotFound,
    MessageTooLarge,
    ReceiptExpired,
    RequestTimedOut,
    ServerError,
    TempoClientError,
    TopicExists,
    TopicNotFound,
    Unavailable,
)
from tempomq.probe import KindCounts, Ledger, Percentiles, ProbeMetrics, ProbeReport

Answer = tuple[int, Any]


class FakeApi:
    """A stand-in tempomq HTTP API on a free port, answering from :attr:`answers`."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], Answer | Callable[[Any], Answer]] = {}
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on(self, method: str, path: str, answer: Answer | Callable[[Any], Answer]) -> None:
        self.answers[(method, path)] = answer

    def bodies(self, method: str, path: str) -> list[Any]:
        return [body for m, p, _, body in self.requests if (m, p) == (method, path)]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, dict(request.query), body))
        answer = self.answers.get((request.method, request.path))
        if answer is None:
            answer = (404, {"error": "not_found", "message": f"no route {request.path}"})
        status, data = answer(body) if callable(answer) else answer
        return web.json_response(data, status=status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApi]:
    fake = FakeApi()
    fake.start()
    monkeypatch.setenv(ops.URL_ENV, fake.url)
    try:
        yield fake
    finally:
        fake.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


MSG_ID = "0190a0b0c0d0e0f00000000000000001"


def delivery(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "msg_id": f"{n:032x}",
        "topic": "orders",
        "queue_id": n % 2,
        "body": f"body {n}",
        "tags": "created",
        "keys": [f"k{n}"],
        "properties": {},
        "born_at": 1_700_000_000_000,
        "stored_at": 1_700_000_000_001,
        "receipt": f"r-{n}",
        "delivery_attempt": 1,
        **extra,
    }


# -- parsing ---------------------------------------------------------------------------------


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    leaves: list[list[str]] = []

    def walk(prefix: list[str], commands: dict[str, cli.Command]) -> None:
        for name, command in commands.items():
            if command.subcommands:
                walk([*prefix, name], dict(command.subcommands))
            else:
                leaves.append([*prefix, name])

    walk([], cli.COMMANDS)
    assert ["topic", "create"] in leaves and ["probe"] in leaves and ["serve"] in leaves
    for path in leaves:
        assert cli.main([*path, "--help"]) == 0, path
        assert "usage: tempomq " + " ".join(path) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["topic"], "required: ACTION"),
        (["topic", "create", "x", "--queues", "0"], "must be at least 1"),
        (["send", "orders"], "one of the arguments BODY --file is required"),
        (["send", "orders", "x", "--delay", "5"], "not a duration; give a unit"),
        (["send", "orders", "x", "--delay", "5s", "--at", "1"], "not allowed with argument"),
        (["send", "orders", "x", "--delay", "-5s"], "--delay: '-5s': a duration cannot be"),
        (["delayed", "reschedule", MSG_ID, "--delay", "-1m"], "cannot be negative"),
        (["send", "orders", "x", "--count", "0"], "must be at least 1"),
        (["send", "orders", "x", "--prop", "novalue"], "is not NAME=VALUE"),
        (["receive", "orders"], "required: GROUP"),
        (["group", "reset", "orders", "g"], "required: --to"),
        (["group", "reset", "orders", "g", "--to", "yesterday"], "neither epoch milliseconds"),
        (["delayed", "reschedule", MSG_ID], "one of the arguments --delay --at is required"),
        (["tx", "list", "--state", "open"], "invalid choice: 'open'"),
        (["probe", "--rate", "0"], "must be above 0"),
        (["probe", "--rate", "1e9"], "at most 5000"),
        (["topic", "list", "--timeout", "0s"], "--timeout: must be above 0"),
        (["topic", "list", "--url", "ftp://x"], "'ftp://x' is not an http:// or https://"),
        (["topic", "list", "--url", "localhost:1,ftp://x"], "is not an http:// or https://"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == ops.EXIT_USAGE
    assert message in err
    assert "Traceback" not in err


def test_time_arguments() -> None:
    assert ops.parse_time_ms("1714564800000") == 1714564800000
    assert ops.parse_time_ms("2024-05-01T12:00:00Z") == 1714564800000
    assert ops.parse_time_ms("2024-05-01T14:00:00.250+02:00") == 1714564800250
    with pytest.raises(ValueError, match="neither"):
        ops.parse_time_ms("soon")
    assert ops.parse_property("a=b=c") == ("a", "b=c")


# -- formatting ------------------------------------------------------------------------------


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    text = ops.table(("NAME", "QUEUES", "NOTE"), [("orders", 8, None), ("a", 128, "x")])
    assert text.splitlines() == [
        "NAME    QUEUES  NOTE",
        "orders       8  -",
        "a          128  x",
    ]
    assert ops.table(("A", "B"), []) == "A  B"
    assert ops.record([("msg_id", "m1"), ("keys", ("a", "b")), ("ok", True)]).splitlines() == [
        "msg_id  m1",
        "keys    a,b",
        "ok      yes",
    ]


def test_cells_and_previews() -> None:
    assert ops.cell(float("nan")) == "-"
    assert ops.cell(2.345) == "2.3"
    assert ops.cell([]) == "-"
    assert ops.when(1714564800123) == "2024-05-01T12:00:00.123Z"
    assert ops.preview(b"a\nb\tc") == "a b c"
    assert ops.preview(b"\xff\xfe") == "<2 bytes>"
    assert ops.preview(b"x" * 100, 10) == "x" * 9 + "…"


def test_progress_bar_draws_on_an_enabled_stream_only() -> None:
    ticks = iter([0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    stream = io.StringIO()
    bar = ops.Progress(4, bytes_each=1024, stream=stream, enabled=True, clock=lambda: next(ticks))
    bar.advance(2)
    bar.advance(2)
    bar.close()
    lines = stream.getvalue().split("\r")
    assert "2/4" in lines[1] and " 50%" in lines[1]
    assert lines[-1].startswith("[" + "#" * ops.Progress.WIDTH + "] 4/4 100%")
    assert "4.0 KiB" in lines[-1] and lines[-1].endswith("msg/s\n")
    quiet = io.StringIO()
    off = ops.Progress(4, bytes_each=1, stream=quiet, enabled=False)
    off.advance(4)
    off.close()
    assert quiet.getvalue() == ""


# -- exit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TopicNotFound("x", status=404), ops.EXIT_NOT_FOUND),
        (GroupNotFound("x", status=404), ops.EXIT_NOT_FOUND),
        (TopicExists("x", status=409), ops.EXIT_CONFLICT),
        (ReceiptExpired("x", status=409), ops.EXIT_CONFLICT),
        (AlreadyDelivered("x", status=409), ops.EXIT_CONFLICT),
        (BadRequest("x", status=400), ops.EXIT_USAGE),
        (MessageTooLarge("x", status=413), ops.EXIT_USAGE),
        (ServerError("x", status=500), ops.EXIT_FAILURE),
        (Unavailable("x", status=503), ops.EXIT_FAILURE),
        (ConnectionFailed("x", sent=False), ops.EXIT_FAILURE),
        (RequestTimedOut("x"), ops.EXIT_FAILURE),
        (TempoClientError("x", status=405), ops.EXIT_FAILURE),
    ],
)
def test_exit_code_mapping(error: TempoClientError, code: int) -> None:
    assert ops.exit_code_for(error) == code


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (404, "message_not_found", 3),
        (409, "topic_exists", 4),
        (400, "invalid_topic", 2),
        (500, "internal", 1),
        (503, "store_unavailable", 1),
    ],
)
def test_server_errors_print_code_and_message(
    api: FakeApi, capsys: pytest.CaptureFixture[str], status: int, error: str, code: int
) -> None:
    api.on("GET", f"/v1/messages/{MSG_ID}", (status, {"error": error, "message": "it said no"}))
    assert run(capsys, "message", MSG_ID, "--timeout", "2s") == (
        code,
        "",
        f"tempomq: error: {error}: it said no\n",
    )


def test_connection_refused_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "topic", "list", "--url", "http://127.0.0.1:1")
    assert (code, out) == (ops.EXIT_FAILURE, "")
    assert err.startswith(
        "tempomq: error: connection_failed: no tempomq server answers at http://127.0.0.1:1:"
        " is `tempomq serve` running?"
    )


def test_several_urls_fail_over(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.on("GET", "/v1/topics", (200, {"topics": []}))
    code, out, _ = run(capsys, "topic", "list", "--url", f"http://127.0.0.1:1,{api.url}")
    assert (code, out) == (0, "NAME  QUEUES  CREATED\n")


# -- commands against the fake ---------------------------------------------------------------


def test_topic_create_leaves_the_queue_count_to_the_server(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("POST", "/v1/topics", lambda b: (201, {"name": b["name"], "queues": b.get("queues", 3)}))
    code, out, _ = run(capsys, "topic", "create", "orders")
    assert code == 0
    assert out.splitlines()[:2] == ["name        orders", "queues      3"]
    assert run(capsys, "topic", "create", "orders", "--queues", "2", "--json")[1] == (
        '{\n  "name": "orders",\n  "queues": 2,\n  "created_at": null\n}\n'
    )
    assert api.bodies("POST", "/v1/topics") == [
        {"name": "orders"},
        {"name": "orders", "queues": 2},
    ]


def test_topic_list_table_and_json(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    topics = [
        {"name": "orders", "queues": 8, "created_at": 1714564800000},
        {"name": "b", "queues": 16},
    ]
    api.on("GET", "/v1/topics", (200, {"topics": topics}))
    _, out, _ = run(capsys, "topic", "list")
    assert out.splitlines() == [
        "NAME    QUEUES  CREATED",
        "orders       8  2024-05-01T12:00:00.000Z",
        "b           16  -",
    ]
    data = json.loads(run(capsys, "topic", "list", "--json")[1])
    assert [t["name"] for t in data["topics"]] == ["orders", "b"]


def test_send_with_delay_tags_keys_and_properties(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on(
        "POST",
        "/v1/topics/orders/messages",
        (201, {"msg_id": MSG_ID, "queue_id": 1, "deliver_at": 1714564830000}),
    )
    argv = ["send", "orders", "hi", "--delay", "30s", "--tags", "t", "--key", "a", "--key", "b"]
    code, out, err = run(capsys, *argv, "--prop", "x=1", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"msg_id": MSG_ID, "queue_id": 1, "deliver_at": 1714564830000}
    (body,) = api.bodies("POST", "/v1/topics/orders/messages")
    assert body["body"] == "hi" and body["delay_ms"] == 30_000 and body["tags"] == "t"
    assert body["keys"] == ["a", "b"] and body["properties"] == {"x": "1"}


def test_send_count_goes_in_batches_with_a_progress_bar_on_a_terminal(
    api: FakeApi, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def answer(body: Any) -> Answer:
        results = [{"msg_id": m["msg_id"], "queue_id": 0} for m in body["messages"]]
        return 201, {"results": results}

    api.on("POST", "/v1/topics/orders/messages", answer)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    code = cli.main(["send", "orders", "x", "--count", "1200", "--at", "2030-01-01T00:00:00Z"])
    out = capsys.readouterr().out
    assert code == 0
    sizes = [len(b["messages"]) for b in api.bodies("POST", "/v1/topics/orders/messages")]
    assert sizes == [ops.SEND_CHUNK, ops.SEND_CHUNK, 1200 - 2 * ops.SEND_CHUNK]
    assert all(m["deliver_at"] == 1893456000000 for m in api.requests[0][3]["messages"])
    assert out.splitlines()[0] == "sent        1200"
    assert "1200/1200 100%" in terminal.getvalue()


def test_send_reads_a_binary_file_as_base64(
    api: FakeApi, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    api.on("POST", "/v1/topics/orders/messages", (201, {"msg_id": MSG_ID, "queue_id": 0}))
    path = tmp_path / "blob"
    path.write_bytes(b"\x00\xff")
    assert run(capsys, "send", "orders", "--file", str(path))[0] == 0
    assert api.bodies("POST", "/v1/topics/orders/messages")[0]["body_b64"] == "AP8="
    code, _, err = run(capsys, "send", "orders", "--file", str(tmp_path / "missing"))
    assert code == ops.EXIT_USAGE
    assert err.startswith("tempomq: error: unreadable_file: cannot read")


def test_receive_with_ack(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    path = "/v1/topics/orders/groups/audit"
    api.on("POST", f"{path}/receive", (200, {"messages": [delivery(1), delivery(2)]}))
    api.on("POST", f"{path}/ack", lambda b: (200, {"acked": len(b["receipts"])}))
    code, out, _ = run(capsys, "receive", "orders", "audit", "--max", "5", "--wait", "2s", "--ack")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MSG_ID", "ATTEMPT", "QUEUE", "TAGS", "KEYS", "STORED", "BODY"]
    assert lines[1].endswith("body 1") and lines[-1] == "2 received, 2 acked"
    assert api.bodies("POST", f"{path}/receive") == [
        {"max_messages": 5, "wait_ms": 2000, "invisible_ms": 30000}
    ]
    assert api.bodies("POST", f"{path}/ack") == [{"receipts": ["r-1", "r-2"]}]


def test_receive_without_ack_shows_receipts(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on(
        "POST",
        "/v1/topics/orders/groups/audit/receive",
        (200, {"messages": [delivery(1, body=None, body_b64="AP8=")]}),
    )
    _, out, _ = run(capsys, "receive", "orders", "audit")
    assert out.splitlines()[0].endswith("RECEIPT") and "<2 bytes>  r-1" in out
    data = json.loads(run(capsys, "receive", "orders", "audit", "--json")[1])
    assert data["acked"] == 0 and data["messages"][0]["body_b64"] == "AP8="
    assert api.bodies("POST", "/v1/topics/orders/groups/audit/ack") == []


def test_group_lag_names_the_retry_queue_and_totals(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    def queue(topic: str, lag: int) -> dict[str, Any]:
        return {
            "topic": topic,
            "queue_id": 0,
            "min_offset": 0,
            "max_offset": lag,
            "committed_offset": 0,
            "next_offset": 0,
            "inflight": 0,
            "lag": lag,
        }

    status = {"lag": 7, "inflight": 0, "queues": [queue("orders", 7), queue("%RETRY%g+orders", 0)]}
    api.on("GET", "/v1/topics/orders/groups/g", (200, status))
    _, out, _ = run(capsys, "group", "lag", "orders", "g")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["TOPIC", "QUEUE", "MIN", "MAX", "COMMITTED", "NEXT", "INFLIGHT", "LAG"]
    assert rows[2][0] == "%RETRY%g+orders"
    assert rows[3] == ["total", "-", "-", "-", "-", "-", "0", "7"]


def test_group_reset_and_tx_list(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.on(
        "POST",
        "/v1/topics/orders/groups/g/reset",
        (200, {"queues": [{"queue_id": 0, "offset": 4}]}),
    )
    data = json.loads(
        run(capsys, "group", "reset", "orders", "g", "--to", "1714564800000", "--json")[1]
    )
    assert data["queues"] == [{"queue_id": 0, "offset": 4}]
    assert api.bodies("POST", "/v1/topics/orders/groups/g/reset") == [{"timestamp": 1714564800000}]
    tx = {
        "tx_id": "t1",
        "msg_id": MSG_ID,
        "topic": "orders",
        "producer_group": "svc",
        "state": "check_max",
        "check_count": 15,
        "created_at": 1714564800000,
    }
    api.on("GET", "/v1/transactions", (200, {"transactions": [tx]}))
    _, out, _ = run(capsys, "tx", "list")
    assert out.splitlines()[0].startswith("transactions in state check_max (--state: ")
    assert out.splitlines()[2].split() == [
        "t1",
        MSG_ID,
        "orders",
        "svc",
        "check_max",
        "15",
        "2024-05-01T12:00:00.000Z",
    ]
    assert api.requests[-1][2] == {"state": "check_max"}


def test_tx_commit_conflict_and_delayed_cancel(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on(
        "POST",
        "/v1/transactions/t1/commit",
        (409, {"error": "already_rolled_back", "message": "rolled back"}),
    )
    assert run(capsys, "tx", "commit", "t1")[0] == ops.EXIT_CONFLICT
    api.on(
        "DELETE",
        f"/v1/delayed/{MSG_ID}",
        (200, {"msg_id": MSG_ID, "topic": "orders", "deliver_at": 1, "state": "cancelled"}),
    )
    code, out, _ = run(capsys, "delayed", "cancel", MSG_ID)
    assert code == 0 and out.splitlines()[-1] == "state       cancelled"


# -- serve and the client's variables --------------------------------------------------------


def test_serve_does_not_call_tempomq_url_misspelt(monkeypatch: pytest.MonkeyPatch) -> None:
    warned: list[str] = []

    class Log:
        def warning(self, _event: str, *, variable: str) -> None:
            warned.append(variable)

    monkeypatch.setitem(sys.modules, "tempomq.app", types.SimpleNamespace(run=lambda s: 0))
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    monkeypatch.setattr(cli, "get_logger", lambda _name: Log())
    monkeypatch.setenv("TEMPOMQ_URL", "http://x")
    monkeypatch.setenv("TEMPOMQ_DATADIR", "typo")
    assert cli.main(["serve"]) == 0
    assert warned == ["TEMPOMQ_DATADIR"]


# -- the probe's accounting ------------------------------------------------------------------


def props(ledger: Ledger, seq: int, kind: probe.Kind, **extra: str) -> dict[str, str]:
    return {**ledger.properties(seq, kind), **extra}


def test_ledger_reconciles_loss_duplicates_redeliveries_and_unexpected() -> None:
    ledger = Ledger("run1")
    kinds: tuple[probe.Kind, ...] = ("plain", "plain", "delayed", "tx", "tx_rollback", "plain")
    for seq, kind in enumerate(kinds):
        ledger.sending(seq, kind, 1000.0)
        if seq == 5:
            ledger.failed(seq, kind)  # unknown outcome: neither lost nor unexpected
        else:
            ledger.confirmed(seq, kind, f"m{seq}")
    assert ledger.outstanding == 4
    ledger.received("m0", props(ledger, 0, "plain"), 1, 1010.0)
    ledger.received("m0", props(ledger, 0, "plain"), 1, 1011.0)  # duplicate
    delayed = props(ledger, 2, "delayed", DELIVER_AT="1500", RELEASED_AT="1503")
    ledger.received("m2", delayed, 1, 1520.0)
    ledger.received("m2", delayed, 2, 1600.0)  # announced redelivery
    ledger.received("m3", props(ledger, 3, "tx"), 1, 1005.0)
    ledger.received("m4", props(ledger, 4, "tx_rollback"), 1, 1005.0)  # must never come
    ledger.received("x", {"PROBE_RUN": "other", "PROBE_SEQ": "0"}, 1, 1005.0)
    assert ledger.outstanding == 1  # m1
    report = ledger.report(started_at_ms=1000, duration_s=1.0, rate=10)
    assert report.kinds["plain"] == KindCounts(sent=2, received=1, lost=1, duplicated=1, errors=1)
    assert report.kinds["delayed"] == KindCounts(sent=1, received=1, redelivered=1)
    assert report.kinds["tx_rollback"] == KindCounts(sent=1, received=1, unexpected=1)
    assert report.stale == 1
    assert not report.ok
    assert report.problems() == ["1 lost", "1 duplicated", "1 unexpected"]
    assert report.samples == {"lost": ("m1",), "duplicated": ("m0",), "unexpected": ("m4",)}
    assert report.latency_ms["plain"].p50 == 10.0 and report.latency_ms["tx"].max == 5.0
    assert report.lateness_ms["receive"].max == 20.0
    assert report.lateness_ms["release"].max == 3.0
    assert ops.probe_verdict(report)[0] == ops.EXIT_PROBE_FAILED


def test_a_redelivery_after_a_failed_ack_is_not_a_duplicate() -> None:
    ledger = Ledger("r")
    ledger.sending(0, "plain", 0.0)
    ledger.confirmed(0, "plain", "m0")
    ledger.received("m0", props(ledger, 0, "plain"), 1, 1.0)
    ledger.ack_failed(0)
    ledger.received("m0", props(ledger, 0, "plain"), 1, 2.0)
    report = ledger.report(started_at_ms=0, duration_s=1.0, rate=1)
    assert report.ok and report.total.redelivered == 1
    assert ops.probe_verdict(report) == (ops.EXIT_OK, None)


def test_percentiles_nearest_rank() -> None:
    p = Percentiles.of(float(v) for v in range(1, 101))
    assert (p.count, p.p50, p.p90, p.p99, p.max) == (100, 50.0, 90.0, 99.0, 100.0)
    assert Percentiles.of([]).to_json() == {
        "count": 0,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
    }


def test_probe_bounds() -> None:
    assert probe.check_bounds(3, 50) == 150
    with pytest.raises(ValueError, match="at most"):
        probe.check_bounds(3600, 5000)
    with pytest.raises(ValueError, match="duration"):
        probe.check_bounds(0, 10)


def report_with(**plain: int) -> ProbeReport:
    ledger = Ledger("r")
    base = ledger.report(started_at_ms=1_700_000_000_000, duration_s=1.0, rate=10)
    kinds = dict(base.kinds)
    kinds["plain"] = KindCounts(**plain)
    return ProbeReport(
        run_id="r",
        started_at_ms=base.started_at_ms,
        duration_s=1.0,
        rate=10,
        kinds=kinds,
        latency_ms={"plain": Percentiles.of([1.0, 3.0]), "tx": Percentiles.of([])},
        lateness_ms=base.lateness_ms,
    )


def test_publish_report_sets_the_gauges() -> None:
    registry = CollectorRegistry()
    metrics = ProbeMetrics(registry)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    ok = value("tempomq_probe_ok")
    assert ok is not None and math.isnan(ok)  # no run yet: neither ok nor failed
    probe.publish_report(report_with(sent=10, received=9, lost=1), metrics)

    assert value("tempomq_probe_lost", kind="plain") == 1
    assert value("tempomq_probe_sent", kind="plain") == 10
    assert value("tempomq_probe_ok") == 0
    assert value("tempomq_probe_latency_seconds", kind="plain", quantile="1") == 0.003
    assert value("tempomq_probe_runs_total", result="failed") == 1
    assert value("tempomq_probe_last_run_timestamp_seconds") == 1_700_000_000


def test_probe_command_exits_5_on_loss(
    api: FakeApi, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fake_run(
        self: probe.Probe, duration_s: float, rate: float, **progress: Any
    ) -> ProbeReport:
        assert (duration_s, rate) == (2.0, 50.0)
        return report_with(sent=10, received=8, lost=2)

    monkeypatch.setattr(probe.Probe, "run", fake_run)
    code, out, err = run(capsys, "probe", "--duration", "2s", "--rate", "50")
    assert code == ops.EXIT_PROBE_FAILED
    assert err == "tempomq: error: probe_failed: 2 lost\n"
    assert "result: FAILED: 2 lost" in out
    assert ["plain", "10", "8", "2", "0", "0", "-", "0"] in [
        line.split() for line in out.splitlines()
    ]
    code, out, _ = run(capsys, "probe", "--duration", "2s", "--rate", "50", "--json")
    assert code == ops.EXIT_PROBE_FAILED and json.loads(out)["total"]["lost"] == 2


async def test_probe_schedule_stops_when_cancelled_as_a_run_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancel that lands as a run completes still stops the schedule. Python 3.11's
    ``asyncio.wait_for`` returned the run's result and swallowed such a cancel, so the schedule
    ran on and the server's stop (``ProbeSchedule.stop``) waited for it forever."""
    runs: list[float] = []
    schedule = probe.ProbeSchedule(
        "http://127.0.0.1:1",
        interval_s=0.01,
        duration_s=1,
        rate=10,
        metrics=ProbeMetrics(CollectorRegistry()),
        first_delay_s=0,
    )

    async def fake_run(self: probe.Probe, duration_s: float, rate: float) -> ProbeReport:
        runs.append(duration_s)
        assert schedule._task is not None
        schedule._task.cancel()  # lands while the run is finishing
        return report_with(sent=1, received=1)

    monkeypatch.setattr(probe.Probe, "run", fake_run)
    schedule.start()
    task = schedule._task
    assert task is not None
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()
    assert len(runs) == 1


async def test_probe_schedule_runs_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[float] = []

    async def fake_run(self: probe.Probe, duration_s: float, rate: float) -> ProbeReport:
        runs.append(duration_s)
        if len(runs) == 2:
            raise RuntimeError("boom")  # a failed run is counted; the schedule goes on
        return report_with(sent=1, received=1)

    monkeypatch.setattr(probe.Probe, "run", fake_run)
    registry = CollectorRegistry()
    schedule = probe.ProbeSchedule(
        "http://127.0.0.1:1",
        interval_s=0.01,
        duration_s=1,
        rate=10,
        metrics=ProbeMetrics(registry),
        first_delay_s=0,
    )
    schedule.start()
    for _ in range(200):
        if len(runs) >= 3:
            break
        await asyncio.sleep(0.01)
    await schedule.stop()
    assert not schedule.running and len(runs) >= 3
    assert schedule.last_report is not None and schedule.last_report.ok
    assert registry.get_sample_value("tempomq_probe_runs_total", {"result": "error"}) == 1
    assert registry.get_sample_value("tempomq_probe_ok") == 1
