"""RedisDelayStore: delayed messages in Redis, split into hash-tagged shards.

Layout, for shard ``s`` of ``shards`` (a message's shard is ``crc32(msg_id) % shards``)::

    {prefix}:{d<s>}:due    ZSET  msg_id -> deliver_at_ms           scheduled only
    {prefix}:{d<s>}:msg    HASH  msg_id -> encoded record          scheduled only
    {prefix}:{d<s>}:meta   HASH  msg_id -> "state|topic|deliver_at_ms|finished_at_ms"   all
    {prefix}:{d<s>}:done   ZSET  msg_id -> finished_at_ms          delivered and cancelled

The ``{d<s>}`` hash tag puts one shard's four keys in one Redis Cluster slot, so every step on a
shard is a single Lua script on a single node, and a shard can later be leased whole to one of
several delay servers. ``meta`` is the source of truth for a message's state and makes
``schedule`` idempotent (HSETNX); it outlives the record so that a finished message can still be
queried until ``purge`` forgets it. The state is one letter (``s``, ``d``, ``c``) and the
finished time is empty while scheduled; the topic sits between the first and the last two ``|``,
so a topic containing ``|`` would still parse.

Round trips: a batch is grouped by shard and sent as one pipeline with one script call per shard
touched. Writes to several shards go in one MULTI/EXEC, so on a single Redis server a failed call
changes nothing (a lost reply after EXEC is the one case where the outcome is unknown; every
step is idempotent, so the caller may simply retry). ``window`` costs two pipelined reads: the
earliest ids of every shard after the ``(deliver_at_ms, msg_id)`` cursor (about twice its share
of ``limit``, one script call per shard), then the records of the ``limit`` earliest overall.
Redis orders equal scores by member bytes, which is ``msg_id`` order, so a shard's ``due`` ZSET
is in the window's key order; the script finds the cursor's rank in O(log n) however many
messages share its millisecond (ZRANK when the cursor's id is in that shard at that time, else
a binary search over that time's ranks), so paging through ties is not quadratic.

Scripts are loaded at ``open`` and called by SHA. A single call reloads a missing script by
itself (redis-py's ``AsyncScript``); a pipeline is retried once after reloading, which is safe
because a MULTI/EXEC runs one script kind, so either every EVALSHA in it failed or none did.

Unreachable, loading, read-only or out-of-memory Redis raises
:class:`~delayserver.store.DelayStoreUnavailable`. The client has short socket timeouts, one
retry of a connection error (a pooled connection that died with a restarted server is replaced
transparently) and a health check on connections idle for a while; it reconnects by itself when
Redis comes back.
"""

from __future__ import annotations

import asyncio
import heapq
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript

from broker_core.message import Message
from delayserver.store import DelayedInfo, DelayState, DelayStoreUnavailable, Due, encode_message

CONNECT_TIMEOUT_S = 2.0
OP_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 1.0
#: A pooled connection idle this long is PINGed before use, so a dead server is noticed there.
HEALTH_CHECK_INTERVAL_S = 5
#: Finished ids forgotten per script call: long scripts would stall every other Redis client.
PURGE_CHUNK = 1000

_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica after failover
    redis.exceptions.OutOfMemoryError,
)

_STATE_OF = {b"s": DelayState.SCHEDULED, b"d": DelayState.DELIVERED, b"c": DelayState.CANCELLED}

# Every script gets the shard's keys in this order.
_KEYS_DOC = "-- KEYS: 1 due, 2 msg, 3 meta, 4 done\n"

_SCHEDULE_LUA = (
    _KEYS_DOC
    + """-- ARGV: (msg_id, deliver_at_ms, meta, record) per message; returns 1 = stored, 0 = known
local out = {}
for i = 1, #ARGV, 4 do
  local id = ARGV[i]
  if redis.call('HSETNX', KEYS[3], id, ARGV[i + 2]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], id)
    redis.call('HSET', KEYS[2], id, ARGV[i + 3])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)

# scheduled -> delivered or cancelled; returns the meta after the call (false when unknown).
_FINISH_FN = """local function finish(id, state, at)
  local meta = redis.call('HGET', KEYS[3], id)
  if meta and string.sub(meta, 1, 2) == 's|' then
    meta = state .. '|' .. string.match(meta, '^s|(.*)|[^|]*$') .. '|' .. at
    redis.call('HSET', KEYS[3], id, meta)
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZADD', KEYS[4], at, id)
  end
  return meta
end
"""

_MARK_DELIVERED_LUA = (
    _KEYS_DOC
    + _FINISH_FN
    + """-- ARGV: released_at_ms, msg_id...
for i = 2, #ARGV do
  finish(ARGV[i], 'd', ARGV[1])
end
return 0
"""
)

_CANCEL_LUA = (
    _KEYS_DOC
    + _FINISH_FN
    + """-- ARGV: msg_id, now_ms
return finish(ARGV[1], 'c', ARGV[2])
"""
)

_RESCHEDULE_LUA = (
    _KEYS_DOC
    + """-- ARGV: msg_id, deliver_at_ms; moves it only while scheduled; returns the meta after
local meta = redis.call('HGET', KEYS[3], ARGV[1])
if meta and string.sub(meta, 1, 2) == 's|' then
  meta = 's|' .. string.match(meta, '^s|(.*)|[^|]*|[^|]*$') .. '|' .. ARGV[2] .. '|'
  redis.call('HSET', KEYS[3], ARGV[1], meta)
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
return meta
"""
)

_PURGE_LUA = (
    _KEYS_DOC
    + """-- ARGV: finished_before_ms (exclusive), limit; returns how many were forgotten
local ids = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[2])
if #ids > 0 then
  redis.call('HDEL', KEYS[3], unpack(ids))
  redis.call('ZREM', KEYS[4], unpack(ids))
