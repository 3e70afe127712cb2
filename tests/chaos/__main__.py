"""``python -m tests.chaos`` (``make chaos``): run ``CHAOS_TRIALS`` crash trials (100 unless set)
and print the counts as a table; exit 1 when any trial broke a promise."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from tests.chaos.runner import run_series, seed_from_env, trials_from_env


def main() -> int:
    trials, seed = trials_from_env(100), seed_from_env()
    print(f"{trials} kill -9 trials from seed {seed} (CHAOS_SEED={seed} repeats them)", flush=True)
    with tempfile.TemporaryDirectory(prefix="tempomq-chaos-") as root:
        series = asyncio.run(
            run_series(Path(root), trials, seed, lambda line: print(line, flush=True))
        )
    print()
    print(series.total.table())
    for failed_seed, counts in series.failed.items():
        print(f"seed {failed_seed}: {counts}")
    return 1 if series.failed else 0


if __name__ == "__main__":
    sys.exit(main())
