"""The API's JSON error body for requests aiohttp refuses before any route or middleware runs.

A malformed request line, an oversized line or header, a bad ``Content-Length``, a raw
non-ASCII byte in the path or a body that is not in its ``Content-Encoding`` (when it came with
the headers) is answered by aiohttp's connection handler itself, as plain text;
no middleware sees it (aio-libs/aiohttp#3287 asks for a hook). :class:`ApiRunner` serves the
app through a handler whose ``handle_error`` keeps aiohttp's status and logging and only
renders the body as ``{"error": code, "message": text}``.

Its server also shuts down the connections of other fronts on the same port (the lean HTTP
path, :mod:`tempomq.lean`) beside aiohttp's own: idle ones close when the sites stop, busy
ones get the same ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Protocol, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from broker_core.http import unreadable_body


class _JsonErrorHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs; refuses if sent
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "HTTP error"
        if status >= 500:
            code, text = "internal", "internal error, see server log"
        elif isinstance(exc, PayloadEncodingError):
            # A body not in the Content-Encoding it claims, refused as it arrived. aiohttp
            # does not keep the request line of a request it refuses here, so the route (and
            # its own code, as the app's middleware picks for a body read later) is unknown.
            code, text = "invalid_request", unreadable_body(exc)
        else:
            code = phrase.lower().replace(" ", "_")
            # aiohttp's parser messages span lines (the offending bytes, a caret): keep the
            # first, which says what was wrong.
            text = (message or phrase).strip().splitlines()[0] if message else phrase
        body = orjson.dumps({"error": code, "message": text}) + b"\n"
        resp = web.Response(
            status=status, body=body, content_type="application/json", headers=_kept(plain)
        )
        resp.force_close()
        return resp


def _kept(resp: web.StreamResponse) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() not in ("content-type",)}


class Front(Protocol):
    """Another protocol front on the runner's port (:class:`tempomq.lean.LeanFront`), shut
    down with aiohttp's own connections."""

    def close_idle(self) -> None: ...

    async def shutdown(self, timeout_s: float | None) -> None: ...


class _JsonErrorServer(web.Server):
    fronts: list[Front]

    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for front in self.fronts:
            front.close_idle()

    async def shutdown(self, timeout: float | None = None) -> None:
        # In-flight requests of every front get the same shutdown_timeout, side by side.
        await asyncio.gather(
            super().shutdown(timeout), *(front.shutdown(timeout) for front in self.fronts)
        )


class ApiRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connection-level errors are the API's JSON,
    and whose shutdown also closes the connections of the fronts added with
    :meth:`add_front`: idle ones when the sites stop, busy ones after their request (or
    ``shutdown_timeout``)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds its Server; only the handler each connection gets differs.
        server.__class__ = _JsonErrorServer
        cast(_JsonErrorServer, server).fronts = []
        return server

    def add_front(self, front: Front) -> None:
        cast(_JsonErrorServer, self.server).fronts.append(front)
