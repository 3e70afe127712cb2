"""HTTP routes of the broker core (API.md: Messages, Consuming): parse, validate, render.

Every request is validated whole before anything is stored, so a bad message in a batch stores
none of the batch. Errors are raised as :mod:`broker_core.errors` exceptions; the app's middleware
turns them into the API's error bodies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Callable
from typing import Any, cast

import orjson
from aiohttp import web

from broker_core.broker import Broker
from broker_core.errors import (
    InvalidGroup,
    InvalidMessage,
    InvalidRequest,
    InvalidTopic,
    MessageNotFound,
    MessageTooLarge,
    MsgIdConflict,
    TempoError,
)
from broker_core.fields import as_int, check_fields, int_field, whole_number
from broker_core.groups import MAX_ATTEMPTS, Delivery, ReceiptFailure, parse_tags
from broker_core.message import (
    DLQ_PREFIX,
    FLAG_BODY_B64,
    MAX_KEY_LEN,
    PROP_DELIVER_AT,
    PROP_DELIVERY_ATTEMPT,
    PROP_DLQ_ORIGIN_TOPIC,
    PROP_ORIGIN_MSG_ID,
    PROP_REAL_QUEUE,
    PROP_REAL_TOPIC,
    PROP_RELEASED_AT,
    PROP_RETRY_TOPIC,
    PROP_SHARDING_KEY,
    Message,
    StoredMessage,
    parse_msg_id,
    validate_message_fields,
    validate_topic_name,
)
from broker_core.protocols import FirstSend
from broker_core.retry import real_topic

BROKER = web.AppKey("broker", Broker)
routes = web.RouteTableDef()
#: Request key an outer layer (the app's authorization) may set to a predicate on names; a
#: listing then shows only the names it accepts. Unset: the listing shows everything.
VISIBLE: web.RequestKey[Callable[[str], bool]] = web.RequestKey("visible")

MAX_BATCH = 1000
MAX_DELAY_MS = 10 * 365 * 24 * 3600 * 1000 + 3 * 24 * 3600 * 1000  # ten years, leap days included
#: 2001-01-01T00:00:00Z in epoch ms. An earlier ``deliver_at`` is almost surely epoch seconds
#: (1 796 026 867 s is 2026; as milliseconds it is January 1970), so it is refused, not run now.
MIN_DELIVER_AT_MS = 978_307_200_000
#: Properties the broker sets itself; a client may not send them.
RESERVED_PROPERTIES = frozenset(
    {
        PROP_ORIGIN_MSG_ID,
        PROP_RETRY_TOPIC,
        PROP_DELIVERY_ATTEMPT,
        PROP_REAL_TOPIC,
        PROP_REAL_QUEUE,
        PROP_DLQ_ORIGIN_TOPIC,
        PROP_DELIVER_AT,
        PROP_RELEASED_AT,
        PROP_SHARDING_KEY,
    }
)
_HIDDEN_PROPERTIES = frozenset(
    {PROP_ORIGIN_MSG_ID, PROP_RETRY_TOPIC, PROP_REAL_TOPIC, PROP_REAL_QUEUE}
)
_JSON = "application/json"
_SEND_PATH = re.compile(r"/v1/topics/[^/]+/messages")


def json_response(data: object, status: int = 200) -> web.Response:
    """``data`` as the API's JSON answer, ending with a newline as text on a terminal should."""
    return web.Response(body=orjson.dumps(data) + b"\n", status=status, content_type=_JSON)


def parse_json(raw: bytes, error: type[TempoError] = InvalidRequest) -> Any:
    """A request body as JSON (an empty body is ``{}``); raises ``error`` (400) if it is not."""
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise error(f"request body is not valid JSON: {e}") from None


async def read_json(request: web.Request, error: type[TempoError] = InvalidRequest) -> Any:
    return parse_json(await request.read(), error)


# -- messages in --------------------------------------------------------------------------------


