"""A hierarchical timing wheel: millions of one-shot timers, O(1) add and cancel. Pure.

The algorithm is Kafka's ``TimingWheel``. A wheel is a circular array of ``wheel_size`` buckets;
each bucket is a doubly linked list of timer entries whose expirations fall in one tick. A wheel
with tick ``tick_ms`` spans ``interval_ms = tick_ms * wheel_size``. An expiration beyond that span
goes to an *overflow wheel* whose tick is the whole interval of the wheel below it, created lazily
the first time it is needed, so a few levels cover any delay (tick 1 ms and 1024 buckets: 1 s,
17 min, 12 days, 34 years, ...).

Each level has a clock ``current_ms`` rounded down to its tick; an entry belongs to the lowest level
whose window ``[current_ms, current_ms + interval_ms)`` holds its expiration, in the bucket
``(expiration_ms // tick_ms) % wheel_size``. Every non-empty bucket has an expiration (the start of
its tick) kept in a heap, so the owner of the wheel sleeps until the next non-empty bucket rather
than ticking through empty ones. When a bucket expires, its entries are re-added: an entry that is
due is handed out, any other falls to a finer level. That re-add is how timers cascade down.

Worked example, ``tick_ms=1``, ``wheel_size=4``, ``start_ms=0``::

    level 0: tick  1 ms, interval  4 ms, holds [0, 4)
    level 1: tick  4 ms, interval 16 ms, holds [0, 16)     created by add(9)
    level 2: tick 16 ms, interval 64 ms, holds [0, 64)     created by add(40)

    add(2)   -> level 0, bucket 2 % 4 = 2, bucket expiration 2
    add(9)   -> too far for level 0; level 1, bucket (9 // 4) % 4 = 2, bucket expiration 8
    add(40)  -> level 2, bucket (40 // 16) % 4 = 2, bucket expiration 32
    heap of bucket expirations: [2, 8, 32]

    advance(8):  bucket 2 expires: 2 is due.  Bucket 8 (level 1) expires: level 0's clock moves to
                 8 and 9 is re-added there (bucket 9 % 4 = 1, expiration 9).  Heap: [9, 32].
    advance(9):  9 is due.
    advance(32): bucket 32 (level 2) expires; 40 falls to level 1 (bucket 10 % 4 = 2, expiration
                 40), since level 0 now holds only [32, 36).
    advance(40): bucket 40 (level 1) expires; 40 is re-added at level 0, where it is due.

Unlike Kafka, an entry never comes out before its expiration, even when ``tick_ms > 1``: the
bucket of the current tick wakes at its earliest entry, not at the start of the tick. Two more
departures, both for speed in CPython: a bucket whose whole tick has passed (at level 0 with
``tick_ms=1``, every expired bucket) is spliced into the due list in O(1) instead of re-adding its
entries one by one, and the heap holds plain ints ``expiration_ms << bits | bucket number``, which
compare twice as fast as tuples.

Entries never end up in garbage cycles: cancelling or handing out an entry cuts its links, so
reference counting frees it. A service holding millions of them may therefore ``gc.freeze()`` them
after loading, sparing the cyclic collector from walking them again and again.

Time is passed in; nothing here sleeps, reads a clock or does IO. ``advance_clock`` moves time and
collects due entries in a due list where they can still be cancelled; ``pop_due`` hands them out one
at a time (a driver that runs callbacks uses it so that a callback can still cancel a later timer
of the same batch), ``advance`` does both at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from heapq import heappop, heappush

__all__ = ["TimerEntry", "TimingWheel"]

_NO_EXPIRATION = -1
# Levels a wheel may grow; even at tick_ms=1 and wheel_size=2 they span 2**64 ms.
_MAX_LEVELS = 64


class TimerEntry:
    """A timer in the wheel; hold it to cancel. ``expiration_ms`` and ``payload`` are read-only.

    Entries are made by ``TimingWheel.add`` only. While pending, an entry is a node of its bucket's
    circular list; afterwards its links point at its final state so a kept handle pins nothing.
    """

    # A bucket is the sentinel node of its own list (as Kafka's TimerTaskList root), so linking
    # and unlinking never test for None and every link is typed TimerEntry.
    __slots__ = ("_bucket", "_next", "_prev", "expiration_ms", "payload")

    expiration_ms: int
    payload: object
    _bucket: _Bucket
    _prev: TimerEntry
    _next: TimerEntry

    def cancel(self) -> None:
        """Remove the entry from the wheel; a no-op once it fired or was cancelled."""
        bucket = self._bucket
        if bucket is _FIRED or bucket is _CANCELLED:
            return
        prev = self._prev
        nxt = self._next
        prev._next = nxt
        nxt._prev = prev
        bucket._wheel._count -= 1
        self._bucket = self._prev = self._next = _CANCELLED
        self.payload = None

    @property
    def fired(self) -> bool:
        """Handed out by ``advance`` or ``pop_due``."""
        return self._bucket is _FIRED

    @property
    def cancelled(self) -> bool:
        return self._bucket is _CANCELLED

    @property
    def active(self) -> bool:
        """Still pending: neither fired nor cancelled."""
        bucket = self._bucket
        return bucket is not _FIRED and bucket is not _CANCELLED

    def __repr__(self) -> str:
        state = "fired" if self.fired else "cancelled" if self.cancelled else "pending"
        return f"TimerEntry(expiration_ms={self.expiration_ms}, {state})"


class _Bucket(TimerEntry):
    """The entries of one tick of one level; ``expiration_ms`` is when to flush them."""

    __slots__ = ("_last_ms", "_seq", "_wheel")

    _wheel: TimingWheel
    _seq: int
    # The last millisecond of the bucket's tick: once time reaches it, all of the bucket is due.
    _last_ms: int

    def __init__(self, wheel: TimingWheel, seq: int) -> None:
        self._wheel = wheel
        # The low bits of the bucket's heap key: ties on expiration stay unique and a key finds
        # its bucket again by index.
        self._seq = seq
        self.expiration_ms = self._last_ms = _NO_EXPIRATION
        self.payload = None
        self._bucket = self
        self._prev = self._next = self


def _final_state() -> _Bucket:
    # Never linked and never in a wheel, so it needs none of a bucket's fields.
    return _Bucket.__new__(_Bucket)


# Terminal states of an entry, kept in its bucket slot so that cancel() needs no extra field.
_FIRED = _final_state()
_CANCELLED = _final_state()


class _Level:
    """One wheel of the hierarchy: its tick, clock and buckets."""

    __slots__ = (
        "buckets",
        "end_ms",
        "interval_ms",
        "next_tick_ms",
        "tick_ms",
        "wheel_size",
    )

    def __init__(self, wheel: TimingWheel, index: int, tick_ms: int, time_ms: int) -> None:
        size = wheel.wheel_size
        self.tick_ms = tick_ms
        self.wheel_size = size
        self.interval_ms = tick_ms * size
        self.buckets = [_Bucket(wheel, index * size + i) for i in range(size)]
        wheel._bucket_by_seq.extend(self.buckets)
        self.end_ms = self.next_tick_ms = 0
        _set_clocks((self,), time_ms)


def _set_clocks(levels: Iterable[_Level], time_ms: int) -> None:
    """Move the clocks of ``levels`` forward to ``time_ms``, each rounded down to its tick."""
    for level in levels:
        if time_ms < level.next_tick_ms:
            # Each level's clock is the one below rounded down to a coarser tick, so if this
            # one stays, all above it stay too.
            return
        current_ms = time_ms - time_ms % level.tick_ms
        level.next_tick_ms = current_ms + level.tick_ms
        # Cached so that placing an entry costs one comparison per level.
        level.end_ms = current_ms + level.interval_ms


class TimingWheel:
    """Hierarchical timing wheel holding ``TimerEntry`` objects; see the module docstring."""

    __slots__ = (
        "_bucket_by_seq",
        "_count",
        "_due",
        "_levels",
        "_now_ms",
        "_queue",
        "_seq_bits",
        "_seq_mask",
        "tick_ms",
        "wheel_size",
    )

    def __init__(self, *, tick_ms: int = 1, wheel_size: int = 1024, start_ms: int = 0) -> None:
        if tick_ms < 1:
            raise ValueError("tick_ms must be at least 1")
        if wheel_size < 2:
            raise ValueError("wheel_size must be at least 2")
        if start_ms < 0:
            raise ValueError("start_ms must not be negative")
        self.tick_ms = tick_ms
        self.wheel_size = wheel_size
        self._now_ms = start_ms
        self._count = 0
        # Entries already due, waiting to be handed out; still cancellable until then.
        self._due = _Bucket(self, -1)
        # Bucket expirations as ints ``expiration_ms << _seq_bits | seq``: the heap compares ints,
        # twice as fast as tuples.
        self._queue: list[int] = []
        self._seq_bits = (wheel_size * _MAX_LEVELS - 1).bit_length()
        self._seq_mask = (1 << self._seq_bits) - 1
        self._bucket_by_seq: list[_Bucket] = []
        self._levels = [_Level(self, 0, tick_ms, start_ms)]

    def __len__(self) -> int:
        """Pending entries: added, not yet handed out, not cancelled."""
        return self._count

    @property
    def current_ms(self) -> int:
        """The wheel's time: the latest ``now_ms`` it was advanced to (or ``start_ms``)."""
        return self._now_ms

    @property
    def level_count(self) -> int:
        """Levels created so far; overflow levels appear when a far expiration needs them."""
        return len(self._levels)

    def level_interval_ms(self, level: int) -> int:
        return self._levels[level].interval_ms

    def add(self, expiration_ms: int, payload: object) -> TimerEntry:
        """Add a timer; if ``expiration_ms`` has passed it is due at the next ``advance``."""
        entry = TimerEntry()
        entry.expiration_ms = expiration_ms
        entry.payload = payload
        self._count += 1
        self._insert(entry)
        return entry

    def _insert(self, entry: TimerEntry) -> None:
        expiration_ms = entry.expiration_ms
        if expiration_ms <= self._now_ms:
            bucket = self._due
        else:
            for level in self._levels:
                if expiration_ms < level.end_ms:
                    tick_ms = level.tick_ms
                    virtual_id = expiration_ms // tick_ms
                    bucket = level.buckets[virtual_id % level.wheel_size]
                    bucket_expiration_ms = virtual_id * tick_ms
                    # Kafka's rule: enqueue the bucket only when its expiration changed, which
                    # happens once per bucket round, not once per entry.
                    if bucket_expiration_ms != bucket.expiration_ms:
                        self._set_bucket_expiration(
                            bucket, bucket_expiration_ms, tick_ms, expiration_ms
                        )
                    break
            else:
                self._add_overflow_level()
                self._insert(entry)
                return
        tail = bucket._prev
        entry._prev = tail
        entry._next = bucket
        entry._bucket = bucket
        tail._next = entry
        bucket._prev = entry

    def _set_bucket_expiration(
        self, bucket: _Bucket, bucket_expiration_ms: int, tick_ms: int, expiration_ms: int
    ) -> None:
        bucket._last_ms = bucket_expiration_ms + tick_ms - 1
        if bucket_expiration_ms <= self._now_ms:
            # Only the bucket of the current tick at level 0 with tick_ms > 1 starts at or before
            # now. Waking it at its earliest entry instead keeps every entry from firing early.
            armed_ms = bucket.expiration_ms
            if armed_ms != _NO_EXPIRATION and armed_ms <= expiration_ms:
                return
            bucket_expiration_ms = expiration_ms
        bucket.expiration_ms = bucket_expiration_ms
        heappush(self._queue, bucket_expiration_ms << self._seq_bits | bucket._seq)

    def _add_overflow_level(self) -> None:
        if len(self._levels) == _MAX_LEVELS:
            raise ValueError("expiration_ms beyond the wheel's reach")
        below = self._levels[-1]
        self._levels.append(_Level(self, len(self._levels), below.interval_ms, self._now_ms))

    def advance_clock(self, now_ms: int) -> None:
        """Move time to ``now_ms``, cascading expired buckets; due entries wait for ``pop_due``.

        Time never goes back: an earlier ``now_ms`` than the wheel's time changes nothing.
        """
        if now_ms <= self._now_ms:
            return
        # Entries re-added below are due as soon as they are not after now_ms, even while the level
        # clocks still stand at the expiration of the bucket being flushed.
        self._now_ms = now_ms
        queue = self._queue
        seq_bits = self._seq_bits
        # Keys below this are buckets that expire by now_ms.
        end_key = (now_ms + 1) << seq_bits
        if queue and queue[0] < end_key:
            bucket_by_seq = self._bucket_by_seq
            seq_mask = self._seq_mask
            due = self._due
            while queue and queue[0] < end_key:
                key = heappop(queue)
                expiration_ms = key >> seq_bits
                bucket = bucket_by_seq[key & seq_mask]
                if bucket.expiration_ms != expiration_ms:
                    continue  # superseded by an earlier expiration of the same bucket
                bucket.expiration_ms = _NO_EXPIRATION
                first = bucket._next
                if first is bucket:
                    continue  # every entry was cancelled
                if bucket._last_ms <= now_ms:
                    # The bucket's whole tick has passed, so all of it is due: one splice, not one
                    # re-add per entry (always so at level 0 with tick_ms=1). Its entries keep
                    # pointing at this bucket, which is fine: cancel() only needs their
                    # neighbours and the bucket's wheel.
                    last = bucket._prev
                    tail = due._prev
                    tail._next = first
                    first._prev = tail
                    last._next = due
                    due._prev = last
                    bucket._next = bucket._prev = bucket
                else:
                    self._cascade(bucket, expiration_ms)
        _set_clocks(self._levels, now_ms)

    def _cascade(self, bucket: _Bucket, expiration_ms: int) -> None:
        # The bucket's entries fall to lower levels, whose clocks must stand at its expiration.
        # All levels move, which keeps every level's clock its lower neighbour's rounded down.
        _set_clocks(self._levels, expiration_ms)
        insert = self._insert
        entry = bucket._next
        bucket._next = bucket._prev = bucket
        while entry is not bucket:
            nxt = entry._next
            insert(entry)
            entry = nxt

    def pop_due(self) -> TimerEntry | None:
        """Hand out one due entry (it becomes ``fired``), or None when none is due."""
        due = self._due
        entry = due._next
        if entry is due:
            return None
        nxt = entry._next
        due._next = nxt
        nxt._prev = due
        entry._bucket = entry._prev = entry._next = _FIRED
        self._count -= 1
        return entry

    def advance(self, now_ms: int) -> list[TimerEntry]:
        """Move time to ``now_ms`` and hand out every entry due by then, each exactly once."""
        self.advance_clock(now_ms)
        due = self._due
        entry = due._next
        if entry is due:
            return []
        due._next = due._prev = due
        fired: list[TimerEntry] = []
        append = fired.append
        while entry is not due:
            append(entry)
            nxt = entry._next
            entry._bucket = entry._prev = entry._next = _FIRED
            entry = nxt
        self._count -= len(fired)
        return fired

    def next_expiration_ms(self) -> int | None:
        """When ``advance_clock`` next has work: the earliest non-empty bucket's expiration.

        The wheel's current time when entries are already due; None when nothing is pending.
        Reaching it may only cascade entries to a finer level; ask again after advancing.
        """
        due = self._due
        if due._next is not due:
            return self._now_ms
        queue = self._queue
        while queue:
            key = queue[0]
            expiration_ms = key >> self._seq_bits
            bucket = self._bucket_by_seq[key & self._seq_mask]
            if bucket.expiration_ms == expiration_ms:
                if bucket._next is not bucket:
                    return expiration_ms
                # Emptied by cancels: forget it so a driver never wakes for nothing.
                bucket.expiration_ms = _NO_EXPIRATION
            heappop(queue)
        return None
