"""Every route of the real app against four callers: none, a wrong token, a principal without
the permission, and the right principal; and the hostile-neighbour cases of issue 10.

The app is the one ``tempomq serve`` runs (``build_app``), on a temporary data directory, with
an auth file of three principals (``tests/auth_helpers.py``). Each route's test makes the
denied calls first: they must be refused before the handler runs, so the resource is still
there for the allowed call at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tempomq.app import build_app
from tempomq.auth.routes import ROUTES, route_key
from tempomq.config import Settings
from tests.auth_helpers import (
    ADMIN_TOKEN,
    NEIGHBOUR_TOKEN,
    OWNER_TOKEN,
    STRANGER_TOKEN,
    WRONG_TOKEN,
    bearer,
    write_auth_file,
)

Client = TestClient[web.Request, web.Application]


@dataclass
class World:
    """The resources the routes act on, made by the owner before each test."""

    client: Client
    msg_id: str = ""
    delayed_id: str = ""
    receipts: tuple[str, ...] = ()
    tx_ids: tuple[str, ...] = ()

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any, Any]:
        headers = bearer(token) if token else {}
        resp = await self.client.request(method, path, json=body, headers=headers)
        ctype = resp.headers.get("Content-Type", "")
        payload = await resp.json() if ctype.startswith("application/json") else await resp.text()
        return resp.status, payload, resp.headers


def settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        auth_file=write_auth_file(tmp_path / "auth.yaml"),
        tx_check_immunity_ms=3_600_000,
        **kw,
    )


@pytest.fixture
async def world(tmp_path: Path, aiohttp_client: Any) -> World:
    w = World(await aiohttp_client(build_app(settings(tmp_path))))
    for topic in ("orders", "other"):
        status, body, _ = await w.call("POST", "/v1/topics", {"name": topic}, ADMIN_TOKEN)
        assert status == 201, body
    msgs = [{"body": f"m{i}", "keys": ["k1"]} for i in range(3)]
    status, body, _ = await w.call(
        "POST", "/v1/topics/orders/messages", {"messages": msgs}, OWNER_TOKEN
    )
    assert status == 201, body
    w.msg_id = body["results"][0]["msg_id"]
    status, body, _ = await w.call(
        "POST", "/v1/topics/orders/messages", {"body": "later", "delay_ms": 3_600_000}, OWNER_TOKEN
    )
    assert status == 201, body
    w.delayed_id = body["msg_id"]
    status, body, _ = await w.call(
        "POST", "/v1/topics/orders/groups/billing/receive", {"max_messages": 2}, OWNER_TOKEN
    )
    assert status == 200, body
    w.receipts = tuple(m["receipt"] for m in body["messages"])
    assert len(w.receipts) == 2
    tx_ids = []
    for _ in range(3):
        status, body, _ = await w.call("POST", "/v1/transactions", prepare_body(), OWNER_TOKEN)
        assert status == 201, body
        tx_ids.append(body["tx_id"])
    w.tx_ids = tuple(tx_ids)
    return w


def prepare_body(group: str = "shop", topic: str = "orders", **extra: Any) -> dict[str, Any]:
    return {"topic": topic, "producer_group": group, "message": {"body": "half"}, **extra}


# -- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One route: how to call it, who may (``owner`` or ``admin``), and the allowed answer."""

    method: str
    template: str
    path: Callable[[World], str]
    status: int
    body: Callable[[World], Any] = lambda w: None
    allowed: str = "owner"
    #: The permission a 403 must name; None: the route is public or lists what one may see.
    missing: str | None = None


def fixed(path: str) -> Callable[[World], str]:
    return lambda w: path


