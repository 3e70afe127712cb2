"""tempomq's Python SDK: a client over the HTTP API, a consumer, and a transactional producer
that ties messages to SQLAlchemy transactions. It speaks HTTP only and imports no server code.

See ``docs/sdk.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tempomq.client.client import Client
from tempomq.client.consumer import Consumer
from tempomq.client.errors import (
    AlreadyCancelled,
    AlreadyCommitted,
    AlreadyDelivered,
    AlreadyRolledBack,
    BadRequest,
    Conflict,
    ConnectionFailed,
    DelayStoreUnavailable,
    Forbidden,
    GroupExists,
    GroupNotFound,
    InvalidGroup,
    InvalidMessage,
    InvalidRequest,
    InvalidTopic,
    MessageNotFound,
    MessageTooLarge,
    MsgIdConflict,
    NotFound,
    NotReady,
    ReceiptExpired,
    RequestTimedOut,
    ServerError,
    StoreUnavailable,
    TempoClientError,
    TooLarge,
    TooManyRequests,
    TopicExists,
    TopicNotFound,
    TransactionNotFound,
    TransactionRolledBack,
    TransactionStoreUnavailable,
    Unauthenticated,
    Unavailable,
)
from tempomq.client.ids import new_msg_id
from tempomq.client.models import (
    CheckAnswer,
    CheckRequest,
    DelayedState,
    GroupStats,
    Message,
    OutgoingMessage,
    QueueStats,
    ReceivedMessage,
    SendResult,
    Topic,
    Transaction,
    TransactionStatus,
)
from tempomq.client.sync import SyncClient

if TYPE_CHECKING:
    from tempomq.client.barrier import Barrier
    from tempomq.client.transactions import TransactionalProducer

#: Imported on first use: they need SQLAlchemy, which plain clients (and the CLI) do not.
_LAZY = {
    "Barrier": "tempomq.client.barrier",
    "TransactionalProducer": "tempomq.client.transactions",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AlreadyCancelled",
    "AlreadyCommitted",
    "AlreadyDelivered",
    "AlreadyRolledBack",
    "BadRequest",
    "Barrier",
    "CheckAnswer",
    "CheckRequest",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Consumer",
    "DelayStoreUnavailable",
    "DelayedState",
    "Forbidden",
    "GroupExists",
    "GroupNotFound",
    "GroupStats",
    "InvalidGroup",
    "InvalidMessage",
    "InvalidRequest",
    "InvalidTopic",
    "Message",
    "MessageNotFound",
    "MessageTooLarge",
    "MsgIdConflict",
    "NotFound",
    "NotReady",
    "OutgoingMessage",
    "QueueStats",
    "ReceiptExpired",
    "ReceivedMessage",
    "RequestTimedOut",
    "SendResult",
    "ServerError",
    "StoreUnavailable",
    "SyncClient",
    "TempoClientError",
    "TooLarge",
    "TooManyRequests",
    "Topic",
    "TopicExists",
    "TopicNotFound",
    "Transaction",
    "TransactionNotFound",
    "TransactionRolledBack",
    "TransactionStatus",
    "TransactionStoreUnavailable",
    "TransactionalProducer",
    "Unauthenticated",
    "Unavailable",
    "new_msg_id",
]
