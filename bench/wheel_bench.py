"""Timing wheel throughput and memory at 10 k, 1 M and 10 M pending, against a heapq baseline.

Run: ``python bench/wheel_bench.py [--max-pending 10000000] [--ops 100000] [--gc freeze]``.

Both structures get the same work, from the same random numbers, in the same run:

- **setup** (untimed): ``P`` pending timers, expirations uniform over the 10-minute window after
  ``T0``; payloads are one shared object so that only the timer machinery is counted.
- **insert** and **cancel**: rounds of ``B`` = min(1 000, P/10) ops until ``--ops`` ops. Each round
  inserts ``B`` timers with random expirations in the window, then cancels ``B`` timers picked
  uniformly from all pending ones, through their handles, so pending stays at ``P``. The victims
  are picked as list positions beforehand and reached only inside the timed loop, so their memory
  is as cold as a real cancel's.
- **expire**: release ``N`` = min(``--ops``, P/20) timers by driving the structure the way
  TimerService drives it when idle: wake at the next expiration (``next_expiration_ms()``; for the
  heap, its earliest entry), release what is due, again, until ``N`` came out. For the wheel that
  pays one wake-up per non-empty bucket and the cascades of coarser buckets on the way down.
- **expire burst**: then release about the next ``N`` with a single advance across the part of the
  window holding them (a driver that was held up, or many timers due at once).
- **bytes/entry**: tracemalloc's traced memory grown by a setup of min(P, 1 M) timers, divided by
  their number: the entry, its own expiration int and its share of buckets and heap (the bench's
  handle list is not counted). Measured apart from the timed runs, which tracing would slow.

The heap baseline is what asyncio does: a list of ``(when_ms, seq, handle)`` tuples under heapq,
cancel marks the handle and leaves it in the heap (lazy deletion), the heap is compacted when more
than half of it is cancelled, and releasing pops and skips cancelled handles.

The cyclic garbage collector matters as much as the structures at millions of timers: a full
collection walks every tracked object, and both a wheel entry and a heap tuple are tracked. With
``--gc freeze`` (the default) the population is collected and frozen (``gc.freeze()``) before each
phase, as a service holding millions of long-lived timers should do after loading them (wheel
entries are freed by reference counting, never by the collector, so freezing them leaks nothing);
the collector otherwise runs at its defaults during the timed sections. ``--gc default`` never
freezes, so a full collection over all P timers lands in whichever phase reaches the threshold;
``--gc off`` disables the collector while timing.

Times are CPU time (``time.process_time``), so that time given to other processes on a shared
machine does not count. Each figure is the best of three repetitions (timeit's rule: interference
only ever slows a run down). The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import os
import platform
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol, TypeVar

from delayserver.wheel import TimingWheel

WINDOW_MS = 10 * 60 * 1000
T0_MS = 1_700_000_000_000
ROUND_OPS = 1000
REPEATS = 3
PAYLOAD = None

T = TypeVar("T")


class Handle(Protocol):
    def cancel(self) -> None: ...


class Subject(Protocol):
    """One timer structure under test; each method is a tight loop the harness times."""

    name: str

    def insert_many(self, whens_ms: list[int]) -> Sequence[Handle]: ...

    def expire_paced(self, count: int) -> int: ...

    def expire_until(self, now_ms: int) -> int: ...

    def now_ms(self) -> int: ...

    def __len__(self) -> int: ...


class WheelSubject:
    name = "wheel"

    def __init__(self) -> None:
        self.wheel = TimingWheel(start_ms=T0_MS)

    def __len__(self) -> int:
        return len(self.wheel)

    def insert_many(self, whens_ms: list[int]) -> Sequence[Handle]:
        add = self.wheel.add
        return [add(when_ms, PAYLOAD) for when_ms in whens_ms]

    def now_ms(self) -> int:
        return self.wheel.current_ms

    def expire_paced(self, count: int) -> int:
        next_expiration_ms = self.wheel.next_expiration_ms
        advance = self.wheel.advance
        released = 0
        while released < count:
            next_ms = next_expiration_ms()
            if next_ms is None:
                break
            released += len(advance(next_ms))
        return released

    def expire_until(self, now_ms: int) -> int:
        return len(self.wheel.advance(now_ms))


class HeapTimer:
    """The baseline's handle, like asyncio.TimerHandle minus the callback machinery."""

    __slots__ = ("cancelled", "heap")

    def __init__(self, heap: HeapSubject) -> None:
        self.cancelled = False
        self.heap = heap

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.heap.cancelled_count += 1
            self.heap.compact_if_needed()