end
return #ids
"""
)


_WINDOW_LUA = (
    _KEYS_DOC
    + """-- ARGV: from_ms, after_msg_id, to_ms, count
-- Returns (msg_id, deliver_at_ms) flattened, at most count, by (time, id): those with
-- time < to_ms and (time, id) > (from_ms, after_msg_id). Ranks, not BYLEX (undefined across
-- scores); ids compared bytewise here, since Lua compares strings by the server's locale.
local function le(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end
local from, after = ARGV[1], ARGV[2]
local start = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. from)
local stop = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[3])
if after ~= '' then
  local score = redis.call('ZSCORE', KEYS[1], after)
  if score and tonumber(score) == tonumber(from) then
    start = redis.call('ZRANK', KEYS[1], after) + 1
  else
    -- The first rank at this time whose id sorts after the cursor's.
    local hi = start + redis.call('ZCOUNT', KEYS[1], from, from)
    while start < hi do
      local mid = math.floor((start + hi) / 2)
      if le(redis.call('ZRANGE', KEYS[1], mid, mid)[1], after) then
        start = mid + 1
      else
        hi = mid
      end
    end
  end
end
stop = math.min(stop, start + tonumber(ARGV[4])) - 1
local out = {}
if stop < start then return out end
local got = redis.call('ZRANGE', KEYS[1], start, stop, 'WITHSCORES')
for i = 1, #got, 2 do
  out[i] = got[i]
  out[i + 1] = tonumber(got[i + 1])
