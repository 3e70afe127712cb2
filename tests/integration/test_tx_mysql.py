"""Transactional send end to end: the SDK's ``TransactionalProducer`` + ``Barrier`` on a real
MariaDB (SQLAlchemy async, aiomysql) against a real ``tempomq serve`` process, with producers
dying at every step and the coordinator SIGKILLed mid-flight.

The invariant every test checks in the end: a message is delivered if and only if its ``orders``
row committed, and then exactly once; every transaction the coordinator knows ends as the
producer's database says. Each test has its own server and its own tables (dropped after).
Check-backs are made fast with server flags (``tx_helpers.FAST_CHECKS``); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from tempomq.client import (
    Client,
    OutgoingMessage,
    TransactionalProducer,
    TransactionRolledBack,
)
from tests.e2e.server import Server
from tests.integration.tx_helpers import (
    APP_ERROR,
    FAST_CHECKS,
    GROUP,
    PAST_A_CHECK_S,
    SLOW,
    TOPIC,
    AppError,
    Crash,
    Db,
    HeldSession,
    LocalCommitFailed,
    MortalClient,
    ProducerDied,
    drain,
    final_state,
    mortal_producer,
    open_transactions,
    own_tables,
    place_order,
    run_fate,
    states,
    until_none_open,
    wait_ready,
)

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data", *FAST_CHECKS)
    s.start()
    try:
        yield s
    finally:
        s.ensure_stopped()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    async with Client(server.url) as c:
        await c.create_topic(TOPIC, 4)
        yield c


@pytest.fixture
async def engine(mysql_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(mysql_url, pool_size=40, max_overflow=20)
    yield eng
    await eng.dispose()


@pytest.fixture
async def db(engine: AsyncEngine) -> AsyncIterator[Db]:
    async with own_tables(engine) as tables:
        yield tables


@pytest.fixture
async def listener(client: Client, db: Db) -> AsyncIterator[TransactionalProducer]:
    """A producer of the group answering check-backs from the barrier (another instance of the
    service, say); its ``transaction`` is the plain SDK path."""
    async with TransactionalProducer(client, GROUP, barrier=db.barrier) as producer:
        yield producer


async def open_tx_ids(client: Client) -> list[str]:
    """The transactions the coordinator holds open; the caller expects exactly one."""
    open_now = await open_transactions(client.current_endpoint)
    assert len(open_now) == 1, open_now
    return [str(t["tx_id"]) for t in open_now]


async def raise_app_error() -> None:
    raise AppError("the application failed")


# -- (1) commit --------------------------------------------------------------------------------


async def test_commit_writes_the_row_and_delivers_the_message_once(
    client: Client, db: Db, listener: TransactionalProducer
) -> None:
    tx = await place_order(listener, db, 1)

    assert await db.orders_by_body() == {"order-1": tx.tx_id}
    assert await db.barrier_rows() == {tx.tx_id: "commit"}
    assert (await client.get_transaction(tx.tx_id)).state == "committed"
    assert await drain(client, "billing", want=1, quiet_s=PAST_A_CHECK_S) == {"order-1": 1}
    assert (await client.get_message(tx.msg_id)).text == "order-1"
    assert await db.barrier_rows() == {tx.tx_id: "commit"}


# -- (2) an exception in the block -------------------------------------------------------------


async def test_an_exception_in_the_block_leaves_no_row_and_no_message(
    client: Client, db: Db, listener: TransactionalProducer
) -> None:
    with pytest.raises(AppError):
        async with AsyncSession(db.engine) as session:
            message = OutgoingMessage("order-2", keys=["order-2"])
            async with listener.transaction(TOPIC, message, session) as tx:
                await session.execute(db.orders.insert().values(id=2, body="order-2"))
                await raise_app_error()

    assert await db.orders_by_body() == {}
    assert (await client.get_transaction(tx.tx_id)).state == "rolled_back"
    await asyncio.sleep(PAST_A_CHECK_S)  # a check-back, were one due, has come and gone
    assert await db.barrier_rows() == {}  # in particular no 'commit'
    assert (await client.get_transaction(tx.tx_id)).state == "rolled_back"
    assert await drain(client, "billing", want=0, quiet_s=0.5) == {}


# -- (3) the producer dies between its DB commit and the message commit ------------------------


async def test_a_producer_dead_after_its_db_commit_is_committed_by_the_next_listener(
    client: Client, db: Db
) -> None:
    dying, mortal = mortal_producer(client, db.barrier, Crash.AFTER_DB_COMMIT)
    dying.start()
    with pytest.raises(ProducerDied):
        await place_order(dying, db, 3)
    await dying.stop()
    tx = mortal.prepared
    assert tx is not None

    assert await db.orders_by_body() == {"order-3": tx.tx_id}
    # Nobody answers check-backs now: the message stays prepared, invisible.
    await asyncio.sleep(PAST_A_CHECK_S)
    status = await client.get_transaction(tx.tx_id)
    assert (status.state, status.check_count >= 1) == ("prepared", True)
    assert await drain(client, "billing", want=0, quiet_s=0.3) == {}

    async with TransactionalProducer(client, GROUP, barrier=db.barrier):
        assert await final_state(client, tx.tx_id) == "committed"
    assert await drain(client, "billing", want=1, quiet_s=PAST_A_CHECK_S) == {"order-3": 1}
    assert await db.barrier_rows() == {tx.tx_id: "commit"}


# -- (4) the producer dies before its DB commit ------------------------------------------------


@pytest.mark.parametrize("crash", [Crash.AFTER_PREPARE, Crash.DURING_DB])
async def test_a_producer_dead_before_its_db_commit_is_rolled_back_by_the_check_back(
    client: Client, db: Db, listener: TransactionalProducer, crash: Crash
) -> None:
    dying, mortal = mortal_producer(client, db.barrier, crash)
    with pytest.raises(ProducerDied):
        await place_order(dying, db, 4)
    tx = mortal.prepared
    assert tx is not None

    assert await final_state(client, tx.tx_id) == "rolled_back"
    assert await db.orders_by_body() == {}
    assert await db.barrier_rows() == {tx.tx_id: "rollback"}
    # A zombie of the dead producer committing locally now is refused by the barrier.
    async with AsyncSession(db.engine) as session:
        await session.execute(db.orders.insert().values(id=4, body="order-4", tx_id=tx.tx_id))
        with pytest.raises(TransactionRolledBack):
            await db.barrier.insert_commit(session, tx.tx_id)
        await session.rollback()
    assert await db.orders_by_body() == {}
    assert await drain(client, "billing", want=0, quiet_s=0.5) == {}
    assert (await client.get_transaction(tx.tx_id)).state == "rolled_back"


# -- (5) a check-back while the local transaction is still open --------------------------------


@pytest.mark.parametrize("local", ["commit", "rollback"])
async def test_a_check_back_during_the_open_local_transaction_waits_and_agrees(
    client: Client, db: Db, listener: TransactionalProducer, local: str
) -> None:
    session = HeldSession(db.engine)
    order = asyncio.create_task(place_order(listener, db, 5, session=session))
    try:
        await asyncio.wait_for(session.at_commit.wait(), 10)  # order and barrier rows written
        [tx_id] = await open_tx_ids(client)
        # Held past the immunity: the coordinator asks, and the listener's barrier check
        # waits for the row lock of the uncommitted barrier row.
        await db.until_checks_wait(tx_id=tx_id)
        await asyncio.sleep(1.2)  # past the coordinator's check timeout: still undecided
        assert (await client.get_transaction(tx_id)).state == "prepared"
        assert not order.done()
        session.release(local)
        if local == "commit":
            assert (await asyncio.wait_for(order, 20)).tx_id == tx_id
        else:
            with pytest.raises(LocalCommitFailed):
                await asyncio.wait_for(order, 20)
    finally:
        session.release("rollback")  # only if not released yet: unblocks a failed run
        await asyncio.gather(order, return_exceptions=True)
        await session.close()

    want = "committed" if local == "commit" else "rolled_back"
    assert await final_state(client, tx_id) == want
    await asyncio.sleep(PAST_A_CHECK_S)
    assert (await client.get_transaction(tx_id)).state == want
    rows = {"order-5": tx_id} if local == "commit" else {}
    assert await db.orders_by_body() == rows
    assert await db.barrier_rows() == {tx_id: local}
    assert await drain(client, "billing", want=len(rows), quiet_s=0.5) == Counter(list(rows))


async def test_a_check_back_before_the_barrier_row_wins_and_the_block_raises(
    client: Client, db: Db, listener: TransactionalProducer
) -> None:
    """The block outlives the immunity before its barrier row exists: the check-back decides
    rollback first, the local transaction is rolled back and the block raises."""
    prepared: list[str] = []

    async def slow() -> None:
        prepared.extend(await open_tx_ids(client))
        deadline = time.monotonic() + 10
        while await db.barrier_rows() == {}:  # until the check has written its 'rollback'
            assert time.monotonic() < deadline, "no check-back came"
            await asyncio.sleep(0.05)

    with pytest.raises(TransactionRolledBack):
        await place_order(listener, db, 6, work=slow)
    [tx_id] = prepared
    assert await final_state(client, tx_id) == "rolled_back"
    assert await db.orders_by_body() == {}
    assert await db.barrier_rows() == {tx_id: "rollback"}
    assert await drain(client, "billing", want=0, quiet_s=0.5) == {}


async def test_a_check_waiting_on_one_open_transaction_does_not_hold_up_the_others(
    client: Client, db: Db, listener: TransactionalProducer
) -> None:
    """While one check-back waits for a long local transaction's lock, the same producer still
    answers the check-backs of other transactions."""
    session = HeldSession(db.engine)
    held = asyncio.create_task(place_order(listener, db, 7, session=session))
    try:
        await asyncio.wait_for(session.at_commit.wait(), 10)
        [held_tx] = await open_tx_ids(client)
        await db.until_checks_wait(tx_id=held_tx)
        dying, mortal = mortal_producer(client, db.barrier, Crash.AFTER_DB_COMMIT)
        with pytest.raises(ProducerDied):
            await place_order(dying, db, 8)
        assert mortal.prepared is not None
        assert await final_state(client, mortal.prepared.tx_id, timeout_s=10) == "committed"
    finally:
        session.release("commit")
        await asyncio.gather(held, return_exceptions=True)
        await session.close()
    assert await final_state(client, held_tx) == "committed"


# -- (6) the coordinator SIGKILLed with transactions in every stage ----------------------------


async def test_a_coordinator_killed_mid_flight_ends_every_transaction_as_its_db_says(
    server: Server, client: Client, db: Db, listener: TransactionalProducer
) -> None:
    mortals: dict[int, MortalClient] = {}

    def producer(
        n: int, crash: Crash = Crash.NONE, immunity_ms: int | None = None
    ) -> TransactionalProducer:
        p, mortals[n] = mortal_producer(client, db.barrier, crash, check_immunity_ms=immunity_ms)
        return p

    def tx_id(n: int) -> str:
        tx = mortals[n].prepared
        assert tx is not None, n
        return tx.tx_id

    # Finished before the kill: committed (and delivered); rolled back by the block.
    await place_order(producer(1), db, 1)
    with pytest.raises(AppError):
        await place_order(producer(2), db, 2, work=raise_app_error)
    # Orphans of producers that died after prepare, during the DB work, after the DB commit;
    # immunity 6 s: not yet checked when the coordinator is killed a moment later.
    for n, crash in ((3, Crash.AFTER_PREPARE), (4, Crash.DURING_DB), (5, Crash.AFTER_DB_COMMIT)):
        with pytest.raises(ProducerDied):
            await place_order(producer(n, crash, 6000), db, n)
    # Blocks still running across the kill (immunity 60 s: no check-back meanwhile); they end
    # once the coordinator is back, one normally, one raising.
    resume = asyncio.Event()

    async def then_fail() -> None:
        await resume.wait()
        await raise_app_error()

    patient = {n: producer(n, immunity_ms=60_000) for n in (6, 7)}
    open_commit = asyncio.create_task(place_order(patient[6], db, 6, work=resume.wait))
    open_rollback = asyncio.create_task(place_order(patient[7], db, 7, work=then_fail))
    # Local transactions held at their commit (barrier rows written and locked), a check-back
    # waiting for a lock; they commit / roll back while the coordinator is down.
    held = {8: HeldSession(db.engine), 9: HeldSession(db.engine)}
    held_orders = {
        n: asyncio.create_task(place_order(producer(n), db, n, session=s)) for n, s in held.items()
    }
    try:
        for s in held.values():
            await asyncio.wait_for(s.at_commit.wait(), 10)
        await db.until_checks_wait(1)

        before = await states(client, [tx_id(n) for n in range(1, 10)])
        assert [before[tx_id(n)] for n in range(1, 10)] == ["committed", "rolled_back"] + [
            "prepared"
        ] * 7

        server.kill()
        held[8].release("commit")
        held[9].release("rollback")
        await asyncio.wait_for(held_orders[8], 20)  # its message commit fails: left to check-back
        with pytest.raises(LocalCommitFailed):
            await asyncio.wait_for(held_orders[9], 20)
        await asyncio.to_thread(server.start)
        await wait_ready(server.url)
        resume.set()
        await asyncio.wait_for(open_commit, 20)
        with pytest.raises(AppError):
            await asyncio.wait_for(open_rollback, 20)
    finally:  # a failed run must not leave transactions holding the tables
        resume.set()
        for s in held.values():
            s.release("rollback")  # only if not released yet
        await asyncio.gather(
            open_commit, open_rollback, *held_orders.values(), return_exceptions=True
        )
        for s in held.values():
            await s.close()

    await until_none_open(server.url)
    committed = ["order-1", "order-5", "order-6", "order-8"]
    assert set(await db.orders_by_body()) == set(committed)
    final = await states(client, [tx_id(n) for n in range(1, 10)])
    assert {n: final[tx_id(n)] for n in range(1, 10)} == {
        n: "committed" if f"order-{n}" in committed else "rolled_back" for n in range(1, 10)
    }
    delivered = await drain(client, "audit", want=len(committed), quiet_s=PAST_A_CHECK_S)
    assert delivered == Counter(committed)


# -- randomized: crashes at every step and a coordinator restart --------------------------------

FATES: dict[str, float] = {
    Crash.NONE: 0.35,
    Crash.BEFORE_PREPARE: 0.08,
    Crash.AFTER_PREPARE: 0.1,
    Crash.DURING_DB: 0.1,
    Crash.AFTER_DB_COMMIT: 0.15,
    Crash.AFTER_MESSAGE_COMMIT: 0.08,
    APP_ERROR: 0.08,
    SLOW: 0.06,
}
#: What a producer saw that means its ``orders`` row committed.
ROW_COMMITTED = {"done", f"died {Crash.AFTER_DB_COMMIT}", f"died {Crash.AFTER_MESSAGE_COMMIT}"}


async def test_randomized_crashes_and_a_coordinator_restart_deliver_exactly_the_committed(
    server: Server, client: Client, db: Db
) -> None:
    """A few hundred orders from producer processes dying at every step (and some blocks
    raising or outliving the check immunity), 24 at a time, two listener instances, and one
    SIGKILL + restart of the server halfway. Reproduce a run with ``TX_SEED=<seed>``."""
    seed = int(os.environ.get("TX_SEED", random.randrange(1 << 30)))
    log.warning("randomized transactions: TX_SEED=%d", seed)
    rng = random.Random(seed)
    total, workers = 300, 24
    fates = rng.choices(list(FATES), list(FATES.values()), k=total)
    work_s = [rng.uniform(0, 0.03) for _ in range(total)]
    outcome: dict[int, str] = {}  # what each producer saw
    tx_of: dict[int, str] = {}
    todo = iter(range(total))
    killed_after: list[int] = []

    async def one(n: int) -> None:
        outcome[n], tx_id = await run_fate(client, db, n, fates[n], work_s[n])
        if tx_id:
            tx_of[n] = tx_id

    async def worker() -> None:
        for n in todo:
            await one(n)

    async def killer() -> None:
        while len(outcome) < total // 2:
            await asyncio.sleep(0.01)
        killed_after.append(len(outcome))
        server.kill()
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.start)
        await wait_ready(server.url)

    started = time.monotonic()
    async with (
        asyncio.timeout(150),
        TransactionalProducer(client, GROUP, barrier=db.barrier),
        TransactionalProducer(client, GROUP, barrier=db.barrier),  # a second instance
    ):
        async with asyncio.TaskGroup() as group:
            group.create_task(killer())
            for _ in range(workers):
                group.create_task(worker())
        await until_none_open(server.url, timeout_s=60)
    log.warning(
        "randomized: %s in %.1fs, killed after %s",
        sorted(Counter(outcome.values()).items()),
        time.monotonic() - started,
        killed_after,
    )
    assert killed_after and killed_after[0] < total  # the kill came mid-run

    rows = await db.orders_by_body()
    # What each producer saw agrees with its database.
    for n, seen in outcome.items():
        if seen in ROW_COMMITTED:
            assert rows.get(f"order-{n}") == tx_of[n], (n, seen)
        else:
            assert f"order-{n}" not in rows, (n, seen)
    # Every transaction the coordinator knows ended as the database says.
    final = await states(client, list(tx_of.values()))
    committed_tx = set(rows.values())
    wrong = {
        n: (outcome[n], final[t])
        for n, t in tx_of.items()
        if final[t] != ("committed" if t in committed_tx else "rolled_back")
    }
    assert wrong == {}
    barrier = await db.barrier_rows()
    assert {t for t, o in barrier.items() if o == "commit"} == committed_tx
    # Delivered: exactly the committed orders, each once.
    delivered = await drain(client, "audit", want=len(rows), quiet_s=PAST_A_CHECK_S)
    assert set(delivered) == set(rows)
    assert {body: k for body, k in delivered.items() if k != 1} == {}
