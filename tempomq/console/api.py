"""Inspection and admin routes of the HTTP API that the web console is built on.

Any client may use them; each answers from bounded work whatever the store holds: a page of a
queue, a page of in-flight deliveries, counts from indexes (the delay store's time index, the
transaction state index), counters the process keeps anyway. Nothing here reads every message.
They translate to the public methods of the three cores and reach into none of their internals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from broker_core import metrics as broker_metrics
from broker_core.errors import InvalidMessage, InvalidRequest, MessageNotFound, QueueNotFound
from broker_core.http import BROKER, json_response, render_message
from broker_core.message import StoredMessage, is_system_topic, parse_msg_id
from broker_core.retry import dlq_topic
from broker_core.store import MessageStore
from delayserver import service as delay_metrics
from delayserver.http import DELAY
from delayserver.store import decode_message
from tempomq.probe import default_metrics
from txcoord.coordinator import OUTCOMES
from txcoord.http import TX

routes = web.RouteTableDef()

#: Most items one page answers; the console asks for less.
MAX_PAGE = 200
DEFAULT_PAGE = 50

MINUTE_MS = 60_000
#: The delay timeline's buckets: (label, upper bound after now). A month is 30 days.
TIMELINE = (
    ("next minute", MINUTE_MS),
    ("next hour", 60 * MINUTE_MS),
    ("next day", 24 * 60 * MINUTE_MS),
    ("next month", 30 * 24 * 60 * MINUTE_MS),
)


def query_int(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    """An integer query parameter in [lo, hi]; ``400 invalid_request`` naming it otherwise."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter '{name}' must be an integer") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"query parameter '{name}' must be from {lo} to {hi}")
    return value


