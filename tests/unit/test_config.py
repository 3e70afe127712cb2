"""Settings from flags, TEMPOMQ_* variables and defaults; parsing of sizes and durations."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from broker_core.config import BrokerConfig
from tempomq.config import (
    OPTIONS,
    ConfigError,
    HostPort,
    Settings,
    add_arguments,
    format_duration_ms,
    format_size,
    load_settings,
    parse_duration_ms,
    parse_host_port,
    parse_size,
    unknown_env_vars,
)


def load(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_settings(vars(parser.parse_args(argv or [])), env or {})


# -- defaults ------------------------------------------------------------------------------------


def test_defaults_match_design() -> None:
    s = load()
    assert s.http == HostPort("127.0.0.1", 8080)
    assert s.data_dir == Path("./data")
    assert s.flush == "async"
    assert s.max_request_bytes == 64 * 1024 * 1024
    assert s.retention_ms == 72 * 3600 * 1000
    assert s.auto_create_topics is False
    assert s.default_queues == 8
    assert s.redis_url is None
    assert (s.log_level, s.log_format) == ("info", "auto")


def test_broker_config_defaults_are_the_broker_cores() -> None:
    assert load().broker_config() == BrokerConfig()


def test_broker_config_carries_settings() -> None:
    s = load(
        [
            "--data-dir",
            "/srv/q",
            "--flush",
            "sync",
            "--max-attempts",
            "3",
            "--backoff",
            "1s,2s",
            "--auto-create-topics",
        ]
    )
    cfg = s.broker_config()
    assert cfg.data_dir == Path("/srv/q")
    assert cfg.flush == "sync"
    assert cfg.max_attempts == 3
    assert cfg.backoff_ms == (1000, 2000)
    assert cfg.auto_create_topics is True


# -- sources and precedence ----------------------------------------------------------------------


def test_every_option_has_flag_and_env_named_alike() -> None:
    for opt in OPTIONS:
        assert opt.env == "TEMPOMQ_" + opt.flag.upper().replace("-", "_")
        assert opt.cli == "--" + opt.flag


def test_env_sets_values() -> None:
    s = load(
        env={
            "TEMPOMQ_DATA_DIR": "/var/lib/tq",
            "TEMPOMQ_HTTP": "0.0.0.0:9000",
            "TEMPOMQ_INSECURE_NO_AUTH": "yes",
            "TEMPOMQ_FLUSH_INTERVAL": "50ms",
            "TEMPOMQ_AUTO_CREATE_TOPICS": "yes",
            "TEMPOMQ_REDIS_URL": "redis://localhost:6379/0",
        }
    )
    assert s.data_dir == Path("/var/lib/tq")
    assert s.http == HostPort("0.0.0.0", 9000)
    assert s.insecure_no_auth is True
    assert s.flush_interval_ms == 50
    assert s.auto_create_topics is True
    assert s.redis_url == "redis://localhost:6379/0"


def test_flag_beats_env_beats_default() -> None:
    env = {"TEMPOMQ_DATA_DIR": "/from-env", "TEMPOMQ_DEFAULT_QUEUES": "4"}
    s = load(["--data-dir", "/from-flag"], env)
    assert s.data_dir == Path("/from-flag")  # flag over env
    assert s.default_queues == 4  # env over default


def test_bool_flag_overrides_env_both_ways() -> None:
    env = {"TEMPOMQ_AUTO_CREATE_TOPICS": "true"}
    assert load(["--no-auto-create-topics"], env).auto_create_topics is False
    assert load(["--auto-create-topics"], {"TEMPOMQ_AUTO_CREATE_TOPICS": "0"}).auto_create_topics


def test_empty_env_var_counts_as_unset() -> None:
    assert load(env={"TEMPOMQ_REDIS_URL": "", "TEMPOMQ_HTTP": ""}).http.port == 8080


def test_every_option_is_settable_from_env() -> None:
    # One valid value per kind of option; each must land in its own field.
    samples = {
        "http": "127.0.0.2:5",
        "data-dir": "/d",
        "flush": "sync",
        "redis-url": "redis://r",
        "log-level": "debug",
        "log-format": "json",
        "backoff": "1s",
        "auto-create-topics": "on",
        "max-queues": "16",
        "grpc": "127.0.0.2:9876",
        "grpc-advertise": "mq.example.com:443",
        "insecure-no-auth": "on",
        "metrics-public": "on",
        "http-lean": "off",
        "check-url-allow": "hooks.internal",
        "tx-store": "postgresql+asyncpg://u@db/tx",
        "release-to": "nats://n:4222",
        "release-topic": "x.{topic}",
    }
    sizes = {"segment-bytes": "2GiB", "max-body-bytes": "1MiB", "max-request-bytes": "32MiB"}
    # Options that are only valid with a companion.
    tls = {"TEMPOMQ_TLS_CERT": "/c", "TEMPOMQ_TLS_KEY": "/k"}
    nats = {"TEMPOMQ_RELEASE_TO": "nats://n:4222"}
    companions = {
        "tls-cert": tls,
        "tls-key": tls,
        "tls-client-ca": tls,
        "release-topic": nats,
        "release-stream": nats,
        "release-replicas": {**nats, "TEMPOMQ_RELEASE_STREAM": "S"},
    }
    for opt in OPTIONS:
        value = samples.get(opt.flag) or sizes.get(opt.flag)
        if value is None:
            value = "3s" if opt.kind.metavar == "DURATION" else "3"
        s = load(env={**companions.get(opt.flag, {}), opt.env: value})
        assert getattr(s, opt.field) != getattr(Settings(), opt.field), opt.flag


def test_tx_store_takes_sqlite_mysql_and_postgresql_urls_and_names_what_is_wrong() -> None:
    assert load().tx_store is None  # the SQLite file in the data directory
    for url in (
        "sqlite:///tx.db",
        "mysql+aiomysql://root@127.0.0.1:3306/test",
        "mariadb+aiomysql://u:p@db/tx?table_prefix=a_",
        "postgresql+asyncpg://postgres@127.0.0.1/test",
    ):
        assert load(["--tx-store", url]).tx_store == url
    bad = {
        "redis://r": "unsupported scheme 'redis'",
        "mysql://root@h/test": "unsupported scheme 'mysql'",  # the blocking driver
        "postgresql+asyncpg://h": "must name a database",
        "mysql+aiomysql://h/db?table_prefix=a-b": "table_prefix",
        "sqlite:///": "needs a file path",
        "nonsense": "not a database URL",
    }
    for url, why in bad.items():
        with pytest.raises(ConfigError, match=f"--tx-store / TEMPOMQ_TX_STORE: .*{why}"):
            load(["--tx-store", url])
    with pytest.raises(ConfigError, match="tx-lease"):
        load(["--tx-lease", "100ms"])


def test_release_to_names_a_target_and_its_mapping() -> None:
    assert load().release_to == "embedded"
    s = load(["--release-to", "nats://a:4222,nats://b:4222", "--release-topic", "q.{topic}"])
    assert (s.release_to, s.release_topic) == ("nats://a:4222,nats://b:4222", "q.{topic}")
    assert load(env={"TEMPOMQ_RELEASE_TO": "EMBEDDED"}).release_to == "embedded"
    with pytest.raises(ConfigError, match="--release-to / TEMPOMQ_RELEASE_TO: 'kafka:9092'"):
        load(["--release-to", "kafka:9092"])
    with pytest.raises(ConfigError, match=r"must contain \{topic\}"):
        load(["--release-to", "nats://a:4222", "--release-topic", "fixed"])
    with pytest.raises(ConfigError, match="EXCHANGE/ROUTING_KEY"):
        load(["--release-to", "amqp://h/", "--release-topic", "x{topic}"])
    with pytest.raises(ConfigError, match="nats:// only"):
        load(["--release-to", "amqp://h/", "--release-stream", "S"])


def test_release_options_that_would_do_nothing_or_never_work_are_refused() -> None:
    """Each was accepted before: ignored with the embedded target, or a server that started and
    stayed not ready for good (no host, a stream or subject NATS refuses)."""
    assert load(["--release-to", "nats://a:4222", "--release-stream", "S-1_x"]).release_stream
    bad = {
        ("--release-topic", "x.{topic}"): "--release-topic .*nats:// or amqp:// only",
        ("--release-stream", "S"): "--release-stream .*nats:// or amqp:// only",
        ("--release-to", "nats://"): "'nats://' names no host",
        ("--release-to", "nats://a:4222,nats://"): "'nats://' names no host",
        ("--release-to", "amqp://u:hunter2@/"): "names no host",
        ("--release-to", "nats://a:4222", "--release-stream", "bad.name"): "not a JetStream",
        ("--release-to", "nats://a:4222", "--release-stream", "a b"): "not a JetStream",
        ("--release-to", "nats://a:4222", "--release-topic", "x {topic}"): "no whitespace",
        ("--release-to", "nats://a:4222", "--release-replicas", "3"): "--release-stream only",
    }
    for argv, why in bad.items():
        with pytest.raises(ConfigError, match=why) as caught:
            load(list(argv))
        assert "hunter2" not in str(caught.value)


def test_a_release_to_password_never_shows() -> None:
    s = load(["--release-to", "amqp://user:hunter2@mq:5672/"])
    assert "hunter2" not in repr(s)
    with pytest.raises(ConfigError) as caught:
        load(["--release-to", "amqq://user:hunter2@mq:5672/"])
    assert "hunter2" not in str(caught.value)


def test_grpc_listener_defaults_on_and_can_be_turned_off() -> None:
    assert load().grpc == HostPort("127.0.0.1", 8081)
    assert load().grpc_advertise is None
    assert load(["--grpc", "off"]).grpc is None
    assert load(env={"TEMPOMQ_GRPC": "OFF"}).grpc is None
    assert load(["--grpc", "[::1]:0"]).grpc == HostPort("::1", 0)
    with pytest.raises(ConfigError, match="--grpc-advertise / TEMPOMQ_GRPC_ADVERTISE"):
        load(["--grpc-advertise", "off"])


def test_a_non_loopback_grpc_listener_needs_auth_like_http() -> None:
    with pytest.raises(ConfigError, match=r"--grpc / TEMPOMQ_GRPC: 0\.0\.0\.0:8081 is not a loop"):
        load(["--grpc", "0.0.0.0:8081"])
    assert load(["--grpc", "0.0.0.0:8081", "--insecure-no-auth"]).grpc == HostPort("0.0.0.0", 8081)
    assert load(["--grpc", "0.0.0.0:8081"], {"TEMPOMQ_ADMIN_TOKEN": "x" * 32}).grpc is not None


def test_unknown_env_vars_are_reported() -> None:
    env = {"TEMPOMQ_DATADIR": "/x", "TEMPOMQ_DATA_DIR": "/y", "HOME": "/root"}
    assert unknown_env_vars(env) == ["TEMPOMQ_DATADIR"]


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("512KiB", 512 * 1024),
        ("64MiB", 64 << 20),
        ("1GiB", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("2 tib", 2 << 40),
        ("100B", 100),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "64MB", "1.5", "-1", "12XB", "0.1KiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("1.5s", 1500),
        ("5m", 300_000),
        ("72h", 259_200_000),
        ("7d", 604_800_000),
        ("0", 0),
        ("10 S", 10_000),
    ],
)
def test_parse_duration(text: str, expected: int) -> None:
    assert parse_duration_ms(text) == expected


@pytest.mark.parametrize("text", ["72", "5 minutes", "1w", "0.5ms", "s", "-3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration_ms(text)


def test_formatters_round_trip() -> None:
    for n in (1, 1000, 4 << 20, 3 << 29, 1 << 30):
        assert parse_size(format_size(n)) == n
    for ms in (1, 500, 1500, 30_000, 90_000, 3_600_000, 259_200_000):
        assert parse_duration_ms(format_duration_ms(ms)) == ms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", HostPort("127.0.0.1", 8080)),
        ("localhost:0", HostPort("localhost", 0)),
        ("[::1]:9000", HostPort("::1", 9000)),
    ],
)
def test_parse_host_port(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected
    assert parse_host_port(str(expected)) == expected


@pytest.mark.parametrize("text", ["8080", ":8080", "host:", "host:http", "host:70000"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


# -- errors name the flag and the variable -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "names", "hint"),
    [
        (["--segment-bytes", "1MB"], {}, "--segment-bytes / TEMPOMQ_SEGMENT_BYTES", "MiB"),
        ([], {"TEMPOMQ_RETENTION": "72"}, "--retention / TEMPOMQ_RETENTION", "unit"),
        ([], {"TEMPOMQ_HTTP": "8080"}, "--http / TEMPOMQ_HTTP", "host:port"),
        (["--flush", "sometimes"], {}, "--flush / TEMPOMQ_FLUSH", "async, sync"),
        ([], {"TEMPOMQ_AUTO_CREATE_TOPICS": "maybe"}, "TEMPOMQ_AUTO_CREATE_TOPICS", "true/false"),
        (["--default-queues", "0"], {}, "--default-queues / TEMPOMQ_DEFAULT_QUEUES", "at least 1"),
        ([], {"TEMPOMQ_REDIS_URL": "localhost"}, "TEMPOMQ_REDIS_URL", "redis://"),
        ([], {"TEMPOMQ_LOG_FORMAT": "xml"}, "--log-format / TEMPOMQ_LOG_FORMAT", "json"),
    ],
)
def test_bad_value_names_flag_and_env(
    argv: list[str], env: dict[str, str], names: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(argv, env)
    assert names in str(err.value)
    assert hint in str(err.value)


def test_error_says_where_the_value_came_from() -> None:
    with pytest.raises(ConfigError, match="from the environment"):
        load(env={"TEMPOMQ_MAX_ATTEMPTS": "many"})
    with pytest.raises(ConfigError, match="from the command line"):
        load(["--max-attempts", "many"])


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--segment-bytes", "2MiB"], "--segment-bytes / TEMPOMQ_SEGMENT_BYTES"),
        (["--max-request-bytes", "1MiB"], "--max-request-bytes / TEMPOMQ_MAX_REQUEST_BYTES"),
        (["--default-queues", "300"], "--default-queues / TEMPOMQ_DEFAULT_QUEUES"),
        (["--flush-interval", "0"], "--flush-interval / TEMPOMQ_FLUSH_INTERVAL"),
    ],
)
def test_inconsistent_values_are_refused(argv: list[str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load(argv)


def test_checks_apply_to_settings_built_in_code() -> None:
    with pytest.raises(ConfigError, match="--max-body-bytes"):
        Settings(max_body_bytes=0)


# -- security settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080", "myhost:80"])
def test_a_network_address_without_auth_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address and auth is off") as e:
        load(env={"TEMPOMQ_HTTP": address})
    assert "--insecure-no-auth" in str(e.value) and "TEMPOMQ_ADMIN_TOKEN" in str(e.value)


@pytest.mark.parametrize(
    "env",
    [
        {"TEMPOMQ_INSECURE_NO_AUTH": "true"},
        {"TEMPOMQ_ADMIN_TOKEN": "t" * 32},
        {"TEMPOMQ_AUTH_FILE": "/etc/tempomq/auth.yaml"},
    ],
)
def test_a_network_address_is_fine_with_auth_or_the_explicit_flag(env: dict[str, str]) -> None:
    assert load(env={"TEMPOMQ_HTTP": "0.0.0.0:8080", **env}).http.host == "0.0.0.0"


@pytest.mark.parametrize("address", ["127.0.0.1:8080", "[::1]:8080", "localhost:8080"])
def test_loopback_needs_no_auth(address: str) -> None:
    assert not load(env={"TEMPOMQ_HTTP": address}).auth_enabled


def test_secrets_come_from_the_environment_only_and_are_never_shown() -> None:
    s = load(env={"TEMPOMQ_ADMIN_TOKEN": "s3cret" * 6, "TEMPOMQ_CHECK_URL_SECRET": "k" * 20})
    assert s.admin_token == "s3cret" * 6 and s.check_url_secret == "k" * 20
    assert "s3cret" not in repr(s)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--admin-token" not in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--admin-token", "x"])


def test_tls_files_go_together() -> None:
    with pytest.raises(ConfigError, match="together"):
        load(["--tls-cert", "/c.pem"])
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        load(["--tls-client-ca", "/ca.pem"])


def test_check_url_allow_list_parses_hosts_and_cidrs() -> None:
    s = load(["--check-url-allow", "hooks.internal, 10.0.0.0/8,::1,127.0.0.1:8081"])
    assert s.check_url_allow == ("hooks.internal", "10.0.0.0/8", "::1", "127.0.0.1:8081")
    with pytest.raises(ConfigError, match="neither a host name nor a network"):
        load(["--check-url-allow", "10.0.0.0/33"])
