"""The fields each JSON request body may carry, and how whole numbers in them are read.

One statement of the input rules that every route applies and ``docs/openapi.yaml`` repeats (a
test holds the two together, schema by schema):

- a field the API does not know is refused, naming it and the closest known name (``"delay"`` is
  most likely a ``delay_ms`` that would otherwise be silently ignored);
- ``null`` is not a value: leave an optional field out instead;
- an integer may be written as a whole-number float (``1000.0``), as JSON Schema's ``integer``
  allows; ``1000.5`` and ``true`` are not integers;
- an integer out of range is refused with the range, so the limit is stated where it is hit.
"""

from __future__ import annotations

import difflib
from typing import Any

from broker_core.errors import InvalidRequest, TempoError

#: The ``components/schemas`` name in docs/openapi.yaml → the fields its body may carry.
REQUEST_FIELDS: dict[str, frozenset[str]] = {
    "MessageIn": frozenset(
        {
            "body",
            "body_b64",
            "tags",
            "keys",
            "properties",
            "sharding_key",
            "msg_id",
            "delay_ms",
            "deliver_at",
        }
    ),
    "MessageBatch": frozenset({"messages"}),
    "TopicCreate": frozenset({"name", "queues"}),
    "GroupCreate": frozenset({"name", "fifo", "max_attempts"}),
    "ReceiveRequest": frozenset({"max_messages", "wait_ms", "invisible_ms", "tags"}),
    "AckRequest": frozenset({"receipts"}),
    "NackRequest": frozenset({"receipt", "receipts", "retry_after_ms"}),
    "ResetRequest": frozenset({"timestamp"}),
    "ChangeInvisibleRequest": frozenset({"receipt", "invisible_ms"}),
    "DelayedPatch": frozenset({"deliver_at", "delay_ms"}),
    "TransactionCreate": frozenset(
        {"topic", "message", "producer_group", "check_url", "check_immunity_ms"}
    ),
    "CheckAnswer": frozenset({"state"}),
}


def check_fields(
    obj: dict[str, Any], schema: str, error: type[TempoError] = InvalidRequest
) -> None:
    """Raise ``error`` naming the first field of ``obj`` that ``schema`` does not have."""
    known = REQUEST_FIELDS[schema]
    if known.issuperset(obj) and None not in obj.values():
        return  # the usual case, in one pass over the names and one over the values
    nulls = sorted(name for name, value in obj.items() if value is None and name in known)
    if nulls:
        raise error(f"{nulls[0]!r} is null: leave an optional field out instead")
    unknown = sorted(name for name in obj if name not in known)
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise error(f"unknown field {name!r}{hint} (known fields: {', '.join(sorted(known))})")


def int_field(
    obj: dict[str, Any],
    name: str,
    *,
    default: int | None,
    lo: int,
    hi: int,
    error: type[TempoError] = InvalidRequest,
) -> int | None:
    """Field ``name`` of ``obj`` as an int from ``lo`` to ``hi``; ``default`` when absent."""
    if name not in obj:
        return default
    return as_int(obj[name], name, lo=lo, hi=hi, error=error)


def as_int(
    value: object, name: str, *, lo: int, hi: int, error: type[TempoError] = InvalidRequest
) -> int:
    """``value`` as an int from ``lo`` to ``hi`` (a whole-number float counts), else ``error``
    stating the range."""
    number = whole_number(value)
    if number is None:
        shown = "null" if value is None else type(value).__name__
        raise error(f"{name!r} must be an integer from {lo} to {hi}, not {shown}")
    if not lo <= number <= hi:
        # A float as the float it is: its integer digits are not what the client wrote.
        shown = repr(value) if isinstance(value, float) else str(number)
        raise error(f"{name!r} must be an integer from {lo} to {hi}, got {shown}")
    return number


def whole_number(value: object) -> int | None:
    """``value`` as an int when it is one (``1000`` or ``1000.0``), else None."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
