"""Release targets: where a released delayed message, a committed transactional message and a
plain send go.

One small interface, :class:`ReleaseTarget`, owned by the delay server: ``publish`` a batch and
return only once the target has it durably (or raise :class:`TargetUnavailable`, changing
nothing that cannot be repeated). Three implementations:

- :class:`EmbeddedTarget` (the default): the broker core's own CommitLog, idempotent by
  ``(topic, msg_id)``; consumers use tempomq's receive API.
- :class:`NatsTarget` (``--release-to nats://host:port``): NATS JetStream through ``nats-py``,
  one subject per topic (``--release-topic``, default ``tempomq.{topic}``), each publish
  awaiting its acknowledgement, ``Nats-Msg-Id`` = the message id so that JetStream drops a
  repeat within the stream's duplicate window (JetStream's own de-duplication,
  https://docs.nats.io/nats-concepts/jetstream/streams#duplicate-window).
- :class:`AmqpTarget` (``--release-to amqp://user:pass@host:port/vhost``): RabbitMQ through
  ``aio-pika``, one exchange and routing key per topic (``--release-topic``, default
  ``tempomq/{topic}``: exchange ``tempomq``, routing key the topic), publisher confirms,
  persistent messages, ``message_id`` set so that consumers can drop a repeat (RabbitMQ keeps
  no de-duplication of its own: https://www.rabbitmq.com/docs/reliability).

A Kafka target (``aiokafka``) fits the same interface: a topic per topic, ``acks=all`` with an
idempotent producer, the id as the record key and the headers as record headers; see
docs/deployment.md. It is not built here.

What travels with each message (:func:`message_headers`): its properties under their own names
(``DELIVER_AT`` and ``RELEASED_AT`` among them for a released delayed message), and
``TEMPOMQ-Msg-Id``, ``TEMPOMQ-Topic``, ``TEMPOMQ-Tags``, ``TEMPOMQ-Keys`` (a JSON list) and
``TEMPOMQ-Born-At`` (epoch ms). The body is the payload, byte for byte.

A target that cannot be reached raises :class:`TargetUnavailable` (``503
target_unavailable``, naming the target and why): a plain send is refused, a release stays in
the delay store and is tried again (:class:`delayserver.service.DelayService`), and
``/readyz`` names the target through :meth:`ReleaseTarget.health`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import structlog

from broker_core.errors import StoreUnavailable, TempoError
from broker_core.message import Message

if TYPE_CHECKING:
    from broker_core.store import MessageStore

log = structlog.get_logger(__name__)

#: Header names tempomq adds beside the message's properties.
HEADER_MSG_ID = "TEMPOMQ-Msg-Id"
HEADER_TOPIC = "TEMPOMQ-Topic"
HEADER_TAGS = "TEMPOMQ-Tags"
HEADER_KEYS = "TEMPOMQ-Keys"
HEADER_BORN_AT = "TEMPOMQ-Born-At"
#: JetStream's de-duplication header (https://docs.nats.io/using-nats/developer/develop_jetstream/model_deep_dive#message-deduplication).
NATS_MSG_ID = "Nats-Msg-Id"

DEFAULT_NATS_TOPIC = "tempomq.{topic}"
DEFAULT_AMQP_TOPIC = "tempomq/{topic}"
#: How long one publish may wait for its acknowledgement or confirm before the batch counts as
#: failed (and is retried: the repeat is dropped by its id).
PUBLISH_TIMEOUT_S = 5.0
#: How long a connection attempt may take before the target counts as down.
CONNECT_TIMEOUT_S = 2.0
#: Publishes in flight at once from one batch (each awaits its own acknowledgement).
_IN_FLIGHT = 256
#: JetStream publishes sent before their acknowledgements are awaited: the publish timeout
#: applies per chunk, so a large release batch to a slow stream makes progress, not a timeout.
_NATS_CHUNK = 1000

#: A header name is a token: what else a property name holds is percent-encoded.
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9!#$&'*+.^_`|~-]")


class TargetUnavailable(StoreUnavailable):
    """The release target cannot take messages now; nothing is lost. Raised by ``publish``
    after the target acknowledged part of the batch, ``acknowledged`` holds those messages'
    ids (else it is empty), so that a caller records them and repeats only the others."""

    code = "target_unavailable"

    def __init__(self, message: str, *, acknowledged: frozenset[bytes] = frozenset()) -> None:
        super().__init__(message)
        self.acknowledged = acknowledged


def _refused(
    name: str,
    verb: str,
    messages: Sequence[Message],
    results: Sequence[BaseException | None],
    explain: Any,
) -> TargetUnavailable | None:
    """The error for a batch some of whose ``results`` (one per message: its exception, or
    None once acknowledged) failed, naming the first failure (``explain(exc, msg)`` says why,
    or None for its plain text), with the ids of those acknowledged; None when none failed."""
    failed = [i for i, r in enumerate(results) if r is not None]
    if not failed:
        return None
    first = results[failed[0]]
    assert first is not None
    reason = explain(first, messages[failed[0]]) or _reason(first)
    acknowledged = frozenset(m.msg_id for m, r in zip(messages, results, strict=True) if r is None)
    return TargetUnavailable(
        f"{name}: {len(failed)} of {len(messages)} not {verb}: {reason}",
        acknowledged=acknowledged,
    )


class ConsumeOnTarget(TempoError):
    """tempomq's receive API in a mode where messages live in another broker."""

    status, code = 409, "consume_on_target"


