"""Per-principal request rate limits: one token bucket per principal (pure; time passed in).

A bucket holds up to ``burst`` tokens and refills at ``per_s`` a second; each request takes one.
An empty bucket answers how long until a token is back, which becomes ``Retry-After``. Buckets
are created on a principal's first request and kept in a bounded LRU, so a flood of distinct
client addresses (with auth off, the address is the principal) cannot grow memory without end.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tempomq.auth.policy import RateLimit

#: Most buckets kept; the least recently used is dropped (a dropped bucket restarts full).
MAX_BUCKETS = 10_000


@dataclass(slots=True)
class TokenBucket:
    per_s: float
    burst: float
    tokens: float
    updated_s: float

    def take(self, now_s: float) -> float:
        """Take one token; returns 0.0 if there was one, else the seconds until there is."""
        elapsed = now_s - self.updated_s
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.per_s)
            self.updated_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.per_s


class RateLimiter:
    """Buckets by principal name; ``default`` applies where a principal sets no limit."""

    def __init__(self, default: RateLimit | None, *, max_buckets: int = MAX_BUCKETS) -> None:
        self.default = default
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max = max_buckets

    def take(self, key: str, limit: RateLimit | None, now_s: float) -> float:
        """0.0 when the request may go ahead, else the seconds to wait (no limit: always 0)."""
        limit = limit or self.default
        if limit is None:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None or bucket.per_s != limit.per_s or bucket.burst != limit.burst:
            # New, or the limit changed on reload: start full under the new limit.
            bucket = TokenBucket(limit.per_s, limit.burst, limit.burst, now_s)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now_s)
