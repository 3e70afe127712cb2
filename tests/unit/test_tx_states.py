"""The transaction state machine, as a table. Pure: no IO, no event loop."""

from __future__ import annotations

import pytest

from txcoord.states import (
    AlreadyCommitted,
    AlreadyRolledBack,
    Step,
    TxEvent,
    TxState,
    step,
)

P, C, R, M = TxState.PREPARED, TxState.COMMITTED, TxState.ROLLED_BACK, TxState.CHECK_MAX


@pytest.mark.parametrize(
    ("state", "event", "count", "expected"),
    [
        (P, TxEvent.COMMIT, 0, Step(C, 0, deliver=True)),
        (P, TxEvent.ROLLBACK, 2, Step(R, 2)),
        (M, TxEvent.COMMIT, 15, Step(C, 15, deliver=True)),  # parked, resolved by hand
        (M, TxEvent.ROLLBACK, 15, Step(R, 15)),
        (C, TxEvent.COMMIT, 1, Step(C, 1)),  # idempotent, delivers nothing again
        (R, TxEvent.ROLLBACK, 1, Step(R, 1)),
        (P, TxEvent.UNKNOWN, 0, Step(P, 1, check_again=True)),
        (P, TxEvent.UNKNOWN, 13, Step(P, 14, check_again=True)),
        (P, TxEvent.UNKNOWN, 14, Step(M, 15)),  # the 15th unknown parks it
        (M, TxEvent.UNKNOWN, 15, Step(M, 15)),
        (C, TxEvent.UNKNOWN, 3, Step(C, 3)),  # a late answer changes nothing
        (R, TxEvent.UNKNOWN, 3, Step(R, 3)),
    ],
)
def test_transitions(state: TxState, event: TxEvent, count: int, expected: Step) -> None:
    assert step(state, event, check_count=count, check_max=15) == expected


def test_the_other_outcome_is_refused() -> None:
    with pytest.raises(AlreadyRolledBack):
        step(R, TxEvent.COMMIT, check_count=0, check_max=15)
    with pytest.raises(AlreadyCommitted):
        step(C, TxEvent.ROLLBACK, check_count=0, check_max=15)


def test_errors_carry_the_api_codes() -> None:
    assert (AlreadyRolledBack.status, AlreadyRolledBack.code) == (409, "already_rolled_back")
    assert (AlreadyCommitted.status, AlreadyCommitted.code) == (409, "already_committed")


def test_check_max_of_one_parks_on_the_first_unknown() -> None:
    assert step(P, TxEvent.UNKNOWN, check_count=0, check_max=1) == Step(M, 1)
