"""docs/cli.md, run as written: every ``$ tempomq ...`` line of its console blocks is run against
a real server, in the page's order, and what it prints is held to what the page shows.

The page's example ids (a message, a delayed message, a transaction, receipts) stand for ids of
this run: each is replaced by the real one, taken from the output of the command that made it
(or, for the delayed message and the transaction, made by the test just before the section that
uses them). The section on errors runs last, as its examples assume the topic exists. What is
compared: the exit code (the ``echo $?`` line, else 0), the error line's code, the keys of
key/value output and their values (except times of this run, ids and queue numbers), the column
names of tables, the top-level keys of JSON output, and the probe's verdict.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.server import Server

pytestmark = pytest.mark.e2e

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
DOC_MSG_ID = "01a1fed7da4bfed93314009a3d856548"
DOC_DELAYED_ID = "01a1fed7fc8c1925941e00bc336a8424"
DOC_TX_ID = "356b97f58ef67182bd8bdc27f75d4e0a"
DOC_RECEIPTS = ("c76b86f5-0-0-1", "c76b86f5-0-1-2")

_KV = re.compile(r"^([a-z_]+(?: [A-Z_]+)?)\s{2,}(\S.*)$")
_HEADER = re.compile(r"^[A-Z][A-Z_]*(?:\s+[A-Z][A-Z_]*)+$")
_ERROR = re.compile(r"^tempomq: error: ([a-z_]+):")


@dataclass
class Example:
    section: str
    line: int
    command: str
    expected: list[str] = field(default_factory=list)


def examples() -> list[Example]:
    out: list[Example] = []
    section = ""
    in_console = False
    for number, text in enumerate(PAGE.read_text().splitlines(), 1):
        if text.startswith("## "):
            section = text[3:]
        if text.startswith("```"):
            in_console = text.strip() == "```console" and not in_console
            continue
        if not in_console:
            continue
        if text.startswith("$ "):
            out.append(Example(section, number, text[2:]))
        elif out:
            out[-1].expected.append(text)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("cli-doc") / "data")
    srv.start()
    try:
        yield srv
    finally:
        srv.ensure_stopped()


def test_the_page_has_examples_of_every_command() -> None:
    commands = {" ".join(shlex.split(e.command)[1:3]) for e in examples()}
    for wanted in (
        "topic create",
        "topic list",
        "topic delete",
        "delayed get",
        "delayed reschedule",
        "delayed cancel",
        "tx list",
        "tx commit",
        "tx rollback",
        "group create",
        "group lag",
        "group reset",
        "group list",
        "group delete",
    ):
        assert wanted in commands, wanted
    programs = {shlex.split(e.command)[1] for e in examples()}
    assert {"send", "receive", "ack", "message", "probe"} <= programs


def _http(server: Server, method: str, path: str, body: object) -> dict[str, object]:
    req = urllib.request.Request(
        server.url + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        result: dict[str, object] = json.loads(resp.read())
    return result


def _kv(lines: list[str]) -> dict[str, str]:
    return {m[1]: m[2].strip() for line in lines if (m := _KV.match(line))}


def _variable(key: str, value: str) -> bool:
    """A value that differs from run to run: an id, a time of this run, a queue choice."""
    if key == "queue" or re.fullmatch(r"[0-9a-f]{32}", value):
        return True
    return value.startswith("20") and not value.startswith("2030-")  # a time, not 2030's


def _json_keys(lines: list[str]) -> set[str]:
    return {m[1] for line in lines if (m := re.match(r'^  "(\w+)":', line))}


def _prepare(ex: Example, server: Server, subs: dict[str, str]) -> None:
    """Make what a section's examples use but no earlier example made."""
    if ex.section == "Delayed messages" and DOC_DELAYED_ID not in subs:
        body = {"body": "later", "delay_ms": 1800000}
        sent = _http(server, "POST", "/v1/topics/orders/messages", body)
        subs[DOC_DELAYED_ID] = str(sent["msg_id"])
    if ex.section == "Transactions" and DOC_TX_ID not in subs:
        body = {"topic": "orders", "message": {"body": "tx"}, "producer_group": "order-svc"}
        subs[DOC_TX_ID] = str(_http(server, "POST", "/v1/transactions", body)["tx_id"])


def _check(ex: Example, result: subprocess.CompletedProcess[str]) -> list[str]:
    """Hold a run to the page; returns its stdout lines."""
    where = f"docs/cli.md:{ex.line}: {ex.command}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    expected = [line for line in ex.expected if line.strip() not in ("...", "")]
    stdout = result.stdout.splitlines()
    if ex.command.endswith("echo $?"):
        code = int(expected.pop())
        assert stdout and stdout[-1] == str(code), where
        stdout.pop()
    else:
        assert result.returncode == 0, where
    errors = [m[1] for line in expected if (m := _ERROR.match(line))]
    if errors:
        got = _ERROR.match(result.stderr)
        assert got is not None and got[1] == errors[0] and stdout == [], where
    elif expected and expected[0].startswith("{"):
        assert set(json.loads(result.stdout)) == _json_keys(expected), where
    elif expected and not expected[0].startswith("["):  # "[###": a bar, drawn on a terminal only
        # Key/value lines; in a table only its header counts (rows hold this run's data).
        first_header = next(
            (i for i, line in enumerate(expected) if _HEADER.match(line)), len(expected)
        )
        got_kv = _kv(stdout)
        for key, value in _kv(expected[:first_header]).items():
            assert key in got_kv, f"{key!r} missing: {where}"
            assert _variable(key, value) or got_kv[key] == value, f"{key!r}: {where}"
        for header in (line for line in expected if _HEADER.match(line)):
            assert any(line.split() == header.split() for line in stdout), f"{header}: {where}"
        assert all(line in stdout for line in expected if line.startswith("result:")), where
    return stdout


def test_every_example_runs_as_the_page_shows(server: Server, tmp_path: Path) -> None:
    (tmp_path / "invoice.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPOMQ_")}
    env["TEMPOMQ_URL"] = server.url
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subs: dict[str, str] = {}
    runs = examples()
    runs.sort(key=lambda e: e.section.startswith("Exit codes"))  # stable: errors last
    for ex in runs:
        _prepare(ex, server, subs)
        command = ex.command
        for doc_value, real in subs.items():
            command = command.replace(doc_value, real)
        result = subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
            check=False,
        )
        stdout = _check(ex, result)
        # Ids this command made stand in for the page's from now on.
        if ex.command.startswith("tempomq send orders '{\"order\": 17}'"):
            subs[DOC_MSG_ID] = _kv(stdout)["msg_id"]
        if ex.command.startswith("tempomq receive orders billing --max 2"):
            receipts = [line.split()[-1] for line in stdout[1:] if len(line.split()) > 4]
            assert len(receipts) == 2, stdout
            subs.update(zip(DOC_RECEIPTS, receipts, strict=True))
    assert {DOC_MSG_ID, DOC_DELAYED_ID, DOC_TX_ID, *DOC_RECEIPTS} <= set(subs)
    assert len(runs) >= 20
