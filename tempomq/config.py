"""Service settings: one option table feeds the CLI flags, the ``TEMPOMQ_*`` variables and checks.

Every option is declared once in :data:`OPTIONS`. From that entry come the ``--flag`` (argparse),
the environment variable (``TEMPOMQ_`` + flag upper-cased, dashes as underscores), the parser of
its text, the default shown in ``--help`` (read from :class:`Settings`, never restated) and the
name used in error messages. Precedence is flag > environment > default.

Values are text in both sources, so both go through the same parser and fail the same way: a
:class:`ConfigError` that names the flag *and* the variable, so the user finds the culprit
whichever way they set it.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, TypeVar, get_args
from urllib.parse import urlsplit

from broker_core.config import BrokerConfig, FlushMode
from txcoord.checkurl import parse_allow_entry

ENV_PREFIX = "TEMPOMQ_"

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]

T = TypeVar("T")

#: Defaults shared with the broker core are read from it, so the two cannot drift apart.
_BROKER = BrokerConfig()

_KIB = 1024
_MIB = 1024 * _KIB


class ConfigError(Exception):
    """A setting is missing, malformed or inconsistent; the message names the flag and env var."""


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --------------------------------------------------------------------------------------------
# Parsers and formatters. Parsers raise ValueError with the reason; the loader adds the names.

_SIZE_UNITS = {"": 1, "b": 1, "kib": _KIB, "mib": _MIB, "gib": 1024 * _MIB, "tib": 1024**4}
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NUMBER_UNIT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _scaled(number: str, factor: int, what: str) -> int:
    # Fraction keeps "1.5GiB" exact where a float would round.
    value = Fraction(number) * factor
    if value.denominator != 1:
        raise ValueError(f"{number!r} does not come to a whole number of {what}")
    return int(value)


def parse_size(text: str) -> int:
    """``64MiB``, ``1GiB``, ``512KiB`` or plain bytes (``4096``) to bytes."""
    match = _NUMBER_UNIT_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        # Decimal units are refused rather than guessed: "64MB" is 64 000 000 to some readers
        # and 64 MiB to others.
        raise ValueError(f"{text!r} is not a size; use bytes or KiB, MiB, GiB, TiB (e.g. 64MiB)")
    return _scaled(match.group(1), _SIZE_UNITS[unit], "bytes")


def format_size(n_bytes: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024 * _MIB), ("MiB", _MIB), ("KiB", _KIB)):
        if n_bytes and n_bytes % factor == 0:
            return f"{n_bytes // factor}{unit}"
    return str(n_bytes)


def parse_duration_ms(text: str) -> int:
    """``500ms``, ``30s``, ``5m``, ``72h``, ``7d`` (also ``1.5s``) to milliseconds."""
    if text.strip().startswith("-"):
        raise ValueError(f"{text!r}: a duration cannot be negative")
    match = _NUMBER_UNIT_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is not None and unit == "" and float(match.group(1)) == 0:
        return 0
    if match is None or unit not in _DURATION_UNITS_MS:
        # A bare number is refused: "72" as retention could mean 72 ms or 72 h.
        raise ValueError(f"{text!r} is not a duration; give a unit: 500ms, 30s, 5m, 72h, 7d")
    return _scaled(match.group(1), _DURATION_UNITS_MS[unit], "milliseconds")


def format_duration_ms(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        factor = _DURATION_UNITS_MS[unit]
        if ms and ms % factor == 0:
            return f"{ms // factor}{unit}"
    return f"{ms}ms"


def parse_duration_list_ms(text: str) -> tuple[int, ...]:
    """A comma-separated list of durations: ``10s,30s,1m``."""
    items = tuple(parse_duration_ms(part) for part in text.split(",") if part.strip())
    if not items:
        raise ValueError("give at least one duration, e.g. 10s,30s,1m")
    return items


def format_duration_list_ms(values: tuple[int, ...]) -> str:
    return ",".join(format_duration_ms(v) for v in values)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean; use true/false, 1/0, yes/no or on/off")


def parse_host_port(text: str) -> HostPort:
    """``host:port`` or ``[ipv6]:port``; port 0 asks the OS for a free one."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:8080, 0.0.0.0:8080)")
    return HostPort(host, int(port_text))


