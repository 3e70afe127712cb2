"""The official RocketMQ 5 Python client (``rocketmq-python-client``) against a spawned server:
producers (normal, FIFO, delayed, transactional with check-back), the simple consumer (receive,
ack, change-invisible, redelivery), the push consumer (success, retry, dead letters), recall,
deduplication of a resent send, interop with HTTP both ways, the refused and unsupported
features, and a kill -9 of the server mid-traffic."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from rocketmq import (
    ClientConfiguration,
    ConsumeResult,
    Credentials,
    FilterExpression,
    Message,
    MessageListener,
    Producer,
    PushConsumer,
    SimpleConsumer,
    TransactionChecker,
    TransactionResolution,
)
from rocketmq.grpc_protocol import FilterType

from tests.e2e.server import Server, free_port

pytestmark = [
    pytest.mark.e2e,
    # The client's own logging calls (logger.warn) are not this project's to fix.
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]

T = TypeVar("T")
C = TypeVar("C", Producer, SimpleConsumer, PushConsumer)
#: Generous: a loaded two-core machine runs other test servers beside this one.
PATIENCE_S = 30.0
#: Check-backs come after 1 s; redeliveries after a nack or a timeout after 1 s.
SERVER_FLAGS = (
    "--tx-check-immunity",
    "1s",
    "--tx-check-interval",
    "1s",
    "--tx-check-timeout",
    "5s",
    "--backoff",
    "1s",
    "--default-invisible",
    "20s",
)


class Rmq:
    """One spawned server with both its HTTP and its RocketMQ endpoints."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.grpc_port = free_port()
        self.server = Server(
            data_dir, "--grpc", f"127.0.0.1:{self.grpc_port}", *SERVER_FLAGS, *extra
        )
        #: Bearer token for the HTTP calls, when the server has auth on.
        self.token: str | None = None

    def start(self) -> None:
        self.server.start()
        wait_until(self._grpc_listens, what="the gRPC port to listen")

    def _grpc_listens(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.grpc_port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def config(self, namespace: str = "") -> ClientConfiguration:
        return ClientConfiguration(
            f"127.0.0.1:{self.grpc_port}", Credentials(), namespace=namespace, request_timeout=5
        )

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        request = urllib.request.Request(
            self.server.url + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def topic(self, queues: int = 4) -> str:
        name = "t" + uuid.uuid4().hex[:12]
        status, body = self.http("POST", "/v1/topics", {"name": name, "queues": queues})
        assert status == 201, body
        return name

    def http_drain(self, topic: str, group: str, n: int) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []

        def more() -> bool:
            status, body = self.http(
                "POST",
                f"/v1/topics/{topic}/groups/{group}/receive",
                {"max_messages": 100, "wait_ms": 500},
            )
            if status == 404 and body["error"] == "topic_not_found":
                return False  # a dead-letter topic appears with its first message
            assert status == 200, body
            got.extend(body["messages"])
            if body["messages"]:
                self.http(
                    "POST",
                    f"/v1/topics/{topic}/groups/{group}/ack",
                    {"receipts": [m["receipt"] for m in body["messages"]]},
                )
            return len(got) >= n

        wait_until(more, what=f"{n} messages over HTTP")
        return got


def wait_until(check: Callable[[], T], *, what: str, timeout_s: float = PATIENCE_S) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def rmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rmq]:
    r = Rmq(tmp_path_factory.mktemp("rocketmq") / "data")
    r.start()
    yield r
    r.server.ensure_stopped()


_started: list[Any] = []


def start(client: C) -> C:
    """Start a client; it is shut down when the test ends, whatever happens."""
    client.startup()
    _started.append(client)
    return client


@pytest.fixture(autouse=True)
def _shutdown_clients() -> Iterator[None]:
    yield
    while _started:
        _started.pop().shutdown()


def producer(rmq: Rmq, *topics: str, checker: TransactionChecker | None = None) -> Producer:
    return start(Producer(rmq.config(), topics, checker))


def simple_consumer(rmq: Rmq, group: str, topic: str, expression: str = "*") -> SimpleConsumer:
    subscription = {topic: FilterExpression(expression)}
    return start(SimpleConsumer(rmq.config(), group, subscription, await_duration=2))


def message(topic: str, body: bytes, **kw: Any) -> Message:
    m = Message()
    m.topic = topic
    m.body = body
    for name, value in kw.items():
        if name == "properties":
            for k, v in value.items():
                m.add_property(k, v)
        else:
            setattr(m, name, value)
    return m


def receive_all(c: SimpleConsumer, n: int, invisible_s: int = 20) -> list[Message]:
    got: list[Message] = []

    def more() -> bool:
        got.extend(c.receive(32, invisible_s))
        return len(got) >= n

    wait_until(more, what=f"{n} messages over RocketMQ")
    return got


# -- producer and simple consumer ----------------------------------------------------------------


def test_send_receive_ack_and_the_same_message_over_http(rmq: Rmq) -> None:
    topic = rmq.topic()
    p = producer(rmq, topic)
    c = simple_consumer(rmq, "g-basic", topic)
    sent = message(topic, b"order 17", tag="created", keys="order-17", properties={"k": "v"})
    receipt = p.send(sent)
    [got] = receive_all(c, 1)
    assert got.message_id == receipt.message_id
    assert (got.body, got.tag, got.keys, got.properties) == (
        b"order 17",
        "created",
        {"order-17"},
        {"k": "v"},
    )
    assert got.delivery_attempt == 1
    c.ack(got)
    assert c.receive(32, 20) == []  # acked: gone for this group
    # The same message over HTTP, by id and through another group.
    status, body = rmq.http("GET", f"/v1/messages/{receipt.message_id}")
    assert status == 200, body
    assert (body["body"], body["tags"], body["keys"]) == ("order 17", "created", ["order-17"])
    assert body["properties"] == {"k": "v"}
    [over_http] = rmq.http_drain(topic, "g-http", 1)
    assert over_http["msg_id"] == receipt.message_id


def test_http_sends_reach_rocketmq_consumers(rmq: Rmq) -> None:
    topic = rmq.topic()
    status, body = rmq.http(
        "POST",
        f"/v1/topics/{topic}/messages",
        {"body": "from http", "tags": "t1", "keys": ["a", "b"], "properties": {"p": "1"}},
    )
    assert status == 201, body
    c = simple_consumer(rmq, "g-interop", topic)
    [got] = receive_all(c, 1)
    assert got.message_id == body["msg_id"]
    assert (got.body, got.tag, got.keys, got.properties) == (
        b"from http",
        "t1",
        {"a", "b"},
        {"p": "1"},
    )
    c.ack(got)


def test_tag_filter(rmq: Rmq) -> None:
    topic = rmq.topic()
    p = producer(rmq, topic)
    c = simple_consumer(rmq, "g-tags", topic, "wanted || also")
    for tag in ("wanted", "other", "also"):
        p.send(message(topic, tag.encode(), tag=tag))
    got = receive_all(c, 2)
    assert sorted(m.body for m in got) == [b"also", b"wanted"]
    for m in got:
        c.ack(m)


def test_fifo_keeps_order_per_message_group(rmq: Rmq) -> None:
    topic = rmq.topic(queues=4)
    status, body = rmq.http("POST", "/v1/groups", {"name": "g-fifo", "fifo": True})
    assert status == 201, body
    p = producer(rmq, topic)
    c = simple_consumer(rmq, "g-fifo", topic)
    groups = ("user-1", "user-2", "user-3", "user-4", "user-5")
    for i in range(10):
        for g in groups:
            p.send(message(topic, f"{g}:{i}".encode(), message_group=g))
    seen: dict[str, list[int]] = {g: [] for g in groups}

    def more() -> bool:
        for m in c.receive(32, 20):
            assert m.message_group is not None
            g, i = m.body.decode().split(":")
            assert g == m.message_group
            seen[g].append(int(i))
            c.ack(m)
        return sum(map(len, seen.values())) >= 50

    wait_until(more, what="every FIFO message")
    assert all(seen[g] == list(range(10)) for g in groups), seen
    queues = {
        q["queue_id"]
        for q in rmq.http("GET", f"/v1/topics/{topic}")[1]["queue_offsets"]
        if q["max_offset"] > 0
    }
    assert len(queues) > 1  # the groups really spread over several queues


def test_change_invisible_then_ack_and_redelivery_after_invisibility(rmq: Rmq) -> None:
    topic = rmq.topic()
    p = producer(rmq, topic)
    c = simple_consumer(rmq, "g-invisible", topic)
    p.send(message(topic, b"slow"))
    p.send(message(topic, b"dropped"))
    got = {m.body: m for m in receive_all(c, 2, invisible_s=1)}
    slow = got[b"slow"]
    old_receipt = slow.receipt_handle
    c.change_invisible_duration(slow, 30)
    assert slow.receipt_handle != old_receipt  # the client adopted the new receipt
    # "dropped" comes again after its 1 s (+ 1 s backoff), attempt 2; "slow" does not.
    [again] = receive_all(c, 1, invisible_s=20)
    assert (again.body, again.delivery_attempt) == (b"dropped", 2)
    c.ack(again)
    c.ack(slow)  # with the new receipt, well after the first 1 s ran out
    assert c.receive(32, 20) == []


# -- delays and recall ---------------------------------------------------------------------------


def test_delay_in_milliseconds_is_released_on_time_never_early(rmq: Rmq) -> None:
    topic = rmq.topic()
    p = producer(rmq, topic)
    c = simple_consumer(rmq, "g-delay", topic)
    at_ms = int(time.time() * 1000) + 1500 + 7  # not a whole second
    receipt = p.send(message(topic, b"later", delivery_timestamp=at_ms))
    assert receipt.recall_handle
    [got] = receive_all(c, 1)
    assert time.time() * 1000 >= at_ms
    deliver_at = int(got.properties["DELIVER_AT"])
    released_at = int(got.properties["RELEASED_AT"])
    assert deliver_at == at_ms
    assert got.delivery_timestamp == at_ms
    assert 0 <= released_at - deliver_at <= 100  # tens of ms on a busy machine
    c.ack(got)


def test_delay_in_seconds_as_the_client_example_passes_it(rmq: Rmq) -> None:
    topic = rmq.topic()
    p = producer(rmq, topic)
    c = simple_consumer(rmq, "g-delay-s", topic)
    at_s = int(time.time()) + 2
    receipt = p.send(message(topic, b"seconds", delivery_timestamp=at_s))
    status, body = rmq.http("GET", f"/v1/delayed/{receipt.message_id}")
    assert status == 200 and body["deliver_at"] == at_s * 1000, body
    [got] = receive_all(c, 1)
    assert int(got.properties["DELIVER_AT"]) == at_s * 1000
    c.ack(got)


def test_recall_cancels_a_delayed_message(rmq: Rmq) -> None:
    topic = rmq.topic()
    p = producer(rmq, topic)
    at_ms = int(time.time() * 1000) + 3_600_000
    receipt = p.send(message(topic, b"never", delivery_timestamp=at_ms))
    assert p.recall_message(topic, receipt.recall_handle) == receipt.message_id
    status, body = rmq.http("GET", f"/v1/delayed/{receipt.message_id}")
    assert (status, body["state"]) == (200, "cancelled")


# -- transactions --------------------------------------------------------------------------------


class Checker(TransactionChecker):
    def __init__(self, answers: dict[bytes, TransactionResolution]) -> None:
        self.answers = answers
        self.asked: list[bytes] = []

    def check(self, message: Message) -> TransactionResolution:
        self.asked.append(message.body)
        return self.answers[message.body]


def test_transaction_commit_and_rollback(rmq: Rmq) -> None:
    topic = rmq.topic()
    p = producer(rmq, topic, checker=Checker({}))
    tx = p.begin_transaction()
    kept = p.send(message(topic, b"kept"), tx)
    assert rmq.http("GET", f"/v1/messages/{kept.message_id}")[0] == 404  # half: invisible
    tx.commit()
    tx = p.begin_transaction()
    dropped = p.send(message(topic, b"dropped"), tx)
    tx.rollback()
    [got] = rmq.http_drain(topic, "g-tx", 1)
    assert got["msg_id"] == kept.message_id
    assert rmq.http("GET", f"/v1/messages/{dropped.message_id}")[0] == 404


def test_check_back_over_telemetry_commits_and_rolls_back(rmq: Rmq) -> None:
    topic = rmq.topic()
    checker = Checker(
        {
            b"commit me": TransactionResolution.COMMIT,
            b"roll me back": TransactionResolution.ROLLBACK,
        }
    )
    p = producer(rmq, topic, checker=checker)
    for body in (b"commit me", b"roll me back"):
        p.send(message(topic, body, keys="k-" + body.decode()[:4]), p.begin_transaction())
    wait_until(lambda: len(checker.asked) >= 2, what="two check-backs")
    [got] = rmq.http_drain(topic, "g-check", 1)
    assert got["body"] == "commit me"
    status, body = rmq.http("GET", "/v1/transactions?state=rolled_back")
    assert status == 200, body
    assert topic in {t["topic"] for t in body["transactions"]}


# -- push consumer -------------------------------------------------------------------------------


class Listener(MessageListener):
    def __init__(self, result: ConsumeResult) -> None:
        self.result = result
        self.seen: list[tuple[bytes, int]] = []
        self.lock = threading.Lock()

    def consume(self, message: Message) -> ConsumeResult:
        with self.lock:
            self.seen.append((message.body, message.delivery_attempt))
        return self.result


def test_push_consumer_success(rmq: Rmq) -> None:
    topic = rmq.topic()
    p = producer(rmq, topic)
    listener = Listener(ConsumeResult.SUCCESS)
    start(PushConsumer(rmq.config(), "g-push", listener, {topic: FilterExpression()}))
    for i in range(5):
        p.send(message(topic, f"push {i}".encode()))
    wait_until(lambda: len(listener.seen) >= 5, what="five pushed messages")
    assert sorted(b for b, _ in listener.seen) == [f"push {i}".encode() for i in range(5)]
    stats = wait_until(
        lambda: (s := rmq.http("GET", f"/v1/topics/{topic}/groups/g-push")[1])["lag"] == 0 and s,
        what="the acks",
    )
    assert stats["inflight"] == 0


def test_push_consumer_failure_retries_then_dead_letters(rmq: Rmq) -> None:
    topic = rmq.topic()
    status, body = rmq.http("POST", "/v1/groups", {"name": "g-push-dlq", "max_attempts": 2})
    assert status == 201, body
    p = producer(rmq, topic)
    listener = Listener(ConsumeResult.FAILURE)
    start(PushConsumer(rmq.config(), "g-push-dlq", listener, {topic: FilterExpression()}))
    receipt = p.send(message(topic, b"poison"))
    [dead] = rmq.http_drain("%DLQ%g-push-dlq", "g-dlq-reader", 1)
    assert dead["msg_id"] == receipt.message_id
    assert dead["body"] == "poison"
    assert listener.seen[:2] == [(b"poison", 1), (b"poison", 2)]


# -- dedup, refusals, unsupported ----------------------------------------------------------------


def test_a_resent_send_is_stored_once_and_answers_the_first_result(rmq: Rmq) -> None:
    import grpc
    from rocketmq.grpc_protocol import definition_pb2, service_pb2, service_pb2_grpc

    topic = rmq.topic()
    request = service_pb2.SendMessageRequest()
    m = request.messages.add()
    m.topic.name = topic
    m.body = b"once"
    m.system_properties.message_id = "01" + uuid.uuid4().hex.upper()
    m.system_properties.message_type = definition_pb2.MessageType.NORMAL
    m.system_properties.body_encoding = definition_pb2.Encoding.IDENTITY
    m.system_properties.born_timestamp.GetCurrentTime()
    with grpc.insecure_channel(f"127.0.0.1:{rmq.grpc_port}") as channel:
        stub = service_pb2_grpc.MessagingServiceStub(channel)
        first = stub.SendMessage(request, timeout=10)
        second = stub.SendMessage(request, timeout=10)
    assert first.status.code == second.status.code == definition_pb2.Code.OK
    assert first.entries[0].message_id == second.entries[0].message_id
    assert first.entries[0].offset == second.entries[0].offset
    got = rmq.http_drain(topic, "g-dedup", 1)
    time.sleep(0.5)
    got += rmq.http("POST", f"/v1/topics/{topic}/groups/g-dedup/receive", {"wait_ms": 500})[1][
        "messages"
    ]
    assert [m["body"] for m in got] == ["once"]


def test_a_namespace_is_refused_with_a_clear_error(rmq: Rmq) -> None:
    import grpc
    from rocketmq.grpc_protocol import definition_pb2, service_pb2, service_pb2_grpc

    topic = rmq.topic()
    request = service_pb2.QueryRouteRequest()
    request.topic.name = topic
    request.topic.resource_namespace = "ns1"
    with grpc.insecure_channel(f"127.0.0.1:{rmq.grpc_port}") as channel:
        answer = service_pb2_grpc.MessagingServiceStub(channel).QueryRoute(request, timeout=10)
    assert answer.status.code == definition_pb2.Code.BAD_REQUEST
    assert "tempomq has no namespaces" in answer.status.message
    p = start(Producer(rmq.config(namespace="ns1"), (topic,)))
    with pytest.raises(Exception, match="route"):  # the client reports the failed route
        p.send(message(topic, b"x"))


def test_sql_filters_are_refused(rmq: Rmq) -> None:
    topic = rmq.topic()
    c = start(
        SimpleConsumer(
            rmq.config(),
            "g-sql",
            {topic: FilterExpression("a > 1", FilterType.SQL)},
            await_duration=1,
        )
    )
    with pytest.raises(Exception, match="SQL92"):
        c.receive(1, 10)


def test_unknown_topic_fails_the_send(rmq: Rmq) -> None:
    topic = "nope-" + uuid.uuid4().hex[:8]
    p = producer(rmq, topic)
    with pytest.raises(Exception, match="route"):
        p.send(message(topic, b"x"))


def test_the_python_example_of_the_docs_runs(rmq: Rmq, tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    doc = Path(__file__).resolve().parents[2] / "docs" / "rocketmq.md"
    [block] = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert '"127.0.0.1:8081"' in block
    if "orders" not in {t["name"] for t in rmq.http("GET", "/v1/topics")[1]["topics"]}:
        assert rmq.http("POST", "/v1/topics", {"name": "orders", "queues": 2})[0] == 201
    script = tmp_path / "example.py"
    script.write_text(block.replace('"127.0.0.1:8081"', f'"127.0.0.1:{rmq.grpc_port}"'))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "b'order 17 created' created {'order-17'} {'region': 'eu'} 1" in done.stdout


# -- a crash mid-traffic -------------------------------------------------------------------------


@pytest.fixture
def own_rmq(tmp_path: Path) -> Iterator[Rmq]:
    """A server of the test's own, to crash."""
    r = Rmq(tmp_path / "data")
    r.start()
    yield r
    r.server.ensure_stopped()


def test_kill_9_mid_traffic_loses_and_duplicates_nothing_acknowledged(own_rmq: Rmq) -> None:
    rmq = own_rmq
    topic = rmq.topic()
    p = producer(rmq, topic)
    acked: list[str] = []
    stop = threading.Event()

    def send_forever() -> None:
        i = 0
        while not stop.is_set():
            try:
                # The client retries a failed attempt at once with the same message id.
                acked.append(p.send(message(topic, f"m{i}".encode())).message_id)
            except Exception:  # the server is down: this one is not acknowledged
                time.sleep(0.05)
            i += 1

    sender = threading.Thread(target=send_forever, daemon=True)
    sender.start()
    try:
        wait_until(lambda: len(acked) >= 30, what="sends before the crash")
        rmq.server.kill()
        crashed_at = len(acked)
        rmq.start()  # same ports, same data directory
        wait_until(lambda: len(acked) >= crashed_at + 30, what="sends after the restart")
    finally:
        stop.set()
        sender.join(30)
    got = rmq.http_drain(topic, "g-crash", len(acked))
    ids = [m["msg_id"] for m in got]
    assert len(ids) == len(set(ids)), "a message was stored twice"
    assert set(acked) <= set(ids), "an acknowledged send was lost"


# -- access keys ---------------------------------------------------------------------------------


def test_access_keys_sign_the_official_clients_calls(tmp_path: Path) -> None:
    import yaml  # type: ignore[import-untyped]

    from tempomq.auth import hash_token

    admin = "tmq_admin-token-for-rocketmq-tests-0123"
    auth_file = tmp_path / "auth.yaml"
    principals = {
        "ops": {"admin": True, "tokens_sha256": [hash_token(admin)]},
        "shop": {
            "access_key": "shop-ak",
            "secret_key": "shop-secret-key",
            "allow": {"topic:orders*": ["produce", "consume"], "group:billing": ["consume"]},
        },
    }
    auth_file.write_text(yaml.safe_dump({"principals": principals}))
    auth_file.chmod(0o600)
    rmq = Rmq(tmp_path / "data", "--auth-file", str(auth_file))
    rmq.token = admin
    rmq.start()
    try:
        topic = "orders-" + uuid.uuid4().hex[:8]
        status, body = rmq.http("POST", "/v1/topics", {"name": topic, "queues": 2})
        assert status == 201, body

        def config(ak: str, sk: str) -> ClientConfiguration:
            endpoint = f"127.0.0.1:{rmq.grpc_port}"
            return ClientConfiguration(endpoint, Credentials(ak, sk), request_timeout=5)

        p = start(Producer(config("shop-ak", "shop-secret-key"), (topic,)))
        receipt = p.send(message(topic, b"signed"))

        def consumer(group: str) -> SimpleConsumer:
            subscription = {topic: FilterExpression()}
            shop = config("shop-ak", "shop-secret-key")
            return start(SimpleConsumer(shop, group, subscription, await_duration=1))

        c = consumer("billing")
        [got] = receive_all(c, 1)
        assert got.message_id == receipt.message_id
        c.ack(got)
        # A wrong secret gets no route, so no send; another group is not this principal's.
        intruder = start(Producer(config("shop-ak", "not-the-secret-key"), (topic,)))
        with pytest.raises(Exception, match="route"):
            intruder.send(message(topic, b"x"))
        other_group = consumer("payments")
        with pytest.raises(Exception, match="lacks consume on group:payments"):
            other_group.receive(1, 10)
    finally:
        rmq.server.ensure_stopped()
