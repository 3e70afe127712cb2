"""Every benchmark script runs to its end and prints its figures as a JSON line.

Tiny sizes, and nothing about the figures themselves is asserted: speed is measured by running
the scripts (see docs/benchmarks.md), never by a test. This only keeps the scripts working.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import reachable, services_required

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "bench"

SMALL = {
    "put_inprocess": ["--messages", "4000"],
    "read_check": ["--messages", "2000", "--rounds", "1"],
    "sync_flush": ["--single-messages", "20", "--concurrent-messages", "640"],
    "http_produce": ["--seconds", "0.5"],
    "http_consume": ["--messages", "2000"],
    "lean_path": ["--messages", "200", "--runs", "1"],
    "wheel_bench": ["--max-pending", "10000", "--ops", "2000"],
    "rocketmq_bench": ["--seconds", "0.5", "--runs", "1", "--threads", "2"],
    "console_api": ["--messages", "3000", "--pending", "300", "--transactions", "5", "--runs", "3"],
    "auth_overhead": ["--seconds", "0.3", "--runs", "1"],
    "consumer_lateness": ["--pending", "2000", "--rate", "500", "--seconds", "1", "--runs", "1"],
    "sdk_cost": ["--n", "200", "--runs", "1"],
}
NEEDS_REDIS = {"delay_store_bench": ["--messages", "2000"]}
#: These start a private redis-server of their own on a free port.
NEEDS_REDIS_SERVER = {"http_schedule": ["--seconds", "0.5"]}
NEEDS_MYSQL = {"tx_bench": ["--seconds", "0.5", "--warmup", "0.2", "--producers", "4"]}
#: A private redis-server (started by the script), and the shared NATS and RabbitMQ.
NEEDS_TARGETS = {
    "release_targets": [
        *("--messages", "300", "--runs", "1", "--nodes", "1"),
        *("--rate", "200", "--seconds", "0.5"),
    ]
}


def _run(name: str, args: list[str], tmp_path: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{name} printed no JSON line:\n{out.stdout[-2000:]}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


def _require(name: str, host: str, port: int) -> None:
    if not reachable(host, port):
        if services_required():
            pytest.fail(f"{name} at {host}:{port} is required (CI=true) but unreachable")
        pytest.skip(f"{name} at {host}:{port} is not reachable")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bench_script_runs(name: str, tmp_path: Path) -> None:
    assert _run(name, SMALL[name], tmp_path)


@pytest.mark.parametrize("name", sorted(NEEDS_REDIS))
def test_bench_script_with_redis_runs(name: str, tmp_path: Path) -> None:
    _require("Redis", "127.0.0.1", 6379)
    assert _run(name, NEEDS_REDIS[name], tmp_path)


@pytest.mark.parametrize("name", sorted(NEEDS_REDIS_SERVER))
def test_bench_script_with_its_own_redis_runs(name: str, tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        if services_required():
            pytest.fail("redis-server is required (CI=true) but not on PATH")
        pytest.skip("redis-server is not on PATH")
    assert _run(name, NEEDS_REDIS_SERVER[name], tmp_path)


@pytest.mark.parametrize("name", sorted(NEEDS_MYSQL))
def test_bench_script_with_mysql_runs(name: str, tmp_path: Path) -> None:
    _require("MariaDB", "127.0.0.1", 3306)
    assert _run(name, NEEDS_MYSQL[name], tmp_path)


@pytest.mark.parametrize("name", sorted(NEEDS_TARGETS))
def test_bench_script_with_release_targets_runs(name: str, tmp_path: Path) -> None:
    _require("NATS", "127.0.0.1", 4222)
    _require("RabbitMQ", "127.0.0.1", 5672)
    result = _run(name, NEEDS_TARGETS[name], tmp_path)
    assert set(result["throughput"]) == {"embedded/1", "nats/1", "amqp/1"}  # type: ignore[arg-type]


def test_delay_bench_runs_and_its_plots_are_drawn(tmp_path: Path) -> None:
    small = ["--pending", "2000", "--rate", "200", "--seconds", "1", "--burst", "2000"]
    result = _run("delay_release", [*small, "--window-ms", "1000", "--save", "r.json"], tmp_path)
    assert result["bench"] == "delay_release"
    out = subprocess.run(
        [sys.executable, str(BENCH / "plots.py"), str(tmp_path / "r.json"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "lateness.png").stat().st_size > 0
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_tx_bench_on_one_and_two_servers_sharing_a_tx_store_runs(tmp_path: Path) -> None:
    _require("MariaDB", "127.0.0.1", 3306)
    small = ["--seconds", "0.5", "--warmup", "0.2", "--producers", "4", "--runs", "1"]
    result = _run("tx_bench", ["--nodes", *small], tmp_path)
    assert result["bench"] == "tx_bench_nodes"
    for case in ("sqlite", "shared_1", "shared_2"):
        assert (
            isinstance(result[f"{case}_tx_per_s"], int | float) and result[f"{case}_tx_per_s"] > 0
        )