def parse_redis_url(text: str) -> str:
    schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
    if not text.startswith(schemes):
        raise ValueError(
            f"{text!r} is not a Redis URL (redis://host:port/db, rediss://, unix://, or "
            "redis+cluster://host:port for any node of a Redis Cluster)"
        )
    return text


def parse_tx_store_url(text: str) -> str:
    """``sqlite:///PATH`` or a MySQL/MariaDB or PostgreSQL URL the SQL store can use."""
    if text.startswith("sqlite:///"):
        if len(text) == len("sqlite:///"):
            raise ValueError("sqlite:///PATH needs a file path")
        return text
    from txcoord.sql_store import parse_url  # SQLAlchemy only when the option is used

    parse_url(text)  # ValueError (TxStoreUrlError) saying what is wrong
    return text


def _bounded_int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" and at most {maximum}"
            raise ValueError(f"must be at least {minimum}{upper}, got {value}")
        return value

    return parse


def _bounded_float(text: str, minimum: float) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not value >= minimum:  # also refuses NaN
        raise ValueError(f"must be at least {minimum:g}, got {text.strip()}")
    return value


def parse_allow_list(text: str) -> tuple[str, ...]:
    """Comma-separated host names, networks and either with a port:
    ``hooks.internal, 10.0.0.0/8, 127.0.0.1:8081``."""
    items = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    for item in items:
        parse_allow_entry(item)  # raises ValueError naming the bad entry
    return items


def _choice(values: Iterable[str]) -> Callable[[str], str]:
    allowed = tuple(values)

    def parse(text: str) -> str:
        if text.strip().lower() not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return text.strip().lower()

    return parse


@dataclass(frozen=True, slots=True)
class Kind(Generic[T]):
    """How one type of option reads from text and shows its default."""

    metavar: str
    parse: Callable[[str], T]
    format: Callable[[T], str] = str


SIZE = Kind("SIZE", parse_size, format_size)
DURATION = Kind("DURATION", parse_duration_ms, format_duration_ms)
DURATIONS = Kind("DURATION,...", parse_duration_list_ms, format_duration_list_ms)
BOOL: Kind[bool] = Kind("BOOL", parse_bool, lambda v: "true" if v else "false")
#: A switch given a value (``--http-lean off``), not a flag pair.
ON_OFF: Kind[bool] = Kind("on|off", parse_bool, lambda v: "on" if v else "off")
PATH = Kind("PATH", Path)
OPTIONAL_PATH: Kind[Path | None] = Kind("PATH", Path, lambda v: str(v) if v else "none")
#: A secret's value is never shown in --help or errors, only whether it is set.
SECRET: Kind[str | None] = Kind("SECRET", str, lambda v: "set" if v else "unset")
RATE = Kind("PER_S", lambda text: _bounded_float(text, 0.0), lambda v: f"{v:g}")
HOST_PORT = Kind("HOST:PORT", parse_host_port)
REDIS_URL: Kind[str | None] = Kind("URL", parse_redis_url, lambda v: v or "none")
TX_STORE_URL: Kind[str | None] = Kind(
    "URL", parse_tx_store_url, lambda v: v or "sqlite:///<data-dir>/tx/tx.db"
)


def parse_release_to(text: str) -> str:
    """``embedded``, ``nats://host:port`` (several comma-separated) or ``amqp(s)://...``."""
    text = text.strip()
    if text.lower() == "embedded":
        return "embedded"
    if text.startswith(("nats://", "tls://", "amqp://", "amqps://")):
        for url in text.split(","):
            if not urlsplit(url.strip()).hostname:
                raise ValueError(f"{_redacted_url(url.strip())!r} names no host")
        return text
    raise ValueError(
        f"{text.split('@')[-1]!r} is not embedded, nats://host:port or amqp://user:pass@host:port/"
    )


def _redacted_url(url: str) -> str:
    head, at, tail = url.rpartition("@")
    return f"{head.split(':')[0]}:***@{tail}" if at and ":" in head.split("//")[-1] else url


