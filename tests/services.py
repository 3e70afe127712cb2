"""Gate for tests that need a real service (Redis, MariaDB): skip locally, fail in CI.

A developer without Redis running should still get a green unit run with the integration tests
reported as skipped and why. In CI (``CI=true``) or with ``TEMPOMQ_REQUIRE_SERVICES=1`` a
missing service is a broken environment, and skipping would hide that the tests never ran.
"""

from __future__ import annotations

import os
import socket

import pytest

CONNECT_TIMEOUT_S = 1.0


def services_required() -> bool:
    return (
        os.environ.get("CI", "").lower() == "true"
        or os.environ.get("TEMPOMQ_REQUIRE_SERVICES") == "1"
    )


def reachable(host: str, port: int, *, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip the calling test (or fail it under CI) when ``host:port`` does not accept TCP."""
    if reachable(host, port):
        return
    reason = f"{name} is not reachable at {host}:{port}"
    if services_required():
        pytest.fail(f"{reason} (required because CI=true or TEMPOMQ_REQUIRE_SERVICES=1)")
    pytest.skip(f"{reason}; start it (.ci/run does) or set TEMPOMQ_REQUIRE_SERVICES=1 to fail")
