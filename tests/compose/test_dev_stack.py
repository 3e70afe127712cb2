"""The compose dev stack, run for real: built, brought up from nothing, used, restarted, removed.

The tests run in file order on one stack (``make compose-test``; ``make test`` leaves them out):
it comes up healthy from a clean state; the ``example`` profile's producer sends plain, delayed
and transactional messages tied to rows of the MySQL-side ``orders`` table and its consumer
receives exactly what those rows and sends say; a restart of the tempomq container keeps every
acknowledged send, ack and pending delayed message; ``down --volumes`` leaves nothing behind.
Without a Docker engine and Compose v2 they skip, except under CI=true where they fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from tests.compose.stack import Stack, docker_problem, wait_until
from tests.e2e.server import drain, free_port
from tests.example_output import RECEIVED, received_ids, received_lines, sent_by_kind
from tests.services import services_required

pytestmark = pytest.mark.compose

PROJECT = "tempomq-stack-test"
INFRASTRUCTURE = ("mysql", "redis", "tempomq")
TOPIC = "orders"  # the examples' topic
GROUP = "example"  # the example consumer's group
#: Generous: a deadline only bounds a failure, and this machine may be busy.
HEALTHY_WITHIN_S = 300.0
DELIVERED_WITHIN_S = 120.0
HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    problem = docker_problem()
    if problem:
        if services_required():
            pytest.fail(f"{problem} (required because CI=true or TEMPOMQ_REQUIRE_SERVICES=1)")
        pytest.skip(f"{problem}; .ci/run installs and starts Docker")
    stack = Stack(PROJECT, free_port())
    stack.down()  # whatever an interrupted earlier run left
    stack.build_images()
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def sent(stack: Stack) -> dict[str, list[str]]:
    """Runs the example producer once; its message ids by kind."""
    stack.compose("--profile", "example", "up", "--detach", "producer", "consumer")
    exit_code = stack.wait_exit("producer")
    output = stack.logs("producer")
    assert exit_code == 0, f"the producer exited {exit_code}:\n{output}"
    return sent_by_kind(output)


def consumer_saw(stack: Stack, msg_ids: set[str]) -> dict[str, str] | None:
    """The consumer's lines once it has printed every one of ``msg_ids``, else None."""
    lines = received_lines(stack.logs("consumer"))
    return lines if msg_ids <= set(lines) else None


def body_of(line: str) -> str:
    match = RECEIVED.match(line)
    assert match, line
    return match.group(4)


def delivered(sent: dict[str, list[str]]) -> set[str]:
    return {*sent["plain"], *sent["delayed"], *sent["committed"]}


def test_the_stack_comes_up_healthy_from_a_clean_state(stack: Stack) -> None:
    assert stack.container_ids() == [] and stack.volumes() == [], "not a clean state"
    stack.compose("up", "--detach")
    stack.wait_healthy(INFRASTRUCTURE, HEALTHY_WITHIN_S)
    assert stack.http("GET", "/readyz") == (200, {"status": "ready"})


def test_the_api_wants_the_stacks_token(stack: Stack) -> None:
    assert stack.http("GET", "/v1/topics")[0] == 200
    assert stack.http("GET", "/v1/topics", token="tmq_" + "x" * 40)[0] == 401


def test_only_tempomq_is_published_and_only_on_loopback(stack: Stack) -> None:
    for service in INFRASTRUCTURE:
        bindings = [
            binding
            for per_port in (stack.inspect(service)["NetworkSettings"]["Ports"] or {}).values()
            for binding in per_port or []
        ]
        if service == "tempomq":
            assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(stack.port)}]
        else:
            assert bindings == [], f"{service} is published: {bindings}"


def test_the_producer_commits_messages_with_its_rows(
    stack: Stack, sent: dict[str, list[str]]
) -> None:
    assert {kind: len(ids) for kind, ids in sent.items()} == {
        "plain": 3,
        "delayed": 2,
        "committed": 2,
        "rolled-back": 1,
    }
    # The declined payment left no row; each paid order committed with its barrier row.
    assert stack.sql("SELECT number, state FROM orders ORDER BY id") == [
        ["1", "paid"],
        ["2", "paid"],
    ]
    assert stack.sql("SELECT outcome FROM tempomq_tx_barrier") == [["commit"], ["commit"]]
    (rolled_back,) = sent["rolled-back"]
    assert stack.http("GET", f"/v1/messages/{rolled_back}")[0] == 404