RELEASE_TO = Kind("embedded|URL", parse_release_to, _redacted_url)
OPTIONAL_TEXT: Kind[str | None] = Kind("TEXT", str.strip, lambda v: v or "none")


def parse_listen_or_off(text: str) -> HostPort | None:
    """``host:port``, or ``off`` for a listener that is not started."""
    return None if text.strip().lower() == "off" else parse_host_port(text)


LISTEN_OR_OFF: Kind[HostPort | None] = Kind(
    "HOST:PORT|off", parse_listen_or_off, lambda v: "off" if v is None else str(v)
)
OPTIONAL_HOST_PORT: Kind[HostPort | None] = Kind(
    "HOST:PORT", parse_host_port, lambda v: "the listen address" if v is None else str(v)
)


def count(minimum: int, maximum: int | None = None) -> Kind[int]:
    return Kind("N", _bounded_int(minimum, maximum))


def choice(literal: object) -> Kind[str]:
    """A kind for a ``Literal[...]`` type, so the allowed values are written once."""
    values: tuple[str, ...] = get_args(literal)
    return Kind("{" + ",".join(values) + "}", _choice(values))


# --------------------------------------------------------------------------------------------
# The settings.

DEFAULT_HTTP = HostPort("127.0.0.1", 8080)
#: The RocketMQ 5 gRPC protocol, on the port of RocketMQ's proxy.
DEFAULT_GRPC = HostPort("127.0.0.1", 8081)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the service is configured with. Build with :func:`load_settings`."""

    http: HostPort = DEFAULT_HTTP
    data_dir: Path = _BROKER.data_dir
    flush: FlushMode = _BROKER.flush
    flush_interval_ms: int = _BROKER.flush_interval_ms
    segment_bytes: int = _BROKER.segment_bytes
    max_body_bytes: int = _BROKER.max_body_bytes
    #: Largest HTTP request body. Sized for a batch of ordinary messages, deliberately not for
    #: 1000 maximal bodies (4 GiB), which would let one client pin that much memory.
    max_request_bytes: int = 64 * _MIB
    retention_ms: int = _BROKER.retention_ms
    auto_create_topics: bool = _BROKER.auto_create_topics
    default_queues: int = _BROKER.default_queues
    max_queues: int = _BROKER.max_queues
    default_invisible_ms: int = _BROKER.default_invisible_ms
    max_attempts: int = _BROKER.max_attempts
    backoff_ms: tuple[int, ...] = field(default=_BROKER.backoff_ms)
    max_receive_batch: int = _BROKER.max_receive_batch
    max_wait_ms: int = _BROKER.max_wait_ms
    #: Delayed messages wait in Redis when set, else in the embedded store under data_dir.
    redis_url: str | None = None
    #: With Redis: how long a delay server's hold on a shard lasts without renewal.
    delay_lease_ttl_ms: int = 10_000
    #: Where released, committed and (in a broker mode) sent messages go: the embedded broker
    #: core, or a NATS JetStream / RabbitMQ URL (delayserver.targets). May hold a password.
    release_to: str = field(default="embedded", repr=False)
    #: Topic mapping: the NATS subject (``tempomq.{topic}``) or the RabbitMQ
    #: ``EXCHANGE/ROUTING_KEY`` (``tempomq/{topic}``); None: that default.
    release_topic: str | None = None
    #: NATS: a stream to create at start if missing (capturing the subjects), and its replicas.
    release_stream: str | None = None
    release_replicas: int = 1
    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"
    shutdown_timeout_ms: int = 5000
    tx_check_immunity_ms: int = 6_000
    tx_check_interval_ms: int = 30_000
    tx_check_max: int = 15
    tx_check_timeout_ms: int = 5_000
    #: Where transactions live: None is the SQLite file in data_dir; a MySQL/MariaDB or
    #: PostgreSQL URL is shared by every server given it.
    tx_store: str | None = None
    #: With a shared tx store: how long a server's claim on a check-back or delivery lasts.
    tx_lease_ms: int = 10_000
    #: Run the reconciliation probe inside the server this often (0: never).
    probe_interval_ms: int = 0
    probe_duration_ms: int = 10_000
    probe_rate: int = 20
    #: The RocketMQ 5 gRPC endpoint (None: off), and the address routes hand to its clients.
    grpc: HostPort | None = DEFAULT_GRPC
    grpc_advertise: HostPort | None = None
    #: Principals and their grants (YAML or TOML); auth is on when this or admin_token is set.
    auth_file: Path | None = None
    #: The bootstrap admin's token, from the environment only (never a flag: ps shows flags).
    admin_token: str | None = field(default=None, repr=False)
    #: Serve on a non-loopback address without auth (refused otherwise).
    insecure_no_auth: bool = False
    #: Serve /metrics without credentials when auth is on.
    metrics_public: bool = False
    #: Requests a second per principal (per client address when auth is off); 0: no limit.
    #: About twice what one benchmark client makes (5,200 single sends a second): generous
    #: by default; per-principal limits in the auth file share a server between tenants.
    rate_limit: float = 10_000.0
    rate_burst: float = 20_000.0
    #: Most open HTTP connections; one more is answered 503 and closed.
    max_connections: int = 1000
    #: A request's headers must be in within this time of its first byte.
    header_timeout_ms: int = 10_000
    #: An idle keep-alive connection is closed after this time.
    keepalive_timeout_ms: int = 60_000
    #: Serve the hot routes (send, receive, ack, ...) through the lean HTTP front
    #: (:mod:`tempomq.lean`); off: every request goes through aiohttp.
    http_lean: bool = True
    #: Hosts and CIDRs (each optionally with a port) check_url may name; empty: loopback only.
    check_url_allow: tuple[str, ...] = ()
    #: Key of the HMAC-SHA256 signature header on check_url calls; None: unsigned.
    check_url_secret: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @property
    def auth_enabled(self) -> bool:
        return self.auth_file is not None or self.admin_token is not None

    def __post_init__(self) -> None:
        for check in _CROSS_CHECKS:
            check(self)

    def broker_config(self) -> BrokerConfig:
        return BrokerConfig(
            data_dir=self.data_dir,
            flush=self.flush,
            flush_interval_ms=self.flush_interval_ms,
            segment_bytes=self.segment_bytes,
            max_body_bytes=self.max_body_bytes,
            retention_ms=self.retention_ms,
            auto_create_topics=self.auto_create_topics,
            default_queues=self.default_queues,
            max_queues=self.max_queues,
            default_invisible_ms=self.default_invisible_ms,
            max_attempts=self.max_attempts,
            backoff_ms=self.backoff_ms,
            max_receive_batch=self.max_receive_batch,
            max_wait_ms=self.max_wait_ms,
        )


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its flag, the :class:`Settings` field it fills, how to parse it, its help."""

    flag: str
    field: str
    kind: Kind[Any]
    help: str
    #: Read from the environment only, never a flag (secrets: a flag shows in ps).
    env_only: bool = False

    @property
    def cli(self) -> str:
        return f"--{self.flag}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def label(self) -> str:
        return self.env if self.env_only else f"{self.cli} / {self.env}"


