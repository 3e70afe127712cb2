"""The gRPC listener of the RocketMQ protocol, in the server's own event loop (``grpc.aio``).

Started by :func:`tempomq.app.serve` once the cores run and the HTTP port listens; stopped
first on shutdown, with a short grace for calls in flight (a receive long poll answers empty at
its own deadline; Telemetry streams end, and clients reconnect to the next server).
"""

from __future__ import annotations

import grpc
import structlog

from broker_core.broker import Broker
from delayserver.service import DelayService
from tempomq.config import HostPort
from tempomq.grpc.auth import GrpcAuth
from tempomq.grpc.protocol.service_pb2_grpc import add_MessagingServiceServicer_to_server
from tempomq.grpc.service import FRAME_OVERHEAD_BYTES, MessagingService
from txcoord.coordinator import Coordinator

log = structlog.get_logger(__name__)

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
_STOP_GRACE_S = 1.0


class GrpcEndpoint:
    """A started gRPC server and its servicer; :meth:`stop` ends both."""

    def __init__(self, server: grpc.aio.Server, service: MessagingService, port: int) -> None:
        self.server = server
        self.service = service
        self.port = port

    async def stop(self) -> None:
        self.service.tx.check_channels.remove(self.service.clients)
        self.service.clients.close_all()
        await self.server.stop(_STOP_GRACE_S)
        await self.service.renewer.stop()


async def start_grpc(
    listen: HostPort,
    advertise: HostPort | None,
    *,
    broker: Broker,
    delay: DelayService,
    tx: Coordinator,
    auth: GrpcAuth | None = None,
) -> GrpcEndpoint:
    """Listen on ``listen`` (port 0: any free one). Routes hand clients ``advertise``, by
    default the listen address (a wildcard host advertised as loopback). Raises ``OSError``
    when the address cannot be bound."""
    max_frame = broker.config.max_body_bytes + FRAME_OVERHEAD_BYTES
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_frame),
            ("grpc.max_send_message_length", max_frame),
            # Clients keep idle connections alive with pings; do not answer them with GOAWAY.
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # grpcio shares a port between processes by default: a second server on the same
            # address would silently take half the connections. Fail its start instead.
            ("grpc.so_reuseport", 0),
        ]
    )
    try:
        port = server.add_insecure_port(str(listen))
    except RuntimeError as exc:  # grpcio reports a failed bind as RuntimeError
        raise OSError(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    if advertise is None:
        advertise = HostPort(_WILDCARDS.get(listen.host, listen.host), port)
    service = MessagingService(broker, delay, tx, advertise=advertise, auth=auth)
    add_MessagingServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    tx.check_channels.append(service.clients)
    await server.start()
    log.info("listening", grpc=f"{HostPort(listen.host, port)}", advertise=str(advertise))
    return GrpcEndpoint(server, service, port)
