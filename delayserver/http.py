"""HTTP routes for delayed messages (API.md: Delayed messages): state, cancel, reschedule.

Scheduling itself goes through the send call (``delay_ms`` / ``deliver_at`` on a message).
"""

from __future__ import annotations

from aiohttp import web

from broker_core.errors import InvalidMessage, MessageNotFound, TempoError
from broker_core.fields import check_fields
from broker_core.http import as_written, json_response, parse_deliver_at, parse_json
from broker_core.message import parse_msg_id
from delayserver.service import DelayService
from delayserver.store import DelayedInfo, DelayState

DELAY = web.AppKey("delay", DelayService)
routes = web.RouteTableDef()


class AlreadyDelivered(TempoError):
    status, code = 409, "already_delivered"


class AlreadyCancelled(TempoError):
    status, code = 409, "already_cancelled"


def _msg_id(request: web.Request) -> bytes:
    try:
        return parse_msg_id(request.match_info["msg_id"])
    except InvalidMessage as e:
        raise MessageNotFound(f"no delayed message with that id: {e.message}") from None


def _render(info: DelayedInfo) -> dict[str, object]:
    return {
        "msg_id": info.msg_id.hex(),
        "topic": info.topic,
        "deliver_at": info.deliver_at_ms,
        "state": info.state.value,
    }


def _found(info: DelayedInfo | None, msg_id: bytes) -> DelayedInfo:
    if info is None:
        raise MessageNotFound(f"no delayed message {msg_id.hex()}")
    return info


@routes.get("/v1/delayed/{msg_id}")
async def get_delayed(request: web.Request) -> web.Response:
    msg_id = _msg_id(request)
    return json_response(_render(_found(await request.app[DELAY].get(msg_id), msg_id)))


@routes.delete("/v1/delayed/{msg_id}")
async def cancel_delayed(request: web.Request) -> web.Response:
    msg_id = _msg_id(request)
    info = _found(await request.app[DELAY].cancel(msg_id), msg_id)
    if info.state is DelayState.DELIVERED:
        raise AlreadyDelivered(f"message {msg_id.hex()} was already delivered")
    return json_response(_render(info))


@routes.patch("/v1/delayed/{msg_id}")
async def reschedule_delayed(request: web.Request) -> web.Response:
    msg_id = _msg_id(request)
    raw = await request.read()
    body = parse_json(raw)
    if isinstance(body, dict):
        check_fields(body, "DelayedPatch", InvalidMessage)
    if not isinstance(body, dict) or ("deliver_at" not in body and "delay_ms" not in body):
        raise InvalidMessage("give the new time as 'deliver_at' or 'delay_ms'")
    service = request.app[DELAY]
    now = service.timers.now_ms()
    try:
        at = max(parse_deliver_at(body, now), now)  # a time in the past means now
    except InvalidMessage as e:
        raise as_written(e, raw, lambda exact: parse_deliver_at(exact, now)) from None
    info = _found(await service.reschedule(msg_id, at), msg_id)
    if info.state is DelayState.DELIVERED:
        raise AlreadyDelivered(f"message {msg_id.hex()} was already delivered")
    if info.state is DelayState.CANCELLED:
        raise AlreadyCancelled(f"message {msg_id.hex()} was cancelled")
    return json_response(_render(info))
