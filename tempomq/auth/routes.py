"""Which permissions each HTTP route needs: one table row per route, and the resolvers that find
the resources a request touches.

A route names its topic and group in the path. Other resources are looked up: a message id
leads to its topic through the broker's index, a delayed message id to its topic through the
delay service, a transaction id to its producer group through the coordinator, and a prepare
names its topic and producer group in the body. A receipt needs no lookup: the broker resolves
it only inside the group named in the path, so the group's permission covers it.

Every route the app serves must have a row (``tests/unit/test_auth_routes.py`` asserts it);
a route without one is refused with 403 at run time, so a forgotten row fails closed.
Listings (``GET /v1/topics``, ``GET /v1/transactions``) are open to every principal and show
only what it may see: the middleware hands the handler a predicate under
:data:`broker_core.http.VISIBLE`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson
from aiohttp import web

from broker_core.errors import TempoError
from broker_core.http import BROKER
from broker_core.message import parse_msg_id
from broker_core.retry import real_topic
from delayserver.http import DELAY
from tempomq.auth import policy
from tempomq.auth.policy import (
    ADMIN,
    CHECK,
    CLUSTER,
    CONSUME,
    GROUP,
    METRICS,
    PRODUCE,
    PRODUCER_GROUP,
    RESET,
    RESOLVE,
    TOPIC,
)
from txcoord.http import TX


@dataclass(frozen=True, slots=True)
class Need:
    """One permission a request needs: any of ``actions`` on resource ``kind:name``."""

    kind: str
    name: str
    actions: tuple[str, ...]

    def describe(self) -> str:
        return f"{' or '.join(self.actions)} on {policy.resource(self.kind, self.name)}"


Resolver = Callable[[web.Request], Awaitable[Sequence[Need]]]


@dataclass(frozen=True, slots=True)
class Rule:
    """What one route needs. ``public``: no credentials at all; ``admin``: an audited action."""

    needs: Resolver | None = None
    #: What the route needs, in words (docs/security.md shows it; a test keeps them equal).
    permission: str = "any principal"
    public: bool = False
    admin: bool = False
    #: The handler lists resources of this kind, filtered to what the principal may see.
    lists: str | None = None


# -- resolvers -----------------------------------------------------------------------------------


def _needs(kind: str, param: str, *actions: str) -> Callable[[web.Request], Need]:
    def need(request: web.Request) -> Need:
        return Need(kind, request.match_info[param], actions)

    return need


def from_path(*parts: Callable[[web.Request], Need]) -> Resolver:
    """Resources named by the route's path parameters."""

    async def resolve(request: web.Request) -> Sequence[Need]:
        return [part(request) for part in parts]

    return resolve


def fixed(kind: str, *actions: str) -> Resolver:
    async def resolve(request: web.Request) -> Sequence[Need]:
        return [Need(kind, "", actions)]

    return resolve


async def _message_topic(request: web.Request) -> Sequence[Need]:
    try:
        msg = request.app[BROKER].get_message(parse_msg_id(request.match_info["msg_id"]))
    except TempoError:
        return []  # no such message: the handler answers 404 to anyone authenticated
    return [Need(TOPIC, real_topic(msg), (CONSUME,))]


async def _delayed_topic(request: web.Request) -> Sequence[Need]:
    try:
        info = await request.app[DELAY].get(parse_msg_id(request.match_info["msg_id"]))
    except TempoError:
        return []
    return [] if info is None else [Need(TOPIC, info.topic, (PRODUCE,))]


def _tx_group(*actions: str) -> Resolver:
    async def resolve(request: web.Request) -> Sequence[Need]:
        try:
            row = await request.app[TX].get(request.match_info["tx_id"])
        except TempoError:
            return []
        return [Need(PRODUCER_GROUP, row.producer_group, actions)]

    return resolve


async def _prepare(request: web.Request) -> Sequence[Need]:
    # aiohttp keeps the body it read, so the handler reads the same bytes again for free.
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return []  # the handler answers 400 for the body
    if not isinstance(body, dict):
        return []
    topic, group = body.get("topic"), body.get("producer_group")
    needs = []
    if isinstance(topic, str):
        needs.append(Need(TOPIC, topic, (PRODUCE,)))
    if isinstance(group, str):
        needs.append(Need(PRODUCER_GROUP, group, (RESOLVE,)))
    return needs


# -- the table -----------------------------------------------------------------------------------

_TOPIC_CONSUME = _needs(TOPIC, "topic", CONSUME)
_GROUP_CONSUME = _needs(GROUP, "group", CONSUME)
_CONSUMING = from_path(_TOPIC_CONSUME, _GROUP_CONSUME)
_ADMIN = fixed(CLUSTER, ADMIN)
_CONSUMING_TEXT = "consume on the topic and on the group"
_DELAYED_TEXT = "produce on the message's topic"

