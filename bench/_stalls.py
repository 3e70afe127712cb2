"""Bench helper: count the stalls of an event loop while a benchmark runs.

Two probes, both load-independent guides next to wall-clock lateness figures:

- loop lag: a callback armed every millisecond records how late it ran (a lag above 5 ms means
  something held the loop that long: a long callback, a collection, a load, or the machine
  giving the core to another process), and how much CPU the loop's thread used meanwhile (a
  CPU-busy stall is the process's own work, whatever the load of the machine);
- gc pauses: ``gc.callbacks`` times each collection of the cyclic collector, per generation.

    probe = StallProbe(); probe.start()  # on the running loop
    ...
    summary = probe.stop()               # {"loop_lag_max_ms": ..., "stalls_over_5ms": ..., ...}
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any


class StallProbe:
    def __init__(self, every_s: float = 0.001, stall_ms: float = 5.0) -> None:
        self.every_s = every_s
        self.stall_ms = stall_ms
        self.lags_ms: list[float] = []
        self.busy_ms: list[float] = []
        self._cpu = 0.0
        self.gc_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_started = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        gc.callbacks.append(self._on_gc)
        self._cpu = time.thread_time()
        self._arm(time.perf_counter())

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        due = now + self.every_s
        self._handle = self._loop.call_later(self.every_s, self._tick, due)

    def _tick(self, due: float) -> None:
        now = time.perf_counter()
        cpu = time.thread_time()
        self.lags_ms.append((now - due) * 1000)
        self.busy_ms.append((cpu - self._cpu) * 1000)
        self._cpu = cpu
        self._arm(now)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_ms[info["generation"]].append((time.perf_counter() - self._gc_started) * 1000)

    def stop(self) -> dict[str, object]:
        if self._handle is not None:
            self._handle.cancel()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        lags = sorted(self.lags_ms) or [0.0]
        out: dict[str, object] = {
            "loop_lag_p99_ms": round(lags[min(len(lags) - 1, int(0.99 * len(lags)))], 2),
            "loop_lag_max_ms": round(lags[-1], 2),
            f"stalls_over_{self.stall_ms:g}ms": sum(1 for x in lags if x > self.stall_ms),
            f"cpu_stalls_over_{self.stall_ms:g}ms": sum(
                1 for x in self.busy_ms if x > self.stall_ms + self.every_s * 1000
            ),
            "cpu_busy_max_ms": round(max(self.busy_ms, default=0.0), 2),
        }
        for gen, pauses in self.gc_ms.items():
            out[f"gc{gen}_count"] = len(pauses)
            out[f"gc{gen}_max_ms"] = round(max(pauses, default=0.0), 2)
        return out