def page_limit(request: web.Request) -> int:
    limit = query_int(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    assert limit is not None
    return limit


def counter_total(counter: Counter) -> float:
    """A counter's value summed over its labels (the ``_total`` samples)."""
    return sum(
        s.value for family in counter.collect() for s in family.samples if s.name.endswith("_total")
    )


def gauge_value(gauge: Gauge) -> float | None:
    """An unlabelled gauge's value; None while it is NaN (never set)."""
    value = next(s.value for family in gauge.collect() for s in family.samples)
    return None if math.isnan(value) else value


def histogram_buckets(histogram: Histogram) -> dict[str, object]:
    """A histogram as per-bucket counts (not cumulative): ``le`` in seconds, ``count``."""
    buckets: list[dict[str, object]] = []
    total = 0.0
    sum_s = 0.0
    previous = 0.0
    for family in histogram.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                le = s.labels["le"]
                buckets.append(
                    {"le": None if le == "+Inf" else float(le), "count": s.value - previous}
                )
                previous = s.value
            elif s.name.endswith("_count"):
                total = s.value
            elif s.name.endswith("_sum"):
                sum_s = s.value
    return {"buckets": buckets, "count": total, "sum_s": sum_s}


# -- overview ------------------------------------------------------------------------------------


@routes.get("/v1/overview")
async def overview(request: web.Request) -> web.Response:
    """Counters (rates are their differences over time), lag, pending, transactions, probe."""
    broker = request.app[BROKER]
    probe = default_metrics()
    last_run_s = gauge_value(probe.last_run)
    ok = gauge_value(probe.ok)
    return json_response(
        {
            "now": broker.timers.now_ms(),
            "counters": {
                "stored": counter_total(broker_metrics.PUT_MESSAGES),
                "received": counter_total(broker_metrics.RECEIVED_MESSAGES),
                "acked": counter_total(broker_metrics.ACKED_MESSAGES),
                "redelivered": counter_total(broker_metrics.NACKED_MESSAGES),
                "dead_lettered": counter_total(broker_metrics.DLQ_MESSAGES),
                "delayed_scheduled": counter_total(delay_metrics.SCHEDULED),
                "delayed_released": counter_total(delay_metrics.RELEASED),
                "tx_finished": counter_total(OUTCOMES),
            },
            "topics": len(broker.list_topics()),
            "groups": len(broker.groups.groups),
            "lag": sum(lag for _g, _t, lag in broker.groups.lag_by_group()),
            "delayed_pending": await request.app[DELAY].store.pending(),
            "transactions": await request.app[TX].count_states(),
            # The verdict gauge stays NaN until a run in this process ends.
            "probe": None
            if ok is None
            else {"ok": ok == 1, "last_run_at": int((last_run_s or 0) * 1000)},
        }
    )


# -- topics: browse a queue, trace a message ----------------------------------------------------


def render_at_offset(m: StoredMessage) -> dict[str, object]:
    return {**render_message(m), "queue_offset": m.queue_offset}


@routes.get("/v1/topics/{topic}/queues/{queue_id}/messages")
async def browse_queue(request: web.Request) -> web.Response:
    """A page of one queue from ``offset`` (default: the newest page), or from the first
    message stored at or after ``since`` (epoch ms)."""
    broker = request.app[BROKER]
    name = request.match_info["topic"]
    topic = broker.get_topic(name)
    try:
        queue_id = int(request.match_info["queue_id"])
    except ValueError:
        raise InvalidRequest("queue_id must be an integer") from None
    if not 0 <= queue_id < topic.queues:
        raise QueueNotFound(f"topic {name!r} has queues 0 to {topic.queues - 1}")
    limit = page_limit(request)
    store = broker.store
    lo, hi = store.queue_bounds(name, queue_id)
    since = query_int(request, "since", None, 0, 1 << 62)
    offset = query_int(request, "offset", None, 0, 1 << 62)
    if since is not None:
        offset = store.search_offset(name, queue_id, since)
    elif offset is None:
        offset = max(lo, hi - limit)
    offset = max(offset, lo)
    cq = store.consume_queue(name, queue_id)
    messages = []
    end = min(offset + limit, hi)
    for i in range(offset, end):
        phy, size, _tag_hash = cq.get(i)
        m = store.read(phy) if size else None
        if m is not None:
            messages.append(render_at_offset(m))
    return json_response(
        {
            "topic": name,
            "queue_id": queue_id,
            "min_offset": lo,
            "max_offset": hi,
            "offset": offset,
            "next_offset": end,
            "messages": messages,
        }
    )


@routes.get("/v1/messages/{msg_id}/trace")
async def trace_message(request: web.Request) -> web.Response:
    """A message's full view: where it is stored, its delay schedule, and per group whether
    it was acked, is in flight (with its attempt) or is still waiting."""
    try:
        msg_id = parse_msg_id(request.match_info["msg_id"])
    except InvalidMessage as e:
        raise MessageNotFound(f"no message with that id: {e.message}") from None
    broker = request.app[BROKER]
    delayed = await request.app[DELAY].get(msg_id)
    records = broker.store.lookup_id(msg_id)
    stored = [m for m in records if not is_system_topic(m.topic)]
    if not stored and delayed is None:
        raise MessageNotFound(f"no message {msg_id.hex()}")
    out: dict[str, object] = {
        "msg_id": msg_id.hex(),
        "message": render_at_offset(stored[0]) if stored else None,
        "records": [
            {
                "topic": m.topic,
                "queue_id": m.queue_id,
                "queue_offset": m.queue_offset,
                "stored_at": m.stored_at,
            }
            for m in records
        ],
        "delayed": None
        if delayed is None
        else {
            "topic": delayed.topic,
            "deliver_at": delayed.deliver_at_ms,
            "state": delayed.state.value,
        },
        "groups": broker.groups.consumed_by(
            stored[0].topic, stored[0].queue_id, stored[0].queue_offset
        )
        if stored
        else [],
    }
    return json_response(out)


# -- groups ---------------------------------------------------------------------------------------


def _queue_total(store: MessageStore, topic: str) -> int:
    """Messages a topic holds now (0 when it does not exist)."""
    cfg = store.topics.get(topic)
    if cfg is None:
        return 0
    return sum(hi - lo for lo, hi in (store.queue_bounds(topic, q) for q in range(cfg.queues)))


@routes.get("/v1/groups")
async def list_groups(request: web.Request) -> web.Response:
    """Every group with its config, the topics it receives from with their lag, and the
    number of messages in its dead-letter topic."""
    broker = request.app[BROKER]
    lags: dict[str, dict[str, int]] = {}
    for group, topic, lag in broker.groups.lag_by_group():
        lags.setdefault(group, {})[topic] = lag
    groups = []
    for name, cfg in sorted(broker.groups.groups.items()):
        topics = sorted(set(broker.groups.subscriptions(name)) | set(lags.get(name, {})))
        dlq = dlq_topic(name)
        groups.append(
            {
                **cfg.to_json(),
                "topics": [{"topic": t, "lag": lags.get(name, {}).get(t)} for t in topics],
                "dlq_topic": dlq,
                "dlq_messages": _queue_total(broker.store, dlq),
            }
        )
    return json_response({"groups": groups})


@routes.delete("/v1/groups/{group}")
async def delete_group(request: web.Request) -> web.Response:
    """Delete a group: see :meth:`broker_core.broker.Broker.delete_group` for what goes."""
    return json_response(await request.app[BROKER].delete_group(request.match_info["group"]))


@routes.get("/v1/topics/{topic}/groups/{group}/inflight")
async def group_inflight(request: web.Request) -> web.Response:
    """A page of the group's deliveries not yet acked, with attempt and deadline."""
    broker = request.app[BROKER]
    topic = request.match_info["topic"]
    broker.get_topic(topic)
    found = await broker.groups.inflight(topic, request.match_info["group"], page_limit(request))
    return json_response(
        {
            "messages": [
                {
                    **render_message(f.message),
                    "queue_offset": f.offset,
                    "delivery_attempt": f.attempt,
                    "invisible_until": f.deadline_ms,
                    "redeliver_at": f.ready_at_ms,
                }
                for f in found
            ]
        }
    )


# -- delayed messages and delay servers ----------------------------------------------------------


def _timeline_bounds(now_ms: int) -> list[int]:
    return [now_ms] + [now_ms + after_ms for _label, after_ms in TIMELINE]


@routes.get("/v1/delay/timeline")
async def delay_timeline(request: web.Request) -> web.Response:
    """Counts of what falls due per bucket (overdue, next minute / hour / day / month, later),
    the next ``limit`` messages due, and the release lateness histogram."""
    service = request.app[DELAY]
    limit = page_limit(request)
    now = service.timers.now_ms()
    bounds = _timeline_bounds(now)
    cumulative = await service.store.count_due(bounds)
    pending = await service.store.pending()
    buckets = [{"label": "overdue", "from": None, "to": now, "count": cumulative[0]}]
    for i, (label, _after) in enumerate(TIMELINE):
        buckets.append(
            {
                "label": label,
                "from": bounds[i],
                "to": bounds[i + 1],
                "count": cumulative[i + 1] - cumulative[i],
            }
        )
    buckets.append(
        {"label": "later", "from": bounds[-1], "to": None, "count": pending - cumulative[-1]}
    )
    due = await service.store.window(0, 1 << 62, limit)
    return json_response(
        {
            "now": now,
            "pending": pending,
            "buckets": buckets,
            "next": [_render_due(d.msg_id, d.deliver_at_ms, d.record) for d in due],
            "lateness": histogram_buckets(delay_metrics.LATENESS),
        }
    )


def _render_due(msg_id: bytes, deliver_at_ms: int, record: bytes) -> dict[str, object]:
    msg = decode_message(record)
    return {
        "msg_id": msg_id.hex(),
        "topic": msg.topic,
        "deliver_at": deliver_at_ms,
        "tags": msg.tags,
        "keys": list(msg.keys),
    }


@routes.get("/v1/delay/servers")
async def delay_servers(request: web.Request) -> web.Response:
    """Which delay server holds which shard of a shared (Redis) delay store, and until when."""
    service = request.app[DELAY]
    table = getattr(service.store, "lease_table", None)
    if service.leases is None or table is None:
        return json_response(
            {"store": "embedded", "this_server": None, "shards": [], "servers": []}
        )
    shards, servers = await table()
    now = service.timers.now_ms()
    return json_response(
        {
            "store": "redis",
            "this_server": service.leases.store.owner,
            "shards": [
                {"shard": i, "holder": holder, "expires_at": now + ttl if ttl >= 0 else None}
                for i, (holder, ttl) in enumerate(shards)
            ],
            "servers": [
                {"server": server, "expires_at": until, "shards": _held(shards, server)}
                for server, until in servers
            ],
        }
    )


def _held(shards: Iterable[tuple[str | None, int]], server: str) -> int:
    return sum(1 for holder, _ttl in shards if holder == server)


# -- transactions ---------------------------------------------------------------------------------


@routes.get("/v1/transactions/{tx_id}/checks")
async def transaction_checks(request: web.Request) -> web.Response:
    coordinator = request.app[TX]
    tx_id = request.match_info["tx_id"]
    row = await coordinator.get(tx_id)
    return json_response(
        {**row.to_json(), "checks": await coordinator.check_history(tx_id, MAX_PAGE)}
    )
