"""Real NATS JetStream and RabbitMQ for the release-target tests: the shared services (never
stopped), private nats-server processes (alone or as a three-node JetStream cluster) that a test
may kill, a TCP proxy that takes RabbitMQ "down" and back, and readers that see what a
target received through that broker's own client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.services import reachable, require_service, services_required

NATS_URL = os.environ.get("TEMPOMQ_TEST_NATS_URL", "nats://127.0.0.1:4222")
AMQP_URL = os.environ.get("TEMPOMQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
START_WAIT_S = 15.0


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_nats() -> str:
    require_service("NATS", "127.0.0.1", int(NATS_URL.rsplit(":", 1)[1]))
    return NATS_URL


def require_rabbitmq() -> str:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return AMQP_URL


def nats_binary() -> str:
    binary = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
    )
    if binary is None:
        if services_required():
            pytest.fail("nats-server is not installed (required because CI=true)")
        pytest.skip("nats-server is not installed")
    return binary


@dataclass
class NatsProcess:
    """One private nats-server with JetStream on free ports; killable and restartable on the
    same ports and store (a cluster member when ``routes`` are given)."""

    workdir: Path
    name: str = "n1"
    port: int = field(default_factory=free_port)
    cluster_port: int = 0
    routes: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        store = self.workdir / f"js-{self.name}"
        lines = [
            f'server_name: "{self.name}"',
            f"listen: 127.0.0.1:{self.port}",
            f'jetstream {{ store_dir: "{store}" }}',
        ]
        if self.cluster_port:
            routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.routes)
            listen = f"127.0.0.1:{self.cluster_port}"
            lines.append(f'cluster {{ name: "tq", listen: {listen}, routes: [{routes}] }}')
        path = self.workdir / f"{self.name}.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, *, wait: bool = True) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [nats_binary(), "-c", str(self._config())], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        if wait:
            self.wait_listening()

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_WAIT_S
        while not reachable("127.0.0.1", self.port, timeout_s=0.2):
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = (self.workdir / f"{self.name}.log").read_text(errors="replace")
                pytest.fail(f"nats-server {self.name} did not start on {self.port}:\n{log[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None


def nats_cluster(workdir: Path, size: int = 3) -> list[NatsProcess]:
    """``size`` JetStream nodes routed to one another (not started)."""
    cluster_ports = [free_port() for _ in range(size)]
    return [
        NatsProcess(
            workdir,
            name=f"n{i + 1}",
            cluster_port=cluster_ports[i],
            routes=[p for j, p in enumerate(cluster_ports) if j != i],
        )
        for i in range(size)
    ]


class TcpProxy:
    """A TCP proxy on a free port in front of ``host:port``: :meth:`down` closes every
    connection and stops listening (the broker behind looks gone), :meth:`up` listens again on
    the same port. Used for RabbitMQ, whose private instance takes long to start."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


@dataclass
class Received:
    """One message as the broker's own client sees it."""

    body: bytes
    headers: dict[str, str]
    msg_id: str  # Nats-Msg-Id or AMQP message_id
    #: JetStream: when the stream stored it (epoch ms, the server's clock); else 0.
    stored_ms: int = 0


class JetStreamReader:
    """A stream of its own (``stream`` capturing ``prefix.>``) read back message by message."""

    def __init__(self, url: str, stream: str, prefix: str, replicas: int = 1) -> None:
        self.url, self.stream, self.prefix, self.replicas = url, stream, prefix, replicas
        self.nc: Any = None

    @property
    def subject_template(self) -> str:
        return self.prefix + ".{topic}"

    async def open(self, *, create: bool = True) -> None:
        import nats

        self.nc = await nats.connect(
            servers=self.url.split(","), connect_timeout=2, max_reconnect_attempts=-1
        )
        if create:
            js = self.nc.jetstream(timeout=10)
            await js.add_stream(
                name=self.stream, subjects=[self.prefix + ".>"], num_replicas=self.replicas
            )

    async def count(self) -> int:
        info = await self.nc.jetstream(timeout=10).stream_info(self.stream)
        return int(info.state.messages)

    async def read_all(self) -> list[Received]:
        js = self.nc.jetstream(timeout=10)
        info = await js.stream_info(self.stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            raw = await js.get_msg(self.stream, seq)
            headers = dict(raw.headers or {})
            stored = int(raw.time.timestamp() * 1000) if raw.time is not None else 0
            out.append(Received(raw.data or b"", headers, headers.get("Nats-Msg-Id", ""), stored))
        return out

    async def close(self, *, delete: bool = True) -> None:
        if self.nc is None:
            return
        if delete:
            with contextlib.suppress(Exception):
                await self.nc.jetstream(timeout=5).delete_stream(self.stream)
        await self.nc.close()


def _received(msg: Any) -> Received:
    """An AMQP message as a :class:`Received` (header values as strings)."""
    headers = {
        k: v.decode() if isinstance(v, bytes) else str(v) for k, v in (msg.headers or {}).items()
    }
    return Received(msg.body, headers, msg.message_id or "")


class RabbitReader:
    """An exchange of its own with a queue bound for the given routing keys, read back."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url, self.exchange = url, exchange
        self.conn: Any = None
        self.queue: Any = None

    @property
    def route_template(self) -> str:
        return self.exchange + "/{topic}"

    async def open(self, *keys: str) -> None:
        import aio_pika

        self.conn = await aio_pika.connect(self.url, timeout=5)
        channel = await self.conn.channel()
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        self.queue = await channel.declare_queue(self.exchange + ".q", durable=True)
        for key in keys:
            await self.queue.bind(exchange, key)

    async def read(self, want: int, timeout_s: float = 10.0) -> list[Received]:
        out: list[Received] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < want and time.monotonic() < deadline:
            msg = await self.queue.get(no_ack=True, fail=False)
            if msg is None:
                await asyncio.sleep(0.05)
                continue
            out.append(_received(msg))
        return out

    async def consume(self, on_message: Callable[[Received], None]) -> None:
        """Push each message to ``on_message`` as it arrives (acknowledged on delivery) until
        :meth:`close`; no polling gaps, so when it was taken is when it reached the queue."""

        async def deliver(msg: Any) -> None:
            on_message(_received(msg))

        await self.queue.consume(deliver, no_ack=True)

    async def close(self) -> None:
        if self.conn is None:
            return
        with contextlib.suppress(Exception):
            channel = await self.conn.channel()
            await channel.queue_delete(self.exchange + ".q")
            await channel.exchange_delete(self.exchange)
        await self.conn.close()
