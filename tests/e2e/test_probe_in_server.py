"""The reconciliation probe run inside the server (--probe-interval) publishes its results."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.server import Server

pytestmark = pytest.mark.e2e


async def test_in_server_probe_exports_a_clean_run(tmp_path: Path) -> None:
    server = Server(
        tmp_path / "data", "--probe-interval", "2s", "--probe-duration", "1s", "--probe-rate", "20"
    )
    server.start()
    try:
        async with aiohttp.ClientSession() as session:
            ok = None
            for _ in range(300):  # first run after 2 s: sends for 1 s, waits for the delayed ones
                async with session.get(f"{server.url}/metrics") as r:
                    text = await r.text()
                line = next((x for x in text.splitlines() if x.startswith("tempomq_probe_ok ")), "")
                if line and not line.endswith("NaN"):
                    ok = float(line.split()[1])
                    break
                await asyncio.sleep(0.1)
        assert ok == 1.0, "the in-server probe did not report a clean run"
        assert "tempomq_probe_lost" in text
    finally:
        server.ensure_stopped()
