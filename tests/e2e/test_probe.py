"""The reconciliation probe against a real server: a clean run passes, and a loss is caught."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from tempomq.client import Client, TempoClientError
from tempomq.probe import ProbeConfig, ProbeMetrics, ProbeSchedule
from tests.e2e.server import Server

pytestmark = pytest.mark.e2e

SHORT = ("--delay-max", "500ms", "--grace", "2s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("probe") / "data")
    srv.start()
    try:
        yield srv
    finally:
        srv.ensure_stopped()


async def probe_cli(server: Server, *args: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPOMQ_")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tempomq",
        "probe",
        "--url",
        server.url,
        "--json",
        *SHORT,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def test_a_clean_run_finds_nothing_wrong(server: Server) -> None:
    proc = await probe_cli(server, "--duration", "2s", "--rate", "50", "--progress", "500ms")
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    # Where the run stands, on stderr while it runs (stdout keeps the JSON report alone).
    progress = [line for line in err.decode().splitlines() if line.startswith("probe: ")]
    assert progress and " s of 2 s (sending): " in progress[0], err.decode()
    report = json.loads(out)
    assert report["ok"] is True
    kinds = report["kinds"]
    assert report["total"]["sent"] == 100
    assert (kinds["plain"]["sent"], kinds["delayed"]["sent"], kinds["tx"]["sent"]) == (40, 30, 20)
    assert kinds["tx_rollback"] == {**kinds["tx_rollback"], "sent": 10, "received": 0}
    assert report["total"]["received"] == 90
    assert report["total"]["lost"] == report["total"]["duplicated"] == 0
    assert report["latency_ms"]["plain"]["count"] == 40
    assert report["lateness_ms"]["release"]["count"] == 30
    assert report["lateness_ms"]["release"]["p99"] < 500  # a sanity bound, not a benchmark


async def test_messages_taken_from_the_probe_group_are_reported_lost(server: Server) -> None:
    """Another consumer in the probe's group takes some probe messages away: exit 5."""
    topic, group = "probe-thief-topic", "probe-thief"  # fresh: nothing older to take
    # The stolen ones never come, so the probe waits out --delay-max + --grace: keep it short.
    args = ("--duration", "2s", "--rate", "50", "--grace", "500ms")
    proc = await probe_cli(server, *args, "--topic", topic, "--group", group)
    stolen = 0

    async def steal() -> None:
        nonlocal stolen
        async with Client(server.url) as thief:
            while True:
                try:
                    batch = await thief.receive(topic, group, max_messages=4, wait_ms=200)
                except TempoClientError:  # until the probe has created its topic
                    await asyncio.sleep(0.05)
                    continue
                stolen += len(batch)
                if batch:
                    await thief.ack(topic, group, batch)

    thief = asyncio.create_task(steal())
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        thief.cancel()
        await asyncio.gather(thief, return_exceptions=True)
    assert proc.returncode == 5, err.decode()
    assert err.decode().startswith("tempomq: error: probe_failed: ")
    report = json.loads(out)
    assert report["ok"] is False
    # A receive cut off when the thief stopped may have taken a few more than it counted.
    assert report["total"]["lost"] >= stolen > 0
    assert len(report["samples"]["lost"]) == min(report["total"]["lost"], 20)


async def test_the_schedule_publishes_runs_as_metrics(server: Server) -> None:
    registry = CollectorRegistry()
    config = ProbeConfig(group="probe-scheduled", delay_max_ms=300, grace_ms=2000, settle_ms=200)
    schedule = ProbeSchedule(
        server.url,
        interval_s=60,
        duration_s=1,
        rate=30,
        config=config,
        metrics=ProbeMetrics(registry),
        first_delay_s=0,
    )
    schedule.start()
    try:
        for _ in range(300):
            if schedule.last_report is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        await schedule.stop()
    report = schedule.last_report
    assert report is not None and report.ok, report
    assert registry.get_sample_value("tempomq_probe_ok") == 1
    assert registry.get_sample_value("tempomq_probe_lost", {"kind": "plain"}) == 0
    sent = registry.get_sample_value("tempomq_probe_sent", {"kind": "plain"})
    assert sent == report.kinds["plain"].sent > 0
    p50 = registry.get_sample_value(
        "tempomq_probe_latency_seconds", {"kind": "plain", "quantile": "0.5"}
    )
    assert p50 is not None and p50 >= 0
