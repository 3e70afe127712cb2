"""The SDK installs on its own: ``pip install ./clients/python`` into a clean virtualenv brings
aiohttp and orjson, none of the server's packages, and the SDK in it talks to a server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import Server

ROOT = Path(__file__).resolve().parents[2]
#: What the server needs and an application using the SDK must not get.
SERVER_PACKAGES = frozenset(
    {
        "tempomq",
        "redis",
        "hiredis",
        "sortedcontainers",
        "sqlalchemy",
        "aiomysql",
        "pymysql",
        "aiosqlite",
        "structlog",
        "prometheus-client",
        "pyyaml",
    }
)

SCRIPT = """
import asyncio, sys
from tempomq.client import Client, SyncClient

async def main(url):
    async with Client(url) as client:
        await client.create_topic("installed", queues=1)
        sent = await client.send("installed", "hello")
        [got] = await client.receive("installed", "app", wait_ms=2000)
        assert got.msg_id == sent.msg_id and got.text == "hello", got
        assert await client.ack("installed", "app", [got]) == 1

asyncio.run(main(sys.argv[1]))
with SyncClient(sys.argv[1]) as client:
    sent = client.send("installed", "sync hello")
    [got] = client.receive("installed", "app", wait_ms=2000)
    assert got.text == "sync hello" and client.ack("installed", "app", [got]) == 1
assert not any(m.split(".")[0] in ("broker_core", "delayserver", "txcoord") for m in sys.modules)
print("ok")
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data")
    s.start()
    try:
        yield s
    finally:
        s.ensure_stopped()


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_the_sdk_installs_without_the_server_and_works(server: Server, tmp_path: Path) -> None:
    # A copy with the linked tempomq/client resolved: the build writes nothing into the checkout.
    source = tmp_path / "client-src"
    shutil.copytree(ROOT / "clients" / "python", source, symlinks=False)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--disable-pip-version-check", "-q", source)
    listed = json.loads(run(python, "-m", "pip", "list", "--format=json"))
    installed = {p["name"].lower().replace("_", "-") for p in listed}
    assert {"tempomq-client", "aiohttp", "orjson"} <= installed
    assert not SERVER_PACKAGES & installed, SERVER_PACKAGES & installed
    assert run(python, "-c", SCRIPT, server.url, cwd=tmp_path).strip() == "ok"


#: Test tools of the dev extra that `make run` must not install.
DEV_TOOLS = frozenset(
    {
        "pytest",
        "schemathesis",
        "playwright",
        "matplotlib",
        "hypothesis",
        "mypy",
        "ruff",
        "fakeredis",
    }
)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_installs_what_the_server_needs_and_no_test_tool(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # The install step of `make run` alone (its stamp), so no server is started.
    out = run(
        "make", "-C", ROOT, f"PYTHON={sys.executable}", f"VENV={venv}", venv / ".tempomq-server"
    )
    assert "Collecting" in out and "Successfully installed" in out, out  # progress was shown
    python = venv / "bin" / "python"
    listed = json.loads(run(python, "-m", "pip", "list", "--format=json"))
    installed = {p["name"].lower().replace("_", "-") for p in listed}
    assert {"tempomq", "aiohttp", "redis", "prometheus-client"} <= installed
    assert not DEV_TOOLS & installed, DEV_TOOLS & installed
    run(python, "-c", "import tempomq.app")