class ReleaseTarget(Protocol):
    """Where released and sent messages go; see the module docstring."""

    #: ``embedded``, ``nats`` or ``amqp``.
    kind: str

    async def start(self) -> None:
        """Connect. A target that is down does not stop the server from starting: it stays
        unhealthy, and publishes raise :class:`TargetUnavailable`, until it answers."""
        ...

    async def stop(self) -> None: ...

    async def publish(self, messages: Sequence[Message], *, check_duplicate: bool) -> None:
        """Hand ``messages`` (each with ``msg_id`` set) to the target; return once the target
        acknowledged every one durably. Idempotent by ``msg_id`` as far as the target allows
        (``check_duplicate``: the batch may repeat one already published). Raises
        :class:`TargetUnavailable` with the reason; some of the batch may then have landed."""
        ...

    async def health(self) -> str | None:
        """None when publishes can go through, else why not (for ``/readyz``)."""
        ...

    def describe(self, topic: str) -> str:
        """Where ``topic``'s messages go, for people: ``NATS JetStream subject tempomq.x``."""
        ...


def message_headers(msg: Message) -> dict[str, str]:
    """The headers a message travels with to NATS or RabbitMQ (shape in the module docstring).
    Property names that are not header tokens are percent-encoded; values are kept, except that
    CR and LF (which would end a NATS header line) are percent-encoded."""
    headers: dict[str, str] = {}
    for name, value in msg.properties.items():
        if _NOT_TOKEN.search(name):
            name = quote(name, safe="")
        if name.lower().startswith("nats-"):
            name = "X-" + name  # never a JetStream instruction from a client's property
        if "\r" in value or "\n" in value:
            value = value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        headers[name] = value
    headers[HEADER_MSG_ID] = msg.msg_id.hex()
    headers[HEADER_TOPIC] = msg.topic
    if msg.tags:
        headers[HEADER_TAGS] = msg.tags
    if msg.keys:
        headers[HEADER_KEYS] = json.dumps(list(msg.keys))
    if msg.born_at:
        headers[HEADER_BORN_AT] = str(msg.born_at)
    return headers


def redact(url: str) -> str:
    """``url`` without its password, for logs, errors and /readyz."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _no_stream(exc: BaseException | None) -> bool:
    """JetStream answered that no stream captures the subject."""
    return type(exc).__name__ == "NoStreamResponseError"


async def _bounded(calls: Sequence[Any], timeout_s: float) -> list[BaseException | None]:
    """Await the coroutines ``calls``, at most ``_IN_FLIGHT`` at a time, each chunk within
    ``timeout_s`` (one deadline per chunk: a ``wait_for`` per call costs a task per message);
    each one's exception or None. A chunk out of time counts as failed whole."""
    out: list[BaseException | None] = []
    for i in range(0, len(calls), _IN_FLIGHT):
        chunk = calls[i : i + _IN_FLIGHT]
        try:
            async with asyncio.timeout(timeout_s):
                results = await asyncio.gather(*chunk, return_exceptions=True)
        except TimeoutError:
            for call in calls[i + _IN_FLIGHT :]:
                call.close()
            late = TimeoutError(f"no confirm within {timeout_s:g}s")
            return [*out, *([late] * (len(calls) - i))]
        out.extend(r if isinstance(r, BaseException) else None for r in results)
    return out