end
return out
"""
)


class RedisDelayStore:
    """Implements :class:`delayserver.store.DelayStore` on Redis (see the module docstring).

    ``client`` may be injected (fakeredis in tests, or a client configured elsewhere); it must
    not decode responses, and the store leaves closing it to whoever made it.
    """

    def __init__(
        self,
        url: str,
        *,
        shards: int = 16,
        prefix: str = "tempomq",
        history_ms: int = 72 * 3600_000,
        client: redis.asyncio.Redis | None = None,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        if "{" in prefix or "}" in prefix:
            raise ValueError("prefix must not contain '{' or '}' (they delimit the hash tag)")
        self.url = url
        self.shards = shards
        self.prefix = prefix
        self.history_ms = history_ms
        self._injected = client
        self._client: redis.asyncio.Redis | None = None  # set while open
        self._keys = [
            [f"{prefix}:{{d{s}}}:{name}" for name in ("due", "msg", "meta", "done")]
            for s in range(shards)
        ]
        self._scripts: dict[str, AsyncScript] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and load the scripts; raises DelayStoreUnavailable when Redis is down."""
        if self._client is None:
            self._client = self._injected if self._injected is not None else self._connect()
        client = self._client
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the Redis client must not decode responses (records are bytes)")
        self._scripts = {
            "schedule": client.register_script(_SCHEDULE_LUA),
            "mark_delivered": client.register_script(_MARK_DELIVERED_LUA),
            "cancel": client.register_script(_CANCEL_LUA),
            "reschedule": client.register_script(_RESCHEDULE_LUA),
            "purge": client.register_script(_PURGE_LUA),
            "window": client.register_script(_WINDOW_LUA),
        }
        await self._load_scripts()

    def _connect(self) -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(
            self.url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=OP_TIMEOUT_S,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            # Retry a connection error once (a pooled connection that died with a restarted
            # server), never a timeout: the command may have run, and the caller should know.
            retry=Retry(
                ExponentialBackoff(cap=0.2, base=0.02),
                1,
                supported_errors=(redis.exceptions.ConnectionError,),
            ),
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client is not self._injected:
            await client.aclose()

    async def health(self) -> str | None:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await self._redis().ping()
        except TimeoutError:
            return f"redis did not answer PING within {HEALTH_TIMEOUT_S} s"
        except (redis.exceptions.RedisError, OSError, DelayStoreUnavailable) as e:
            return f"redis unavailable: {e}"
        return None

    # -- operations ------------------------------------------------------------------------------

    async def schedule(self, items: Sequence[tuple[Message, int]]) -> list[bool]:
        by_shard: dict[int, list[int]] = {}  # shard -> positions in items
        args: dict[int, list[bytes | int]] = {}
        for pos, (msg, deliver_at_ms) in enumerate(items):
            if not msg.msg_id:
                raise ValueError("a message must have its msg_id before it is scheduled")
            s = self._shard(msg.msg_id)
            by_shard.setdefault(s, []).append(pos)
            meta = b"s|%s|%d|" % (msg.topic.encode(), deliver_at_ms)
            args.setdefault(s, []).extend((msg.msg_id, deliver_at_ms, meta, encode_message(msg)))
        results = await self._run_per_shard("schedule", args, transaction=True)
        out = [False] * len(items)
        for s, flags in zip(args, results, strict=True):
            for pos, flag in zip(by_shard[s], flags, strict=True):
                out[pos] = bool(flag)
        return out

    async def window(
        self, from_ms: int, to_ms: int, limit: int, *, after_msg_id: bytes = b""
    ) -> list[Due]:
        if limit <= 0 or from_ms >= to_ms:
            return []
        async with self._available():
            chosen = await self._earliest(from_ms, after_msg_id, to_ms, limit)
            by_shard: dict[int, list[bytes]] = {}
            for msg_id, _at in chosen:
                by_shard.setdefault(self._shard(msg_id), []).append(msg_id)
            pipe = self._redis().pipeline(transaction=False)
            for s, ids in by_shard.items():
                pipe.hmget(self._keys[s][1], ids)
            fetched: list[list[bytes | None]] = await pipe.execute()
        records = {
            msg_id: record
            for ids, recs in zip(by_shard.values(), fetched, strict=True)
            for msg_id, record in zip(ids, recs, strict=True)
        }
        # A record gone between the two reads was delivered or cancelled meanwhile.
        return [
            Due(msg_id, at, record)
            for msg_id, at in chosen
            if (record := records.get(msg_id)) is not None
        ]

    async def _earliest(
        self, from_ms: int, after_msg_id: bytes, to_ms: int, limit: int
    ) -> list[tuple[bytes, int]]:
        """The first ``limit`` (msg_id, deliver_at_ms) of all shards after the cursor
        ``(from_ms, after_msg_id)``, by (time, id).

        Asking every shard for ``limit`` would read ``shards`` times more than needed. Ids
        spread evenly over shards, so each is first asked for about twice its share. A shard
        that returned all it was asked for may hold more, so the merge is only complete up to
        the smallest last (time, id) among such shards; when that yields fewer than ``limit``,
        those shards are asked for more, continuing after the last (time, id) each returned,
        up to four times as many in all (at most ``limit``, which is always complete). Usually
        one round trip; a few at most.
        """
        ask = min(limit, -(-2 * limit // self.shards) + 16)
        got: dict[int, list[tuple[bytes, int]]] = {s: [] for s in range(self.shards)}
        todo = list(range(self.shards))
        while True:
            args: dict[int, list[bytes | int]] = {}
            for s in todo:
                last_id, last_at = got[s][-1] if got[s] else (after_msg_id, from_ms)
                args[s] = [last_at, last_id, to_ms, ask - len(got[s])]
            replies = await self._run_per_shard("window", args, transaction=False)
            for s, flat in zip(todo, replies, strict=True):
                got[s].extend(zip(flat[::2], map(int, flat[1::2]), strict=True))
            # A short reply means the shard has no more: only full ones may hold more.
            todo = [s for s in todo if len(got[s]) == ask] if ask < limit else []
            bound = min((_by_time(got[s][-1]) for s in todo), default=None)
            chosen: list[tuple[bytes, int]] = []
            for pair in heapq.merge(*got.values(), key=_by_time):
                if len(chosen) == limit or (bound is not None and _by_time(pair) > bound):
                    break
                chosen.append(pair)
            if len(chosen) == limit or not todo:
                return chosen
            ask = min(limit, ask * 4)

    async def due(self, msg_id: bytes) -> Due | None:
        keys = self._keys[self._shard(msg_id)]
        async with self._available():
            # MULTI/EXEC (one slot): the state and the record are read at one instant.
            pipe = self._redis().pipeline(transaction=True)
            pipe.hget(keys[2], msg_id)
            pipe.hget(keys[1], msg_id)
            meta, record = await pipe.execute()
        info = _info(msg_id, meta)
        if info is None or info.state is not DelayState.SCHEDULED or record is None:
            return None
        return Due(msg_id, info.deliver_at_ms, record)

    async def mark_delivered(self, msg_ids: Sequence[bytes], released_at_ms: int) -> None:
        args: dict[int, list[bytes | int]] = {}
        for msg_id in msg_ids:
            args.setdefault(self._shard(msg_id), [released_at_ms]).append(msg_id)
        await self._run_per_shard("mark_delivered", args, transaction=True)

    async def cancel(self, msg_id: bytes, now_ms: int) -> DelayedInfo | None:
        return await self._one_shard_step("cancel", msg_id, now_ms)

    async def reschedule(self, msg_id: bytes, deliver_at_ms: int) -> DelayedInfo | None:
        return await self._one_shard_step("reschedule", msg_id, deliver_at_ms)

    async def get(self, msg_id: bytes) -> DelayedInfo | None:
        async with self._available():
            meta = await self._redis().hget(self._keys[self._shard(msg_id)][2], msg_id)
        return _info(msg_id, meta)

    async def pending(self) -> int:
        async with self._available():
            pipe = self._redis().pipeline(transaction=False)
            for keys in self._keys:
                pipe.zcard(keys[0])
            counts: list[int] = await pipe.execute()
        return sum(counts)

    async def purge(self, finished_before_ms: int) -> int:
        """Forgets in chunks of PURGE_CHUNK per shard per round trip; each chunk is complete
        by itself, so an interrupted purge leaves nothing inconsistent."""
        total = 0
        shards = list(range(self.shards))
        while shards:
            args: dict[int, list[bytes | int]] = {
                s: [finished_before_ms, PURGE_CHUNK] for s in shards
            }
            counts = await self._run_per_shard("purge", args, transaction=False)
            total += sum(counts)
            shards = [s for s, n in zip(shards, counts, strict=True) if n == PURGE_CHUNK]
        return total

    # -- plumbing --------------------------------------------------------------------------------

    def _shard(self, msg_id: bytes) -> int:
        return zlib.crc32(msg_id) % self.shards

    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            raise DelayStoreUnavailable("delay store is not open")
        return self._client

    @asynccontextmanager
    async def _available(self) -> AsyncIterator[None]:
        try:
            yield
        except _UNAVAILABLE as e:
            raise DelayStoreUnavailable(f"redis unavailable: {e}") from e

    async def _load_scripts(self) -> None:
        async with self._available():
            for script in self._scripts.values():
                script.sha = await self._redis().script_load(script.script)

    async def _one_shard_step(self, name: str, msg_id: bytes, arg: int) -> DelayedInfo | None:
        script = self._scripts[name]
        async with self._available():
            meta = await script(keys=self._keys[self._shard(msg_id)], args=(msg_id, arg))
        return _info(msg_id, meta)

    async def _run_per_shard(
        self, name: str, args: dict[int, list[bytes | int]], *, transaction: bool
    ) -> list[Any]:
        """One call of script ``name`` per shard in ``args``, all in one pipeline; results in
        the order of ``args``."""
        if not args:
            return []
        async with self._available():
            try:
                return await self._pipeline_call(name, args, transaction=transaction)
            except redis.exceptions.NoScriptError:
                # Redis restarted or flushed its script cache. In a MULTI/EXEC every call was
                # to this one script and so failed alike: nothing ran, running again is safe.
                # Without a transaction, the steps that use it (purge) are idempotent.
                await self._load_scripts()
                return await self._pipeline_call(name, args, transaction=transaction)

    async def _pipeline_call(
        self, name: str, args: dict[int, list[bytes | int]], *, transaction: bool
    ) -> list[Any]:
        sha = self._scripts[name].sha
        pipe = self._redis().pipeline(transaction=transaction)
        for s, shard_args in args.items():
            # evalsha directly, not through AsyncScript, which would add a SCRIPT EXISTS round
            # trip to every pipeline.
            pipe.evalsha(sha, 4, *self._keys[s], *shard_args)
        return list(await pipe.execute())


def _by_time(pair: tuple[bytes, int]) -> tuple[int, bytes]:
    return pair[1], pair[0]


def _info(msg_id: bytes, meta: bytes | str | None) -> DelayedInfo | None:
    """Parse ``state|topic|deliver_at_ms|finished_at_ms``."""
    if not meta:
        return None
    assert isinstance(meta, bytes)  # open() refuses a client that decodes responses
    topic, deliver_at, _finished_at = meta[2:].rsplit(b"|", 2)
    return DelayedInfo(msg_id, topic.decode(), int(deliver_at), _STATE_OF[meta[:1]])
