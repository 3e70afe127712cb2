"""Logging setup: structlog JSON lines (or a console view on a TTY) with per-request context.

Both structlog loggers and stdlib ``logging`` (aiohttp, asyncio) end up in the same stream with
the same processors, so a line from aiohttp's parser looks like a line from our code.

Context such as the request id, ``msg_id`` or ``tx_id`` is bound with :func:`bound` (structlog's
contextvars), so every line logged while a request is handled carries it without threading a
logger through every call. Packages below ``tempomq`` may bind the same way through
``structlog.contextvars`` without importing this module.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO, cast

import orjson
import structlog
from structlog.contextvars import bound_contextvars
from structlog.typing import FilteringBoundLogger, Processor

from tempomq.config import LogFormat, LogLevel

__all__ = ["bound", "configure_logging", "get_logger"]

#: Bind key/values for the duration of a ``with`` block, e.g. ``with bound(msg_id=...):``.
bound = bound_contextvars

_LEVELS: dict[LogLevel, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Marks the root handler we installed, so configuring twice replaces it instead of doubling lines.
_HANDLER_NAME = "tempomq"


def _orjson_dumps(obj: Any, **_: Any) -> str:
    # default=str: a stray Path or exception object in a log call must not lose the line.
    return orjson.dumps(obj, default=str).decode()


def _use_json(fmt: LogFormat, stream: TextIO) -> bool:
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty is not None and isatty())
    return fmt == "json"


def configure_logging(
    *, level: LogLevel = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stdout by default) at ``level``."""
    out = stream if stream is not None else sys.stdout
    as_json = _use_json(fmt, out)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    # The console renderer draws exceptions itself; JSON needs them as a string field.
    renderer: list[Processor] = (
        [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        if as_json
        else [structlog.dev.ConsoleRenderer(colors=out.isatty())]
    )
    structlog.configure(
        # Through stdlib logging, so structlog.get_logger(__name__) anywhere (broker_core too)
        # gets its name on the line and shares the handler below with aiohttp's own logs.
        processors=[
            *shared,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        # Filters by level before any processor runs, so disabled debug calls cost ~nothing.
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached: tests and the CLI may reconfigure, and cached proxies would keep the old
        # setup. The per-call cost is small next to an HTTP request.
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # Only for records from plain stdlib loggers; structlog's ran the chain above.
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    logging.captureWarnings(True)


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger whose lines carry ``logger=name`` and whatever context is bound."""
    return cast(FilteringBoundLogger, structlog.get_logger(name))