class HeapSubject:
    name = "heapq"

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, HeapTimer]] = []
        self.seq = itertools.count()
        self.cancelled_count = 0
        self.last_ms = T0_MS

    def __len__(self) -> int:
        return len(self.heap) - self.cancelled_count

    def compact_if_needed(self) -> None:
        # asyncio's rule (BaseEventLoop._run_once): rebuild once cancelled handles are the majority.
        if self.cancelled_count > 100 and self.cancelled_count * 2 > len(self.heap):
            self.heap = [item for item in self.heap if not item[2].cancelled]
            heapq.heapify(self.heap)
            self.cancelled_count = 0

    def insert_many(self, whens_ms: list[int]) -> Sequence[Handle]:
        heap = self.heap
        push = heapq.heappush
        seq = self.seq
        handles: list[Handle] = []
        append = handles.append
        for when_ms in whens_ms:
            handle = HeapTimer(self)
            push(heap, (when_ms, next(seq), handle))
            append(handle)
        return handles

    def now_ms(self) -> int:
        return self.last_ms

    def _pop_until(self, now_ms: int) -> int:
        heap = self.heap
        pop = heapq.heappop
        released = 0
        while heap and heap[0][0] <= now_ms:
            handle = pop(heap)[2]
            if handle.cancelled:
                self.cancelled_count -= 1
            else:
                released += 1
        return released

    def expire_paced(self, count: int) -> int:
        released = 0
        while released < count and self.heap:
            self.last_ms = self.heap[0][0]
            released += self._pop_until(self.last_ms)
        return released

    def expire_until(self, now_ms: int) -> int:
        self.last_ms = max(self.last_ms, now_ms)
        return self._pop_until(now_ms)


def timed(run: Callable[[], T]) -> tuple[float, T]:
    started_s = time.process_time()
    result = run()
    return time.process_time() - started_s, result


def timed_without_gc(run: Callable[[], T]) -> tuple[float, T]:
    gc.disable()
    try:
        return timed(run)
    finally:
        gc.enable()


def cancel_at(handles: list[Handle], positions: list[int]) -> None:
    for position in positions:
        handles[position].cancel()


def bytes_per_entry(make: Callable[[], Subject], count: int, seed: int) -> float:
    rnd = random.Random(seed)
    offsets_ms = [rnd.randrange(1, WINDOW_MS) for _ in range(count)]
    gc.collect()
    tracemalloc.start()
    before_bytes = tracemalloc.get_traced_memory()[0]
    subject = make()
    handles = subject.insert_many([T0_MS + offset_ms for offset_ms in offsets_ms])
    # The handle list is the bench's, not the structure's.
    grown_bytes = tracemalloc.get_traced_memory()[0] - before_bytes - sys.getsizeof(handles)
    tracemalloc.stop()
    del subject, handles
    gc.collect()
    return grown_bytes / count


def settle(gc_mode: str) -> None:
    """Before a timed phase: collect, and in freeze mode take the survivors off the collector."""
    gc.collect()
    if gc_mode == "freeze":
        gc.freeze()


