"""The tempomq HTTP client: topics, sends, queries, delayed messages, consuming, transactions.

Which calls are repeated after a failure that may have reached the server (see ``transport``):

=====================================  ========  ==============================================
call                                   repeated  why
=====================================  ========  ==============================================
GETs (message, key, delayed, stats)    yes       reading twice changes nothing
``send`` / ``send_batch``              yes       the client picks ``msg_id``; a resent id is
                                                 stored once and answers the first result
``cancel_delayed``                     yes       cancelling again answers the same
``reschedule_delayed``                 yes       same time again (``delay_ms`` counts from the
                                                 repeat, so it can land later by the retry time)
``reset_group``                        yes       resetting to the same timestamp again is the same
commit / rollback of a transaction     yes       the coordinator answers a repeat the same
``create_topic`` / ``create_group``    no        a repeat answers 409 exists after a success
``receive``                            no        a lost answer hid messages for ``invisible_ms``;
                                                 repeating would hide more, not recover those
``ack``                                no        a repeat of a successful ack answers 409
                                                 ``receipt_expired`` for every receipt
``nack``                               no        same; and the message is redelivered anyway
``change_invisible``                   no        the first call replaced the receipt; a repeat
                                                 answers 409 ``receipt_expired``
prepare (``POST /v1/transactions``)    no        a repeat would prepare a second half message
=====================================  ========  ==============================================

Calls that are not repeated still move to the next endpoint when the connection never opened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
from collections import defaultdict
from collections.abc import Awaitable, Mapping, Sequence
from types import TracebackType
from typing import Any, overload
from urllib.parse import quote

import aiohttp

from tempomq.client.errors import TempoClientError
from tempomq.client.ids import new_msg_id
from tempomq.client.models import (
    CheckAnswer,
    CheckRequest,
    DelayedState,
    GroupStats,
    Message,
    OutgoingMessage,
    ReceivedMessage,
    SendResult,
    Topic,
    Transaction,
    TransactionStatus,
    check_message,
    message_json,
)
from tempomq.client.transport import Transport

#: Where the client finds its token and CA file when the caller gives none; the token may
#: also be in the file ``TEMPOMQ_TOKEN_FILE`` names (a Docker or Kubernetes secret).
TOKEN_ENV = "TEMPOMQ_TOKEN"
TOKEN_FILE_ENV = "TEMPOMQ_TOKEN_FILE"
CA_FILE_ENV = "TEMPOMQ_CA_FILE"
CLIENT_ENV_VARS = frozenset({TOKEN_ENV, TOKEN_FILE_ENV, CA_FILE_ENV})


def token_from_env(environ: Mapping[str, str]) -> str | None:
    """``TEMPOMQ_TOKEN``, else the content of the file ``TEMPOMQ_TOKEN_FILE`` names, else None."""
    token = environ.get(TOKEN_ENV)
    if token:
        return token
    path = environ.get(TOKEN_FILE_ENV)
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


MAX_BATCH = 1000  # messages per send request, and receipts per ack request (API.md)


def _seg(value: str) -> str:
    """One path segment; topic names may hold ``%`` and ``|`` (``%DLQ%group``)."""
    return quote(value, safe="")


class Client:
    """Talks to one tempomq service over HTTP; use ``async with Client(...) as client``.

    ``endpoints`` is one URL or several (a list, or comma-separated); calls go to the one that
    last answered. ``timeout_s`` bounds each request (long polls get their wait on top);
    ``retries`` is how many more attempts a call may make (see the module docstring for which).
    Pass ``session`` to share your own :class:`aiohttp.ClientSession`; it is then yours to close.

    ``token`` is sent as ``Authorization: Bearer <token>`` (default: the ``TEMPOMQ_TOKEN``
    environment variable); ``ca_file`` is the CA bundle (PEM) that verifies an ``https://``
    server (default: ``TEMPOMQ_CA_FILE``, else the system's CAs).

    ``linger_ms``, ``batch_max`` and ``batch_max_bytes`` shape the batches that concurrent
    ``send`` calls to one topic are coalesced into (see :class:`_SendBatcher`): 0 ms (the end
    of the event loop's current turn), 100 messages, 1 MiB by default.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        session: aiohttp.ClientSession | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        linger_ms: float = 0.0,
        batch_max: int = 100,
        batch_max_bytes: int = 1024 * 1024,
    ) -> None:
        if linger_ms < 0 or batch_max < 1 or batch_max_bytes < 1:
            raise ValueError("linger_ms must be >= 0, batch_max and batch_max_bytes >= 1")
        self._batchers: dict[str, _SendBatcher] = {}
        self._linger_s = linger_ms / 1000
        self._batch_max = min(batch_max, MAX_BATCH)
        self._batch_max_bytes = batch_max_bytes
        token = token if token is not None else token_from_env(os.environ)
        ca_file = ca_file if ca_file is not None else os.environ.get(CA_FILE_ENV) or None
        if ssl_context is None and ca_file is not None:
            ssl_context = ssl.create_default_context(cafile=os.fspath(ca_file))
        self._http = Transport(
            endpoints,
            timeout_s=timeout_s,
            retries=retries,
            session=session,
            token=token,
            ssl_context=ssl_context,
        )

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._http.endpoints

    @property
    def current_endpoint(self) -> str:
        return self._http.current

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def _call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        return (await self._http.call(method, path, body, **kw))[1]

    # -- topics and groups ------------------------------------------------------------------

    async def create_topic(self, name: str, queues: int = 8) -> Topic:
        body = {"name": name, "queues": queues}
        return Topic.from_json(await self._call("POST", "/v1/topics", body, idempotent=False))

    async def get_topic(self, name: str) -> Topic:
        return Topic.from_json(await self._call("GET", f"/v1/topics/{_seg(name)}", idempotent=True))

    async def create_group(self, name: str, *, fifo: bool = False, max_attempts: int = 16) -> None:
        body = {"name": name, "fifo": fifo, "max_attempts": max_attempts}
        await self._call("POST", "/v1/groups", body, idempotent=False)

    # -- sending ----------------------------------------------------------------------------

    async def send(
        self,
        topic: str,
        body: str | bytes,
        *,
        tags: str | None = None,
        keys: Sequence[str] = (),
        properties: dict[str, str] | None = None,
        sharding_key: str | None = None,
        delay_ms: int | None = None,
        deliver_at: int | None = None,
        msg_id: str | None = None,
    ) -> SendResult:
        """Send one message; returns its id and queue (and ``deliver_at`` when delayed)."""
        check_message(body, keys, delay_ms, deliver_at)
        item = message_json(
            msg_id or new_msg_id(),
            body,
            tags,
            keys,
            properties,
            sharding_key,
            delay_ms,
            deliver_at,
        )
        return await self._batcher(topic).send(item)

    async def send_message(self, topic: str, message: OutgoingMessage) -> SendResult:
        """Send one message. Sends made while others to the same topic wait for the event
        loop's next turn (``asyncio.gather`` of many ``send``, several tasks) go out together
        as one batch request; see :class:`_SendBatcher`."""
        return await self._batcher(topic).send(message.to_json(new_msg_id()))

    def _batcher(self, topic: str) -> _SendBatcher:
        batcher = self._batchers.get(topic)
        if batcher is None:
            batcher = self._batchers[topic] = _SendBatcher(self, topic)
        return batcher

    async def _send_one(self, path: str, item: dict[str, Any]) -> SendResult:
        _, answer = await self._http.call("POST", path, item, idempotent=True)
        return SendResult.from_json(answer)

    async def send_batch(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Send many; results in order. More than 1000 go as several requests, one after the
        other: if one fails, the ones before it are stored (their results are lost with the
        exception, so give messages a ``msg_id`` to resend the whole list safely)."""
        path = f"/v1/topics/{_seg(topic)}/messages"
        results: list[SendResult] = []
        for start in range(0, len(messages), MAX_BATCH):
            chunk = [m.to_json(new_msg_id()) for m in messages[start : start + MAX_BATCH]]
            answer = await self._call("POST", path, {"messages": chunk}, idempotent=True)
            results.extend(SendResult.from_json(r) for r in answer["results"])
        return results

    # -- reading ----------------------------------------------------------------------------

    async def get_message(self, msg_id: str) -> Message:
        return Message.from_json(
            await self._call("GET", f"/v1/messages/{_seg(msg_id)}", idempotent=True)
        )

    async def query_by_key(self, topic: str, key: str) -> list[Message]:
        path = f"/v1/topics/{_seg(topic)}/messages"
        answer = await self._call("GET", path, params={"key": key}, idempotent=True)
        return [Message.from_json(m) for m in answer["messages"]]

    # -- delayed messages -------------------------------------------------------------------

    async def get_delayed(self, msg_id: str) -> DelayedState:
        path = f"/v1/delayed/{_seg(msg_id)}"
        return DelayedState.from_json(await self._call("GET", path, idempotent=True))

    async def cancel_delayed(self, msg_id: str) -> DelayedState:
        """Cancel; raises ``AlreadyDelivered`` when it was released first."""
        path = f"/v1/delayed/{_seg(msg_id)}"
        return DelayedState.from_json(await self._call("DELETE", path, idempotent=True))

    async def reschedule_delayed(
        self, msg_id: str, *, deliver_at: int | None = None, delay_ms: int | None = None
    ) -> DelayedState:
        if (deliver_at is None) == (delay_ms is None):
            raise ValueError("give exactly one of deliver_at and delay_ms")
        body = {"deliver_at": deliver_at} if deliver_at is not None else {"delay_ms": delay_ms}
        path = f"/v1/delayed/{_seg(msg_id)}"
        return DelayedState.from_json(await self._call("PATCH", path, body, idempotent=True))

    # -- consuming --------------------------------------------------------------------------

    def _group_path(self, topic: str, group: str, action: str = "") -> str:
        return f"/v1/topics/{_seg(topic)}/groups/{_seg(group)}" + (f"/{action}" if action else "")

    async def receive(
        self,
        topic: str,
        group: str,
        *,
        max_messages: int = 32,
        wait_ms: int = 20000,
        invisible_ms: int = 30000,
        tags: str | None = None,
    ) -> list[ReceivedMessage]:
        """Long-poll for up to ``max_messages``; an empty list when none came in ``wait_ms``."""
        body: dict[str, Any] = {
            "max_messages": max_messages,
            "wait_ms": wait_ms,
            "invisible_ms": invisible_ms,
        }
        if tags is not None:
            body["tags"] = tags
        endpoint, answer = await self._http.call(
            "POST",
            self._group_path(topic, group, "receive"),
            body,
            idempotent=False,
            extra_timeout_s=wait_ms / 1000,
        )
        return [ReceivedMessage.from_delivery(m, endpoint) for m in answer["messages"]]

    async def ack(self, topic: str, group: str, receipts: Sequence[ReceivedMessage | str]) -> int:
        """Acknowledge; returns how many were. Pass the messages themselves so each ack goes to
        the server that issued it (plain receipt strings go to the current endpoint). The
        server acks all of a request or none: one expired receipt fails the whole request
        with ``ReceiptExpired``."""
        by_endpoint: dict[str | None, list[str]] = defaultdict(list)
        for r in receipts:
            if isinstance(r, ReceivedMessage):
                by_endpoint[r.endpoint].append(r.receipt)
            else:
                by_endpoint[None].append(r)
        path = self._group_path(topic, group, "ack")
        acked = 0
        for endpoint, items in by_endpoint.items():
            for start in range(0, len(items), MAX_BATCH):
                body = {"receipts": items[start : start + MAX_BATCH]}
                _, answer = await self._http.call(
                    "POST", path, body, idempotent=False, endpoint=endpoint
                )
                acked += int(answer["acked"])
        return acked

    async def nack(
        self,
        topic: str,
        group: str,
        receipt: ReceivedMessage | str,
        retry_after_ms: int | None = None,
    ) -> None:
        """Give a delivery back: redelivered after ``retry_after_ms`` or the group's backoff."""
        endpoint = receipt.endpoint if isinstance(receipt, ReceivedMessage) else None
        token = receipt.receipt if isinstance(receipt, ReceivedMessage) else receipt
        body: dict[str, Any] = {"receipt": token}
        if retry_after_ms is not None:
            body["retry_after_ms"] = retry_after_ms
        path = self._group_path(topic, group, "nack")
        await self._http.call("POST", path, body, idempotent=False, endpoint=endpoint)

    @overload
    async def change_invisible(
        self, topic: str, group: str, receipt: ReceivedMessage, invisible_ms: int
    ) -> ReceivedMessage: ...

    @overload
    async def change_invisible(
        self, topic: str, group: str, receipt: str, invisible_ms: int
    ) -> str: ...

    async def change_invisible(
        self, topic: str, group: str, receipt: ReceivedMessage | str, invisible_ms: int
    ) -> ReceivedMessage | str:
        """Keep a delivery out until ``invisible_ms`` from now under a new receipt; the old one
        stops working. Returns the message with its new receipt (or the new receipt string)."""
        endpoint = receipt.endpoint if isinstance(receipt, ReceivedMessage) else None
        token = receipt.receipt if isinstance(receipt, ReceivedMessage) else receipt
        path = self._group_path(topic, group, "change-invisible")
        body = {"receipt": token, "invisible_ms": invisible_ms}
        _, answer = await self._http.call("POST", path, body, idempotent=False, endpoint=endpoint)
        new = str(answer["receipt"])
        if isinstance(receipt, ReceivedMessage):
            return dataclasses.replace(receipt, receipt=new)
        return new

    async def group_stats(self, topic: str, group: str) -> GroupStats:
        path = self._group_path(topic, group)
        return GroupStats.from_json(await self._call("GET", path, idempotent=True))

    async def reset_group(self, topic: str, group: str, timestamp_ms: int) -> dict[int, int]:
        """Replay from ``timestamp_ms``; returns the new offset of each queue."""
        path = self._group_path(topic, group, "reset")
        answer = await self._call("POST", path, {"timestamp": timestamp_ms}, idempotent=True)
        return {int(q["queue_id"]): int(q["offset"]) for q in answer["queues"]}

    # -- transactions (TransactionalProducer builds on these) -------------------------------

    async def prepare_transaction(
        self,
        topic: str,
        message: OutgoingMessage,
        *,
        producer_group: str,
        check_url: str | None = None,
        check_immunity_ms: int | None = None,
    ) -> Transaction:
        """Store a half message, invisible until :meth:`commit_transaction`."""
        body: dict[str, Any] = {
            "topic": topic,
            "message": message.to_json(new_msg_id()),
            "producer_group": producer_group,
        }
        if check_url is not None:
            body["check_url"] = check_url
        if check_immunity_ms is not None:
            body["check_immunity_ms"] = check_immunity_ms
        endpoint, answer = await self._http.call("POST", "/v1/transactions", body, idempotent=False)
        return Transaction(str(answer["tx_id"]), str(answer["msg_id"]), topic, endpoint)

    async def _end(self, tx: Transaction | str, action: str) -> str:
        tx_id, endpoint = (tx.tx_id, tx.endpoint) if isinstance(tx, Transaction) else (tx, None)
        path = f"/v1/transactions/{_seg(tx_id)}/{action}"
        _, answer = await self._http.call("POST", path, idempotent=True, endpoint=endpoint)
        return str(answer["state"])

    async def commit_transaction(self, tx: Transaction | str) -> None:
        """Make the message visible; raises ``AlreadyRolledBack`` if it was rolled back."""
        await self._end(tx, "commit")

    async def rollback_transaction(self, tx: Transaction | str) -> None:
        """Discard the message; raises ``AlreadyCommitted`` if it was committed."""
        await self._end(tx, "rollback")

    async def get_transaction(self, tx_id: str) -> TransactionStatus:
        path = f"/v1/transactions/{_seg(tx_id)}"
        return TransactionStatus.from_json(await self._call("GET", path, idempotent=True))

    async def poll_checks(
        self, endpoint: str, producer_group: str, *, wait_ms: int = 20000, max_checks: int = 100
    ) -> list[CheckRequest]:
        """Long-poll ``endpoint`` for check-backs addressed to ``producer_group``. Not
        repeated: the caller polls again anyway, and a lost answer is asked again later."""
        _, answer = await self._http.call(
            "GET",
            f"/v1/producers/{_seg(producer_group)}/checks",
            params={"wait_ms": str(wait_ms), "max": str(max_checks)},
            idempotent=False,
            endpoint=endpoint,
            extra_timeout_s=wait_ms / 1000,
            retries=0,
        )
        return [CheckRequest.from_json(c) for c in answer["checks"]]

    async def answer_check(self, endpoint: str, tx_id: str, answer: CheckAnswer) -> str:
        """Tell ``endpoint`` how ``tx_id`` ended locally; returns the transaction's state after."""
        path = f"/v1/transactions/{_seg(tx_id)}/check"
        _, reply = await self._http.call(
            "POST", path, {"state": answer}, idempotent=True, endpoint=endpoint
        )
        return str(reply["state"])


#: Statuses and codes of a batch request's error that may be about one message only: the batch
#: is then sent again one message per request, so each caller gets its own answer.
_PER_MESSAGE_STATUSES = frozenset({400, 413})
_PER_MESSAGE_CODES = frozenset({"msg_id_conflict"})


class _SendBatcher:
    """Coalesces concurrent single sends to one topic into batch requests, as Kafka's producer
    does with ``linger.ms``; one per topic and client.

    A send queues its message and, if it opened the batch, schedules the flush: at the end of
    the event loop's current turn (``linger_ms=0``, the default), so a send with nothing beside
    it leaves at once and ``asyncio.gather`` of 100 sends leaves as one request; or after
    ``linger_ms``. A batch also leaves when it holds ``batch_max`` messages or about
    ``batch_max_bytes`` of JSON. Each caller gets its own :class:`SendResult`. Errors: one that
    concerns the whole request (unavailable, timeout, unknown topic, auth) reaches every caller
    of the batch; a 400, a 413 or a 409 ``msg_id_conflict`` may concern one message, so that
    batch is sent again one message per request and each caller gets exactly its own result or
    error. Messages carry their
    ``msg_id`` from the start, so a batch repeated after a lost answer is stored once.

    A send that opens a batch with ``linger_ms=0`` sends it from the caller's own task when
    it is still alone at the end of the turn, saving the flush callback, a task and a future
    per call: at once when nothing else is due to run in the turn (read from asyncio's own
    loop, its ready queue, a private attribute), else (or on a loop without one, uvloop) after
    letting the turn end. Others that joined meanwhile make it a batch as above.
    """

    def __init__(self, client: Client, topic: str) -> None:
        self.client = client
        self.topic = topic
        self.path = f"/v1/topics/{_seg(topic)}/messages"
        self.items: list[dict[str, Any]] = []
        self.waiters: list[asyncio.Future[SendResult]] = []
        self.size = 0
        self.timer: asyncio.Handle | None = None
        self.leading = False  # the open batch is flushed by the send that opened it

    def send(self, item: dict[str, Any]) -> Awaitable[SendResult]:
        """Send one message object (API.md); await its result, got alone or in a batch."""
        if self.items or self.client._linger_s:
            return self.add(item)
        if _turn_ends_here():
            return self.client._send_one(self.path, item)
        return self._lead(item)

    async def _lead(self, item: dict[str, Any]) -> SendResult:
        """Open a batch, let the turn end, then send it from this task if it is still alone."""
        fut = self.add(item, lead=True)
        try:
            await asyncio.sleep(0)
        except BaseException:
            if self.waiters and self.waiters[0] is fut:
                self._flush()  # others may have joined; this one may be stored anyway
            raise
        if self.waiters and self.waiters[0] is fut:
            if len(self.waiters) == 1:
                self.items, self.waiters, self.size, self.leading = [], [], 0, False
                return await self.client._send_one(self.path, item)
            self._flush()
        return await fut

    def add(self, item: dict[str, Any], lead: bool = False) -> asyncio.Future[SendResult]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[SendResult] = loop.create_future()
        self.items.append(item)
        self.waiters.append(fut)
        body = item.get("body") or item.get("body_b64") or ""
        self.size += len(body) + 200
        client = self.client
        if len(self.items) >= client._batch_max or self.size >= client._batch_max_bytes:
            self._flush()
        elif lead:
            self.leading = True
        elif self.timer is None and not self.leading:
            if client._linger_s > 0:
                self.timer = loop.call_later(client._linger_s, self._flush)
            else:
                self.timer = loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self.leading = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        items, waiters = self.items, self.waiters
        if not items:
            return
        self.items, self.waiters, self.size = [], [], 0
        task = asyncio.ensure_future(self._send(items, waiters))
        _IN_FLIGHT.add(task)
        task.add_done_callback(_IN_FLIGHT.discard)

    async def _send(
        self, items: list[dict[str, Any]], waiters: list[asyncio.Future[SendResult]]
    ) -> None:
        client = self.client
        if len(items) == 1:
            try:
                _settle(waiters[0], await client._send_one(self.path, items[0]), None)
            except Exception as e:
                _settle(waiters[0], None, e)
            return
        try:
            answer = await client._call("POST", self.path, {"messages": items}, idempotent=True)
        except TempoClientError as e:
            if e.status not in _PER_MESSAGE_STATUSES and e.code not in _PER_MESSAGE_CODES:
                for fut in waiters:
                    _settle(fut, None, e)
                return
            # Which message? Ask one by one, concurrently; each caller hears its own answer.
            pairs = zip(items, waiters, strict=True)
            await asyncio.gather(*(self._send([i], [w]) for i, w in pairs))
            return
        except Exception as e:  # a bug or cancellation must not leave callers waiting
            for fut in waiters:
                _settle(fut, None, e)
            return
        for fut, result in zip(waiters, answer["results"], strict=True):
            _settle(fut, SendResult.from_json(result), None)


def _turn_ends_here() -> bool:
    """Whether nothing else is due to run in the event loop's current turn: asyncio's loop
    keeps what is due in its ready queue (``_ready``); False on a loop without one (uvloop).
    A batch opened now would be flushed first thing in the next turn, before any I/O callback
    or timer of that turn, so it would hold only what this caller put in it."""
    ready = getattr(asyncio.get_running_loop(), "_ready", None)
    return ready is not None and not ready


#: Batch requests under way: referenced so the loop does not collect their tasks.
_IN_FLIGHT: set[asyncio.Future[None]] = set()


def _settle(
    fut: asyncio.Future[SendResult], result: SendResult | None, error: BaseException | None
) -> None:
    if fut.done():  # the caller was cancelled; the message may still have been stored
        return
    if error is not None:
        fut.set_exception(error)
    else:
        assert result is not None
        fut.set_result(result)