CASES = [
    Case("GET", "/healthz", fixed("/healthz"), 200, allowed="anyone"),
    Case("GET", "/readyz", fixed("/readyz"), 200, allowed="anyone"),
    Case("GET", "/openapi.json", fixed("/openapi.json"), 200, allowed="anyone"),
    Case("GET", "/metrics", fixed("/metrics"), 200, allowed="admin", missing="metrics on cluster"),
    Case(
        "POST", "/v1/topics", fixed("/v1/topics"), 201, lambda w: {"name": "fresh"}, "admin",
        "admin on cluster",
    ),
    Case("GET", "/v1/topics", fixed("/v1/topics"), 200),
    Case(
        "GET", "/v1/topics/{topic}", fixed("/v1/topics/orders"), 200,
        missing="produce or consume on topic:orders",
    ),
    Case(
        "DELETE", "/v1/topics/{topic}", fixed("/v1/topics/other"), 200, allowed="admin",
        missing="admin on cluster",
    ),
    Case(
        "POST", "/v1/topics/{topic}/messages", fixed("/v1/topics/orders/messages"), 201,
        lambda w: {"body": "x"}, missing="produce on topic:orders",
    ),
    Case(
        "GET", "/v1/topics/{topic}/messages", fixed("/v1/topics/orders/messages?key=k1"), 200,
        missing="consume on topic:orders",
    ),
    Case(
        "GET", "/v1/messages/{msg_id}", lambda w: f"/v1/messages/{w.msg_id}", 200,
        missing="consume on topic:orders",
    ),
    Case(
        "POST", "/v1/groups", fixed("/v1/groups"), 201, lambda w: {"name": "fresh"}, "admin",
        "admin on cluster",
    ),
    Case(
        "GET", "/v1/admin/damage", fixed("/v1/admin/damage"), 200, allowed="admin",
        missing="admin on cluster",
    ),
    Case(
        "POST", "/v1/topics/{topic}/groups/{group}/receive",
        fixed("/v1/topics/orders/groups/billing/receive"), 200, lambda w: {},
        missing="consume on topic:orders",
    ),
    Case(
        "POST", "/v1/topics/{topic}/groups/{group}/ack",
        fixed("/v1/topics/orders/groups/billing/ack"), 200,
        lambda w: {"receipts": [w.receipts[0]]}, missing="consume on topic:orders",
    ),
    Case(
        "POST", "/v1/topics/{topic}/groups/{group}/nack",
        fixed("/v1/topics/orders/groups/billing/nack"), 200,
        lambda w: {"receipt": w.receipts[1]}, missing="consume on topic:orders",
    ),
    Case(
        "POST", "/v1/topics/{topic}/groups/{group}/change-invisible",
        fixed("/v1/topics/orders/groups/billing/change-invisible"), 200,
        lambda w: {"receipt": w.receipts[0], "invisible_ms": 1000},
        missing="consume on topic:orders",
    ),
    Case(
        "GET", "/v1/topics/{topic}/groups/{group}", fixed("/v1/topics/orders/groups/billing"),
        200, missing="consume on topic:orders",
    ),
    Case(
        "POST", "/v1/topics/{topic}/groups/{group}/reset",
        fixed("/v1/topics/orders/groups/billing/reset"), 200, lambda w: {"timestamp": 0},
        missing="reset on group:billing",
    ),
    Case(
        "GET", "/v1/delayed/{msg_id}", lambda w: f"/v1/delayed/{w.delayed_id}", 200,
        missing="produce on topic:orders",
    ),
    Case(
        "PATCH", "/v1/delayed/{msg_id}", lambda w: f"/v1/delayed/{w.delayed_id}", 200,
        lambda w: {"delay_ms": 60_000}, missing="produce on topic:orders",
    ),
    Case(
        "DELETE", "/v1/delayed/{msg_id}", lambda w: f"/v1/delayed/{w.delayed_id}", 200,
        missing="produce on topic:orders",
    ),
    Case(
        "POST", "/v1/transactions", fixed("/v1/transactions"), 201, lambda w: prepare_body(),
        missing="produce on topic:orders",
    ),
    Case("GET", "/v1/transactions", fixed("/v1/transactions?state=prepared"), 200),
    Case(
        "GET", "/v1/transactions/{tx_id}", lambda w: f"/v1/transactions/{w.tx_ids[0]}", 200,
        missing="check or resolve on producer_group:shop",
    ),
    Case(
        "POST", "/v1/transactions/{tx_id}/commit",
        lambda w: f"/v1/transactions/{w.tx_ids[0]}/commit", 200,
        missing="resolve on producer_group:shop",
    ),
    Case(
        "POST", "/v1/transactions/{tx_id}/rollback",
        lambda w: f"/v1/transactions/{w.tx_ids[1]}/rollback", 200,
        missing="resolve on producer_group:shop",
    ),
    Case(
        "POST", "/v1/transactions/{tx_id}/check",
        lambda w: f"/v1/transactions/{w.tx_ids[2]}/check", 200,
        lambda w: {"state": "commit"}, missing="check on producer_group:shop",
    ),
    Case(
        "GET", "/v1/producers/{group}/checks", fixed("/v1/producers/shop/checks?wait_ms=0"), 200,
        missing="check on producer_group:shop",
    ),
    Case(
        "GET", "/v1/transactions/{tx_id}/checks",
        lambda w: f"/v1/transactions/{w.tx_ids[0]}/checks", 200,
        missing="check or resolve on producer_group:shop",
    ),
    # the web console
    Case("GET", "/console", fixed("/console"), 200, allowed="anyone"),
    Case("GET", "/console/", fixed("/console/"), 200, allowed="anyone"),
    Case("GET", "/console/static", fixed("/console/static/console.js"), 200, allowed="anyone"),
    Case("GET", "/v1/overview", fixed("/v1/overview"), 200, allowed="admin",
         missing="admin on cluster"),
    Case("GET", "/v1/groups", fixed("/v1/groups"), 200, allowed="admin",
         missing="admin on cluster"),
    Case("DELETE", "/v1/groups/{group}", fixed("/v1/groups/billing"), 200, allowed="admin",
         missing="admin on cluster"),
    Case(
        "GET", "/v1/topics/{topic}/queues/{queue_id}/messages",
        fixed("/v1/topics/orders/queues/0/messages"), 200, missing="consume on topic:orders",
    ),
    Case(
        "GET", "/v1/messages/{msg_id}/trace", lambda w: f"/v1/messages/{w.msg_id}/trace", 200,
        missing="consume on topic:orders",
    ),
    Case(
        "GET", "/v1/topics/{topic}/groups/{group}/inflight",
        fixed("/v1/topics/orders/groups/billing/inflight"), 200,
        missing="consume on topic:orders",
    ),
    Case("GET", "/v1/delay/timeline", fixed("/v1/delay/timeline"), 200, allowed="admin",
         missing="admin on cluster"),
    Case("GET", "/v1/delay/servers", fixed("/v1/delay/servers"), 200, allowed="admin",
         missing="admin on cluster"),
]


