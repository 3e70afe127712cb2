"""RedisDelayStore: delayed messages in Redis, split into hash-tagged shards.

Layout, for shard ``s`` of ``shards`` (a message's shard is ``crc32(msg_id) % shards``)::

    {prefix}:{d<s>}:due    ZSET  msg_id -> deliver_at_ms           scheduled only
    {prefix}:{d<s>}:msg    HASH  msg_id -> encoded record          scheduled only
    {prefix}:{d<s>}:meta   HASH  msg_id -> "state|topic|deliver_at_ms|finished_at_ms"   all
    {prefix}:{d<s>}:done   ZSET  msg_id -> finished_at_ms          delivered and cancelled
    {prefix}:{d<s>}:lease  STRING  owner id of the delay server releasing this shard (PX ttl)
    {prefix}:{d<s>}:inbox  LIST  ids changed by another server, for the lease holder to re-read
    {prefix}:servers       ZSET  owner id -> expiry_ms                live delay servers

The ``{d<s>}`` hash tag puts one shard's keys in one Redis Cluster slot, so every step on a
shard is a single Lua script on a single node, and a shard is leased whole to one of several
delay servers (:mod:`delayserver.leases`). ``meta`` is the source of truth for a message's state
and makes ``schedule`` idempotent (HSETNX); it outlives the record so that a finished message can
still be queried until ``purge`` forgets it. The state is one letter (``s`` scheduled, ``r``
being released, ``d`` delivered, ``c`` cancelled) and the finished time is empty until
finished; the topic sits between the first and the last two ``|``, so a topic containing ``|``
would still parse.

Several servers. A store made with an ``owner`` id tells the lease holder of a shard about every
change it makes there while not holding that shard itself: scheduling a message due before
``near_until_ms``, a cancel, a reschedule push the id onto the shard's ``inbox`` in the same
script, atomically with the change and the check of the lease, so a change never slips between a
lease moving and the new holder's first read. ``claim`` moves due messages from ``s`` to ``r``
just before their release, so a cancel racing a release on another server either wins (the
release skips the message) or answers "delivered"; an ``r`` message stays in ``due`` until it
is marked delivered, so a holder that dies mid-release leaves it for the next one.

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
import dataclasses
import heapq
import zlib
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript

from broker_core.message import Message
from delayserver.id_filter import HeldIds
from delayserver.store import (
    RECORD_QUEUE_AT,
    RECORD_STUB_BYTES,
    DelayedInfo,
    DelayState,
    DelayStoreUnavailable,
    Due,
    encode_message,
    queue_of,
)

#: URL schemes that mean a Redis Cluster (any node's address; the client discovers the rest).
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
CONNECT_TIMEOUT_S = 2.0
OP_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 1.0
#: A pooled connection idle this long is PINGed before use, so a dead server is noticed there.
HEALTH_CHECK_INTERVAL_S = 5
#: Finished ids forgotten per script call: long scripts would stall every other Redis client.
PURGE_CHUNK = 1000
#: Ids asked for per HSCAN while the id filter loads.
SCAN_PAGE = 5000

_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica after failover
    redis.exceptions.OutOfMemoryError,
    # A Redis Cluster in failover, once the client's own retries are spent.
    redis.exceptions.ClusterDownError,  # includes MasterDownError
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)

#: "r" (being released) answers as delivered: it is past cancelling and will be in its topic.
_STATE_OF = {
    b"s": DelayState.SCHEDULED,
    b"r": DelayState.DELIVERED,
    b"d": DelayState.DELIVERED,
    b"c": DelayState.CANCELLED,
}

# Every script gets the shard's keys in this order.
_KEYS_DOC = "-- KEYS: 1 due, 2 msg, 3 meta, 4 done, 5 lease, 6 inbox\n"
_NKEYS = 6

# Tell the lease holder, unless that is the caller (owner '' never tells: a single server).
_NOTIFY_FN = """local function others_hold(owner)
  return owner ~= '' and redis.call('GET', KEYS[5]) ~= owner
