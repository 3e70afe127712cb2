"""Redelivery policy: what happens to a delivery that was nacked or timed out. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from broker_core.message import (
    DLQ_PREFIX,
    PROP_DELIVERY_ATTEMPT,
    PROP_DLQ_ORIGIN_TOPIC,
    PROP_ORIGIN_MSG_ID,
    PROP_RETRY_TOPIC,
    RETRY_PREFIX,
    Message,
    StoredMessage,
)


@dataclass(slots=True, frozen=True)
class Redelivery:
    """Put ``message`` into its topic at ``deliver_at_ms``; ``dead`` when it is a dead letter."""

    message: Message
    deliver_at_ms: int
    dead: bool


def retry_topic(group: str, topic: str) -> str:
    """Per group and topic, so a receive on one topic never sees another topic's retries."""
    return f"{RETRY_PREFIX}{group}+{topic}"


def retry_of(name: str) -> tuple[str, str] | None:
    """(group, topic) of a retry topic's name, or None for any other name. Group names hold
    no ``+``, so the first one separates them."""
    if not name.startswith(RETRY_PREFIX) or "+" not in name:
        return None
    group, _, topic = name[len(RETRY_PREFIX) :].partition("+")
    return group, topic


def dlq_topic(group: str) -> str:
    return f"{DLQ_PREFIX}{group}"


def backoff_ms(schedule: tuple[int, ...], attempt: int) -> int:
    """Wait before the redelivery that follows failed delivery ``attempt`` (1-based)."""
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    return schedule[min(attempt, len(schedule)) - 1]


def delivery_attempt(msg: StoredMessage) -> int:
    return msg.reconsume_count + 1


def real_topic(msg: StoredMessage) -> str:
    return msg.properties.get(PROP_RETRY_TOPIC) or msg.topic


def plan_redelivery(
    msg: StoredMessage,
    *,
    group: str,
    attempt: int,
    max_attempts: int,
    schedule: tuple[int, ...],
    now_ms: int,
    retry_after_ms: int | None = None,
) -> Redelivery:
    """The copy to store for failed delivery ``attempt`` of ``msg``: a retry after the backoff
    (or ``retry_after_ms``), or after ``max_attempts`` failures a dead letter."""
    props = dict(msg.properties)
    props[PROP_ORIGIN_MSG_ID] = msg.origin_msg_id
    origin_topic = real_topic(msg)
    if attempt >= max_attempts:
        props.pop(PROP_RETRY_TOPIC, None)
        props[PROP_DLQ_ORIGIN_TOPIC] = origin_topic
        props[PROP_DELIVERY_ATTEMPT] = str(attempt)
        topic, deliver_at, dead = dlq_topic(group), now_ms, True
    else:
        props[PROP_RETRY_TOPIC] = origin_topic
        wait = backoff_ms(schedule, attempt) if retry_after_ms is None else retry_after_ms
        topic, deliver_at, dead = retry_topic(group, origin_topic), now_ms + max(wait, 0), False
    copy = Message(
        topic=topic,
        body=msg.body,
        tags=msg.tags,
        keys=msg.keys,
        properties=props,
        flags=msg.flags,
        queue_id=0,
        born_at=msg.born_at,
        # A dead letter starts over: the group that reads %DLQ% counts its own deliveries
        # (this group's count stays in DELIVERY_ATTEMPT).
        reconsume_count=0 if dead else attempt,
    )
    return Redelivery(copy, deliver_at, dead)
