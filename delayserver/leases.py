"""Shard leases: several delay servers sharing one Redis (or Redis Cluster) store.

The Redis store splits delayed messages into shards (16 by default). Any server may schedule,
query, cancel or reschedule a message in any shard, but only the holder of a shard's lease loads
that shard into its timing wheel and releases its messages, into its own broker. So each due
message is released by one server, and a server that dies hands its shards on within one lease
time.

Each server, every ``ttl_ms / 3``:

1. says it is alive (``{prefix}:servers``, a ZSET of owner id → expiry) and reads the ids of
   the live servers, ``n`` of them;
2. renews the leases it holds (``PEXPIRE`` only if it still holds them: a lease that expired and
   was taken by another server is lost, never taken back);
3. keeps its fair share, ``shards // n`` plus one for the first ``shards % n`` servers in id
   order (so the shares add up to all shards): above it, it gives shards up (disarming them
   first, so it is done with them before another server can take them); below it, it takes free
   ones (``SET NX PX``), starting at a point derived from its id, so servers starting together
   ask for different shards first.

Safety. A server treats its leases as valid only until ``ttl_ms - margin_ms`` after the start of
its last successful renewal; Redis keeps them ``ttl_ms`` after it received that renewal, which is
later. So a server that stops hearing from Redis (or stalls) stops releasing before another can
take its shards. A release already running when that happens may still complete: only a stall
longer than ``margin_ms`` in the middle of one release can let two servers release the same
message (into two brokers). Within one server, releases stay idempotent as always.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog
from prometheus_client import REGISTRY, Gauge

from broker_core.tasks import cancel_and_wait
from delayserver.store import DelayStoreUnavailable

log = structlog.get_logger(__name__)

# Registered by the first ShardLeases that starts: with the embedded store there are no shards
# and no other servers, and a gauge stuck at 0 would only mislead.
OWNED = Gauge(
    "tempomq_delay_shards_owned", "Delay store shards whose lease this server holds", registry=None
)
SERVERS = Gauge(
    "tempomq_delay_servers", "Live delay servers sharing the delay store", registry=None
)


def _register_gauges() -> None:
    for gauge in (OWNED, SERVERS):
        with contextlib.suppress(ValueError):  # registered by an earlier start
            REGISTRY.register(gauge)


ShardsCallback = Callable[[frozenset[int]], Awaitable[None]]


class LeaseStore(Protocol):
    """What leases need of a store (:class:`~delayserver.redis_store.RedisDelayStore`)."""

    shards: int
    owner: str

    async def heartbeat(self, ttl_ms: int, now_ms: int) -> list[str]: ...

    async def leave(self) -> None: ...

    async def lease_holders(self) -> list[str | None]: ...

    async def acquire(self, shards: Sequence[int], ttl_ms: int) -> list[bool]: ...

    async def renew(self, shards: Sequence[int], ttl_ms: int) -> list[bool]: ...

    async def give_up(self, shards: Sequence[int]) -> None: ...


def new_owner_id() -> str:
    """Unique per process run: host, pid and a random part (a restarted server is a new one)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


async def _nothing(_shards: frozenset[int]) -> None:
    return None