def parse_message(obj: object, topic: str, *, max_body: int, now_ms: int) -> tuple[Message, int]:
    """One message of a send request → (message, deliver_at_ms). ``deliver_at_ms`` <= now means
    deliver now. Raises :class:`InvalidMessage` or ``MessageTooLarge`` with the reason."""
    if not isinstance(obj, dict):
        raise InvalidMessage("a message is a JSON object")
    check_fields(obj, "MessageIn", InvalidMessage)
    body, flags = _parse_body(obj, max_body)
    tags = obj.get("tags", "")
    if not isinstance(tags, str):
        raise InvalidMessage("'tags' must be a string")
    keys_obj = obj.get("keys", [])
    if not isinstance(keys_obj, list) or not all(isinstance(k, str) for k in keys_obj):
        raise InvalidMessage("'keys' must be a list of strings")
    keys = tuple(keys_obj)
    props = obj.get("properties", {})
    if not isinstance(props, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in props.items()
    ):
        raise InvalidMessage("'properties' must be an object of string values")
    reserved = RESERVED_PROPERTIES.intersection(props)
    if reserved:
        raise InvalidMessage(f"properties {sorted(reserved)} are set by the broker")
    validate_message_fields(body, tags, keys, props, max_body)
    sharding_key = obj.get("sharding_key")
    if sharding_key is not None and (
        not isinstance(sharding_key, str) or not 0 < len(sharding_key) <= MAX_KEY_LEN
    ):
        raise InvalidMessage(f"'sharding_key' must be a string of 1-{MAX_KEY_LEN} characters")
    msg_id = parse_msg_id(obj["msg_id"]) if obj.get("msg_id") is not None else b""
    deliver_at = parse_deliver_at(obj, now_ms)
    # Born now, even when delivered later: a message sent before its topic was deleted is then
    # told from one sent to a topic of that name created again (MessageStore.is_orphan).
    msg = Message(topic, body, tags, keys, props, msg_id, flags, born_at=now_ms)
    if sharding_key:
        msg.properties[PROP_SHARDING_KEY] = sharding_key
    return msg, deliver_at


