"""``apache.rocketmq.v2.MessagingService``: the RocketMQ 5 protocol over the three cores.

Each RPC checks the caller through the :class:`~tempomq.grpc.auth.GrpcAuth` hook, translates
the request (:mod:`tempomq.grpc.convert`), calls the broker core, the delay service or the
transaction coordinator through their public methods, and answers with a ``status``. Domain
errors become RocketMQ codes in :func:`~tempomq.grpc.convert.code_for`; nothing raises out of
an RPC, so a client always gets a status it understands (an unexpected error is logged and
answered ``INTERNAL_SERVER_ERROR``).

What a RocketMQ client expects and how it maps (user-facing: docs/rocketmq.md):

- routes name every queue of the topic on this server's advertised address and accept all four
  message types; namespaces are refused (tempomq has none);
- a receive reads the whole topic whatever queue the client names (as RocketMQ's proxy does), so
  an empty queue never holds a long poll while others have messages, and answers before the
  client's deadline;
- the receipt handle is the consumer group's receipt; ChangeInvisibleDuration swaps it;
- a push consumer gets one assignment per topic (its long poll reads every queue anyway), and
  its messages are renewed until acked (:mod:`tempomq.grpc.renewal`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
import structlog

from broker_core.broker import Broker
from broker_core.errors import InvalidRequest, MessageNotFound, TempoError
from broker_core.groups import Delivery, parse_tags
from broker_core.http import MAX_DELAY_MS
from broker_core.message import PROP_SHARDING_KEY, parse_msg_id, validate_topic_name
from broker_core.retry import dlq_topic, plan_redelivery
from delayserver.http import AlreadyDelivered
from delayserver.service import DelayService
from delayserver.store import DelayState
from tempomq.config import HostPort
from tempomq.grpc import convert
from tempomq.grpc.auth import AllowAll, GrpcAuth, Resource
from tempomq.grpc.clients import PRODUCER_GROUP_PREFIX, ClientRegistry, ClientSession
from tempomq.grpc.convert import Code, error_status, status
from tempomq.grpc.protocol import definition_pb2 as pb
from tempomq.grpc.protocol import service_pb2 as spb
from tempomq.grpc.protocol.service_pb2_grpc import MessagingServiceServicer
from tempomq.grpc.renewal import ReceiptRenewer
from txcoord.coordinator import Coordinator, TxNotFound
from txcoord.states import TxEvent

log = structlog.get_logger(__name__)

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]

#: Longest message a client may send over the protocol beside its body (properties, keys, ...).
FRAME_OVERHEAD_BYTES = 1024 * 1024
#: A receive answers this long before the client's deadline at the latest.
_DEADLINE_MARGIN_S = 1.5
_DEFAULT_BATCH = 32
#: The send retry policy handed to producers (RocketMQ's proxy default).
_SEND_ATTEMPTS = 3
_ALL_TYPES = (
    pb.MessageType.NORMAL,
    pb.MessageType.FIFO,
    pb.MessageType.DELAY,
    pb.MessageType.TRANSACTION,
)
_RESOLUTIONS = {
    pb.TransactionResolution.COMMIT: TxEvent.COMMIT,
    pb.TransactionResolution.ROLLBACK: TxEvent.ROLLBACK,
}


class NamespaceUnsupported(TempoError):
    status, code = 400, "namespace_unsupported"


def _metadata(context: Context) -> dict[str, str]:
    return {
        k: v
        for k, v in (context.invocation_metadata() or ())
        if isinstance(v, str)  # binary (-bin) entries are of no use here
    }


def _name(resource: pb.Resource, what: str) -> str:
    if resource.resource_namespace:
        raise NamespaceUnsupported(
            f"namespace {resource.resource_namespace!r} on {what} {resource.name!r}: tempomq has "
            "no namespaces; configure the client without one"
        )
    if not resource.name:
        raise InvalidRequest(f"the {what} name is missing")
    return resource.name


def _duration_ms(d: Any) -> int:
    return int(d.seconds) * 1000 + int(d.nanos) // 1_000_000


def _internal_error(rpc: str) -> pb.Status:
    log.exception("grpc.unhandled", rpc=rpc)
    return status(Code.INTERNAL_SERVER_ERROR, "internal error, see server log")


Handler = Callable[["MessagingService", Any, Context], Awaitable[R]]


def unary(response: Callable[..., R]) -> Callable[[Handler[R]], Handler[R]]:
    """An RPC that always answers with a status: a domain error becomes its RocketMQ code,
    anything unexpected is logged and answered ``INTERNAL_SERVER_ERROR``."""

    def wrap(handler: Handler[R]) -> Handler[R]:
        @functools.wraps(handler)
        async def rpc(self: MessagingService, request: Any, context: Context) -> R:
            try:
                return await handler(self, request, context)
            except TempoError as exc:
                return response(status=error_status(exc))
            except Exception:
                return response(status=_internal_error(handler.__name__))

        return rpc

    return wrap


def _unsupported(what: str) -> pb.Status:
    return status(Code.UNSUPPORTED, f"{what} is not supported by tempomq")


def _answer_unsupported(response: Callable[..., R], what: str) -> Handler[R]:
    """An RPC of a feature tempomq does not have: answered at once, ``UNSUPPORTED``."""

    async def rpc(self: MessagingService, request: Any, context: Context) -> R:
        return response(status=_unsupported(what))

    return rpc


class MessagingService(MessagingServiceServicer):
    def __init__(
        self,
        broker: Broker,
        delay: DelayService,
        tx: Coordinator,
        *,
        advertise: HostPort,
        clients: ClientRegistry | None = None,
        auth: GrpcAuth | None = None,
    ) -> None:
        self.broker = broker
        self.delay = delay
        self.tx = tx
        self.clients = ClientRegistry() if clients is None else clients
        #: Push consumers' deliveries, kept invisible until they are acked.
        self.renewer = ReceiptRenewer(broker, slice_ms=broker.config.default_invisible_ms)
        self.auth: GrpcAuth = AllowAll() if auth is None else auth
        self.advertise = advertise
        self._host = str(advertise)

    # -- plumbing ---------------------------------------------------------------------------------

    async def _topic(self, context: Context, rpc: str, request: Any) -> str:
        """The ``topic`` of a request, through the auth hook."""
        topic = _name(request.topic, "topic")
        await self._check(context, rpc, ("topic", topic))
        return topic

    async def _topic_and_group(self, context: Context, rpc: str, request: Any) -> tuple[str, str]:
        """The ``topic`` and ``group`` of a request, through the auth hook."""
        topic = _name(request.topic, "topic")
        group = _name(request.group, "group")
        await self._check(context, rpc, ("topic", topic), ("group", group))
        return topic, group

    async def _check(self, context: Context, rpc: str, *resources: Resource) -> dict[str, str]:
        """The auth hook; returns the call's metadata."""
        metadata = _metadata(context)
        await self.auth.check(metadata, rpc, resources)
        return metadata

    def _endpoints(self) -> pb.Endpoints:
        host = self.advertise.host
        scheme = pb.AddressScheme.DOMAIN_NAME
        if all(p.isdigit() for p in host.split(".")) and host.count(".") == 3:
            scheme = pb.AddressScheme.IPv4
        elif ":" in host:
            scheme = pb.AddressScheme.IPv6
        endpoints = pb.Endpoints(scheme=scheme)
        endpoints.addresses.add(host=host, port=self.advertise.port)
        return endpoints

    def _queue(self, topic: str, queue_id: int) -> pb.MessageQueue:
        mq = pb.MessageQueue(id=queue_id, permission=pb.Permission.READ_WRITE)
        mq.topic.name = topic
        mq.broker.name = "tempomq"
        mq.broker.id = 0
        mq.broker.endpoints.CopyFrom(self._endpoints())
        mq.accept_message_types.extend(_ALL_TYPES)
        return mq

    # -- routes, liveness --------------------------------------------------------------------------

    @unary(spb.QueryRouteResponse)
    async def QueryRoute(
        self, request: spb.QueryRouteRequest, context: Context
    ) -> spb.QueryRouteResponse:
        name = await self._topic(context, "QueryRoute", request)
        topic = self.broker.get_topic(name)
        return spb.QueryRouteResponse(
            status=status(),
            message_queues=[self._queue(name, q) for q in range(topic.queues)],
        )

    @unary(spb.QueryAssignmentResponse)
    async def QueryAssignment(
        self, request: spb.QueryAssignmentRequest, context: Context
    ) -> spb.QueryAssignmentResponse:
        topic, _ = await self._topic_and_group(context, "QueryAssignment", request)
        self.broker.get_topic(topic)
        # One assignment: each receive reads every queue of the topic.
        assignment = pb.Assignment(message_queue=self._queue(topic, 0))
        return spb.QueryAssignmentResponse(status=status(), assignments=[assignment])

    @unary(spb.HeartbeatResponse)
    async def Heartbeat(
        self, request: spb.HeartbeatRequest, context: Context
    ) -> spb.HeartbeatResponse:
        resources: list[Resource] = []
        if request.HasField("group") and request.group.name:
            resources.append(("group", _name(request.group, "group")))
        await self._check(context, "Heartbeat", *resources)
        return spb.HeartbeatResponse(status=status())

    @unary(spb.NotifyClientTerminationResponse)
    async def NotifyClientTermination(
        self, request: spb.NotifyClientTerminationRequest, context: Context
    ) -> spb.NotifyClientTerminationResponse:
        metadata = await self._check(context, "NotifyClientTermination")
        client_id = metadata.get("x-mq-client-id")
        if client_id:
            self.clients.terminate(client_id)
            self.renewer.drop_client(client_id)
        return spb.NotifyClientTerminationResponse(status=status())

    # -- telemetry --------------------------------------------------------------------------------

    async def Telemetry(
        self, request_iterator: AsyncIterator[spb.TelemetryCommand], context: Context
    ) -> AsyncIterator[spb.TelemetryCommand]:
        """Settings in, settings out; then check-backs out, for as long as the client stays."""
        metadata = _metadata(context)
        client_id = metadata.get("x-mq-client-id", "")
        session = ClientSession(client_id, pb.ClientType.CLIENT_TYPE_UNSPECIFIED)
        reader = asyncio.create_task(self._read_telemetry(request_iterator, metadata, session))
        try:
            while True:
                command = await session.outbox.get()
                if command is None:
                    return
                yield command
        finally:
            reader.cancel()
            self.clients.close(session)
            if self.clients.get(session.client_id) is None:
                self.renewer.drop_client(session.client_id)

    async def _read_telemetry(
        self,
        commands: AsyncIterator[spb.TelemetryCommand],
        metadata: Mapping[str, str],
        session: ClientSession,
    ) -> None:
        try:
            async for command in commands:
                if command.HasField("settings"):
                    reply = await self._settings(command.settings, metadata, session)
                    session.outbox.put_nowait(reply)
                    if reply.status.code != Code.OK:
                        break
                # Thread stack traces and message verification results need no answer.
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("grpc.telemetry_failed", client_id=session.client_id)
        finally:
            session.outbox.put_nowait(None)

    async def _settings(
        self, settings: pb.Settings, metadata: Mapping[str, str], session: ClientSession
    ) -> spb.TelemetryCommand:
        reply = spb.TelemetryCommand()
        try:
            resources: list[Resource] = []
            if settings.WhichOneof("pub_sub") == "publishing":
                topics = [_name(t, "topic") for t in settings.publishing.topics]
                resources.extend(("topic", t) for t in topics)
            elif settings.WhichOneof("pub_sub") == "subscription":
                group = _name(settings.subscription.group, "group")
                resources.append(("group", group))
                topics = [_name(s.topic, "topic") for s in settings.subscription.subscriptions]
                resources.extend(("topic", t) for t in topics)
            else:
                topics, group = [], ""
            await self.auth.check(metadata, "Telemetry", resources)
        except TempoError as exc:
            reply.status.CopyFrom(error_status(exc))
            return reply
        session.client_type = settings.client_type
        if settings.WhichOneof("pub_sub") == "subscription":
            session.group = group
        session.topics = frozenset(topics)
        if session.client_id:
            self.clients.open(session)
        reply.status.CopyFrom(status())
        reply.settings.CopyFrom(self._settings_for(settings, session))
        return reply

    def _settings_for(self, given: pb.Settings, session: ClientSession) -> pb.Settings:
        config = self.broker.config
        out = pb.Settings(client_type=given.client_type)
        out.metric.on = False
        if given.HasField("request_timeout"):
            out.request_timeout.CopyFrom(given.request_timeout)
        if given.WhichOneof("pub_sub") == "publishing":
            out.publishing.CopyFrom(given.publishing)
            out.publishing.max_body_size = config.max_body_bytes
            out.publishing.validate_message_type = False
            out.backoff_policy.max_attempts = _SEND_ATTEMPTS
            backoff = out.backoff_policy.exponential_backoff
            backoff.initial.nanos = 10_000_000
            backoff.max.seconds = 1
            backoff.multiplier = 2.0
            return out
        if given.WhichOneof("pub_sub") == "subscription":
            group = self.broker.group_config(session.group)
            out.subscription.CopyFrom(given.subscription)
            out.subscription.fifo = bool(group and group.fifo)
            out.subscription.receive_batch_size = _DEFAULT_BATCH
            if not given.subscription.HasField("long_polling_timeout"):
                out.subscription.long_polling_timeout.seconds = 20
            out.backoff_policy.max_attempts = group.max_attempts if group else config.max_attempts
            for ms in config.backoff_ms:
                step = out.backoff_policy.customized_backoff.next.add()
                step.seconds, rest = divmod(ms, 1000)
                step.nanos = rest * 1_000_000
        return out

    # -- sending ----------------------------------------------------------------------------------

    @unary(spb.SendMessageResponse)
    async def SendMessage(
        self, request: spb.SendMessageRequest, context: Context
    ) -> spb.SendMessageResponse:
        if not request.messages:
            raise InvalidRequest("a send needs at least one message")
        names = sorted({_name(m.topic, "topic") for m in request.messages})
        metadata = await self._check(context, "SendMessage", *(("topic", n) for n in names))
        client_id = metadata.get("x-mq-client-id", "")
        entries = []
        failed: pb.Status | None = None
        for m in request.messages:
            try:
                entry = await self._send_one(m, client_id)
            except TempoError as exc:
                entry = spb.SendResultEntry(status=error_status(exc))
                failed = failed or entry.status
            entries.append(entry)
        return spb.SendMessageResponse(status=failed or status(), entries=entries)

    async def _send_one(self, m: pb.Message, client_id: str) -> spb.SendResultEntry:
        broker = self.broker
        name = validate_topic_name(m.topic.name, client=True)
        topic = await broker.resolve_topic(name)
        now = broker.timers.now_ms()
        msg, deliver_at = convert.to_message(
            m, name, max_body=broker.config.max_body_bytes, now_ms=now
        )
        kind = m.system_properties.message_type
        if kind == pb.MessageType.FIFO and PROP_SHARDING_KEY not in msg.properties:
            raise InvalidRequest(
                "a FIFO message needs a message_group", code="illegal_message_group"
            )
        if deliver_at - now > MAX_DELAY_MS:
            raise InvalidRequest("the delivery time is more than 10 years ahead")
        msg.queue_id = broker.store.select_queue(topic, msg.properties.get(PROP_SHARDING_KEY))
        if not msg.msg_id:
            msg.msg_id = self.delay.new_msg_id()
        if kind == pb.MessageType.TRANSACTION:
            sp = m.system_properties
            immunity = None
            if sp.HasField("orphaned_transaction_recovery_duration"):
                immunity = _duration_ms(sp.orphaned_transaction_recovery_duration)
            row = await self.tx.prepare(
                msg,
                deliver_at_ms=deliver_at,
                producer_group=PRODUCER_GROUP_PREFIX + client_id,
                check_url=None,
                check_immunity_ms=immunity,
            )
            return spb.SendResultEntry(
                status=status(), message_id=row.msg_id.hex(), transaction_id=row.tx_id
            )
        if deliver_at > now:
            await self.delay.schedule([msg], [deliver_at])
            msg_id = msg.msg_id.hex()
            return spb.SendResultEntry(status=status(), message_id=msg_id, recall_handle=msg_id)
        [result] = await broker.put([msg], check_duplicate=True)
        return spb.SendResultEntry(
            status=status(), message_id=result.msg_id.hex(), offset=result.queue_offset
        )

    @unary(spb.RecallMessageResponse)
    async def RecallMessage(
        self, request: spb.RecallMessageRequest, context: Context
    ) -> spb.RecallMessageResponse:
        topic = await self._topic(context, "RecallMessage", request)
        try:
            msg_id = parse_msg_id(request.recall_handle)
        except TempoError:
            raise InvalidRequest("not a recall handle from a delayed send") from None
        info = await self.delay.get(msg_id)
        if info is None or info.topic != topic:
            raise MessageNotFound(f"no delayed message {request.recall_handle} in {topic!r}")
        info = await self.delay.cancel(msg_id)
        if info is not None and info.state is DelayState.DELIVERED:
            raise AlreadyDelivered(f"message {msg_id.hex()} was already delivered")
        return spb.RecallMessageResponse(status=status(), message_id=msg_id.hex())

    # -- transactions -----------------------------------------------------------------------------

    @unary(spb.EndTransactionResponse)
    async def EndTransaction(
        self, request: spb.EndTransactionRequest, context: Context
    ) -> spb.EndTransactionResponse:
        topic = await self._topic(context, "EndTransaction", request)
        # The caller was allowed this topic: its transaction must be one of the topic's.
        if (await self.tx.get(request.transaction_id)).topic != topic:
            raise TxNotFound(f"no transaction {request.transaction_id} on topic {topic!r}")
        event = _RESOLUTIONS.get(request.resolution)
        if request.source == pb.TransactionSource.SOURCE_SERVER_CHECK:
            # The checker's answer; "unknown" (resolution 0) counts as a check like any other.
            await self.tx.answer(request.transaction_id, event or TxEvent.UNKNOWN)
        elif event is TxEvent.COMMIT:
            await self.tx.commit(request.transaction_id)
        elif event is TxEvent.ROLLBACK:
            await self.tx.rollback(request.transaction_id)
        else:
            raise InvalidRequest("resolution must be COMMIT or ROLLBACK")
        return spb.EndTransactionResponse(status=status())

    # -- consuming --------------------------------------------------------------------------------

    async def ReceiveMessage(
        self, request: spb.ReceiveMessageRequest, context: Context
    ) -> AsyncIterator[spb.ReceiveMessageResponse]:
        try:
            deliveries, invisible_ms = await self._receive(request, context)
        except TempoError as exc:
            yield spb.ReceiveMessageResponse(status=error_status(exc))
            return
        except Exception:
            yield spb.ReceiveMessageResponse(status=_internal_error("ReceiveMessage"))
            return
        if not deliveries:
            yield spb.ReceiveMessageResponse(
                status=status(Code.MESSAGE_NOT_FOUND, "no new message")
            )
            return
        yield spb.ReceiveMessageResponse(status=status())
        # When the batch left: push consumers measure their receive latency from it, and fail
        # the whole batch without it.
        sent = spb.ReceiveMessageResponse()
        sent.delivery_timestamp.FromMilliseconds(self.broker.timers.now_ms())
        yield sent
        for d in deliveries:
            yield spb.ReceiveMessageResponse(
                message=convert.delivery_to_pb(
                    d.message,
                    receipt=d.receipt,
                    attempt=d.attempt,
                    invisible_ms=invisible_ms,
                    host=self._host,
                )
            )

    async def _receive(
        self, request: spb.ReceiveMessageRequest, context: Context
    ) -> tuple[list[Delivery], int]:
        topic = _name(request.message_queue.topic, "topic")
        group = _name(request.group, "group")
        await self._check(context, "ReceiveMessage", ("topic", topic), ("group", group))
        config = self.broker.config
        expression = request.filter_expression
        if expression.type == pb.FilterType.SQL:
            raise InvalidRequest(
                "SQL92 filters are not supported; filter by tag", code="illegal_filter_expression"
            )
        tags = parse_tags(expression.expression or None)
        renew = request.auto_renew and not request.HasField("invisible_duration")
        if renew:  # a push consumer: the server picks, and renews until the ack
            invisible_ms = self.renewer.slice_ms
        else:
            invisible_ms = max(_duration_ms(request.invisible_duration), 1000)
        wait_ms = 0
        if request.HasField("long_polling_timeout"):
            wait_ms = min(_duration_ms(request.long_polling_timeout), config.max_wait_ms)
        remaining_s = context.time_remaining()
        if remaining_s is not None:
            margin_s = min(_DEADLINE_MARGIN_S, remaining_s / 2)
            wait_ms = max(0, min(wait_ms, int((remaining_s - margin_s) * 1000)))
        batch = request.batch_size if request.batch_size > 0 else _DEFAULT_BATCH
        self.broker.get_topic(topic)
        deliveries = await self.broker.receive(
            topic,
            group,
            max_messages=min(batch, config.max_receive_batch),
            wait_ms=wait_ms,
            invisible_ms=invisible_ms,
            tags=tags,
        )
        if renew and deliveries:
            client_id = _metadata(context).get("x-mq-client-id", "")
            deadline_ms = self.broker.timers.now_ms() + invisible_ms
            for d in deliveries:
                self.renewer.hold(client_id, topic, group, d.receipt, deadline_ms)
        return deliveries, invisible_ms

    @unary(spb.AckMessageResponse)
    async def AckMessage(
        self, request: spb.AckMessageRequest, context: Context
    ) -> spb.AckMessageResponse:
        topic, group = await self._topic_and_group(context, "AckMessage", request)
        entries = []
        codes = set()
        for e in request.entries:
            try:
                await self.broker.ack(topic, group, [self.renewer.release(e.receipt_handle)])
                st = status()
            except TempoError as exc:
                st = error_status(exc)
            codes.add(st.code)
            entries.append(
                spb.AckMessageResultEntry(
                    message_id=e.message_id, receipt_handle=e.receipt_handle, status=st
                )
            )
        if len(codes) > 1:
            overall = status(Code.MULTIPLE_RESULTS, "some entries failed, see each entry")
        else:
            overall = entries[0].status if entries else status()
        return spb.AckMessageResponse(status=overall, entries=entries)

    @unary(spb.ChangeInvisibleDurationResponse)
    async def ChangeInvisibleDuration(
        self, request: spb.ChangeInvisibleDurationRequest, context: Context
    ) -> spb.ChangeInvisibleDurationResponse:
        topic, group = await self._topic_and_group(context, "ChangeInvisibleDuration", request)
        receipt = await self.broker.change_invisible(
            topic,
            group,
            self.renewer.release(request.receipt_handle),
            _duration_ms(request.invisible_duration),
        )
        return spb.ChangeInvisibleDurationResponse(status=status(), receipt_handle=receipt)

    @unary(spb.ForwardMessageToDeadLetterQueueResponse)
    async def ForwardMessageToDeadLetterQueue(
        self, request: spb.ForwardMessageToDeadLetterQueueRequest, context: Context
    ) -> spb.ForwardMessageToDeadLetterQueueResponse:
        topic, group = await self._topic_and_group(
            context, "ForwardMessageToDeadLetterQueue", request
        )
        try:
            msg_id = parse_msg_id(request.message_id)
        except TempoError:
            raise MessageNotFound(f"no message {request.message_id!r}") from None
        stored = self.broker.get_message(msg_id)
        attempt = max(request.delivery_attempt, 1)
        plan = plan_redelivery(
            stored,
            group=group,
            attempt=attempt,
            max_attempts=attempt,  # dead now, whatever the group's limit
            schedule=self.broker.config.backoff_ms,
            now_ms=self.broker.timers.now_ms(),
        )
        # Stored in the DLQ first, then acked: a failure in between keeps it, never loses it.
        await self.broker.store.ensure_topic(dlq_topic(group), 1)
        await self.broker.put([plan.message], check_duplicate=False)
        await self.broker.ack(topic, group, [self.renewer.release(request.receipt_handle)])
        return spb.ForwardMessageToDeadLetterQueueResponse(status=status())

    # -- not supported ----------------------------------------------------------------------------

    async def PullMessage(
        self, request: spb.PullMessageRequest, context: Context
    ) -> AsyncIterator[spb.PullMessageResponse]:
        yield spb.PullMessageResponse(status=_unsupported("PullMessage (pull consumers)"))

    UpdateOffset = _answer_unsupported(spb.UpdateOffsetResponse, "UpdateOffset")
    GetOffset = _answer_unsupported(spb.GetOffsetResponse, "GetOffset")
    QueryOffset = _answer_unsupported(spb.QueryOffsetResponse, "QueryOffset")
    SyncLiteSubscription = _answer_unsupported(spb.SyncLiteSubscriptionResponse, "lite topics")
