"""docs/examples/producer.py and consumer.py run as written against a real server (as the compose
profile ``example`` runs them: auth on, the token in a secret's file), and the image's health
probe passes against a serving server."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tempomq.auth import new_token
from tests.e2e.server import Server
from tests.example_output import received_lines, sent_by_kind

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
PROBE = ROOT / "compose" / "healthcheck.py"
#: The delayed messages are due 2 s and 4 s after they are sent: the first consumer run outlasts
#: both. Further runs only pick up what a run's cut-off long poll took (and hid for 30 s: the
#: server still hands messages to a poll whose client has gone, for the rest of its wait_ms).
FIRST_RUN_S = "6"
AGAIN_S = "3"
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "admin-token"
    path.write_text(new_token() + "\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[Server]:
    # As compose starts it: auth on, the admin token read from a secret's file.
    srv = Server(
        tmp_path_factory.mktemp("examples") / "data",
        env={"TEMPOMQ_ADMIN_TOKEN_FILE": str(token_file)},
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.ensure_stopped()


def client_env(server: Server, database: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPOMQ_")}
    env["TEMPOMQ_URL"] = server.url
    assert "TEMPOMQ_ADMIN_TOKEN_FILE" in server.env
    env["TEMPOMQ_TOKEN_FILE"] = server.env["TEMPOMQ_ADMIN_TOKEN_FILE"]
    env["DATABASE_URL"] = f"sqlite+aiosqlite:///{database}"
    return env


def run_example(
    name: str, *args: str, env: dict[str, str], cwd: Path, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def test_the_producer_sends_and_the_consumer_receives(server: Server, tmp_path: Path) -> None:
    database = tmp_path / "example.db"
    env = client_env(server, database)
    produced = run_example("producer", env=env, cwd=tmp_path)
    sent = sent_by_kind(produced.stdout)
    assert {kind: len(ids) for kind, ids in sent.items()} == {
        "plain": 3,
        "delayed": 2,
        "committed": 2,
        "rolled-back": 1,
    }, produced.stdout

    # The local database committed with the messages, and only with them.
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT number, state FROM orders ORDER BY id").fetchall() == [
            (1, "paid"),
            (2, "paid"),
        ]
        outcomes = db.execute("SELECT outcome FROM tempomq_tx_barrier").fetchall()
        assert outcomes == [("commit",), ("commit",)]

    # The plain and committed messages are there at once, the delayed ones on their time.
    first = run_example("consumer", "--seconds", FIRST_RUN_S, env=env, cwd=tmp_path)
    seen = received_lines(first.stdout)
    assert set(sent["plain"]) <= set(seen), first.stdout
    assert re.search(r"^received \d+ messages$", first.stdout, flags=re.MULTILINE)
    expected = {*sent["plain"], *sent["delayed"], *sent["committed"]}
    deadline = time.monotonic() + DEADLINE_S
    while not expected <= set(seen) and time.monotonic() < deadline:
        again = run_example("consumer", "--seconds", AGAIN_S, env=env, cwd=tmp_path)
        seen.update(received_lines(again.stdout))
    assert expected <= set(seen), f"missing {expected - set(seen)}"
    assert sent["rolled-back"][0] not in seen, "a rolled-back message was delivered"
    for msg_id in sent["delayed"]:
        assert "(delayed, released" in seen[msg_id], seen[msg_id]


def test_the_producer_runs_again_on_the_same_database(server: Server, tmp_path: Path) -> None:
    # A restarted compose service finds its topic and tables in place.
    env = client_env(server, tmp_path / "again.db")
    for _ in range(2):
        run_example("producer", env=env, cwd=tmp_path)
    with sqlite3.connect(tmp_path / "again.db") as db:
        assert db.execute("SELECT count(*) FROM orders").fetchone() == (4,)


def test_the_consumer_stops_cleanly_on_sigterm(server: Server, tmp_path: Path) -> None:
    # `docker compose stop` sends SIGTERM to the consumer, which runs without --seconds there.
    env = client_env(server, tmp_path / "unused.db")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "consumer.py"), "--group", "sigterm"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("consuming orders as group sigterm")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "received" in out


def test_the_image_health_probe_passes_against_a_ready_server(server: Server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPOMQ_")}
    env["TEMPOMQ_HTTP"] = f"0.0.0.0:{server.port}"  # as in the image: the wildcard address
    done = subprocess.run(
        [sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


def test_the_examples_import_without_side_effects(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("producer", "consumer"):
        spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert callable(module.main)
    assert capsys.readouterr() == ("", "")


def test_without_the_token_the_examples_are_refused(server: Server, tmp_path: Path) -> None:
    env = client_env(server, tmp_path / "refused.db")
    del env["TEMPOMQ_TOKEN_FILE"]
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "producer.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "unauthorized" in done.stderr
