"""Redelivery policy (pure): the backoff schedule, retry copies and dead letters."""

from __future__ import annotations

import pytest

from broker_core import codec
from broker_core.config import DEFAULT_BACKOFF_MS
from broker_core.message import (
    FLAG_BODY_B64,
    PROP_DELIVERY_ATTEMPT,
    PROP_DLQ_ORIGIN_TOPIC,
    PROP_ORIGIN_MSG_ID,
    PROP_RETRY_TOPIC,
    Message,
    MsgIdGenerator,
    StoredMessage,
)
from broker_core.retry import (
    backoff_ms,
    delivery_attempt,
    dlq_topic,
    plan_redelivery,
    real_topic,
    retry_topic,
)

NOW = 1_735_689_600_000
S, M, H = 1000, 60_000, 3_600_000


def stored(m: Message, queue_offset: int = 0, phy: int = 0) -> StoredMessage:
    """``m`` as the store would read it back."""
    if not m.msg_id:
        m.msg_id = MsgIdGenerator().next(NOW)
    return codec.decode(codec.encode(m, queue_offset, phy, NOW))


def original() -> StoredMessage:
    return stored(
        Message(
            topic="orders",
            body=b"\x00\x01payload",
            tags="created",
            keys=("order-17", "user-3"),
            properties={"trace": "abc"},
            flags=FLAG_BODY_B64,
            queue_id=5,
            born_at=NOW - 1000,
        )
    )


def fail(msg: StoredMessage, attempt: int, max_attempts: int = 16, **kw: object):  # type: ignore[no-untyped-def]
    return plan_redelivery(
        msg,
        group="billing",
        attempt=attempt,
        max_attempts=max_attempts,
        schedule=DEFAULT_BACKOFF_MS,
        now_ms=NOW,
        **kw,  # type: ignore[arg-type]
    )


# -- backoff -------------------------------------------------------------------------------------


def test_default_schedule_is_the_designed_one() -> None:
    assert DEFAULT_BACKOFF_MS == (
        10 * S, 30 * S, 1 * M, 2 * M, 3 * M, 4 * M, 5 * M, 6 * M,
        7 * M, 8 * M, 9 * M, 10 * M, 20 * M, 30 * M, 1 * H, 2 * H,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("attempt", "wait"),
    [(1, 10 * S), (2, 30 * S), (3, 1 * M), (4, 2 * M), (12, 10 * M), (13, 20 * M), (14, 30 * M),
     (15, 1 * H), (16, 2 * H)],
)  # fmt: skip
def test_backoff_follows_the_schedule(attempt: int, wait: int) -> None:
    assert backoff_ms(DEFAULT_BACKOFF_MS, attempt) == wait


@pytest.mark.parametrize("attempt", [17, 18, 100, 10_000])
def test_backoff_clamps_past_the_end(attempt: int) -> None:
    assert backoff_ms(DEFAULT_BACKOFF_MS, attempt) == 2 * H
    assert backoff_ms((5, 7), attempt) == 7


@pytest.mark.parametrize("attempt", [0, -1])
def test_backoff_attempts_start_at_one(attempt: int) -> None:
    with pytest.raises(ValueError):
        backoff_ms(DEFAULT_BACKOFF_MS, attempt)


def test_names() -> None:
    assert retry_topic("billing", "orders") == "%RETRY%billing+orders"
    assert dlq_topic("billing") == "%DLQ%billing"


# -- retries -------------------------------------------------------------------------------------


def test_first_failure_becomes_a_retry_copy_after_10_s() -> None:
    msg = original()
    plan = fail(msg, attempt=1)
    copy = plan.message
    assert plan.dead is False
    assert plan.deliver_at_ms == NOW + 10 * S
    assert copy.topic == "%RETRY%billing+orders"
    assert copy.queue_id == 0
    assert copy.reconsume_count == 1
    assert copy.msg_id == b""  # the store gives the copy its own record id
    assert copy.properties[PROP_ORIGIN_MSG_ID] == msg.msg_id.hex()
    assert copy.properties[PROP_RETRY_TOPIC] == "orders"
    assert copy.properties["trace"] == "abc"
    # Everything the consumer sees is the original's.
    assert (copy.body, copy.tags, copy.keys, copy.flags, copy.born_at) == (
        msg.body,
        msg.tags,
        msg.keys,
        msg.flags,
        msg.born_at,
    )
    # The plan never mutates what it was given.
    assert PROP_ORIGIN_MSG_ID not in msg.properties