OPTIONS: tuple[Option, ...] = (
    Option("http", "http", HOST_PORT, "address the HTTP API listens on"),
    Option("data-dir", "data_dir", PATH, "directory for the CommitLog, queues and indexes"),
    Option(
        "flush",
        "flush",
        choice(FlushMode),
        "async: acknowledge when written, fsync periodically; sync: acknowledge after fsync",
    ),
    Option("flush-interval", "flush_interval_ms", DURATION, "fsync period in async flush mode"),
    Option("segment-bytes", "segment_bytes", SIZE, "size of one CommitLog segment file"),
    Option("max-body-bytes", "max_body_bytes", SIZE, "largest message body"),
    Option("max-request-bytes", "max_request_bytes", SIZE, "largest HTTP request body"),
    Option("retention", "retention_ms", DURATION, "delete CommitLog segments older than this"),
    Option(
        "auto-create-topics",
        "auto_create_topics",
        BOOL,
        "create a topic on its first send instead of answering 404 topic_not_found",
    ),
    Option(
        "default-queues", "default_queues", count(1), "queues of a topic created without a count"
    ),
    Option("max-queues", "max_queues", count(1, 65535), "most queues a topic may have"),
    Option(
        "default-invisible",
        "default_invisible_ms",
        DURATION,
        "how long a received message stays invisible when the receive call does not say",
    ),
    Option(
        "max-attempts",
        "max_attempts",
        count(1),
        "deliveries before a message moves to the %DLQ%<group> topic",
    ),
    Option("backoff", "backoff_ms", DURATIONS, "redelivery delay after attempt 1, 2, ..."),
    Option("max-receive-batch", "max_receive_batch", count(1), "most messages per receive call"),
    Option("max-wait", "max_wait_ms", DURATION, "longest long-poll wait a receive may ask for"),
    Option(
        "redis-url",
        "redis_url",
        REDIS_URL,
        "keep delayed messages in this Redis (redis+cluster://host:port: a Redis Cluster) "
        "instead of the embedded store",
    ),
    Option(
        "delay-lease-ttl",
        "delay_lease_ttl_ms",
        DURATION,
        "with --redis-url: how long a server's lease on a delay shard lasts unrenewed; "
        "a dead server's shards move to the others within this time",
    ),
    Option(
        "release-to",
        "release_to",
        RELEASE_TO,
        "where released delayed, committed transactional and sent messages go: embedded (this "
        "server's topics), nats://host:port (NATS JetStream) or amqp://user:pass@host:port/vhost "
        "(RabbitMQ); consumers then use that broker's clients (docs/deployment.md)",
    ),
    Option(
        "release-topic",
        "release_topic",
        OPTIONAL_TEXT,
        "with --release-to: where a topic goes, {topic} standing for its name: the NATS subject "
        "(default tempomq.{topic}) or RabbitMQ EXCHANGE/ROUTING_KEY (default tempomq/{topic})",
    ),
    Option(
        "release-stream",
        "release_stream",
        OPTIONAL_TEXT,
        "with --release-to nats://: create this JetStream stream at start if missing, capturing "
        "the subjects (else the operator's streams must capture them)",
    ),
    Option(
        "release-replicas",
        "release_replicas",
        count(1, 5),
        "with --release-stream: replicas of the stream created",
    ),
    Option("log-level", "log_level", choice(LogLevel), "lowest level that is logged"),
    Option(
        "log-format",
        "log_format",
        choice(LogFormat),
        "auto: console on a terminal, JSON lines otherwise",
    ),
    Option(
        "shutdown-timeout",
        "shutdown_timeout_ms",
        DURATION,
        "how long in-flight requests may run after SIGTERM before they are cut off",
    ),
    Option(
        "tx-check-immunity",
        "tx_check_immunity_ms",
        DURATION,
        "how long a transaction may stay open before the producer is first asked (default of a "
        "transaction that does not say)",
    ),
    Option("tx-check-interval", "tx_check_interval_ms", DURATION, "wait between two check-backs"),
    Option(
        "tx-check-max",
        "tx_check_max",
        count(1),
        "check-backs without an answer before a transaction is parked as check_max",
    ),
    Option(
        "tx-check-timeout",
        "tx_check_timeout_ms",
        DURATION,
        "how long a producer has to answer one check-back",
    ),
    Option(
        "tx-store",
        "tx_store",
        TX_STORE_URL,
        "where transactions live: sqlite:///PATH, or mysql+aiomysql://… / "
        "postgresql+asyncpg://… shared by several servers (any of them commits, rolls back "
        "and checks back any transaction)",
    ),
    Option(
        "tx-lease",
        "tx_lease_ms",
        DURATION,
        "with a shared --tx-store: how long a server's claim on a check-back or a delivery "
        "lasts unrenewed; a dead server's claims move to the others within this time",
    ),
    Option(
        "probe-interval",
        "probe_interval_ms",
        DURATION,
        "run the reconciliation probe in the server this often and export its results as "
        "tempomq_probe_* metrics (0: never)",
    ),
    Option("probe-duration", "probe_duration_ms", DURATION, "how long one in-server probe sends"),
    Option("probe-rate", "probe_rate", count(1), "probe messages per second during a run"),
    Option(
        "grpc",
        "grpc",
        LISTEN_OR_OFF,
        "address the RocketMQ 5 gRPC protocol (the official RocketMQ clients) listens on; "
        "off: not at all",
    ),
    Option(
        "grpc-advertise",
        "grpc_advertise",
        OPTIONAL_HOST_PORT,
        "address RocketMQ clients are told to connect to (behind NAT, a proxy or a wildcard "
        "listen address)",
    ),
    Option(
        "auth-file",
        "auth_file",
        OPTIONAL_PATH,
        "principals, credentials and grants (YAML or TOML; reloaded on SIGHUP); turns auth on",
    ),
    Option(
        "admin-token",
        "admin_token",
        SECRET,
        "token of a bootstrap admin principal; turns auth on",
        env_only=True,
    ),
    Option(
        "insecure-no-auth",
        "insecure_no_auth",
        BOOL,
        "allow listening on a non-loopback address with auth off (anyone reaching the port "
        "can do anything)",
    ),
    Option("metrics-public", "metrics_public", BOOL, "serve /metrics without credentials"),
    Option(
        "rate-limit",
        "rate_limit",
        RATE,
        "requests a second per principal (per client address with auth off); 0: no limit",
    ),
    Option("rate-burst", "rate_burst", RATE, "requests a principal may make at once"),
    Option(
        "max-connections",
        "max_connections",
        count(1),
        "most open HTTP connections; more are answered 503 and closed",
    ),
    Option(
        "header-timeout",
        "header_timeout_ms",
        DURATION,
        "close a connection whose request headers are not in within this time",
    ),
    Option(
        "keepalive-timeout",
        "keepalive_timeout_ms",
        DURATION,
        "close a kept-alive connection idle this long",
    ),
    Option(
        "http-lean",
        "http_lean",
        ON_OFF,
        "serve send, receive, ack, nack, change-invisible and /healthz through the lean HTTP "
        "front; off: through aiohttp like every other route",
    ),
    Option(
        "check-url-allow",
        "check_url_allow",
        Kind("HOSTS", parse_allow_list, lambda v: ",".join(v) or "loopback only"),
        "host names and CIDRs, each optionally with :port, a transaction's check_url may call "
        "(comma-separated)",
    ),
    Option(
        "check-url-secret",
        "check_url_secret",
        SECRET,
        "sign check_url calls with HMAC-SHA256 under this key (X-Tempomq-Signature)",
        env_only=True,
    ),
    Option("tls-cert", "tls_cert", OPTIONAL_PATH, "serve HTTPS with this certificate (PEM)"),
    Option("tls-key", "tls_key", OPTIONAL_PATH, "private key of --tls-cert (PEM)"),
    Option(
        "tls-client-ca",
        "tls_client_ca",
        OPTIONAL_PATH,
        "verify client certificates against this CA; a certificate's subject names a principal",
    ),
)

