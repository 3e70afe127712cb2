"""Chromium for the console's browser tests: Debian's ``/usr/bin/chromium`` driven by Playwright.

No browser is downloaded: Playwright's wheel brings its driver, the system brings the browser
(``apt-get install chromium``; ``.ci/run`` does). Where either is missing the tests skip and
say why, except under CI, where that is a failure (see ``tests/services.py``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.services import services_required

if TYPE_CHECKING:  # playwright may be missing: chromium_path() skips then
    from playwright.async_api import ViewportSize

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 860}
#: Where screenshots of the pages go besides the test's tmp dir (docs/console.md sets it to
#: docs/img to refresh the pictures there).
SCREENSHOT_DIR_ENV = "TEMPOMQ_SCREENSHOT_DIR"


def chromium_path() -> str:
    """The chromium to drive, or a skip (a failure under CI) saying what is missing."""
    path = os.environ.get("TEMPOMQ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    missing = None
    if not Path(path).exists():
        missing = f"chromium is not installed at {path} (apt-get install chromium)"
    else:
        try:
            import playwright  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing is not None:
        if services_required():
            pytest.fail(f"{missing} (required because CI=true or TEMPOMQ_REQUIRE_SERVICES=1)")
        pytest.skip(missing)
    return path


@asynccontextmanager
async def open_page(base_url: str) -> AsyncIterator[Any]:
    """A fresh browser page (own session storage) with ``base_url`` for relative gotos."""
    from playwright.async_api import async_playwright

    executable = chromium_path()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(base_url=base_url, viewport=VIEWPORT)
            page = await context.new_page()
            page.set_default_timeout(15_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page
            assert not errors, f"script errors in the page: {errors}"
        finally:
            await browser.close()


async def screenshot(page: Any, name: str, tmp_path: Path) -> Path:
    """Capture the whole page as ``console-<name>.png``: into tmp_path, and into the directory
    named by TEMPOMQ_SCREENSHOT_DIR when set (the docs' pictures)."""
    path = tmp_path / f"console-{name}.png"
    await page.screenshot(path=path, full_page=True)
    target = os.environ.get(SCREENSHOT_DIR_ENV)
    if target:
        shutil.copyfile(path, Path(target) / path.name)
    return path
