"""Prometheus metrics of the broker core (process-wide, on the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PUT_MESSAGES = Counter("tempomq_put_messages", "Messages stored in the CommitLog")
RECEIVED_MESSAGES = Counter("tempomq_received_messages", "Messages handed to consumers")
ACKED_MESSAGES = Counter("tempomq_acked_messages", "Messages acknowledged by consumers")
NACKED_MESSAGES = Counter(
    "tempomq_redelivered_messages", "Messages sent back for redelivery (nack or timeout)"
)
DLQ_MESSAGES = Counter("tempomq_dead_lettered_messages", "Messages moved to a dead-letter topic")
FLUSH_SECONDS = Histogram(
    "tempomq_flush_seconds",
    "CommitLog fsync latency (each group commit in sync mode, each periodic flush in async)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
