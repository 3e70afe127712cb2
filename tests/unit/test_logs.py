"""Log setup: JSON lines off a TTY, console on one, level filter, ISO time, bound context."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from tempomq.logs import bound, configure_logging, get_logger


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "tempomq"]:
        root.removeHandler(handler)


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_when_not_a_tty_with_iso_time_level_and_logger() -> None:
    buf = io.StringIO()
    configure_logging(stream=buf)
    get_logger("tempomq.test").info("hello", n=1)
    [line] = lines(buf)
    assert line["event"] == "hello"
    assert line["n"] == 1
    assert line["level"] == "info"
    assert line["logger"] == "tempomq.test"
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]


def test_console_on_a_tty() -> None:
    buf = FakeTTY()
    configure_logging(stream=buf)
    get_logger("t").info("hello", n=1)
    out = buf.getvalue()
    assert "hello" in out
    assert not out.startswith("{")


def test_json_forced_on_a_tty() -> None:
    buf = FakeTTY()
    configure_logging(fmt="json", stream=buf)
    get_logger("t").info("hello")
    assert lines(buf)[0]["event"] == "hello"


def test_level_filter() -> None:
    buf = io.StringIO()
    configure_logging(level="warning", stream=buf)
    log = get_logger("t")
    log.info("dropped")
    log.warning("kept")
    logging.getLogger("aiohttp.server").info("dropped too")
    assert [x["event"] for x in lines(buf)] == ["kept"]


def test_bound_context_on_every_line_including_stdlib_and_exceptions() -> None:
    buf = io.StringIO()
    configure_logging(stream=buf)
    with bound(request_id="r1", msg_id="m1"):
        get_logger("t").info("one")
        logging.getLogger("aiohttp.server").warning("two %s", "args")
        try:
            raise ValueError("bad")
        except ValueError:
            get_logger("t").exception("three")
    get_logger("t").info("after")
    one, two, three, after = lines(buf)
    for line in (one, two, three):
        assert (line["request_id"], line["msg_id"]) == ("r1", "m1")
    assert two["event"] == "two args"
    assert two["logger"] == "aiohttp.server"
    assert "ValueError: bad" in three["exception"]
    assert "request_id" not in after


def test_configuring_twice_does_not_double_lines() -> None:
    buf = io.StringIO()
    configure_logging(stream=io.StringIO())
    configure_logging(stream=buf)
    logging.getLogger("x").warning("once")
    assert len(lines(buf)) == 1
