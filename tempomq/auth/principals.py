"""The auth file and the bootstrap admin token: principals and their credentials, loaded once.

The file is YAML (``.yaml``/``.yml``) or TOML (``.toml``) and names each principal with its
credentials and grants::

    principals:
      billing:
        tokens_sha256: ["<sha256 hex of the token>"]   # HTTP: Authorization: Bearer <token>
        access_key: billing                            # RocketMQ protocol: Credentials(ak, sk)
        secret_key: "<secret key>"
        cert_subject: "CN=billing,O=shop"              # TLS client certificate subject
        rate_limit: {per_s: 500, burst: 1000}
        allow:
          "topic:orders": [produce, consume]
          "group:billing": [consume]
      ops:
        tokens_sha256: ["..."]
        admin: true

Tokens are stored only as SHA-256 hashes: a token is a high-entropy random string
(``tempomq auth token`` makes one), so a plain hash is enough and a leaked file gives no
tokens away. The RocketMQ secret key must be kept in clear, because the client signs with
HMAC-SHA1 under it and the server has to compute the same MAC; the loader warns when the file
is readable by anyone but its owner.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs

from tempomq.auth.policy import Grant, Principal, RateLimit, parse_grant
from tempomq.logs import get_logger

log = get_logger(__name__)

#: Shorter tokens are refused: a token is a password that never needs remembering.
MIN_TOKEN_CHARS = 24
TOKEN_PREFIX = "tmq_"
_SHA256_HEX_CHARS = 64
_LOOKUP_CHARS = 8


class AuthFileError(Exception):
    """The auth file cannot be read or says something invalid; the message names the place."""


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the auth file stores for ``token``: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Directory:
    """Every principal, indexed by each kind of credential it can present."""

    principals: Mapping[str, Principal] = field(default_factory=dict)
    #: first hex digits of a token's SHA-256 -> [(whole digest, principal)]
    by_token_sha256: Mapping[str, list[tuple[str, Principal]]] = field(default_factory=dict)
    #: access key -> (principal, secret key)
    by_access_key: Mapping[str, tuple[Principal, bytes]] = field(default_factory=dict)
    by_cert_subject: Mapping[str, Principal] = field(default_factory=dict)

    def find_token(self, token: str) -> Principal | None:
        digest = hash_token(token)
        # Looked up by a short prefix, then compared whole in constant time: the lookup
        # itself never tells how much of a wrong digest matched.
        for stored, principal in self.by_token_sha256.get(digest[:_LOOKUP_CHARS], ()):
            if hmac.compare_digest(stored, digest):
                return principal
        return None


def _grants(where: str, allow: object) -> tuple[Grant, ...]:
    if allow is None:
        return ()
    if not isinstance(allow, Mapping):
        raise AuthFileError(f"{where}.allow must map 'type:name' to a list of actions")
    out = []
    for res, actions in allow.items():
        if isinstance(actions, str):
            actions = [actions]
        if not isinstance(res, str) or not isinstance(actions, list):
            raise AuthFileError(f"{where}.allow: {res!r} must map to a list of actions")
        try:
            out.append(parse_grant(res, (str(a) for a in actions)))
        except ValueError as exc:
            raise AuthFileError(f"{where}.allow: {exc}") from None
    return tuple(out)


def _rate_limit(where: str, value: object) -> RateLimit | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise AuthFileError(f"{where}.rate_limit must be {{per_s: N, burst: N}}")
    try:
        per_s = float(value["per_s"])
        burst = float(value.get("burst", per_s))
    except (KeyError, TypeError, ValueError):
        raise AuthFileError(f"{where}.rate_limit must be {{per_s: N, burst: N}}") from None
    if per_s <= 0 or burst < 1:
        raise AuthFileError(f"{where}.rate_limit: per_s must be > 0 and burst >= 1")
    return RateLimit(per_s, burst)


def _str_list(where: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthFileError(f"{where} must be a list of strings")
    return list(value)


_KNOWN_KEYS = frozenset(
    {"tokens_sha256", "access_key", "secret_key", "cert_subject", "admin", "allow", "rate_limit"}
)


class _Builder:
    """Collects principals and refuses a credential that two of them share."""

    def __init__(self) -> None:
        self.principals: dict[str, Principal] = {}
        self.tokens: dict[str, Principal] = {}
        self.keys: dict[str, tuple[Principal, bytes]] = {}
        self.subjects: dict[str, Principal] = {}

    def add(self, name: str, spec: Mapping[str, Any]) -> None:
        where = f"principals.{name}"
        unknown = set(spec) - _KNOWN_KEYS
        if unknown:
            raise AuthFileError(f"{where}: unknown keys {sorted(unknown)}")
        admin = spec.get("admin", False)
        if not isinstance(admin, bool):
            raise AuthFileError(f"{where}.admin must be true or false")
        principal = Principal(
            name,
            admin=admin,
            grants=_grants(where, spec.get("allow")),
            rate_limit=_rate_limit(where, spec.get("rate_limit")),
        )
        self.principals[name] = principal
        for digest in _str_list(f"{where}.tokens_sha256", spec.get("tokens_sha256")):
            digest = digest.lower()
            if len(digest) != _SHA256_HEX_CHARS or digest.strip("0123456789abcdef"):
                raise AuthFileError(f"{where}.tokens_sha256: {digest!r} is not a SHA-256 digest")
            if digest in self.tokens:
                raise AuthFileError(f"{where}: a token is already given to another principal")
            self.tokens[digest] = principal
        ak, sk = spec.get("access_key"), spec.get("secret_key")
        if (ak is None) != (sk is None):
            raise AuthFileError(f"{where}: give access_key and secret_key together")
        if ak is not None:
            if not isinstance(ak, str) or not isinstance(sk, str) or not ak or len(sk) < 8:
                raise AuthFileError(f"{where}: access_key and secret_key (>= 8 chars) are strings")
            self._unique(self.keys, ak, (principal, sk.encode()), f"{where}: access key {ak!r}")
        for subject in _str_list(f"{where}.cert_subject", spec.get("cert_subject")):
            self._unique(self.subjects, subject, principal, f"{where}: subject {subject!r}")

    @staticmethod
    def _unique(index: dict[str, Any], key: str, value: Any, what: str) -> None:
        if key in index:
            raise AuthFileError(f"{what} is already given to another principal")
        index[key] = value

    def directory(self) -> Directory:
        by_prefix: dict[str, list[tuple[str, Principal]]] = {}
        for digest, principal in self.tokens.items():
            by_prefix.setdefault(digest[:_LOOKUP_CHARS], []).append((digest, principal))
        return Directory(self.principals, by_prefix, self.keys, self.subjects)


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthFileError(f"cannot read auth file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise AuthFileError(f"auth file {path} is not valid: {exc}") from None
    raise AuthFileError(f"auth file {path}: name it .yaml, .yml or .toml")


def warn_if_readable(path: Path) -> None:
    """The file may hold secret keys in clear: say so when others can read it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "auth file is readable by group or others; it may hold secret keys in clear: "
            "chmod 600 it",
            path=str(path),
            mode=oct(mode & 0o777),
        )


