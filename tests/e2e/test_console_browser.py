"""The web console in a real browser (chromium through Playwright) against a spawned server:
every page opens and is captured, a topic is created and a message sent and found by key, a
delayed message leaves the timeline for its topic, another is rescheduled and cancelled, a parked
transaction is committed, a group is reset and deleted, two delay servers on one Redis show their
shards, and a login form guards a server with authentication on."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler

from tempomq.app import build_app
from tempomq.config import Settings
from tests.auth_helpers import ADMIN_TOKEN, write_auth_file
from tests.e2e.browser import chromium_path, open_page, screenshot
from tests.e2e.server import Server, call, running

# The integration tests' throwaway redis-server (skipped where redis-server is missing, except
# under CI), shared rather than copied.
from tests.integration.conftest import redis_process  # noqa: F401
from tests.integration.redis_process import RedisProcess

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

#: Long enough for a slow, shared machine to have the page open before it is released.
RELEASE_DELAY_MS = 15_000


def expect(locator: Any) -> Any:
    from playwright.async_api import expect as pw_expect

    return pw_expect(locator)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    chromium_path()  # skip before starting anything when there is no browser
    data = tmp_path_factory.mktemp("console") / "data"
    with running(data, "--tx-check-max", "1", "--tx-check-timeout", "500ms") as s:
        yield s


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def create_and_open_topic(page: Any, topic: str, queues: int) -> None:
    """Create ``topic`` through the topics page's form and open its page."""
    await page.goto("/console/#/topics")
    form = page.locator("#create-topic")
    await form.locator("input[name=name]").fill(topic)
    await form.locator("input[name=queues]").fill(str(queues))
    await form.get_by_role("button", name="Create topic").click()
    await page.get_by_role("link", name=topic).click()
    await expect(page.locator("h1")).to_have_text(f"Topic {topic}")