def test_every_route_of_the_app_has_a_permission_rule_and_a_case(tmp_path: Path) -> None:
    app = build_app(settings(tmp_path))
    served = {route_key(r) for r in app.router.routes() if r.method != "HEAD"}
    assert served == set(ROUTES), "classify these routes in tempomq/auth/routes.py"
    assert {(c.method, c.template) for c in CASES} == set(ROUTES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.method} {c.template}")
async def test_route_answers_each_caller(world: World, case: Case) -> None:
    path, body = case.path(world), case.body(world)

    async def expect_refused(token: str | None, status: int, code: str) -> dict[str, Any]:
        got, payload, headers = await world.call(case.method, path, body, token)
        assert got == status, payload
        assert payload["error"] == code and payload["message"], payload
        if status == 401:
            assert headers["WWW-Authenticate"].startswith("Bearer")
        return payload  # type: ignore[no-any-return]

    if case.allowed == "anyone":
        for token in (None, WRONG_TOKEN, STRANGER_TOKEN):
            status, payload, _ = await world.call(case.method, path, body, token)
            assert status == case.status, payload
        return
    await expect_refused(None, 401, "unauthorized")
    await expect_refused(WRONG_TOKEN, 401, "unauthorized")
    if case.missing is not None:
        payload = await expect_refused(STRANGER_TOKEN, 403, "forbidden")
        assert f"'stranger' lacks {case.missing}" in payload["message"]
        if case.allowed == "admin":
            await expect_refused(OWNER_TOKEN, 403, "forbidden")
    token = ADMIN_TOKEN if case.allowed == "admin" else OWNER_TOKEN
    status, payload, _ = await world.call(case.method, path, body, token)
    assert status == case.status, payload


