"""The RocketMQ listener of a real ``tempomq serve``: the advertised address routes name, a
wildcard listen address advertised as loopback, ``--grpc off``, and a taken address that makes
the server exit 1 instead of sharing the port.

(Spawned servers and a blocking gRPC channel, not ``grpc.aio`` in the test process: grpcio's
asyncio support does not survive two event loops in one process, and the official client of
other test files runs one in its own thread.)"""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
import pytest

from tempomq.grpc.protocol import definition_pb2 as pb
from tempomq.grpc.protocol import service_pb2 as spb
from tempomq.grpc.protocol.service_pb2_grpc import MessagingServiceStub
from tests.e2e.server import Server, free_port

pytestmark = pytest.mark.e2e


def route_address(port: int, topic: str) -> tuple[int, str, int]:
    request = spb.QueryRouteRequest()
    request.topic.name = topic
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = MessagingServiceStub(channel).QueryRoute(request, timeout=20)  # type: ignore[no-untyped-call]
    assert answer.status.code == pb.Code.OK, answer.status
    endpoints = answer.message_queues[0].broker.endpoints
    return endpoints.scheme, endpoints.addresses[0].host, endpoints.addresses[0].port


def wait_listening(server: Server, port: int) -> None:
    import socket
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"gRPC port {port} never listened: {server.log()}")


def create_topic(server: Server) -> None:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{server.url}/v1/topics", data=json.dumps({"name": "orders"}).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=20) as r:
        assert r.status == 201


@pytest.mark.parametrize(
    ("listen", "advertise", "expected"),
    [
        ("127.0.0.1", None, (pb.AddressScheme.IPv4, "127.0.0.1")),
        ("0.0.0.0", None, (pb.AddressScheme.IPv4, "127.0.0.1")),
        ("127.0.0.1", "mq.example.com:443", (pb.AddressScheme.DOMAIN_NAME, "mq.example.com")),
    ],
)
def test_routes_name_the_advertised_address(
    tmp_path: Path, listen: str, advertise: str | None, expected: tuple[int, str]
) -> None:
    port = free_port()
    flags = ["--grpc", f"{listen}:{port}"]
    if listen == "0.0.0.0":
        flags.append("--insecure-no-auth")  # off loopback without auth: said in so many words
    if advertise:
        flags += ["--grpc-advertise", advertise]
    server = Server(tmp_path / "data", *flags)
    server.start()
    try:
        wait_listening(server, port)
        create_topic(server)
        scheme, host, advertised_port = route_address(port, "orders")
        assert (scheme, host) == expected
        assert advertised_port == (443 if advertise else port)
    finally:
        server.ensure_stopped()


def test_grpc_off_opens_no_port(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")  # the test servers run with --grpc off
    server.start()
    try:
        assert '"grpc"' not in server.log()
    finally:
        server.ensure_stopped()


def test_a_taken_address_makes_the_second_server_exit_1(tmp_path: Path) -> None:
    port = free_port()
    first = Server(tmp_path / "a", "--grpc", f"127.0.0.1:{port}")
    second = Server(tmp_path / "b", "--grpc", f"127.0.0.1:{port}")
    first.start()
    try:
        wait_listening(first, port)
        # HTTP listens first and the gRPC bind fails just after: start() may see either.
        with contextlib.suppress(RuntimeError):
            second.start()
        assert second.proc is not None and second.proc.wait(30) == 1
        assert "cannot listen" in second.log()
        # The first one still answers: the port was not shared.
        create_topic(first)
        assert route_address(port, "orders")[2] == port
    finally:
        second.ensure_stopped()
        first.ensure_stopped()