class ShardLeases:
    """Holds this server's fair share of the store's shards (see the module docstring).

    ``on_gained`` runs after shards were taken; ``on_lost`` runs when shards were lost or
    before they are given up: when it returns, nothing of theirs may be released any more.
    """

    def __init__(
        self,
        store: LeaseStore,
        *,
        ttl_ms: int = 10_000,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        if ttl_ms < 300:
            raise ValueError("the lease time must be at least 300 ms")
        if not store.owner:
            raise ValueError("the store needs an owner id to take leases")
        self.store = store
        self.ttl_ms = ttl_ms
        self.margin_ms = ttl_ms // 5
        self.interval_s = ttl_ms / 3000
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        #: Replaced, never changed in place: ``owned`` hands it out as it is.
        self._owned: frozenset[int] = frozenset()
        self._valid_until = 0.0
        self.servers = 0
        self.on_gained: ShardsCallback = _nothing
        self.on_lost: ShardsCallback = _nothing
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Where this server starts looking for free shards.
        self._start = int.from_bytes(store.owner.encode()[-6:], "big") % store.shards

    @property
    def owned(self) -> frozenset[int]:
        """The shards held, valid or not (for loading: ``holds`` decides releases)."""
        return self._owned

    def holds(self, shard: int) -> bool:
        """True while this server may release the shard's messages."""
        return shard in self._owned and self._monotonic() < self._valid_until

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """One round now (so a lone server holds every shard before its first load), then one
        every ``interval_s`` in the background. Raises DelayStoreUnavailable if Redis is down."""
        _register_gauges()
        await self.step()
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="tempomq-delay-leases")

    async def stop(self) -> None:
        """Stop renewing and hand the shards on at once (the caller has stopped releasing)."""
        if self._task is not None:
            # Let a round under way finish rather than cancel it in the middle of a call.
            self._stopping.set()
            await asyncio.wait([self._task], timeout=2.0)
            await cancel_and_wait([self._task])
            self._task = None
        held, self._owned = sorted(self._owned), frozenset()
        OWNED.set(0)
        try:
            await self.store.give_up(held)
            await self.store.leave()
        except DelayStoreUnavailable as e:
            log.warning("delay.leases_not_given_up", error=str(e), shards=held)

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._stopping.wait()
                return
            except TimeoutError:
                pass
            try:
                await self.step()
            except Exception as e:  # unavailable, or a bug: never stop renewing for good
                if not isinstance(e, DelayStoreUnavailable):
                    log.exception("delay.lease_round_failed")
                log.error("delay.lease_renewal_failed", error=str(e))
                if self._owned and self._monotonic() >= self._valid_until:
                    lost, self._owned = self._owned, frozenset()
                    OWNED.set(0)
                    log.error("delay.leases_expired", shards=sorted(lost))
                    await self.on_lost(lost)

    # -- one round -------------------------------------------------------------------------------

    async def step(self) -> None:
        started = self._monotonic()
        ttl = self.ttl_ms
        members = await self.store.heartbeat(ttl, self._wall_ms())
        if self.store.owner not in members:  # the heartbeat was pruned by a clock behind
            members = sorted([*members, self.store.owner])
        self.servers = n = len(members)
        SERVERS.set(n)
        held = sorted(self._owned)
        if held:
            renewed = await self.store.renew(held, ttl)
            lost = frozenset(s for s, ok in zip(held, renewed, strict=True) if not ok)
            if lost:
                self._owned -= lost
                log.warning("delay.leases_lost", shards=sorted(lost))
                await self.on_lost(lost)
        self._valid_until = started + (ttl - self.margin_ms) / 1000
        total = self.store.shards
        share = total // n + (members.index(self.store.owner) < total % n)
        if len(self._owned) > share:
            extra = frozenset(sorted(self._owned)[share:])
            self._owned -= extra
            await self.on_lost(extra)  # done with them before anyone can take them
            await self.store.give_up(sorted(extra))
            log.info("delay.leases_given_up", shards=sorted(extra), servers=n)
        elif len(self._owned) < share:
            await self._take(share - len(self._owned))
        OWNED.set(len(self._owned))

    async def _take(self, wanted: int) -> None:
        total = self.store.shards
        order = [(self._start + i) % total for i in range(total)]
        holders = await self.store.lease_holders()
        free = [s for s in order if holders[s] is None][:wanted]
        taken = await self.store.acquire(free, self.ttl_ms)
        gained = frozenset(s for s, ok in zip(free, taken, strict=True) if ok)
        if gained:
            self._owned |= gained
            log.info("delay.leases_taken", shards=sorted(gained), servers=self.servers)
            await self.on_gained(gained)