def _parse_body(obj: dict[str, Any], max_body: int) -> tuple[bytes, int]:
    """The body bytes and their flag (text or base64), from exactly one of the two fields."""
    has_text, has_b64 = "body" in obj, "body_b64" in obj
    if has_text == has_b64:
        raise InvalidMessage("a message needs exactly one of 'body' and 'body_b64'")
    if has_text:
        text = obj["body"]
        if not isinstance(text, str):
            raise InvalidMessage("'body' must be a string (use 'body_b64' for bytes)")
        return text.encode(), 0
    b64 = obj["body_b64"]
    if not isinstance(b64, str):
        raise InvalidMessage("'body_b64' must be a base64 string")
    if len(b64) > (max_body // 3 + 2) * 4:
        # Too large whatever it decodes to: say so without decoding megabytes first.
        raise MessageTooLarge(f"body is over the limit of {max_body} bytes")
    try:
        return base64.b64decode(b64, validate=True), FLAG_BODY_B64
    except (binascii.Error, ValueError):
        raise InvalidMessage("'body_b64' is not valid base64") from None


def parse_deliver_at(obj: dict[str, Any], now_ms: int) -> int:
    """``delay_ms`` or ``deliver_at`` (at most one; neither means now) as epoch ms. A time in
    the past is kept as it is: it means now, and the message is released at once."""
    if "delay_ms" in obj and "deliver_at" in obj:
        raise InvalidMessage("give at most one of 'delay_ms' and 'deliver_at'")
    if "delay_ms" in obj:
        return now_ms + as_int(
            obj["delay_ms"], "delay_ms", lo=0, hi=MAX_DELAY_MS, error=InvalidMessage
        )
    if "deliver_at" not in obj:
        return now_ms
    at = whole_number(obj["deliver_at"])
    if at is None:
        raise InvalidMessage("'deliver_at' must be epoch milliseconds (an integer)")
    if at < MIN_DELIVER_AT_MS:
        raise InvalidMessage(
            f"'deliver_at' {at} looks like seconds (or is before 2001): it is epoch"
            f" milliseconds, such as {now_ms} for now; or use 'delay_ms'"
        )
    if at - now_ms > MAX_DELAY_MS:
        raise InvalidMessage(
            f"'deliver_at' is more than 10 years ahead: at most {now_ms + MAX_DELAY_MS}"
        )
    return at


@routes.post("/v1/topics/{topic}/messages")
async def send_messages(request: web.Request) -> web.Response:
    name = validate_topic_name(request.match_info["topic"], client=True)
    return json_response(await send(request.app[BROKER], name, await request.read()), status=201)


def unreadable_body_code(method: str, path: str) -> str:
    """The error code for a request body that cannot be read: the send route's
    ``invalid_message`` (API.md lists it for every bad send), else ``invalid_request``."""
    if method == "POST" and _SEND_PATH.fullmatch(path):
        return InvalidMessage.code
    return InvalidRequest.code


def unreadable_body(e: BaseException) -> str:
    """The error text for a request body that cannot be read as it was sent: ``e`` is
    aiohttp's ``RequestPayloadError`` (caused by the decoding error) or the decoding error."""
    cause = e.__cause__ or e
    reason = getattr(cause, "message", None) or str(cause)
    if reason in ("deflate", "gzip", "br"):  # aiohttp names only the encoding
        reason = f"Can not decode content-encoding: {reason}"
    return f"request body unreadable: {reason}"


async def send(broker: Broker, name: str, raw: bytes) -> dict[str, object]:
    """The answer (status 201) to a send of the JSON body ``raw`` (one message or a batch) to
    the topic ``name`` (already checked by ``validate_topic_name``). Shared by the aiohttp
    route and the lean front (:mod:`tempomq.lean`); raises the API's :class:`TempoError`.

    A message id makes a send idempotent wherever the first send of that id went: stored in
    its topic at once or held by the delay server, in this request or an earlier one. Only
    the first is stored; a later one (plain or delayed, in any order) answers what the first
    did: its ``queue_id``, and its ``deliver_at`` when it was delayed or the later one asks for
    a time. An id used in another topic is ``409 msg_id_conflict``, and none of the request is
    stored."""
    payload = parse_json(raw, InvalidMessage)
    batch = isinstance(payload, dict) and "messages" in payload
    if batch:
        check_fields(payload, "MessageBatch", InvalidMessage)
    items = payload["messages"] if batch else [payload]
    if not isinstance(items, list) or not items:
        raise InvalidMessage("'messages' must be a non-empty list")
    if len(items) > MAX_BATCH:
        raise InvalidMessage(f"at most {MAX_BATCH} messages per request, got {len(items)}")
    topic = await broker.resolve_topic(name)
    now = broker.timers.now_ms()
    parsed = _parse_messages(
        items, name, raw, batch=batch, max_body=broker.config.max_body_bytes, now_ms=now
    )
    select = broker.store.select_queue
    for msg, _at in parsed:
        msg.queue_id = select(topic, msg.properties.get(PROP_SHARDING_KEY))
    if broker.scheduler is None and any(at > now for _msg, at in parsed):
        raise InvalidMessage("delayed delivery is not enabled on this server")
    ids = {msg.msg_id: None for msg, _at in parsed if msg.msg_id}
    if not ids:
        results = await _store_new(broker, items, parsed, now, {})
    else:
        # Claimed from the first look at the ids to the last store: a concurrent send of one of
        # them waits, then finds it stored (broker_core.claims).
        claims = broker.claims
        if not claims.take(ids.keys()):
            await claims.acquire(ids.keys())
        try:
            known, ask, writes = _look_up(broker, ids)
            if known or ask:
                await _known(broker, name, known, ask, writes)
            results = await _store_new(broker, items, parsed, now, known)
        finally:
            claims.release(ids.keys())
    return {"results": results} if batch else results[0]


def _parse_messages(
    items: list[Any], name: str, raw: bytes, *, batch: bool, max_body: int, now_ms: int
) -> list[tuple[Message, int]]:
    """:func:`parse_message` of every item; an error names the item's place in a batch
    (``messages[3]: ...``) and quotes numbers as the client wrote them."""
    try:
        return [parse_message(item, name, max_body=max_body, now_ms=now_ms) for item in items]
    except TempoError as e:
        error = e
    # Which one? Only a refused request comes here: parse them again, one by one.
    for i, item in enumerate(items):
        try:
            parse_message(item, name, max_body=max_body, now_ms=now_ms)
        except TempoError as e:
            error = e
            if _has_float(item):

                def parse_exactly(payload: Any, i: int = i) -> object:
                    exact = payload["messages"][i] if batch else payload
                    return parse_message(exact, name, max_body=max_body, now_ms=now_ms)

                error = as_written(error, raw, parse_exactly)
            if batch:
                error.message = f"messages[{i}]: {error.message}"
                error.args = (error.message,)
            break
    raise error


def _has_float(obj: object) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, float) for v in obj.values())