end
"""

_SCHEDULE_LUA = (
    _KEYS_DOC
    + _NOTIFY_FN
    + """-- ARGV: owner, near_until_ms, then (msg_id, deliver_at_ms, meta, record) per message;
-- returns 1 = stored, 0 = known
local out = {}
local notify = others_hold(ARGV[1])
local near = tonumber(ARGV[2])
for i = 3, #ARGV, 4 do
  local id = ARGV[i]
  if redis.call('HSETNX', KEYS[3], id, ARGV[i + 2]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], id)
    redis.call('HSET', KEYS[2], id, ARGV[i + 3])
    if notify and tonumber(ARGV[i + 1]) < near then
      redis.call('RPUSH', KEYS[6], id)
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)

# Scheduled (or, with releasing, being released) -> state; returns the meta after the call
# (false when unknown). The record goes, or with stub only its first bytes stay (a cancelled
# message's queue id, for a resend's answer).
_FINISH_FN = """local function finish(id, state, at, releasing, stub)
  local meta = redis.call('HGET', KEYS[3], id)
  local from = meta and string.sub(meta, 1, 2)
  if from == 's|' or (releasing and from == 'r|') then
    meta = state .. '|' .. string.match(meta, '^.|(.*)|[^|]*$') .. '|' .. at
    redis.call('HSET', KEYS[3], id, meta)
    redis.call('ZREM', KEYS[1], id)
    local record = stub and redis.call('HGET', KEYS[2], id)
    if record then
      redis.call('HSET', KEYS[2], id, string.sub(record, 1, stub))
    else
      redis.call('HDEL', KEYS[2], id)
    end
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
  finish(ARGV[i], 'd', ARGV[1], true, false)
end
return 0
"""
)

_CANCEL_LUA = (
    _KEYS_DOC
    + _NOTIFY_FN
    + _FINISH_FN
    + """-- ARGV: msg_id, now_ms, owner, stub_bytes
local before = redis.call('HGET', KEYS[3], ARGV[1])
local meta = finish(ARGV[1], 'c', ARGV[2], false, tonumber(ARGV[4]))
if meta ~= before and others_hold(ARGV[3]) then
  redis.call('RPUSH', KEYS[6], ARGV[1])
end
return meta
"""
)

_RESCHEDULE_LUA = (
    _KEYS_DOC
    + _NOTIFY_FN
    + """-- ARGV: msg_id, deliver_at_ms, owner; moves it only while scheduled;
-- returns the meta after
local meta = redis.call('HGET', KEYS[3], ARGV[1])
if meta and string.sub(meta, 1, 2) == 's|' then
  meta = 's|' .. string.match(meta, '^s|(.*)|[^|]*|[^|]*$') .. '|' .. ARGV[2] .. '|'
  redis.call('HSET', KEYS[3], ARGV[1], meta)
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  if others_hold(ARGV[3]) then
    redis.call('RPUSH', KEYS[6], ARGV[1])
  end
end
return meta
"""
)

_CLAIM_LUA = (
    _KEYS_DOC
    + """-- ARGV: now_ms, msg_id...; returns per id 1 when it may be released now (scheduled
-- and due, now marked being released; or already being released after a crash), else 0
local out = {}
local now = tonumber(ARGV[1])
for i = 2, #ARGV do
  local id = ARGV[i]
  local meta = redis.call('HGET', KEYS[3], id)
  local from = meta and string.sub(meta, 1, 2)
  local ok = 0
  if from == 'r|' then
    ok = 1
  elseif from == 's|' and tonumber(string.match(meta, '|(-?%d+)|[^|]*$')) <= now then
    redis.call('HSET', KEYS[3], id, 'r' .. string.sub(meta, 2))
    ok = 1
  end
  out[#out + 1] = ok
end
return out
"""
)