async def ok(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    status, data = await call(session, method, url, body)
    assert status in (200, 201), data
    return data


async def delayed_message(
    session: aiohttp.ClientSession, base: str, body: str, delay_ms: int
) -> tuple[str, str]:
    """A new topic and a message sent to it with ``delay_ms``: (topic, msg_id)."""
    topic = unique("delayed")
    await ok(session, "POST", f"{base}/v1/topics", {"name": topic, "queues": 1})
    url = f"{base}/v1/topics/{topic}/messages"
    sent = await ok(session, "POST", url, {"body": body, "delay_ms": delay_ms})
    return topic, str(sent["msg_id"])


async def parked_transaction(session: aiohttp.ClientSession, base: str, topic: str) -> str:
    """A transaction whose one check-back (nobody answers at its check_url) parked it."""
    prepared = await ok(
        session,
        "POST",
        f"{base}/v1/transactions",
        {
            "topic": topic,
            "message": {"body": "charge card"},
            "producer_group": "shop",
            "check_url": "http://127.0.0.1:9/check",
            "check_immunity_ms": 0,
        },
    )
    tx_id = str(prepared["tx_id"])
    deadline = time.monotonic() + 20
    while (await ok(session, "GET", f"{base}/v1/transactions/{tx_id}"))["state"] != "check_max":
        assert time.monotonic() < deadline, "the transaction was not parked"
        await asyncio.sleep(0.1)
    return tx_id


async def traffic(session: aiohttp.ClientSession, base: str, topic: str) -> None:
    """Send, receive and ack batches until cancelled."""
    await ok(session, "POST", f"{base}/v1/topics", {"name": topic, "queues": 2})
    batch = {"messages": [{"body": "load"} for _ in range(50)]}
    url = f"{base}/v1/topics/{topic}"
    while True:
        await ok(session, "POST", f"{url}/messages", batch)
        got = await ok(session, "POST", f"{url}/groups/load/receive", {"max_messages": 50})
        receipts = [m["receipt"] for m in got["messages"]]
        if receipts:
            await ok(session, "POST", f"{url}/groups/load/ack", {"receipts": receipts})
        await asyncio.sleep(0.1)


def accept_dialogs(page: Any) -> list[str]:
    """Accept every confirm() the page asks; returns the questions asked."""
    asked: list[str] = []

    async def accept(dialog: Any) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.on("dialog", accept)
    return asked


async def test_every_page_opens(
    server: Server, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    base = server.url
    topic = unique("shop")
    await ok(session, "POST", f"{base}/v1/topics", {"name": topic, "queues": 2})
    for i in range(6):
        await ok(
            session,
            "POST",
            f"{base}/v1/topics/{topic}/messages",
            {"body": f"order {i} created", "tags": "created", "keys": [f"order-{i}"]},
        )
    for delay_s in (30, 600, 7200, 86400 * 3):
        await ok(
            session,
            "POST",
            f"{base}/v1/topics/{topic}/messages",
            {"body": "reminder", "delay_ms": delay_s * 1000},
        )
    soon = [{"body": f"tick {i}", "delay_ms": 100 + 20 * i} for i in range(20)]
    await ok(session, "POST", f"{base}/v1/topics/{topic}/messages", {"messages": soon})
    group = unique("billing")
    await ok(
        session,
        "POST",
        f"{base}/v1/topics/{topic}/groups/{group}/receive",
        {"max_messages": 2, "invisible_ms": 600_000},
    )
    tx_id = await parked_transaction(session, base, topic)
    async with open_page(base) as page:
        await page.goto("/console/#/overview")
        await expect(page.locator("[data-card=pending] .value")).to_have_text("4")
        await expect(page.locator("#ready")).to_contain_text("ready")
        # Traffic while the page polls: the rates rise above 0 and their charts draw them.
        load = asyncio.create_task(traffic(session, base, unique("load")))
        try:
            for rate in ("stored", "acked"):
                await expect(page.locator(f"[data-rate={rate}] .value")).not_to_have_text(
                    "0", timeout=20_000
                )
            await expect(page.locator("[data-rate=stored] polyline")).to_have_attribute(
                "points", re.compile(r"\d.* .*\d")
            )
            await screenshot(page, "overview", tmp_path)
        finally:
            load.cancel()

        await page.goto("/console/#/topics")
        await expect(page.get_by_role("link", name=topic)).to_be_visible()
        await screenshot(page, "topics", tmp_path)

        await page.goto(f"/console/#/topics/{topic}?queue=0&offset=0")
        # Queue 0 holds half the orders (round robin over 2 queues) and released ticks.
        await expect(page.locator("main table tbody tr", has_text="created")).to_have_count(3)
        await screenshot(page, "topic", tmp_path)

        await page.locator("main table tbody tr", has_text="created").locator("a").first.click()
        await expect(page.locator("h1")).to_contain_text("Message ")
        await expect(page.locator("pre.body")).to_contain_text("created")
        await expect(page.locator("main")).to_contain_text(group)
        await screenshot(page, "message", tmp_path)

        await page.goto("/console/#/groups")
        await expect(page.locator("main")).to_contain_text(group)
        await screenshot(page, "groups", tmp_path)

        await page.goto(f"/console/#/groups/{group}/{topic}")
        await expect(page.locator("[data-card=group-inflight] .value")).to_have_text("2")
        await screenshot(page, "group", tmp_path)

        await page.goto("/console/#/delayed")
        await expect(page.locator("#timeline rect[data-label='next hour']")).to_have_attribute(
            "data-value", "1"
        )
        await expect(page.locator("main h2").last).not_to_contain_text("(0 released")
        await screenshot(page, "delayed", tmp_path)

        await page.goto("/console/#/transactions")
        await expect(page.locator(".tabs a.active")).to_contain_text("Parked")
        row = page.locator("main tbody tr", has_text=tx_id)
        await row.get_by_role("button", name="Checks (1)").click()
        await expect(row).to_contain_text("check_url")
        await screenshot(page, "transactions", tmp_path)

        await page.goto("/console/#/servers")
        await expect(page.locator("main")).to_contain_text("embedded store")


async def test_create_a_topic_send_a_message_and_find_it_by_key(server: Server) -> None:
    topic = unique("orders")
    key = unique("order")
    async with open_page(server.url) as page:
        await create_and_open_topic(page, topic, 2)

        send = page.locator("#send")
        await send.locator("textarea[name=body]").fill("paid in full")
        await send.locator("input[name=keys]").fill(f"{key}, other")
        await send.get_by_role("button", name="Send test message").click()
        await expect(page.locator("#flash")).to_contain_text("sent ")

        by_key = page.locator("#by-key")
        await by_key.locator("input[name=key]").fill(key)
        await by_key.get_by_role("button", name="Find by key").click()
        row = page.locator("#key-results tbody tr")
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text("paid in full")
        await row.locator("a").click()
        await expect(page.locator("pre.body")).to_have_text("paid in full")


async def test_creating_a_topic_keeps_what_was_typed_in_the_other_forms(server: Server) -> None:
    """Creating a topic re-renders the topics page; an id typed into the lookup and not looked
    up yet stays (the re-render emptied it). The create form, done with, is emptied, and the
    focus stays where the user was typing."""
    topic = unique("orders")
    msg_id = "0123456789abcdef0123456789abcdef"
    async with open_page(server.url) as page:
        await page.goto("/console/#/topics")
        lookup = page.locator("#find-message input[name=id]")
        await lookup.fill(msg_id)
        form = page.locator("#create-topic")
        name = form.locator("input[name=name]")
        await name.fill(topic)
        await name.press("Enter")
        await expect(page.get_by_role("link", name=topic)).to_be_visible()  # re-rendered
        await expect(lookup).to_have_value(msg_id)
        await expect(name).to_have_value("")
        await expect(name).to_be_focused()


async def test_a_key_search_survives_the_page_refresh_after_a_send(server: Server) -> None:
    """A send refreshes the topic page when it is answered; a key search made before that
    refresh is in keeps its results (the refresh replaced the forms and emptied them)."""
    topic = unique("orders")
    key = unique("order")
    async with open_page(server.url) as page:
        await create_and_open_topic(page, topic, 1)  # both sends show in queue 0
        send = page.locator("#send")
        await send.locator("textarea[name=body]").fill("first")
        await send.locator("input[name=keys]").fill(key)
        await send.get_by_role("button", name="Send test message").click()
        await expect(page.locator("main")).to_contain_text("first")  # refreshed
        # Hold the next refresh's read of the topic until the search is done.
        release = asyncio.Event()

        async def held(route: Any) -> None:
            await release.wait()
            await route.continue_()

        await page.route(re.compile(rf".*/v1/topics/{topic}$"), held)
        await send.locator("textarea[name=body]").fill("second")
        await send.locator("input[name=keys]").fill("")
        await send.get_by_role("button", name="Send test message").click()
        await expect(page.locator("#flash")).to_contain_text("sent ")
        by_key = page.locator("#by-key")
        await by_key.locator("input[name=key]").fill(key)
        await by_key.get_by_role("button", name="Find by key").click()
        row = page.locator("#key-results tbody tr")
        await expect(row).to_have_count(1)
        release.set()
        await expect(page.locator("main")).to_contain_text("second")  # the refresh is in
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text("first")


async def test_the_refresh_after_a_send_moves_no_form(server: Server) -> None:
    """The list a send refreshes grows; the forms the user clicks next stay where they were. A
    button that moves between the press and the release of a click gets no click at all (the
    key search of a busy page was lost that way: no request, no error)."""
    topic = unique("orders")
    async with open_page(server.url) as page:
        await create_and_open_topic(page, topic, 1)  # the send shows in queue 0
        buttons = [
            page.locator("#send").get_by_role("button", name="Send test message"),
            page.locator("#by-key").get_by_role("button", name="Find by key"),
        ]
        before = [await b.bounding_box() for b in buttons]
        send = page.locator("#send")
        await send.locator("textarea[name=body]").fill("line one\nline two\nline three")
        await send.get_by_role("button", name="Send test message").click()
        await expect(page.locator("main table tbody tr", has_text="line one")).to_have_count(1)
        assert [await b.bounding_box() for b in buttons] == before


async def test_a_delayed_message_leaves_the_timeline_for_its_topic(
    server: Server, session: aiohttp.ClientSession
) -> None:
    base = server.url
    topic, msg_id = await delayed_message(session, base, "wake up", RELEASE_DELAY_MS)
    async with open_page(base) as page:
        await page.goto("/console/#/delayed")
        row = page.locator("#timeline tr", has_text=msg_id)
        await expect(row).to_have_count(1)
        # The timeline refreshes itself: the row goes once the message is released.
        await expect(row).to_have_count(0, timeout=RELEASE_DELAY_MS + 20_000)
        await page.goto(f"/console/#/topics/{topic}")
        await expect(page.locator("main table tbody tr", has_text=msg_id)).to_have_count(1)
        await page.goto(f"/console/#/messages/{msg_id}")
        await expect(page.locator("#delay-state")).to_have_text("delivered")
        await expect(page.locator("dl.props").last).to_contain_text("RELEASED_AT")


async def test_reschedule_then_cancel_a_delayed_message(
    server: Server, session: aiohttp.ClientSession
) -> None:
    base = server.url
    _topic, msg_id = await delayed_message(session, base, "never mind", 3_600_000)
    later = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    async with open_page(base) as page:
        asked = accept_dialogs(page)
        await page.goto("/console/#/delayed")
        lookup = page.locator("#delayed-lookup")
        await lookup.locator("input[name=id]").fill(msg_id)
        await lookup.get_by_role("button", name="Look up").click()
        await expect(page.locator("#delayed-result [data-state]")).to_have_text("scheduled")

        await lookup.locator("input[name=at]").fill(later.strftime("%Y-%m-%dT%H:%M:%S"))
        await lookup.get_by_role("button", name="Reschedule").click()
        await expect(page.locator("#delayed-result")).to_contain_text(
            later.strftime("%Y-%m-%d %H:%M:%S")
        )
        info = await ok(session, "GET", f"{base}/v1/delayed/{msg_id}")
        assert info["deliver_at"] == int(later.timestamp() * 1000)

        await lookup.get_by_role("button", name="Cancel").click()
        await expect(page.locator("#delayed-result [data-state]")).to_have_text("cancelled")
        assert asked == [f"Cancel delayed message {msg_id}?"]
    info = await ok(session, "GET", f"{base}/v1/delayed/{msg_id}")
    assert info["state"] == "cancelled"


async def test_the_timeline_refresh_moves_no_form(
    server: Server, session: aiohttp.ClientSession
) -> None:
    """The timeline refreshes itself every few seconds and grows with what is scheduled; the
    look-up form's buttons stay where they were (see the topic page's test of the same)."""
    base = server.url
    async with open_page(base) as page:
        await page.goto("/console/#/delayed")
        await expect(page.locator("#timeline")).to_contain_text("pending")
        lookup = page.locator("#delayed-lookup")
        buttons = [
            lookup.get_by_role("button", name=n) for n in ("Look up", "Reschedule", "Cancel")
        ]
        before = [await b.bounding_box() for b in buttons]
        topic, _ = await delayed_message(session, base, "later", 1_800_000)
        for _ in range(2):
            await ok(
                session,
                "POST",
                f"{base}/v1/topics/{topic}/messages",
                {"body": "later", "delay_ms": 1_800_000},
            )
        rows = page.locator("#timeline tbody tr", has_text=topic)
        await expect(rows).to_have_count(3, timeout=15_000)  # the next refresh has them
        assert [await b.bounding_box() for b in buttons] == before


def watch_timeline(page: Any) -> tuple[list[str], list[str]]:
    """(confirmations asked, then dismissed; the timeline's refresh requests), as they come."""
    asked: list[str] = []
    refreshes: list[str] = []

    async def dismiss(dialog: Any) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    def request(r: Any) -> None:
        if "/delay/timeline" in r.url:
            refreshes.append(r.url)

    page.on("dialog", dismiss)
    page.on("request", request)
    return asked, refreshes


async def until_asked(page: Any, asked: list[str]) -> None:
    """Wait up to 5 s for a confirmation to be asked."""
    for _ in range(50):
        if asked:
            return
        await page.wait_for_timeout(100)


@pytest.mark.parametrize("how", ["pointer", "keyboard"])
async def test_a_cancel_on_the_timeline_survives_its_refresh(
    server: Server, session: aiohttp.ClientSession, how: str
) -> None:
    """The timeline is rebuilt every few seconds, its Cancel buttons with it. A click pressed on
    one of them and released after a rebuild was released on a button no longer in the page, and
    was lost: no confirmation asked, no request, no error. From the keyboard, the rebuild dropped
    the button's focus to the start of the page, so Enter did nothing."""
    base = server.url
    topic, msg_id = await delayed_message(session, base, "soon", 120_000)
    async with open_page(base) as page:
        asked, refreshes = watch_timeline(page)
        await page.goto("/console/#/delayed")
        row = page.locator("#timeline tbody tr", has_text=topic)
        button = row.get_by_role("button", name="Cancel")
        before = len(refreshes)
        if how == "pointer":
            box = await button.bounding_box()
            assert box is not None
            await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            await page.mouse.down()
            await page.wait_for_timeout(3_500)  # the timeline refreshes meanwhile (every 3 s)
            await page.mouse.up()
        else:
            await button.focus()
            await page.wait_for_timeout(3_500)
            await expect(button).to_be_focused()
            await page.keyboard.press("Enter")
        assert len(refreshes) > before
        await until_asked(page, asked)
        assert asked == [f"Cancel delayed message {msg_id}?"]
        await expect(row).to_have_count(1)  # dismissed: still scheduled, and still shown


async def test_commit_a_parked_transaction(server: Server, session: aiohttp.ClientSession) -> None:
    base = server.url
    topic = unique("tx")
    await ok(session, "POST", f"{base}/v1/topics", {"name": topic, "queues": 1})
    tx_id = await parked_transaction(session, base, topic)
    async with open_page(base) as page:
        accept_dialogs(page)
        await page.goto("/console/#/transactions?state=check_max")
        row = page.locator("main tbody tr", has_text=tx_id)
        await row.get_by_role("button", name="Checks (1)").click()
        await expect(row).to_contain_text("check_url")
        await expect(row).to_contain_text("unknown")
        await row.get_by_role("button", name="Commit").click()
        await expect(page.locator("#flash")).to_contain_text(f"{tx_id}: committed")
        await expect(page.locator("main tbody tr", has_text=tx_id)).to_have_count(0)
    assert (await ok(session, "GET", f"{base}/v1/transactions/{tx_id}"))["state"] == "committed"


async def test_reset_a_group_then_delete_it(server: Server, session: aiohttp.ClientSession) -> None:
    base = server.url
    topic = unique("replay")
    group = unique("g")
    await ok(session, "POST", f"{base}/v1/topics", {"name": topic, "queues": 1})
    start = datetime.now(UTC).replace(microsecond=0)
    await asyncio.sleep(1.1)  # the reset time has whole seconds: every message comes after it
    for i in range(3):
        await ok(session, "POST", f"{base}/v1/topics/{topic}/messages", {"body": f"m{i}"})
    got = await ok(
        session, "POST", f"{base}/v1/topics/{topic}/groups/{group}/receive", {"max_messages": 3}
    )
    receipts = [m["receipt"] for m in got["messages"]]
    await ok(
        session, "POST", f"{base}/v1/topics/{topic}/groups/{group}/ack", {"receipts": receipts}
    )
    async with open_page(base) as page:
        asked = accept_dialogs(page)
        await page.goto(f"/console/#/groups/{group}/{topic}")
        await expect(page.locator("[data-card=group-lag] .value")).to_have_text("0")
        reset = page.locator("#reset")
        await reset.locator("input[name=at]").fill(start.strftime("%Y-%m-%dT%H:%M:%S"))
        await reset.get_by_role("button", name="Reset offsets").click()
        await expect(page.locator("[data-card=group-lag] .value")).to_have_text("3")
        assert asked and asked[0].startswith(f"Reset {group} on {topic}")

        await page.get_by_role("button", name="Delete group").click()
        await expect(page.locator("h1")).to_have_text("Groups")
        await expect(page.locator("main")).not_to_contain_text(group)
    groups = (await ok(session, "GET", f"{base}/v1/groups"))["groups"]
    assert group not in [g["name"] for g in groups]


# -- delay servers sharing Redis ------------------------------------------------------------


async def test_the_delay_servers_page_shows_who_holds_each_shard(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    chromium_path()
    redis: RedisProcess = request.getfixturevalue("redis_process")
    with (
        running(tmp_path / "a", "--redis-url", redis.url) as a,
        running(tmp_path / "b", "--redis-url", redis.url),
    ):
        async with open_page(a.url) as page:
            await page.goto("/console/#/servers")
            # The page refreshes itself: both servers heartbeat and split the 16 shards.
            server_rows = page.locator("#servers table").first.locator("tbody tr")
            await expect(server_rows.locator("td.num")).to_have_text(["8", "8"], timeout=30_000)
            await expect(server_rows.filter(has_text="this one")).to_have_count(1)
            shards = page.locator("#servers table").nth(1).locator("tbody tr")
            await expect(shards).to_have_count(16)
            await expect(shards.filter(has_text="free")).to_have_count(0)
            await screenshot(page, "servers", tmp_path)


# -- log in -----------------------------------------------------------------------------------

TOKEN = ADMIN_TOKEN  # an admin principal of the auth file the server is given


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """The real app with authentication on (an auth file), in this process; and the API paths
    it refused."""
    chromium_path()
    app = build_app(
        Settings(data_dir=tmp_path / "data", auth_file=write_auth_file(tmp_path / "auth.yaml"))
    )
    refused: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if response.status == 401:
            refused.append(request.path)
        return response

    app.middlewares.insert(0, record)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), refused
    finally:
        await server.close()


async def test_the_console_asks_for_a_token_and_retries_with_it(
    guarded: tuple[str, list[str]],
) -> None:
    base, refused = guarded
    async with open_page(base) as page:
        await page.goto("/console/#/topics")
        dialog = page.locator("dialog#login")
        await expect(dialog).to_be_visible()
        assert "/v1/topics" in refused
        await page.locator("#login-token").fill("wrong")
        await page.get_by_role("button", name="Log in").click()
        await expect(page.locator("#login-error")).to_have_text("That token was not accepted.")
        await page.locator("#login-token").fill(TOKEN)
        await page.get_by_role("button", name="Log in").click()
        await expect(dialog).to_be_hidden()
        await expect(page.locator("h1")).to_have_text("Topics")
        assert await page.evaluate("sessionStorage.getItem('tempomq.token')") == TOKEN
        # Later calls carry the token: the overview polls without asking again.
        refused.clear()
        await page.goto("/console/#/overview")
        await expect(page.locator("[data-card=lag] .value")).to_have_text("0")
        assert refused == []
        await page.get_by_role("button", name="Log out").click()
        await expect(dialog).to_be_visible()
