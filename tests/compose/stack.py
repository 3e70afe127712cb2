"""Drive the compose dev stack from a test: compose commands, health, logs, SQL and HTTP.

The stack is compose/docker-compose.yml with compose/docker-compose.local.yml over it (images
built here from Debian's packages, compose/local/build-images.sh), under a project name of its
own, with tempomq published on a free port of 127.0.0.1: the only address the test talks to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = (
    ROOT / "compose" / "docker-compose.yml",
    ROOT / "compose" / "docker-compose.local.yml",
)
BUILD_IMAGES = ROOT / "compose" / "local" / "build-images.sh"
#: The stack's admin token, a Docker secret that `make compose-token` makes once.
TOKEN_FILE = ROOT / "compose" / "secrets" / "admin-token"
EXAMPLE_PROFILE = "example"
#: A cold build downloads Debian and Python packages; everything else is quicker.
BUILD_TIMEOUT_S = 1200.0
COMMAND_TIMEOUT_S = 300.0
POLL_S = 1.0
HTTP_TIMEOUT_S = 30.0

T = TypeVar("T")


def docker_problem() -> str | None:
    """Why the stack cannot run here, or None when a Docker engine and Compose v2 answer."""
    if shutil.which("docker") is None:
        return "no docker command"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"the Docker engine does not answer: {info.stderr.strip()[-300:]}"
    compose = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=60
    )
    if compose.returncode != 0:
        return "Docker Compose v2 (`docker compose`) is missing"
    return None


def docker(*args: str, timeout_s: float = 60.0, with_stderr: bool = False) -> str:
    """``docker args``, which must succeed: what it printed (standard error too if asked)."""
    done = subprocess.run(
        ["docker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if with_stderr else subprocess.PIPE,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, f"docker {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def wait_until(what: str, probe: Callable[[], T | None], timeout_s: float) -> T:
    """Poll ``probe`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(POLL_S)


class Stack:
    """One compose project of the dev stack, published on ``127.0.0.1:<port>``."""

    def __init__(self, project: str, port: int) -> None:
        self.project = project
        self.port = port
        self.token = ""  # read once the secret exists (build_images)
        # No proxy: a proxy variable in the environment must not carry loopback requests.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- compose and docker ---------------------------------------------------------------------

    def compose(
        self, *args: str, timeout_s: float = COMMAND_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
        command = ["docker", "compose", "--ansi", "never", "-p", self.project, *files]
        env = {**os.environ, "STACK_PORT": str(self.port)}
        done = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=timeout_s, env=env
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def build_images(self) -> None:
        """The admin token's secret (kept if made before), the local base images (cached
        between runs), then the stack's own."""
        made = subprocess.run(
            ["make", "-s", "compose-token"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert made.returncode == 0, f"make compose-token: {made.stdout}{made.stderr}"
        self.token = TOKEN_FILE.read_text().strip()
        done = subprocess.run(
            [str(BUILD_IMAGES)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        assert done.returncode == 0, f"build-images.sh exited {done.returncode}:\n{done.stderr}"
        self.compose("--profile", EXAMPLE_PROFILE, "build", timeout_s=BUILD_TIMEOUT_S)

    def down(self) -> None:
        """Remove the containers and the volumes (images stay: they are the build cache)."""
        self.compose("--profile", EXAMPLE_PROFILE, "down", "--volumes", "--remove-orphans")

    def container_ids(self, *services: str) -> list[str]:
        done = self.compose("--profile", EXAMPLE_PROFILE, "ps", "--all", "-q", *services)
        return done.stdout.split()

    def container(self, service: str) -> str:
        (container,) = self.container_ids(service)
        return container

    def inspect(self, service: str) -> dict[str, Any]:
        (state,) = json.loads(docker("inspect", self.container(service)))
        assert isinstance(state, dict)
        return state

    def wait_exit(self, service: str) -> int:
        """Wait for ``service``'s container to stop; its exit code."""
        return int(docker("wait", self.container(service), timeout_s=COMMAND_TIMEOUT_S))

    def health(self, service: str) -> str:
        state = self.inspect(service)["State"]
        return str(state.get("Health", {}).get("Status", state["Status"]))

    def is_healthy(self, service: str) -> bool:
        return self.health(service) == "healthy"

    def wait_healthy(self, services: Iterable[str], timeout_s: float) -> None:
        for service in services:
            wait_until(f"{service} healthy", partial(self.is_healthy, service), timeout_s)

    def volumes(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        return docker("volume", "ls", "-q", "--filter", label).split()

    def logs(self, service: str) -> str:
        """What ``service``'s container printed (``docker logs``: compose's own log printer
        decorates lines with terminal escapes)."""
        return docker("logs", self.container(service), with_stderr=True)

    def sql(self, query: str) -> list[list[str]]:
        """Rows of ``query`` in the stack's database, as the example producer's user."""
        script = 'mysql -N -B -u"$MYSQL_USER" -p"$MYSQL_PASSWORD" "$MYSQL_DATABASE" -e "$0"'
        done = self.compose("exec", "-T", "mysql", "sh", "-c", script, query)
        return [line.split("\t") for line in done.stdout.splitlines()]

    # -- tempomq over its published port --------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def auth_headers(self, token: str | None = None) -> dict[str, str]:
        """The Authorization header with ``token``, by default the stack's admin token."""
        return {"Authorization": f"Bearer {self.token if token is None else token}"}

    def http(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        """``method path`` against tempomq on 127.0.0.1, as the stack's admin unless another
        ``token`` is given: the status and the decoded JSON."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **self.auth_headers(token)},
        )
        try:
            with self._http.open(request, timeout=HTTP_TIMEOUT_S) as response:
                return int(response.status), json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")
