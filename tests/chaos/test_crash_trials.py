"""kill -9 trials of a real server under load (``tests.chaos.trial``): in each, every
acknowledged message is there once, none early, none after its ack, attempts never go back,
and no DLQ holds a message twice. A short series here (``CHAOS_TRIALS``, 2 by default);
``make chaos`` runs a hundred."""

from __future__ import annotations

import asyncio

import pytest

from tests.chaos.runner import Series, run_series, seed_from_env, trials_from_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Series, str]:
    """One series for the module's checks; with the lines it printed, for the failure text."""
    trials, seed = trials_from_env(2), seed_from_env()
    lines = [f"CHAOS_TRIALS={trials} CHAOS_SEED={seed}"]
    done = asyncio.run(run_series(tmp_path_factory.mktemp("chaos"), trials, seed, lines.append))
    assert done.total.trials == trials
    assert done.total.acknowledged >= trials, "the load never got going"
    return done, "\n".join([*lines, done.total.table()])


def _broken(series: Series, names: set[str]) -> dict[int, dict[str, int]]:
    """seed -> the counts among ``names`` that a trial got wrong."""
    out = {}
    for seed, counts in series.failed.items():
        bad = {k: v for k, v in counts.items() if k in names}
        if bad:
            out[seed] = bad
    return out


def test_acknowledged_messages_are_kept_and_stored_once(series: tuple[Series, str]) -> None:
    done, text = series
    assert not _broken(done, {"lost", "duplicated"}), text


def test_deliveries_are_on_time_once_with_rising_attempts_and_no_dlq_duplicate(
    series: tuple[Series, str],
) -> None:
    done, text = series
    broken = {"early", "delivered_after_ack", "attempt_resets", "dlq_duplicates"}
    assert not _broken(done, broken), text
