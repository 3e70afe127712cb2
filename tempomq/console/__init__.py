"""The web console: static pages served at ``/console`` that drive the HTTP API in a browser.

The pages are plain HTML, CSS and one script shipped inside this package (no CDN, no build
step); the script calls the JSON API with the token the operator logs in with, so the console
can do exactly what that token may do. :func:`add_console` adds the pages and the inspection
routes they need (:mod:`tempomq.console.api`) to the application.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from aiohttp import web

from tempomq.console.api import routes as api_routes

#: Where the pages live inside the installed package.
STATIC_DIR = Path(str(files("tempomq.console") / "static"))
PREFIX = "/console"


async def _index(request: web.Request) -> web.FileResponse:
    # Never cached: a new release's page must load its new script (assets carry no version).
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _to_index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(f"{PREFIX}/")


def add_console(app: web.Application) -> None:
    """Serve the console at ``/console/`` and add the API routes it uses."""
    app.router.add_get(PREFIX, _to_index)
    app.router.add_get(f"{PREFIX}/", _index)
    app.router.add_static(f"{PREFIX}/static", STATIC_DIR, append_version=False)
    app.add_routes(api_routes)
