"""Connection URLs of the real services the integration tests run against.

Override with ``TEMPOMQ_TEST_REDIS_URL`` / ``TEMPOMQ_TEST_MYSQL_URL`` /
``TEMPOMQ_TEST_POSTGRES_URL``; a service that does not
answer skips the test locally and fails it under CI (see ``tests/services.py``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.redis_process import RedisProcess
from tests.services import require_service, services_required

# Database 15 so that a developer's Redis data in db 0 is never touched by a flush in a test.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
DEFAULT_MYSQL_URL = "mysql+aiomysql://root@127.0.0.1:3306/test"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def _require(name: str, url: str, default_port: int) -> str:
    parts = urlsplit(url)
    require_service(name, parts.hostname or "127.0.0.1", parts.port or default_port)
    return url


@pytest.fixture
def redis_url() -> str:
    return _require("Redis", os.environ.get("TEMPOMQ_TEST_REDIS_URL", DEFAULT_REDIS_URL), 6379)


@pytest.fixture
def mysql_url() -> str:
    return _require("MariaDB", os.environ.get("TEMPOMQ_TEST_MYSQL_URL", DEFAULT_MYSQL_URL), 3306)


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get("TEMPOMQ_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    return _require("PostgreSQL", url, 5432)


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    binary = shutil.which("redis-server")
    if binary is None:
        if services_required():
            pytest.fail("redis-server is not installed (required because CI=true)")
        pytest.skip("redis-server is not installed")
    server = RedisProcess(binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
