"""The TxStore contract: the SQLite store and the SQL store on real MariaDB and PostgreSQL pass
the same cases; the claim cases (leases, SKIP LOCKED) run on the shared stores only.

Each SQL case has tables of its own (a unique ``table_prefix``), dropped after it. A database
that is not running skips its cases locally and fails them under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import update

from tests.e2e.server import free_port
from tests.integration.tx_store_helpers import T0_MS, TcpProxy, make_row, own_tables
from txcoord.sql_store import SCHEMA_VERSION, SqlTxStore
from txcoord.states import AlreadyCommitted, TxState
from txcoord.store import (
    SharedTxStore,
    SqliteTxStore,
    TxNotFound,
    TxRow,
    TxStore,
    TxStoreUnavailable,
)

pytestmark = pytest.mark.integration

BACKENDS = ["sqlite", "mariadb", "postgresql"]


@pytest.fixture
def db_url(request: pytest.FixtureRequest) -> str | None:
    """The database URL of the backend under test (None: SQLite)."""
    backend = request.param
    if backend == "sqlite":
        return None
    return str(request.getfixturevalue("mysql_url" if backend == "mariadb" else "postgres_url"))


@pytest.fixture
async def store_url(db_url: str | None, tmp_path: Path) -> AsyncIterator[str]:
    if db_url is None:
        yield f"sqlite:///{tmp_path / 'tx.db'}"
        return
    async with own_tables(db_url) as url:
        yield url


def open_store(url: str) -> TxStore:
    if url.startswith("sqlite:///"):
        return SqliteTxStore(Path(url.removeprefix("sqlite:///")))
    return SqlTxStore(url)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[TxStore]:
    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


def kept(store: TxStore, row: TxRow | None) -> TxRow | None:
    """``row`` as ``store`` keeps it: the lease fields only in a shared store."""
    if row is None or isinstance(store, SharedTxStore):
        return row
    return dataclasses.replace(row, owner=None, due_at=None)


every = pytest.mark.parametrize("db_url", BACKENDS, indirect=True)
shared_only = pytest.mark.parametrize("db_url", ["mariadb", "postgresql"], indirect=True)


@every
async def test_a_row_reads_back_as_written_and_a_resent_prepare_finds_the_first(
    store: TxStore,
) -> None:
    big = os.urandom(200_000)  # larger than a MySQL BLOB (64 KiB)
    row = make_row(record=big, check_url="http://127.0.0.1:1/check")
    assert await store.insert(row) is None
    assert await store.get(row.tx_id) == kept(store, row)
    again = make_row()
    again.msg_id = row.msg_id
    first = await store.insert(again)
    assert first is not None and first.tx_id == row.tx_id and first.record == big
    assert await store.get(again.tx_id) is None  # nothing stored for the resend
    assert await store.get("no-such-tx") is None
    assert await store.health() is None


@every
async def test_change_writes_what_the_function_did_and_nothing_when_it_raises(
    store: TxStore,
) -> None:
    row = make_row()
    await store.insert(row)

    def commit(r: object) -> str:
        assert isinstance(r, type(row))
        r.state, r.updated_at = TxState.COMMITTED, T0_MS + 5
        return "done"

    assert await store.change(row.tx_id, commit) == "done"
    got = await store.get(row.tx_id)
    assert got is not None and got.state is TxState.COMMITTED and got.updated_at == T0_MS + 5

    def refuse(r: object) -> None:
        assert isinstance(r, type(row))
        r.state = TxState.ROLLED_BACK
        raise AlreadyCommitted("the transaction was committed")

    with pytest.raises(AlreadyCommitted):
        await store.change(row.tx_id, refuse)
    got = await store.get(row.tx_id)
    assert got is not None and got.state is TxState.COMMITTED
    with pytest.raises(TxNotFound):
        await store.change("no-such-tx", lambda r: None)


@every
async def test_concurrent_changes_of_one_row_serialise(store: TxStore) -> None:
    # Each change reads the count and writes it plus one: a lost update shows as a lower total.
    row = make_row()
    await store.insert(row)

    def bump(r: object) -> None:
        assert isinstance(r, type(row))
        r.check_count += 1

    await asyncio.gather(*(store.change(row.tx_id, bump) for _ in range(20)))
    got = await store.get(row.tx_id)
    assert got is not None and got.check_count == 20


@every
async def test_changes_at_once_stand_or_fall_each_on_its_own(store: TxStore) -> None:
    # Concurrent changes may share one database transaction: a refused one, or one of a
    # missing row, must neither undo nor block the others.
    a, b = make_row(), make_row()
    await store.insert(a)
    await store.insert(b)

    def commit(r: TxRow) -> TxState:
        r.state = TxState.COMMITTED
        return r.state

    def refused(r: TxRow) -> None:
        r.state, r.check_count = TxState.ROLLED_BACK, 99
        raise AlreadyCommitted("the transaction was committed")

    results = await asyncio.gather(
        store.change(a.tx_id, commit),
        store.change(a.tx_id, refused),
        store.change("no-such-tx", commit),
        store.change(b.tx_id, refused),
        store.change(b.tx_id, commit),
        return_exceptions=True,
    )
    assert results[0] is TxState.COMMITTED and results[4] is TxState.COMMITTED
    assert isinstance(results[1], AlreadyCommitted) and isinstance(results[3], AlreadyCommitted)
    assert isinstance(results[2], TxNotFound)
    for tx_id in (a.tx_id, b.tx_id):
        got = await store.get(tx_id)
        assert got is not None and got.state is TxState.COMMITTED and got.check_count == 0


@every
async def test_delivery_drops_the_record_and_open_rows_are_those_with_work_left(
    store: TxStore,
) -> None:
    prepared = make_row()
    committed = make_row(state=TxState.COMMITTED)
    delivered = make_row(state=TxState.COMMITTED)
    rolled = make_row(state=TxState.ROLLED_BACK, record=None, delivered=True)
    parked = make_row(state=TxState.CHECK_MAX, delivered=False)
    for r in (prepared, committed, delivered, rolled, parked):
        await store.insert(r)
    await store.mark_delivered(delivered.tx_id)
    got = await store.get(delivered.tx_id)
    assert got is not None and got.delivered and got.record is None
    open_ids = {r.tx_id for r in await store.open_rows()}
    # check_max rows are never delivered until committed: not "delivered" but not work either
    # for the start-up scan, which only re-arms prepared ones and delivers committed ones.
    assert {prepared.tx_id, committed.tx_id} <= open_ids
    assert not open_ids & {delivered.tx_id, rolled.tx_id}


@every
async def test_pages_by_state_in_creation_order_and_counts(store: TxStore) -> None:
    rows = [make_row(created_at=T0_MS + i // 2) for i in range(7)]  # ties on created_at
    rows.append(make_row(state=TxState.CHECK_MAX, created_at=T0_MS))
    for r in rows:
        await store.insert(r)
    expected = sorted((r.created_at, r.tx_id) for r in rows[:7])
    pages: list[tuple[int, str]] = []
    after = None
    while True:
        page = await store.list_page(TxState.PREPARED, limit=3, after=after)
        pages.extend((r.created_at, r.tx_id) for r in page)
        if len(page) < 3:
            break
        after = (page[-1].created_at, page[-1].tx_id)
    assert pages == expected
    assert await store.count_states() == {"prepared": 7, "check_max": 1}


@every
async def test_check_history_in_order_and_purge_keeps_what_is_still_needed(
    store: TxStore,
) -> None:
    old_done = make_row(state=TxState.ROLLED_BACK, record=None, delivered=True)
    new_done = make_row(state=TxState.COMMITTED, delivered=True, record=None)
    new_done.updated_at = T0_MS + 10_000
    parked = make_row(state=TxState.CHECK_MAX)
    for r in (old_done, new_done, parked):
        await store.insert(r)
    for i, answer in enumerate(("unanswered", "unknown", "commit")):
        await store.record_check(parked.tx_id, T0_MS + i, answer, "producer")
    await store.record_check(old_done.tx_id, T0_MS, "rollback", "check_url")
    history = await store.check_history(parked.tx_id, 2)
    assert history == [(T0_MS, "unanswered", "producer"), (T0_MS + 1, "unknown", "producer")]

    assert await store.purge(T0_MS + 5_000) == 1  # only the old finished one
    assert await store.get(old_done.tx_id) is None
    assert await store.get(new_done.tx_id) is not None and await store.get(parked.tx_id)
    assert len(await store.check_history(parked.tx_id, 10)) == 3  # a kept one's history stays
    await store.purge(T0_MS + 5_000)  # its check rows went with it (they were older)
    assert await store.check_history(old_done.tx_id, 10) == []


# -- shared stores: schema, claims, leases, failures -----------------------------------------


@shared_only
async def test_the_schema_is_created_once_and_a_newer_one_is_refused(store_url: str) -> None:
    a, b = SqlTxStore(store_url), SqlTxStore(store_url)
    await asyncio.gather(a.open(), b.open())  # two servers starting at once
    row = make_row()
    await a.insert(row)
    await b.close()
    await b.open()  # again: idempotent, nothing lost
    assert await b.get(row.tx_id) == row
    await b.close()
    version = a.version
    await a._run(lambda c: c.execute(update(version).values(version=SCHEMA_VERSION + 1)))
    newer = SqlTxStore(store_url)
    with pytest.raises(TxStoreUnavailable, match=f"schema version {SCHEMA_VERSION + 1}"):
        await newer.open()
    await a._run(lambda c: c.execute(update(version).values(version=SCHEMA_VERSION)))
    await a.close()


@shared_only
async def test_due_rows_are_claimed_once_across_claimers_under_a_lease(store: TxStore) -> None:
    assert isinstance(store, SharedTxStore)
    due = [make_row(next_check_at=T0_MS, check_url="http://h/c") for _ in range(30)]
    later = make_row(next_check_at=T0_MS + 60_000, check_url="http://h/c")
    committed = make_row(state=TxState.COMMITTED)
    committed.due_at = T0_MS  # a delivery whose lease ran out
    for r in (*due, later, committed):
        await store.insert(r)

    async def claim(owner: str) -> list[str]:
        rows = await store.claim_due(
            now=T0_MS, until=T0_MS + 5_000, owner=owner, groups=(), others_after=0, limit=7
        )
        assert all(r.owner == owner and r.due_at == T0_MS + 5_000 for r in rows)
        return [r.tx_id for r in rows]

    got: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    while True:
        rounds = await asyncio.gather(*(claim(o) for o in got))
        for owner, ids in zip(got, rounds, strict=True):
            got[owner].extend(ids)
        if not any(rounds):
            break
    claimed = [t for ids in got.values() for t in ids]
    assert sorted(claimed) == sorted([r.tx_id for r in due] + [committed.tx_id])  # each once
    # Within the lease nobody claims them again; the owner renews; after it, others may.
    assert await claim("d") == []
    assert await store.renew("a", got["a"], T0_MS + 20_000) == len(got["a"])
    assert await store.renew("z", got["b"], T0_MS + 20_000) == 0  # not z's to renew
    after_lease = await store.claim_due(
        now=T0_MS + 6_000, until=T0_MS + 9_000, owner="d", groups=(), others_after=0, limit=100
    )
    assert sorted(r.tx_id for r in after_lease) == sorted(got["b"] + got["c"])


@shared_only
async def test_an_sdk_groups_check_goes_first_to_a_node_it_polls(store: TxStore) -> None:
    assert isinstance(store, SharedTxStore)
    sdk = make_row(next_check_at=T0_MS, group="polled-here")

    async def claim(groups: tuple[str, ...], others_after: int) -> list[str]:
        rows = await store.claim_due(
            now=T0_MS + 100,
            until=T0_MS + 5_000,
            owner="n",
            groups=groups,
            others_after=others_after,
            limit=10,
        )
        return [r.tx_id for r in rows]

    await store.insert(sdk)
    assert await claim(("other",), others_after=T0_MS - 1) == []  # not yet for others
    assert await claim(("polled-here",), others_after=T0_MS - 1) == [sdk.tx_id]
    other = make_row(next_check_at=T0_MS, group="nobody-polls")
    await store.insert(other)
    assert await claim((), others_after=T0_MS) == [other.tx_id]  # due long enough: anyone


@shared_only
async def test_an_unreachable_database_is_a_503_with_the_reason_and_comes_back(
    store_url: str,
) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(store_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 0)
    await proxy.start()
    via_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
    store = SqlTxStore(via_proxy, op_timeout_s=2.0)
    try:
        await store.open()
        row = make_row()
        await store.insert(row)
        await proxy.cut()
        with pytest.raises(TxStoreUnavailable, match="unavailable") as err:
            await store.insert(make_row())
        assert err.value.status == 503 and err.value.code == "transaction_store_unavailable"
        reason = await store.health()
        assert reason is not None and "transaction store" in reason
        await proxy.restore()
        for _ in range(50):
            if await store.health() is None:
                break
            await asyncio.sleep(0.1)
        assert await store.health() is None
        assert await store.get(row.tx_id) == row  # nothing lost
    finally:
        await store.close()
        await proxy.close()


async def test_a_database_nobody_listens_on_fails_the_start_clearly() -> None:
    url = f"postgresql+asyncpg://postgres:secret@127.0.0.1:{free_port()}/test"
    store = SqlTxStore(url, op_timeout_s=2.0)
    with pytest.raises(TxStoreUnavailable) as err:
        await store.open()
    text = str(err.value)
    assert "unavailable" in text and "127.0.0.1" in text and "secret" not in text


@pytest.mark.parametrize("db", ["mysql_url", "postgres_url"])
async def test_an_option_the_driver_does_not_take_fails_the_start_clearly(
    db: str, request: pytest.FixtureRequest
) -> None:
    """An unknown query option (a typo of ``table_prefix``, say) reaches the driver's connect():
    a 503 naming it and the store, not a TypeError's traceback."""
    from sqlalchemy.engine import make_url

    url = make_url(str(request.getfixturevalue(db)))
    url = url.set(password="secret").update_query_dict({"table_prefx": "x_"})
    store = SqlTxStore(url.render_as_string(False), op_timeout_s=2.0)
    with pytest.raises(TxStoreUnavailable) as err:
        await store.open()
    text = str(err.value)
    assert "table_prefx" in text and "not one its driver takes" in text, text
    assert "secret" not in text


def test_a_url_that_is_not_one_says_so() -> None:
    from txcoord.sql_store import TxStoreUrlError, parse_url

    with pytest.raises(TxStoreUrlError, match="not a database URL"):
        parse_url("mysql+aiomysql://root:pw@[::1/db")
