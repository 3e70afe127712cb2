"""Run a series of crash trials and add up their counts; shared by the test and ``make chaos``.

``CHAOS_TRIALS`` sets how many trials (the test suite's default is short), ``CHAOS_SEED`` the
seed of the first (the next ones count up from it; random when unset): a failing series is
re-run exactly, kill moments aside, with the seed it printed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.ledger import Counts, explain, judge
from tests.chaos.trial import Plan, run_trial


def trials_from_env(default: int) -> int:
    return int(os.environ.get("CHAOS_TRIALS") or default)


def seed_from_env() -> int:
    given = os.environ.get("CHAOS_SEED")
    return int(given) if given else random.randrange(2**31)


@dataclass(slots=True)
class Series:
    total: Counts = field(default_factory=Counts)
    #: seed -> the failing counts of each trial that broke a promise.
    failed: dict[int, dict[str, int]] = field(default_factory=dict)


async def run_series(
    root: Path, trials: int, first_seed: int, report: Callable[[str], None] = print
) -> Series:
    series = Series()
    for i in range(trials):
        seed = first_seed + i
        ledger = await run_trial(root / f"trial-{seed}" / "data", Plan(seed=seed))
        counts = judge(ledger)
        series.total += counts
        bad = counts.failures()
        if bad:
            series.failed[seed] = bad
        outcome = bad or "ok"
        report(f"trial {i + 1}/{trials} seed {seed}: {counts.acknowledged} acknowledged, {outcome}")
        for line in explain(ledger) if bad else []:
            report(f"    {line}")
    return series
