"""A throwaway three-node Redis Cluster (redis-server and redis-cli from the machine)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.services import reachable, services_required

NODES = 3
START_WAIT_S = 20.0


class LocalRedisCluster:
    """``NODES`` primaries on free ports, every slot assigned, no replicas, nothing on disk."""

    def __init__(self, workdir: Path) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            reason = "redis-server and redis-cli are needed for a Redis Cluster"
            if services_required():
                pytest.fail(f"{reason} (required because CI=true)")
            pytest.skip(reason)
        self.server, self.cli = server, cli
        self.workdir = workdir
        self.ports = _free_ports(NODES)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """What tempomq takes: any one node, with the cluster scheme."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for port in self.ports:
            node = self.workdir / str(port)
            node.mkdir(parents=True)
            log = (node / "redis.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    [
                        self.server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node / "nodes.conf"),
                        "--cluster-node-timeout",
                        "2000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(node),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        deadline = time.monotonic() + START_WAIT_S
        for port in self.ports:
            while not reachable("127.0.0.1", port, timeout_s=0.2):
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server (cluster node) did not start on port {port}")
                time.sleep(0.05)
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        while not all(self._ok(p) for p in self.ports):
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def _ok(self, port: int) -> bool:
        out = subprocess.run(
            [self.cli, "-p", str(port), "cluster", "info"], capture_output=True, timeout=10
        ).stdout
        return b"cluster_state:ok" in out

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()


def _free_ports(n: int) -> list[int]:
    """Free ports whose cluster bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536 and port not in ports and not reachable("127.0.0.1", port + 10000):
            ports.append(port)
    return ports