def load_directory(
    path: Path | None, admin_token: str | None, *, internal: Mapping[str, str] | None = None
) -> Directory:
    """Principals from the auth file (if any), the bootstrap admin (if a token is given), and
    ``internal`` admins (name -> token) the server makes for its own clients."""
    builder = _Builder()
    if path is not None:
        data = _read(path)
        principals = data.get("principals") if isinstance(data, Mapping) else None
        if not isinstance(principals, Mapping):
            raise AuthFileError(f"auth file {path} needs a 'principals' table")
        for name, spec in principals.items():
            if not isinstance(spec, Mapping):
                raise AuthFileError(f"principals.{name} must be a table")
            builder.add(str(name), spec)
        warn_if_readable(path)
    if admin_token is not None:
        if len(admin_token) < MIN_TOKEN_CHARS:
            raise AuthFileError(
                f"TEMPOMQ_ADMIN_TOKEN is shorter than {MIN_TOKEN_CHARS} characters; "
                "make one with `tempomq auth token`"
            )
        name = "admin" if "admin" not in builder.principals else "bootstrap-admin"
        builder.add(name, {"admin": True, "tokens_sha256": [hash_token(admin_token)]})
    for name, token in (internal or {}).items():
        builder.add(f"internal:{name}", {"admin": True, "tokens_sha256": [hash_token(token)]})
    return builder.directory()
