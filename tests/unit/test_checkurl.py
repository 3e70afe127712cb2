"""check_url is limited to allow-listed hosts: refused at prepare, checked again at every call
(also for names that resolve elsewhere later), called without following redirects, and signed
with HMAC-SHA256 when a secret is set."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker_core.errors import InvalidRequest
from tests.unit.broker_helpers import wait_for
from tests.unit.test_coordinator import FAST, Node
from txcoord.checkurl import (
    SIGNATURE_HEADER,
    AllowListResolver,
    CheckUrlPolicy,
    CheckUrlRefused,
    parse_allow_entry,
)
from txcoord.states import TxState

# -- the policy ----------------------------------------------------------------------------------


def test_the_default_allows_loopback_only() -> None:
    policy = CheckUrlPolicy()
    assert policy.allows_host("127.0.0.1", 80) and policy.allows_host("127.9.9.9", 6379)
    assert policy.allows_host("::1", 80) and policy.allows_host("localhost", 8080)
    for host in ("10.0.0.1", "169.254.169.254", "192.168.1.1", "example.org", "fe80::1"):
        assert not policy.allows_host(host, 80), host


def test_names_wildcards_and_networks() -> None:
    policy = CheckUrlPolicy(("hooks.internal", "*.svc.internal", "10.0.0.0/8", "fd00::/8"))
    assert policy.allows_host("hooks.internal", 80) and policy.allows_host("HOOKS.internal.", 1)
    assert policy.allows_host("a.svc.internal", 80) and policy.allows_host("b.a.svc.internal", 80)
    assert not policy.allows_host("svc.internal", 80)
    assert not policy.allows_host("evil-hooks.internal", 80)
    assert policy.allows_host("10.200.0.1", 80) and policy.allows_host("fd00::1", 80)
    assert not policy.allows_host("127.0.0.1", 80), "a list given replaces the loopback default"


def test_an_entry_with_a_port_allows_that_port_only() -> None:
    policy = CheckUrlPolicy(("127.0.0.1:8081", "[::1]:9000", "hooks.internal:443", "10.0.0.0/8:80"))
    assert policy.allows_host("127.0.0.1", 8081) and not policy.allows_host("127.0.0.1", 6379)
    assert policy.allows_host("::1", 9000) and not policy.allows_host("::1", 9001)
    assert policy.allows_host("hooks.internal", 443)
    assert not policy.allows_host("hooks.internal", 80)
    assert policy.allows_host("10.1.1.1", 80) and not policy.allows_host("10.1.1.1", 22)


async def test_another_loopback_port_is_refused_when_the_list_names_one() -> None:
    policy = CheckUrlPolicy(("127.0.0.1:8081",))
    assert await policy.validate("http://127.0.0.1:8081/check")
    with pytest.raises(CheckUrlRefused, match="port 6379"):
        await policy.validate("http://127.0.0.1:6379/")
    with pytest.raises(CheckUrlRefused, match="port 80"):
        await policy.validate("http://127.0.0.1/check")


@pytest.mark.parametrize(
    "entry", ["10.0.0.0/33", "host:99999", "[::1]x", "bad_name", "-x.internal", "1.2.3", ""]
)
def test_a_bad_allow_entry_is_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_allow_entry(entry)


@pytest.mark.parametrize(
    ("url", "error", "says"),
    [
        ("http://10.1.2.3/check", CheckUrlRefused, "not on this server's allow-list"),
        ("http://user:pw@127.0.0.1/check", CheckUrlRefused, "credentials"),
        ("ftp://127.0.0.1/check", InvalidRequest, "http:// or https://"),
        ("http:///nohost", InvalidRequest, "http:// or https://"),
        ("http://127.0.0.1/" + "x" * 2048, InvalidRequest, "longer than 2048"),
        ("http://[::1/x", InvalidRequest, "http:// or https://"),
        ("http://127.0.0.1:99999/x", InvalidRequest, "http:// or https://"),
    ],
)
async def test_validate_refuses_with_the_reason(
    url: str, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        await CheckUrlPolicy().validate(url)


async def test_a_name_off_the_list_passes_only_if_it_resolves_into_an_allowed_network() -> None:
    assert await CheckUrlPolicy(("127.0.0.0/8",)).validate("http://localhost:9/c")
    with pytest.raises(CheckUrlRefused):
        await CheckUrlPolicy(("10.0.0.0/8",)).validate("http://localhost:9/c")


async def test_the_resolver_keeps_only_allowed_addresses() -> None:
    allowed = AllowListResolver(CheckUrlPolicy(("127.0.0.0/8",)))
    refused = AllowListResolver(CheckUrlPolicy(("10.0.0.0/8",)))
    try:
        hosts = {r["host"] for r in await allowed.resolve("localhost", 80)}
        assert hosts and all(h.startswith("127.") for h in hosts)
        with pytest.raises(OSError, match="no address on the check_url allow-list"):
            await refused.resolve("localhost", 80)
    finally:
        await allowed.close()
        await refused.close()


# -- the calls -----------------------------------------------------------------------------------


@pytest.fixture
async def target() -> AsyncIterator[tuple[TestServer, list[web.Request]]]:
    """A producer's check endpoint; ``/redirect`` sends callers on to ``/check``."""
    seen: list[web.Request] = []

    async def check(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request)
        return web.json_response({"state": "commit"})

    async def redirect(request: web.Request) -> web.Response:
        seen.append(request)
        raise web.HTTPTemporaryRedirect("/check")

    app = web.Application()
    app.router.add_post("/check", check)
    app.router.add_post("/redirect", redirect)
    async with TestServer(app) as server:
        yield server, seen