_RENEW_LUA = (
    _KEYS_DOC
    + """-- ARGV: owner, ttl_ms; 1 when the caller held the lease and it is extended, else 0
if redis.call('GET', KEYS[5]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[5], ARGV[2])
  return 1
end
return 0
"""
)

_GIVE_UP_LUA = (
    _KEYS_DOC
    + """-- ARGV: owner; drops the lease if the caller holds it
if redis.call('GET', KEYS[5]) == ARGV[1] then
  redis.call('DEL', KEYS[5])
  return 1
end
return 0
"""
)

_PURGE_LUA = (
    _KEYS_DOC
    + """-- ARGV: finished_before_ms (exclusive), limit; returns how many were forgotten
local ids = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[2])
if #ids > 0 then
  redis.call('HDEL', KEYS[3], unpack(ids))
  redis.call('HDEL', KEYS[2], unpack(ids))
  redis.call('ZREM', KEYS[4], unpack(ids))
end
return #ids
"""
)

_FIND_LUA = (
    _KEYS_DOC
    + """-- ARGV: msg_id...; returns per id its meta and the two queue-id bytes of its record (or
-- of a cancelled one's stub), each false when there is none
local out = {}
for i = 1, #ARGV do
  local meta = redis.call('HGET', KEYS[3], ARGV[i])
  local record = meta and redis.call('HGET', KEYS[2], ARGV[i])
  out[#out + 1] = meta
  out[#out + 1] = record and string.sub(record, QUEUE_FROM, QUEUE_FROM + 1)
end
return out
""".replace("QUEUE_FROM", str(RECORD_QUEUE_AT + 1))
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
        client: redis.asyncio.Redis | RedisCluster | None = None,
        owner: str = "",
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        if "{" in prefix or "}" in prefix:
            raise ValueError("prefix must not contain '{' or '}' (they delimit the hash tag)")
        self.url = url
        self.shards = shards
        self.prefix = prefix
        self.history_ms = history_ms
        #: This server's id when several share the store (see the module docstring), else "".
        self.owner = owner
        #: Changes to messages due before this go to the lease holder's inbox (set by the
        #: delay service to the end of its window, a little ahead).
        self.near_until_ms = 0
        self._injected = client
        self._client: redis.asyncio.Redis | RedisCluster | None = None  # set while open
        #: Redis Cluster: no MULTI/EXEC across shards (slots); each shard's step stays atomic.
        self.cluster = isinstance(client, RedisCluster) or url.startswith(CLUSTER_SCHEMES)
        self._keys = [
            [
                f"{prefix}:{{d{s}}}:{name}"
                for name in ("due", "msg", "meta", "done", "lease", "inbox")
            ]
            for s in range(shards)
        ]
        self._servers_key = f"{prefix}:servers"
        self._scripts: dict[str, AsyncScript] = {}
        #: The ids this store may hold, as far as this server knows (:meth:`find`).
        self._ids = HeldIds(
            name="redis-delay-store",
            count=self._count_ids,
            read=self._all_ids,
            errors=(DelayStoreUnavailable,),
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and load the scripts; raises DelayStoreUnavailable when Redis is down."""
        if self._client is None:
            self._client = self._injected if self._injected is not None else self._connect()
        client = self._client
        if isinstance(client, RedisCluster):
            decodes = client.get_encoder().decode_responses
        else:
            decodes = client.connection_pool.connection_kwargs.get("decode_responses")
        if decodes:
            raise ValueError("the Redis client must not decode responses (records are bytes)")
        self._scripts = {
            "schedule": client.register_script(_SCHEDULE_LUA),
            "mark_delivered": client.register_script(_MARK_DELIVERED_LUA),
            "cancel": client.register_script(_CANCEL_LUA),
            "reschedule": client.register_script(_RESCHEDULE_LUA),
            "purge": client.register_script(_PURGE_LUA),
            "window": client.register_script(_WINDOW_LUA),
            "claim": client.register_script(_CLAIM_LUA),
            "renew": client.register_script(_RENEW_LUA),
            "give_up": client.register_script(_GIVE_UP_LUA),
            "find": client.register_script(_FIND_LUA),
        }
        await self._load_scripts()
        self._ids.start()

    def _connect(self) -> redis.asyncio.Redis | RedisCluster:
        if self.cluster:
            # redis+cluster://host:port: any node of the cluster; the client finds the rest.
            return RedisCluster.from_url(
                self.url.replace("+cluster://", "://", 1),
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=OP_TIMEOUT_S,
                health_check_interval=HEALTH_CHECK_INTERVAL_S,
            )
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
        await self._ids.stop()
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
        with self._ids.writing([msg.msg_id for msg, _at in items]):
            return await self._schedule(items)

    async def _schedule(self, items: Sequence[tuple[Message, int]]) -> list[bool]:
        by_shard: dict[int, list[int]] = {}  # shard -> positions in items
        args: dict[int, list[bytes | int | str]] = {}
        for pos, (msg, deliver_at_ms) in enumerate(items):
            if not msg.msg_id:
                raise ValueError("a message must have its msg_id before it is scheduled")
            s = self.shard_of(msg.msg_id)
            by_shard.setdefault(s, []).append(pos)
            meta = b"s|%s|%d|" % (msg.topic.encode(), deliver_at_ms)
            shard_args = args.get(s)
            if shard_args is None:
                shard_args = args[s] = [self.owner, self.near_until_ms]
            shard_args.extend((msg.msg_id, deliver_at_ms, meta, encode_message(msg)))
        results = await self._run_per_shard("schedule", args, transaction=True)
        return _in_order(len(items), by_shard, results)

    async def window(
        self,
        from_ms: int,
        to_ms: int,
        limit: int,
        *,
        after_msg_id: bytes = b"",
        shards: Collection[int] | None = None,
    ) -> list[Due]:
        """As the protocol says; ``shards`` restricts it to those shards (None: all)."""
        if limit <= 0 or from_ms >= to_ms:
            return []
        wanted = sorted(set(range(self.shards) if shards is None else shards))
        if not wanted:
            return []
        async with self._available():
            chosen = await self._earliest(from_ms, after_msg_id, to_ms, limit, wanted)
            by_shard: dict[int, list[bytes]] = {}
            for msg_id, _at in chosen:
                by_shard.setdefault(self.shard_of(msg_id), []).append(msg_id)
            pipe = self._redis().pipeline(transaction=False)
            for s, ids in by_shard.items():
                pipe.hmget(self._keys[s][1], ids)
            fetched: list[list[bytes | None]] = await pipe.execute()
        records = {
            msg_id: record
            for ids, recs in zip(by_shard.values(), fetched, strict=True)
            for msg_id, record in zip(ids, recs, strict=True)
        }
        # A record gone between the two reads (or cut to a stub) was delivered or cancelled
        # meanwhile.
        return [
            Due(msg_id, at, record)
            for msg_id, at in chosen
            if (record := records.get(msg_id)) is not None and len(record) > RECORD_STUB_BYTES
        ]

    async def _earliest(
        self, from_ms: int, after_msg_id: bytes, to_ms: int, limit: int, shards: list[int]
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
        ask = min(limit, -(-2 * limit // len(shards)) + 16)
        got: dict[int, list[tuple[bytes, int]]] = {s: [] for s in shards}
        todo = list(shards)
        while True:
            args: dict[int, list[bytes | int | str]] = {}
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
        keys = self._keys[self.shard_of(msg_id)]
        async with self._available():
            # MULTI/EXEC (one slot): the state and the record are read at one instant.
            pipe = self._redis().pipeline(transaction=not self.cluster)
            pipe.hget(keys[2], msg_id)
            pipe.hget(keys[1], msg_id)
            meta, record = await pipe.execute()
        info = _info(msg_id, meta)
        if info is None or info.state is not DelayState.SCHEDULED or record is None:
            return None
        return Due(msg_id, info.deliver_at_ms, record)

    async def mark_delivered(self, msg_ids: Sequence[bytes], released_at_ms: int) -> None:
        args: dict[int, list[bytes | int | str]] = {}
        for msg_id in msg_ids:
            args.setdefault(self.shard_of(msg_id), [released_at_ms]).append(msg_id)
        await self._run_per_shard("mark_delivered", args, transaction=True)

    async def cancel(self, msg_id: bytes, now_ms: int) -> DelayedInfo | None:
        script = self._scripts["cancel"]
        async with self._available():
            meta = await script(
                keys=self._keys[self.shard_of(msg_id)],
                args=(msg_id, now_ms, self.owner, RECORD_STUB_BYTES),
            )
        return _info(msg_id, meta)

    def may_hold(self, msg_id: bytes) -> bool:
        return self._ids.may_hold(msg_id)

    async def find(self, msg_ids: Sequence[bytes]) -> list[DelayedInfo | None]:
        """As the protocol says. The id filter knows the ids held when this server opened the
        store and those it scheduled since; an id another server scheduled since is not in
        it, and is answered as not held (docs/operations.md, "Several servers")."""
        by_shard: dict[int, list[int]] = {}
        args: dict[int, list[bytes | int | str]] = {}
        may_hold = self._ids.may_hold
        for pos, msg_id in enumerate(msg_ids):
            if may_hold(msg_id):
                s = self.shard_of(msg_id)
                by_shard.setdefault(s, []).append(pos)
                args.setdefault(s, []).append(msg_id)
        out: list[DelayedInfo | None] = [None] * len(msg_ids)
        if not args:
            return out
        replies = await self._run_per_shard("find", args, transaction=False)
        for positions, flat in zip(by_shard.values(), replies, strict=True):
            for pos, meta, queue in zip(positions, flat[::2], flat[1::2], strict=True):
                info = _info(msg_ids[pos], meta)
                if info is not None:
                    out[pos] = dataclasses.replace(info, queue_id=queue_of(queue))
        return out

    async def _count_ids(self) -> int:
        """How many ids the store holds (every shard's ``meta``), in one round trip."""
        async with self._available():
            pipe = self._redis().pipeline(transaction=False)
            for keys in self._keys:
                pipe.hlen(keys[2])
            counts: list[int] = await pipe.execute()
        return sum(counts)

    async def _all_ids(self) -> AsyncIterator[list[bytes]]:
        """Every id the store holds, shard by shard, :data:`SCAN_PAGE` or so per round trip."""
        for keys in self._keys:
            cursor = 0
            while True:
                async with self._available():
                    cursor, page = await self._redis().hscan(keys[2], cursor, count=SCAN_PAGE)
                yield list(cast("dict[bytes, bytes]", page))
                if not cursor:
                    break

    async def reschedule(self, msg_id: bytes, deliver_at_ms: int) -> DelayedInfo | None:
        return await self._one_shard_step("reschedule", msg_id, deliver_at_ms)

    # -- several servers (delayserver.leases, DelayService) ----------------------------------------

    def shard_of(self, msg_id: bytes) -> int:
        return zlib.crc32(msg_id) % self.shards

    async def claim(self, msg_ids: Sequence[bytes], now_ms: int) -> list[bool]:
        """Mark due messages as being released, just before their release; False for those
        cancelled, rescheduled later or delivered meanwhile (possibly by another server)."""
        by_shard: dict[int, list[int]] = {}
        args: dict[int, list[bytes | int | str]] = {}
        for pos, msg_id in enumerate(msg_ids):
            s = self.shard_of(msg_id)
            by_shard.setdefault(s, []).append(pos)
            args.setdefault(s, [now_ms]).append(msg_id)
        results = await self._run_per_shard("claim", args, transaction=True)
        return _in_order(len(msg_ids), by_shard, results)

    async def heartbeat(self, ttl_ms: int, now_ms: int) -> list[str]:
        """Says this server is alive for ``ttl_ms``; returns the ids of the live servers."""
        key = self._servers_key
        async with self._available():
            pipe = self._redis().pipeline(transaction=False)
            pipe.zadd(key, {self.owner: now_ms + ttl_ms})
            pipe.zremrangebyscore(key, "-inf", now_ms)
            pipe.zrange(key, 0, -1)
            pipe.pexpire(key, ttl_ms * 10)  # a store nobody uses any more forgets them
            replies = await pipe.execute()
        return sorted(member.decode() for member in replies[2])

    async def leave(self) -> None:
        async with self._available():
            await self._redis().zrem(self._servers_key, self.owner)

    async def lease_holders(self) -> list[str | None]:
        """The holder of each shard's lease (None when free)."""
        async with self._available():
            pipe = self._redis().pipeline(transaction=False)
            for keys in self._keys:
                pipe.get(keys[4])
            replies: list[bytes | None] = await pipe.execute()
        return [None if r is None else r.decode() for r in replies]

    async def acquire(self, shards: Sequence[int], ttl_ms: int) -> list[bool]:
        """Take the free leases among ``shards`` (SET NX PX)."""
        if not shards:
            return []
        async with self._available():
            pipe = self._redis().pipeline(transaction=False)
            for s in shards:
                pipe.set(self._keys[s][4], self.owner, nx=True, px=ttl_ms)
            replies = await pipe.execute()
        return [bool(r) for r in replies]

    async def renew(self, shards: Sequence[int], ttl_ms: int) -> list[bool]:
        """Extend the leases held; False for each one this server no longer holds."""
        args: dict[int, list[bytes | int | str]] = {s: [self.owner, ttl_ms] for s in shards}
        return [bool(r) for r in await self._run_per_shard("renew", args, transaction=False)]

    async def give_up(self, shards: Sequence[int]) -> None:
        args: dict[int, list[bytes | int | str]] = {s: [self.owner] for s in shards}
        await self._run_per_shard("give_up", args, transaction=False)

    async def clear_inbox(self, shards: Sequence[int]) -> None:
        if not shards:
            return
        async with self._available():
            await self._redis().delete(*[self._keys[s][5] for s in shards])

    async def inbox(self, shards: Sequence[int], max_ids: int = 1000) -> list[bytes]:
        """Takes the ids other servers changed in ``shards`` (up to ``max_ids`` per shard), in
        one round trip."""
        if not shards:
            return []
        async with self._available():
            pipe = self._redis().pipeline(transaction=False)
            for s in shards:
                pipe.lpop(self._keys[s][5], max_ids)
            replies: list[list[bytes] | None] = await pipe.execute()
        return [msg_id for ids in replies if ids for msg_id in ids]

    async def get(self, msg_id: bytes) -> DelayedInfo | None:
        async with self._available():
            meta = await self._redis().hget(self._keys[self.shard_of(msg_id)][2], msg_id)
        return _info(msg_id, meta)

    async def pending(self) -> int:
        async with self._available():
            pipe = self._redis().pipeline(transaction=False)
            for keys in self._keys:
                pipe.zcard(keys[0])
            counts: list[int] = await pipe.execute()
        return sum(counts)

    async def count_due(self, bounds_ms: Sequence[int]) -> list[int]:
        """ZCOUNT on each shard's time index (O(log n) each), in one round trip."""
        async with self._available():
            pipe = self._redis().pipeline(transaction=False)
            for bound in bounds_ms:
                for keys in self._keys:
                    pipe.zcount(keys[0], "-inf", f"({bound}")
            counts: list[int] = await pipe.execute()
        n = self.shards
        return [sum(counts[i * n : (i + 1) * n]) for i in range(len(bounds_ms))]

    async def lease_table(self) -> tuple[list[tuple[str | None, int]], list[tuple[str, int]]]:
        """Each shard's lease holder (None when free) with the lease's remaining ms (-2 when
        free), and the live servers with the time (epoch ms) their heartbeat runs out."""
        async with self._available():
            pipe = self._redis().pipeline(transaction=False)
            for keys in self._keys:
                pipe.get(keys[4])
                pipe.pttl(keys[4])
            pipe.zrange(self._servers_key, 0, -1, withscores=True)
            replies = await pipe.execute()
        shards = [
            (None if holder is None else holder.decode(), int(ttl))
            for holder, ttl in zip(replies[0:-1:2], replies[1:-1:2], strict=True)
        ]
        servers = [(member.decode(), int(score)) for member, score in replies[-1]]
        return shards, servers

    async def purge(self, finished_before_ms: int) -> int:
        """Forgets in chunks of PURGE_CHUNK per shard per round trip; each chunk is complete
        by itself, so an interrupted purge leaves nothing inconsistent."""
        total = 0
        shards = list(range(self.shards))
        while shards:
            args: dict[int, list[bytes | int | str]] = {
                s: [finished_before_ms, PURGE_CHUNK] for s in shards
            }
            counts = await self._run_per_shard("purge", args, transaction=False)
            total += sum(counts)
            shards = [s for s, n in zip(shards, counts, strict=True) if n == PURGE_CHUNK]
        return total

    # -- plumbing --------------------------------------------------------------------------------

    def _redis(self) -> redis.asyncio.Redis | RedisCluster:
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
            meta = await script(
                keys=self._keys[self.shard_of(msg_id)], args=(msg_id, arg, self.owner)
            )
        return _info(msg_id, meta)

    async def _run_per_shard(
        self, name: str, args: dict[int, list[bytes | int | str]], *, transaction: bool
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
        self, name: str, args: dict[int, list[bytes | int | str]], *, transaction: bool
    ) -> list[Any]:
        sha = self._scripts[name].sha
        client = self._redis()
        if self.cluster:
            # Cluster pipelines refuse EVALSHA: one call per shard, all in flight at once (the
            # client sends each to the node of its slot).
            return list(
                await asyncio.gather(
                    *(
                        client.evalsha(sha, _NKEYS, *self._keys[s], *shard_args)
                        for s, shard_args in args.items()
                    )
                )
            )
        pipe = client.pipeline(transaction=transaction)
        for s, shard_args in args.items():
            # evalsha directly, not through AsyncScript, which would add a SCRIPT EXISTS round
            # trip to every pipeline.
            pipe.evalsha(sha, _NKEYS, *self._keys[s], *shard_args)
        return list(await pipe.execute())


def _in_order(n: int, by_shard: dict[int, list[int]], results: list[Any]) -> list[bool]:
    """Per-shard lists of flags (in the order of ``by_shard``) back in the callers' order."""
    out = [False] * n
    for positions, flags in zip(by_shard.values(), results, strict=True):
        for pos, flag in zip(positions, flags, strict=True):
            out[pos] = bool(flag)
    return out


def _by_time(pair: tuple[bytes, int]) -> tuple[int, bytes]:
    return pair[1], pair[0]


def _info(msg_id: bytes, meta: bytes | str | None) -> DelayedInfo | None:
    """Parse ``state|topic|deliver_at_ms|finished_at_ms``."""
    if not meta:
        return None
    assert isinstance(meta, bytes)  # open() refuses a client that decodes responses
    topic, deliver_at, _finished_at = meta[2:].rsplit(b"|", 2)
    return DelayedInfo(msg_id, topic.decode(), int(deliver_at), _STATE_OF[meta[:1]])
