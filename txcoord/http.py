"""HTTP routes of the transaction coordinator (API.md: Transactions), and the check-back
channel SDK producers hold open (``GET /v1/producers/{group}/checks``)."""

from __future__ import annotations

import re

from aiohttp import web

from broker_core.errors import InvalidRequest
from broker_core.fields import check_fields, int_field
from broker_core.http import BROKER, VISIBLE, json_response, parse_message, read_json
from broker_core.message import CLIENT_NAME_PATTERN, PROP_SHARDING_KEY, validate_topic_name
from txcoord.coordinator import Coordinator
from txcoord.states import TxEvent, TxState

TX = web.AppKey("tx", Coordinator)
routes = web.RouteTableDef()

_GROUP_RE = re.compile(CLIENT_NAME_PATTERN)
MAX_CHECK_WAIT_MS = 60_000
MAX_IMMUNITY_MS = 24 * 3600_000
#: Most transactions one list call answers.
MAX_LIST = 1000
#: A page cursor, ``created_at:tx_id`` (the spec's pattern for ``after`` also allows none).
_CURSOR_RE = re.compile(r"([0-9]{1,19}):(.*)", re.DOTALL)


def _group(value: object) -> str:
    if not isinstance(value, str) or not _GROUP_RE.fullmatch(value):
        raise InvalidRequest("'producer_group' must be 1-100 letters, digits, '_' or '-'")
    return value


async def _check_url(coordinator: Coordinator, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("'check_url' must be an http:// or https:// URL")
    return await coordinator.settings.check_url.validate(value)


@routes.post("/v1/transactions")
async def prepare(request: web.Request) -> web.Response:
    coordinator = request.app[TX]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("expected a JSON object with 'topic', 'message', 'producer_group'")
    check_fields(body, "TransactionCreate")
    topic_name = validate_topic_name(body.get("topic"), client=True)
    group = _group(body.get("producer_group"))
    check_url = await _check_url(coordinator, body.get("check_url"))
    immunity = int_field(body, "check_immunity_ms", default=None, lo=0, hi=MAX_IMMUNITY_MS)
    store = coordinator.broker_store
    # As a plain send (and gRPC's transactional send) resolves it: with another broker as the
    # release target the topic lives there (the name is validated only); else it must exist
    # here, or is auto-created when --auto-create-topics allows.
    topic = await request.app[BROKER].resolve_topic(topic_name)
    now = coordinator.timers.now_ms()
    msg, deliver_at = parse_message(
        body.get("message"), topic_name, max_body=store.config.max_body_bytes, now_ms=now
    )
    msg.queue_id = store.select_queue(topic, msg.properties.get(PROP_SHARDING_KEY))
    row = await coordinator.prepare(
        msg,
        deliver_at_ms=deliver_at,
        producer_group=group,
        check_url=check_url,
        check_immunity_ms=immunity,
    )
    return json_response({"tx_id": row.tx_id, "msg_id": row.msg_id.hex()}, status=201)


@routes.post("/v1/transactions/{tx_id}/commit")
async def commit(request: web.Request) -> web.Response:
    row = await request.app[TX].commit(request.match_info["tx_id"])
    return json_response({"state": row.state.value})


@routes.post("/v1/transactions/{tx_id}/rollback")
async def rollback(request: web.Request) -> web.Response:
    row = await request.app[TX].rollback(request.match_info["tx_id"])
    return json_response({"state": row.state.value})


@routes.get("/v1/transactions/{tx_id}")
async def get_transaction(request: web.Request) -> web.Response:
    row = await request.app[TX].get(request.match_info["tx_id"])
    return json_response(row.to_json())


@routes.get("/v1/transactions")
async def list_transactions(request: web.Request) -> web.Response:
    try:
        state = TxState(request.query.get("state", "check_max"))
    except ValueError:
        raise InvalidRequest(f"state must be one of {[s.value for s in TxState]}") from None
    try:
        limit = int(request.query.get("limit", str(MAX_LIST)))
        after = _after(request.query.get("after"))
    except ValueError:
        raise InvalidRequest(
            "limit must be an integer; after a 'created_at:tx_id' cursor"
        ) from None
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit must be from 1 to {MAX_LIST}")
    rows = await request.app[TX].list_page(state, limit=limit, after=after)
    next_page = f"{rows[-1].created_at}:{rows[-1].tx_id}" if len(rows) == limit else None
    visible = request.get(VISIBLE)
    if visible is not None:  # a page may then hold fewer than ``limit``; ``next`` still pages on
        rows = [r for r in rows if visible(r.producer_group)]
    out: dict[str, object] = {"transactions": [r.to_json() for r in rows]}
    if next_page is not None:  # there may be more: the cursor of the next page
        out["next"] = next_page
    return json_response(out)


def _after(cursor: str | None) -> tuple[int, str] | None:
    """A page cursor ``created_at:tx_id`` as the ``next`` of the previous page gave it."""
    if not cursor:
        return None
    m = _CURSOR_RE.fullmatch(cursor)
    if m is None:
        raise ValueError(cursor)
    return int(m.group(1)), m.group(2)


@routes.post("/v1/transactions/{tx_id}/check")
async def answer_check(request: web.Request) -> web.Response:
    body = await read_json(request)
    if isinstance(body, dict):
        check_fields(body, "CheckAnswer")
    try:
        event = TxEvent(str(body.get("state") if isinstance(body, dict) else None))
    except ValueError:
        raise InvalidRequest("'state' must be 'commit', 'rollback' or 'unknown'") from None
    row = await request.app[TX].answer(request.match_info["tx_id"], event)
    return json_response({"state": row.state.value})


@routes.get("/v1/producers/{group}/checks")
async def poll_checks(request: web.Request) -> web.Response:
    group = _group(request.match_info["group"])
    try:
        wait_ms = int(request.query.get("wait_ms", "20000"))
        max_n = int(request.query.get("max", "100"))
    except ValueError:
        raise InvalidRequest("wait_ms and max must be integers") from None
    if not 0 <= wait_ms <= MAX_CHECK_WAIT_MS or not 1 <= max_n <= 1000:
        raise InvalidRequest(f"wait_ms must be 0-{MAX_CHECK_WAIT_MS} and max 1-1000")
    coordinator = request.app[TX]
    wait_ms = min(wait_ms, coordinator.broker_store.config.max_wait_ms)  # --max-wait caps it
    checks = await coordinator.poll_checks(group, max_n=max_n, wait_ms=wait_ms)
    return json_response({"checks": checks})
