"""Shared by the store test modules: starting and stopping stores on tmp dirs, numbered
messages, reading queues back, and what a kill -9 leaves behind."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker_core.commitlog import FileIO
from broker_core.store import MessageStore, PutResult
from tests.unit.broker_helpers import msg, small_config

SEG = 64 * 1024


class Stores:
    """Starts stores and stops, at the end of the test, those the test left running."""

    def __init__(self) -> None:
        self.running: list[MessageStore] = []

    async def start(
        self,
        data_dir: Path,
        clock: Callable[[], int] | None = None,
        io: FileIO | None = None,
        **overrides: Any,
    ) -> MessageStore:
        config = small_config(data_dir, **overrides)
        store = (
            MessageStore(config, io=io)
            if clock is None
            else MessageStore(config, clock=clock, io=io)
        )
        await store.start()
        self.running.append(store)
        return store

    async def stop(self, store: MessageStore) -> None:
        self.running.remove(store)
        await store.stop()


def segments(data_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (data_dir / "commitlog").iterdir() if p.name.isdigit())


def body_for(i: int, size: int = 0) -> bytes:
    head = f"message-{i}:".encode()
    return head + bytes((i * 7 + j) % 251 for j in range(size))


async def put_numbered(
    store: MessageStore, topic: str, n: int, *, size: int = 0, start: int = 0, **kw: Any
) -> list[PutResult]:
    out = []
    for i in range(start, start + n):
        out.append(await store.put(msg(topic, body_for(i, size), keys=[f"k{i}"], **kw)))
    return out


def all_in_queues(store: MessageStore, topic: str) -> list[bytes]:
    """Every body reachable through the topic's ConsumeQueues, queue by queue."""
    bodies = []
    for q in range(store.topic(topic).queues):
        lo, hi = store.queue_bounds(topic, q)
        cq = store.consume_queue(topic, q)
        for i in range(lo, hi):
            phy, size, _ = cq.get(i)
            m = store.read(phy)
            assert m is not None, (topic, q, i)
            assert (m.topic, m.queue_id, m.queue_offset, m.size) == (topic, q, i, size)
            bodies.append(m.body)
    return bodies


async def crash_copy(store: MessageStore, src: Path, dst: Path) -> int:
    """What a kill -9 leaves behind: the files as the OS holds them, no clean-stop marker."""
    shutil.copytree(src, dst)
    assert not (dst / "commitlog" / "clean_shutdown").exists()
    return store.commitlog.written_end


def write_at(data_dir: Path, offset: int, data: bytes) -> None:
    start = offset - offset % SEG
    path = data_dir / "commitlog" / f"{start:020d}"
    with open(path, "r+b") as f:
        f.seek(offset - start)
        f.write(data)


def readable_bodies(store: MessageStore, topic: str) -> list[bytes]:
    """Bodies of the records the topic's ConsumeQueues point at that can be read (damaged
    ones are skipped, as a receive skips them), queue by queue."""
    out = []
    for q in range(store.topic(topic).queues):
        lo, hi = store.queue_bounds(topic, q)
        cq = store.consume_queue(topic, q)
        for i in range(lo, hi):
            phy, size, _ = cq.get(i)
            m = None if size == 0 else store.read(phy)  # size 0: a hole, never written
            if m is not None:
                out.append(m.body)
    return out
