"""Each RocketMQ RPC's translation, without a network: the servicer is called directly with a
stand-in call context, on a real broker, delay service and coordinator."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from broker_core.errors import TempoError
from broker_core.message import PROP_SHARDING_KEY
from delayserver.store import DelayState
from tempomq.config import HostPort
from tempomq.grpc import convert
from tempomq.grpc.auth import Resource
from tempomq.grpc.clients import PRODUCER_GROUP_PREFIX
from tempomq.grpc.protocol import definition_pb2 as pb
from tempomq.grpc.protocol import service_pb2 as spb
from tempomq.grpc.service import MessagingService
from tests.unit.broker_helpers import no_hang
from tests.unit.test_coordinator import Node
from txcoord.coordinator import TxSettings
from txcoord.states import TxState

Code = pb.Code
CLIENT_ID = "host@1234@1@abc"
#: Checks never come during these tests unless a test asks for them.
QUIET = TxSettings(check_immunity_ms=3_600_000, check_timeout_ms=300)


class Context:
    """What the servicer uses of ``grpc.aio.ServicerContext``."""

    def __init__(self, remaining_s: float | None = 10.0, client_id: str = CLIENT_ID) -> None:
        self.remaining_s = remaining_s
        self.metadata = (("x-mq-client-id", client_id), ("x-mq-language", "PYTHON"))

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return self.remaining_s


class Env:
    def __init__(self, node: Node, service: MessagingService) -> None:
        self.node = node
        self.service = service

    async def send(self, *messages: pb.Message, ctx: Context | None = None) -> Any:
        request = spb.SendMessageRequest(messages=messages)
        return await self.service.SendMessage(request, ctx or Context())  # type: ignore[arg-type]

    async def receive(
        self,
        group: str = "g",
        topic: str = "orders",
        *,
        wait_s: int | None = None,
        expression: pb.FilterExpression | None = None,
        ctx: Context | None = None,
        push: bool = False,
    ) -> list[Any]:
        request = spb.ReceiveMessageRequest(batch_size=32, auto_renew=push)
        request.group.name = group
        request.message_queue.topic.name = topic
        if not push:  # a push consumer leaves the time to the server
            request.invisible_duration.seconds = 30
        if wait_s is not None:
            request.long_polling_timeout.seconds = wait_s
        if expression is not None:
            request.filter_expression.CopyFrom(expression)
        frames = self.service.ReceiveMessage(request, ctx or Context())  # type: ignore[arg-type]
        return [f async for f in frames]

    async def received(self, group: str = "g", topic: str = "orders") -> list[pb.Message]:
        frames = await self.receive(group, topic)
        return [f.message for f in frames if f.HasField("message")]


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    with no_hang(20):
        yield


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    node = await Node(tmp_path / "d", QUIET).start()
    await node.broker.create_topic("orders", 4)
    service = MessagingService(
        node.broker, node.delay, node.tx, advertise=HostPort("10.1.2.3", 8081)
    )
    node.tx.check_channels.append(service.clients)
    yield Env(node, service)
    await node.stop()


def msg(
    body: bytes = b"hello",
    *,
    topic: str = "orders",
    kind: int = pb.MessageType.NORMAL,
    message_id: str = "",
    **system: Any,
) -> pb.Message:
    m = pb.Message(body=body)
    m.topic.name = topic
    sp = m.system_properties
    sp.message_type = kind  # type: ignore[assignment]
    sp.body_encoding = pb.Encoding.IDENTITY
    sp.message_id = message_id
    sp.born_timestamp.FromMilliseconds(1_800_000_000_000)
    for name, value in system.items():
        if name == "delivery_s":
            sp.delivery_timestamp.seconds = value
        elif name == "keys":
            sp.keys.extend(value)
        elif name == "props":
            m.user_properties.update(value)
        else:
            setattr(sp, name, value)
    return m


# -- routes ----------------------------------------------------------------------------------------


async def test_query_route_names_every_queue_on_the_advertised_address(env: Env) -> None:
    request = spb.QueryRouteRequest()
    request.topic.name = "orders"
    answer = await env.service.QueryRoute(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.OK
    assert [q.id for q in answer.message_queues] == [0, 1, 2, 3]
    q = answer.message_queues[0]
    assert (q.topic.name, q.permission) == ("orders", pb.Permission.READ_WRITE)
    assert q.broker.endpoints.scheme == pb.AddressScheme.IPv4
    assert [(a.host, a.port) for a in q.broker.endpoints.addresses] == [("10.1.2.3", 8081)]
    assert set(q.accept_message_types) == {
        pb.MessageType.NORMAL,
        pb.MessageType.FIFO,
        pb.MessageType.DELAY,
        pb.MessageType.TRANSACTION,
    }


@pytest.mark.parametrize(
    ("host", "scheme"),
    [("mq.example.com", pb.AddressScheme.DOMAIN_NAME), ("::1", pb.AddressScheme.IPv6)],
)
async def test_route_scheme_follows_the_advertised_host(env: Env, host: str, scheme: int) -> None:
    env.service.advertise = HostPort(host, 9)
    request = spb.QueryRouteRequest()
    request.topic.name = "orders"
    answer = await env.service.QueryRoute(request, Context())  # type: ignore[arg-type]
    assert answer.message_queues[0].broker.endpoints.scheme == scheme


async def test_unknown_topics_and_namespaces_are_refused(env: Env) -> None:
    request = spb.QueryRouteRequest()
    request.topic.name = "nope"
    answer = await env.service.QueryRoute(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.TOPIC_NOT_FOUND
    request.topic.name, request.topic.resource_namespace = "orders", "ns"
    answer = await env.service.QueryRoute(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.BAD_REQUEST
    assert "no namespaces" in answer.status.message


async def test_assignment_is_one_queue_of_the_topic(env: Env) -> None:
    request = spb.QueryAssignmentRequest()
    request.topic.name, request.group.name = "orders", "g"
    answer = await env.service.QueryAssignment(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.OK
    assert [a.message_queue.topic.name for a in answer.assignments] == ["orders"]


# -- sending -------------------------------------------------------------------------------------


async def test_normal_send_keeps_tag_keys_and_properties(env: Env) -> None:
    answer = await env.send(
        msg(b"body", tag="created", keys=["k1", "k2"], props={"a": "1"}, message_id="01" + "A" * 32)
    )
    assert answer.status.code == Code.OK
    [entry] = answer.entries
    stored = env.node.broker.get_message(bytes.fromhex(entry.message_id))
    assert (stored.body, stored.tags, stored.keys) == (b"body", "created", ("k1", "k2"))
    assert stored.properties == {"a": "1"}
    assert stored.born_at == 1_800_000_000_000


async def test_a_resent_message_id_is_stored_once_with_the_first_answer(env: Env) -> None:
    m = msg(b"once", message_id="01" + "B" * 32)
    first, second = await env.send(m), await env.send(m)
    assert first.entries[0].message_id == second.entries[0].message_id
    assert first.entries[0].offset == second.entries[0].offset
    assert len(await env.received()) == 1


async def test_fifo_sends_of_one_group_share_a_queue(env: Env) -> None:
    for i in range(6):
        await env.send(msg(str(i).encode(), kind=pb.MessageType.FIFO, message_group="user-7"))
    got = await env.received()
    assert {m.system_properties.queue_id for m in got} == {got[0].system_properties.queue_id}
    assert {m.system_properties.message_group for m in got} == {"user-7"}
    answer = await env.send(msg(kind=pb.MessageType.FIFO))
    assert answer.status.code == Code.ILLEGAL_MESSAGE_GROUP


async def test_delays_in_milliseconds_and_in_seconds(env: Env) -> None:
    now_ms = env.node.timers.now_ms()
    at_ms = now_ms + 3_600_123
    in_ms = await env.send(msg(kind=pb.MessageType.DELAY, delivery_s=at_ms))
    in_s = await env.send(msg(kind=pb.MessageType.DELAY, delivery_s=at_ms // 1000))
    for answer, expected in ((in_ms, at_ms), (in_s, at_ms // 1000 * 1000)):
        [entry] = answer.entries
        assert entry.recall_handle == entry.message_id
        info = await env.node.delay.get(bytes.fromhex(entry.message_id))
        assert info is not None and info.deliver_at_ms == expected
    assert await env.received() == []


async def test_recall_cancels_and_answers_the_id(env: Env) -> None:
    at_ms = env.node.timers.now_ms() + 3_600_000
    [entry] = (await env.send(msg(kind=pb.MessageType.DELAY, delivery_s=at_ms))).entries
    request = spb.RecallMessageRequest(recall_handle=entry.recall_handle)
    request.topic.name = "orders"
    answer = await env.service.RecallMessage(request, Context())  # type: ignore[arg-type]
    assert (answer.status.code, answer.message_id) == (Code.OK, entry.message_id)
    info = await env.node.delay.get(bytes.fromhex(entry.message_id))
    assert info is not None and info.state is DelayState.CANCELLED
    request.recall_handle = "f" * 32
    answer = await env.service.RecallMessage(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.NOT_FOUND
    request.recall_handle = "garbage"
    answer = await env.service.RecallMessage(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.BAD_REQUEST


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (msg(topic="nope"), Code.TOPIC_NOT_FOUND),
        (msg(topic="SYS_x"), Code.ILLEGAL_TOPIC),
        (msg(props={"DELIVER_AT": "1"}), Code.BAD_REQUEST),
        (msg(tag="a|b"), Code.BAD_REQUEST),
        (msg(b"x" * (5 * 1024 * 1024)), Code.MESSAGE_BODY_TOO_LARGE),
    ],
)
async def test_bad_sends_answer_their_code(env: Env, bad: pb.Message, code: int) -> None:
    answer = await env.send(bad)
    assert answer.status.code == code
    assert answer.entries[0].status.code == code


# -- transactions --------------------------------------------------------------------------------


async def end(env: Env, tx_id: str, resolution: int, source: int, topic: str = "orders") -> Any:
    request = spb.EndTransactionRequest(
        transaction_id=tx_id,
        resolution=resolution,  # type: ignore[arg-type]
        source=source,  # type: ignore[arg-type]
    )
    request.topic.name = topic
    return await env.service.EndTransaction(request, Context())  # type: ignore[arg-type]


async def test_transaction_records_the_client_and_commits(env: Env) -> None:
    [entry] = (await env.send(msg(b"tx", kind=pb.MessageType.TRANSACTION))).entries
    row = await env.node.tx.get(entry.transaction_id)
    assert row.producer_group == PRODUCER_GROUP_PREFIX + CLIENT_ID
    assert row.msg_id.hex() == entry.message_id
    assert await env.received() == []
    client = pb.TransactionSource.SOURCE_CLIENT
    await env.node.broker.create_topic("other", 1)
    answer = await end(env, entry.transaction_id, pb.TransactionResolution.COMMIT, client, "other")
    assert answer.status.code == Code.INVALID_TRANSACTION_ID  # not a transaction of that topic
    answer = await end(env, entry.transaction_id, pb.TransactionResolution.COMMIT, client)
    assert answer.status.code == Code.OK
    assert [m.body for m in await env.received()] == [b"tx"]
    answer = await end(env, entry.transaction_id, pb.TransactionResolution.ROLLBACK, client)
    assert answer.status.code == Code.PRECONDITION_FAILED  # already committed
    answer = await end(env, "f" * 32, pb.TransactionResolution.COMMIT, client)
    assert answer.status.code == Code.INVALID_TRANSACTION_ID
    unspecified = pb.TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED
    assert (await end(env, entry.transaction_id, unspecified, client)).status.code == (
        Code.BAD_REQUEST
    )


async def test_a_transactional_message_may_also_be_delayed(env: Env) -> None:
    at_ms = env.node.timers.now_ms() + 3_600_000
    tx_msg = msg(b"tx later", kind=pb.MessageType.TRANSACTION, delivery_s=at_ms)
    [entry] = (await env.send(tx_msg)).entries
    client = pb.TransactionSource.SOURCE_CLIENT
    await end(env, entry.transaction_id, pb.TransactionResolution.COMMIT, client)
    info = await env.node.delay.get(bytes.fromhex(entry.message_id))
    assert info is not None and (info.state, info.deliver_at_ms) == (DelayState.SCHEDULED, at_ms)
    assert await env.received() == []


async def test_a_check_answer_of_unknown_counts_a_check(env: Env) -> None:
    [entry] = (await env.send(msg(b"tx", kind=pb.MessageType.TRANSACTION))).entries
    check = pb.TransactionSource.SOURCE_SERVER_CHECK
    unspecified = pb.TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED
    assert (await end(env, entry.transaction_id, unspecified, check)).status.code == Code.OK
    row = await env.node.tx.get(entry.transaction_id)
    assert (row.state, row.check_count) == (TxState.PREPARED, 1)
    await end(env, entry.transaction_id, pb.TransactionResolution.ROLLBACK, check)
    assert (await env.node.tx.get(entry.transaction_id)).state is TxState.ROLLED_BACK


# -- telemetry -----------------------------------------------------------------------------------


async def telemetry(
    env: Env, settings: pb.Settings, client_id: str = CLIENT_ID
) -> tuple[asyncio.Queue[spb.TelemetryCommand | None], AsyncIterator[spb.TelemetryCommand]]:
    incoming: asyncio.Queue[spb.TelemetryCommand | None] = asyncio.Queue()
    incoming.put_nowait(spb.TelemetryCommand(settings=settings))

    async def commands() -> AsyncIterator[spb.TelemetryCommand]:
        while (command := await incoming.get()) is not None:
            yield command

    stream = env.service.Telemetry(commands(), Context(client_id=client_id))  # type: ignore[arg-type]
    return incoming, stream


def producer_settings(*topics: str) -> pb.Settings:
    settings = pb.Settings(client_type=pb.ClientType.PRODUCER)
    for t in topics:
        settings.publishing.topics.add(name=t)
    return settings


async def test_producer_settings_answer_and_check_backs_go_down_the_stream(env: Env) -> None:
    incoming, stream = await telemetry(env, producer_settings("orders"))
    reply = await anext(stream)
    assert reply.status.code == Code.OK
    assert reply.settings.publishing.max_body_size == env.node.broker.config.max_body_bytes
    assert reply.settings.metric.on is False
    assert [t.name for t in reply.settings.publishing.topics] == ["orders"]
    # A half message sent by another client of the topic is checked on this stream.
    other = Context(client_id="gone@1@1@x")
    [entry] = (
        await env.send(msg(b"half", kind=pb.MessageType.TRANSACTION, keys=["k"]), ctx=other)
    ).entries
    env.node.tx.settings = TxSettings(check_immunity_ms=0, check_timeout_ms=5_000)
    await env.node.tx._check(entry.transaction_id)
    command = await anext(stream)
    recover = command.recover_orphaned_transaction_command
    assert recover.transaction_id == entry.transaction_id
    assert recover.message.system_properties.message_id == entry.message_id
    assert (recover.message.body, list(recover.message.system_properties.keys)) == (b"half", ["k"])
    incoming.put_nowait(None)  # the client closes: the stream ends and leaves the registry
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert env.service.clients.get(CLIENT_ID) is None


async def test_consumer_settings_carry_the_group_retry_policy(env: Env) -> None:
    await env.node.broker.create_group("billing", fifo=True, max_attempts=5)
    settings = pb.Settings(client_type=pb.ClientType.PUSH_CONSUMER)
    settings.subscription.group.name = "billing"
    settings.subscription.subscriptions.add().topic.name = "orders"
    _, stream = await telemetry(env, settings)
    reply = await anext(stream)
    assert reply.status.code == Code.OK
    s = reply.settings
    assert (s.subscription.fifo, s.backoff_policy.max_attempts) == (True, 5)
    steps_ms = [
        d.seconds * 1000 + d.nanos // 1_000_000 for d in s.backoff_policy.customized_backoff.next
    ]
    assert tuple(steps_ms) == env.node.broker.config.backoff_ms
    await stream.aclose()  # type: ignore[attr-defined]


# -- consuming -----------------------------------------------------------------------------------


async def test_receive_frames_status_time_and_messages(env: Env) -> None:
    await env.send(msg(b"one", tag="t", keys=["k"], props={"p": "1"}))
    frames = await env.receive()
    assert frames[0].status.code == Code.OK
    assert frames[1].HasField("delivery_timestamp")
    [m] = [f.message for f in frames[2:]]
    sp = m.system_properties
    assert (m.topic.name, m.body, sp.tag, list(sp.keys)) == ("orders", b"one", "t", ["k"])
    assert dict(m.user_properties) == {"p": "1"}
    assert sp.body_encoding == pb.Encoding.IDENTITY
    assert sp.body_digest.checksum == f"{zlib.crc32(b'one'):08X}"
    assert (sp.delivery_attempt, sp.invisible_duration.seconds) == (1, 30)
    assert sp.receipt_handle and sp.store_host == "10.1.2.3:8081"


async def test_empty_receive_is_message_not_found_within_the_deadline(env: Env) -> None:
    frames = await env.receive(wait_s=60, ctx=Context(remaining_s=0.3))
    assert [f.status.code for f in frames] == [Code.MESSAGE_NOT_FOUND]


async def test_sql_filters_are_illegal(env: Env) -> None:
    expression = pb.FilterExpression(type=pb.FilterType.SQL, expression="a > 1")
    frames = await env.receive(expression=expression)
    assert [f.status.code for f in frames] == [Code.ILLEGAL_FILTER_EXPRESSION]


async def test_ack_answers_per_entry(env: Env) -> None:
    await env.send(msg(b"a"))
    [m] = await env.received()
    request = spb.AckMessageRequest()
    request.group.name, request.topic.name = "g", "orders"
    request.entries.add(message_id="x", receipt_handle=m.system_properties.receipt_handle)
    request.entries.add(message_id="y", receipt_handle="stale")
    answer = await env.service.AckMessage(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.MULTIPLE_RESULTS
    assert [e.status.code for e in answer.entries] == [Code.OK, Code.INVALID_RECEIPT_HANDLE]


async def test_push_deliveries_are_held_until_acked_with_the_first_receipt(env: Env) -> None:
    await env.send(msg(b"a"), msg(b"b"))
    frames = await env.receive(push=True)
    first = [f.message.system_properties.receipt_handle for f in frames if f.HasField("message")]
    assert len(first) == 2 and len(env.service.renewer) == 2
    invisible = frames[2].message.system_properties.invisible_duration
    assert invisible.seconds * 1000 == env.service.renewer.slice_ms
    request = spb.AckMessageRequest()
    request.group.name, request.topic.name = "g", "orders"
    request.entries.add(receipt_handle=first[0])
    answer = await env.service.AckMessage(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.OK
    assert len(env.service.renewer) == 1
    # The client says goodbye: what it still holds is no longer renewed.
    await env.service.NotifyClientTermination(spb.NotifyClientTerminationRequest(), Context())  # type: ignore[arg-type]
    assert len(env.service.renewer) == 0


async def test_change_invisible_duration_swaps_the_receipt(env: Env) -> None:
    await env.send(msg(b"a"))
    [m] = await env.received()
    request = spb.ChangeInvisibleDurationRequest(receipt_handle=m.system_properties.receipt_handle)
    request.group.name, request.topic.name = "g", "orders"
    request.invisible_duration.seconds = 60
    answer = await env.service.ChangeInvisibleDuration(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.OK
    assert answer.receipt_handle != m.system_properties.receipt_handle
    again = await env.service.ChangeInvisibleDuration(request, Context())  # type: ignore[arg-type]
    assert again.status.code == Code.INVALID_RECEIPT_HANDLE


async def test_forward_to_dead_letter_queue_moves_and_acks(env: Env) -> None:
    await env.node.broker.create_group("f", fifo=True, max_attempts=3)
    [entry] = (await env.send(msg(b"poison", kind=pb.MessageType.FIFO, message_group="u"))).entries
    [m] = await env.received("f")
    request = spb.ForwardMessageToDeadLetterQueueRequest(
        receipt_handle=m.system_properties.receipt_handle,
        message_id=m.system_properties.message_id,
        delivery_attempt=1,
        max_delivery_attempts=3,
    )
    request.group.name, request.topic.name = "f", "orders"
    answer = await env.service.ForwardMessageToDeadLetterQueue(request, Context())  # type: ignore[arg-type]
    assert answer.status.code == Code.OK
    [dead] = await env.received("r", "%DLQ%f")
    assert (dead.body, dead.system_properties.message_id) == (b"poison", entry.message_id)
    stats = await env.node.broker.group_stats("orders", "f")
    assert stats["inflight"] == 0


# -- auth and unsupported ------------------------------------------------------------------------


class Refuse:
    def __init__(self, status: int) -> None:
        self.status = status
        self.calls: list[tuple[str, str, tuple[Resource, ...]]] = []

    async def check(
        self, metadata: Mapping[str, str], rpc: str, resources: Sequence[Resource]
    ) -> None:
        self.calls.append((metadata["x-mq-client-id"], rpc, tuple(resources)))
        raise TempoError(
            "no", code="unauthorized" if self.status == 401 else "forbidden", status=self.status
        )


@pytest.mark.parametrize(("status", "code"), [(401, Code.UNAUTHORIZED), (403, Code.FORBIDDEN)])
async def test_every_rpc_goes_through_the_auth_hook(env: Env, status: int, code: int) -> None:
    auth = Refuse(status)
    env.service.auth = auth
    answer = await env.send(msg())
    assert answer.status.code == code
    frames = await env.receive()
    assert [f.status.code for f in frames] == [code]
    assert auth.calls == [
        (CLIENT_ID, "SendMessage", (("topic", "orders"),)),
        (CLIENT_ID, "ReceiveMessage", (("topic", "orders"), ("group", "g"))),
    ]
    _, stream = await telemetry(env, producer_settings("orders"))
    reply = await anext(stream)
    assert reply.status.code == code
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_pull_offset_and_lite_rpcs_are_unsupported(env: Env) -> None:
    ctx: Any = Context()
    pulled = [f async for f in env.service.PullMessage(spb.PullMessageRequest(), ctx)]
    assert [f.status.code for f in pulled] == [Code.UNSUPPORTED]
    for call, request in (
        (env.service.UpdateOffset, spb.UpdateOffsetRequest()),
        (env.service.GetOffset, spb.GetOffsetRequest()),
        (env.service.QueryOffset, spb.QueryOffsetRequest()),
        (env.service.SyncLiteSubscription, spb.SyncLiteSubscriptionRequest()),
    ):
        assert (await call(request, ctx)).status.code == Code.UNSUPPORTED  # type: ignore[operator]


# -- pure translation ----------------------------------------------------------------------------


def test_timestamps_above_the_threshold_are_milliseconds() -> None:
    ts = pb.Message().system_properties.delivery_timestamp
    ts.seconds = 1_800_000_000
    assert convert.timestamp_ms(ts) == 1_800_000_000_000
    ts.seconds, ts.nanos = 1_800_000_000, 250_000_000
    assert convert.timestamp_ms(ts) == 1_800_000_000_250
    ts.seconds, ts.nanos = 1_800_000_000_123, 0
    assert convert.timestamp_ms(ts) == 1_800_000_000_123


def test_client_ids_map_to_stable_time_ordered_ids() -> None:
    # version 01, MAC, pid, 0x01000000 seconds after 2021-01-01, sequence
    client_id = "01" + "AABBCCDDEEFF" + "1234" + "01000000" + "00000007"
    mapped = convert.msg_id_for(client_id, born_ms=0)
    assert mapped == convert.msg_id_for(client_id, born_ms=999)  # the id alone decides
    assert int.from_bytes(mapped[:6], "big") == (convert.ROCKETMQ_ID_EPOCH_S + 0x01000000) * 1000
    assert convert.msg_id_for(client_id[:-1] + "8", 0) != mapped
    assert convert.msg_id_for("ab" * 16, 5) == bytes.fromhex("ab" * 16)  # already tempomq's
    other = convert.msg_id_for("some-other-format", born_ms=1_234)
    assert len(other) == 16 and int.from_bytes(other[:6], "big") == 1_234


def test_sharding_key_becomes_message_group_and_is_not_a_user_property() -> None:
    out = convert.to_pb("t", "id", b"b", "", (), {PROP_SHARDING_KEY: "u", "x": "y"}, 5)
    assert out.system_properties.message_group == "u"
    assert out.system_properties.message_type == pb.MessageType.FIFO
    assert dict(out.user_properties) == {"x": "y"}