def as_written(e: TempoError, raw: bytes, parse: Callable[[Any], object]) -> TempoError:
    """``e``, raised by ``parse`` of the JSON body ``raw`` as orjson read it, as ``parse``
    raises it on ``raw`` read with integers exact. orjson reads an integer beyond 64 bits as a
    float, so ``"delay_ms": 100000000000000000000000000000`` would be quoted as a float; the
    standard library's parser keeps it whole (slow, but only an error comes here)."""
    try:
        parse(json.loads(raw))
    except TempoError as exact:
        return exact
    except (ValueError, LookupError, TypeError):
        pass
    return e


def _look_up(
    broker: Broker, ids: dict[bytes, None]
) -> tuple[dict[bytes, FirstSend], list[bytes], list[asyncio.Future[None]]]:
    """What is known of a send's ids without waiting: the messages stored in a topic under
    them (with the writes still to await), and the ids the scheduler may hold (to ask it). A
    new id costs an index lookup and an id filter's answer, from memory."""
    known: dict[bytes, FirstSend] = {}
    writes = []
    ask = []
    first_send = broker.store.first_send
    scheduler = broker.scheduler
    for msg_id in ids:
        found = first_send(msg_id)
        if found is not None:
            known[msg_id], write = found
            if write is not None:
                writes.append(write)
        elif scheduler is not None and scheduler.may_hold(msg_id):
            ask.append(msg_id)
    return known, ask, writes


async def _known(
    broker: Broker,
    name: str,
    known: dict[bytes, FirstSend],
    ask: list[bytes],
    writes: list[asyncio.Future[None]],
) -> None:
    """Complete ``known`` (from :func:`_look_up`) with what the scheduler holds of the ids in
    ``ask``, and wait for the first sends still being written: a resend is acknowledged only
    once its first send is. Raises :class:`MsgIdConflict` for an id used in another topic."""
    if ask:
        assert broker.scheduler is not None
        for msg_id, first in zip(ask, await broker.scheduler.held(ask), strict=True):
            if first is not None:
                known[msg_id] = first
    for msg_id, first in known.items():
        if first.topic != name:
            raise MsgIdConflict(
                f"msg_id {msg_id.hex()} is already used by a message of topic {first.topic!r}:"
                " an id names one message (a resend goes to the topic of the first send);"
                " send a new message without it or with a new id"
            )
    for write in writes:
        await write


async def _store_new(
    broker: Broker,
    items: list[Any],
    parsed: list[tuple[Message, int]],
    now: int,
    known: dict[bytes, FirstSend],
) -> list[dict[str, object]]:
    """Store the messages whose ids are not ``known`` (of an id twice in the request, the
    first), into their topic or the delay server; returns the answer to each message (a resend
    answers where the first send of its id went)."""
    results: list[dict[str, object] | None] = [None] * len(parsed)
    storing: dict[bytes, int] = {}  # id -> the position of the message storing it
    now_pos: list[int] = []
    later_pos: list[int] = []
    for pos, (msg, at) in enumerate(parsed):
        if msg.msg_id:
            if msg.msg_id in known or msg.msg_id in storing:
                continue
            storing[msg.msg_id] = pos
        (later_pos if at > now else now_pos).append(pos)
    if now_pos:
        # Looked up under their claims already (``known``): the put need not look again.
        msgs = [parsed[p][0] for p in now_pos]
        stored = await broker.put(msgs, check_duplicate=bool(storing), checked=True)
        for pos, result in zip(now_pos, stored, strict=True):
            r: dict[str, object] = {"msg_id": result.msg_id.hex(), "queue_id": result.queue_id}
            item = items[pos]
            if "delay_ms" in item or "deliver_at" in item:
                r["deliver_at"] = now  # asked for a time that has come: delivered now
            results[pos] = r
    if later_pos:
        assert broker.scheduler is not None
        msgs = [parsed[p][0] for p in later_pos]
        times = await broker.scheduler.schedule(msgs, [parsed[p][1] for p in later_pos])
        for pos, msg, at in zip(later_pos, msgs, times, strict=True):
            # A resend (an id scheduled meanwhile another way) answers its stored time and queue.
            results[pos] = {
                "msg_id": msg.msg_id.hex(),
                "queue_id": max(msg.queue_id, 0),
                "deliver_at": at,
            }
    if len(now_pos) + len(later_pos) < len(parsed):
        _answer_resends(results, items, parsed, now, known, storing)
    return results  # type: ignore[return-value]  # every one answered now


