"""kill -9 trials of a real server under load (``tests.chaos.trial``): in each, every
acknowledged message is there once, none early, none after its ack, attempts never go back,
and no DLQ holds a message twice. A short series here; ``make chaos`` runs a hundred."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.runner import run_series, seed_from_env, trials_from_env

pytestmark = pytest.mark.e2e


@pytest.mark.xfail(
    reason="a retry copy released before a crash can come back next to a new one after the "
    "restart: the same attempt twice and two copies in %DLQ%<group> (issue 9, fault 7)",
    strict=False,
)
async def test_kill_9_trials_keep_every_promise(tmp_path: Path) -> None:
    trials, seed = trials_from_env(2), seed_from_env()
    lines: list[str] = []
    series = await run_series(tmp_path, trials, seed, lines.append)
    assert series.total.trials == trials
    assert series.total.acknowledged >= trials, "the load never got going"
    assert not series.failed, (
        f"CHAOS_SEED={seed}\n" + "\n".join(lines) + "\n" + series.total.table()
    )
