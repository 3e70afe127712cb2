"""What the first entries of a new ConsumeQueue file cost: a new queue (a new topic's, or a queue
rolling to its next file) is a sparse file of ``cq_entries_per_file`` entries, mapped and
written through the mapping on the event loop.

Per run, a fresh queue with the default 300,000 entries per file takes ``--entries`` entries,
one at a time as the store puts them (``preallocate`` then ``put``); printed: the time of the
first entry (the file is created, allocated and first written), of the slowest entry after it,
of all of them, and how many pages of the file the page cache then holds (``mincore``). With
``--read-ahead`` the mapping keeps the kernel's default advice, as before the queue asked for
``MADV_RANDOM``: each first write to a page then read ahead (zeroed) a large run of the file.

Prints the median of ``--runs`` runs with [min-max] and one JSON line::

    python bench/cq_first_write.py [--runs 5] [--entries 5000] [--read-ahead]
"""

from __future__ import annotations

import argparse
import json
import mmap
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' page-cache probe

import broker_core.consumequeue as consumequeue
from broker_core.config import BrokerConfig
from tests.unit.test_consumequeue import _resident_pages


def one_run(entries: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="tempomq-bench-"))
    per_file = BrokerConfig().cq_entries_per_file
    cq = consumequeue.ConsumeQueue(root / "t" / "0", "t", 0, per_file=per_file)
    cq.load()
    times = []
    try:
        for i in range(entries):
            t0 = time.perf_counter()
            cq.preallocate(i)
            cq.put(i, i * 100, 100, 0)
            times.append((time.perf_counter() - t0) * 1e6)
        pages = _resident_pages(cq._files[0][1], per_file * consumequeue.ENTRY_SIZE)
    finally:
        cq.close()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "first_us": times[0],
        "slowest_after_us": max(times[1:]) if len(times) > 1 else 0.0,
        "total_ms": sum(times) / 1000,
        "pages": pages,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--entries", type=int, default=5000)
    p.add_argument("--read-ahead", action="store_true", help="the kernel's default advice")
    args = p.parse_args()
    if args.read_ahead:
        consumequeue._MADV_RANDOM = None  # the queue maps its files without advice
    runs = [one_run(args.entries) for _ in range(args.runs)]
    advice = "default read-ahead" if args.read_ahead else "MADV_RANDOM"
    print(f"{args.runs} runs of {args.entries} entries into a new queue file ({advice})")
    print("median [min-max]")
    for key, unit in (
        ("first_us", "us"),
        ("slowest_after_us", "us"),
        ("total_ms", "ms"),
        ("pages", "pages in cache"),
    ):
        values = [r[key] for r in runs]
        print(
            f"{key:18} {statistics.median(values):10,.0f} {unit} "
            f"[{min(values):,.0f}-{max(values):,.0f}]"
        )
    out = {"bench": "cq_first_write", "advice": advice, "page_bytes": mmap.PAGESIZE, "runs": runs}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