async def test_an_admin_may_call_every_owner_route(world: World) -> None:
    for case in CASES:
        if case.allowed == "owner" and case.method == "GET":
            status, payload, _ = await world.call(
                case.method, case.path(world), case.body(world), ADMIN_TOKEN
            )
            assert status == case.status, (case.template, payload)


async def test_unknown_routes_need_credentials_before_they_answer_404(world: World) -> None:
    status, payload, _ = await world.call("GET", "/v1/nothing-here")
    assert (status, payload["error"]) == (401, "unauthorized")
    status, payload, _ = await world.call("GET", "/v1/nothing-here", token=OWNER_TOKEN)
    assert (status, payload["error"]) == (404, "not_found")


async def test_a_route_without_a_rule_is_refused_even_to_an_admin(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    app = build_app(settings(tmp_path))

    async def unclassified(request: web.Request) -> web.Response:
        return web.Response(text="should not be reached")

    app.router.add_get("/v1/unclassified", unclassified)
    client = await aiohttp_client(app)
    resp = await client.get("/v1/unclassified", headers=bearer(ADMIN_TOKEN))
    body = await resp.json()
    assert (resp.status, body["error"]) == (403, "forbidden")
    assert "has no permission rule" in body["message"]


async def test_head_needs_what_get_needs(world: World) -> None:
    for token, status in ((None, 401), (STRANGER_TOKEN, 403), (OWNER_TOKEN, 200)):
        headers = bearer(token) if token else {}
        resp = await world.client.head("/v1/topics/orders", headers=headers)
        assert resp.status == status, token


async def test_a_malformed_authorization_header_is_401(world: World) -> None:
    for value in ("Basic b3duZXI6cHc=", "Bearer", "Token " + OWNER_TOKEN):
        resp = await world.client.get("/v1/topics", headers={"Authorization": value})
        assert resp.status == 401, value
        assert (await resp.json())["error"] == "unauthorized"


# -- listings show only what the principal may see -----------------------------------------------


async def test_topic_list_shows_a_principal_its_topics_and_an_admin_all(world: World) -> None:
    async def names(token: str) -> set[str]:
        status, body, _ = await world.call("GET", "/v1/topics", token=token)
        assert status == 200, body
        return {t["name"] for t in body["topics"]}

    assert await names(OWNER_TOKEN) == {"orders"}
    assert await names(NEIGHBOUR_TOKEN) == {"orders", "other"}
    assert await names(ADMIN_TOKEN) >= {"orders", "other"}


# -- the hostile neighbour (issue 10's list) ----------------------------------------------------


async def lag(world: World) -> int:
    status, body, _ = await world.call(
        "GET", "/v1/topics/orders/groups/billing", token=OWNER_TOKEN
    )
    assert status == 200, body
    return int(body["lag"])


async def test_neighbour_cannot_reset_another_services_group(world: World) -> None:
    before = await lag(world)
    status, body, _ = await world.call(
        "POST", "/v1/topics/orders/groups/billing/reset", {"timestamp": 0}, NEIGHBOUR_TOKEN
    )
    assert (status, body["error"]) == (403, "forbidden")
    assert "reset on group:billing" in body["message"]
    assert await lag(world) == before


async def test_neighbour_cannot_receive_under_another_services_group(world: World) -> None:
    status, body, _ = await world.call(
        "POST",
        "/v1/topics/orders/groups/billing/receive",
        {"max_messages": 32, "invisible_ms": 12 * 3600_000},
        NEIGHBOUR_TOKEN,
    )
    assert (status, body["error"]) == (403, "forbidden")
    # The owner still gets its remaining message: nothing was hidden from it.
    status, body, _ = await world.call(
        "POST", "/v1/topics/orders/groups/billing/receive", {}, OWNER_TOKEN
    )
    assert status == 200 and len(body["messages"]) == 1, body
    # Under its own group the neighbour reads the topic it may consume.
    status, body, _ = await world.call(
        "POST", "/v1/topics/orders/groups/reporting/receive", {}, NEIGHBOUR_TOKEN
    )
    assert status == 200 and len(body["messages"]) == 3, body


async def test_neighbour_sees_no_other_transactions_and_cannot_roll_them_back(
    world: World,
) -> None:
    prepared = "/v1/transactions?state=prepared"
    status, body, _ = await world.call("GET", prepared, token=NEIGHBOUR_TOKEN)
    assert status == 200 and body["transactions"] == [], body
    status, body, _ = await world.call("GET", prepared, token=OWNER_TOKEN)
    assert {t["tx_id"] for t in body["transactions"]} == set(world.tx_ids)
    for tx_id in world.tx_ids:
        status, body, _ = await world.call(
            "POST", f"/v1/transactions/{tx_id}/rollback", token=NEIGHBOUR_TOKEN
        )
        assert (status, body["error"]) == (403, "forbidden")
        status, body, _ = await world.call("GET", f"/v1/transactions/{tx_id}", token=OWNER_TOKEN)
        assert body["state"] == "prepared"


async def test_neighbour_cannot_take_or_answer_another_groups_check_backs(world: World) -> None:
    status, body, _ = await world.call(
        "GET", "/v1/producers/shop/checks?wait_ms=0", token=NEIGHBOUR_TOKEN
    )
    assert (status, body["error"]) == (403, "forbidden")
    status, body, _ = await world.call(
        "POST", f"/v1/transactions/{world.tx_ids[0]}/check", {"state": "commit"}, NEIGHBOUR_TOKEN
    )
    assert (status, body["error"]) == (403, "forbidden")
    status, body, _ = await world.call(
        "GET", f"/v1/transactions/{world.tx_ids[0]}", token=OWNER_TOKEN
    )
    assert body["state"] == "prepared"


async def test_neighbour_cannot_prepare_in_another_producer_group(world: World) -> None:
    status, body, _ = await world.call(
        "POST", "/v1/transactions", prepare_body("shop", "other"), NEIGHBOUR_TOKEN
    )
    assert (status, body["error"]) == (403, "forbidden")
    assert "resolve on producer_group:shop" in body["message"]
    status, body, _ = await world.call(
        "POST", "/v1/transactions", prepare_body("other", "other"), NEIGHBOUR_TOKEN
    )
    assert status == 201, body


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/check",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x",
        "http://example.org/check",
    ],
)
async def test_check_url_off_the_allow_list_is_refused_at_prepare(world: World, url: str) -> None:
    status, body, _ = await world.call(
        "POST", "/v1/transactions", prepare_body(check_url=url), OWNER_TOKEN
    )
    assert status == 400, body
    assert body["error"] in ("check_url_not_allowed", "invalid_request"), body
    assert "check_url" in body["message"]


async def test_check_url_on_loopback_is_allowed_by_default(world: World) -> None:
    status, body, _ = await world.call(
        "POST", "/v1/transactions", prepare_body(check_url="http://127.0.0.1:9/c"), OWNER_TOKEN
    )
    assert status == 201, body


async def test_the_admin_action_is_written_to_the_audit_log(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, _ = await world.call(
        "POST", "/v1/topics/orders/groups/billing/reset", {"timestamp": 0}, OWNER_TOKEN
    )
    assert status == 200
    out = capsys.readouterr().out
    audit = [line for line in out.splitlines() if "audit" in line and "/reset" in line]
    assert audit and "principal=owner" in audit[-1] and "status=200" in audit[-1], out



def test_docs_security_md_lists_every_route_with_its_permission() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `") and line.count("|") == 3:
            route, need = (cell.strip() for cell in line.strip("|").split("|"))
            rows[route.strip("`")] = need
    for (method, path), rule in ROUTES.items():
        assert rows.get(f"{method} {path}") == rule.permission, f"{method} {path}"
