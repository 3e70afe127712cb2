"""The operator commands as a user runs them: ``python -m tempomq ...`` against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.server import Server, clean_env, free_port, run_tempomq

pytestmark = pytest.mark.e2e

TOPIC = "cli-orders"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("cli") / "data")
    srv.start()
    try:
        yield srv
    finally:
        srv.ensure_stopped()


def _env(url: str) -> dict[str, str]:
    return clean_env(TEMPOMQ_URL=url)


def tq(server: Server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_tempomq(*args, env=_env(server.url), stdin=stdin, timeout_s=30)


def tq_all(url: str, *commands: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """Independent commands, run at once: (exit code, stdout, stderr) of each, in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tempomq", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(url),
        )
        for args in commands
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        results.append((proc.returncode, out, err))
    return results


def ok_json(server: Server, *args: str) -> Any:
    result = tq(server, *args, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def test_topics_sends_delayed_receive_and_lag(server: Server) -> None:
    created = ok_json(server, "topic", "create", TOPIC, "--queues", "2")
    assert (created["name"], created["queues"]) == (TOPIC, 2)
    again = tq(server, "topic", "create", TOPIC)
    assert again.returncode == 4
    assert again.stderr.startswith("tempomq: error: topic_exists: ")
    listed = tq(server, "topic", "list")
    assert listed.returncode == 0
    assert listed.stdout.split()[:3] == ["NAME", "QUEUES", "CREATED"]
    assert TOPIC in listed.stdout.split()

    later = ok_json(server, "send", TOPIC, "in an hour", "--delay", "1h")
    assert later["deliver_at"] > 0
    assert ok_json(server, "delayed", "get", later["msg_id"])["state"] == "scheduled"
    assert ok_json(server, "delayed", "cancel", later["msg_id"])["state"] == "cancelled"

    sent = ok_json(server, "send", TOPIC, "hello", "--key", "k1", "--tags", "greeting")
    message = ok_json(server, "message", sent["msg_id"])
    assert (message["body"], message["keys"], message["tags"]) == ("hello", ["k1"], "greeting")

    got = ok_json(server, "receive", TOPIC, "cli-group", "--ack", "--wait", "2s", "--max", "10")
    assert [m["body"] for m in got["messages"]] == ["hello"]
    assert got["acked"] == 1
    lag = ok_json(server, "group", "lag", TOPIC, "cli-group")
    assert (lag["lag"], lag["inflight"]) == (0, 0)
    assert {q["topic"] for q in lag["queues"]} == {TOPIC, f"%RETRY%cli-group+{TOPIC}"}


def test_send_many_from_stdin_and_replay(server: Server) -> None:
    ok_json(server, "topic", "create", "cli-bulk")
    result = tq(server, "send", "cli-bulk", "-", "--count", "600", "--json", stdin="one\ntwo\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar: stderr is not a terminal
    assert len(json.loads(result.stdout)["results"]) == 600
    assert ok_json(server, "group", "create", "bulk-group")["fifo"] is False
    assert ok_json(server, "group", "lag", "cli-bulk", "bulk-group")["lag"] == 600
    got = ok_json(server, "receive", "cli-bulk", "bulk-group", "--max", "1", "--ack")
    assert got["messages"][0]["body"] == "one\ntwo\n"
    reset = ok_json(server, "group", "reset", "cli-bulk", "bulk-group", "--to", "0")
    assert all(q["offset"] == 0 for q in reset["queues"])
    assert ok_json(server, "group", "lag", "cli-bulk", "bulk-group")["lag"] == 600


def test_transactions_not_found_usage_and_connection_errors(server: Server) -> None:
    tx_list, committed, tx_missing, msg_missing, topic_missing, usage, refused_topic, refused = (
        tq_all(
            server.url,
            ("tx", "list", "--json"),
            ("tx", "list", "--state", "committed", "--json"),
            ("tx", "commit", "no-such-tx"),
            ("message", "0" * 32),
            ("send", "cli-no-such-topic", "x"),
            ("send", TOPIC),
            ("topic", "create", "SYS_mine"),
            ("topic", "list", "--url", f"http://127.0.0.1:{free_port()}"),
        )
    )
    assert tx_list == (0, '{\n  "transactions": []\n}\n', "")
    assert committed[0] == 0 and json.loads(committed[1]) == {"transactions": []}
    assert tx_missing[0] == 3
    assert tx_missing[2].startswith("tempomq: error: transaction_not_found: ")
    assert msg_missing[:2] == (3, "")
    assert msg_missing[2].startswith("tempomq: error: message_not_found: ")
    assert topic_missing[0] == 3
    assert topic_missing[2].startswith("tempomq: error: topic_not_found: ")
    assert usage[0] == 2
    assert "one of the arguments BODY --file is required" in usage[2]
    assert refused_topic[0] == 2  # the server's 400: clients may not use SYS_ topics
    assert refused_topic[2].startswith("tempomq: error: invalid_topic: ")
    assert refused[0] == 1
    assert refused[2].startswith("tempomq: error: connection_failed: ")