ROUTES: Mapping[tuple[str, str], Rule] = {
    # service
    ("GET", "/healthz"): Rule(public=True, permission="none (public)"),
    ("GET", "/readyz"): Rule(public=True, permission="none (public)"),
    ("GET", "/openapi.json"): Rule(public=True, permission="none (public)"),
    ("GET", "/metrics"): Rule(
        fixed(CLUSTER, METRICS), "metrics on cluster (or --metrics-public)"
    ),
    # topics and messages
    ("POST", "/v1/topics"): Rule(_ADMIN, "admin", admin=True),
    ("GET", "/v1/topics"): Rule(
        permission="any principal; lists topics it may produce or consume", lists=TOPIC
    ),
    ("GET", "/v1/topics/{topic}"): Rule(
        from_path(_needs(TOPIC, "topic", PRODUCE, CONSUME)), "produce or consume on the topic"
    ),
    ("DELETE", "/v1/topics/{topic}"): Rule(_ADMIN, "admin", admin=True),
    ("POST", "/v1/topics/{topic}/messages"): Rule(
        from_path(_needs(TOPIC, "topic", PRODUCE)), "produce on the topic"
    ),
    ("GET", "/v1/topics/{topic}/messages"): Rule(
        from_path(_TOPIC_CONSUME), "consume on the topic"
    ),
    ("GET", "/v1/messages/{msg_id}"): Rule(_message_topic, "consume on the message's topic"),
    ("GET", "/v1/admin/damage"): Rule(_ADMIN, "admin"),
    # consuming
    ("POST", "/v1/groups"): Rule(_ADMIN, "admin", admin=True),
    ("POST", "/v1/topics/{topic}/groups/{group}/receive"): Rule(_CONSUMING, _CONSUMING_TEXT),
    ("POST", "/v1/topics/{topic}/groups/{group}/ack"): Rule(_CONSUMING, _CONSUMING_TEXT),
    ("POST", "/v1/topics/{topic}/groups/{group}/nack"): Rule(_CONSUMING, _CONSUMING_TEXT),
    ("POST", "/v1/topics/{topic}/groups/{group}/change-invisible"): Rule(
        _CONSUMING, _CONSUMING_TEXT
    ),
    ("GET", "/v1/topics/{topic}/groups/{group}"): Rule(_CONSUMING, _CONSUMING_TEXT),
    ("POST", "/v1/topics/{topic}/groups/{group}/reset"): Rule(
        from_path(_needs(GROUP, "group", RESET)), "reset on the group", admin=True
    ),
    # delayed messages
    ("GET", "/v1/delayed/{msg_id}"): Rule(_delayed_topic, _DELAYED_TEXT),
    ("DELETE", "/v1/delayed/{msg_id}"): Rule(_delayed_topic, _DELAYED_TEXT),
    ("PATCH", "/v1/delayed/{msg_id}"): Rule(_delayed_topic, _DELAYED_TEXT),
    # transactions
    ("POST", "/v1/transactions"): Rule(
        _prepare, "produce on the topic and resolve on the producer group"
    ),
    ("GET", "/v1/transactions"): Rule(
        permission="any principal; lists transactions of producer groups it may check or "
        "resolve",
        lists=PRODUCER_GROUP,
    ),
    ("GET", "/v1/transactions/{tx_id}"): Rule(
        _tx_group(CHECK, RESOLVE), "check or resolve on its producer group"
    ),
    ("POST", "/v1/transactions/{tx_id}/commit"): Rule(
        _tx_group(RESOLVE), "resolve on its producer group"
    ),
    ("POST", "/v1/transactions/{tx_id}/rollback"): Rule(
        _tx_group(RESOLVE), "resolve on its producer group"
    ),
    ("POST", "/v1/transactions/{tx_id}/check"): Rule(
        _tx_group(CHECK), "check on its producer group"
    ),
    ("GET", "/v1/producers/{group}/checks"): Rule(
        from_path(_needs(PRODUCER_GROUP, "group", CHECK)), "check on the producer group"
    ),
    ("GET", "/v1/transactions/{tx_id}/checks"): Rule(
        _tx_group(CHECK, RESOLVE), "check or resolve on its producer group"
    ),
    # the web console: its pages are public (they hold no data; the API calls they make carry
    # the token the user logs in with), what they read is checked like any API call
    ("GET", "/console"): Rule(public=True, permission="none (public)"),
    ("GET", "/console/"): Rule(public=True, permission="none (public)"),
    ("GET", "/console/static"): Rule(public=True, permission="none (public)"),
    ("GET", "/v1/overview"): Rule(_ADMIN, "admin"),
    ("GET", "/v1/groups"): Rule(_ADMIN, "admin"),
    ("DELETE", "/v1/groups/{group}"): Rule(_ADMIN, "admin", admin=True),
    ("GET", "/v1/topics/{topic}/queues/{queue_id}/messages"): Rule(
        from_path(_TOPIC_CONSUME), "consume on the topic"
    ),
    ("GET", "/v1/messages/{msg_id}/trace"): Rule(
        _message_topic, "consume on the message's topic"
    ),
    ("GET", "/v1/topics/{topic}/groups/{group}/inflight"): Rule(_CONSUMING, _CONSUMING_TEXT),
    ("GET", "/v1/delay/timeline"): Rule(_ADMIN, "admin"),
    ("GET", "/v1/delay/servers"): Rule(_ADMIN, "admin"),
}

#: What a listing shows a principal: resources where it holds any of these actions.
LIST_ACTIONS: Mapping[str, tuple[str, ...]] = {
    TOPIC: (PRODUCE, CONSUME),
    PRODUCER_GROUP: (CHECK, RESOLVE),
}

#: A request no route matched (404, 405): it needs credentials, then gets its error.
UNROUTED = Rule()


def route_key(route: web.AbstractRoute) -> tuple[str, str] | None:
    """(method, path template) of a route, as the table is keyed; None for aiohttp's own."""
    if route.resource is None:
        return None
    return route.method, route.resource.canonical


def rule_for(request: web.Request, cache: dict[web.AbstractRoute, Rule | None]) -> Rule | None:
    """The row for the request's route; None if the route has no row (refuse it). ``cache``
    keeps the answer per route object: the app's routes live as long as the app."""
    route = request.match_info.route
    found = cache.get(route, UNROUTED)
    if found is not UNROUTED:
        return found
    key = route_key(route)
    if key is None:  # aiohttp's own for a 404 or 405, made anew per request: not kept
        return UNROUTED
    if key[0] == "HEAD":  # aiohttp adds HEAD for each GET
        key = ("GET", key[1])
    found = cache[route] = ROUTES.get(key)
    return found
