"""Errors the SDK raises: one class per API error code, built from a response in one place.

Every error the server sends is ``{"error": code, "message": text}`` with an HTTP status (API.md).
:func:`error_from_response` maps the code to the most specific class below, and a code this SDK
does not know yet (the API may add codes) to the class of its status, so ``except NotFound``
keeps working when the server learns new reasons to answer 404.
"""

from __future__ import annotations

from typing import Any


class TempoClientError(Exception):
    """Base of everything the SDK raises about a call; ``status`` is 0 when no answer came."""

    status: int = 0
    code: str = "error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code} ({self.status}): {self.message}" if self.status else self.message


# -- by status: the fallback for codes this SDK does not know ------------------------------------


class BadRequest(TempoClientError):
    status, code = 400, "bad_request"


class NotFound(TempoClientError):
    status, code = 404, "not_found"


class Conflict(TempoClientError):
    status, code = 409, "conflict"


class TooLarge(TempoClientError):
    status, code = 413, "message_too_large"


class Unauthenticated(TempoClientError):
    """401: no token, or one the server does not know (``TEMPOMQ_TOKEN``, ``token=``)."""

    status, code = 401, "unauthorized"


class Forbidden(TempoClientError):
    """403: the token's principal lacks a permission; the message names it."""

    status, code = 403, "forbidden"


class TooManyRequests(TempoClientError):
    """429: the principal's rate limit is reached; try again after a short wait."""

    status, code = 429, "too_many_requests"


class ServerError(TempoClientError):
    """A 500: a bug on the server; its message carries the request id to look for in its log."""

    status, code = 500, "internal"


class Unavailable(TempoClientError):
    """The service could not do it now (502-504, or no answer): try again later or elsewhere."""

    status, code = 503, "unavailable"


# -- by code -------------------------------------------------------------------------------------


class InvalidRequest(BadRequest):
    code = "invalid_request"


class InvalidMessage(BadRequest):
    code = "invalid_message"


class InvalidTopic(BadRequest):
    code = "invalid_topic"


class InvalidGroup(BadRequest):
    code = "invalid_group"


class TopicNotFound(NotFound):
    code = "topic_not_found"


class MessageNotFound(NotFound):
    code = "message_not_found"


class GroupNotFound(NotFound):
    code = "group_not_found"


class TransactionNotFound(NotFound):
    code = "transaction_not_found"


class TopicExists(Conflict):
    code = "topic_exists"


class GroupExists(Conflict):
    code = "group_exists"


class ReceiptExpired(Conflict):
    """The receipt expired (the message is visible again) or was already acknowledged."""

    code = "receipt_expired"


class MsgIdConflict(Conflict):
    """The message's id is already used by a message of another topic (named in the message):
    an id names one message, and a resend goes where the first send went."""

    code = "msg_id_conflict"


class AlreadyDelivered(Conflict):
    code = "already_delivered"


class AlreadyCancelled(Conflict):
    code = "already_cancelled"


class AlreadyCommitted(Conflict):
    code = "already_committed"


class AlreadyRolledBack(Conflict):
    code = "already_rolled_back"


class MessageTooLarge(TooLarge):
    code = "message_too_large"


class StoreUnavailable(Unavailable):
    code = "store_unavailable"


class DelayStoreUnavailable(Unavailable):
    code = "delay_store_unavailable"


class TransactionStoreUnavailable(StoreUnavailable):
    code = "transaction_store_unavailable"


class NotReady(Unavailable):
    code = "not_ready"


class ConnectionFailed(Unavailable):
    """No HTTP answer: refused, reset, DNS failure. ``sent`` says whether the request may have
    reached the server (a reset after sending) or certainly did not (a refused connect)."""

    status, code = 0, "connection_failed"

    def __init__(self, message: str, *, sent: bool):
        super().__init__(message)
        self.sent = sent


class RequestTimedOut(Unavailable):
    """No answer within the timeout; the server may or may not have done it."""

    status, code = 0, "timeout"


# -- raised by the SDK itself --------------------------------------------------------------------


class TransactionRolledBack(AlreadyRolledBack):
    """The transaction was decided as rolled back (the check-back answered from the barrier
    before the local commit), so the local transaction was rolled back too."""

    def __init__(self, tx_id: str):
        super().__init__(
            f"transaction {tx_id} was rolled back by a check-back before the local commit; "
            "the local database transaction was rolled back"
        )
        self.tx_id = tx_id


_STATUS_CLASSES: tuple[type[TempoClientError], ...] = (
    BadRequest,
    NotFound,
    Conflict,
    TooLarge,
    Unauthenticated,
    Forbidden,
    TooManyRequests,
    ServerError,
)
_BY_STATUS = {cls.status: cls for cls in _STATUS_CLASSES}
_BY_CODE: dict[str, type[TempoClientError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        InvalidMessage,
        InvalidTopic,
        InvalidGroup,
        TopicNotFound,
        MessageNotFound,
        GroupNotFound,
        TransactionNotFound,
        TopicExists,
        GroupExists,
        ReceiptExpired,
        MsgIdConflict,
        AlreadyDelivered,
        AlreadyCancelled,
        AlreadyCommitted,
        AlreadyRolledBack,
        MessageTooLarge,
        StoreUnavailable,
        DelayStoreUnavailable,
        TransactionStoreUnavailable,
        NotReady,
    )
}
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


def error_from_response(status: int, payload: Any) -> TempoClientError:
    """The error for an answer with ``status`` >= 400 and its decoded body (any JSON, or text)."""
    if isinstance(payload, dict):
        code = str(payload.get("error") or "")
        message = str(payload.get("message") or code or f"HTTP {status}")
    else:
        code, message = "", str(payload or f"HTTP {status}")[:500]
    cls = _BY_CODE.get(code)
    if cls is None or cls.status != status:
        cls = _BY_STATUS.get(status)
        if cls is None:
            cls = Unavailable if status in UNAVAILABLE_STATUSES else TempoClientError
    return cls(message, status=status, code=code or None)