_BY_FIELD = {opt.field: opt for opt in OPTIONS}


def _fail(field_name: str, reason: str) -> ConfigError:
    return ConfigError(f"{_BY_FIELD[field_name].label}: {reason}")


# Checks that involve more than one value, or that a value parsed from text cannot state alone.
# They run on every Settings, also one built directly in code.


def _check_positive_times(s: Settings) -> None:
    names = ("flush_interval_ms", "retention_ms", "default_invisible_ms", "shutdown_timeout_ms")
    for name in names:
        if getattr(s, name) <= 0:
            raise _fail(name, f"must be longer than 0, got {getattr(s, name)} ms")


def _check_sizes(s: Settings) -> None:
    if s.max_body_bytes < 1:
        raise _fail("max_body_bytes", "must be at least 1 byte")
    # A record carries headers, keys and up to 32 KiB of properties besides its body.
    if s.segment_bytes < s.max_body_bytes + _MIB:
        raise _fail(
            "segment_bytes",
            f"{format_size(s.segment_bytes)} cannot hold the largest message; make it at least "
            f"--max-body-bytes + 1MiB ({format_size(s.max_body_bytes + _MIB)})",
        )
    # One maximal message sent as body_b64 grows by 4/3, plus room for the JSON around it.
    needed = s.max_body_bytes * 4 // 3 + 64 * _KIB
    if s.max_request_bytes < needed:
        raise _fail(
            "max_request_bytes",
            f"{format_size(s.max_request_bytes)} cannot carry one message of --max-body-bytes "
            f"as base64; make it at least {needed} bytes",
        )