def test_the_consumer_gets_exactly_what_was_committed(
    stack: Stack, sent: dict[str, list[str]]
) -> None:
    expected = delivered(sent)
    lines = wait_until(
        "the consumer received every message",
        lambda: consumer_saw(stack, expected),
        DELIVERED_WITHIN_S,
    )
    ids = received_ids(stack.logs("consumer"))
    assert sorted(ids) == sorted(expected), "missing, extra or repeated deliveries"
    assert all(" attempt=1 " in lines[msg_id] for msg_id in ids)
    paid_rows = {f"order {number} paid" for (number,) in stack.sql("SELECT number FROM orders")}
    paid_messages = {body for body in map(body_of, lines.values()) if body.endswith(" paid")}
    assert paid_messages == paid_rows, "the paid messages and the paid rows differ"
    for msg_id in sent["delayed"]:
        assert "(delayed, released" in lines[msg_id], lines[msg_id]


@pytest.fixture(scope="module")
def restarted(stack: Stack, sent: dict[str, list[str]]) -> str:
    """Restarts tempomq with a delayed message pending an hour; returns that message's id."""
    wait_until(
        "all sent delivered", lambda: consumer_saw(stack, delivered(sent)), DELIVERED_WITHIN_S
    )
    status, held = stack.http(
        "POST",
        f"/v1/topics/{TOPIC}/messages",
        {"body": "order 4: held across a restart", "tags": "held", "delay_ms": HOUR_MS},
    )
    assert status == 201, held
    started_at = stack.inspect("tempomq")["State"]["StartedAt"]
    stack.compose("restart", "tempomq")
    assert stack.inspect("tempomq")["State"]["StartedAt"] != started_at, "no restart"
    stack.wait_healthy(["tempomq"], HEALTHY_WITHIN_S)
    return str(held["msg_id"])


def test_a_restart_keeps_every_acknowledged_send(
    stack: Stack, sent: dict[str, list[str]], restarted: str
) -> None:
    for msg_id in delivered(sent):
        status, message = stack.http("GET", f"/v1/messages/{msg_id}")
        assert status == 200 and message["topic"] == TOPIC, (msg_id, status, message)
    status, delayed = stack.http("GET", f"/v1/delayed/{restarted}")
    assert status == 200 and delayed["state"] == "scheduled", delayed


def test_a_restart_keeps_the_consumers_acks(stack: Stack, restarted: str) -> None:
    status, group = stack.http("GET", f"/v1/topics/{TOPIC}/groups/{GROUP}")
    assert status == 200
    assert (group["lag"], group["inflight"]) == (0, 0), group


def test_after_a_restart_everything_arrives_once(
    stack: Stack, sent: dict[str, list[str]], restarted: str
) -> None:
    # The held message, due now, reaches the consumer that ran through the restart, and
    # nothing it had acked comes again.
    status, moved = stack.http("PATCH", f"/v1/delayed/{restarted}", {"delay_ms": 0})
    assert status == 200, moved
    expected = {*delivered(sent), restarted}
    wait_until(
        "the held message delivered", lambda: consumer_saw(stack, expected), DELIVERED_WITHIN_S
    )
    assert sorted(received_ids(stack.logs("consumer"))) == sorted(expected)
    # And a group that starts now reads the same messages back from the log, once each.
    assert sorted(asyncio.run(read_back(stack, "audit", len(expected)))) == sorted(expected)


async def read_back(stack: Stack, group: str, count: int) -> list[str]:
    """The ids a new consumer group receives (and acks) once it has ``count`` messages."""
    async with aiohttp.ClientSession(headers=stack.auth_headers()) as session:
        messages = await drain(
            session, stack.url, TOPIC, group, at_least=count, timeout_s=DELIVERED_WITHIN_S
        )
    return [m["msg_id"] for m in messages]


def test_down_removes_the_containers_and_volumes(stack: Stack) -> None:
    assert stack.volumes(), "the stack had no volumes to remove"
    stack.down()
    assert stack.container_ids() == []
    assert stack.volumes() == []
