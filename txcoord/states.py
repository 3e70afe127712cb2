"""The transaction state machine. Pure: a table, no IO.

Theory of operation. A transaction starts ``prepared`` (its half message stored, invisible).
Two rules:

1. The first outcome wins and is final: ``commit`` → ``committed``, ``rollback`` →
   ``rolled_back``. Repeating the same outcome answers the same (idempotent); the other outcome
   is refused (the API's 409).
2. A check-back that learns nothing (``unknown``, an error, a timeout) only counts: after
   ``check_max`` of them the transaction is parked as ``check_max``, which still accepts an
   outcome by hand.

``deliver`` is the effect of reaching ``committed`` from an open state: make the message visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from broker_core.errors import TempoError


class TxState(StrEnum):
    PREPARED = "prepared"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    CHECK_MAX = "check_max"


class TxEvent(StrEnum):
    COMMIT = "commit"
    ROLLBACK = "rollback"
    UNKNOWN = "unknown"


OPEN = frozenset({TxState.PREPARED, TxState.CHECK_MAX})


class AlreadyCommitted(TempoError):
    status, code = 409, "already_committed"


class AlreadyRolledBack(TempoError):
    status, code = 409, "already_rolled_back"


@dataclass(slots=True, frozen=True)
class Step:
    state: TxState
    check_count: int
    #: The message must now be made visible (first time committed).
    deliver: bool = False
    #: Another check-back is due (after check_interval_ms).
    check_again: bool = False


def step(state: TxState, event: TxEvent, *, check_count: int, check_max: int) -> Step:
    """Where ``event`` takes a transaction in ``state``; raises the 409 errors of rule 1."""
    if event is TxEvent.COMMIT:
        if state is TxState.ROLLED_BACK:
            raise AlreadyRolledBack("the transaction was rolled back")
        return Step(TxState.COMMITTED, check_count, deliver=state in OPEN)
    if event is TxEvent.ROLLBACK:
        if state is TxState.COMMITTED:
            raise AlreadyCommitted("the transaction was committed")
        return Step(TxState.ROLLED_BACK, check_count)
    # UNKNOWN: only an open, still-checked transaction counts it.
    if state is not TxState.PREPARED:
        return Step(state, check_count)
    count = check_count + 1
    if count >= check_max:
        return Step(TxState.CHECK_MAX, count)
    return Step(TxState.PREPARED, count, check_again=True)
