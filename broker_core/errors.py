"""Domain errors users can hit; each carries the HTTP status and API error code it maps to.

Every package raises subclasses of :class:`TempoError`; the HTTP layer turns any of them into
``{"error": code, "message": text}`` with ``status`` in exactly one place (``tempomq.app``).
"""

from __future__ import annotations


class TempoError(Exception):
    """Base of all errors that reach a client with a status and an error code."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class InvalidMessage(TempoError):
    status, code = 400, "invalid_message"


class InvalidRequest(TempoError):
    status, code = 400, "invalid_request"


class InvalidTopic(TempoError):
    status, code = 400, "invalid_topic"


class MsgIdConflict(TempoError):
    """A send with a message id already used in another topic: an id names one message, and
    a resend goes where its first send went. The message names that topic."""

    status, code = 409, "msg_id_conflict"


class TopicExists(TempoError):
    status, code = 409, "topic_exists"


class TopicNotFound(TempoError):
    status, code = 404, "topic_not_found"


class MessageTooLarge(TempoError):
    status, code = 413, "message_too_large"


class MessageNotFound(TempoError):
    status, code = 404, "message_not_found"


class QueueNotFound(TempoError):
    """A queue number the topic does not have."""

    status, code = 404, "queue_not_found"


class GroupNotFound(TempoError):
    status, code = 404, "group_not_found"


class GroupExists(TempoError):
    status, code = 409, "group_exists"


class InvalidGroup(TempoError):
    status, code = 400, "invalid_group"


class ReceiptExpired(TempoError):
    """A well-formed receipt whose delivery is over: acked, expired, or from an earlier run."""

    status, code = 409, "receipt_expired"


class ReceiptMismatch(TempoError):
    """A live receipt sent to another group or topic than the one it was received from."""

    status, code = 409, "receipt_mismatch"


class InvalidReceipt(TempoError):
    """Not a receipt at all: nothing receive could have handed out."""

    status, code = 400, "invalid_receipt"


class StoreUnavailable(TempoError):
    """The store cannot take writes (disk full, I/O error, shutting down)."""

    status, code = 503, "store_unavailable"


class ConsumeOnTarget(TempoError):
    """Receiving through tempomq while messages are kept in another broker (``--release-to``):
    consumers use that broker's own clients."""

    status, code = 409, "consume_on_target"