NodeFactory = Callable[[CheckUrlPolicy], Awaitable[Node]]


@pytest.fixture
async def node_with(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Starts a coordinator node with the given policy; stops it after the test."""
    started: list[Node] = []

    async def start(policy: CheckUrlPolicy) -> Node:
        node = await Node(tmp_path / "d", replace(FAST, check_url=policy)).start()
        started.append(node)
        await node.broker.create_topic("orders", 2)
        return node

    yield start
    for node in started:
        await node.stop()


async def test_a_call_is_signed_when_a_secret_is_set(
    node_with: NodeFactory, target: tuple[TestServer, list[web.Request]]
) -> None:
    server, seen = target
    node = await node_with(CheckUrlPolicy(secret=b"shared-secret"))
    tx_id = await node.prepare(b"x", check_url=str(server.make_url("/check")))
    await wait_for(lambda: bool(seen), timeout_s=30)
    request = seen[0]
    fields = dict(part.split("=", 1) for part in request.headers[SIGNATURE_HEADER].split(","))
    body = await request.read()
    expected = hmac.new(
        b"shared-secret", fields["t"].encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    assert tx_id.encode() in body


async def test_a_redirect_is_not_followed(
    node_with: NodeFactory, target: tuple[TestServer, list[web.Request]]
) -> None:
    server, seen = target
    node = await node_with(CheckUrlPolicy())
    tx_id = await node.prepare(b"x", check_url=str(server.make_url("/redirect")))
    # Asked twice: the redirect counted as no answer, and the check came again.
    await wait_for(lambda: len(seen) >= 2, timeout_s=30)
    assert {r.path for r in seen} == {"/redirect"}
    assert (await node.tx.get(tx_id)).state is TxState.PREPARED
    assert SIGNATURE_HEADER not in seen[0].headers  # no secret, no signature


async def test_a_stored_url_off_the_current_list_is_never_called(
    node_with: NodeFactory, target: tuple[TestServer, list[web.Request]]
) -> None:
    # Prepared under an older allow-list (the coordinator is called directly, as the HTTP
    # layer would have refused it now); the server restarted with a narrower list.
    server, seen = target
    node = await node_with(CheckUrlPolicy(("10.0.0.0/8",)))
    tx_id = await node.prepare(b"x", check_url=str(server.make_url("/check")))
    for _ in range(600):
        if (await node.tx.get(tx_id)).check_count >= 2:
            break
        await asyncio.sleep(0.05)
    assert (await node.tx.get(tx_id)).check_count >= 2, "the checks counted as unanswered"
    assert seen == []