def _answer_resends(
    results: list[dict[str, object] | None],
    items: list[Any],
    parsed: list[tuple[Message, int]],
    now: int,
    known: dict[bytes, FirstSend],
    storing: dict[bytes, int],
) -> None:
    """Fill in the answers of the messages not stored (``None`` in ``results``): each answers
    the first send of its id, an earlier request's (``known``) or this one's (``storing``)."""
    for pos, r in enumerate(results):
        if r is not None:
            continue
        msg, _at = parsed[pos]
        first = known.get(msg.msg_id)
        if first is None:  # the id's first message is in this request, answered above
            was = storing[msg.msg_id]
            answer = results[was]
            assert answer is not None
            at = answer.get("deliver_at", now)
            assert isinstance(at, int)
            first = FirstSend("", cast(int, answer["queue_id"]), at, parsed[was][1] > now)
        r = {"msg_id": msg.msg_id.hex(), "queue_id": max(first.queue_id, 0)}
        item = items[pos]
        if first.delayed or "delay_ms" in item or "deliver_at" in item:
            r["deliver_at"] = first.deliver_at_ms
        results[pos] = r


# -- messages out -------------------------------------------------------------------------------


def render_message(m: StoredMessage) -> dict[str, object]:
    props = m.properties
    if props and not _HIDDEN_PROPERTIES.isdisjoint(props):
        props = {k: v for k, v in props.items() if k not in _HIDDEN_PROPERTIES}
    out: dict[str, object] = {
        "msg_id": m.origin_msg_id,
        "topic": real_topic(m),
        "queue_id": m.queue_id,
        "tags": m.tags,
        "keys": list(m.keys),
        "properties": props,
        "born_at": m.born_at,
        "stored_at": m.stored_at,
    }
    if m.flags & FLAG_BODY_B64:
        out["body_b64"] = base64.b64encode(m.body).decode()
    else:
        out["body"] = m.body.decode("utf-8", "replace")
    return out


def render_delivery(d: Delivery) -> dict[str, object]:
    out = render_message(d.message)
    out["receipt"] = d.receipt
    out["delivery_attempt"] = d.attempt
    return out


@routes.get("/v1/messages/{msg_id}")
async def get_message(request: web.Request) -> web.Response:
    try:
        msg_id = parse_msg_id(request.match_info["msg_id"])
    except InvalidMessage as e:
        raise MessageNotFound(f"no message with that id: {e.message}") from None
    return json_response(render_message(request.app[BROKER].get_message(msg_id)))


@routes.get("/v1/topics/{topic}/messages")
async def query_messages(request: web.Request) -> web.Response:
    key = request.query.get("key")
    if not key or len(key) > MAX_KEY_LEN:
        raise InvalidRequest(f"query parameter 'key' (1-{MAX_KEY_LEN} characters) is required")
    found = request.app[BROKER].query_key(request.match_info["topic"], key)
    return json_response({"messages": [render_message(m) for m in found]})


# -- topics -------------------------------------------------------------------------------------


def _render_topic(broker: Broker, name: str) -> dict[str, object]:
    topic = broker.get_topic(name)
    queues = []
    for q in range(topic.queues):
        lo, hi = broker.store.queue_bounds(name, q)
        queues.append({"queue_id": q, "min_offset": lo, "max_offset": hi})
    return {**topic.to_json(), "queue_offsets": queues}