class EmbeddedTarget:
    """The broker core's own topics (created on first release, one queue when unknown)."""

    kind = "embedded"

    def __init__(self, store: MessageStore) -> None:
        self.store = store

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def publish(self, messages: Sequence[Message], *, check_duplicate: bool) -> None:
        topics = self.store.topics
        for msg in messages:
            if msg.topic not in topics:
                await self.store.ensure_topic(msg.topic, 1)
        await self.store.put_many(messages, check_duplicate=check_duplicate)

    async def health(self) -> str | None:
        return self.store.failure

    def describe(self, topic: str) -> str:
        return f"topic {topic} of this server"


class NatsTarget:
    """NATS JetStream: a subject per topic, acknowledged publishes, ``Nats-Msg-Id`` = msg_id.

    ``stream``: when given, a stream of that name capturing the subjects is created at start if
    missing (``replicas`` copies, ``duplicate_window_s``), else the operator's streams must
    capture the subjects (a publish no stream captures fails as "no stream", 503).
    """

    kind = "nats"

    def __init__(
        self,
        url: str,
        *,
        subject: str = DEFAULT_NATS_TOPIC,
        stream: str | None = None,
        replicas: int = 1,
        duplicate_window_s: float = 120.0,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        if "{topic}" not in subject:
            raise ValueError(f"the subject template {subject!r} must contain {{topic}}")
        self.url = url
        self.servers = [u.strip() for u in url.split(",") if u.strip()]
        self.subject = subject
        self.stream = stream
        self.replicas = replicas
        self.duplicate_window_s = duplicate_window_s
        self.publish_timeout_s = publish_timeout_s
        self._nc: Any = None
        self._js: Any = None
        self._error: str | None = "not connected yet"
        self._connector: asyncio.Task[None] | None = None
        self._stream_ready = stream is None

    async def start(self) -> None:
        # The client retries its first connection for as long as it takes: wait a moment for
        # it, then let it go on in the background (the target is unhealthy meanwhile).
        self._connector = asyncio.create_task(self._connect(), name="tempomq-nats-connect")
        await asyncio.wait([self._connector], timeout=CONNECT_TIMEOUT_S)
        if not self._connector.done():
            log.error("target.connect_waiting", target=self.name, error=self._error)
        elif (exc := self._connector.exception()) is not None:
            self._error = f"cannot connect: {_reason(exc)}"
            log.error("target.connect_failed", target=self.name, error=self._error)

    @property
    def name(self) -> str:
        return f"NATS JetStream at {redact(self.url)}"

    async def _connect(self) -> None:
        import nats

        async def on_error(exc: Exception) -> None:
            reason = _reason(exc)
            if self._nc is None or not self._nc.is_connected:
                if self._error == f"cannot connect: {reason}":
                    return  # the same failure every reconnect attempt: logged once
                self._error = f"cannot connect: {reason}"
            log.warning("target.error", target=self.name, error=reason)

        async def on_disconnect() -> None:
            self._error = "disconnected; reconnecting"
            log.warning("target.disconnected", target=self.name)

        async def on_reconnect() -> None:
            self._error = None
            log.info("target.reconnected", target=self.name)

        self._nc = await nats.connect(
            servers=self.servers,
            connect_timeout=CONNECT_TIMEOUT_S,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            # Publishes made while disconnected are refused at once (503), not buffered.
            pending_size=0,
        )
        self._js = self._nc.jetstream(timeout=self.publish_timeout_s)
        self._error = None
        log.info("target.connected", target=self.name, subject=self.subject)
        try:
            await self._ensure_stream()
        except Exception as exc:  # tried again at the next publish
            log.error("target.stream_failed", stream=self.stream, error=_reason(exc))

    async def _ensure_stream(self) -> None:
        if self._stream_ready or self.stream is None:
            return
        from nats.js.api import StreamConfig
        from nats.js.errors import NotFoundError

        try:
            await self._js.stream_info(self.stream)
        except NotFoundError:
            prefix = self.subject.split("{topic}", 1)[0]
            wildcard = self.subject.replace("{topic}", "*")
            await self._js.add_stream(
                StreamConfig(
                    name=self.stream,
                    subjects=[prefix + ">" if prefix.endswith(".") else wildcard],
                    num_replicas=self.replicas,
                    duplicate_window=self.duplicate_window_s,
                )
            )
            log.info("target.stream_created", stream=self.stream, replicas=self.replicas)
        self._stream_ready = True

    async def stop(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
            self._connector = None
        nc, self._nc = self._nc, None
        if nc is not None:
            try:
                await nc.drain()
            except Exception as exc:
                log.warning("target.close_failed", target=self.name, error=_reason(exc))

    def subject_of(self, topic: str) -> str:
        return self.subject.replace("{topic}", topic)

    async def publish(self, messages: Sequence[Message], *, check_duplicate: bool) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise TargetUnavailable(f"{self.name}: {self._error or 'not connected'}")
        if not self._stream_ready:
            try:
                await self._ensure_stream()
            except Exception as exc:
                raise TargetUnavailable(
                    f"{self.name}: stream {self.stream}: {_reason(exc)}"
                ) from None
        results: list[BaseException | None] = []
        for i in range(0, len(messages), _NATS_CHUNK):
            try:
                results += await self._publish_chunk(messages[i : i + _NATS_CHUNK])
            except TargetUnavailable as exc:  # a chunk failed whole: the earlier ones landed
                done = frozenset(
                    m.msg_id for m, r in zip(messages, results, strict=False) if r is None
                )
                raise TargetUnavailable(str(exc), acknowledged=done) from None
        error = _refused(self.name, "acknowledged", messages, results, self._explain)
        if error is not None:
            if self.stream is not None and any(map(_no_stream, results)):
                self._stream_ready = False  # deleted, or a server back without its data
            raise error

    def _explain(self, exc: BaseException, msg: Message) -> str | None:
        if _no_stream(exc):
            return f"no stream captures subject {self.subject_of(msg.topic)}"
        if type(exc).__name__ == "MaxPayloadError" and self._nc is not None:
            return (
                f"message {msg.msg_id.hex()} has {len(msg.body)} bytes, over the NATS "
                f"server's max_payload of {self._nc.max_payload}"
            )
        return None

    async def _publish_chunk(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """Publish without waiting, then await every acknowledgement (each chunk has
        ``publish_timeout_s``, so a large batch is not timed out as a whole); per message its
        exception, or None once acknowledged."""
        from nats.errors import MaxPayloadError

        js = self._js
        futures: list[asyncio.Future[Any]] = []
        try:
            # One deadline for the chunk, sends and acknowledgements alike. Not the client's
            # per-publish ``wait_stall``: that wraps each publish in ``wait_for``, a task per
            # message, which measured four times the CPU of the whole publish path here.
            async with asyncio.timeout(self.publish_timeout_s):
                for msg in messages:
                    headers = message_headers(msg)
                    headers[NATS_MSG_ID] = headers[HEADER_MSG_ID]
                    subject = self.subject_of(msg.topic)
                    try:
                        futures.append(await js.publish_async(subject, msg.body, headers=headers))
                    except MaxPayloadError as exc:  # this message only: the others go on
                        futures.append(_failed(exc))
                done = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:  # refused at once (disconnected), or no acknowledgement in time
            for future in futures:
                future.cancel()  # frees its slot in the client's window of pending publishes
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no acknowledgement within {self.publish_timeout_s:g}s")
            raise TargetUnavailable(f"{self.name}: {_reason(exc)}") from None
        return [r if isinstance(r, BaseException) else None for r in done]

    async def health(self) -> str | None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return f"{self.name}: {self._error or 'not connected'}"
        if not self._stream_ready:
            return f"{self.name}: stream {self.stream} not created yet"
        return None

    def describe(self, topic: str) -> str:
        return f"NATS JetStream subject {self.subject_of(topic)} at {redact(self.url)}"


class AmqpTarget:
    """RabbitMQ: an exchange and routing key per topic, publisher confirms, persistent messages,
    ``message_id`` = msg_id. Exchanges are declared (durable, ``direct``) on first use; a
    message no queue is bound for is returned by RabbitMQ (``mandatory``) and counts as not
    published (503), so nothing vanishes into an exchange without queues."""

    kind = "amqp"

    def __init__(
        self,
        url: str,
        *,
        route: str = DEFAULT_AMQP_TOPIC,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        exchange, sep, key = route.partition("/")
        if not sep or "{topic}" not in route:
            raise ValueError(
                f"the route template {route!r} must be EXCHANGE/ROUTING_KEY with {{topic}} in "
                "either, e.g. tempomq/{topic}"
            )
        self.url = url
        self.exchange_template, self.key_template = exchange, key
        self.publish_timeout_s = publish_timeout_s
        self._conn: Any = None
        self._channel: Any = None
        self._exchanges: dict[str, Any] = {}
        self._error: str | None = "not connected yet"
        self._connector: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"RabbitMQ at {redact(self.url)}"

    async def start(self) -> None:
        try:
            await self._connect()
        except Exception as exc:
            self._error = f"cannot connect: {_reason(exc)}"
            log.error("target.connect_failed", target=self.name, error=self._error)
            self._connector = asyncio.create_task(self._keep_connecting(), name="tempomq-amqp")

    async def _connect(self) -> None:
        import aio_pika

        conn = await aio_pika.connect_robust(self.url, timeout=CONNECT_TIMEOUT_S)
        try:
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await conn.close()
            raise
        self._conn, self._channel = conn, channel
        self._error = None
        log.info("target.connected", target=self.name)

    async def _keep_connecting(self) -> None:
        while self._conn is None:
            await asyncio.sleep(1.0)
            try:
                await self._connect()
            except Exception as exc:
                self._error = f"cannot connect: {_reason(exc)}"

    async def stop(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
            self._connector = None
        conn, self._conn = self._conn, None
        self._exchanges.clear()
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:
                log.warning("target.close_failed", target=self.name, error=_reason(exc))

    def route_of(self, topic: str) -> tuple[str, str]:
        return (
            self.exchange_template.replace("{topic}", topic),
            self.key_template.replace("{topic}", topic),
        )

    def _down(self) -> str | None:
        conn, channel = self._conn, self._channel
        if conn is None:
            return self._error or "not connected"
        if conn.is_closed or channel is None or channel.is_closed:
            return "connection lost; reconnecting"
        return None

    async def _exchange(self, name: str) -> Any:
        exchange = self._exchanges.get(name)
        if exchange is None:
            import aio_pika

            exchange = await self._channel.declare_exchange(
                name, aio_pika.ExchangeType.DIRECT, durable=True, timeout=self.publish_timeout_s
            )
            self._exchanges[name] = exchange
        return exchange

    async def publish(self, messages: Sequence[Message], *, check_duplicate: bool) -> None:
        import aio_pika

        down = self._down()
        if down is not None:
            raise TargetUnavailable(f"{self.name}: {down}")
        calls = []
        try:
            for msg in messages:
                exchange_name, key = self.route_of(msg.topic)
                exchange = await self._exchange(exchange_name)
                body = aio_pika.Message(
                    msg.body,
                    headers=message_headers(msg),  # type: ignore[arg-type]
                    message_id=msg.msg_id.hex(),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    type=msg.topic,
                )
                calls.append(exchange.publish(body, key, mandatory=True, timeout=None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for call in calls:
                call.close()
            self._exchanges.clear()
            raise TargetUnavailable(f"{self.name}: {_reason(exc)}") from None
        results = await _bounded(calls, self.publish_timeout_s)
        for failure in results:
            if isinstance(failure, asyncio.CancelledError):
                raise failure
        error = _refused(self.name, "confirmed", messages, results, self._explain)
        if error is not None:
            raise error

    def _explain(self, exc: BaseException, msg: Message) -> str | None:
        import aio_pika

        if isinstance(exc, aio_pika.exceptions.DeliveryError):
            exchange_name, key = self.route_of(msg.topic)
            return f"returned: no queue bound to exchange {exchange_name} for key {key}"
        return None

    async def health(self) -> str | None:
        down = self._down()
        return None if down is None else f"{self.name}: {down}"

    def describe(self, topic: str) -> str:
        exchange, key = self.route_of(topic)
        return f"RabbitMQ exchange {exchange} routing key {key} at {redact(self.url)}"


def make_target(
    release_to: str,
    store: MessageStore,
    *,
    topic_template: str | None = None,
    stream: str | None = None,
    replicas: int = 1,
) -> ReleaseTarget:
    """The target ``--release-to`` names: ``embedded``, ``nats://...`` (several servers
    comma-separated) or ``amqp://...``/``amqps://...``. Raises ``ValueError`` otherwise."""
    if release_to == "embedded":
        return EmbeddedTarget(store)
    if release_to.startswith(("nats://", "tls://")):
        return NatsTarget(
            release_to,
            subject=topic_template or DEFAULT_NATS_TOPIC,
            stream=stream,
            replicas=replicas,
        )
    if release_to.startswith(("amqp://", "amqps://")):
        return AmqpTarget(release_to, route=topic_template or DEFAULT_AMQP_TOPIC)
    raise ValueError(f"{redact(release_to)!r} is not embedded, nats://... or amqp://...")
