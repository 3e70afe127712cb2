"""Prometheus metrics of the broker core (process-wide, on the default registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PUT_MESSAGES = Counter("tempomq_put_messages", "Messages stored in the CommitLog")
RECEIVED_MESSAGES = Counter("tempomq_received_messages", "Messages handed to consumers")
ACKED_MESSAGES = Counter("tempomq_acked_messages", "Messages acknowledged by consumers")
NACKED_MESSAGES = Counter(
    "tempomq_redelivered_messages", "Messages sent back for redelivery (nack or timeout)"
)
DLQ_MESSAGES = Counter("tempomq_dead_lettered_messages", "Messages moved to a dead-letter topic")
DROPPED_MESSAGES = Counter(
    "tempomq_dropped_messages",
    "Messages due for a topic deleted after they were sent (a delayed message, a retry, a"
    " committed transaction's message), dropped instead of delivered, by where they came from",
    ["source"],
)
CORRUPT_RECORDS = Counter(
    "tempomq_corrupt_records",
    "Damaged CommitLog ranges found and skipped (never delivered), by who found them",
    ["found_by"],
)
WRITE_FAILURES = Counter(
    "tempomq_store_write_failures", "CommitLog writes that failed (disk full, I/O error)"
)
FLUSH_SECONDS = Histogram(
    "tempomq_flush_seconds",
    "CommitLog fsync latency (each group commit in sync mode, each periodic flush in async)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


LagSource = Callable[[], Iterable[tuple[str, str, int]]]


class LagCollector(Collector):
    """Consumer lag per group and topic, computed when scraped (nothing on the hot path), over
    every running broker of the process (one in a server; several in tests)."""

    def __init__(self) -> None:
        self.sources: list[LagSource] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tempomq_consumer_lag",
            "Messages not yet acknowledged by a group",
            labels=["group", "topic"],
        )
        for source in list(self.sources):
            for group, topic, lag in source():
                family.add_metric([group, topic], lag)
        yield family


LAG = LagCollector()
REGISTRY.register(LAG)
