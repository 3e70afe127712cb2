"""The reconciliation probe run inside the server (--probe-interval) publishes its results."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.e2e.server import Server, probe_ok

pytestmark = pytest.mark.e2e


async def test_in_server_probe_exports_a_clean_run(tmp_path: Path) -> None:
    server = Server(
        tmp_path / "data", "--probe-interval", "2s", "--probe-duration", "1s", "--probe-rate", "20"
    )
    server.start()
    try:
        async with aiohttp.ClientSession() as session:
            ok, text = await probe_ok(session, server.url)
        assert ok == 1.0, "the in-server probe did not report a clean run"
        assert "tempomq_probe_lost" in text
    finally:
        server.ensure_stopped()