def _check_queues(s: Settings) -> None:
    if not 1 <= s.default_queues <= s.max_queues:
        raise _fail("default_queues", f"must be between 1 and --max-queues ({s.max_queues})")


#: What JetStream refuses in a stream name: whitespace, '.', '*', '>', path separators,
#: control characters (https://docs.nats.io/nats-concepts/jetstream/streams#configuration).
_NOT_IN_STREAM_NAME = re.compile(r"[\s.*>/\\\x00-\x1f\x7f]")


def _check_release(s: Settings) -> None:
    if s.release_to == "embedded":
        # Given with the default target they did nothing: say so rather than ignore them.
        for name in ("release_topic", "release_stream"):
            if getattr(s, name) is not None:
                raise _fail(name, "applies with --release-to nats:// or amqp:// only")
    if s.release_stream is None and s.release_replicas != 1:
        raise _fail("release_replicas", "applies with --release-stream only")
    if s.release_to == "embedded":
        return
    template = s.release_topic
    if template is not None and "{topic}" not in template:
        raise _fail("release_topic", f"{template!r} must contain {{topic}}")
    amqp = s.release_to.startswith("amqp")
    if amqp and template is not None and "/" not in template:
        raise _fail("release_topic", f"{template!r} is not EXCHANGE/ROUTING_KEY")
    if not amqp and template is not None and re.search(r"\s", template):
        raise _fail("release_topic", f"{template!r}: a NATS subject has no whitespace")
    if amqp and s.release_stream is not None:
        raise _fail("release_stream", "applies to --release-to nats:// only")
    stream = s.release_stream
    if stream is not None and (not stream or _NOT_IN_STREAM_NAME.search(stream)):
        raise _fail(
            "release_stream",
            f"{stream!r} is not a JetStream stream name (no whitespace, '.', '*', '>', '/', '\\')",
        )


