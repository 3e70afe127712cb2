"""Settings of the broker core, with the defaults a fresh install runs with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from broker_core.message import DEFAULT_MAX_BODY_BYTES

#: Redelivery backoff after attempt n (index n-1); the 16th failure goes to the DLQ.
DEFAULT_BACKOFF_MS: tuple[int, ...] = tuple(
    s * 1000
    for s in (10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200)
)

FlushMode = Literal["async", "sync"]


@dataclass(slots=True)
class BrokerConfig:
    data_dir: Path = Path("./data")
    #: ``async``: acknowledged once written to the OS (survives kill -9, not power loss),
    #: fsynced every ``flush_interval_ms``. ``sync``: acknowledged after fsync.
    flush: FlushMode = "async"
    flush_interval_ms: int = 500
    segment_bytes: int = 1024 * 1024 * 1024
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retention_ms: int = 72 * 3600 * 1000
    auto_create_topics: bool = False
    default_queues: int = 8
    max_queues: int = 256
    #: ConsumeQueue entries per file (20 bytes each).
    cq_entries_per_file: int = 300_000
    #: Hash slots and entries per index file.
    index_slots: int = 1 << 20
    index_entries: int = 4 << 20
    default_invisible_ms: int = 30_000
    max_attempts: int = 16
    backoff_ms: tuple[int, ...] = field(default=DEFAULT_BACKOFF_MS)
    max_receive_batch: int = 1000
    max_wait_ms: int = 60_000
