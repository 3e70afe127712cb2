"""IdFilter: which message ids the embedded delay store certainly does not hold.

A schedule through the schedule log must tell a resend (an id the store holds) from a new
message before it is acknowledged. Asking SQLite costs a read transaction and an index lookup
on the event loop, about a quarter of a one-message schedule's CPU time; nearly every id
asked about is new. The filter answers "certainly not held" for those from memory, and the
store asks SQLite only about the rest.

It is a Bloom filter (B. H. Bloom, "Space/time trade-offs in hash coding with allowable
errors", Communications of the ACM 13(7), 1970) with two bit positions per id, taken from the
two halves of Python's 64-bit ``hash`` of the id's bytes. That hash is salted per process,
which is fine: the filter lives in memory only and is loaded from the table at every open.
Sized at 32 bits per id expected, it is rebuilt once more ids than half that were added
(:attr:`full`); up to then about 1.4 % of new ids still go to SQLite. Ids are never removed
(the store's rows outlive delivery until purged, and a purged id only costs a lookup).

:class:`HeldIds` keeps a store's filter: it loads it from the store in the background and adds
every id the store writes. Both delay stores use one (the Redis store for the same question
about a plain send: "is this id held as a delayed message?").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import structlog

log = structlog.get_logger(__name__)

#: Bits per id the filter is sized for; it counts as full at half of that.
BITS_PER_ID = 32
#: The smallest filter: 2**20 bits (128 KiB).
MIN_BITS_LOG2 = 20
#: The largest: 2**29 bits (64 MiB), room for 33.5 million ids at 16 bits each. A store
#: holding more rows than that keeps a filter this size, which answers "maybe" more often.
MAX_BITS_LOG2 = 29
#: A load adds this many ids per turn of the event loop ...
LOAD_SLICE = 2_000
#: ... and after a failed load the next try comes this much later.
LOAD_RETRY_S = 5.0


class IdFilter:
    """A set of ids that may answer ``in`` wrongly for ids never added, never for added ones.

    ``expected``: how many ids it is sized for (:data:`BITS_PER_ID` bits each, within
    :data:`MIN_BITS_LOG2` and :data:`MAX_BITS_LOG2`)."""

    __slots__ = ("_bits", "_mask", "capacity", "count")

    def __init__(self, expected: int) -> None:
        log2 = (max(expected, 1) * BITS_PER_ID - 1).bit_length()
        size = 1 << max(MIN_BITS_LOG2, min(MAX_BITS_LOG2, log2))
        self._bits = bytearray(size >> 3)
        self._mask = size - 1
        #: Ids it takes before it counts as :attr:`full` (16 bits each).
        self.capacity = size // (BITS_PER_ID // 2)
        #: Ids added so far (an id added twice counts twice).
        self.count = 0

    @property
    def at_largest(self) -> bool:
        return self._mask == (1 << MAX_BITS_LOG2) - 1

    @property
    def full(self) -> bool:
        """True once it is due to be rebuilt: more ids added than it was sized for (at the
        largest size, twice as many: a rebuild then only sheds ids no longer held)."""
        return self.count > (2 * self.capacity if self.at_largest else self.capacity)

    def add(self, msg_id: bytes) -> None:
        h = hash(msg_id)
        mask = self._mask
        bits = self._bits
        i = h & mask
        bits[i >> 3] |= 1 << (i & 7)
        i = (h >> 32) & mask
        bits[i >> 3] |= 1 << (i & 7)
        self.count += 1

    def update(self, msg_ids: Iterable[bytes]) -> None:
        mask = self._mask
        bits = self._bits
        n = 0
        for msg_id in msg_ids:
            h = hash(msg_id)
            i = h & mask
            bits[i >> 3] |= 1 << (i & 7)
            i = (h >> 32) & mask
            bits[i >> 3] |= 1 << (i & 7)
            n += 1
        self.count += n

    def __contains__(self, msg_id: bytes) -> bool:
        h = hash(msg_id)
        mask = self._mask
        i = h & mask
        if not self._bits[i >> 3] & (1 << (i & 7)):
            return False
        i = (h >> 32) & mask
        return bool(self._bits[i >> 3] & (1 << (i & 7)))


class HeldIds:
    """The id filter of a store: loaded in the background (at :meth:`start`, and again once
    full), every id the store is about to write added as it comes (:meth:`note`), so that a
    filter in use never misses an id the store holds. :attr:`filter` is None until the first
    load is done (and after :meth:`stop`): the store must ask its own data then.

    ``count``: about how many ids the store holds (to size the filter). ``read``: every id
    it holds, in pages. ``pending``: ids noted earlier whose writes are still to come (beside
    those of :meth:`writing`; neither the load nor :meth:`note` would add them otherwise).
    ``errors``:
    what a failed read raises; the load is tried again :data:`LOAD_RETRY_S` later."""

    def __init__(
        self,
        *,
        name: str,
        count: Callable[[], Awaitable[int]],
        read: Callable[[], AsyncIterator[Sequence[bytes]]],
        pending: Callable[[], Iterable[bytes]] = tuple,
        errors: tuple[type[Exception], ...],
    ) -> None:
        self.name = name
        self._count = count
        self._read = read
        self._pending = pending
        self._errors = errors
        #: Ids being written in a :meth:`writing` block, with how many blocks hold each.
        self.in_flight: dict[bytes, int] = {}
        self.filter: IdFilter | None = None
        #: The filter being loaded; it gets every id noted meanwhile too.
        self._filling: IdFilter | None = None
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._stopped = True

    @property
    def loading(self) -> bool:
        return self._task is not None

    def may_hold(self, msg_id: bytes) -> bool:
        """False when the store certainly does not hold ``msg_id``; True when it may (or the
        filter is not loaded)."""
        held = self.filter
        return held is None or msg_id in held

    def start(self) -> None:
        self._stopped = False
        self._load_soon(0)

    async def stop(self) -> None:
        self._stopped = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        self.filter = None

    def note(self, msg_ids: Iterable[bytes]) -> None:
        """Add ids about to be written to the filters (before the write starts, so a filter
        loaded meanwhile never misses them)."""
        held, filling = self.filter, self._filling
        if held is not None:
            if filling is not None:
                msg_ids = list(msg_ids)
            held.update(msg_ids)
            if held.full and self._task is None and self._retry is None:
                self._load_soon(0)
        if filling is not None:
            filling.update(msg_ids)

    @contextmanager
    def writing(self, msg_ids: Sequence[bytes]) -> Iterator[None]:
        """Around a write of ``msg_ids``: they are noted first, and counted in
        :attr:`in_flight` until the block ends, so a load starting meanwhile puts them in."""
        self.note(msg_ids)
        in_flight = self.in_flight
        for msg_id in msg_ids:
            in_flight[msg_id] = in_flight.get(msg_id, 0) + 1
        try:
            yield
        finally:
            for msg_id in msg_ids:
                if in_flight[msg_id] == 1:
                    del in_flight[msg_id]
                else:
                    in_flight[msg_id] -= 1

    def _load_soon(self, delay_s: float) -> None:
        if self._stopped:
            return
        self._retry = asyncio.get_running_loop().call_later(delay_s, self._start_load)

    def _start_load(self) -> None:
        self._retry = None
        if self._task is None and not self._stopped:
            self._task = asyncio.create_task(self._load(), name=f"tempomq-{self.name}-id-filter")

    async def _load(self) -> None:
        """Load a new filter, :data:`LOAD_SLICE` ids per turn of the loop; it replaces the
        one in use (or none) once every id of the store is in it. Ids noted meanwhile go into
        it as they come, and those being written now are put in first, so none is missed: an
        id stored when the read passes it is read, one written later was noted."""
        try:
            held = await self._count()
            # No await from here until _filling is set: what is being written now is in
            # ``writing``, what is noted from now on goes into the filling filter.
            writing = [*self.in_flight, *self._pending()]
            filling = IdFilter(held + len(writing))
            self._filling = filling
            filling.update(writing)
            async for page in self._read():
                for start in range(0, len(page), LOAD_SLICE):
                    filling.update(page[start : start + LOAD_SLICE])
                    await asyncio.sleep(0)
            self.filter = filling
            log.info("delay_store.id_filter_loaded", store=self.name, ids=filling.count)
        except self._errors as e:
            log.warning(
                "delay_store.id_filter_not_loaded",
                store=self.name,
                error=str(e),
                retry_s=LOAD_RETRY_S,
            )
            self._load_soon(LOAD_RETRY_S)
        except Exception:  # a bug: the store asks its own data meanwhile; try again later
            log.exception("delay_store.id_filter_not_loaded", store=self.name, retry_s=LOAD_RETRY_S)
            self._load_soon(LOAD_RETRY_S)
        finally:
            self._filling = None
            self._task = None
