"""The server's principals on the RocketMQ protocol: the official client's signature names a
principal, and each RPC needs ``produce`` or ``consume`` on the topics and groups it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tempomq.auth import Auth, Forbidden, Unauthenticated
from tempomq.grpc.auth import PrincipalAuth, Resource
from tests.auth_helpers import write_auth_file
from tests.unit.test_auth import NOW, client_metadata

PRINCIPALS = {
    "writer": {
        "access_key": "writer-ak",
        "secret_key": "writer-secret-key",
        "allow": {"topic:orders": ["produce"]},
    },
    "reader": {
        "access_key": "reader-ak",
        "secret_key": "reader-secret-key",
        "allow": {"topic:orders": ["consume"], "group:billing": ["consume"]},
    },
}
ORDERS: Resource = ("topic", "orders")
BILLING: Resource = ("group", "billing")


@pytest.fixture
def hook(tmp_path: Path) -> PrincipalAuth:
    auth = Auth(
        auth_file=write_auth_file(tmp_path / "auth.yaml", PRINCIPALS),
        wall_clock_s=lambda: NOW.timestamp(),
    )
    return PrincipalAuth(auth)


def signed(who: str) -> dict[str, str]:
    key = {
        "writer": ("writer-ak", "writer-secret-key"),
        "reader": ("reader-ak", "reader-secret-key"),
    }[who]
    return client_metadata(*key, NOW.replace(tzinfo=None))


async def test_a_producer_sends_and_ends_transactions_but_does_not_consume(
    hook: PrincipalAuth,
) -> None:
    meta = signed("writer")
    for rpc in ("SendMessage", "EndTransaction", "RecallMessage", "QueryRoute"):
        await hook.check(meta, rpc, [ORDERS])
    await hook.check(meta, "Telemetry", [ORDERS])  # a producer's settings
    await hook.check(meta, "Heartbeat", [])
    with pytest.raises(Forbidden, match="'writer' lacks consume on topic:orders"):
        await hook.check(meta, "ReceiveMessage", [ORDERS, BILLING])


async def test_a_consumer_receives_and_acks_but_does_not_send(hook: PrincipalAuth) -> None:
    meta = signed("reader")
    for rpc in ("ReceiveMessage", "AckMessage", "ChangeInvisibleDuration", "QueryAssignment"):
        await hook.check(meta, rpc, [ORDERS, BILLING])
    await hook.check(meta, "QueryRoute", [ORDERS])  # routes: either permission
    await hook.check(meta, "Telemetry", [BILLING, ORDERS])  # a consumer's settings
    with pytest.raises(Forbidden, match="lacks consume on group:payments"):
        await hook.check(meta, "ReceiveMessage", [ORDERS, ("group", "payments")])
    with pytest.raises(Forbidden, match="lacks produce on topic:orders"):
        await hook.check(meta, "SendMessage", [ORDERS])
    with pytest.raises(Forbidden, match="lacks produce on topic:orders"):
        await hook.check(meta, "Telemetry", [ORDERS])  # as a producer


async def test_no_or_wrong_credentials_are_unauthenticated(hook: PrincipalAuth) -> None:
    with pytest.raises(Unauthenticated, match="credentials required"):
        await hook.check({"x-mq-client-id": "c"}, "Heartbeat", [])
    wrong = client_metadata("writer-ak", "not-the-secret", NOW.replace(tzinfo=None))
    with pytest.raises(Unauthenticated):
        await hook.check(wrong, "SendMessage", [ORDERS])
