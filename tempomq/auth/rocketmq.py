"""The RocketMQ 5 client's request signature: parse the ``authorization`` header and verify it.

The official clients (``Credentials(ak, sk)``) send, on every gRPC call::

    x-mq-date-time: 20260130T101500Z
    authorization: MQv2-HMAC-SHA1 Credential=<ak>, SignedHeaders=x-mq-date-time,
                   Signature=<hex HMAC-SHA1(secret key, value of x-mq-date-time)>

Only the date-time is signed, so the signature proves the client holds the secret key, not
what the request says; TLS protects the rest. The clients build the date-time from their
*local* clock and append a literal ``Z``, so a correct client is off from UTC by its time
zone: anything from 12 hours behind to 14 hours ahead. :data:`SKEW_BEHIND_S` and
:data:`SKEW_AHEAD_S` accept exactly that range plus five minutes of clock drift, and refuse
anything further off (a header captured more than a day ago, say).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import time
from dataclasses import dataclass

SCHEME = "MQv2-HMAC-SHA1"
SIGNED_HEADER = "x-mq-date-time"
_DRIFT_S = 5 * 60
#: A client at UTC-12 stamps its requests 12 hours behind UTC ...
SKEW_BEHIND_S = 12 * 3600 + _DRIFT_S
#: ... and one at UTC+14 (Kiribati) 14 hours ahead.
SKEW_AHEAD_S = 14 * 3600 + _DRIFT_S


class SignatureError(ValueError):
    """The header is missing, malformed, or does not verify; the message says which."""


@dataclass(frozen=True, slots=True)
class SignedHeader:
    access_key: str
    signed_headers: str
    signature: str


def sign(secret_key: bytes, date_time: str) -> str:
    """The signature a client with ``secret_key`` sends for ``date_time`` (hex HMAC-SHA1)."""
    return hmac.new(secret_key, date_time.encode(), hashlib.sha1).hexdigest()


def parse_authorization(value: str) -> SignedHeader:
    scheme, _, rest = value.strip().partition(" ")
    if scheme != SCHEME:
        raise SignatureError(f"authorization scheme must be {SCHEME}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, val = part.strip().partition("=")
        if sep:
            fields[key.strip()] = val.strip()
    try:
        return SignedHeader(fields["Credential"], fields["SignedHeaders"], fields["Signature"])
    except KeyError as exc:
        raise SignatureError(f"authorization header lacks {exc.args[0]}=") from None


def parse_date_time(value: str) -> float:
    """``YYYYMMDDTHHMMSSZ`` as epoch seconds (the ``Z`` taken at its word)."""
    try:
        return float(calendar.timegm(time.strptime(value, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        raise SignatureError(f"{SIGNED_HEADER} {value!r} is not YYYYMMDDTHHMMSSZ") from None


def check_skew(date_time: str, now_s: float) -> None:
    stamped = parse_date_time(date_time)
    if not -SKEW_BEHIND_S <= stamped - now_s <= SKEW_AHEAD_S:
        raise SignatureError(f"{SIGNED_HEADER} {date_time} is too far from the server's clock")


def verify(header: SignedHeader, date_time: str, secret_key: bytes) -> None:
    if header.signed_headers.lower() != SIGNED_HEADER:
        raise SignatureError(f"SignedHeaders must be {SIGNED_HEADER}")
    if not hmac.compare_digest(sign(secret_key, date_time), header.signature.lower()):
        raise SignatureError("signature does not match the secret key")