def _check_leases(s: Settings) -> None:
    if s.delay_lease_ttl_ms < 300:
        raise _fail("delay_lease_ttl_ms", "must be at least 300ms (it is renewed every third)")
    if s.tx_lease_ms < 300:
        raise _fail("tx_lease_ms", "must be at least 300ms (it is renewed every fifth)")


def _check_probe(s: Settings) -> None:
    if s.probe_interval_ms <= 0:
        return
    if s.probe_duration_ms <= 0:
        raise _fail("probe_duration_ms", "must be longer than 0")
    # Same bound as the probe's own (tempomq.probe.MAX_MESSAGES), without importing the client.
    if s.probe_rate * s.probe_duration_ms // 1000 > 500_000:
        raise _fail("probe_rate", "rate x duration must stay within 500,000 messages a run")


def is_loopback(host: str) -> bool:
    """Does listening on ``host`` keep the port off the network?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_bind(s: Settings) -> None:
    # Redis's protected mode: with no credentials configured, stay off the network unless the
    # operator says otherwise in so many words.
    if s.auth_enabled or s.insecure_no_auth or is_loopback(s.http.host):
        return
    raise _fail(
        "http",
        f"{s.http} is not a loopback address and auth is off; give --auth-file or "
        "TEMPOMQ_ADMIN_TOKEN (see docs/security.md), or --insecure-no-auth to serve anyone",
    )


def _check_grpc_bind(s: Settings) -> None:
    # The RocketMQ listener follows the same rule as the HTTP one.
    if s.grpc is None or s.auth_enabled or s.insecure_no_auth or is_loopback(s.grpc.host):
        return
    raise _fail(
        "grpc",
        f"{s.grpc} is not a loopback address and auth is off; give --auth-file or "
        "TEMPOMQ_ADMIN_TOKEN (see docs/security.md), or --insecure-no-auth to serve anyone",
    )


def _check_limits(s: Settings) -> None:
    if s.header_timeout_ms <= 0:
        raise _fail("header_timeout_ms", "must be longer than 0")
    if s.keepalive_timeout_ms <= 0:
        raise _fail("keepalive_timeout_ms", "must be longer than 0")
    if s.rate_limit > 0 and s.rate_burst < 1:
        raise _fail("rate_burst", "must be at least 1 when --rate-limit is on")


def _check_tls(s: Settings) -> None:
    if (s.tls_cert is None) != (s.tls_key is None):
        raise _fail("tls_cert", "give --tls-cert and --tls-key together")
    if s.tls_client_ca is not None and s.tls_cert is None:
        raise _fail("tls_client_ca", "needs --tls-cert and --tls-key")


_CROSS_CHECKS: tuple[Callable[[Settings], None], ...] = (
    _check_bind,
    _check_grpc_bind,
    _check_limits,
    _check_tls,
    _check_positive_times,
    _check_sizes,
    _check_queues,
    _check_leases,
    _check_release,
    _check_probe,
)


# --------------------------------------------------------------------------------------------
# Sources.


def _help_text(opt: Option, defaults: Settings) -> str:
    shown = opt.kind.format(getattr(defaults, opt.field))
    # argparse %-formats help strings; a literal "%" (as in %DLQ%) must be doubled.
    return f"{opt.help} [env {opt.env}; default {shown}]".replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option. Defaults stay ``None`` so the loader can tell "not given"."""
    defaults = Settings()
    for opt in OPTIONS:
        if opt.env_only:
            continue
        help_text = _help_text(opt, defaults)
        if opt.kind is BOOL:
            parser.add_argument(
                opt.cli,
                dest=opt.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                opt.cli, dest=opt.dest, metavar=opt.kind.metavar, default=None, help=help_text
            )