def test_retry_after_ms_overrides_the_backoff() -> None:
    plan = fail(original(), attempt=3, retry_after_ms=5000)
    assert plan.deliver_at_ms == NOW + 5000
    assert plan.dead is False
    assert fail(original(), attempt=1, retry_after_ms=0).deliver_at_ms == NOW
    assert fail(original(), attempt=1, retry_after_ms=-5).deliver_at_ms == NOW


def test_retry_of_a_retry_keeps_the_first_id_and_real_topic() -> None:
    msg = original()
    first_id = msg.msg_id.hex()
    current = msg
    for attempt in range(1, 6):
        plan = fail(current, attempt=attempt)
        assert plan.dead is False
        assert plan.message.topic == "%RETRY%billing+orders"  # never "%RETRY%billing+%RETRY%..."
        assert plan.message.reconsume_count == attempt
        assert plan.message.properties[PROP_ORIGIN_MSG_ID] == first_id
        assert plan.message.properties[PROP_RETRY_TOPIC] == "orders"
        assert plan.deliver_at_ms == NOW + backoff_ms(DEFAULT_BACKOFF_MS, attempt)
        current = stored(plan.message)  # the store gives the copy a new record id
        assert current.msg_id.hex() != first_id
        assert current.origin_msg_id == first_id
        assert real_topic(current) == "orders"
        assert delivery_attempt(current) == attempt + 1


def test_delivery_attempt_and_real_topic_of_an_original() -> None:
    msg = original()
    assert delivery_attempt(msg) == 1
    assert real_topic(msg) == "orders"
    assert msg.origin_msg_id == msg.msg_id.hex()


# -- dead letters --------------------------------------------------------------------------------


def test_failure_at_max_attempts_is_a_dead_letter() -> None:
    msg = original()
    plan = fail(msg, attempt=16, max_attempts=16)
    assert plan.dead is True
    assert plan.deliver_at_ms == NOW
    copy = plan.message
    assert copy.topic == "%DLQ%billing"
    assert copy.properties[PROP_DLQ_ORIGIN_TOPIC] == "orders"
    assert copy.properties[PROP_ORIGIN_MSG_ID] == msg.msg_id.hex()
    assert copy.properties[PROP_DELIVERY_ATTEMPT] == "16"
    assert PROP_RETRY_TOPIC not in copy.properties
    assert copy.body == msg.body


def test_one_before_max_attempts_is_still_a_retry() -> None:
    plan = fail(original(), attempt=15, max_attempts=16)
    assert plan.dead is False
    assert plan.deliver_at_ms == NOW + 1 * H


def test_dead_letter_of_a_retry_copy_names_the_real_topic_and_first_id() -> None:
    msg = original()
    current = msg
    for attempt in (1, 2):
        current = stored(fail(current, attempt=attempt, max_attempts=3).message)
    plan = fail(current, attempt=3, max_attempts=3)
    assert plan.dead is True
    assert plan.message.topic == "%DLQ%billing"
    assert plan.message.properties[PROP_DLQ_ORIGIN_TOPIC] == "orders"
    assert plan.message.properties[PROP_ORIGIN_MSG_ID] == msg.msg_id.hex()
    assert PROP_RETRY_TOPIC not in plan.message.properties


def test_retry_after_ms_does_not_postpone_a_dead_letter() -> None:
    plan = fail(original(), attempt=1, max_attempts=1, retry_after_ms=60_000)
    assert plan.dead is True
    assert plan.deliver_at_ms == NOW


def test_custom_schedule() -> None:
    plan = plan_redelivery(
        original(),
        group="g",
        attempt=4,
        max_attempts=10,
        schedule=(100, 200),
        now_ms=NOW,
    )
    assert plan.deliver_at_ms == NOW + 200
    assert plan.message.topic == "%RETRY%g+orders"
