"""Spawn ``tempomq serve`` as a real process on a free port and talk to it over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        #: TEMPOMQ_* variables for the server (the test's own are never passed on).
        self.env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        scheme = "https" if "--tls-cert" in self.extra else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tempomq",
            "serve",
            "--http",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
            "--log-format",
            "json",
            # The RocketMQ endpoint's fixed default port would collide between test servers;
            # tests that use it pass their own --grpc (the last one given wins).
            "--grpc",
            "off",
            *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPOMQ_")}
        env.update(self.env)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process's lifetime
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not listen within {timeout_s}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def running(data_dir: Path, *extra: str) -> Iterator[Server]:
    """A started server, killed on the way out if it is still running."""
    server = Server(data_dir, *extra)
    try:
        server.start()
        yield server
    finally:
        server.ensure_stopped()
def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its TEMPOMQ_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPOMQ_")}
    return {**env, **extra}


def run_tempomq(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """``tempomq ARGS...`` as a process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "tempomq", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )


async def probe_ok(session: aiohttp.ClientSession, url: str) -> tuple[float | None, str]:
    """Poll ``/metrics`` until the in-server probe reports a run: (tempomq_probe_ok, metrics)."""
    text = ""
    for _ in range(300):  # the first run starts after the interval and waits for its delayed
        async with session.get(f"{url}/metrics") as r:
            assert r.status == 200, await r.text()
            text = await r.text()
        line = next((x for x in text.splitlines() if x.startswith("tempomq_probe_ok ")), "")
        if line and not line.endswith("NaN"):
            return float(line.split()[1]), text
        await asyncio.sleep(0.1)
    return None, text


async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with session.request(method, url, json=body) as r:
        return r.status, await r.json()


async def drain(
    session: aiohttp.ClientSession,
    base: str,
    topic: str,
    group: str,
    *,
    idle_polls: int = 2,
    at_least: int = 0,
    timeout_s: float | None = None,
) -> list[dict[str, Any]]:
    """Receive and ack until the group gets nothing ``idle_polls`` times in a row once it has
    ``at_least`` messages, or until ``timeout_s`` has passed (None: no limit)."""
    got: list[dict[str, Any]] = []
    idle = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while idle < idle_polls and (deadline is None or time.monotonic() < deadline):
        status, data = await call(
            session,
            "POST",
            f"{base}/v1/topics/{topic}/groups/{group}/receive",
            {"max_messages": 500, "wait_ms": 300},
        )
        assert status == 200, data
        msgs = data["messages"]
        if not msgs:
            idle += len(got) >= at_least
            continue
        idle = 0
        got.extend(msgs)
        status, data = await call(
            session,
            "POST",
            f"{base}/v1/topics/{topic}/groups/{group}/ack",
            {"receipts": [m["receipt"] for m in msgs]},
        )
        assert status == 200 and data["acked"] == len(msgs), data
    return got


async def wait_ready(
    session: aiohttp.ClientSession, base: str, *, timeout_s: float = 60.0
) -> tuple[int, Any]:
    """Poll ``/readyz`` until it answers 200 or ``timeout_s`` has passed; its last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = await call(session, "GET", f"{base}/readyz")
        if status == 200 or time.monotonic() >= deadline:
            return status, body
        await asyncio.sleep(0.1)


async def until_ready(session: aiohttp.ClientSession, base: str, timeout_s: float = 20.0) -> None:
    """Poll ``/readyz`` (a refused connection counts as not yet) until it answers 200; fail the
    test with the last answer after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = "no answer"
    while True:
        try:
            async with session.get(f"{base}/readyz") as r:
                if r.status == 200:
                    return
                last = await r.text()
        except aiohttp.ClientError as exc:
            last = exc
        assert time.monotonic() < deadline, f"{base} not ready within {timeout_s}s: {last}"
        await asyncio.sleep(0.1)


def run(coro: Any) -> Any:
    return asyncio.get_event_loop_policy().new_event_loop().run_until_complete(coro)