def run_subject(
    make: Callable[[], Subject], pending: int, ops: int, seed: int, gc_mode: str
) -> dict[str, float]:
    rnd = random.Random(seed)
    subject = make()
    handles = list(
        subject.insert_many([T0_MS + rnd.randrange(1, WINDOW_MS) for _ in range(pending)])
    )
    settle(gc_mode)
    measure = timed_without_gc if gc_mode == "off" else timed
    round_ops = min(ROUND_OPS, max(1, pending // 10))
    rounds = max(1, ops // round_ops)
    insert_s = [0.0] * REPEATS
    cancel_s = [0.0] * REPEATS
    for repeat in range(REPEATS):
        for _ in range(rounds):
            whens_ms = [T0_MS + rnd.randrange(1, WINDOW_MS) for _ in range(round_ops)]
            seconds, new = measure(partial(subject.insert_many, whens_ms))
            insert_s[repeat] += seconds
            handles.extend(new)
            positions = rnd.sample(range(len(handles)), round_ops)
            seconds, _ = measure(partial(cancel_at, handles, positions))
            cancel_s[repeat] += seconds
            for position in sorted(positions, reverse=True):
                handles[position] = handles[-1]
                handles.pop()
    assert len(subject) == pending, (subject.name, len(subject), pending)
    round_total = rounds * round_ops

    expire_count = max(1, min(ops, pending // 20))
    expire_rates: list[float] = []
    burst_rates: list[float] = []
    for _ in range(REPEATS):
        settle(gc_mode)
        seconds, released = measure(partial(subject.expire_paced, expire_count))
        expire_rates.append(released / seconds)
        # Pending timers are spread evenly over the window, so about expire_count lie this far on.
        until_ms = subject.now_ms() + WINDOW_MS * expire_count // pending
        seconds, released = measure(partial(subject.expire_until, until_ms))
        burst_rates.append(released / seconds)
    del subject, handles
    gc.unfreeze()
    gc.collect()
    return {
        "insert_ops_s": round_total / min(insert_s),
        "cancel_ops_s": round_total / min(cancel_s),
        "expire_ops_s": max(expire_rates),
        "expire_burst_ops_s": max(burst_rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-pending", type=int, default=10_000_000)
    parser.add_argument("--ops", type=int, default=100_000, help="ops per figure")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gc", choices=["freeze", "default", "off"], default="freeze")
    args = parser.parse_args()

    sizes = [size for size in (10_000, 1_000_000, 10_000_000) if size <= args.max_pending]
    subjects: dict[str, Callable[[], Subject]] = {"wheel": WheelSubject, "heapq": HeapSubject}
    figures: dict[str, dict[str, dict[str, float]]] = {}
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, CPU-time ops/s "
        f"(best of {REPEATS}), gc {args.gc}, {args.ops:,} ops per figure"
    )
    header = f"{'pending':>10}  {'op':<13}{'wheel':>13}{'heapq':>13}{'wheel/heapq':>13}"
    print(header)
    print("-" * len(header))
    for pending in sizes:
        row = {
            name: run_subject(make, pending, args.ops, args.seed, args.gc)
            for name, make in subjects.items()
        }
        figures[str(pending)] = row
        for key, label in (
            ("insert_ops_s", "insert"),
            ("cancel_ops_s", "cancel"),
            ("expire_ops_s", "expire"),
            ("expire_burst_ops_s", "expire burst"),
        ):
            wheel, heap = row["wheel"][key], row["heapq"][key]
            print(f"{pending:>10,}  {label:<13}{wheel:>13,.0f}{heap:>13,.0f}{wheel / heap:>13.2f}")
        sys.stdout.flush()

    memory_count = min(sizes[-1], 1_000_000)
    memory = {
        name: bytes_per_entry(make, memory_count, args.seed) for name, make in subjects.items()
    }
    print(
        f"{memory_count:>10,}  {'bytes/entry':<13}{memory['wheel']:>13,.0f}"
        f"{memory['heapq']:>13,.0f}{memory['wheel'] / memory['heapq']:>13.2f}"
    )

    smallest, largest = str(sizes[0]), str(sizes[-1])
    slowdown = {
        key: figures[smallest]["wheel"][key] / figures[largest]["wheel"][key]
        for key in ("insert_ops_s", "cancel_ops_s", "expire_ops_s", "expire_burst_ops_s")
    }
    print(
        f"wheel slowdown {int(largest):,} vs {int(smallest):,} pending (bar: <= 1.3): "
        + ", ".join(f"{key.removesuffix('_ops_s')} {value:.2f}x" for key, value in slowdown.items())
    )
    print(
        json.dumps(
            {
                "bench": "wheel",
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "ops_per_figure": args.ops,
                "gc": args.gc,
                "window_ms": WINDOW_MS,
                "figures": figures,
                "bytes_per_entry": memory,
                "bytes_measured_at_pending": memory_count,
                "wheel_slowdown_largest_vs_smallest": slowdown,
            },
            separators=(",", ":"),
        )
    )


if __name__ == "__main__":
    main()
