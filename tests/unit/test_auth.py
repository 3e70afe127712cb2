"""The pure parts of auth: grants and patterns, the auth file, token lookup, the RocketMQ
signature (computed as the official client computes it), and the token buckets."""

from __future__ import annotations

import hmac
from binascii import hexlify
from datetime import UTC, datetime, timedelta
from hashlib import sha1
from pathlib import Path
from typing import Any

import pytest

from tempomq.auth import Auth, Forbidden, TooManyRequests, Unauthenticated, hash_token, new_token
from tempomq.auth.policy import Principal, RateLimit, parse_grant
from tempomq.auth.principals import AuthFileError, load_directory
from tempomq.auth.ratelimit import RateLimiter
from tempomq.auth.rocketmq import SKEW_AHEAD_S, SKEW_BEHIND_S
from tests.auth_helpers import (
    ADMIN_TOKEN,
    OWNER_SECRET_KEY,
    OWNER_TOKEN,
    WRONG_TOKEN,
    write_auth_file,
)

# -- grants ----------------------------------------------------------------------------------------


def test_exact_and_prefix_patterns() -> None:
    p = Principal(
        "p",
        grants=(
            parse_grant("topic:orders", ["produce"]),
            parse_grant("topic:audit-*", ["produce", "consume"]),
            parse_grant("group:*", ["consume"]),
        ),
    )
    assert p.allows("produce", "topic", "orders")
    assert not p.allows("consume", "topic", "orders")
    assert not p.allows("produce", "topic", "orders2")
    assert p.allows("consume", "topic", "audit-eu")
    assert not p.allows("consume", "topic", "audit")
    assert p.allows("consume", "group", "anything")
    assert not p.allows("reset", "group", "anything")
    assert not p.allows("check", "producer_group", "shop")
    assert Principal("root", admin=True).allows("reset", "group", "x")