def load_settings(cli: Mapping[str, object], environ: Mapping[str, str]) -> Settings:
    """Settings from parsed flags (``vars(namespace)``) over environment over defaults."""
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = None if opt.env_only else cli.get(opt.dest)
        where = "the command line"
        if opt.env_only and environ.get(opt.env + FILE_SUFFIX):
            raw = _read_secret_file(opt, environ)
            where = f"the file named by {opt.env}{FILE_SUFFIX}"
        if raw is None:
            # An empty variable counts as unset: compose files and shells often export "".
            raw = environ.get(opt.env) or None
            where = "the environment"
        if raw is None:
            continue
        text = raw if isinstance(raw, str) else str(raw)
        try:
            values[opt.field] = opt.kind.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{opt.label}: {exc} (from {where})") from None
    return Settings(**values)


FILE_SUFFIX = "_FILE"


def _read_secret_file(opt: Option, environ: Mapping[str, str]) -> str:
    """A secret from the file ``<VAR>_FILE`` names (a Docker or Kubernetes secret mount)."""
    name = opt.env + FILE_SUFFIX
    if environ.get(opt.env):
        raise ConfigError(f"give {opt.env} or {name}, not both")
    path = Path(environ[name])
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"{name}: {path} is empty")
    return text


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """``TEMPOMQ_*`` variables that set nothing, most likely misspelt; the CLI warns about them."""
    known = {opt.env for opt in OPTIONS}
    known |= {opt.env + FILE_SUFFIX for opt in OPTIONS if opt.env_only}
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


def _assert_table_covers_settings() -> None:
    # Fails at import if a Settings field has no option (or an option names no field), so a
    # new setting cannot be added without its flag and env var.
    names = {f.name for f in fields(Settings)}
    if names != set(_BY_FIELD):
        raise RuntimeError(f"OPTIONS and Settings disagree: {sorted(names ^ set(_BY_FIELD))}")


_assert_table_covers_settings()
