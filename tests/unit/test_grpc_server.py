"""The gRPC listener's lifecycle on real cores: a free port, the advertised address, a port
that is taken, and the check channel it adds and removes."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tempomq.config import HostPort
from tempomq.grpc.protocol import definition_pb2 as pb
from tempomq.grpc.protocol import service_pb2 as spb
from tempomq.grpc.protocol.service_pb2_grpc import MessagingServiceStub
from tempomq.grpc.server import start_grpc
from tests.unit.test_coordinator import Node


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = await Node(tmp_path / "d").start()
    await n.broker.create_topic("orders", 2)
    yield n
    await n.stop()


async def test_serves_on_a_free_port_and_advertises_loopback_for_a_wildcard(node: Node) -> None:
    endpoint = await start_grpc(
        HostPort("0.0.0.0", 0), None, broker=node.broker, delay=node.delay, tx=node.tx
    )
    try:
        assert endpoint.port > 0
        assert endpoint.service.advertise == HostPort("127.0.0.1", endpoint.port)
        assert endpoint.service.clients in node.tx.check_channels
        async with grpc.aio.insecure_channel(f"127.0.0.1:{endpoint.port}") as channel:
            request = spb.QueryRouteRequest()
            request.topic.name = "orders"
            answer = await MessagingServiceStub(channel).QueryRoute(request, timeout=10)
        assert answer.status.code == pb.Code.OK
        address = answer.message_queues[0].broker.endpoints.addresses[0]
        assert (address.host, address.port) == ("127.0.0.1", endpoint.port)
    finally:
        await endpoint.stop()
    assert endpoint.service.clients not in node.tx.check_channels


async def test_the_advertised_address_is_what_routes_name(node: Node) -> None:
    endpoint = await start_grpc(
        HostPort("127.0.0.1", 0),
        HostPort("mq.example.com", 443),
        broker=node.broker,
        delay=node.delay,
        tx=node.tx,
    )
    try:
        assert endpoint.service.advertise == HostPort("mq.example.com", 443)
    finally:
        await endpoint.stop()


async def test_a_taken_port_is_an_os_error(node: Node) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="cannot listen"):
            await start_grpc(
                HostPort("127.0.0.1", port), None, broker=node.broker, delay=node.delay, tx=node.tx
            )
    assert node.tx.check_channels == []


async def test_a_second_server_on_the_same_address_fails_to_start(node: Node) -> None:
    first = await start_grpc(
        HostPort("127.0.0.1", 0), None, broker=node.broker, delay=node.delay, tx=node.tx
    )
    try:
        with pytest.raises(OSError, match="cannot listen"):
            await start_grpc(
                HostPort("127.0.0.1", first.port),
                None,
                broker=node.broker,
                delay=node.delay,
                tx=node.tx,
            )
        assert node.tx.check_channels == [first.service.clients]
    finally:
        await first.stop()
