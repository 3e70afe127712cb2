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
"""

from __future__ import annotations

from collections.abc import Iterable

#: Bits per id the filter is sized for; it counts as full at half of that.
BITS_PER_ID = 32
#: The smallest filter: 2**20 bits (128 KiB).
MIN_BITS_LOG2 = 20
#: The largest: 2**29 bits (64 MiB), room for 33.5 million ids at 16 bits each. A store
#: holding more rows than that keeps a filter this size, which answers "maybe" more often.
MAX_BITS_LOG2 = 29


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