@routes.post("/v1/topics")
async def create_topic(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest('expected a JSON object like {"name": "orders", "queues": 8}')
    check_fields(body, "TopicCreate", InvalidTopic)
    queues = int_field(
        body, "queues", default=None, lo=1, hi=broker.config.max_queues, error=InvalidTopic
    )
    topic = await broker.create_topic(body.get("name"), queues)  # type: ignore[arg-type]
    return json_response(_render_topic(broker, topic.name), status=201)


@routes.get("/v1/topics")
async def list_topics(request: web.Request) -> web.Response:
    topics = request.app[BROKER].list_topics()
    visible = request.get(VISIBLE)
    if visible is not None:
        topics = [t for t in topics if visible(t.name)]
    return json_response({"topics": [t.to_json() for t in topics]})


@routes.get("/v1/topics/{topic}")
async def get_topic(request: web.Request) -> web.Response:
    return json_response(_render_topic(request.app[BROKER], request.match_info["topic"]))


@routes.delete("/v1/topics/{topic}")
async def delete_topic(request: web.Request) -> web.Response:
    """Delete a topic (see :meth:`Broker.delete_topic` for what happens to what it holds):
    ``200 {"deleted", "messages", "groups", "retry_topics"}``; ``404 topic_not_found``. A
    group's dead-letter topic ``%DLQ%<group>`` may be named too (its dead letters go); other
    internal names are ``400 invalid_topic``."""
    raw = request.match_info["topic"]
    name = validate_topic_name(raw, client=not raw.startswith(DLQ_PREFIX))
    return json_response(await request.app[BROKER].delete_topic(name))


# -- consuming ----------------------------------------------------------------------------------

MAX_INVISIBLE_MS = 12 * 3600_000
MAX_WAIT_MS = 60_000
MAX_TIMESTAMP_MS = 1 << 62


def _int(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = int_field(body, name, default=default, lo=lo, hi=hi)
    assert value is not None  # a default is given
    return value


def _group_args(request: web.Request) -> tuple[Broker, str, str]:
    broker = request.app[BROKER]
    topic = request.match_info["topic"]
    broker.get_topic(topic)
    return broker, topic, request.match_info["group"]


def parse_object(raw: bytes, schema: str) -> dict[str, Any]:
    """A JSON object holding only the fields of ``schema`` (``broker_core.fields``)."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("expected a JSON object")
    check_fields(body, schema)
    return body


async def _object(request: web.Request, schema: str) -> dict[str, Any]:
    return parse_object(await request.read(), schema)


# The consuming routes' work on (broker, topic, group, body bytes), shared by the aiohttp routes
# and the lean front (:mod:`tempomq.lean`): each returns the JSON answer (status 200) or raises
# the API's :class:`TempoError`. The caller has checked the topic exists (``_group_args``).


@routes.post("/v1/topics/{topic}/groups/{group}/receive")
async def receive(request: web.Request) -> web.Response:
    broker, topic, group = _group_args(request)
    return json_response(await receive_body(broker, topic, group, await request.read()))


async def receive_body(broker: Broker, topic: str, group: str, raw: bytes) -> dict[str, object]:
    body = parse_object(raw, "ReceiveRequest")
    cfg = broker.config
    deliveries = await broker.receive(
        topic,
        group,
        # The server's own limits cap what the API allows, as the spec says, without refusing.
        max_messages=min(_int(body, "max_messages", 32, 1, MAX_BATCH), cfg.max_receive_batch),
        wait_ms=min(_int(body, "wait_ms", 0, 0, MAX_WAIT_MS), cfg.max_wait_ms),
        invisible_ms=_int(body, "invisible_ms", cfg.default_invisible_ms, 100, MAX_INVISIBLE_MS),
        tags=parse_tags(body.get("tags")),
    )
    return {"messages": [render_delivery(d) for d in deliveries]}


def _receipts(body: dict[str, Any], limit: int) -> list[object]:
    receipts = body.get("receipts")
    if not isinstance(receipts, list) or not receipts or len(receipts) > limit:
        raise InvalidRequest(f"'receipts' must be a list of 1-{limit} receipts")
    return receipts


@routes.post("/v1/topics/{topic}/groups/{group}/ack")
async def ack(request: web.Request) -> web.Response:
    broker, topic, group = _group_args(request)
    return json_response(await ack_body(broker, topic, group, await request.read()))


async def ack_body(broker: Broker, topic: str, group: str, raw: bytes) -> dict[str, object]:
    """Every receipt that can be acked is; each stale one is listed in ``failed``."""
    body = parse_object(raw, "AckRequest")
    receipts = _receipts(body, broker.config.max_receive_batch)
    failed: list[ReceiptFailure] = []
    acked = await broker.ack(topic, group, receipts, failed=failed)
    return {"acked": acked, "failed": [f.to_json() for f in failed]}


@routes.post("/v1/topics/{topic}/groups/{group}/nack")
async def nack(request: web.Request) -> web.Response:
    broker, topic, group = _group_args(request)
    return json_response(await nack_body(broker, topic, group, await request.read()))


async def nack_body(broker: Broker, topic: str, group: str, raw: bytes) -> dict[str, object]:
    """``receipt``: that delivery is given back, or the error says why not. ``receipts``: as
    for ack, every one that can be is given back and each stale one is listed."""
    body = parse_object(raw, "NackRequest")
    retry_after = int_field(body, "retry_after_ms", default=None, lo=0, hi=MAX_DELAY_MS)
    if ("receipt" in body) == ("receipts" in body):
        raise InvalidRequest("give one of 'receipt' (a receipt) and 'receipts' (a list)")
    if "receipt" in body:
        await broker.nack(topic, group, body["receipt"], retry_after)
        return {"nacked": 1}
    receipts = _receipts(body, broker.config.max_receive_batch)
    failed: list[ReceiptFailure] = []
    nacked = await broker.nack_all(topic, group, receipts, retry_after, failed)
    return {"nacked": nacked, "failed": [f.to_json() for f in failed]}


@routes.post("/v1/topics/{topic}/groups/{group}/change-invisible")
async def change_invisible(request: web.Request) -> web.Response:
    broker, topic, group = _group_args(request)
    return json_response(await change_invisible_body(broker, topic, group, await request.read()))


async def change_invisible_body(
    broker: Broker, topic: str, group: str, raw: bytes
) -> dict[str, object]:
    body = parse_object(raw, "ChangeInvisibleRequest")
    if "receipt" not in body:
        raise InvalidRequest("'receipt' is required")
    invisible = int_field(body, "invisible_ms", default=None, lo=0, hi=MAX_INVISIBLE_MS)
    if invisible is None:
        raise InvalidRequest("'invisible_ms' is required")
    receipt = await broker.change_invisible(topic, group, body["receipt"], invisible)
    return {"receipt": receipt}


@routes.get("/v1/topics/{topic}/groups/{group}")
async def group_stats(request: web.Request) -> web.Response:
    broker, topic, group = _group_args(request)
    return json_response(await broker.group_stats(topic, group))


@routes.post("/v1/topics/{topic}/groups/{group}/reset")
async def reset(request: web.Request) -> web.Response:
    broker, topic, group = _group_args(request)
    body = await _object(request, "ResetRequest")
    ts = int_field(body, "timestamp", default=None, lo=0, hi=MAX_TIMESTAMP_MS)
    if ts is None:
        raise InvalidRequest("'timestamp' (epoch milliseconds) is required")
    return json_response({"queues": await broker.reset(topic, group, ts)})


@routes.get("/v1/admin/damage")
async def list_damage(request: web.Request) -> web.Response:
    """Damaged CommitLog ranges found since the data directory was created (see
    :class:`broker_core.commitlog.DamageLog`): what was skipped and never delivered."""
    entries = request.app[BROKER].store.commitlog.damage.entries
    return json_response({"damage": entries, "count": len(entries)})


@routes.post("/v1/groups")
async def create_group(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidGroup('expected a JSON object like {"name": "billing"}')
    check_fields(body, "GroupCreate", InvalidGroup)
    group = await request.app[BROKER].create_group(
        body.get("name"),
        fifo=body.get("fifo", False),
        max_attempts=int_field(
            body, "max_attempts", default=None, lo=1, hi=MAX_ATTEMPTS, error=InvalidGroup
        ),
    )
    return json_response(group.to_json(), status=201)
