"""The service's own code never uses ``asyncio.wait_for``.

On Python 3.11, a ``wait_for`` whose awaitable finishes in the same loop turn as its task is
cancelled returns the result and swallows the cancel (python/cpython#86296, fixed in 3.12 by
re-implementing ``wait_for`` on ``asyncio.timeout``). A cancelled long poll then went on to take
messages for a client that had hung up, and a cancelled background loop ran on while its owner
waited for it to end. ``async with asyncio.timeout(...)`` has neither fault.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tempomq", "broker_core", "delayserver", "txcoord")
CALL = re.compile(r"\basyncio\.wait_for\b|\bimport\b.*\bwait_for\b")


def test_no_asyncio_wait_for_in_the_service() -> None:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if CALL.search(code):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "use `async with asyncio.timeout(s)` instead:\n" + "\n".join(found)
