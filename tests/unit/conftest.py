"""Fixtures shared by the unit tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.unit.store_helpers import Stores


@pytest.fixture
async def stores() -> AsyncIterator[Stores]:
    """Start stores with ``stores.start``; those still running are stopped at the end."""
    s = Stores()
    yield s
    for store in list(s.running):
        with contextlib.suppress(Exception):  # a test that broke its store on purpose
            await s.stop(store)
