"""The errors authentication, authorization and rate limiting answer with (401, 403, 429).

They are :class:`~broker_core.errors.TempoError`s, so the app's one error middleware renders them
in the API's JSON shape; ``headers`` go out with the answer (``WWW-Authenticate``,
``Retry-After``).
"""

from __future__ import annotations

import math

from broker_core.errors import TempoError


class Unauthenticated(TempoError):
    """No credentials, or credentials that name no principal."""

    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": 'Bearer realm="tempomq"'}


class Forbidden(TempoError):
    """The principal is known but lacks the permission; the message names the permission."""

    status, code = 403, "forbidden"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers: dict[str, str] = {}


class TooManyRequests(TempoError):
    """The principal's token bucket is empty; ``Retry-After`` says when one request fits."""

    status, code = 429, "too_many_requests"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