@pytest.mark.parametrize(
    ("resource", "actions", "says"),
    [
        ("queue:orders", ["produce"], "unknown resource type"),
        ("topic:orders", ["reset"], "actions must be some of"),
        ("topic:", ["produce"], "needs a name"),
        ("topic:a*b", ["produce"], "may only end"),
        ("cluster:x", ["admin"], "takes no name"),
        ("group:g", [], "actions must be some of"),
    ],
)
def test_bad_grants_are_refused_with_the_reason(
    resource: str, actions: list[str], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        parse_grant(resource, actions)


# -- the auth file -------------------------------------------------------------------------------


def test_yaml_and_toml_files_load_the_same(tmp_path: Path) -> None:
    token = new_token()
    (tmp_path / "a.toml").write_text(
        f"""
[principals.billing]
tokens_sha256 = ["{hash_token(token)}"]
access_key = "billing"
secret_key = "billing-secret"
cert_subject = "CN=billing,O=shop"
rate_limit = {{ per_s = 10, burst = 20 }}

[principals.billing.allow]
"topic:orders" = ["produce", "consume"]
"""
    )
    write_auth_file(
        tmp_path / "a.yaml",
        {
            "billing": {
                "tokens_sha256": [hash_token(token)],
                "access_key": "billing",
                "secret_key": "billing-secret",
                "cert_subject": "CN=billing,O=shop",
                "rate_limit": {"per_s": 10, "burst": 20},
                "allow": {"topic:orders": ["produce", "consume"]},
            }
        },
    )
    for name in ("a.toml", "a.yaml"):
        d = load_directory(tmp_path / name, None)
        p = d.find_token(token)
        assert p is not None and p.name == "billing"
        assert p.allows("consume", "topic", "orders")
        assert p.rate_limit == RateLimit(10, 20)
        assert d.by_access_key["billing"] == (p, b"billing-secret")
        assert d.by_cert_subject["CN=billing,O=shop"] is p
        assert d.find_token(token + "x") is None


@pytest.mark.parametrize(
    ("principals", "says"),
    [
        ({"a": {"tokens_sha256": ["abc"]}}, "not a SHA-256"),
        ({"a": {"access_key": "k"}}, "together"),
        ({"a": {"colour": "red"}}, "unknown keys"),
        ({"a": {"admin": "yes"}}, "true or false"),
        ({"a": {"allow": {"topic:x": ["fly"]}}}, "actions must be some of"),
        (
            {
                "a": {"tokens_sha256": [hash_token(OWNER_TOKEN)]},
                "b": {"tokens_sha256": [hash_token(OWNER_TOKEN)]},
            },
            "already given",
        ),
        ({"a": {"rate_limit": {"per_s": 0}}}, "per_s must be > 0"),
    ],
)
def test_a_bad_auth_file_names_the_problem(
    tmp_path: Path, principals: dict[str, Any], says: str
) -> None:
    with pytest.raises(AuthFileError, match=says):
        load_directory(write_auth_file(tmp_path / "auth.yaml", principals), None)


def test_auth_file_errors_without_principals_or_with_an_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("users: []\n")
    with pytest.raises(AuthFileError, match="'principals'"):
        load_directory(tmp_path / "x.yaml", None)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(AuthFileError, match=r"\.yaml, \.yml or \.toml"):
        load_directory(tmp_path / "x.json", None)
    with pytest.raises(AuthFileError, match="cannot read"):
        load_directory(tmp_path / "missing.yaml", None)


def test_a_file_others_can_read_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_auth_file(tmp_path / "auth.yaml")
    load_directory(path, None)
    assert "chmod 600" not in capsys.readouterr().out
    path.chmod(0o644)
    load_directory(path, None)
    assert "chmod 600" in capsys.readouterr().out


def test_the_admin_token_alone_turns_auth_on_and_must_be_long() -> None:
    auth = Auth(admin_token=ADMIN_TOKEN)
    assert auth.enabled
    assert auth.authenticate_bearer(ADMIN_TOKEN).admin
    with pytest.raises(Unauthenticated):
        auth.authenticate_bearer(WRONG_TOKEN)
    with pytest.raises(AuthFileError, match="shorter than"):
        Auth(admin_token="short")


def test_auth_off_lets_everyone_be_anonymous() -> None:
    auth = Auth()
    assert not auth.enabled
    assert auth.authenticate_bearer("anything").admin
    assert auth.authenticate_rocketmq({}).admin


def test_authorize_names_the_missing_permission(tmp_path: Path) -> None:
    auth = Auth(auth_file=write_auth_file(tmp_path / "auth.yaml"))
    owner = auth.authenticate_bearer(OWNER_TOKEN)
    auth.authorize(owner, "produce", "topic:orders")
    auth.authorize(owner, "reset", "group:billing")
    with pytest.raises(Forbidden, match="'owner' lacks reset on group:payments") as e:
        auth.authorize(owner, "reset", "group:payments")
    assert e.value.status == 403
    with pytest.raises(Forbidden, match="unknown resource type"):
        auth.authorize(owner, "produce", "queue:orders")


def test_reload_takes_a_new_file_and_keeps_the_old_principals_on_a_broken_one(
    tmp_path: Path,
) -> None:
    path = write_auth_file(tmp_path / "auth.yaml")
    auth = Auth(auth_file=path)
    token = new_token()
    write_auth_file(path, {"late": {"tokens_sha256": [hash_token(token)]}})
    assert auth.reload()
    assert auth.authenticate_bearer(token).name == "late"
    with pytest.raises(Unauthenticated):
        auth.authenticate_bearer(OWNER_TOKEN)
    path.write_text("principals: [broken")
    assert not auth.reload()
    assert auth.authenticate_bearer(token).name == "late"


# -- the RocketMQ signature ----------------------------------------------------------------------


def client_metadata(ak: str, sk: str, local_now: datetime) -> dict[str, str]:
    """What the official Python client (rocketmq-clients, ``Signature.metadata``) sends: the
    local wall time formatted with a literal Z, HMAC-SHA1 under the secret key, hex."""
    formatted = local_now.strftime("%Y%m%dT%H%M%SZ")
    mac = hmac.new(sk.encode("utf-8"), formatted.encode("utf-8"), sha1)
    signature = hexlify(mac.digest()).decode("utf-8")
    return {
        "x-mq-language": "PYTHON",
        "x-mq-protocol": "GRPC_V2",
        "x-mq-date-time": formatted,
        "authorization": "MQv2-HMAC-SHA1"
        + " Credential="
        + ak
        + ", SignedHeaders=x-mq-date-time, Signature="
        + signature,
    }


NOW = datetime(2026, 1, 30, 10, 15, 0, tzinfo=UTC)


def rocketmq_auth(tmp_path: Path) -> Auth:
    return Auth(
        auth_file=write_auth_file(tmp_path / "auth.yaml"), wall_clock_s=lambda: NOW.timestamp()
    )


@pytest.mark.parametrize("utc_offset_h", [-12, -5, 0, 1, 8, 14])
def test_the_official_clients_signature_verifies_in_any_time_zone(
    tmp_path: Path, utc_offset_h: int
) -> None:
    local = (NOW + timedelta(hours=utc_offset_h)).replace(tzinfo=None)
    meta = client_metadata("owner-ak", OWNER_SECRET_KEY, local)
    assert rocketmq_auth(tmp_path).authenticate_rocketmq(meta).name == "owner"


@pytest.mark.parametrize(
    ("meta", "says"),
    [
        (client_metadata("owner-ak", "not-the-secret", NOW), "does not match"),
        (client_metadata("nobody", OWNER_SECRET_KEY, NOW), "unknown access key"),
        (
            client_metadata(
                "owner-ak", OWNER_SECRET_KEY, NOW + timedelta(seconds=SKEW_AHEAD_S + 5)
            ),
            "too far",
        ),
        (
            client_metadata(
                "owner-ak", OWNER_SECRET_KEY, NOW - timedelta(seconds=SKEW_BEHIND_S + 5)
            ),
            "too far",
        ),
        ({"x-mq-date-time": "20260130T101500Z"}, "credentials required"),
        (
            {"x-mq-date-time": "yesterday", "authorization": "MQv2-HMAC-SHA1 Credential=owner-ak, "
             "SignedHeaders=x-mq-date-time, Signature=00"},
            "not YYYYMMDDTHHMMSSZ",
        ),
        (
            {"x-mq-date-time": "20260130T101500Z", "authorization": "Basic b3duZXI="},
            "scheme must be",
        ),
        (
            {"x-mq-date-time": "20260130T101500Z",
             "authorization": "MQv2-HMAC-SHA1 Credential=owner-ak, Signature=00"},
            "lacks SignedHeaders",
        ),
    ],
)
def test_a_wrong_rocketmq_signature_is_401(
    tmp_path: Path, meta: dict[str, str], says: str
) -> None:
    with pytest.raises(Unauthenticated, match=says) as e:
        rocketmq_auth(tmp_path).authenticate_rocketmq(meta)
    assert e.value.status == 401


def test_the_signature_must_cover_the_date_time_header(tmp_path: Path) -> None:
    meta = client_metadata("owner-ak", OWNER_SECRET_KEY, NOW)
    meta["authorization"] = meta["authorization"].replace("x-mq-date-time", "x-mq-request-id")
    with pytest.raises(Unauthenticated, match="SignedHeaders must be"):
        rocketmq_auth(tmp_path).authenticate_rocketmq(meta)


# -- rate limits ---------------------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    limiter = RateLimiter(RateLimit(per_s=10, burst=3))
    assert [limiter.take("a", None, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", None, 100.0) == pytest.approx(0.1)
    assert limiter.take("b", None, 100.0) == 0.0  # each principal has its own bucket
    assert limiter.take("a", None, 100.11) == 0.0  # one token back after 1/10 s
    assert limiter.take("a", None, 100.11) > 0


def test_a_principals_own_limit_wins_and_no_limit_means_none() -> None:
    limiter = RateLimiter(None)
    assert all(limiter.take("a", None, 0.0) == 0.0 for _ in range(10_000))
    own = RateLimit(per_s=1, burst=1)
    assert limiter.take("b", own, 0.0) == 0.0
    assert limiter.take("b", own, 0.0) == pytest.approx(1.0)


def test_the_buckets_stay_bounded() -> None:
    limiter = RateLimiter(RateLimit(1, 1), max_buckets=100)
    for i in range(1000):
        limiter.take(f"client-{i}", None, 0.0)
    assert len(limiter._buckets) == 100


def test_over_the_rate_raises_429_with_retry_after() -> None:
    clock = [0.0]
    auth = Auth(admin_token=ADMIN_TOKEN, rate_limit=RateLimit(2, 2), clock_s=lambda: clock[0])
    admin = auth.authenticate_bearer(ADMIN_TOKEN)
    auth.check_rate(admin)
    auth.check_rate(admin)
    with pytest.raises(TooManyRequests) as e:
        auth.check_rate(admin)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
    clock[0] = 0.5
    auth.check_rate(admin)
